"""The one retraining job an app process runs at a time (module-level, guarded by a lock).

Retraining takes the CPU (or GPU) of the whole machine, so a second user who presses Start is told
that a job is running instead of starting another one. The job runs ``vitslim_core.retrain.retrain``
in a daemon thread; ``stop()`` makes its ``should_stop`` return True, the training loop saves a
checkpoint and returns, and the job still packages what it has.

The job is background work: people moving a slider come first. Its thread runs at a lower OS priority
(``nice``) and before each training step waits
briefly while interactive requests are being served (``ACTIVITY``, fed by the page's live events), so a
retraining job does not make the slider lag; the job slows down instead, and never stops.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator


class Activity:
    """Interactive requests in flight (slider moves), so background work can let them go first."""

    def __init__(self, linger: float = 0.05) -> None:
        """Args: linger: seconds after the last interactive request during which the app still counts as
        busy (the response is still being encoded and sent when the callback returns)."""
        self.linger = linger
        self._cond = threading.Condition()
        self._active = 0
        self._last = 0.0

    @contextlib.contextmanager
    def interactive(self) -> Iterator[None]:
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._last = time.monotonic()
                self._cond.notify_all()

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` counted as interactive (keeps its signature for Gradio)."""
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.interactive():
                return fn(*args, **kwargs)
        return wrapper

    def busy(self) -> bool:
        with self._cond:
            return self._active > 0 or time.monotonic() - self._last < self.linger

    def wait_quiet(self, max_wait: float) -> float:
        """Wait until no interactive request is in flight (or ``max_wait`` seconds); returns the wait."""
        t0 = time.monotonic()
        end = t0 + max_wait
        with self._cond:
            while True:
                now = time.monotonic()
                quiet_at = self._last + self.linger
                if (self._active == 0 and now >= quiet_at) or now >= end:
                    return now - t0
                self._cond.wait(min(end, max(quiet_at, now + 0.005)) - now)


ACTIVITY = Activity()
"""The process-wide tracker: the app's live events enter it, the retraining job yields to it."""


class JobBusyError(RuntimeError):
    """Another retraining job is running in this app."""


@dataclass
class JobStatus:
    """A snapshot of the job, safe to read while it runs (a copy)."""

    job_id: int = 0
    state: str = "idle"  # idle | starting | running | packaging | done | stopped | failed
    run_key: str = ""
    run_label: str = ""
    budget: str = ""
    out: str = ""
    started: float = 0.0
    finished: float = 0.0
    step: int = 0
    total_steps: int = 0
    log: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    flops_ratio: float | None = None
    top1: float | None = None
    zip_path: str | None = None
    program_path: str | None = None
    note: str = ""
    error: str = ""

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "packaging")

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    def history(self) -> dict[str, Any]:
        return {"log": self.log, "eval": self.evals}


@dataclass
class RetrainRequest:
    """What the app asks for; turned into a ``RetrainConfig`` inside the job thread."""

    run_key: str
    run_label: str
    out: Path
    budget: dict[str, Any]  # {"flops": r} or {"attn": a, "mlp": m, "token": t}
    budget_text: str
    epochs: int = 1
    lr: float = 2e-4
    distill: bool = True
    max_steps: int = 0
    batch_size: int = 64
    device: str = "cpu"
    evaluate: Callable[[Any], float] | None = None  # top-1 of a slim model when the loop did not evaluate


