"""Helpers for the app's tests and benchmarks: a small run folder, free ports, chromium options."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# a few search steps with strong penalties and a fast mask learning rate: scores that differ
QUICK_SEARCH = dict(epochs=1, max_steps=8, batch_size=32, lr=5e-4, mask_lr=0.2, w_attn=2e-2, w_mlp=1e-2,
                    w_token=2e-2, log_every=2, device="cpu", seed=0)


def bundled_demo() -> Path | None:
    """The bundled demo run, if it has been built."""
    from vitslim_core.demo import DEMO_DIR
    return DEMO_DIR if (DEMO_DIR / "scores.safetensors").is_file() else None


def build_quick_run(out: Path) -> Path:
    """A real search run of the digits ViT in a few seconds (random start, eight search steps)."""
    from vitslim_core.search import SearchConfig, search
    out = Path(out)
    if (out / "scores.safetensors").is_file() and (out / "model.safetensors").is_file():
        return out
    os.environ.setdefault("VITSLIM_NO_PROGRESS", "1")
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    search(SearchConfig(model="digits-vit", data="digits", out=str(tmp), **QUICK_SEARCH))
    (tmp / "checkpoint.pt").unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def run_for_tests(base: Path) -> Path:
    """The run the app tests use: ``VITSLIM_TEST_RUN``, else the bundled demo, else a quick run in ``base``
    (built once: later calls with the same ``base`` reuse it)."""
    env = os.environ.get("VITSLIM_TEST_RUN")
    if env:
        return Path(env)
    return bundled_demo() or build_quick_run(Path(base) / "quick-run")


def bundled_fashion() -> Path | None:
    """The bundled Fashion-MNIST run, if it has been built."""
    from vitslim_core.demo import FASHION_DIR
    return FASHION_DIR if (FASHION_DIR / "scores.safetensors").is_file() else None


def fashion_installed() -> bool:
    """Whether the real Fashion-MNIST data set is installed (Debian's folder or ./data)."""
    from vitslim_app.runs import fashion_installed as installed
    return installed()


def _write_idx(path: Path, array: Any) -> None:
    import numpy as np
    array = np.ascontiguousarray(array, dtype=np.uint8)
    head = (0x800 | array.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(head + array.tobytes())


def build_quick_fashion_run(out: Path) -> Path:
    """A Fashion-MNIST run in seconds without the data set: fashion-vit searched for a few steps on tiny
    random IDX files, then renamed to plain ``fashion-mnist`` (as the bundled run names its data), with
    ``samples.safetensors`` (ten images per class) like the bundled run."""
    import numpy as np

    from vitslim_core.fashion import FILES, save_samples
    from vitslim_core.scores import MaskScores
    from vitslim_core.search import SearchConfig, search
    out = Path(out)
    if (out / "scores.safetensors").is_file() and (out / "samples.safetensors").is_file():
        return out
    os.environ.setdefault("VITSLIM_NO_PROGRESS", "1")
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    idx = tmp / "idx"
    idx.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 240), ("test", 100)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        arrays[f"{split}_images"] = rng.integers(0, 40, (n, 28, 28)) + (labels * 20)[:, None, None]
        arrays[f"{split}_labels"] = labels
    for key, array in arrays.items():
        _write_idx(idx / FILES[key], array)
    search(SearchConfig(model="fashion-vit", data=f"fashion-mnist:{idx}", out=str(tmp),
                        **{**QUICK_SEARCH, "max_steps": 4}))
    (tmp / "checkpoint.pt").unlink(missing_ok=True)
    scores = MaskScores.load(tmp)
    scores.meta["data"]["name"] = "fashion-mnist"
    scores.save(tmp)
    order = np.argsort(arrays["test_labels"], kind="stable")
    save_samples(tmp / "samples.safetensors", arrays["test_images"][order], arrays["test_labels"][order], order)
    shutil.rmtree(idx)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def fashion_run_for_tests(base: Path) -> Path:
    """A Fashion-MNIST run for the app's tests: ``VITSLIM_TEST_FASHION_RUN``, else the bundled one, else a
    quick one in ``base`` (built once)."""
    env = os.environ.get("VITSLIM_TEST_FASHION_RUN")
    if env:
        return Path(env)
    return bundled_fashion() or build_quick_fashion_run(Path(base) / "quick-fashion-run")


def launch_for_tests(run: Path, workdir: Path, **launch_kwargs: Any) -> tuple[Any, str]:
    """Build the app on ``run`` (a fresh retraining job) and launch it on 127.0.0.1 at a free port
    without blocking; returns ``(demo, url)``. The caller closes it with ``demo.close()``."""
    from vitslim_app.explorer import Explorer
    from vitslim_app.jobs import RetrainJob
    from vitslim_app.ui import build_app, launch_app
    demo = build_app(explorer=Explorer([run], workdir, job=RetrainJob()))
    port = free_port()
    launch_app(demo, host="127.0.0.1", port=port, quiet=True, prevent_thread_lock=True, **launch_kwargs)
    return demo, f"http://127.0.0.1:{port}/"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass (bounded wait loops in tests)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# ====================================================================== a page's traffic, without a browser
class PageError(RuntimeError):
    """A request of ``PageClient`` failed (HTTP error, error payload, malformed or missing output)."""


class PageClient:
    """Talks to a launched app the way its page does, over plain HTTP (no browser, no gradio_client).

    Events are found in the app's ``/config`` by the ``elem_id`` of their component and the event name
    (``dependency("vs-flops-slider", "change")``). Queue-less events (the live slider views) are one
    ``POST /gradio_api/run/<api_name>`` with the session hash, as the page sends them; queued events go
    through ``/gradio_api/queue/join`` and the session's event stream. Values of ``gr.State`` inputs are
    the server's per-session copies, so each client keeps its own ``session_hash``.

    Not thread-safe: one client per thread (threads may share one ``config``).
    """

    def __init__(self, url: str, config: dict | None = None, session_hash: str | None = None,
                 timeout: float = 60.0) -> None:
        import secrets

        import httpx
        self.url = url.rstrip("/") + "/"
        self.timeout = timeout
        self.http = httpx.Client(timeout=timeout)
        self.session_hash = session_hash or secrets.token_hex(6)
        self.config = config if config is not None else self.http.get(self.url + "config").raise_for_status().json()
        self.components = {c["id"]: c for c in self.config["components"]}

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "PageClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the page's events
    def component_id(self, elem_id: str) -> int:
        for cid, c in self.components.items():
            if c.get("props", {}).get("elem_id") == elem_id:
                return cid
        raise KeyError(f"no component with elem_id {elem_id!r}")

    def dependency(self, elem_id: str, event: str, nth: int = 0) -> dict:
        """The ``nth`` event listener with a Python function on ``event`` of the component ``elem_id``."""
        cid = self.component_id(elem_id)
        deps = [d for d in self.config["dependencies"]
                if [cid, event] in [list(t) for t in d["targets"]] and d.get("backend_fn")]
        if len(deps) <= nth:
            raise KeyError(f"no {event!r} listener #{nth} on {elem_id!r}")
        return deps[nth]

    def then_of(self, dep: dict) -> list[dict]:
        """The listeners chained to ``dep`` with ``.then`` (in order)."""
        return [d for d in self.config["dependencies"] if d.get("trigger_after") == dep["id"]]

    def inputs(self, dep: dict, **by_elem_id) -> list:
        """The input values the page would send: the components' initial values, with ``by_elem_id``
        replacing some (``gr.State`` values are kept on the server, so they are sent as None)."""
        out = []
        for cid in dep["inputs"]:
            props = self.components[cid].get("props", {})
            eid = props.get("elem_id")
            out.append(by_elem_id[eid] if eid in by_elem_id else props.get("value"))
        return out

    def _body(self, dep: dict, data: list, trigger: int | None) -> dict:
        targets = dep.get("targets") or []
        trigger = trigger if trigger is not None else (targets[0][0] if targets else None)
        return {"data": data, "event_data": None, "fn_index": dep["id"], "trigger_id": trigger,
                "session_hash": self.session_hash}

    def run(self, dep: dict, data: list, trigger: int | None = None) -> list:
        """A queue-less event (``queue=False``): returns the output values."""
        name = dep.get("api_name") or "predict"
        r = self.http.post(f"{self.url}gradio_api/run/{name}", json=self._body(dep, data, trigger))
        if r.status_code != 200:
            raise PageError(f"HTTP {r.status_code}: {r.text[:200]}")
        body = r.json()
        if body.get("error") or not isinstance(body.get("data"), list):
            raise PageError(f"error payload: {str(body)[:200]}")
        if len(body["data"]) != len(dep["outputs"]):
            raise PageError(f"{len(body['data'])} outputs, expected {len(dep['outputs'])}")
        return body["data"]

    def submit(self, dep: dict, data: list, trigger: int | None = None, timeout: float | None = None,
               on_update=None) -> list:
        """A queued event: joins the queue and reads the session's stream until the event completes.

        ``on_update(outputs)`` is called with the outputs of each intermediate yield of a generator.
        Raises ``PageError`` on an error, a full queue (HTTP 503: the app is busy) or after ``timeout``."""
        import json
        import time as _time
        end = _time.monotonic() + (timeout or self.timeout)
        r = self.http.post(f"{self.url}gradio_api/queue/join", json=self._body(dep, data, trigger))
        if r.status_code != 200:
            raise PageError(f"HTTP {r.status_code} joining the queue: {r.text[:200]}")
        event_id = r.json()["event_id"]
        with self.http.stream("GET", f"{self.url}gradio_api/queue/data",
                              params={"session_hash": self.session_hash}) as s:
            if s.status_code != 200:
                raise PageError(f"HTTP {s.status_code} on the event stream")
            for line in s.iter_lines():
                if _time.monotonic() > end:
                    raise PageError(f"no result after {timeout or self.timeout:.0f} s")
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                kind = msg.get("msg")
                if kind == "close_stream":
                    break
                if msg.get("event_id") not in (None, event_id):
                    continue
                if kind == "unexpected_error":
                    raise PageError(f"unexpected error: {msg.get('message')}")
                if kind == "process_generating" and on_update is not None and msg.get("success"):
                    on_update(msg["output"].get("data"))
                if kind == "process_completed":
                    if not msg.get("success"):
                        raise PageError(f"failed: {str(msg.get('output'))[:200]}")
                    out = msg["output"].get("data")
                    if not isinstance(out, list):
                        raise PageError(f"no output data: {str(msg)[:200]}")
                    return out
        raise PageError("the event stream ended without a result")

    def fetch_files(self, outputs: list) -> int:
        """GET every file the outputs point to (as the page loads the images it is sent); returns bytes read."""
        n = 0
        for v in outputs:
            if isinstance(v, dict) and v.get("url") and (v.get("meta") or {}).get("_type") == "gradio.FileData":
                r = self.http.get(v["url"] if v["url"].startswith("http") else self.url + v["url"].lstrip("/"))
                if r.status_code != 200 or not r.content:
                    raise PageError(f"HTTP {r.status_code} fetching {v['url'][-60:]}")
                n += len(r.content)
        return n


# ====================================================================== load: many pages moving the budget
LIVE_VIEWS = ("attention", "mlp", "tokens", "image", "layers", "scores")


@dataclass
class LoadRecord:
    kind: str      # "slider" (change event + its images), "heavy" (the heavy views sent after it), "release",
                   # "tab", "timer"
    start: float   # time.monotonic() when sent
    ms: float
    error: str = ""


@dataclass
class LoadResult:
    """What ``slider_load`` measured: one record per request, plus the clients' setup errors."""

    clients: int
    seconds: float
    records: list = field(default_factory=list)
    setup_errors: list = field(default_factory=list)

    def of(self, kind: str) -> list:
        return [r for r in self.records if r.kind == kind]

    def errors(self, kind: str | None = None) -> list[str]:
        return [r.error for r in self.records if r.error and (kind is None or r.kind == kind)] + (
            list(self.setup_errors) if kind is None else [])

    def stats(self, kind: str = "slider") -> dict:
        """served (successful requests), errors, p50/p95/max latency in ms, throughput per second."""
        recs = self.of(kind)
        ok = sorted(r.ms for r in recs if not r.error)

        def pct(p: float) -> float:
            return ok[min(len(ok) - 1, int(round(p * (len(ok) - 1))))] if ok else float("nan")
        return {"kind": kind, "served": len(ok), "errors": len(recs) - len(ok), "p50": pct(0.5), "p95": pct(0.95),
                "max": ok[-1] if ok else float("nan"), "per_s": len(ok) / self.seconds if self.seconds else 0.0}


class _Background:
    """A page's queued events that it does not wait for (the heavy views after a slider move, the
    release): per kind at most one in flight and only the latest one pending (``trigger_mode=
    "always_last"``). They go out one at a time, oldest pending first, on one event stream (Gradio has one
    per session). Latency: from sending to its result, including the wait behind the page's previous
    ones (records of the event's kind)."""

    def __init__(self, pc: "PageClient", deps: dict[str, dict], out: list, timeout: float) -> None:
        self.pc, self.deps, self.out, self.timeout = pc, deps, out, timeout
        self._cond = threading.Condition()
        self._pending: dict[str, tuple[float, list]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="load-client-background")
        self._thread.start()

    def send(self, kind: str, data: list) -> None:
        with self._cond:
            self._pending[kind] = (time.monotonic(), data)
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                kind = min(self._pending, key=lambda k: self._pending[k][0])
                t, data = self._pending.pop(kind)
            try:
                self.pc.submit(self.deps[kind], data, timeout=self.timeout)
                self.out.append(LoadRecord(kind, t, 1e3 * (time.monotonic() - t)))
            except Exception as e:  # noqa: BLE001 - counted as an error of the run
                self.out.append(LoadRecord(kind, t, 1e3 * (time.monotonic() - t),
                                           f"{type(e).__name__}: {str(e)[:200]}"))

    def close(self) -> None:
        """Drop what is pending and wait (bounded) for the event in flight."""
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify()
        self._thread.join(self.timeout + 5)
        self.pc.close()


def _client_loop(url: str, config: dict, index: int, view: str | None, clock: dict, start: threading.Barrier,
                 budget: tuple[float, float, float], drag: int, counter: "RequestBudget", out: list,
                 setup_errors: list, timer_every: float, seed: int, timeout: float) -> None:
    """One page: picks its tab, waits for the others (``start``), then drags the FLOPs slider until
    ``clock["end"]`` or until ``counter`` runs out: each move is the change event (the live views), then
    in the background the heavy views if its answer asks for them, and every ``drag`` moves a release; it
    polls the job line like the page's timer."""
    import random
    rng = random.Random(seed * 1000 + index)
    lo, hi, step = budget
    n_steps = int(round((hi - lo) / step))
    value = lo + step * rng.randint(0, n_steps)
    pc = background = change = None

    def timed(kind: str, fn) -> Any:
        t = time.monotonic()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the client
            out.append(LoadRecord(kind, t, 1e3 * (time.monotonic() - t), f"{type(e).__name__}: {str(e)[:200]}"))
            return None
        out.append(LoadRecord(kind, t, 1e3 * (time.monotonic() - t)))
        return res

    try:
        pc = PageClient(url, config=config, timeout=timeout)
        slider = "vs-flops-slider"
        change = pc.dependency(slider, "change")
        heavy = pc.dependency("vs-heavy-ask", "change")
        release = pc.dependency(slider, "release")
        timer = next(d for d in config["dependencies"]
                     if d.get("backend_fn") and any(t[1] == "tick" for t in d["targets"]))
        if view and view != "attention":  # the page opens on the attention tab
            tab = next(c["id"] for c in config["components"]
                       if c.get("type") == "tabitem" and c.get("props", {}).get("id") == view)
            sel = next(d for d in config["dependencies"]
                       if d.get("backend_fn") and [tab, "select"] in [list(t) for t in d["targets"]])

            def pick() -> None:
                pc.submit(sel, pc.inputs(sel, **{slider: value}), trigger=tab)
                for d in pc.then_of(sel):
                    pc.submit(d, pc.inputs(d, **{slider: value}), trigger=tab)
            timed("tab", pick)
        background = _Background(PageClient(url, config=config, session_hash=pc.session_hash, timeout=timeout),
                                 {"heavy": heavy, "release": release}, out, timeout)
    except Exception as e:  # noqa: BLE001 - a client that cannot start is an error of the run
        setup_errors.append(f"client {index}: {type(e).__name__}: {e}")
    try:
        start.wait(timeout + 5)
    except threading.BrokenBarrierError:
        setup_errors.append(f"client {index}: the clients did not all start within {timeout + 5:.0f} s")
        return
    if pc is None or change is None:
        return
    try:
        next_tick = time.monotonic() + rng.uniform(0, timer_every) if timer_every else float("inf")
        n = 0
        while time.monotonic() < clock["end"] and counter.take():
            n += 1
            k = rng.randint(-3, 3) or 1
            value = min(hi, max(lo, round(value + k * step, 6)))
            data = pc.inputs(change, **{slider: value})

            def move() -> list:
                outputs = pc.run(change, data)
                if not (isinstance(outputs[0], str) and ('id="vs-flops"' in outputs[0]
                                                         or 'id="vs-budget-error"' in outputs[0])):
                    raise PageError(f"the readout is not a plan: {str(outputs[0])[:120]}")
                pc.fetch_files(outputs)
                return outputs
            outputs = timed("slider", move)
            if outputs and isinstance(outputs[-1], str):  # the live answer asks for the heavy views
                background.send("heavy", pc.inputs(heavy, **{slider: value}))
            if drag and n % drag == 0:
                background.send("release", pc.inputs(release, **{slider: value}))
            if time.monotonic() >= next_tick:
                next_tick += timer_every
                timed("timer", lambda: pc.run(timer, pc.inputs(timer), trigger=timer["targets"][0][0]))
    except Exception as e:  # noqa: BLE001
        setup_errors.append(f"client {index}: {type(e).__name__}: {e}")
    finally:
        if background is not None:
            background.close()
        pc.close()


class RequestBudget:
    """A thread-safe budget of requests (``limit`` None: unlimited); ``count`` is per calling thread."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()
        self._local = threading.local()

    def take(self) -> bool:
        with self._lock:
            if self.limit is not None and self.used >= self.limit:
                return False
            self.used += 1
        self._local.n = getattr(self._local, "n", 0) + 1
        return True

    @property
    def count(self) -> int:
        return getattr(self._local, "n", 0)


def slider_load(url: str, clients: int = 16, seconds: float = 10.0, updates: int | None = None,
                views: Sequence[str] | None = LIVE_VIEWS, drag: int = 5, timer_every: float = 2.0,
                seed: int = 0, timeout: float = 60.0, lowest: float = 0.1) -> LoadResult:
    """``clients`` threads, each one page of the app at ``url`` dragging the FLOPs slider to random
    budgets on the slider's grid, for ``seconds`` (and at most ``updates`` slider moves in all).

    Each page first selects its tab (``views[i % len(views)]``; None: all stay on the first tab; a
    "tab" record); when all have, the clock starts and each sends the slider's change event and loads
    the images it returns (one "slider" record), then, in the background as the page does, the heavy
    views when the answer asks for them (tabs that have any; a "heavy" record: the server draws them once
    the page's budget stays put, so during a drag most are answered with skips) and every ``drag`` moves
    the release event (a "release" record), and polls the job line every ``timer_every`` seconds.
    Budgets below ``lowest`` are not sent. Bounded: every
    client stops at ``seconds`` plus the ``timeout`` of a request in flight.
    """
    import httpx
    config = httpx.get(url.rstrip("/") + "/config", timeout=timeout).raise_for_status().json()
    comps = {c["id"]: c for c in config["components"]}
    props = next(c["props"] for c in comps.values() if c.get("props", {}).get("elem_id") == "vs-flops-slider")
    budget = (max(lowest, float(props.get("minimum", 0.0))), float(props.get("maximum", 1.0)),
              float(props.get("step") or 0.01))
    res = LoadResult(clients=clients, seconds=seconds)
    counter = RequestBudget(updates)
    clock = {"t0": 0.0, "end": 0.0}

    def go() -> None:  # runs once, when every client has picked its tab
        clock["t0"] = time.monotonic()
        clock["end"] = clock["t0"] + seconds
    start = threading.Barrier(clients, action=go)
    threads = [threading.Thread(target=_client_loop, name=f"load-client-{i}", daemon=True,
                                args=(url, config, i, views[i % len(views)] if views else None, clock, start, budget,
                                      drag, counter, res.records, res.setup_errors, timer_every, seed, timeout))
               for i in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds + 3 * timeout + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    t0 = clock["t0"] or time.monotonic()
    res.seconds = max(1e-9, min(time.monotonic(), clock["end"] or time.monotonic()) - t0) if updates is None \
        else time.monotonic() - t0
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        res.setup_errors.append(f"{len(alive)} clients still running after the time limit")
    return res
