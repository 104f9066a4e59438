"""Property-based fuzzing of the engine's file loaders and image readers (issue 6, reliability).

Every loader gets truncated, corrupted, random and foreign input and must either load something sane
or raise its documented error (a VitSlimError subclass, one line), never another exception, a hang or
a Pillow warning. Decisions these tests pin down:

* NaN or infinite scores are REJECTED when a score file is loaded (ScoreFileError), never sanitised:
  a plan made from NaN scores would silently rank units at random.
* A file that still loads after a mutation must be usable: plans, summaries and the data config it
  carries work (no error surfaces later from a value the loader let through).
"""
from __future__ import annotations

import io
import json
import struct
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vitslim_core import MaskScores, SlimPlan, VitSlimError
from vitslim_core.data import DataError, image_to_tensor, load_image
from vitslim_core.demo import DEMO_DIR
from vitslim_core.plan import BudgetWarning, plan_for_flops
from vitslim_core.slim import load_slim

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def fuzz(n: int) -> settings:
    """Bounded, deterministic runs (CI time and reproducibility); ``n`` examples."""
    return settings(FUZZ, max_examples=n)

DEMO_SCORES = (DEMO_DIR / "scores.safetensors").read_bytes()
RGB_CFG = {"input_size": (3, 24, 24), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
           "interpolation": "bicubic", "crop_pct": 0.9}
DIGITS_CFG = {"input_size": (1, 16, 16), "mean": (0.3054,), "std": (0.319,), "interpolation": "bilinear",
              "crop_pct": 1.0}


def _one_line(err: BaseException) -> None:
    msg = str(err)
    assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)


def _tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="vitslim-fuzz-"))


# ============================================================================ JSON strategies
LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(), st.text(max_size=12),
    st.sampled_from([0, -1, 1, 2, 10 ** 400, -(10 ** 400), 2 ** 63, 2 ** 64 + 1, 1e308, -0.0, "", "0", "head",
                     "vitslim-plan", "vitslim-slim", "vitslim-scores", "digits-vit"]),
)
JSON = st.recursive(LEAF, lambda c: st.one_of(st.lists(c, max_size=4),
                                              st.dictionaries(st.text(max_size=8), c, max_size=4)),
                    max_leaves=20)
DEEP = "__vitslim_deep__"


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def mutated_json_text(draw, base):
    """JSON text of ``base`` with 1-3 random edits (replace, delete, duplicate, nudge, deep nesting)."""
    doc = json.loads(json.dumps(base))
    deep = None
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = paths[draw(st.integers(0, len(paths) - 1))]
        op = draw(st.sampled_from(["replace", "delete", "duplicate", "nudge", "deep"]))
        if not path:
            if op == "replace":
                doc = draw(JSON)
            continue
        parent, key = _get(doc, path[:-1]), path[-1]
        old = parent[key]
        if op == "replace":
            parent[key] = draw(JSON)
        elif op == "delete":
            del parent[key]
        elif op == "duplicate" and isinstance(parent, list):
            parent.insert(key, old)
        elif op == "nudge" and isinstance(old, (int, float)) and not isinstance(old, bool):
            parent[key] = old + draw(st.sampled_from([-1, 1, -old - 1 if isinstance(old, int) else 0.5, 10 ** 9]))
        elif op == "deep":
            parent[key] = DEEP
            deep = draw(st.sampled_from([50, 900, 5000, 200_000]))
    text = json.dumps(doc)
    if deep is not None:
        text = text.replace(json.dumps(DEEP), "[" * deep + "]" * deep, 1)
    return text


