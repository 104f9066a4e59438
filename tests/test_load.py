"""The launched app under many pages at once (the short, bounded form of ``benchmarks/bench_load.py``).

Errors and leaks only: latency is not asserted (shared, noisy CI machines); the benchmark reports it.
"""
from __future__ import annotations

import gc
import os
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("VITSLIM_NO_PROGRESS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

pytest.importorskip("gradio")
pytest.importorskip("httpx")

from app_harness import PageClient, launch_for_tests, run_for_tests, slider_load  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run = run_for_tests(tmp_path_factory.getbasetemp())
    demo, url = launch_for_tests(run, tmp_path_factory.mktemp("load-workdir"))
    try:
        yield demo, url
    finally:
        demo.close()


def _figures() -> int:
    import warnings

    from matplotlib.figure import Figure
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on every object touches deprecated module attributes
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, Figure))


def test_sixteen_pages_dragging_get_only_valid_answers(served):
    _, url = served
    # every tab but Scores (its release draws a matplotlib figure of ~1 s: the memory test covers it)
    res = slider_load(url, clients=16, seconds=4, drag=3, timer_every=1.0,
                      views=("attention", "mlp", "tokens", "image", "layers"))
    assert not res.errors(), res.errors()[:5]
    assert len(res.of("slider")) >= 16  # every move was answered with a plan and loadable images
    assert res.of("timer")
    assert all(not r.error for r in res.records)


def test_slider_answers_only_the_views_on_screen(served):
    """Skipped outputs come back as bare updates (cheap), the tab's map as an image file."""
    _, url = served
    with PageClient(url) as pc:
        dep = pc.dependency("vs-flops-slider", "change")
        out = pc.run(dep, pc.inputs(dep, **{"vs-flops-slider": 0.5}))
        assert 'id="vs-flops"' in out[0]
        assert out[1]["meta"]["_type"] == "gradio.FileData" and pc.fetch_files(out) > 0
        assert out[2:] == [{"__type__": "update"}] * (len(out) - 2)
        release = pc.dependency("vs-flops-slider", "release")
        assert pc.submit(release, pc.inputs(release, **{"vs-flops-slider": 0.5})) == [{"__type__": "update"}] * 4


def test_no_memory_or_figure_leak(served):
    """RSS after many slider updates (scores tab included: matplotlib figures on release) stays close to
    RSS after a few, and no figure outlives its request."""
    psutil = pytest.importorskip("psutil")
    import matplotlib.pyplot as plt
    _, url = served
    proc = psutil.Process(os.getpid())
    figures0 = _figures()
    first = slider_load(url, clients=6, seconds=120, updates=20, drag=5, timer_every=0, seed=1)
    assert not first.errors(), first.errors()[:5]
    gc.collect()
    rss_a = proc.memory_info().rss
    more = slider_load(url, clients=6, seconds=120, updates=100, drag=10, timer_every=0, seed=2)
    assert not more.errors(), more.errors()[:5]
    assert more.of("release")
    gc.collect()
    rss_b = proc.memory_info().rss
    assert rss_b <= rss_a * 1.15 + 30 * 2**20, (rss_a / 2**20, rss_b / 2**20)
    assert plt.get_fignums() == []
    assert _figures() <= figures0


def test_queue_is_bounded(served):
    from vitslim_app.ui import MAX_QUEUE
    demo, _ = served
    assert demo._queue.max_size == MAX_QUEUE


def test_background_work_yields_to_interactive_requests():
    from vitslim_app.jobs import Activity
    act = Activity(linger=0.0)
    assert act.wait_quiet(1.0) < 0.1  # nobody interactive: no wait
    entered, release = threading.Event(), threading.Event()

    def slider() -> None:
        with act.interactive():
            entered.set()
            release.wait(5)
    t = threading.Thread(target=slider)
    t.start()
    assert entered.wait(5)
    assert act.busy()
    t0 = time.monotonic()
    assert act.wait_quiet(0.3) >= 0.25  # waits while a request is served, but never longer than asked
    threading.Timer(0.1, release.set).start()
    assert act.wait_quiet(5.0) < 2.0  # and goes on as soon as it is done
    t.join(5)
    assert time.monotonic() - t0 < 5
