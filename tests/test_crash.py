"""Crash safety: a search or retraining killed with SIGKILL resumes and ends exactly where an
uninterrupted run ends; after any kill every file in the run folder is whole, and the folder either
loads or says it is incomplete."""
from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitslim_core.demo import DEMO_DIR
from vitslim_core.errors import ScoreFileError, VitSlimError

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "_crash_child.py"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")]

SEARCH = ["search", "--data", "digits", "--batch-size", "32", "--max-steps", "6", "--checkpoint-every", "1",
          "--log-every", "4", "--lr", "1e-3", "--mask-lr", "1e-2", "--w-attn", "1e-2", "--w-mlp", "1e-2",
          "--w-token", "1e-2", "--seed", "5", "--device", "cpu"]
RETRAIN = ["retrain", str(DEMO_DIR), "--flops", "0.5", "--batch-size", "32", "--max-steps", "6",
           "--epochs", "1", "--checkpoint-every", "1", "--log-every", "4", "--distill", "hard", "--mixup", "0.2",
           "--seed", "1", "--device", "cpu"]
# the digits train split is 1437 images: batch 32 gives 45 steps an epoch, so 6 steps end mid-epoch;
# evaluate at the end (step == total) still runs, so best/ is written once


class ForkServer:
    """tests/_crash_child.py: imports torch & co. once, forks one child per run."""

    def __init__(self, tmp: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "VITSLIM_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
        self.tmp = tmp
        self.proc = subprocess.Popen([sys.executable, str(CHILD)], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self._read(120).get("ready")
        self.busy = False

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            pytest.fail("the fork server did not answer in time")
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"the fork server died (rc {self.proc.poll()})")
        return json.loads(line)

    def start(self, mode: str, n: int, out: Path, args: list[str], resume: bool = False) -> int:
        """Start a child; returns its pid."""
        self.err = self.tmp / f"stderr-{time.monotonic_ns()}.txt"
        argv = [*args, "--out", str(out)] + (["--resume"] if resume else [])
        self.proc.stdin.write(json.dumps({"mode": mode, "n": n, "out": str(out), "argv": argv,
                                          "stderr": str(self.err)}) + "\n")
        self.proc.stdin.flush()
        return int(self._read(30)["pid"])

    def wait(self, timeout: float = 240) -> tuple[int, str]:
        """The child's exit code (-9 when killed) and its stderr."""
        rc = int(self._read(timeout)["rc"])
        return rc, self.err.read_text() if self.err.exists() else ""

    def run(self, mode: str, n: int, out: Path, args: list[str], resume: bool = False) -> tuple[int, str]:
        self.start(mode, n, out, args, resume)
        return self.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ForkServer(tmp_path_factory.mktemp("stderr"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """Uninterrupted search and retraining, each in a forked child like the crashed ones."""
    base = tmp_path_factory.mktemp("ref")
    out = {}
    for name, args in (("search", SEARCH), ("retrain", RETRAIN)):
        rc, err = server.run("none", 0, base / name, args)
        assert rc == 0, err
        out[name] = base / name
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_files_whole(folder: Path) -> None:
    """Every file a reader would open is complete: JSON parses, safetensors and checkpoints load."""
    from vitslim_core.train import load_checkpoint
    for p in folder.rglob("*"):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue  # our temp files and folders: no reader opens them
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            load_file(str(p))
        elif p.suffix == ".pt":
            load_checkpoint(p)


def _assert_search_folder_state(out: Path) -> None:
    """After a kill the search folder loads (and says it is incomplete) or says why it does not."""
    from vitslim_core.run_folder import load_run, run_status
    _assert_files_whole(out)
    if not (out / "scores.safetensors").exists():
        return
    try:
        scores, _ = load_run(out)
    except ScoreFileError as e:
        assert "interrupted" in str(e) or "model.safetensors" in str(e), e
        return
    assert run_status(scores) is not None or scores.meta.get("complete") is True


def _resume_until_done(server: ForkServer, out: Path, args: list[str], first_rc: int) -> None:
    rc = first_rc
    assert rc == -signal.SIGKILL, f"the child was meant to be killed, it exited with {rc}"
    resume = (out / "checkpoint.pt").exists()
    rc, err = server.run("none", 0, out, args, resume=resume)
    assert rc == 0, err
    assert "Traceback" not in err
    assert not list(out.rglob(".*.tmp")), "stale temp files or folders were not cleaned up"


# the writes of one search checkpoint, in order: checkpoint.pt, model.safetensors, scores.safetensors,
# history.json (4 renames); the first checkpoint is writes 1-4, the second 5-8
@pytest.mark.parametrize("mode,n", [("half", 1), ("before", 2), ("after", 2), ("half", 3), ("half", 5),
                                    ("after", 7)])
def test_search_killed_at_a_write_resumes_to_the_same_scores(tmp_path, server, reference, mode, n):
    from vitslim_core.run_folder import load_run
    out = tmp_path / "run"
    rc, _ = server.run(mode, n, out, SEARCH)
    _assert_search_folder_state(out)
    _resume_until_done(server, out, SEARCH, rc)
    ref_scores, _ = load_run(reference["search"])
    scores, _ = load_run(out)
    assert scores.meta["complete"] is True
    for kind in ("attn", "mlp", "token"):
        for x, y in zip(getattr(ref_scores, kind), getattr(scores, kind)):
            assert torch.equal(x, y), kind
    _assert_same_tensors(_weights(reference["search"] / "model.safetensors"), _weights(out / "model.safetensors"))
    ref_hist = json.loads((reference["search"] / "history.json").read_text())
    hist = json.loads((out / "history.json").read_text())
    strip = lambda recs: [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs]  # noqa: E731
    assert strip(hist["log"]) == strip(ref_hist["log"])  # the log window survives the kill too


def test_search_killed_at_random_times_resumes_to_the_same_scores(tmp_path, server, reference):
    """Kill at random moments (mid-step, mid-write, mid-evaluation), resume, repeat until it finishes."""
    from vitslim_core.run_folder import load_run
    out, rng = tmp_path / "run", random.Random(7)
    kills = 0
    for _ in range(4):  # four kills, each after the next checkpoint, then a run to the end
        pid = server.start("none", 0, out, SEARCH, resume=(out / "checkpoint.pt").exists())
        ck = out / "checkpoint.pt"
        start_mtime = ck.stat().st_mtime_ns if ck.exists() else 0
        deadline = time.monotonic() + 120
        # wait for the next checkpoint, so that every round makes progress, then kill at a random moment
        while time.monotonic() < deadline and not (ck.exists() and ck.stat().st_mtime_ns != start_mtime):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        rc, err = server.wait()
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, err
        kills += 1
        _assert_search_folder_state(out)
    if rc != 0:
        _resume_until_done(server, out, SEARCH, rc)
    assert kills >= 1
    ref_scores, _ = load_run(reference["search"])
    scores, _ = load_run(out)
    for kind in ("attn", "mlp", "token"):
        for x, y in zip(getattr(ref_scores, kind), getattr(scores, kind)):
            assert torch.equal(x, y), kind


# retraining writes plan.json (1), then per checkpoint checkpoint.pt, the folder last/ (one switch), at the
# final step the folder best/ (weights, slim.json and eval.json in one switch), and history.json: steps 1-5
# are writes 2-16, step 6 is checkpoint 17, last/ 18, best/ 19, history 20
@pytest.mark.parametrize("mode,n", [("half", 2), ("after", 6), ("before", 18), ("half", 19), ("after", 19)])
def test_retrain_killed_at_a_write_resumes_to_the_same_weights(tmp_path, server, reference, mode, n):
    from vitslim_core import load_slim
    out = tmp_path / "rt"
    rc, _ = server.run(mode, n, out, RETRAIN)
    _assert_files_whole(out)
    for sub in ("last", "best"):
        if (out / sub / "slim.json").exists() and (out / sub / "model.safetensors").exists():
            load_slim(out / sub)  # whatever is there loads
    _resume_until_done(server, out, RETRAIN, rc)
    for sub in ("last", "best"):
        _assert_same_tensors(_weights(reference["retrain"] / sub / "model.safetensors"),
                             _weights(out / sub / "model.safetensors"))
    assert json.loads((out / "best" / "eval.json").read_text()) == \
        json.loads((reference["retrain"] / "best" / "eval.json").read_text())
    assert json.loads((out / "history.json").read_text())["complete"] is True


def test_interrupted_run_folder_is_reported_not_paired_with_other_weights(tmp_path, server, reference, capsys):
    """Scores from one step next to weights from another are refused with a way out."""
    from vitslim_core.run_folder import load_run
    out = tmp_path / "run"
    rc, _ = server.run("after", 6, out, SEARCH)  # second checkpoint: checkpoint.pt and model.safetensors renamed
    assert rc == -signal.SIGKILL
    with pytest.raises(ScoreFileError, match=r"interrupted.*--resume"):
        load_run(out)
    from vitslim_core.cli import main
    assert main(["slim", str(out), "--flops", "0.5", "--out", str(tmp_path / "slim")]) == 2
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "slim").exists()


def test_incomplete_search_is_reported(tmp_path, server, reference, capsys):
    from vitslim_core.run_folder import load_run, run_status
    out = tmp_path / "run"
    rc, _ = server.run("after", 8, out, SEARCH)  # the second checkpoint fully written, then killed
    assert rc == -signal.SIGKILL
    scores, _ = load_run(out)
    note = run_status(scores)
    assert note and "incomplete" in note and "step 2 of 6" in note
    assert run_status(load_run(reference["search"])[0]) is None
    from vitslim_core.cli import main
    assert main(["plan", str(out), "--flops", "0.6"]) == 0
    assert "note: this search is incomplete (step 2 of 6)" in capsys.readouterr().err


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    from vitslim_core.retrain import retrain
    with pytest.raises(VitSlimError, match="no checkpoint"):
        retrain(run=str(DEMO_DIR), flops=0.5, out=str(tmp_path / "x"), device="cpu", resume=True)


def test_disk_full_during_a_search_is_one_line_and_loses_nothing(tmp_path, server, reference):
    from vitslim_core.run_folder import load_run
    out = tmp_path / "run"
    rc, err = server.run("enospc", 6, out, SEARCH)  # the second checkpoint's weights
    assert rc == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("vitslim:")]
    assert len(lines) == 1 and "disk is full" in lines[0], err
    rc, err = server.run("none", 0, out, SEARCH, resume=True)  # space freed: resume
    assert rc == 0, err
    scores, _ = load_run(out)
    ref, _ = load_run(reference["search"])
    assert all(torch.equal(x, y) for x, y in zip(scores.attn + scores.mlp + scores.token,
                                                  ref.attn + ref.mlp + ref.token))


def test_unwritable_output_folder_fails_before_training(tmp_path, capsys):
    from vitslim_core.cli import main
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["search", "--data", "digits", "--max-steps", "2", "--device", "cpu",
                 "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a folder" in err, err


def test_app_says_a_run_is_incomplete(tmp_path, server):
    pytest.importorskip("gradio")
    from vitslim_app.explorer import run_summary
    from vitslim_app.runs import RunRegistry
    out = tmp_path / "run"
    rc, _ = server.run("after", 8, out, SEARCH)  # killed after the second checkpoint
    assert rc == -signal.SIGKILL
    reg = RunRegistry([out], tmp_path / "work")
    assert "incomplete (step 2 of 6)" in run_summary(reg.get(str(out)))


def test_only_our_own_stale_temp_files_are_removed(tmp_path):
    """A run folder may sit among other files (--out .): only temp files of ours are cleaned up."""
    from vitslim_core.io import TEMP_MARK, atomic_path, remove_stale_temps
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "best" / "model.safetensors") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the writer fails half way")
    assert not list(tmp_path.rglob("*.tmp"))  # a failing writer cleans up after itself
    ours = [tmp_path / f".checkpoint.pt{TEMP_MARK}ab12.tmp", tmp_path / "last" / f".slim.json{TEMP_MARK}x.tmp"]
    foreign = [tmp_path / ".editor-swap.tmp", tmp_path / "data" / "deep" / f".x{TEMP_MARK}y.tmp",
               tmp_path / "notes.tmp"]
    for p in ours + foreign:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == 2
    assert not any(p.exists() for p in ours) and all(p.exists() for p in foreign)
