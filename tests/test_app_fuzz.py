"""Fuzzing the app's callbacks (hypothesis): garbage in, only the documented error out.

What "the documented error" means for a callback of ``app.explorer.Explorer`` (the page shows what a
callback returns or raises; with ``show_error=True`` Gradio shows the text of any exception):

* it returns normally, and any problem is told in the returned HTML/markdown (``_error_html``, a
  ``**...**`` line): one line, HTML-escaped, never a Python traceback; or
* it raises ``gr.Error`` with a one-line message (the API endpoints and the gallery click);
* ``gr.Warning`` toasts (a ``UserWarning`` outside a request) are one line too;

and it comes back within ``CALL_LIMIT`` seconds. Any other exception is a crash.

Inputs are what a crafted request could send instead of the page's values: None, NaN, inf, huge and
negative numbers, text for numbers, lists and dicts, unknown run keys, modes and views, odd and broken
image files, corrupt and foreign score files. The Explorer is built once per module; hypothesis runs
derandomised with bounded examples (CI determinism, about 40 s on two cores).
"""
from __future__ import annotations

import inspect
import io
import itertools
import json
import os
import struct
import threading
import time
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("VITSLIM_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

gr = pytest.importorskip("gradio")
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from vitslim_app.explorer import VIEWS, Explorer  # noqa: E402
from vitslim_app.jobs import JobBusyError, RetrainJob  # noqa: E402
from app_harness import run_for_tests  # noqa: E402

CALL_LIMIT = 30.0  # seconds: a callback slower than this is a hang (a slow shared CI core included)
FUZZ = settings(deadline=None, derandomize=True, database=None, max_examples=25, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SKIP = gr.skip()


# ====================================================================== the contract
class Crash(AssertionError):
    pass


def _strings(v, depth: int = 0):
    """Every string inside a callback's return value (tuples, lists, dict updates)."""
    if depth > 6:
        return
    if isinstance(v, str):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _strings(x, depth + 1)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _strings(x, depth + 1)


def assert_clean_text(s: str) -> None:
    assert "Traceback" not in s and 'File "' not in s, f"traceback in the page: {s[:300]!r}"
    assert "<script" not in s.lower(), f"unescaped HTML in the page: {s[:300]!r}"


def call(fn, *args, limit: float = CALL_LIMIT):
    """Call a callback like the page would; returns ("ok", value) or ("error", gr.Error message).

    Fails on any other exception (a crash), a multi-line message, a traceback in the output or a call
    that takes longer than ``limit`` (a hang; the call runs in a thread so the test itself returns).
    """
    box: dict = {}

    def target():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                r = fn(*args)
                if inspect.isgenerator(r):
                    r = list(itertools.islice(r, 100))
            box["value"] = r
            box["warnings"] = [str(w.message) for w in caught if issubclass(w.category, UserWarning)
                               and "gradio" in str(w.filename)]
        except BaseException as e:  # noqa: BLE001 - judged below
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name="fuzz-call")
    t0 = time.monotonic()
    t.start()
    t.join(limit)
    name = getattr(fn, "__name__", repr(fn))
    assert not t.is_alive(), f"{name} hung (> {limit:.0f} s) on {_short(args)}"
    elapsed = time.monotonic() - t0
    assert elapsed < limit, f"{name} took {elapsed:.1f} s"
    if "error" in box:
        e = box["error"]
        if isinstance(e, gr.Error):
            msg = str(e.message)
            assert msg and "\n" not in msg, f"{name}: gr.Error is not one line: {msg!r}"
            assert_clean_text(msg)
            return "error", msg
        raise Crash(f"{name} crashed on {_short(args)}: {type(e).__name__}: {e}") from e
    for w in box["warnings"]:
        assert w and "\n" not in w, f"{name}: warning is not one line: {w!r}"
        assert_clean_text(w)
    for s in _strings(box["value"]):
        assert_clean_text(s)
    return "ok", box["value"]


def _short(args) -> str:
    return repr(args)[:300]


def skipped(v) -> bool:
    return isinstance(v, dict) and v == SKIP


# ====================================================================== the app under test
class BusyJob(RetrainJob):
    """A job that never trains: every start is refused as busy (after the callback checked its inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []

    def start(self, req) -> int:
        self.requests.append(req)
        raise JobBusyError("a retraining job is already running (fuzz)")


@pytest.fixture(scope="module")
def ex(tmp_path_factory):
    import importlib
    bench, sweep = (importlib.import_module(f"vitslim_core.{m}") for m in ("bench", "sweep"))
    run = run_for_tests(tmp_path_factory.getbasetemp())
    e = Explorer([run], tmp_path_factory.mktemp("fuzz-workdir"), job=BusyJob())
    mp = pytest.MonkeyPatch()
    # the heavy parts are not what is fuzzed here: timing, evaluation and sweeps return at once
    mp.setattr(bench, "measure_latency", lambda model, **kw: {"median_ms": 1.0, "threads": 1})
    mp.setattr(sweep, "sweep", lambda folder, budgets=(), progress=None, **kw: [
        {"target": 0.5, "flops_ratio": 0.5, "top1": 50.0, "top5": 90.0}])

    def fake_eval(run, model, progress=None):
        run.data()  # still goes through the dataset checks
        return {"top1": 50.0, "top5": 90.0, "loss": 1.0, "n": 1}
    e._evaluate_model = fake_eval
    e.run(None).samples()
    yield e
    mp.undo()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-files")


# ====================================================================== strategies
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.binary(max_size=6))
NUMBER = st.one_of(st.floats(0.0, 1.0), st.sampled_from(["0.5", " 0.3 ", "1e400", "nan", "-inf", "", "0x1p-2"]),
                   JUNK)
MODE = st.one_of(st.sampled_from(["flops", "ratios", "FLOPS", "ratios "]), JUNK)
VIEW = st.one_of(st.sampled_from(VIEWS + ("all",)), JUNK)
# run keys: placeholders for this module's folders, then hostile paths and junk
KEY = st.one_of(
    st.sampled_from(["@run", "@run/", "@run/..", "@run/../../..", "@run/scores.safetensors", "@work", "@uploads",
                     "@uploads/../..", "@uploads/0123456789abcdef", "", "/", "/etc", "/etc/passwd", "..", "~",
                     "\x00", "@run\x00", "a" * 300, "<script>alert(1)</script>", "C:\\Windows", "file:///etc"]),
    st.text(max_size=12), JUNK)
IMAGE = st.one_of(st.sampled_from(["none", "sample", "wrong-shape", "int-tensor", "no-tensor", "nan-tensor"]), JUNK)
EVALS = st.one_of(st.none(), JUNK, st.lists(st.one_of(JUNK, st.fixed_dictionaries(
    {"run_key": st.sampled_from(["@run", "x"]), "flops_ratio": NUMBER, "top1": NUMBER})), max_size=3))


def key_of(ex: Explorer, k):
    if not isinstance(k, str):
        return k
    return (k.replace("@run", ex.registry.default_key()).replace("@work", str(ex.workdir))
            .replace("@uploads", str(ex.registry.uploads)))


def image_of(ex: Explorer, token):
    import torch
    run = ex.run(None)
    shape = (1, run.spec.in_chans, *run.spec.img_size)
    if not isinstance(token, str):
        return token
    return {"none": None,
            "sample": ex.pick_sample(None, 1),
            "wrong-shape": {"name": "x", "tensor": torch.zeros(1, 3, 7, 9), "label": None},
            "int-tensor": {"name": "x", "tensor": torch.zeros(shape, dtype=torch.int64), "label": None},
            "no-tensor": {"name": "x", "label": 3},
            "nan-tensor": {"name": "x", "tensor": torch.full(shape, float("nan")), "label": 999},
            }.get(token, token)


def evals_of(ex: Explorer, evals):
    if isinstance(evals, list):
        return [key_of_dict(ex, e) for e in evals]
    return evals


def key_of_dict(ex, e):
    if isinstance(e, dict) and "run_key" in e:
        return {**e, "run_key": key_of(ex, e["run_key"])}
    return e


# ====================================================================== live views
@FUZZ
@given(key=KEY, mode=MODE, flops=NUMBER, attn=NUMBER, mlp=NUMBER, token=NUMBER, layer=NUMBER, sort=JUNK,
       image=IMAGE, view=VIEW)
def test_live_views_never_crash(ex, key, mode, flops, attn, mlp, token, layer, sort, image, view):
    k, img = key_of(ex, key), image_of(ex, image)
    kind, out = call(ex.budget_views, k, mode, flops, attn, mlp, token, layer, sort, img, view)
    assert kind == "ok" and len(out) == 9
    assert isinstance(out[0], str) and out[0].startswith("<div")
    if "vs-error" in out[0]:  # a bad run or budget: the message, the views left as they were
        assert all(skipped(o) for o in out[1:])
    for o in out[1:]:
        assert skipped(o) or o is None or isinstance(o, str) or (isinstance(o, np.ndarray) and o.dtype == np.uint8)
    kind, shown = call(ex.show_view, view, k, mode, flops, attn, mlp, token, layer, sort, img)
    assert kind == "ok" and len(shown) == 10


@FUZZ
@given(view=VIEW, key=KEY, mode=MODE, flops=NUMBER, attn=NUMBER, image=IMAGE, evals=EVALS, layer=NUMBER)
def test_heavy_and_overlay_views_never_crash(ex, view, key, mode, flops, attn, image, evals, layer):
    k, img = key_of(ex, key), image_of(ex, image)
    kind, out = call(ex.heavy_views, view, k, mode, flops, attn, attn, attn, img, evals_of(ex, evals))
    assert kind == "ok" and len(out) == 4
    kind, out = call(ex.overlay_views, k, mode, flops, attn, attn, attn, layer, img)
    assert kind == "ok" and len(out) == 2
    kind, (label, md) = call(ex.predict, k, mode, flops, attn, attn, attn, img)
    assert kind == "ok" and isinstance(md, str) and (label is None or isinstance(label, dict))


@settings(FUZZ, max_examples=15)
@given(key=KEY, mode=MODE, flops=NUMBER, token=NUMBER, layer=NUMBER, index=JUNK)
def test_run_and_export_callbacks_never_crash(ex, key, mode, flops, token, layer, index):
    k = key_of(ex, key)
    kind, out = call(ex.open_run, k, None, layer)
    assert kind == "ok" and len(out) == 6 and isinstance(out[-1], str)
    kind, _ = call(ex.pick_sample, k, index)  # a gr.Error for a run that cannot be opened
    assert kind == "ok" or not ex.registry.allowed(k)
    kind, (path, md) = call(ex.export_plan, k, mode, flops, 1.0, 1.0, token)
    assert kind == "ok" and isinstance(md, str)
    if path is not None:  # written inside the work dir, whatever the run key said
        assert Path(path).resolve().is_relative_to(ex.workdir.resolve())
    for fn in (ex.score_figure, ex.measure_speed):
        assert call(fn, k, mode, flops, 1.0, 1.0, token)[0] == "ok"
    assert call(ex.accuracy_note, k)[0] == "ok"
    assert call(ex.accuracy_figure, k, mode, flops, 1.0, 1.0, token, None)[0] == "ok"


@settings(FUZZ, max_examples=12)
@given(key=KEY, flops=NUMBER, epochs=NUMBER, lr=NUMBER, steps=NUMBER, distill=JUNK, evals=EVALS)
def test_evaluate_export_and_retrain_never_crash(ex, key, flops, epochs, lr, steps, distill, evals):
    k = key_of(ex, key)
    kind, (md, fig, ev) = call(ex.evaluate_budget, k, "flops", flops, 1, 1, 1, evals_of(ex, evals))
    assert kind == "ok" and isinstance(md, str) and isinstance(ev, list)
    kind, (path, md) = call(ex.export_slim, k, "flops", flops, 1, 1, 1)
    assert kind == "ok" and isinstance(md, str)
    kind, (md, fig) = call(ex.compute_sweep, k, "flops", flops, 1, 1, 1, evals_of(ex, evals))
    assert kind == "ok" and isinstance(md, str)
    before = len(ex.job.requests)
    kind, outs = call(ex.start_retrain, k, "flops", flops, 1, 1, 1, epochs, lr, distill, steps)
    assert kind == "ok" and outs and all(len(o) == 4 and isinstance(o[0], str) for o in outs)
    for req in ex.job.requests[before:]:  # what reached the job is sane
        assert req.epochs >= 1 and req.max_steps >= 0 and 0 < req.lr < 1
        assert ex.registry.allowed(req.run_key)
    assert call(ex.stop_retrain)[0] == "ok" and call(ex.job_status)[0] == "ok"


# ====================================================================== URL and API
QUERY = st.one_of(JUNK, st.dictionaries(
    st.one_of(st.sampled_from(["flops", "attn", "mlp", "token", "mode", "view", "layer", "run"]), JUNK.filter(
        lambda v: isinstance(v, (str, int, type(None))))),
    st.one_of(st.sampled_from(["0.5", "2", "-1", "nan", "inf", "1e400", "ratios", "tokens", "history", "demo",
                               "../..", "/etc"]), JUNK), max_size=6))


@FUZZ
@given(query=QUERY)
def test_url_state_is_sanitised(ex, query):
    kind, st_ = call(ex.url_state, query)
    assert kind == "ok" and isinstance(st_, dict)
    for k in ("flops", "attn", "mlp", "token"):
        if k in st_:
            assert 0.01 <= st_[k] <= 1.0
    assert st_.get("mode", "flops") in ("flops", "ratios")
    assert st_.get("view", "attention") in VIEWS
    assert "run" not in st_ or st_["run"] in [key for _, key in ex.registry.startup_choices()]
    assert isinstance(st_.get("layer", 0), int)
    kind, out = call(ex.on_load, SimpleNamespace(query_params=query))
    assert kind == "ok" and len(out) == 9


@settings(FUZZ, max_examples=15)
@given(a=NUMBER, b=NUMBER, c=NUMBER, image=st.one_of(st.sampled_from(["@ok", "@missing", "@dir", "/dev/null",
                                                                       "/etc/passwd", "@run/scores.safetensors"]),
                                                      JUNK))
def test_api_endpoints_raise_only_gr_error(ex, files, a, b, c, image):
    ok_png = files / "api-ok.png"
    if not ok_png.is_file():
        from PIL import Image
        Image.new("RGB", (20, 12), (10, 200, 30)).save(ok_png)
    if isinstance(image, str) and image.startswith("@"):
        image = {"@ok": str(ok_png), "@missing": str(files / "missing.png"), "@dir": str(files)}.get(
            image) or key_of(ex, image)
    for name, args in (("api_set_budget", (a,)), ("api_set_ratios", (a, b, c)), ("api_evaluate", (a,)),
                       ("api_token_overlay", (image, b, a))):
        kind, v = call(getattr(ex, name), *args)
        if kind == "ok":
            if name == "api_token_overlay":
                assert isinstance(v, np.ndarray) and v.dtype == np.uint8
            else:
                assert isinstance(v, dict)
                json.dumps(v)  # the client gets JSON


# ====================================================================== images
def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_header(w: int, h: int, depth: int = 8, ctype: int = 2, idat: bytes = b"") -> bytes:
    """A PNG that declares ``w`` x ``h`` pixels (a decompression bomb when huge), with little or no data."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))
            + (_chunk(b"IDAT", idat) if idat else b"") + _chunk(b"IEND", b""))