class RetrainJob:
    """Runs at most one retraining at a time and keeps the results of finished ones."""

    def __init__(self, runner: Callable[..., Any] | None = None, nice: int = 10, yield_s: float = 0.25,
                 activity: Activity | None = None, threads: int | None = None) -> None:
        """Args:
            runner: replaces ``vitslim_core.retrain.retrain`` (tests, other back-ends).
            nice: added to the OS priority (niceness) of the job's thread (0: unchanged; Linux only).
            yield_s: before each training step, wait up to this long while interactive requests are
                being served (0: never wait).
            activity: the tracker of interactive requests (default: ``ACTIVITY``).
            threads: torch threads for the job (default: unchanged). ``torch.set_num_threads`` also
                sets the count that threads started later inherit, so a lower count here would also
                slow the app's own worker threads started while the job runs; niceness does the job.
        """
        self.runner = runner
        self.nice, self.yield_s, self.threads = nice, yield_s, threads
        self.activity = activity or ACTIVITY
        self.yielded_s = 0.0  # seconds the current/last job waited for interactive requests
        self._lock = threading.Lock()
        self._status = JobStatus()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_id = 1
        self.results: list[dict[str, Any]] = []  # finished jobs: run_key, flops_ratio, top1, paths

    # ------------------------------------------------------------------ reading
    def status(self) -> JobStatus:
        with self._lock:
            return copy.deepcopy(self._status)

    def results_for(self, run_key: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.results if r["run_key"] == run_key]

    # ------------------------------------------------------------------ control
    def start(self, req: RetrainRequest) -> int:
        """Start a job in a background thread; raises JobBusyError if one is active."""
        with self._lock:
            if self._status.active:
                s = self._status
                raise JobBusyError(f"a retraining job is already running ({s.run_label}, {s.budget}, "
                                   f"step {s.step}/{s.total_steps or '?'}); wait for it or stop it")
            job_id = self._next_id
            self._next_id += 1
            self._status = JobStatus(job_id=job_id, state="starting", run_key=req.run_key, run_label=req.run_label,
                                     budget=req.budget_text, out=str(req.out), started=time.time())
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, args=(job_id, req, self.runner), daemon=True,
                                            name=f"vitslim-retrain-{job_id}")
            self._thread.start()
        return job_id

    def stop(self) -> bool:
        """Ask the running job to stop after its current step; False if none is active."""
        with self._lock:
            if not self._status.active:
                return False
            self._stop.set()
            self._status.note = "stopping after the current step..."
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the job thread to end (True if it did)."""
        t = self._thread
        if t is None:
            return True
        t.join(timeout)
        return not t.is_alive()

    # ------------------------------------------------------------------ the thread
    def _update(self, **kw: Any) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self._status, k, v)

    def _on_log(self, rec: dict) -> None:
        with self._lock:
            st = self._status
            st.state = "running" if st.state == "starting" else st.state
            if "eval" in rec:
                st.evals.append(dict(rec["eval"]))
                return
            st.log.append(dict(rec))
            st.step = int(rec.get("step", st.step))
            epoch = float(rec.get("epoch") or 0.0)
            if epoch > 0 and st.step > 0 and not st.total_steps:
                per_epoch = int(round(st.step / epoch))
                st.total_steps = per_epoch * self._epochs
                if self._max_steps > 0:
                    st.total_steps = min(st.total_steps, self._max_steps)

    def _background(self) -> Callable[[], None]:
        """Lower this thread's priority and torch threads; returns the function that restores torch's."""
        if self.nice and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
            try:  # on Linux the niceness of one thread (it applies to the threads it starts, too)
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.nice))
            except OSError:
                pass
        try:
            import torch
        except ImportError:
            return lambda: None
        old = torch.get_num_threads()
        want = self.threads or old
        if want < old:
            torch.set_num_threads(want)
            return lambda: torch.set_num_threads(old)
        return lambda: None

    def _should_stop(self) -> bool:
        """Polled before every training step: let interactive requests go first, then report Stop."""
        if self.yield_s > 0 and not self._stop.is_set():
            self.yielded_s += self.activity.wait_quiet(self.yield_s)
        return self._stop.is_set()

    def _run(self, job_id: int, req: RetrainRequest, runner: Callable[..., Any] | None) -> None:
        self._epochs, self._max_steps = req.epochs, req.max_steps
        self.yielded_s = 0.0
        restore = self._background()
        try:
            from vitslim_core.retrain import RetrainConfig, retrain

            from .runs import DATA_ROOT
            runner = runner or retrain
            out = Path(req.out)
            cfg = RetrainConfig(run=req.run_key, out=str(out), epochs=req.epochs, lr=req.lr,
                                distill="soft" if req.distill else "none", device=req.device,
                                max_steps=req.max_steps, batch_size=req.batch_size,
                                log_every=1 if (req.max_steps and req.max_steps <= 100) else 5,
                                data_root=DATA_ROOT, **req.budget)
            self._update(state="running")
            result = runner(cfg, on_log=self._on_log, should_stop=self._should_stop)
            stopped = bool(result.history.get("stopped")) or self._stop.is_set()
            self._update(state="packaging", note="packaging the slim model...")
            info = self._package(out, result, req.evaluate, stopped)
            final = "stopped" if stopped else "done"
            with self._lock:
                st = self._status
                st.state, st.finished = final, time.time()
                st.flops_ratio, st.top1 = info["flops_ratio"], info["top1"]
                st.zip_path, st.program_path, st.note = info["zip"], info["program"], info["note"]
                if st.top1 is not None:
                    self.results.append({"run_key": req.run_key, "flops_ratio": st.flops_ratio, "top1": st.top1,
                                         "kind": "retrained" + (" (stopped early)" if stopped else ""),
                                         "job_id": job_id, "zip": st.zip_path, "program": st.program_path})
        except Exception as e:  # noqa: BLE001 - the thread must always end in a readable state
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            from vitslim_core.errors import VitSlimError
            if not isinstance(e, VitSlimError):
                msg = f"{type(e).__name__}: {msg}"
                traceback.print_exc()
            self._update(state="failed", error=msg, finished=time.time(), note="")
        finally:
            restore()

    def _package(self, out: Path, result: Any, evaluate: Callable[[Any], float] | None,
                 stopped: bool) -> dict[str, Any]:
        """Evaluate (if the loop did not), zip the slim model and export a program (.pt2)."""
        from vitslim_core.slim import load_slim
        best = out / "best"
        folder = best if (best / "slim.json").is_file() and not stopped else out / "last"
        notes = []
        top1 = result.best_top1
        if not (folder / "slim.json").is_file():
            return {"flops_ratio": result.plan.flops_ratio, "top1": None, "zip": None, "program": None,
                    "note": "no model was saved (stopped before the first step)"}
        model = load_slim(folder)
        if (top1 is None or folder.name == "last") and evaluate is not None:
            top1 = evaluate(model)
        zip_base = out / f"slim-{out.name}"
        zip_path = shutil.make_archive(str(zip_base), "zip", root_dir=folder)
        program = None
        try:
            from vitslim_core.export import export_program
            program = str(out / f"slim-{out.name}.pt2")
            export_program(model, program)
        except ImportError:
            program = None
            notes.append("program export is not available in this vitslim version")
        except Exception as e:  # noqa: BLE001 - export is a bonus; the zip is the result
            program = None
            notes.append(f"program export failed ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")
        return {"flops_ratio": result.plan.flops_ratio, "top1": top1, "zip": zip_path, "program": program,
                "note": "; ".join(notes)}


JOB = RetrainJob()
"""The process-wide retraining job shared by every session of every app in this process."""


def job_status_dict(st: JobStatus) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(st).items() if k not in ("log", "evals")}
