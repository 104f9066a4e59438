"""The tutorials in notebooks/ run top to bottom in fast mode (VITSLIM_FAST=1) and draw their figures.

Each notebook is executed with nbclient in a fresh kernel whose working directory is notebooks/ and
whose environment has ``VITSLIM_FAST=1``, ``MPLBACKEND=Agg`` and the repository on ``PYTHONPATH``.
The committed files must carry no outputs (they are stripped before saving). Notebooks 01 and 03 take the
run as a parameter (default: the bundled Fashion-MNIST run when its data set is installed, else the digits
demo); they also run on the other bundled run here.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["01_what_vit_slim_does.ipynb", "02_search_yourself.ipynb", "03_slim_retrain_measure.ipynb",
            "04_scaling_up.ipynb", "05_does_it_work.ipynb"]
RUN_PARAMETER = [NB_DIR / "01_what_vit_slim_does.ipynb", NB_DIR / "03_slim_retrain_measure.ipynb"]
CELL_TIMEOUT_S = 600
TIMINGS: dict[str, float] = {}


def kernel_env(run: Path | None, tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp)  # the notebooks' temporary run folders (hundreds of MB for DeiT-S) go here
    env.update(VITSLIM_FAST="1", MPLBACKEND="Agg", VITSLIM_NO_PROGRESS="1", PYTHONUNBUFFERED="1",
               GRADIO_ANALYTICS_ENABLED="False")
    # tiny models on a shared 2-core machine: one thread avoids OpenMP threads waiting on each other
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if run is not None:
        env["VITSLIM_RUN"] = str(run)
    return env


@pytest.fixture(scope="session")
def tutorial_run(tmp_path_factory) -> Path | None:
    """None when the bundled demo exists (the notebooks' default); else a quick run to stand in for it."""
    from app_harness import bundled_demo, run_for_tests
    if os.environ.get("VITSLIM_TEST_RUN"):
        return Path(os.environ["VITSLIM_TEST_RUN"])
    return None if bundled_demo() else run_for_tests(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def other_run(tmp_path_factory) -> Path:
    """The bundled run the notebooks do not open by default here: the digits demo when they open the
    Fashion-MNIST run, else a Fashion-MNIST run (the bundled one, or a quick stand-in, evaluated on the
    real data set, which it needs)."""
    from app_harness import build_quick_fashion_run, bundled_demo, bundled_fashion, fashion_installed, run_for_tests
    from vitslim_app.runs import default_run
    from vitslim_core.demo import FASHION_DIR
    if default_run(NB_DIR / "data") == FASHION_DIR.resolve():  # the kernel runs in notebooks/
        return bundled_demo() or run_for_tests(tmp_path_factory.getbasetemp())
    if not fashion_installed():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return bundled_fashion() or build_quick_fashion_run(tmp_path_factory.getbasetemp() / "quick-fashion-run")


def test_the_five_tutorials_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_stripped_and_parametrised(path):
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "starts with a title"
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 5, "a tutorial explains itself"
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and "VITSLIM_FAST" in tagged[0].source
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"outputs not stripped: {c.source[:60]!r}"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("path", RUN_PARAMETER, ids=lambda p: p.stem)
def test_the_run_is_a_parameter_with_the_bundled_default(path):
    nb = nbformat.read(str(path), as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    assert "\nRUN = None" in params.source, "RUN is a parameter (None: the bundled default)"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert 'os.environ.get("VITSLIM_RUN") or' in code and "default_run()" in code
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "Fashion-MNIST" in text and "digits demo" in text and "dataset-fashion-mnist" in text


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode_and_draws_figures(path, tutorial_run, tmp_path):
    execute_and_check(path, tutorial_run, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("path", RUN_PARAMETER, ids=lambda p: p.stem)
def test_notebook_runs_on_the_other_bundled_run(path, other_run, tmp_path):
    from vitslim_core.scores import MaskScores
    nb = execute_and_check(path, other_run, tmp_path, key=f"{path.name} on {other_run.name}")
    out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert str(other_run) in out
    if MaskScores.load(other_run).meta["data"]["name"] == "fashion-mnist":
        assert "1000 test images" in out  # fast mode: a subset of the 10,000


def execute_and_check(path: Path, run: Path | None, tmp_path: Path, key: str | None = None):
    """Run a notebook in fast mode on ``run`` (None: its default); check errors and figures; return it."""
    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NB_DIR)}})
    tmp = tmp_path / "kernel-tmp"
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        client.execute(env=kernel_env(run, tmp), cwd=str(NB_DIR))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    key = key or path.name
    TIMINGS[key] = time.perf_counter() - t0
    print(f"{key}: {TIMINGS[key]:.1f} s in fast mode")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    pngs = [c for c in nb.cells if c.cell_type == "code"
            if any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert pngs, f"{path.name} drew no figure"
    # every cell that draws (viz figures or images) produced a picture, not a text repr of a Figure
    for c in nb.cells:
        if c.cell_type == "code":
            for o in c.outputs:
                text = o.get("data", {}).get("text/plain", "")
                assert "<Figure size" not in text or "image/png" in o.get("data", {}), \
                    f"a figure was shown as text in: {c.source[:60]!r}"
    return nb
