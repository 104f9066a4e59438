"""Many pages at once: the launched app under 16 clients dragging the FLOPs slider. Prints one table
(nothing here is a test; ``tests/test_load.py`` runs a short bounded form in CI).

The app is launched in this process on 127.0.0.1 (``app.ui.build_app`` + ``launch_app``, the bundled
demo by default). Each client is a thread playing one page (``app_harness.slider_load``): it picks a tab
(attention, MLP, tokens, image, layers, scores in turn), then sends what the page sends while the FLOPs
slider moves: the slider's ``change`` event (queue-less ``POST /gradio_api/run/budget_views``, the live
readout and the tab's map) and loads the images it returns; every 5 moves the ``release`` event (queued:
the tab's heavy view: prediction, score histogram figure...); every 2 s the job line (the page's timer).

Phases:
  a. idle: the clients alone for ``--seconds``;
  b. retrain: the same while a retraining job runs in the app, started with the page's own Start button
     event (queued generator that streams the live training curve) and stopped with its Stop button;
     target: slider p95 < 500 ms;
  c. memory: RSS of this process (server and clients) after 100 and after 1000 slider updates (plus the
     releases among them), with live matplotlib figures and gc objects; target: ratio <= 1.10.

Usage: PYTHONPATH=. python benchmarks/bench_load.py [--run RUN] [--clients 16] [--seconds 30]
           [--updates 100,1000] [--epochs 50] [--skip-retrain] [--skip-memory]
The clients run in a separate process (``--clients-in-server`` puts them in the server's process, where
they compete with it for the GIL), so the memory readings are the server's alone.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("VITSLIM_NO_PROGRESS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # app_harness: the test harness the benchmarks share

P95_TARGET_MS = 500.0
MEMORY_RATIO_TARGET = 1.10


def memory_snapshot() -> dict:
    """RSS (MB) of this process after a full collection, live matplotlib figures, gc objects."""
    import psutil
    gc.collect()
    figures = 0
    try:
        from matplotlib.figure import Figure
        figures = sum(1 for o in gc.get_objects() if isinstance(o, Figure))
        import matplotlib.pyplot as plt
        pyplot_open = len(plt.get_fignums())
    except ImportError:
        pyplot_open = 0
    return {"rss_mb": psutil.Process(os.getpid()).memory_info().rss / 2**20, "figures": figures,
            "pyplot_open": pyplot_open, "gc_objects": len(gc.get_objects()), "threads": threading.active_count()}


class RetrainDriver:
    """Starts retraining with the page's Start button event and follows its stream in a thread, like a
    page on the Retrain tab; ``stop`` presses the page's Stop button."""

    def __init__(self, url: str, epochs: int, budget: float = 0.5) -> None:
        from app_harness import PageClient
        self.pc = PageClient(url, timeout=600)
        self.start_dep = self.pc.dependency("vs-start-btn", "click")
        self.data = self.pc.inputs(self.start_dep, **{"vs-flops-slider": budget, "vs-epochs": epochs,
                                                      "vs-max-steps": 0})
        self.updates = 0
        self.error = ""
        self.thread = threading.Thread(target=self._follow, daemon=True, name="bench-retrain-page")

    def _follow(self) -> None:
        def on_update(_outputs) -> None:
            self.updates += 1
        try:
            self.pc.submit(self.start_dep, self.data, timeout=900, on_update=on_update)
        except Exception as e:  # noqa: BLE001 - reported in the table
            self.error = f"{type(e).__name__}: {e}"

    def start(self) -> None:
        self.thread.start()

    def stop(self, url: str, timeout: float = 180) -> bool:
        from app_harness import PageClient
        with PageClient(url, timeout=60) as pc:
            dep = pc.dependency("vs-stop-btn", "click")
            pc.submit(dep, pc.inputs(dep))
        self.thread.join(timeout)
        self.pc.close()
        return not self.thread.is_alive()


def _load_entry(kwargs: dict):
    from app_harness import slider_load
    return slider_load(**kwargs)


