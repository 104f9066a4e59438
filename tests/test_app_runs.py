"""The two bundled runs in the app: both listed, which one opens first, and the Fashion-MNIST run without
its data set (evaluation and retraining say how to install it, everything else works from the bundled
sample images).

The bundled folders and the places Fashion-MNIST is looked for are monkeypatched
(``vitslim_core.demo.DEMO_DIR``/``FASHION_DIR``, ``vitslim_core.fashion.DEBIAN_DIR`` and the working
directory, which holds torchvision's ``data/FashionMNIST/raw``), so these tests mean the same with or
without the real bundled run and data set.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("VITSLIM_NO_PROGRESS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

gr = pytest.importorskip("gradio")

from app_harness import bundled_fashion, fashion_installed, fashion_run_for_tests, run_for_tests  # noqa: E402
from vitslim_app import runs as app_runs  # noqa: E402
from vitslim_app.explorer import Explorer  # noqa: E402
from vitslim_app.jobs import RetrainJob  # noqa: E402
from vitslim_core import demo, fashion  # noqa: E402
from vitslim_core.fashion import CLASS_NAMES, FILES  # noqa: E402

DIGITS_LABEL, FASHION_LABEL = "digits demo (bundled)", "Fashion-MNIST (bundled)"
INSTALL = "apt-get install dataset-fashion-mnist"


def skipped(v) -> bool:
    return isinstance(v, dict) and v == gr.skip()


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    return run_for_tests(tmp_path_factory.getbasetemp()).resolve()


@pytest.fixture(scope="session")
def fashion_run(tmp_path_factory) -> Path:
    return fashion_run_for_tests(tmp_path_factory.getbasetemp()).resolve()


@pytest.fixture()
def bundled(monkeypatch, digits_run, fashion_run) -> tuple[Path, Path]:
    """Both runs stand in as the bundled ones."""
    monkeypatch.setattr(demo, "DEMO_DIR", digits_run)
    monkeypatch.setattr(demo, "FASHION_DIR", fashion_run)
    return digits_run, fashion_run


@pytest.fixture()
def no_data(monkeypatch, tmp_path):
    """Fashion-MNIST is nowhere: not in Debian's folder, not under ./data."""
    monkeypatch.setattr(fashion, "DEBIAN_DIR", tmp_path / "no-debian-folder")
    monkeypatch.chdir(tmp_path)
    assert not app_runs.fashion_installed()


@pytest.fixture()
def with_data(monkeypatch, tmp_path):
    """Fashion-MNIST's four files are in (a stand-in for) Debian's folder (only their presence is checked)."""
    folder = tmp_path / "debian-fashion"
    folder.mkdir()
    for stem in FILES.values():
        (folder / f"{stem}.gz").write_bytes(b"")
    monkeypatch.setattr(fashion, "DEBIAN_DIR", folder)
    monkeypatch.chdir(tmp_path)
    assert app_runs.fashion_installed()


