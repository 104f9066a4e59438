"""Security of the app (README "Running it for a class"), mostly against a launched app on 127.0.0.1.

* files: Gradio serves only the run folders, the work dir and its own upload/cache folders; traversal,
  encoded traversal, absolute paths, the repo's sources and symlinks out of the work dir are refused,
  a file the app wrote (an export) is downloadable;
* runs: only the startup runs and uploads under the work dir open (symlinks, ``..`` and crafted keys
  are refused), also through raw requests to the page's own endpoints; uploaded runs cannot point the
  server at its own folders or make it download data sets;
* ``--auth``: nothing but the login page without credentials; ``--host``: 127.0.0.1 by default, a warning
  for anything else;
* no pickle is ever read (source scan), uploads are size-limited by the running server.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import quote

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("VITSLIM_NO_PROGRESS", "1")

import pytest  # noqa: E402

gr = pytest.importorskip("gradio")
requests = pytest.importorskip("requests")
gradio_client = pytest.importorskip("gradio_client")

from app_harness import launch_for_tests, run_for_tests  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UPLOAD_LIMIT = 4096  # bytes: the launched test app's upload limit (the real one is app.ui.MAX_UPLOAD)
TIMEOUT = 20  # seconds for every HTTP request


def _launch(run: Path, workdir: Path, monkeypatch_limit: bool = True, **kw):
    import vitslim_app.ui as ui
    old = ui.MAX_UPLOAD
    if monkeypatch_limit:
        ui.MAX_UPLOAD = f"{UPLOAD_LIMIT}b"  # launch_app reads it at launch
    try:
        return launch_for_tests(run, workdir, **kw)
    finally:
        ui.MAX_UPLOAD = old


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("sec")
    run = run_for_tests(tmp_path_factory.getbasetemp())
    workdir = base / "workdir"
    (base / "secret.txt").write_text("top secret next to the work dir")
    demo, url = _launch(run, workdir)
    try:
        yield demo, url, base
    finally:
        demo.close()


def get(url: str, **kw) -> requests.Response:
    return requests.get(url, timeout=TIMEOUT, allow_redirects=False, **kw)


# ====================================================================== files
def _outside_files(base: Path, demo) -> list[str]:
    ex = demo.explorer
    return ["/etc/passwd", "/etc/hostname", str(base / "secret.txt"), str(ex.workdir / ".." / "secret.txt"),
            str(REPO / "app" / "explorer.py"), str(REPO / "vitslim_core" / "data.py"), str(REPO / "pyproject.toml"),
            str(Path(ex.registry.default_key()) / ".." / "demo.py"), "../../../../../../etc/passwd",
            "app/explorer.py", "~/.bashrc", "/proc/self/environ", "/proc/self/cmdline"]


def _file_urls(url: str, path: str) -> list[str]:
    """The ways a path can be asked for: plain, URL-encoded, double-encoded, with and without the API
    prefix, http-looking."""
    enc = quote(path, safe="")
    dotted = path.replace("../", "%2e%2e%2f").replace("/", "%2f") if ".." in path else enc
    return [f"{url}gradio_api/file={path}", f"{url}gradio_api/file={enc}", f"{url}gradio_api/file={dotted}",
            f"{url}gradio_api/file={quote(enc, safe='')}", f"{url}file={path}", f"{url}file={enc}",
            f"{url}gradio_api/file=file://{path}"]


def test_files_outside_the_runs_and_work_dir_are_refused(served):
    demo, url, base = served
    for path in _outside_files(base, demo):
        for u in _file_urls(url, path):
            r = get(u)
            assert r.status_code in (400, 403, 404, 405), (u, r.status_code)
            assert b"top secret" not in r.content and b"root:" not in r.content and b"def " not in r.content, u


def test_static_routes_do_not_traverse(served):
    demo, url, base = served
    for prefix in ("static", "assets", "gradio_api/static", "gradio_api/assets", "svelte", "custom_component"):
        for rel in ("../../../../etc/passwd", "..%2f..%2f..%2f..%2fetc%2fpasswd", "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                    "..%252f..%252f..%252fetc%252fpasswd"):
            r = get(f"{url}{prefix}/{rel}")
            assert b"root:" not in r.content, (prefix, rel, r.status_code)


def test_symlinks_in_the_work_dir_do_not_lead_out(served):
    demo, url, base = served
    ex = demo.explorer
    evil = ex.registry.uploads / "evil"
    evil.mkdir(parents=True, exist_ok=True)
    links = {"passwd.txt": Path("/etc/passwd"), "secret.txt": base / "secret.txt",
             "source.py": REPO / "app" / "explorer.py"}
    for name, target in links.items():
        (evil / name).unlink(missing_ok=True)
        (evil / name).symlink_to(target)
    (ex.workdir / "outdir").unlink(missing_ok=True)
    (ex.workdir / "outdir").symlink_to(base)
    for p in [*(evil / n for n in links), ex.workdir / "outdir" / "secret.txt"]:
        for u in _file_urls(url, str(p))[:3]:
            r = get(u)
            assert r.status_code in (403, 404), (u, r.status_code)
            assert b"top secret" not in r.content and b"root:" not in r.content


def test_a_file_the_app_wrote_is_downloadable(served):
    demo, url, _ = served
    ex = demo.explorer
    path, msg = ex.export_plan(ex.registry.default_key(), "flops", 0.5, 1, 1, 1)
    assert path and Path(path).resolve().is_relative_to(ex.workdir.resolve())
    r = get(f"{url}gradio_api/file={path}")
    assert r.status_code == 200 and r.content == Path(path).read_bytes()
    # and a file of a run the app was started with
    scores = Path(ex.registry.default_key()) / "scores.safetensors"
    assert get(f"{url}gradio_api/file={scores}").status_code == 200


# ====================================================================== runs
@pytest.mark.filterwarnings("ignore::UserWarning")  # the gr.Warning toasts of the refusals
def test_run_keys_outside_the_allowed_runs_are_refused(served, tmp_path):
    from vitslim_core import ScoreFileError
    demo, url, base = served
    ex = demo.explorer
    reg = ex.registry
    run = Path(reg.default_key())
    elsewhere = tmp_path / "copy-of-a-run"  # a real run folder the app was not started with
    elsewhere.mkdir()
    shutil.copyfile(run / "scores.safetensors", elsewhere / "scores.safetensors")
    link = reg.uploads / "linked-run"
    reg.uploads.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(elsewhere, target_is_directory=True)
    keys = [str(elsewhere), str(link), str(reg.uploads), str(reg.uploads / ".." / ".." / elsewhere.name),
            str(run / ".."), str(run) + "/../" + run.name + "/..", "/", "/etc", str(REPO), str(ex.workdir),
            str(reg.uploads / "0123456789abcdef"), "~", "\x00", str(run) + "\x00", 17, ["a"]]
    for k in keys:
        assert not reg.allowed(k), k
        with pytest.raises(ScoreFileError):
            reg.get(k)
        assert "vs-error" in ex.budget_views(k, "flops", 0.5, 1, 1, 1, 0, False, None)[0]
        path, msg = ex.export_plan(k, "flops", 0.5, 1, 1, 1)
        assert path is None
    assert reg.allowed(str(run)) and reg.allowed(str(run) + "/")


def _endpoint_index(demo, fn) -> int:
    for i, d in demo.fns.items():
        if getattr(d, "fn", None) == fn:
            return i
    raise LookupError(fn)


def _raw_call(url: str, fn_index: int, data: list) -> list[dict]:
    """Call one of the page's own (private) endpoints with crafted data, like a hand-made request."""
    session = uuid.uuid4().hex[:10]
    r = requests.post(f"{url}gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                           "event_data": None, "trigger_id": None}, timeout=TIMEOUT)
    if r.status_code != 200:
        return [{"msg": "refused", "status": r.status_code, "text": r.text[:300]}]
    msgs = []
    with requests.get(f"{url}gradio_api/queue/data", params={"session_hash": session}, stream=True,
                      timeout=TIMEOUT) as s:
        for line in s.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                m = json.loads(line[5:])
                msgs.append(m)
                if m.get("msg") in ("process_completed", "close_stream", "unexpected_error") or len(msgs) > 50:
                    break
    return msgs


def test_crafted_requests_cannot_open_other_runs(served):
    demo, url, _ = served
    ex = demo.explorer
    i = _endpoint_index(demo, ex.export_plan)
    for key in ("/etc", "../..", "/etc/passwd", str(REPO)):
        msgs = _raw_call(url, i, [key, "flops", 0.5, 1, 1, 1])
        text = json.dumps(msgs)
        done = [m for m in msgs if m.get("msg") in ("process_completed", "refused")]
        assert done, text[:500]
        assert "plan.json" not in text and "Traceback" not in text, text[:500]
    # the page's own request with the real run works
    ok = _raw_call(url, i, [ex.registry.default_key(), "flops", 0.5, 1, 1, 1])
    assert any(m.get("msg") == "process_completed" and m.get("success") for m in ok), json.dumps(ok)[:500]


def test_the_public_api_takes_no_run_or_path_of_the_server(served):
    demo, url, _ = served
    client = gradio_client.Client(url, verbose=False)
    info = client.view_api(print_info=False, return_format="dict")
    assert set(info["named_endpoints"]) == {"/set_budget", "/set_ratios", "/token_overlay", "/evaluate"}
    assert not info["unnamed_endpoints"]
    for ep in info["named_endpoints"].values():
        for p in ep["parameters"]:
            assert "run" not in p["parameter_name"].lower()
    # a server path given as the overlay image is refused (only uploaded files are read)
    for path in ("/etc/passwd", str(REPO / "README.md"), str(Path(demo.explorer.registry.default_key()) / "x.png")):
        with pytest.raises(Exception) as err:
            client.predict(gradio_client.handle_file(path), 0, 0.5, api_name="/token_overlay")
        assert "root:" not in str(err.value)


def test_uploaded_runs_cannot_use_server_datasets(served, tmp_path):
    """An uploaded score file names its dataset; a crafted one must not make the server read its own
    folders (imagefolder:/...), download into any path (cifar10:/...) or build a huge synthetic set."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    demo, url, _ = served
    ex = demo.explorer
    run = Path(ex.registry.default_key())
    with safe_open(str(run / "scores.safetensors"), framework="pt") as sf:
        md = dict(sf.metadata())
        tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    for i, name in enumerate(("imagefolder:/etc", f"cifar10:{tmp_path / 'dl'}", "synthetic:100000000")):
        meta = json.loads(md["vitslim"])
        meta["data"]["name"] = name
        d = tmp_path / f"up{i}"
        d.mkdir()
        save_file(tensors, str(d / "scores.safetensors"), metadata={**md, "vitslim": json.dumps(meta)})
        shutil.copyfile(run / "model.safetensors", d / "model.safetensors")
        dd, msg = ex.upload_run([str(d / "scores.safetensors"), str(d / "model.safetensors")])
        assert msg.startswith("Opened"), msg
        k = dd["value"]
        with pytest.warns(UserWarning):
            md_eval, _, evals = ex.evaluate_budget(k, "flops", 0.5, 1, 1, 1, [])
        assert "built-in datasets" in md_eval and evals == []
        with pytest.warns(UserWarning):
            status = list(ex.start_retrain(k, "flops", 0.5, 1, 1, 1, 1, 1e-4, False, 1))
        assert "built-in datasets" in status[-1][0]
        with pytest.warns(UserWarning):
            assert "built-in datasets" in ex.compute_sweep(k, "flops", 0.5, 1, 1, 1, [])[0]
        assert not (tmp_path / "dl").exists()
    assert ex.job.status().state == "idle"


# ====================================================================== uploads
def test_upload_size_is_limited(served):
    import vitslim_app.ui as ui
    from gradio.utils import _parse_file_size
    demo, url, _ = served
    limit = _parse_file_size(ui.MAX_UPLOAD)
    assert limit and 1 << 20 <= limit <= 2 << 30  # the real limit: set, and no more than 2 GB
    assert demo.max_file_size == UPLOAD_LIMIT  # the test app's, passed to the server
    big = requests.post(f"{url}gradio_api/upload", files={"files": ("big.safetensors", b"\0" * (4 * UPLOAD_LIMIT))},
                        timeout=TIMEOUT)
    assert big.status_code == 413, (big.status_code, big.text[:200])
    small = requests.post(f"{url}gradio_api/upload", files={"files": ("small.json", b"{}")}, timeout=TIMEOUT)
    assert small.status_code == 200 and len(small.json()) == 1


# ====================================================================== --auth
def test_auth_refuses_anonymous_requests(tmp_path_factory):
    run = run_for_tests(tmp_path_factory.getbasetemp())
    demo, url = _launch(run, tmp_path_factory.mktemp("auth-workdir"), monkeypatch_limit=False, auth=("u", "p"))
    try:
        for path in ("config", "gradio_api/info", "gradio_api/file=" + str(Path(run) / "scores.safetensors")):
            r = get(url + path)
            assert r.status_code in (401, 403), (path, r.status_code)
        r = requests.post(f"{url}gradio_api/call/set_budget", json={"data": [0.5]}, timeout=TIMEOUT)
        assert r.status_code in (401, 403)
        assert b"ViT-Slim" not in get(url).content  # the page is the login form
        with pytest.raises(Exception):
            gradio_client.Client(url, verbose=False)
        with pytest.raises(Exception):
            gradio_client.Client(url, auth=("u", "wrong"), verbose=False)
        client = gradio_client.Client(url, auth=("u", "p"), verbose=False)
        s = client.predict(0.5, api_name="/set_budget")
        assert abs(s["flops_ratio"] - 0.5) < 0.01
    finally:
        demo.close()


# ====================================================================== --host
@pytest.fixture
def fake_launch(monkeypatch):
    """serve() without a server: records what it would launch."""
    import vitslim_app.ui as ui
    seen: dict = {}

    class FakeDemo:
        explorer = type("E", (), {"workdir": Path("/tmp/fake-workdir")})()

    def build_app(runs=None, workdir=None):
        seen["runs"] = runs
        return FakeDemo()

    def launch_app(demo, host="127.0.0.1", port=7860, auth=None, open_browser=False, **kw):
        seen.update(host=host, port=port, auth=auth, open_browser=open_browser)
    monkeypatch.setattr(ui, "build_app", build_app)
    monkeypatch.setattr(ui, "launch_app", launch_app)
    return seen


def test_default_host_is_localhost_without_warning(fake_launch, capsys):
    from vitslim_app.main import main
    assert main(["--no-browser"]) == 0
    assert fake_launch["host"] == "127.0.0.1" and fake_launch["auth"] is None
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10"])
def test_other_hosts_warn(fake_launch, capsys, host):
    from vitslim_app.main import main
    assert main(["--host", host, "--no-browser"]) == 0
    err = capsys.readouterr().err
    assert fake_launch["host"] == host
    assert f"warning: listening on {host}" in err and "no --auth" in err
    assert main(["--host", host, "--auth", "teacher:secret", "--no-browser"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "no --auth" not in err and fake_launch["auth"] == ("teacher", "secret")


def test_python_m_app_help_names_the_safe_defaults():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "app", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert r.returncode == 0 and "127.0.0.1" in r.stdout and "--auth" in r.stdout


# ====================================================================== no pickle
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def pickle_uses(source: str, filename: str = "<src>") -> list[str]:
    """Lines that could unpickle: unpickling modules, torch.load without weights_only=True, np.load with
    allow_pickle=True, pandas.read_pickle."""
    bad = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            bad += [f"{filename}:{node.lineno} import {a.name}" for a in node.names
                    if a.name.split(".")[0] in UNPICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLING_MODULES:
            bad.append(f"{filename}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name == "torch.load" or name.endswith(".torch.load"):
                if not _kw_true(node, "weights_only"):
                    bad.append(f"{filename}:{node.lineno} {name} without weights_only=True")
            elif last == "load" and name.split(".")[0] in ("np", "numpy") and any(
                    k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                    for k in node.keywords):
                bad.append(f"{filename}:{node.lineno} {name} with allow_pickle")
            elif last in ("read_pickle", "Unpickler") or (last in ("load", "loads") and name.split(".")[0]
                                                           in UNPICKLING_MODULES):
                bad.append(f"{filename}:{node.lineno} {name}")
    return bad


def test_the_scanner_finds_unpickling():
    src = ("import pickle\nimport torch, numpy as np\nfrom joblib import load\npickle.loads(b'')\n"
           "torch.load('x')\ntorch.load('x', weights_only=False)\ntorch.load('x', weights_only=True)\n"
           "np.load('x', allow_pickle=True)\nnp.load('x')\nimport pandas as pd\npd.read_pickle('x')\n")
    found = pickle_uses(src)
    lines = sorted({int(f.split(":")[1].split()[0]) for f in found})
    assert lines == [1, 3, 4, 5, 6, 8, 11], found


def test_no_pickle_is_read_anywhere_in_the_engine_or_app():
    found = []
    for folder in ("vitslim_core", "app"):
        for f in sorted((REPO / folder).rglob("*.py")):
            found += pickle_uses(f.read_text(), str(f.relative_to(REPO)))
    assert not found, "\n".join(found)


# ====================================================================== images are checked before they are decoded
def _huge_png(path: Path, w: int = 12000, h: int = 12000) -> Path:
    """A valid 8-bit grayscale PNG of w x h black pixels (144 M pixels, ~140 kB), written without ever
    holding the pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    comp = zlib.compressobj(9)
    row = b"\0" * (w + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


class PeakRSS:
    """Growth of this process's peak RSS (MB) over a block: the kernel's high-water mark, reset at the
    start (/proc/self/clear_refs), or where that is not allowed the largest RSS a sampling thread saw."""

    def __enter__(self) -> "PeakRSS":
        import threading
        psutil = pytest.importorskip("psutil")
        self.proc = psutil.Process()
        self.start = self.proc.memory_info().rss
        self.hwm = self._reset_hwm()
        self.peak, self.done = self.start, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(5)
        peak = self.peak
        if self.hwm:
            with open("/proc/self/status") as f:
                line = next(l for l in f if l.startswith("VmHWM:"))
            peak = max(peak, int(line.split()[1]) * 1024)
        self.growth_mb = (peak - self.start) / 2**20


def _api_error(url: str, api_name: str, data: list) -> str:
    """The error message of a named endpoint called with raw ``data`` (what no client library sends)."""
    r = requests.post(f"{url}gradio_api/call/{api_name}", json={"data": data}, timeout=TIMEOUT)
    r.raise_for_status()
    with requests.get(f"{url}gradio_api/call/{api_name}/{r.json()['event_id']}", stream=True,
                      timeout=TIMEOUT) as s:
        lines = [line for line in s.iter_lines(decode_unicode=True) if line]
    assert "event: error" in lines, lines[:4]
    return json.loads(lines[lines.index("event: error") + 1][len("data:"):])["error"]


RSS_BOUND_MB = 200  # the 12000 x 12000 PNG decoded (as the old gr.Image input did): +1.5 GB


@pytest.fixture(scope="module")
def overlay_app(tmp_path_factory):
    """An app with the real upload limit (the huge PNG is 140 kB)."""
    run = run_for_tests(tmp_path_factory.getbasetemp())
    demo, url = _launch(run, tmp_path_factory.mktemp("overlay-workdir"), monkeypatch_limit=False)
    try:
        yield demo, url
    finally:
        demo.close()


def test_token_overlay_refuses_huge_and_inline_images_before_decoding_them(overlay_app, tmp_path):
    """/token_overlay takes the image as a file: whatever arrives is checked by load_image (format,
    pixel count from the header) before anything decodes it; data: URLs and web URLs are refused
    before Gradio would decode or download them. Each refusal is one line; memory stays flat."""
    import base64
    import gc
    demo, url = overlay_app
    client = gradio_client.Client(url, verbose=False)
    png = _huge_png(tmp_path / "huge.png")
    data_url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    meta = {"_type": "gradio.FileData"}
    cases = {"huge PNG": gradio_client.handle_file(str(png)),
             "data: URL": {"path": None, "url": data_url, "meta": meta},
             "data: URL as the path": {"path": data_url, "meta": meta},  # gradio_client will not send it
             "data: URL as plain text": data_url,
             "web URL": {"path": "http://127.0.0.1:9/huge.png", "meta": meta}}
    for name, arg in cases.items():
        gc.collect()
        with PeakRSS() as rss:
            if name == "data: URL as the path":
                msg = _api_error(url, "token_overlay", [arg, 0, 0.5])
            else:
                with pytest.raises(Exception) as err:
                    client.predict(arg, 0, 0.5, api_name="/token_overlay")
                msg = str(err.value)
        assert len(msg.splitlines()) == 1 and len(msg) < 300, (name, msg[:300])
        assert "iVBOR" not in msg and "/tmp/" not in msg and "Traceback" not in msg, (name, msg[:300])
        assert rss.growth_mb < RSS_BOUND_MB, (name, rss.growth_mb)
        if name == "huge PNG":
            assert "12000x12000" in msg, msg
        else:
            assert "uploaded" in msg, msg
    # and an ordinary image still gets its overlay
    from PIL import Image
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(small)
    out = client.predict(gradio_client.handle_file(str(small)), 1, 0.5, api_name="/token_overlay")
    assert Image.open(out).size[0] >= 16


# ====================================================================== URLs
def _raw_get(url: str, target: str) -> tuple[int | None, bytes]:
    """GET ``target`` with a hand-written request (HTTP clients refuse URLs over 64 kB); (status or None
    when the server closed the connection without an answer, body)."""
    import socket
    from urllib.parse import urlparse
    u = urlparse(url)
    data = b""
    with socket.create_connection((u.hostname, u.port), timeout=TIMEOUT) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\n\r\n".encode())
        try:
            while chunk := s.recv(1 << 16):
                data += chunk
        except ConnectionResetError:
            pass
    if not data.startswith(b"HTTP/1.1 "):
        return None, data
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_long_urls_get_a_clean_answer(served):
    demo, url, _ = served
    for target in ("/?flops=" + "9" * 70_000, "/?view=tokens&" + "x=1&" * 20_000,
                   "/gradio_api/file=" + "a" * 70_000, "/config?" + "b" * 20_000):
        status, body = _raw_get(url, target)
        assert status == 414 and body.strip() == b"URL too long (more than 16384 bytes)", (target[:40], status)
    status, body = _raw_get(url, "/?flops=" + "9" * 1_000_000)  # beyond the HTTP server's own limit
    assert status in (None, 400, 414), status
    # the app is fine, and a URL of ordinary length with absurd values opens the page
    for target in ("/?flops=0.4", "/?flops=" + "9" * 5_000 + "&layer=-1e400&view=" + "v" * 3000):
        status, body = _raw_get(url, target)
        assert status == 200 and b"ViT-Slim" in body, (target[:40], status)