@st.composite
def byte_damage(draw, data: bytes):
    """``data`` truncated anywhere, with random bytes flipped, or with a random slice overwritten."""
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "append"]))
    b = bytearray(data)
    if kind == "truncate":
        return bytes(b[:draw(st.integers(0, len(b) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            # the first bytes hold the header: aim there half of the time
            hi = min(len(b) - 1, 600) if draw(st.booleans()) else len(b) - 1
            i = draw(st.integers(0, hi))
            b[i] ^= draw(st.integers(1, 255))
        return bytes(b)
    if kind == "overwrite":
        i = draw(st.integers(0, len(b) - 1))
        junk = draw(st.binary(min_size=1, max_size=32))
        b[i:i + len(junk)] = junk
        return bytes(b)
    return bytes(b) + draw(st.binary(min_size=1, max_size=64))


# ============================================================================ score files
def _check_usable_scores(sc: MaskScores) -> None:
    """Whatever loads must work downstream (plans, summaries, the data config it carries)."""
    for kind in (sc.attn, sc.mlp, sc.token):
        for t in kind:
            assert t.is_floating_point() and torch.isfinite(t).all()
    sc.summary()
    assert isinstance(sc.class_names, list)
    assert set(sc.searched()) == {"attn", "mlp", "token"}
    json.dumps(sc.header(), allow_nan=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetWarning)
        try:
            plan = plan_for_flops(sc, 0.6)
        except VitSlimError as e:  # e.g. nothing searched and 0.6 unreachable
            _one_line(e)
        else:
            plan.summary()
    data = sc.meta.get("data")
    if isinstance(data, dict) and "input_size" in data:
        try:
            x = image_to_tensor(Image.new("L", (9, 7), 128), data)
        except DataError as e:
            _one_line(e)
        else:
            assert torch.isfinite(x).all()


def _load_score_bytes(data: bytes) -> MaskScores | None:
    d = _tmpdir()
    p = d / "scores.safetensors"
    p.write_bytes(data)
    try:
        sc = MaskScores.load(p)
    except VitSlimError as e:
        _one_line(e)
        return None
    _check_usable_scores(sc)
    return sc


def test_the_demo_score_file_loads():
    assert _load_score_bytes(DEMO_SCORES) is not None


@fuzz(150)
@given(data=byte_damage(DEMO_SCORES))
def test_damaged_score_files(data):
    _load_score_bytes(data)


@fuzz(40)
@given(data=st.one_of(
    st.binary(max_size=300),
    # a plausible safetensors length prefix followed by random JSON or bytes
    st.tuples(st.integers(0, 2 ** 64 - 1), st.binary(max_size=200)).map(lambda t: struct.pack("<Q", t[0]) + t[1]),
    JSON.map(lambda j: (lambda h: struct.pack("<Q", len(h)) + h)(json.dumps(j).encode())),
))
def test_random_bytes_as_score_files(data):
    assert _load_score_bytes(data) is None


def _demo_parts():
    from safetensors import safe_open
    with safe_open(str(DEMO_DIR / "scores.safetensors"), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


DEMO_MD, DEMO_TENSORS = _demo_parts()
DEMO_HEADER = json.loads(DEMO_MD["vitslim"])
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.int8]
ODD_VALUES = [float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e38, 65504.0]


@st.composite
def foreign_tensors(draw):
    """The demo's tensors with some replaced, removed, added, retyped, reshaped or poisoned."""
    tensors = {k: v.clone() for k, v in DEMO_TENSORS.items()}
    names = sorted(tensors)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["dtype", "shape", "poison", "drop", "extra", "empty"]))
        k = draw(st.sampled_from(names))
        if k not in tensors:
            continue
        if op == "dtype":
            tensors[k] = tensors[k].to(draw(st.sampled_from(DTYPES)))
        elif op == "shape":
            shape = draw(st.lists(st.integers(0, 5), max_size=3))
            tensors[k] = torch.ones(shape, dtype=draw(st.sampled_from(DTYPES)))
        elif op == "poison":
            t = tensors[k].reshape(-1)
            t[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(ODD_VALUES))
        elif op == "drop":
            del tensors[k]
        elif op == "extra":
            tensors[draw(st.sampled_from(["attn.6", "mlp.-1", "token.99", "weight", "attn.0.x", ""]))] = torch.zeros(3)
        else:
            tensors[k] = torch.zeros(0)
    return tensors


def _safetensors_bytes(tensors, md) -> bytes:
    from safetensors.torch import save
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=md)


@fuzz(60)
@given(tensors=foreign_tensors())
def test_foreign_tensors_in_score_files(tensors):
    sc = _load_score_bytes(_safetensors_bytes(tensors, DEMO_MD))
    if sc is not None:  # only harmless edits can load: every tensor float, finite and of the right shape
        for k in ("attn", "mlp", "token"):
            for l, t in enumerate(getattr(sc, k)):
                assert t.shape == DEMO_TENSORS[f"{k}.{l}"].shape


def test_nan_scores_are_rejected_not_sanitised():
    tensors = {k: v.clone() for k, v in DEMO_TENSORS.items()}
    tensors["attn.2"][0, 0] = float("nan")
    with pytest.raises(VitSlimError, match="NaN"):
        MaskScores.load(_write(_safetensors_bytes(tensors, DEMO_MD)))


def _write(data: bytes, name: str = "scores.safetensors") -> Path:
    p = _tmpdir() / name
    p.write_bytes(data)
    return p


@fuzz(120)
@given(header=mutated_json_text(DEMO_HEADER),
       outer=st.sampled_from(["keep", "keep", "keep", "no_version", "int_version", "bad_format"]))
def test_hostile_header_json_in_score_files(header, outer):
    md = dict(DEMO_MD, vitslim=header)
    if outer == "no_version":
        md.pop("format_version")
    elif outer == "int_version":
        md["format_version"] = "01"
    elif outer == "bad_format":
        md["format"] = "vitslim-scores "
    _load_score_bytes(_safetensors_bytes(DEMO_TENSORS, md))


# ============================================================================ plan files
def _demo_scores() -> MaskScores:
    return MaskScores.load(DEMO_DIR)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", BudgetWarning)
    DEMO_PLAN = plan_for_flops(_demo_scores(), 0.5).to_dict()


def _load_plan_text(text: str | bytes) -> SlimPlan | None:
    p = _write(text.encode() if isinstance(text, str) else text, "plan.json")
    try:
        plan = SlimPlan.load(p)
    except VitSlimError as e:
        _one_line(e)
        return None
    # what loads is usable: a cost, a table, a JSON summary, masks of the spec's shape
    s = plan.spec
    assert plan.attn.shape == (s.depth, s.num_heads, s.head_dim) and plan.token.shape == (s.depth, s.num_patches)
    assert 0 < plan.macs <= plan.cost.dense_macs
    plan.table()
    json.dumps(plan.summary())
    json.dumps(plan.to_dict())
    return plan


def test_the_demo_plan_loads():
    assert _load_plan_text(json.dumps(DEMO_PLAN)) is not None


@fuzz(150)
@given(text=mutated_json_text(DEMO_PLAN))
def test_mutated_plans(text):
    _load_plan_text(text)


@fuzz(60)
@given(doc=st.one_of(JSON, st.fixed_dictionaries({"format": st.just("vitslim-plan"), "format_version": st.just(1)},
                                                 optional={"arch": JSON, "layers": JSON, "info": JSON,
                                                           "flops": JSON})))
def test_random_json_plans(doc):
    assert _load_plan_text(json.dumps(doc)) is None


@fuzz(60)
@given(data=byte_damage(json.dumps(DEMO_PLAN, indent=1).encode()))
def test_damaged_plan_bytes(data):
    _load_plan_text(data)


@fuzz(40)
@given(arch=st.dictionaries(
    st.sampled_from(["depth", "num_heads", "head_dim", "mlp_hidden", "embed_dim", "grid", "num_classes",
                     "dense_params", "num_prefix_tokens"]),
    st.one_of(st.integers(0, 2 ** 40), st.sampled_from([10 ** 30, 2 ** 62, 2 ** 31, 2 ** 24]),
              st.lists(st.sampled_from([1, 8, 2 ** 16, 2 ** 31]), min_size=2, max_size=2)),
    min_size=1, max_size=2))
def test_plans_for_huge_architectures_fail_fast(arch):
    """A plan header may declare any size: loading must not allocate or compute for it before refusing."""
    doc = json.loads(json.dumps(DEMO_PLAN))
    doc["arch"].update(arch)
    t = time.perf_counter()
    _load_plan_text(json.dumps(doc))
    assert time.perf_counter() - t < 5


# ============================================================================ slim folders
@pytest.fixture(scope="module")
def slim_folder(tmp_path_factory):
    from vitslim_core.run_folder import load_run
    from vitslim_core.slim import save_slim, slim_model
    scores, model = load_run(DEMO_DIR)
    plan = SlimPlan.from_dict(DEMO_PLAN)
    slim = slim_model(model, plan)
    slim.slim_data = scores.meta["data"]
    return save_slim(slim, tmp_path_factory.mktemp("slim") / "slim")


def _load_slim_files(meta_text: str | bytes, weights: bytes) -> torch.nn.Module | None:
    d = _tmpdir()
    (d / "slim.json").write_bytes(meta_text.encode() if isinstance(meta_text, str) else meta_text)
    (d / "model.safetensors").write_bytes(weights)
    try:
        m = load_slim(d)
    except VitSlimError as e:
        _one_line(e)
        return None
    data = getattr(m, "slim_data", None)
    assert data is None or isinstance(data, dict)
    cfg = dict(data or {})
    C, H, W = m.slim_plan.spec.in_chans, *m.slim_plan.spec.img_size
    with torch.no_grad():
        y = m(torch.zeros(1, C, H, W))
    assert y.shape[0] == 1 and torch.isfinite(y).all()
    if "input_size" in cfg:
        try:
            image_to_tensor(Image.new("RGB", (5, 5)), cfg)
        except DataError as e:
            _one_line(e)
    return m


def test_the_slim_folder_loads(slim_folder):
    assert _load_slim_files((slim_folder / "slim.json").read_bytes(),
                            (slim_folder / "model.safetensors").read_bytes()) is not None


@fuzz(80)
@given(data=st.data())
def test_mutated_slim_json(slim_folder, data):
    meta = json.loads((slim_folder / "slim.json").read_text())
    # mutate mostly the small parts (model recipe, data, plan header), sometimes anywhere
    part = data.draw(st.sampled_from(["model", "data", "top", "plan_arch", "anywhere"]))
    if part == "anywhere":
        text = data.draw(mutated_json_text(meta))
    elif part == "top":
        text = data.draw(mutated_json_text({k: v for k, v in meta.items() if k != "plan"}))
        doc = json.loads(text) if text.count("[") < 1000 else None
        text = json.dumps({**doc, "plan": meta["plan"]}) if isinstance(doc, dict) else text
    else:
        key = {"model": ("model",), "data": ("data",), "plan_arch": ("plan", "arch")}[part]
        sub = data.draw(mutated_json_text(_get(meta, key)))
        try:
            sub_doc = json.loads(sub)
        except (ValueError, RecursionError):
            sub_doc = None
        _get(meta, key[:-1])[key[-1]] = sub_doc
        text = json.dumps(meta)
    _load_slim_files(text, (slim_folder / "model.safetensors").read_bytes())


@fuzz(40)
@given(data=st.data())
def test_damaged_slim_weights(slim_folder, data):
    from safetensors.torch import load_file
    raw = (slim_folder / "model.safetensors").read_bytes()
    if data.draw(st.booleans()):
        weights = data.draw(byte_damage(raw))
    else:
        tensors = load_file(str(slim_folder / "model.safetensors"))
        k = data.draw(st.sampled_from(sorted(tensors)))
        op = data.draw(st.sampled_from(["dtype", "poison", "drop", "shape"]))
        if op == "dtype":
            tensors[k] = tensors[k].to(data.draw(st.sampled_from(DTYPES)))
        elif op == "poison":
            tensors[k].reshape(-1)[0] = data.draw(st.sampled_from(ODD_VALUES))
        elif op == "drop":
            del tensors[k]
        else:
            tensors[k] = torch.zeros(data.draw(st.lists(st.integers(0, 4), max_size=3)))
        weights = _safetensors_bytes(tensors, {"format": "vitslim-slim"})
    _load_slim_files((slim_folder / "slim.json").read_bytes(), weights)


# ============================================================================ images
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I;16B", "I", "F", "LA", "PA", "YCbCr", "LAB", "HSV",
         "RGBX", "RGBa", "La"]
