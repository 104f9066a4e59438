"""Hostile files and arguments (issue 13): what a file may make the engine do, checked once at engine level.

Each class of problem has its test here; the CLI and the app share these checks because they call the
same loaders. Memory bounds are measured in a fresh process (peak RSS after the imports vs at the end).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vitslim_core import load_slim
from vitslim_core.cli import main
from vitslim_core.demo import DEMO_DIR
from vitslim_core.errors import ScoreFileError, VitSlimError
from vitslim_core.models import rebuild_model
from vitslim_core.run_folder import load_run
from vitslim_core.scores import MaskScores
from vitslim_core.spec import RECIPE_KWARGS, recipe_kwargs_problem

ROOT = Path(__file__).resolve().parents[1]
RSS_BOUND_MB = 150  # what one refused file may add to a process's peak memory


def _copy_demo(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("scores.safetensors", "model.safetensors", "history.json"):
        shutil.copy(DEMO_DIR / name, dst / name)
    return dst


def _edit_header(run: Path, edit) -> None:
    """Rewrite the JSON header of run/scores.safetensors with ``edit(header)`` (tensors unchanged)."""
    path = run / "scores.safetensors"
    with safe_open(str(path), "pt") as f:
        md = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(md["vitslim"])
    edit(header)
    md["vitslim"] = json.dumps(header)
    save_file(tensors, str(path), metadata=md)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(code: int, err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _peak_mb_in_fresh_process(code: str, refused: bool = True) -> float:
    """Run ``code`` (after importing the engine) in a new process; return its peak RSS growth in MB.
    ``refused``: the code must end in a VitSlimError (the hostile input was refused)."""
    script = textwrap.dedent("""
        import resource, sys
        import torch, timm, vitslim_core, vitslim_core.run_folder, vitslim_core.slim, vitslim_core.data
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
        {body}
        except vitslim_core.errors.VitSlimError as e:
            print("ERROR", str(e).splitlines()[0], file=sys.stderr)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """).format(body=textwrap.indent(textwrap.dedent(code), "    "))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert ("ERROR" in r.stderr) == refused, r.stderr or "the hostile input was accepted"
    return float(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- 1. metadata reaching timm
@pytest.mark.parametrize("key,value", [("checkpoint_path", "/etc/passwd"), ("pretrained_cfg_overlay", {"file": "/x"}),
                                       ("device", "meta"), ("cache_dir", "/tmp"), ("pretrained", True),
                                       ("norm_layer", "layernorm"), ("block_fn", "Block")])
def test_score_header_kwargs_outside_the_architecture_are_refused(tmp_path, key, value):
    run = _copy_demo(tmp_path / "run")
    _edit_header(run, lambda h: h["model"]["kwargs"].__setitem__(key, value))
    with pytest.raises(ScoreFileError, match=key):
        MaskScores.load(run)
    with pytest.raises(ScoreFileError):
        load_run(run)


def test_slim_json_kwargs_outside_the_architecture_are_refused(tmp_path, capsys):
    code, _, err = _cli(capsys, "slim", DEMO_DIR, "--flops", "0.5", "--out", tmp_path / "s")
    assert code == 0, err
    meta = json.loads((tmp_path / "s" / "slim.json").read_text())
    meta["model"]["kwargs"]["checkpoint_path"] = str(tmp_path / "secret.pth")
    (tmp_path / "s" / "slim.json").write_text(json.dumps(meta))
    with pytest.raises(VitSlimError, match="checkpoint_path") as e:
        load_slim(tmp_path / "s")
    assert "exist" not in str(e.value)  # the message says nothing about the named file


def test_a_recipe_from_a_file_cannot_name_weights_or_devices():
    for kw in ({"checkpoint_path": "/etc/passwd"}, {"device": "meta"}, {"pretrained": True}):
        with pytest.raises(VitSlimError):
            rebuild_model({"name": "digits-vit", "kwargs": kw})


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 1 << 22), st.floats(allow_nan=True),
                   st.text(max_size=40), st.lists(st.integers(-2, 20000), max_size=3),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
KEYS = st.one_of(st.sampled_from(sorted(RECIPE_KWARGS)),
                 st.sampled_from(["checkpoint_path", "pretrained", "pretrained_cfg", "device", "dtype", "cache_dir",
                                  "features_only", "act_layer", "norm_layer", "weight_init", "embed_layer"]),
                 st.text(min_size=1, max_size=20))


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kwargs=st.dictionaries(KEYS, VALUES, max_size=6))
def test_generated_recipe_kwargs_pass_only_when_every_key_and_value_is_an_architecture_setting(kwargs):
    problem = recipe_kwargs_problem(kwargs)
    outside = [k for k in kwargs if k not in RECIPE_KWARGS]
    if outside:
        assert problem is not None
    if problem is None:
        assert not outside
        for k, v in kwargs.items():  # what passes is plain data of the kind the key takes
            assert v is None or isinstance(v, (bool, int, float, str, list))
            if isinstance(v, str):
                assert len(v) <= 32
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                assert 0 <= v <= 1 << 20


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kwargs=st.dictionaries(st.sampled_from(["depth", "embed_dim", "num_heads", "mlp_ratio", "num_classes",
                                               "img_size", "patch_size", "qkv_bias", "class_token", "global_pool",
                                               "reg_tokens", "init_values", "device", "checkpoint_path"]),
                              VALUES, max_size=4))
def test_generated_recipes_in_a_run_never_escape_as_other_errors(tmp_path_factory, kwargs):
    """Whatever kwargs a header holds, loading the run refuses them in one line or loads the demo model."""
    run = _copy_demo(tmp_path_factory.mktemp("gen") / "run")
    _edit_header(run, lambda h: h["model"]["kwargs"].update(kwargs))
    try:
        scores, model = load_run(run)
    except VitSlimError as e:
        assert "\n" not in str(e)
        return
    assert scores.spec.depth == 6 and sum(p.numel() for p in model.parameters()) < 300_000


# ----------------------------------------------------------------------------- 2. work before the checks
def test_a_header_naming_a_huge_model_is_refused_before_building_it(tmp_path):
    run = _copy_demo(tmp_path / "run")
    _edit_header(run, lambda h: h.__setitem__("model", {"name": "vit_huge_patch14_224", "kwargs": {}}))
    grew = _peak_mb_in_fresh_process(f"vitslim_core.run_folder.load_run({str(run)!r})")
    assert grew < RSS_BOUND_MB, grew
    with pytest.raises(ScoreFileError, match="builds depth 32"):
        load_run(run)


def test_a_header_asking_for_a_huge_input_is_refused(tmp_path, capsys):
    run = _copy_demo(tmp_path / "run")
    _edit_header(run, lambda h: h["data"].__setitem__("input_size", [1, 4096, 4096]))
    with pytest.raises(ScoreFileError, match="input_size"):
        MaskScores.load(run)
    _one_line(*_cli(capsys, "eval", run)[::2], "input_size")


@pytest.mark.parametrize("w,h", [(30_000, 1), (1, 30_000), (200_000, 1)])
def test_thin_digit_images_use_bounded_memory(w, h):
    grew = _peak_mb_in_fresh_process(f"""
        from PIL import Image
        from vitslim_core.data import image_to_tensor
        from vitslim_core.scores import MaskScores
        cfg = MaskScores.load({str(DEMO_DIR)!r}).meta["data"]
        x = image_to_tensor(Image.new("L", ({w}, {h}), 255), cfg)
        assert tuple(x.shape) == (1, 1, 16, 16)
    """, refused=False)
    assert grew < 100, grew


def test_very_elongated_photos_are_refused_in_one_line():
    from PIL import Image
    from vitslim_core.data import image_to_tensor
    cfg = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(VitSlimError, match="elongated"):
        image_to_tensor(Image.new("RGB", (200_000, 1)), cfg)
    assert image_to_tensor(Image.new("RGB", (640, 20)), cfg).shape == (1, 3, 32, 32)  # 32:1 is fine


# ----------------------------------------------------------------------------- 3. outputs that destroy inputs
def test_slim_out_that_is_the_run_is_refused_and_the_run_unchanged(tmp_path, capsys):
    run = _copy_demo(tmp_path / "run")
    before = _digest(run)
    _one_line(*_cli(capsys, "slim", run, "--flops", "0.5", "--out", run)[::2], "destroy")
    _one_line(*_cli(capsys, "slim", run, "--flops", "0.5", "--out", tmp_path)[::2], "holds the input")
    assert _digest(run) == before


def test_retrain_out_that_is_the_run_keeps_checkpoint_and_history(tmp_path, capsys):
    run = _copy_demo(tmp_path / "run")
    (run / "checkpoint.pt").write_bytes(b"a checkpoint")
    before = _digest(run)
    _one_line(*_cli(capsys, "retrain", run, "--flops", "0.5", "--out", run, "--max-steps", "1")[::2], "destroy")
    assert _digest(run) == before


def test_plan_save_over_an_input_file_is_refused(tmp_path, capsys):
    run = _copy_demo(tmp_path / "run")
    before = _digest(run)
    _one_line(*_cli(capsys, "plan", run, "--flops", "0.5", "--save", run / "scores.safetensors")[::2], "destroy")
    assert _digest(run) == before
    code, _, err = _cli(capsys, "plan", run, "--flops", "0.5", "--save", run / "plan.json")  # next to it: fine
    assert code == 0, err


def test_search_starting_weights_are_not_overwritten(tmp_path, capsys):
    run = _copy_demo(tmp_path / "run")
    before = _digest(run)
    _one_line(*_cli(capsys, "search", "--checkpoint", run / "model.safetensors", "--out", run, "--max-steps", "1")[::2],
              "destroy")
    assert _digest(run) == before


def _slim_of_demo(flops: float):
    from vitslim_core import plan_for_flops, slim_model
    scores, model = load_run(DEMO_DIR)
    slim = slim_model(model, plan_for_flops(scores, flops))
    slim.slim_data = scores.meta["data"]
    return slim


def test_a_slim_folder_switches_in_one_step(tmp_path, monkeypatch):
    """A crash before the switch leaves the old folder whole; after it, the new one. Never a mix."""
    import vitslim_core.io as vio
    from vitslim_core import save_slim
    old, new = _slim_of_demo(0.7), _slim_of_demo(0.4)
    out = save_slim(old, tmp_path / "s")
    (out / "model.pt2").write_bytes(b"an export of the old model")

    def crash(a, b):
        raise KeyboardInterrupt  # dies at the switch (SIGKILL at every write: tests/test_crash.py)
    monkeypatch.setattr(vio, "_switch_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        save_slim(new, out)
    assert load_slim(out).slim_plan.macs == old.slim_plan.macs and (out / "model.pt2").exists()
    monkeypatch.undo()
    save_slim(new, out)
    assert load_slim(out).slim_plan.macs == new.slim_plan.macs
    assert not (out / "model.pt2").exists()  # the old version's export went with it
    assert not [p for p in tmp_path.iterdir() if p.name != "s"]  # no temp folder left


def test_the_fallback_without_an_atomic_exchange_still_replaces_the_folder(tmp_path, monkeypatch):
    import vitslim_core.io as vio
    from vitslim_core import save_slim
    monkeypatch.setattr(vio, "_exchange", lambda a, b: False)
    out = save_slim(_slim_of_demo(0.7), tmp_path / "s")
    save_slim(_slim_of_demo(0.4), out)
    assert load_slim(out).slim_plan.flops_ratio < 0.45
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_a_slim_folder_over_a_folder_of_other_files_is_refused(tmp_path):
    from vitslim_core import save_slim
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(VitSlimError, match="holds other files"):
        save_slim(_slim_of_demo(0.5), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_weights_and_description_from_different_saves_are_refused(tmp_path):
    from vitslim_core import save_slim
    a = save_slim(_slim_of_demo(0.7), tmp_path / "a")
    b = save_slim(_slim_of_demo(0.7), tmp_path / "b")
    meta = json.loads((b / "slim.json").read_text())
    meta["weights_sha256"] = "0" * 64
    (a / "slim.json").write_text(json.dumps(meta))
    with pytest.raises(ScoreFileError, match="different saves"):
        load_slim(a)


# ----------------------------------------------------------------------------- 4. weights that are not checked
@pytest.mark.parametrize("damage", ["nan", "inf", "int"])
def test_damaged_run_weights_are_refused_by_every_command(tmp_path, capsys, damage):
    run = _copy_demo(tmp_path / "run")
    path = run / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    state = load_file(str(path))
    key = "blocks.0.mlp.fc1.weight"
    if damage == "int":
        state[key] = state[key].to(torch.int32)
    else:
        state[key][0, 0] = float(damage)
    save_file(state, str(path), metadata=md)
    with pytest.raises(ScoreFileError, match=key):
        load_run(run)
    for args in (["slim", run, "--flops", "0.5", "--out", tmp_path / "s"], ["eval", run],
                 ["bench", run, "--runs", "1", "--rounds", "1"], ["sweep", run, "--budgets", "0.5"],
                 ["retrain", run, "--flops", "0.5", "--out", tmp_path / "rt", "--max-steps", "1"]):
        _one_line(*_cli(capsys, *args)[::2], key)


# ----------------------------------------------------------------------------- 5. small ones
def test_a_legal_255_byte_file_name_can_be_saved(tmp_path, capsys):
    name = "p" * 250 + ".json"
    code, _, err = _cli(capsys, "plan", DEMO_DIR, "--flops", "0.5", "--save", tmp_path / name)
    assert code == 0, err
    assert json.loads((tmp_path / name).read_text())["format"] == "vitslim-plan"


def test_saving_to_a_symlink_writes_its_target(tmp_path, capsys):
    target = tmp_path / "real" / "plan.json"
    target.parent.mkdir()
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    code, _, err = _cli(capsys, "plan", DEMO_DIR, "--flops", "0.5", "--save", link)
    assert code == 0, err
    assert link.is_symlink() and json.loads(target.read_text())["format"] == "vitslim-plan"


@pytest.mark.parametrize("args,needle", [
    (["eval", DEMO_DIR, "--device", "meta"], "device"),
    (["eval", DEMO_DIR, "--device", "mps"], "device"),
    (["eval", DEMO_DIR, "--data", "synthetic:2000000000"], "at most"),
    (["bench", DEMO_DIR, "--threads", "100000"], "threads"),
    (["search", "--device", "meta", "--max-steps", "1"], "device"),
])
def test_absurd_arguments_get_one_line(capsys, args, needle):
    _one_line(*_cli(capsys, *args)[::2], needle)


def test_a_run_naming_a_torchvision_folder_never_creates_it_or_downloads(tmp_path, capsys):
    run = _copy_demo(tmp_path / "run")
    target = tmp_path / "cifar-here"
    _edit_header(run, lambda h: h["data"].__setitem__("name", f"cifar10:{target}"))
    _one_line(*_cli(capsys, "eval", run)[::2], "--download")
    assert not target.exists()


def test_a_warning_never_comes_before_a_one_line_error(tmp_path, capsys):
    """A budget that warns (it can only be approximated) followed by a failure prints only the error."""
    (tmp_path / "notes.txt").write_text("mine")
    code, out, err = _cli(capsys, "slim", DEMO_DIR, "--flops", "0.005", "--out", tmp_path)
    _one_line(code, err, "other files")
    code, out, err = _cli(capsys, "plan", DEMO_DIR, "--flops", "0.005")  # succeeds: the warning shows, one line
    assert code == 0 and err.count("warning:") == 1 and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("port", ["70000", "0", "-1", "http"])
def test_app_port_out_of_range_is_one_line(capsys, port):
    _one_line(*_cli(capsys, "app", "--port", port, "--no-browser")[::2], "port")