class ClientProcess:
    """Runs ``app_harness.slider_load`` in one spawned process (all its client threads there), so the
    clients neither share the server's GIL nor count in its memory. Results come back through
    multiprocessing (our own objects between our own processes)."""

    def __init__(self) -> None:
        import multiprocessing
        self.pool = multiprocessing.get_context("spawn").Pool(1)

    def __call__(self, url: str, **kwargs):
        return self.pool.apply(_load_entry, ({"url": url, **kwargs},))

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="run folder (default: the bundled demo, else a quick run)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of phases a and b")
    ap.add_argument("--updates", default="100,1000", help="slider updates at the two memory readings")
    ap.add_argument("--epochs", type=int, default=50, help="epochs of the retraining job (stopped at the end)")
    ap.add_argument("--views", default="mixed", choices=["mixed", "attention"],
                    help="mixed: the clients spread over the six live tabs; attention: all on the first tab")
    ap.add_argument("--drag", type=int, default=5, help="slider moves per release event (0: no releases)")
    ap.add_argument("--skip-retrain", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--clients-in-server", action="store_true",
                    help="run the client threads in the server's process (default: a separate process)")
    a = ap.parse_args()

    import torch

    from vitslim_app.explorer import Explorer
    from vitslim_app.jobs import RetrainJob
    from app_harness import LIVE_VIEWS, free_port, run_for_tests, slider_load, wait_until
    clients_proc = None if a.clients_in_server else ClientProcess()
    load = clients_proc or slider_load
    from vitslim_app.ui import build_app, launch_app
    views = LIVE_VIEWS if a.views == "mixed" else None
    lo_n, hi_n = (int(v) for v in a.updates.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="vitslim-bench-load-"))
    rows: list[tuple] = []
    notes: list[str] = []
    mem: list[tuple[int, dict]] = []
    load_before = os.getloadavg()
    demo = None
    try:
        run = Path(a.run) if a.run else run_for_tests(tmp)
        demo = build_app(explorer=Explorer([run], tmp / "workdir", job=RetrainJob()))
        port = free_port()
        launch_app(demo, port=port, quiet=True, prevent_thread_lock=True)
        url = f"http://127.0.0.1:{port}/"
        ex = demo.explorer
        ex.warm_up()
        warm = load(url, clients=len(LIVE_VIEWS), seconds=60, updates=4 * len(LIVE_VIEWS), views=LIVE_VIEWS,
                           drag=2, timer_every=0)
        if warm.errors():
            notes.append(f"warm-up errors: {warm.errors()[:3]}")

        def add(phase: str, res) -> None:
            for kind in ("slider", "heavy", "release", "timer"):
                s = dict(res.stats(kind), seconds=res.seconds)
                if s["served"] or s["errors"]:
                    rows.append((phase, s))
            errs = res.errors()
            if errs:
                notes.append(f"{phase}: {len(errs)} errors, first: {errs[0]}")

        # a. idle
        add("a. idle", load(url, clients=a.clients, seconds=a.seconds, views=views, drag=a.drag))

        # b. with a retraining job
        if not a.skip_retrain:
            drv = RetrainDriver(url, a.epochs)
            drv.start()
            started = wait_until(lambda: ex.job.status().step > 0, timeout=120, interval=0.2)
            if not started:
                notes.append(f"retraining did not reach its first step in 120 s ({ex.job.status().state}, "
                             f"{ex.job.status().error or drv.error})")
            s0, t0 = ex.job.status().step, time.monotonic()
            res = load(url, clients=a.clients, seconds=a.seconds, views=views, drag=a.drag)
            st = ex.job.status()
            steps, dt = st.step - s0, time.monotonic() - t0
            # one person dragging (attention tab) while the job runs: the job must not make one slider lag
            solo = load(url, clients=1, seconds=a.seconds / 2, views=None, drag=a.drag)
            active = ex.job.status().active
            stopped = drv.stop(url)
            st = ex.job.status()
            add("b. + retrain", res)
            add("b1. 1 page+retrain", solo)
            notes.append(f"b: the job ran about {steps} training steps ({steps / dt:.2f}/s; counted from its logs, every "
                         f"5 steps) during the 16-page phase; it waited {ex.job.yielded_s:.0f} s in all for slider "
                         f"requests"
                         f"{'' if active else ' and had ENDED before it did (use more --epochs)'}; "
                         f"{drv.updates} live-curve updates streamed to its page; stopped: {stopped} "
                         f"(state {st.state}{', ' + st.error if st.error else ''}{'; ' + drv.error if drv.error else ''})")

        # c. memory after lo_n and hi_n slider updates (the page's change events; releases come on top)
        if not a.skip_memory:
            done = 0
            base = memory_snapshot()
            mem.append((0, base))
            for target in (lo_n, hi_n):
                res = load(url, clients=a.clients, seconds=3600, updates=target - done, views=views,
                                  drag=a.drag, timer_every=0, seed=target)
                done += len(res.of("slider"))
                add(f"c. memory to {target}", res)
                mem.append((done, memory_snapshot()))
    finally:
        if clients_proc is not None:
            clients_proc.close()
        if demo is not None:
            demo.close()
        shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ the table
    print(f"{'phase':<20} {'event':<8} {'clients':>7} {'seconds':>7} {'served':>7} {'errors':>6} {'p50 ms':>8} "
          f"{'p95 ms':>8} {'max ms':>8} {'req/s':>7}  target")
    for phase, s in rows:
        res_secs = s["seconds"]
        n_clients = 1 if phase.startswith("b1") else a.clients
        target = ""
        if s["kind"] == "slider":
            target = "errors 0: " + ("PASS" if s["errors"] == 0 else "MISS")
            if phase.startswith("b"):
                target += f"; p95 < {P95_TARGET_MS:.0f} ms: " + ("PASS" if s["p95"] < P95_TARGET_MS else "MISS")
        elif s["errors"]:
            target = "errors 0: MISS"
        print(f"{phase:<20} {s['kind']:<8} {n_clients:>7} {res_secs:>7.0f} {s['served']:>7} {s['errors']:>6} "
              f"{s['p50']:>8.1f} {s['p95']:>8.1f} {s['max']:>8.1f} {s['per_s']:>7.1f}  {target}")
    if mem:
        print()
        print(f"{'memory after':<22} {'RSS MB':>8} {'Figure objects':>15} {'pyplot open':>12} {'gc objects':>11} "
              f"{'threads':>8}")
        for n, m in mem:
            print(f"{n:>5} slider updates     {m['rss_mb']:>8.1f} {m['figures']:>15} {m['pyplot_open']:>12} "
                  f"{m['gc_objects']:>11} {m['threads']:>8}")
        if len(mem) >= 3:
            ratio = mem[2][1]["rss_mb"] / mem[1][1]["rss_mb"]
            ok = ratio <= MEMORY_RATIO_TARGET and mem[2][1]["pyplot_open"] == 0
            print(f"RSS after {mem[2][0]} / after {mem[1][0]} updates: {ratio:.3f} (target <= {MEMORY_RATIO_TARGET}): "
                  f"{'PASS' if ok else 'MISS'}")
    for n in notes:
        print("note:", n)
    print(f"(torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; load average before "
          f"{', '.join(f'{v:.1f}' for v in load_before)}, after {', '.join(f'{v:.1f}' for v in os.getloadavg())}; "
          f"clients are threads of {'this process' if a.clients_in_server else 'a separate process'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