def _encoded(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def odd_images() -> dict[str, bytes | None]:
    """Crafted image files: name -> bytes (None: the path does not exist)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    ok = _encoded(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)), "PNG")
    frames = [Image.new("P", (16, 16), i) for i in range(4)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    bmp = bytearray(_encoded(Image.new("RGB", (10, 10)), "BMP"))
    bmp[18:26] = struct.pack("<ii", 200_000, 200_000)
    gif_bomb = bytearray(_encoded(Image.new("P", (10, 10)), "GIF"))
    gif_bomb[6:10] = struct.pack("<HH", 65535, 65535)
    return {
        "ok.png": ok,
        "bomb.png": png_header(100_000, 100_000),
        "bomb-wide.png": png_header(2**31 - 1, 1),
        "bomb-data.png": png_header(7000, 7000, idat=zlib.compress(b"\0" * 4096)),
        "zero.png": png_header(0, 0),
        "zero-wide.png": png_header(0, 10),
        "signature-only.png": b"\x89PNG\r\n\x1a\n",
        "empty.png": b"",
        "text.png": b"this is not an image",
        "truncated.png": ok[: len(ok) // 2],
        "truncated-header.png": ok[:30],
        "16bit.png": _encoded(Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16)), "PNG"),
        "cmyk.jpg": _encoded(Image.new("CMYK", (20, 20), (10, 20, 30, 40)), "JPEG"),
        "cmyk-truncated.jpg": _encoded(Image.new("CMYK", (20, 20), (10, 20, 30, 40)), "JPEG")[:100],
        "float.tiff": _encoded(Image.fromarray(rng.random((10, 10)).astype(np.float32)), "TIFF"),
        "int32.tiff": _encoded(Image.fromarray(rng.integers(-5, 5, (10, 10)).astype(np.int32)), "TIFF"),
        "lab.tiff": _encoded(Image.new("LAB", (10, 10)), "TIFF"),
        "one-bit.png": _encoded(Image.new("1", (10, 10)), "PNG"),
        "la.png": _encoded(Image.new("LA", (10, 10)), "PNG"),
        "palette-transparent.png": _encoded(Image.new("P", (10, 10)), "PNG", transparency=0),
        "animated.gif": gif.getvalue(),
        "bomb.gif": bytes(gif_bomb),
        "bomb.bmp": bytes(bmp),
        "icon.ico": _encoded(Image.new("RGBA", (32, 32)), "ICO"),
        "one-pixel.png": _encoded(Image.new("RGB", (1, 1)), "PNG"),
        "thin.png": _encoded(Image.new("RGB", (1, 3000)), "PNG"),
        "image.svg": b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
        "<b>html</b>.png": b"nope",
        "missing.png": None,
    }


def check_image_upload(ex: Explorer, path, old) -> None:
    run = ex.run(None)
    kind, (state, msg) = call(ex.upload_image, None, path, old)
    assert kind == "ok" and isinstance(msg, str)
    if msg.startswith("**Image rejected:**"):
        assert state is old
    else:
        assert msg.startswith("Using") and state["tensor"].shape == (1, run.spec.in_chans, *run.spec.img_size)
        assert bool(np.isfinite(state["tensor"].numpy()).all())
        kind, (label, _) = call(ex.predict, None, "flops", 0.5, 1, 1, 1, state)
        assert kind == "ok" and label
    kind, out = call(ex.api_token_overlay, path, 1, 0.5)
    assert kind == "error" or (isinstance(out, np.ndarray) and out.ndim == 3)


@pytest.mark.parametrize("name", list(odd_images()))
def test_odd_images_are_used_or_rejected_with_a_message(ex, files, name):
    data = odd_images()[name]
    path = files / "odd" / name
    path.parent.mkdir(exist_ok=True)
    if data is not None:
        path.write_bytes(data)
    old = {"name": "old", "tensor": ex.pick_sample(None, 0)["tensor"], "label": None}
    check_image_upload(ex, str(path), old)
    if "bomb" in name or name in ("text.png", "truncated.png", "empty.png", "missing.png"):
        assert call(ex.upload_image, None, str(path), old)[1][0] is old


@pytest.mark.parametrize("path", [None, "", 5, ["a.png"], {"name": 3}, "/dev/null", "/dev/zero", "/etc", "/proc/self/mem",
                                  "/nonexistent/x.png", "a\x00b.png", SimpleNamespace(name="/etc/passwd")])
def test_image_paths_that_are_not_images(ex, path):
    kind, (state, msg) = call(ex.upload_image, None, path, "OLD")
    assert kind == "ok" and (skipped(state) and msg == "" if not path else state == "OLD")
    assert call(ex.api_token_overlay, path, 0, 0.5)[0] == "error"


@settings(FUZZ, max_examples=30)
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       head=st.binary(max_size=16))
def test_mutated_images_are_used_or_rejected(ex, files, cut, flips, head):
    from PIL import Image
    good = _encoded(Image.fromarray(np.arange(24 * 20 * 3, dtype=np.uint8).reshape(24, 20, 3)), "PNG")
    data = bytearray(good[: len(good) - cut] if cut else good)
    for pos, byte in flips:
        if data:
            data[pos % len(data)] = byte
    data = bytes(data) if not head else head + bytes(data[len(head):])
    path = files / "mutated.png"
    path.write_bytes(data)
    check_image_upload(ex, str(path), None)


# ====================================================================== score file uploads
def _scores_bytes(ex: Explorer) -> bytes:
    return (Path(ex.registry.default_key()) / "scores.safetensors").read_bytes()


def check_score_upload(ex: Explorer, paths) -> str:
    """Upload; an accepted file must then work in every view. Returns the message."""
    kind, (dd, msg) = call(ex.upload_run, paths)
    assert kind == "ok" and isinstance(msg, str)
    if msg.startswith("**Upload rejected:**"):
        assert skipped(dd)
        return msg
    assert msg.startswith("Opened"), msg
    k = dd["value"]
    assert ex.registry.allowed(k)
    kind, out = call(ex.budget_views, k, "flops", 0.5, 1, 1, 1, 1, False, None)
    assert kind == "ok"
    assert call(ex.budget_views, k, "ratios", 0.5, 0.4, 0.3, 0.6, 1, True, None, "image")[0] == "ok"
    assert call(ex.open_run, k, None, 0)[0] == "ok"
    assert call(ex.heavy_views, "accuracy", k, "flops", 0.5, 1, 1, 1, None, None)[0] == "ok"
    assert call(ex.predict, k, "flops", 0.5, 1, 1, 1, None)[0] == "ok"
    assert call(ex.export_plan, k, "flops", 0.5, 1, 1, 1)[0] == "ok"
    return msg


@settings(FUZZ, max_examples=30)
@given(kind=st.sampled_from(["truncate", "flip-data", "flip-header", "header-length", "random"]),
       pos=st.integers(0, 1 << 20), byte=st.integers(0, 255), n=st.sampled_from([0, 1, 7, 2**63, 2**64 - 1]),
       blob=st.binary(max_size=64))
def test_corrupt_score_files_are_rejected_with_a_message(ex, files, kind, pos, byte, n, blob):
    raw = bytearray(_scores_bytes(ex))
    hlen = struct.unpack("<Q", raw[:8])[0]
    if kind == "truncate":
        raw = raw[: pos % len(raw)]
    elif kind == "flip-data":
        raw[8 + hlen + pos % (len(raw) - 8 - hlen)] = byte
    elif kind == "flip-header":
        raw[8 + pos % hlen] = byte
    elif kind == "header-length":
        raw[:8] = struct.pack("<Q", n)
    else:
        raw = bytearray(blob)
    f = files / "scores.safetensors"
    f.write_bytes(bytes(raw))
    check_score_upload(ex, [str(f)])


META_PATHS = [("data",), ("data", "input_size"), ("data", "mean"), ("data", "std"), ("data", "class_names"),
              ("data", "name"), ("data", "interpolation"), ("data", "crop_pct"), ("data", "num_classes"),
              ("model",), ("model", "name"), ("model", "kwargs"), ("search",), ("search", "searched"),
              ("search", "epochs"), ("search", "w_attn"), ("eval",), ("eval", "top1"), ("attn_mode",),
              ("arch", "depth"), ("arch", "grid"), ("arch", "num_classes"), ("arch", "model_name"), ("versions",),
              ("format_version",), ("complete",)]
META_JUNK = st.one_of(JUNK.filter(lambda v: not isinstance(v, bytes) and v != 10**400),
                      st.sampled_from([[3, 100_000, 100_000], [1, 16, 16, 16], [0, 0, 0], [1e9, 1e9, 1e9], ["a"],
                                       "imagefolder:/etc", "cifar10:/tmp/x", "synthetic:100000000", "<b>x</b>",
                                       {"attn": "x"}]))


@settings(FUZZ, max_examples=40)
@given(path=st.sampled_from(META_PATHS), value=META_JUNK)
def test_score_files_with_malformed_metadata_are_rejected_or_work(ex, files, path, value):
    """The JSON description inside a score file (data config, model, search, eval) is user data too."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(Path(ex.registry.default_key()) / "scores.safetensors"), framework="pt") as sf:
        md = dict(sf.metadata())
        tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    meta = json.loads(md["vitslim"])
    d = meta
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value
    md["vitslim"] = json.dumps(meta)
    f = files / "meta-scores.safetensors"
    save_file(tensors, str(f), metadata=md)
    check_score_upload(ex, [str(f)])


@settings(FUZZ, max_examples=15)
@given(history=st.one_of(JUNK, st.recursive(JUNK.filter(lambda v: not isinstance(v, bytes) and v != 10**400),
                                            lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
                                                st.sampled_from(["log", "eval", "snapshots", "step", "loss", "top1",
                                                                 "attn", "acc"]), inner, max_size=4)),
                                            max_leaves=12)))
def test_uploaded_history_of_any_shape_is_drawn_or_ignored(ex, files, history):
    import shutil
    d = files / "with-history"
    d.mkdir(exist_ok=True)
    shutil.copyfile(Path(ex.registry.default_key()) / "scores.safetensors", d / "scores.safetensors")
    try:
        (d / "history.json").write_text(json.dumps(history, allow_nan=True))
    except (TypeError, ValueError):
        (d / "history.json").write_bytes(b"\xff\xfe{")
    msg = check_score_upload(ex, [str(d / "scores.safetensors"), str(d / "history.json")])
    assert msg.startswith("Opened")


@pytest.mark.parametrize("files_arg", [5, 3.5, True, "/nonexistent.safetensors", ["/etc/passwd"], [None], [5],
                                       {"a": 1}, "/etc", "/dev/null", ["a\x00b.safetensors"], [["nested"]],
                                       [SimpleNamespace(name="/nonexistent/x.safetensors")], ("t.json",)])
def test_upload_run_with_garbage_arguments(ex, files_arg):
    kind, (dd, msg) = call(ex.upload_run, files_arg)
    assert kind == "ok" and skipped(dd) and msg.startswith("**Upload rejected:**")
