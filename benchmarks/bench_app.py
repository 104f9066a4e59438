"""How responsive is the exploration app? Prints one table (medians; nothing here is a test).

1. server side: the budget slider callback (plan + every live view) on a DeiT-B-sized score file
   (12 layers, 12 heads x 64 dims, 3072 MLP units, 196 patches, random scores) and on the demo run,
   alone and with Gradio's postprocessing (PNG encoding of the images, the table);
2. in the browser (Playwright + chromium): from a slider key press to the FLOPs readout changing;
3. start-up: ``vitslim app RUN`` until the page answers, and until its views are filled in.

Usage: PYTHONPATH=. python benchmarks/bench_app.py [--run RUN] [--moves 30] [--skip-browser] [--skip-startup]
           [--startup-runs 3] [--baseline DIR] [--only-startup]
``--baseline DIR``: also time the start-up of another source tree (e.g. ``git worktree add DIR HEAD~3``),
in turns with this one, for a before/after comparison on the same load.
Targets: slider callback <= 100 ms (DeiT-B), browser <= 300 ms (demo), HTTP 200 and maps <= 10 s (2 cores).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("VITSLIM_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # app_harness: the test harness the benchmarks share


def stats(ms: list[float]) -> tuple[float, float, float]:
    s = sorted(ms)
    return statistics.median(s), s[min(len(s) - 1, int(0.9 * (len(s) - 1) + 0.5))], s[-1]


def deit_b_run(folder: Path) -> Path:
    """A scores-only run folder with DeiT-B's shape and random scores (built on the meta device)."""
    import timm
    import torch

    from vitslim_core import MaskScores, arch_spec
    with torch.device("meta"):
        model = timm.create_model("deit_base_patch16_224")
    sc = MaskScores.dense(arch_spec(model, model_name="deit_base_patch16_224"),
                          meta={"model": {"name": "deit_base_patch16_224", "kwargs": {}},
                                "data": {"name": "imagenet", "input_size": [3, 224, 224], "mean": [0.485, 0.456, 0.406],
                                         "std": [0.229, 0.224, 0.225]}})
    g = torch.Generator().manual_seed(0)
    sc.attn = [torch.rand(v.shape, generator=g) for v in sc.attn]
    sc.mlp = [torch.rand(v.shape, generator=g) for v in sc.mlp]
    sc.token = [6 * torch.rand(v.shape, generator=g) - 3 for v in sc.token]
    sc.validate()
    sc.save(folder / "scores.safetensors")
    return folder


def bench_callback(run: Path, workdir: Path, moves: int) -> dict[str, tuple]:
    """Median/p90/max ms of the slider callback: all views, and the views of one tab (what the app
    redraws while that tab is on screen), each alone and with Gradio's postprocessing (PNG encoding)."""
    import numpy as np

    import gradio as gr
    from vitslim_app.explorer import Explorer
    from vitslim_app.ui import LiveImage
    ex = Explorer([run], workdir)
    key = ex.registry.default_key()
    try:
        image = ex.image_for(ex.run(key), None)
    except Exception:  # noqa: BLE001 - a run without samples still gets the map views timed
        image = None
    rng = np.random.default_rng(0)
    budgets = [round(float(v), 2) for v in rng.uniform(0.3, 0.95, moves)]
    ex.budget_views(key, "flops", 0.6, 1, 1, 1, 0, False, image)  # first call: removal order, caches
    comps = [gr.HTML()] + [LiveImage() for _ in range(5)] + [gr.HTML()] + [LiveImage() for _ in range(2)]
    out: dict[str, tuple] = {}
    for view in ("all", "attention", "mlp", "tokens", "image", "layers"):
        plain, full = [], []
        for b in budgets:
            t = time.perf_counter()
            res = ex.budget_views(key, "flops", b, 1, 1, 1, 3, False, image, view)
            t1 = time.perf_counter()
            for c, v in zip(comps, res):
                if not (isinstance(v, dict) and v.get("__type__") == "update"):
                    c.postprocess(v)
            t2 = time.perf_counter()
            plain.append(1e3 * (t1 - t))
            full.append(1e3 * (t2 - t))
        name = "all views" if view == "all" else f"{view} tab on screen"
        out[f"slider callback, {name}"] = stats(plain)
        out[f"  + PNG encoding, {name}"] = stats(full)
    return out