def budget(key: str, flops: float = 0.5) -> tuple:
    return (key, "flops", flops, 1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------- which runs, which first


def test_both_bundled_runs_are_listed_fashion_first_with_its_data_set(bundled, with_data, tmp_path):
    digits, fashion_dir = bundled
    ex = Explorer(None, tmp_path / "work", job=RetrainJob())
    assert ex.registry.startup_choices() == [(FASHION_LABEL, str(fashion_dir)), (DIGITS_LABEL, str(digits))]
    assert ex.registry.default_key() == str(fashion_dir)
    assert ex.run(None).label == FASHION_LABEL and ex.run(str(digits)).label == DIGITS_LABEL
    assert app_runs.default_run() == fashion_dir


def test_digits_stays_the_default_without_the_data_set(bundled, no_data, tmp_path):
    digits, fashion_dir = bundled
    ex = Explorer(None, tmp_path / "work", job=RetrainJob())
    assert ex.registry.startup_choices() == [(DIGITS_LABEL, str(digits)), (FASHION_LABEL, str(fashion_dir))]
    assert ex.registry.default_key() == str(digits)
    assert app_runs.default_run() == digits


def test_data_under_the_torchvision_root_counts_as_installed(bundled, monkeypatch, tmp_path):
    monkeypatch.setattr(fashion, "DEBIAN_DIR", tmp_path / "no-debian-folder")
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in list(FILES.values())[:3]:
        (raw / stem).write_bytes(b"")
    assert app_runs.default_run() == bundled[0]  # three of four files: not installed
    (raw / FILES["test_labels"]).write_bytes(b"")
    assert app_runs.default_run() == bundled[1]


def test_a_missing_fashion_folder_is_simply_not_listed(monkeypatch, digits_run, with_data, tmp_path):
    monkeypatch.setattr(demo, "DEMO_DIR", digits_run)
    monkeypatch.setattr(demo, "FASHION_DIR", tmp_path / "not-bundled")
    ex = Explorer(None, tmp_path / "work", job=RetrainJob())
    assert ex.registry.startup_choices() == [(DIGITS_LABEL, str(digits_run))]
    assert app_runs.default_run() == digits_run


def test_the_command_line_opens_both_runs(bundled, with_data):
    from vitslim_app.main import check_runs
    assert check_runs([]) == [bundled[1], bundled[0]]


def test_the_url_picks_a_run_by_label(bundled, no_data, tmp_path):
    ex = Explorer(None, tmp_path / "work", job=RetrainJob())
    assert ex.url_state({"run": FASHION_LABEL}) == {"run": str(bundled[1])}


def test_runs_named_on_the_command_line_keep_their_names(bundled, with_data, tmp_path, fashion_run):
    ex = Explorer([fashion_run], tmp_path / "work", job=RetrainJob())
    assert ex.registry.startup_choices() == [(FASHION_LABEL, str(fashion_run))]
    other = Explorer([run_for_tests(tmp_path)], tmp_path / "work2", job=RetrainJob())
    assert len(other.registry.startup_choices()) == 1


# ---------------------------------------------------------------------------- Fashion-MNIST without its data


def test_samples_come_from_the_bundled_file_without_the_data_set(bundled, no_data, tmp_path):
    ex = Explorer(None, tmp_path / "work", job=RetrainJob())
    key = str(bundled[1])
    card, _, gallery, image, _, msg = ex.open_run(key, None, 0, "attention")
    assert len(gallery) == len(CLASS_NAMES) and all(t.dtype == np.uint8 and t.ndim == 3 for t in gallery)
    samples = ex.run(key).samples()
    assert [s.label for s in samples] == list(range(len(CLASS_NAMES)))
    assert [s.name for s in samples] == [f"test image: {n}" for n in CLASS_NAMES]
    assert image["tensor"].shape == (1, 1, 28, 28)


def test_token_masks_on_a_fashion_sample_without_the_data_set(bundled, no_data, tmp_path):
    ex = Explorer(None, tmp_path / "work", job=RetrainJob())
    key = str(bundled[1])
    coat = ex.pick_sample(key, CLASS_NAMES.index("Coat"))
    assert coat["label"] == CLASS_NAMES.index("Coat")
    overlay, strip = ex.overlay_views(*budget(key, 0.4), 3, coat)
    assert overlay.dtype == np.uint8 and overlay.ndim == 3 and strip.ndim == 3
    views = ex.budget_views(*budget(key, 0.4), 0, False, coat, "all")
    assert 'id="vs-budget-error"' not in views[0] and all(not skipped(v) for v in views)
    label, caption = ex.predict(*budget(key, 0.4), coat)
    assert len(label) == 3 and set(label) <= set(CLASS_NAMES) and "True class: **Coat**" in caption


def test_evaluation_and_retraining_say_how_to_install_it(bundled, no_data, tmp_path):
    ex = Explorer(None, tmp_path / "work", job=RetrainJob())
    key = str(bundled[1])
    md, fig, evals = ex.evaluate_budget(*budget(key), [])
    assert INSTALL in md and "FashionMNIST/raw" in md and "--download" in md and "\n" not in md
    assert skipped(fig) and evals == []
    outs = list(ex.start_retrain(*budget(key), 1, 2e-4, True, 1))
    assert len(outs) == 1 and INSTALL in outs[0][0] and ex.job.status().state == "idle"
    note, fig = ex.compute_sweep(*budget(key), [])
    assert INSTALL in note and skipped(fig)
    assert INSTALL in ex.accuracy_note(key)
    with pytest.raises(gr.Error, match="dataset-fashion-mnist"):  # the API's default run
        Explorer([bundled[1]], tmp_path / "work2", job=RetrainJob()).api_evaluate(0.5)
    # the digits demo is unaffected
    assert INSTALL not in ex.accuracy_note(str(bundled[0]))


def test_the_rest_of_the_page_works_without_the_data_set(bundled, no_data, tmp_path):
    from vitslim_app.ui import build_app
    ex = Explorer(None, tmp_path / "work", job=RetrainJob())
    key = str(bundled[1])
    for view in ("attention", "mlp", "tokens", "layers", "scores"):
        out = ex.show_view(view, *budget(key, 0.5), 0, True, None)
        assert 'id="vs-budget-error"' not in out[1]
    plan_path, _ = ex.export_plan(*budget(key, 0.5))
    assert plan_path and Path(plan_path).is_file()
    assert build_app(explorer=ex) is not None


@pytest.mark.skipif(not fashion_installed(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_evaluation_uses_the_installed_data_set(fashion_run, tmp_path):
    ex = Explorer([fashion_run], tmp_path / "work", job=RetrainJob())
    key = ex.registry.default_key()
    md, _, evals = ex.evaluate_budget(*budget(key, 1.0), [])
    assert "on 10000 test images" in md and len(evals) == 1, md
    if bundled_fashion() == fashion_run:
        assert evals[0]["top1"] > 80  # the bundled model (89% dense)


def test_token_overlay_api_on_a_clothing_photo(fashion_run, no_data, tmp_path):
    """/token_overlay on the Fashion-MNIST run: an uploaded picture of a garment is preprocessed like the
    data set (gray, dark background) and gets its token mask, without the data set."""
    from PIL import Image
    ex = Explorer([fashion_run], tmp_path / "work", job=RetrainJob())
    images, labels, _ = fashion.load_samples(fashion_run / "samples.safetensors")
    photo = tmp_path / "bag.png"  # a bundled bag, inverted and enlarged like a product photo on white
    Image.fromarray(255 - images[list(labels).index(CLASS_NAMES.index("Bag"))]).resize((112, 112)).save(photo)
    out = ex.api_token_overlay(str(photo), 5, 0.4)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
