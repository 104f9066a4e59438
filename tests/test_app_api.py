"""The app's named API endpoints through gradio_client, against a launched app on 127.0.0.1."""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("VITSLIM_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from app_harness import launch_for_tests, run_for_tests  # noqa: E402

ENDPOINTS = ("/set_budget", "/set_ratios", "/token_overlay", "/evaluate")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run = run_for_tests(tmp_path_factory.getbasetemp())
    demo, url = launch_for_tests(run, tmp_path_factory.mktemp("api-workdir"))
    try:
        yield demo, url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(served):
    return gradio_client.Client(served[1], verbose=False)


def test_endpoints_are_listed_with_descriptions(client):
    info = client.view_api(print_info=False, return_format="dict")
    named = info["named_endpoints"]
    assert set(ENDPOINTS) <= set(named)
    assert "FLOPs budget" in named["/set_budget"]["description"]
    assert "image" in named["/token_overlay"]["description"]


def test_set_budget(client, served):
    s = client.predict(0.5, api_name="/set_budget")
    run = served[0].explorer.run(None)
    assert abs(s["flops_ratio"] - 0.5) < 0.01
    assert s["flops"] < s["dense_flops"] and s["params"] <= s["dense_params"]
    assert len(s["layers"]) == run.spec.depth
    assert {"heads", "dims_per_head", "mlp", "tokens", "macs"} <= set(s["layers"][0])


def test_set_ratios(client):
    s = client.predict(0.5, 0.25, 1.0, api_name="/set_ratios")
    assert abs(s["kept"]["attn"] - 0.5) < 0.02 and abs(s["kept"]["mlp"] - 0.25) < 0.02
    assert s["kept"]["token"] == 1.0


def test_bad_budget_is_an_error(client):
    with pytest.raises(Exception, match="budget"):
        client.predict(2.0, api_name="/set_budget")


def test_token_overlay(client, tmp_path):
    from PIL import Image
    src = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(src)
    out = client.predict(gradio_client.handle_file(str(src)), 2, 0.4, api_name="/token_overlay")
    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and img.shape[0] >= 16


def test_evaluate(client):
    r = client.predict(0.5, api_name="/evaluate")
    assert 0.0 <= r["top1"] <= 100.0 and r["n"] > 0 and abs(r["flops_ratio"] - 0.5) < 0.01


def test_the_app_binds_localhost_only(served):
    demo, url = served
    assert url.startswith("http://127.0.0.1:")
    assert demo.server_name == "127.0.0.1"