def bench_browser(run: Path, workdir: Path, moves: int) -> dict[str, tuple]:
    """Key press on the FLOPs slider -> FLOPs readout updated, in chromium."""
    from playwright.sync_api import sync_playwright

    from vitslim_app.explorer import Explorer
    from vitslim_app.jobs import RetrainJob
    from app_harness import CHROMIUM_ARGS, free_port
    from vitslim_app.ui import build_app, launch_app
    demo = build_app(explorer=Explorer([run], workdir, job=RetrainJob()))
    port = free_port()
    launch_app(demo, port=port, quiet=True, prevent_thread_lock=True)
    demo.explorer.warm_up()
    out: dict[str, tuple] = {}
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("() => document.querySelector('#vs-ready')?.textContent.includes('ready')")
            # the moment the FLOPs text differs from what it was at the key press
            page.evaluate("""() => {
                window.__t1 = null;
                const el = document.querySelector('#vs-readout');
                new MutationObserver(() => {
                  const f = document.querySelector('#vs-flops');
                  if (window.__t0 && window.__t1 === null && f && f.innerText !== window.__text)
                    window.__t1 = performance.now();
                }).observe(el, {subtree: true, childList: true, characterData: true, attributes: true});
            }""")
            page.get_by_role("tab", name="Tokens", exact=True).click()
            page.wait_for_selector("#vs-token-grid img")
            rng = page.locator("#vs-flops-slider input[type=range]")
            rng.focus()
            readout, grid = [], []
            for i in range(moves):
                key = "ArrowLeft" if (i // 10) % 2 == 0 else "ArrowRight"
                src = page.get_attribute("#vs-token-grid img", "src")
                page.evaluate("() => { window.__t1 = null; window.__text = document.querySelector('#vs-flops').innerText;"
                              " window.__t0 = performance.now(); }")
                rng.press(key)
                page.wait_for_function("() => window.__t1 !== null")
                page.wait_for_function("(s) => { const i = document.querySelector('#vs-token-grid img');"
                                       " return i.getAttribute('src') !== s && i.complete && i.naturalWidth > 0; }",
                                       arg=src, polling="raf")
                t_grid = page.evaluate("() => performance.now()")
                t0, t1 = page.evaluate("() => [window.__t0, window.__t1]")
                readout.append(t1 - t0)
                grid.append(t_grid - t0)
                time.sleep(0.25)
            out["browser: key -> readout"] = stats(readout)
            out["browser: key -> token grid image loaded"] = stats(grid)
            b.close()
    finally:
        demo.close()
    return out


def source_dir(root: Path, tmp: Path) -> Path:
    """A folder from which ``vitslim_core`` and ``vitslim_app`` import from the source tree ``root`` (the
    app's folder is ``app/``: an installed checkout maps it, a plain copy of another commit does not)."""
    shim = tmp / f"src-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"
    shim.mkdir(parents=True, exist_ok=True)
    for name, target in (("vitslim_core", root / "vitslim_core"), ("vitslim_app", root / "app")):
        link = shim / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return shim


def startup_once(run: Path | None, workdir: Path, source: Path, browser) -> dict[str, float]:
    """Seconds from ``python -m vitslim_core app`` (run from ``source``, see ``source_dir``) to the page
    answering (HTTP 200), to its maps on screen and to the end of its load chain, in a browser started
    beforehand (not counted)."""
    from app_harness import free_port
    port = free_port()
    cmd = [sys.executable, "-m", "vitslim_core", "app", "--no-browser", "--port", str(port), "--workdir",
           str(workdir)] + ([str(run)] if run else [])
    env = {**os.environ, "PYTHONPATH": str(source)}
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=source, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                    if r.status == 200:
                        out["http"] = time.perf_counter() - t0
                        break
            except OSError:
                time.sleep(0.05)
        if out and browser is not None:
            pg = browser.new_page()
            pg.set_default_timeout(120_000)
            pg.goto(f"http://127.0.0.1:{port}/")
            pg.wait_for_selector("#vs-attn-map img")
            pg.wait_for_function("() => { const i = document.querySelector('#vs-attn-map img');"
                                 " return i && i.complete && i.naturalWidth > 0; }", polling="raf")
            out["maps"] = time.perf_counter() - t0
            pg.wait_for_function("() => document.querySelector('#vs-ready')?.textContent.includes('ready')")
            out["ready"] = time.perf_counter() - t0
            pg.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def bench_startup(run: Path | None, workdir: Path, runs: int = 3,
                  trees: dict[str, Path] | None = None) -> dict[str, dict[str, tuple]]:
    """Start-up of ``vitslim app`` (see ``startup_once``), ``runs`` times per source tree (default:
    this checkout; ``trees`` maps names to other source trees, measured in turns with it so that they
    share the machine's load). Returns {tree: {row: (median, p90, max)}}."""
    trees = trees or {"this checkout": ROOT}
    paths = {name: source_dir(Path(root).resolve(), workdir) for name, root in trees.items()}
    pw = browser = None
    if shutil.which("chromium"):
        from playwright.sync_api import sync_playwright

        from app_harness import CHROMIUM_ARGS
        pw = sync_playwright().start()
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
    seen: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    try:
        for i in range(runs):
            for name in trees:
                for k, v in startup_once(run, workdir / f"{i}-{len(seen[name])}", paths[name], browser).items():
                    seen[name].setdefault(k, []).append(v)
    finally:
        if browser is not None:
            browser.close()
            pw.stop()
    labels = {"http": "startup: `vitslim app` -> HTTP 200 (s)", "maps": "startup: -> page with maps shown (s)",
              "ready": "startup: -> page fully loaded (s)"}
    return {name: {f"{labels[k]} [{len(v)} runs]": stats(v) for k, v in res.items()} for name, res in seen.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="run folder for the demo rows (default: the bundled demo, else a quick run)")
    ap.add_argument("--moves", type=int, default=30, help="slider moves per measurement")
    ap.add_argument("--skip-browser", action="store_true")
    ap.add_argument("--skip-startup", action="store_true")
    ap.add_argument("--only-startup", action="store_true", help="measure the start-up only")
    ap.add_argument("--startup-runs", type=int, default=3, help="start-ups per source tree (median reported)")
    ap.add_argument("--baseline", help="another source tree whose start-up is timed in turns with this one")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from app_harness import run_for_tests
    tmp = Path(tempfile.mkdtemp(prefix="vitslim-bench-app-"))
    try:
        demo_run = Path(a.run) if a.run else run_for_tests(tmp)
        rows: list[tuple[str, str, tuple]] = []
        if not a.only_startup:
            deit = deit_b_run(tmp / "deit-b")
            for name, res in (("DeiT-B scores", bench_callback(deit, tmp / "wd1", a.moves)),
                              (f"demo ({demo_run.name})", bench_callback(demo_run, tmp / "wd2", a.moves))):
                rows += [(name, k, v) for k, v in res.items()]
            if not a.skip_browser and shutil.which("chromium"):
                rows += [(f"demo ({demo_run.name})", k, v)
                         for k, v in bench_browser(demo_run, tmp / "wd3", a.moves).items()]
        if not a.skip_startup or a.only_startup:
            trees = {"this checkout": ROOT}
            if a.baseline:
                trees[f"baseline {Path(a.baseline).name}"] = Path(a.baseline)
            for tree, res in bench_startup(demo_run, tmp / "wd4", a.startup_runs, trees).items():
                rows += [(f"demo, {tree}" if a.baseline else f"demo ({demo_run.name})", k, v) for k, v in res.items()]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        print(f"{'run':<{w0}}  {'measurement':<{w1}}  {'median':>9}  {'p90':>9}  {'max':>9}")
        for run, what, values in rows:
            unit, digits = ("", 2) if "(s)" in what else (" ms", 1)
            cells = "  ".join(f"{v:>6.{digits}f}{unit:3}" for v in values)
            print(f"{run:<{w0}}  {what:<{w1}}  {cells}")
        print(f"(torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average "
              f"{', '.join(f'{v:.1f}' for v in os.getloadavg())})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
