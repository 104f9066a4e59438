"""The app in a real browser (Python Playwright driving Debian's chromium); skipped without chromium."""
from __future__ import annotations

import os
import re
import shutil

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("VITSLIM_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from app_harness import CHROMIUM_ARGS, launch_for_tests, run_for_tests  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)

T = 60_000  # ms: upper bound of every wait for the page (the machine may be busy)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    run = run_for_tests(tmp_path_factory.getbasetemp())
    demo, url = launch_for_tests(run, tmp_path_factory.mktemp("browser-workdir"))
    demo.explorer.warm_up()
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, app_url):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(T)
    external: list[str] = []

    def offline(route):  # the app must not need the internet
        url = route.request.url
        if url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            external.append(url)
            route.abort()
    pg.route("**/*", offline)
    pg.external_requests = external
    yield pg
    ctx.close()


def open_app(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#vs-flops .vs-v")
    # wait for the end of the load chain (samples, prediction, plots) so later events do not race it
    page.wait_for_function("() => document.querySelector('#vs-ready')?.textContent.includes('ready')", timeout=T)


def flops_text(page) -> str:
    return page.inner_text("#vs-flops")


def set_flops(page, value: float) -> None:
    box = page.locator("#vs-flops-slider input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def test_page_loads_offline(page, app_url):
    open_app(page, app_url)
    assert "ViT-Slim explorer" in page.title() or page.locator("#vs-header").count() == 1
    assert "% of" in flops_text(page)
    assert page.locator("#vs-attn-map img").count() == 1
    for name in ("Attention", "MLP", "Tokens", "Image", "Layers", "Scores", "History", "Accuracy", "Retrain",
                 "Export"):
        assert page.get_by_role("tab", name=name, exact=True).count() == 1
    # the search history figure is drawn when its tab is selected
    open_tab(page, "History")
    page.locator("#vs-history img").wait_for()


def test_flops_slider_updates_readout_and_token_grid(page, app_url):
    open_app(page, app_url)
    open_tab(page, "Tokens")
    grid = page.locator("#vs-token-grid img")
    grid.wait_for()
    before_text, before_src = flops_text(page), grid.get_attribute("src")
    # drag with the keyboard on the range input, like a user nudging the slider
    rng = page.locator("#vs-flops-slider input[type=range]")
    rng.focus()
    for _ in range(20):
        rng.press("ArrowLeft")
    page.wait_for_function("(t) => document.querySelector('#vs-flops').innerText !== t", arg=before_text)
    page.wait_for_function("(s) => document.querySelector('#vs-token-grid img').getAttribute('src') !== s",
                           arg=before_src)
    assert re.search(r"4\d\.\d%", flops_text(page))  # 0.60 - 20 x 0.01 = 0.40
    assert "flops=0.4" in page.url  # the budget is in the URL, so the state can be shared


def test_url_state_is_restored(page, app_url):
    page.goto(app_url + "?flops=0.35&view=tokens")
    page.wait_for_selector("#vs-flops .vs-v")
    # the solver's nearest plan is within 0.5% of the target (34.9% on the bundled demo)
    page.wait_for_function("() => { const m = /([0-9.]+)%/.exec(document.querySelector('#vs-flops').innerText);"
                           " return m && Math.abs(parseFloat(m[1]) - 35) < 0.6; }", timeout=T)
    selected = page.locator("button[role=tab][aria-selected=true]")
    assert selected.inner_text().strip() == "Tokens"
    assert page.locator("#vs-flops-slider input[type=number]").input_value() == "0.35"
    page.get_by_role("tab", name="Layers", exact=True).click()
    page.wait_for_function("() => location.search.includes('view=layers')")


def test_ratio_mode(page, app_url):
    open_app(page, app_url)
    page.get_by_label("per-dimension ratios").check()
    page.locator("#vs-mlp-slider").wait_for(state="visible")
    # the mode switch redraws the readouts (all ratios at 1) in its own event: let it land first,
    # or it could be taken for the answer to the slider below
    page.wait_for_function("() => document.querySelector('#vs-mlp').innerText.includes('100% kept')", timeout=T)
    box = page.locator("#vs-mlp-slider input[type=number]")
    box.fill("0.3")
    box.press("Enter")
    page.wait_for_function("() => document.querySelector('#vs-mlp').innerText.includes('30% kept')", timeout=T)
    page.wait_for_function("() => location.search.includes('mode=ratios')")


def test_uploaded_image_shows_the_overlay(page, app_url, tmp_path):
    from PIL import Image
    open_app(page, app_url)
    open_tab(page, "Image")
    overlay = page.locator("#vs-overlay img")
    overlay.wait_for()
    before = overlay.get_attribute("src")
    src = tmp_path / "drawing.png"
    rgba = np.zeros((120, 90, 4), np.uint8)
    rgba[30:90, 40:50] = (0, 0, 0, 255)  # a "1" drawn on a transparent canvas
    Image.fromarray(rgba, "RGBA").save(src)
    page.set_input_files("#vs-img-upload input[type=file]", str(src))
    page.wait_for_function("() => document.querySelector('#vs-img-msg').innerText.includes('Using')")
    page.wait_for_function("(s) => document.querySelector('#vs-overlay img').getAttribute('src') !== s", arg=before)
    page.wait_for_function("() => document.querySelector('#vs-pred-md').innerText.includes('your image')")


def test_bad_inputs_show_messages_and_the_app_keeps_working(page, app_url, tmp_path):
    open_app(page, app_url)
    # a corrupt score file
    bad = tmp_path / "scores.safetensors"
    bad.write_bytes(b"definitely not safetensors")
    page.get_by_text("open your own score file").click()
    page.set_input_files("#vs-run-upload input[type=file]", str(bad))
    page.wait_for_function("() => document.querySelector('#vs-run-msg').innerText.includes('Upload rejected')")
    # a text file posing as an image
    open_tab(page, "Image")
    fake = tmp_path / "photo.png"
    fake.write_text("this is text")
    page.set_input_files("#vs-img-upload input[type=file]", str(fake))
    page.wait_for_function("() => document.querySelector('#vs-img-msg').innerText.includes('Image rejected')")
    # still alive: the budget slider still drives the readout
    before = flops_text(page)
    set_flops(page, 0.45)
    page.wait_for_function("(t) => document.querySelector('#vs-flops').innerText !== t", arg=before)
    # an impossible budget (the slider's end: nothing left) is explained in the page
    set_flops(page, 0)
    page.wait_for_selector("#vs-budget-error")


def _start_job(page, epochs: int, max_steps: int) -> None:
    open_tab(page, "Retrain")
    page.locator("#vs-epochs input").fill(str(epochs))
    page.get_by_text("advanced", exact=True).click()
    page.locator("#vs-max-steps input").fill(str(max_steps))
    page.locator("#vs-start-btn").click()


def test_retrain_runs_shows_progress_and_offers_the_download(page, app_url):
    open_app(page, app_url)
    _start_job(page, epochs=1, max_steps=3)
    page.wait_for_function(
        "() => /running|starting|packaging|finished/.test(document.querySelector('#vs-job-md').innerText)")
    page.wait_for_function("() => document.querySelector('#vs-job-md').innerText.includes('finished')",
                           timeout=240_000)
    page.locator("#vs-job-files a[download$='.zip']").first.wait_for()
    assert page.locator("#vs-job-plot img, #vs-job-plot svg, #vs-job-plot canvas").count() >= 1


def test_stop_cancels_a_running_job_and_others_see_it_is_busy(page, browser, app_url):
    open_app(page, app_url)
    _start_job(page, epochs=50, max_steps=0)
    page.wait_for_function("() => /step [1-9]/.test(document.querySelector('#vs-job-md').innerText)",
                           timeout=120_000)
    # a second user: the status line says busy, and Start says so instead of queueing a second job
    other = browser.new_context().new_page()
    other.set_default_timeout(T)
    try:
        open_app(other, app_url)
        open_tab(other, "Retrain")
        other.wait_for_function("() => document.querySelector('#vs-job-line').innerText.includes('busy')")
        other.locator("#vs-start-btn").click()
        other.wait_for_function("() => document.querySelector('#vs-job-md').innerText.includes('Busy')")
    finally:
        other.context.close()
    page.locator("#vs-stop-btn").click()
    page.wait_for_function("() => document.querySelector('#vs-stop-md').innerText.includes('Stopping')")
    page.wait_for_function("() => document.querySelector('#vs-job-md').innerText.includes('stopped early')",
                           timeout=240_000)
    txt = page.inner_text("#vs-job-md")
    step = int(re.search(r"after (\d+) steps", txt).group(1))
    assert step < 50 * 22  # far from the end of 50 epochs


# ====================================================================== every view at the same budget
# The readout carries the budget it shows (data-stamp: FLOPs and kept counts); the views drawn apart from
# it (the Scores and Accuracy figures, the prediction) name the budget they were drawn for.
HEAVY_MARKERS = {"Scores": "#vs-hist-plot label[data-testid=block-label]",
                 "Accuracy": "#vs-acc-plot label[data-testid=block-label]",
                 "Image": "#vs-pred-md"}
LIVE_MAPS = {"Scores": "#vs-hist img", "Image": "#vs-strip img"}  # live maps that change with every big move


def readout_stamp(page) -> str:
    return page.get_attribute("#vs-readout .vs-readout", "data-stamp") or ""


def wait_views_agree(page, tab: str, old: str | None = None, flops_pct: float | None = None) -> str:
    """Wait (bounded) until the readout shows a budget other than ``old`` and the heavy view of ``tab``
    names the same budget; ``flops_pct``: the readout must also show about that FLOPs percentage (the
    number the controls ask for, so the readout is not stale either). Returns the stamp."""
    page.wait_for_function(
        """([sel, old, pct]) => {
             const r = document.querySelector('#vs-readout .vs-readout');
             const h = document.querySelector(sel);
             if (!r || !h) return false;
             const s = r.dataset.stamp || '';
             if (!s || s === old || !h.textContent.includes(s)) return false;
             return pct === null || Math.abs(parseFloat(s) - pct) < 0.6;
           }""", arg=[HEAVY_MARKERS[tab], old, flops_pct], timeout=T)
    stamp = readout_stamp(page)
    # the readout's own cards say the same numbers as its stamp
    dims = re.search(r"(\d+/\d+) attention dims", stamp).group(1)
    assert dims in page.inner_text("#vs-dims")
    return stamp


@pytest.mark.parametrize("tab", ["Scores", "Accuracy", "Image"])
def test_keys_and_typed_budgets_leave_every_view_at_that_budget(page, app_url, tab):
    """Arrow keys, PageUp/PageDown and a typed number (Enter, no blur: no release event) move the budget:
    the readout, the tab's map and its heavy view all end at the new budget."""
    open_app(page, app_url)
    open_tab(page, tab)
    stamp = wait_views_agree(page, tab)
    rng = page.locator("#vs-flops-slider input[type=range]")
    box = page.locator("#vs-flops-slider input[type=number]")

    def moved(action, big: bool, pct=None) -> None:
        nonlocal stamp
        src = page.get_attribute(LIVE_MAPS[tab], "src") if big and tab in LIVE_MAPS else None
        action()
        stamp = wait_views_agree(page, tab, old=stamp,
                                 flops_pct=pct if pct is not None else 100 * float(box.input_value()))
        if src is not None:  # the live map came with the readout
            page.wait_for_function("([sel, s]) => document.querySelector(sel).getAttribute('src') !== s",
                                   arg=[LIVE_MAPS[tab], src], timeout=T)

    def keys(*names):
        def press():
            rng.focus()
            for k in names:
                rng.press(k)
        return press

    def typed(text):
        def type_it():
            box.fill(text)
            box.press("Enter")
        return type_it
    moved(keys("ArrowRight", "ArrowRight", "ArrowRight"), big=False)
    moved(keys("ArrowLeft"), big=False)
    moved(keys("PageDown"), big=True)
    moved(keys("PageUp", "PageUp"), big=True)
    moved(typed("0.45"), big=True, pct=45)
    moved(typed("0.72"), big=True, pct=72)
    assert "flops=0.72" in page.url


def test_url_mode_switch_and_ratio_sliders_leave_every_view_at_that_budget(page, app_url):
    page.goto(app_url + "?flops=0.37&view=scores")
    page.wait_for_selector("#vs-flops .vs-v")
    stamp = wait_views_agree(page, "Scores", flops_pct=37)
    page.get_by_label("per-dimension ratios").check()
    stamp = wait_views_agree(page, "Scores", old=stamp, flops_pct=100)  # all ratios at 1: dense
    mlp = page.locator("#vs-mlp-slider input[type=number]")
    mlp.fill("0.3")
    mlp.press("Enter")
    stamp = wait_views_agree(page, "Scores", old=stamp)
    kept, total = map(int, re.search(r"(\d+)/(\d+) MLP units", stamp).groups())
    assert abs(kept / total - 0.3) < 0.05, stamp
    tok = page.locator("#vs-token-slider input[type=range]")
    tok.focus()
    for _ in range(4):
        tok.press("ArrowLeft")
    stamp = wait_views_agree(page, "Scores", old=stamp)
    page.get_by_label("FLOPs budget", exact=True).check()
    wait_views_agree(page, "Scores", old=stamp, flops_pct=37)


# ---------------------------------------------------------------------------- the two bundled runs
@pytest.fixture(scope="module")
def two_runs_url(tmp_path_factory):
    """The app with no runs named (both bundled runs, stood in for by test runs) and no Fashion-MNIST data."""
    from app_harness import fashion_run_for_tests, free_port
    from vitslim_app import runs as app_runs
    from vitslim_app.explorer import Explorer
    from vitslim_app.jobs import RetrainJob
    from vitslim_app.ui import build_app, launch_app
    from vitslim_core import demo as demo_mod, fashion
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo_mod, "DEMO_DIR", run_for_tests(base).resolve())
        mp.setattr(demo_mod, "FASHION_DIR", fashion_run_for_tests(base).resolve())
        mp.setattr(fashion, "DEBIAN_DIR", base / "no-debian-fashion")
        mp.setattr(app_runs, "DATA_ROOT", str(base / "no-data-root"))
        demo = build_app(explorer=Explorer(None, tmp_path_factory.mktemp("two-runs-workdir"), job=RetrainJob()))
        port = free_port()
        launch_app(demo, host="127.0.0.1", port=port, quiet=True, prevent_thread_lock=True)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()


def test_fashion_run_without_its_data_set_in_the_page(page, two_runs_url):
    open_app(page, two_runs_url)  # digits first: the data set is missing
    page.wait_for_function("() => document.querySelector('#vs-run-msg').innerText.includes('digits-vit')")
    open_app(page, two_runs_url + "?run=" + "Fashion-MNIST (bundled)".replace(" ", "%20") + "&view=image")
    page.wait_for_function("() => document.querySelector('#vs-run-msg').innerText.includes('fashion-vit')")
    page.wait_for_function("() => document.querySelectorAll('#vs-gallery img').length >= 10")  # one per class
    overlay = page.locator("#vs-overlay img")
    overlay.wait_for()
    before = overlay.get_attribute("src")
    page.locator("#vs-gallery img").nth(4).click()  # the coat
    page.wait_for_function("(s) => document.querySelector('#vs-overlay img').getAttribute('src') !== s", arg=before)
    page.wait_for_function("() => document.querySelector('#vs-pred-md').innerText.includes('Coat')")
    open_tab(page, "Accuracy")
    page.click("#vs-eval-btn")
    page.wait_for_function("() => document.querySelector('#vs-eval-md').innerText"
                           ".includes('apt-get install dataset-fashion-mnist')")
    assert not page.external_requests