FORMATS = {"PNG": {"1", "L", "P", "RGB", "RGBA", "I;16", "I", "LA"}, "GIF": {"L", "P", "1"},
           "BMP": {"1", "L", "P", "RGB"}, "TIFF": {"1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LA",
                                                   "YCbCr", "LAB"},
           "JPEG": {"L", "RGB", "CMYK"}, "WEBP": {"RGB", "RGBA"}, "PPM": {"1", "L", "RGB", "I;16"},
           "ICO": {"RGBA", "RGB"}}


@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(MODES))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    if mode in ("F", "I"):
        arr = rng.normal(0, draw(st.sampled_from([1.0, 300.0, 1e30])), (h, w)).astype(np.float32)
        if mode == "F" and draw(st.booleans()):
            arr.reshape(-1)[rng.integers(0, arr.size, 3)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        img = Image.fromarray(arr, mode="F")
        return img if mode == "F" else img.convert("I")
    if mode in ("I;16", "I;16B"):
        return Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16)).convert(mode) \
            if mode == "I;16" else Image.frombytes(mode, (w, h), rng.integers(0, 256, 2 * w * h, dtype=np.uint8)
                                                   .tobytes())
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode in ("LAB", "HSV", "RGBX", "RGBa", "La", "PA"):
        bands = {"LAB": 3, "HSV": 3, "RGBX": 4, "RGBa": 4, "La": 2, "PA": 2}[mode]
        return Image.frombytes(mode, (w, h), rng.integers(0, 256, bands * w * h, dtype=np.uint8).tobytes())
    return rgb.convert(mode)


