"""Property-based fuzzing of the vitslim command (issue 6): damaged files and nonsense numbers.

``main`` runs in-process. Whatever the input, the command either succeeds (exit 0) or prints exactly
one line ``vitslim[ <cmd>]: error: ...`` and exits 2: never an "internal error" (exit 1), never a
traceback. One subprocess call checks the same at the real terminal boundary.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitslim_core.cli import main
from vitslim_core.demo import DEMO_DIR

ROOT = Path(__file__).resolve().parents[1]
ERROR_LINE = re.compile(r"^vitslim( [a-z]+)?: error: \S")

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def fuzz(n: int) -> settings:
    return settings(FUZZ, max_examples=n)


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code in (0, 2), f"exit {code}: {err.strip()}"
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and ERROR_LINE.match(lines[0]), err
    else:
        assert "error" not in err.lower(), err
    return code, out, err


def _tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="vitslim-cli-fuzz-"))


@st.composite
def damaged(draw, data: bytes):
    kind = draw(st.sampled_from(["truncate", "flip", "random"]))
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "random":
        return draw(st.binary(max_size=200))
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, min(len(b) - 1, 800)))  # mostly the header
        b[i] ^= draw(st.integers(1, 255))
    return bytes(b)


def _run_folder(scores: bytes) -> Path:
    d = _tmpdir() / "run"
    d.mkdir()
    (d / "scores.safetensors").write_bytes(scores)
    shutil.copy(DEMO_DIR / "model.safetensors", d / "model.safetensors")
    return d


SCORES = (DEMO_DIR / "scores.safetensors").read_bytes()


# ----------------------------------------------------------------------------- numbers
NUMBER_TEXT = st.one_of(
    st.sampled_from(["0", "2", "-1", "1", "0.5", "nan", "NaN", "inf", "-inf", "1e-300", "1e308", "abc", "", " ",
                     "0x10", "1_0", "--", "0.6,0.7", "99999999999999999999999", "-0", "1e3"]),
    st.floats().map(repr), st.integers(-(2 ** 70), 2 ** 70).map(str), st.text(max_size=6),
)


@fuzz(60)
@given(flag=st.sampled_from(["--flops", "--attn", "--mlp", "--token", "--mix", "--multiple"]), value=NUMBER_TEXT)
def test_plan_numeric_arguments(capsys, flag, value):
    extra = ["--flops", "0.6"] if flag in ("--mix", "--multiple") else []
    code, out, _ = run(capsys, "plan", DEMO_DIR, *extra, f"{flag}={value}")  # "=": values may start with "-"
    if code == 0:
        assert "total:" in out


@fuzz(20)
@given(flag=st.sampled_from(["--img-size", "--threads", "--warmup", "--multiple", "--flops", "--batch", "--device"]),
       value=st.sampled_from(["-1", "0", "nan", "abc", "99999999999999999999", "bogus", "cuda:x", "-5"]))
def test_bench_numeric_arguments(capsys, flag, value):
    args = {"--flops": "0.5", "--runs": "1", "--rounds": "1", "--batch": "1", "--warmup": "0"}
    args[flag] = value
    code, _, _ = run(capsys, "bench", "digits-vit", *[f"{k}={v}" for k, v in args.items()])
    assert code == 2  # every drawn value is out of range or not a number/device


@pytest.mark.parametrize("cmd", ["search", "retrain"])
@pytest.mark.parametrize("args", [["--epochs", "0"], ["--lr", "nan"], ["--lr", "-1"], ["--workers", "-2"],
                                  ["--max-steps", "-1"], ["--device", "gpu9"], ["--grad-clip", "inf"],
                                  ["--seed", "1e3"], ["--batch-size", "99999999999999999999"]])
def test_training_numeric_arguments(capsys, tmp_path, cmd, args):
    target = [] if cmd == "search" else [DEMO_DIR, "--flops", "0.5"]
    code, _, _ = run(capsys, cmd, *target, "--out", tmp_path / "out", "=".join(args))
    assert code == 2
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- damaged files
@fuzz(40)
@given(data=damaged(SCORES), cmd=st.sampled_from(["plan", "plan-json", "bench", "slim", "eval"]))
def test_commands_on_damaged_score_files(capsys, data, cmd):
    run_dir = _run_folder(data)
    out = run_dir.parent / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cmd == "plan":
            run(capsys, "plan", run_dir / "scores.safetensors", "--flops", "0.5")
        elif cmd == "plan-json":
            run(capsys, "plan", run_dir, "--attn", "0.5", "--json", "--save", out / "p.json")
        elif cmd == "bench":
            run(capsys, "bench", run_dir, "--flops", "0.5", "--runs", "1", "--rounds", "1", "--batch", "1",
                "--warmup", "0")
        elif cmd == "slim":
            run(capsys, "slim", run_dir, "--flops", "0.5", "--out", out)
        else:
            run(capsys, "eval", run_dir, "--flops", "0.5", "--data", "synthetic:8", "--batch-size", "8")


def test_retrain_and_sweep_on_damaged_runs(capsys):
    """Commands that would train or sweep are only fed runs that cannot load (they must stop at once)."""
    for data in (b"", SCORES[:100], b"\x00" * 64, SCORES[:8] + b"[" + SCORES[9:]):
        run_dir = _run_folder(data)
        code, _, _ = run(capsys, "retrain", run_dir, "--flops", "0.5", "--out", run_dir.parent / "out",
                         "--max-steps", "1")
        assert code == 2
        code, _, _ = run(capsys, "sweep", run_dir, "--budgets", "0.5", "--out", run_dir.parent / "sw")
        assert code == 2
        assert not (run_dir.parent / "out").exists()


@pytest.fixture(scope="module")
def demo_plan_text(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["plan", str(DEMO_DIR), "--flops", "0.5", "--save", str(path)]) == 0
    return path.read_text()


@st.composite
def json_edit(draw, text: str):
    """The plan with one value somewhere replaced by nonsense (or the text damaged)."""
    if draw(st.booleans()):
        return draw(damaged(text.encode()))
    doc = json.loads(text)
    node, key = doc, None
    for _ in range(draw(st.integers(1, 4))):
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        if not isinstance(node[key], (dict, list)) or draw(st.booleans()):
            break
        node = node[key]
    if key is not None:
        node[key] = draw(st.one_of(st.none(), st.integers(-5, 10 ** 12), st.floats(), st.text(max_size=5),
                                   st.lists(st.integers(-2, 70), max_size=5), st.just({})))
    return json.dumps(doc).encode()


@fuzz(30)
@given(data=st.data())
def test_slim_with_damaged_plan_files(capsys, demo_plan_text, data):
    plan = _tmpdir() / "plan.json"
    plan.write_bytes(data.draw(json_edit(demo_plan_text)))
    code, _, _ = run(capsys, "slim", DEMO_DIR, "--plan", plan, "--out", plan.parent / "slim")
    assert (code == 0) == (plan.parent / "slim" / "slim.json").is_file()


@pytest.fixture(scope="module")
def slim_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slim") / "slim"
    assert main(["slim", str(DEMO_DIR), "--flops", "0.5", "--out", str(out)]) == 0
    return out


@fuzz(20)
@given(data=st.data(), part=st.sampled_from(["slim.json", "model.safetensors"]))
def test_eval_on_damaged_slim_folders(capsys, slim_dir, data, part):
    d = _tmpdir() / "slim"
    shutil.copytree(slim_dir, d)
    raw = (d / part).read_bytes()
    (d / part).write_bytes(data.draw(json_edit(raw.decode()) if part == "slim.json" else damaged(raw)))
    run(capsys, "eval", d, "--data", "synthetic:8", "--batch-size", "8")


def test_no_traceback_reaches_the_terminal(tmp_path):
    bad = tmp_path / "scores.safetensors"
    bad.write_bytes(SCORES[: len(SCORES) // 3])
    proc = subprocess.run([sys.executable, "-m", "vitslim_core", "plan", str(bad), "--flops", "0.5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]), proc.stderr