def _check_image(img: Image.Image, must_work: bool = False) -> None:
    for cfg, shape in ((RGB_CFG, (1, 3, 24, 24)), (DIGITS_CFG, (1, 1, 16, 16))):
        try:
            x = image_to_tensor(img, cfg)
        except DataError as e:
            _one_line(e)
            assert not must_work, f"a valid {img.mode} image was refused: {e}"
            continue
        assert x.shape == shape and x.dtype == torch.float32
        assert torch.isfinite(x).all()


def _check_bytes(data: bytes, must_work: bool = False) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning (DecompressionBombWarning...) may escape
        try:
            img = load_image(data)
        except DataError as e:
            _one_line(e)
            assert not must_work, f"a valid image file was refused: {e}"
            return
        assert isinstance(img, Image.Image) and img.width > 0 and img.height > 0
        _check_image(img, must_work)


@fuzz(60)
@given(img=pil_images())
def test_images_in_any_mode_become_finite_tensors(img):
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        _check_image(img, must_work=True)


def _encode(img: Image.Image, fmt: str) -> bytes | None:
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:  # "valid" means Pillow itself reads it back
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(buf.getvalue())).load()
    except Exception:  # noqa: BLE001
        return None
    return buf.getvalue()


@fuzz(80)
@given(img=pil_images(), fmt=st.sampled_from(sorted(FORMATS)), data=st.data())
def test_encoded_and_damaged_images(img, fmt, data):
    raw = _encode(img, fmt)
    if raw is None:  # Pillow cannot write this mode in this format
        return
    damaged = data.draw(st.booleans())
    if damaged:
        raw = data.draw(byte_damage(raw))
    _check_bytes(raw, must_work=not damaged)


@fuzz(20)
@given(n=st.integers(2, 4), seed=st.integers(0, 100), damage=st.booleans(), data=st.data())
def test_animated_gifs(n, seed, damage, data):
    rng = np.random.default_rng(seed)
    frames = [Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).convert("P") for _ in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    raw = buf.getvalue()
    if damage:
        raw = data.draw(byte_damage(raw))
    _check_bytes(raw, must_work=not damage)


@fuzz(40)
@given(data=st.binary(max_size=400), magic=st.sampled_from(
    [b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"RIFF", b"P6\n",
     b"%!PS-Adobe-3.0 EPSF-3.0\n", b"\x00\x00\x01\x00", b"8BPS", b"icns", b"<svg", b"{}"]))
def test_not_an_image(data, magic):
    _check_bytes(magic + data)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(w: int, h: int, color_type: int = 0, depth: int = 8) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def _gif(w: int, h: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\0" * 6 + b"," +
            struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00;")


def _bmp(w: int, h: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + info + b"\0" * 16


@fuzz(40)
@given(w=st.one_of(st.integers(0, 2 ** 31 - 1), st.sampled_from([0, 100_000, 65535])),
       h=st.one_of(st.integers(0, 2 ** 31 - 1), st.sampled_from([0, 100_000, 65535])),
       kind=st.sampled_from(["png", "png16", "gif", "bmp"]))
def test_huge_or_empty_declared_sizes_fail_fast(w, h, kind):
    """Decompression bombs are refused from the header (quickly), 0-size images too; no Pillow warning."""
    if kind == "gif":
        w, h = w % 65536, h % 65536
    raw = {"png": lambda: _png(w, h), "png16": lambda: _png(w, h, 2, 16), "gif": lambda: _gif(w, h),
           "bmp": lambda: _bmp(w, h)}[kind]()
    t = time.perf_counter()
    _check_bytes(raw)
    assert time.perf_counter() - t < 2.0
    if w * h > 50_000_000 or w == 0 or h == 0:
        with pytest.raises(DataError):
            load_image(raw)


def test_pillow_bomb_warning_range_is_our_data_error():
    """Between Pillow's warning and error limits Pillow only warns: our own limit must answer first."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="pixels"):
            load_image(_png(12_000, 10_000))  # 120 M pixels: Pillow warns (> 89 M), does not refuse
        with pytest.raises(DataError, match="pixels"):
            load_image(_png(20_000, 10_000), max_pixels=10 ** 9)  # over Pillow's hard limit: still a DataError


@fuzz(25)
@given(key=st.sampled_from(["depth", "embed_dim", "num_heads", "mlp_ratio", "img_size", "num_classes", "reg_tokens",
                            "patch_size", "in_chans"]),
       value=st.sampled_from([10 ** 6, 10 ** 9, 1e9, 4096, [100_000, 100_000], -1, 0, True, "big", None]))
def test_model_recipe_bombs_fail_fast(slim_folder, key, value):
    """slim.json names the base model's kwargs: a huge model must be refused before it is built."""
    meta = json.loads((slim_folder / "slim.json").read_text())
    meta["model"]["kwargs"][key] = value
    t = time.perf_counter()
    _load_slim_files(json.dumps(meta), (slim_folder / "model.safetensors").read_bytes())
    assert time.perf_counter() - t < 5
    # the same recipe in a score file header
    header = json.loads(DEMO_MD["vitslim"])
    header["model"]["kwargs"][key] = value
    t = time.perf_counter()
    _load_score_bytes(_safetensors_bytes(DEMO_TENSORS, dict(DEMO_MD, vitslim=json.dumps(header))))
    assert time.perf_counter() - t < 5
