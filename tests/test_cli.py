"""The vitslim command: every command works, and bad input gives one line and a non-zero exit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitslim_core.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]


COMMANDS = ["search", "plan", "slim", "retrain", "eval", "sweep", "bench", "demo"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(capsys, cmd):
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: vitslim " + cmd in out and len(out.splitlines()) > 4


def test_top_level_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out


def test_python_dash_m_runs_without_traceback():
    r = subprocess.run([sys.executable, "-m", "vitslim_core", "plan", "/nonexistent/run", "--flops", "0.5"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 2
    assert_one_line_error(r.returncode, r.stderr, "does not exist")


# ----------------------------------------------------------------------------- plan
def test_plan_prints_table_and_saves(capsys, quick_run, tmp_path):
    code, out, err = run_cli(capsys, "plan", quick_run, "--flops", "0.6", "--save", tmp_path / "p.json")
    assert code == 0, err
    assert "layer" in out and "heads" in out and "total:" in out
    assert len([ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]) == 6  # one row per layer
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["format"] == "vitslim-plan" and abs(plan["flops_ratio"] - 0.6) <= 0.003


def test_plan_manual_ratios_and_json(capsys, quick_run):
    code, out, err = run_cli(capsys, "plan", quick_run, "--attn", "0.5", "--mlp", "0.5", "--token", "0.75", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["kept"]["attn"] == pytest.approx(0.5) and s["kept"]["mlp"] == pytest.approx(0.5)
    assert s["kept"]["token"] == pytest.approx(0.75, abs=0.01)
    assert len(s["layers"]) == 6


@pytest.mark.parametrize("args,needle", [
    (["--flops", "0"], "(0, 1]"),
    (["--flops", "1.5"], "(0, 1]"),
    (["--flops", "abc"], "not a number"),
    (["--attn", "-0.2"], "(0, 1]"),
    ([], "budget"),
    (["--flops", "0.5", "--attn", "0.5"], "not both"),
    (["--flops", "0.001"], "impossible budget"),
    (["--flops", "0.5", "--mix", "1,2"], "mix"),
])
def test_plan_bad_budgets(capsys, quick_run, args, needle):
    code, out, err = run_cli(capsys, "plan", quick_run, *args)
    assert_one_line_error(code, err, needle)


def test_plan_bad_files(capsys, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    code, _, err = run_cli(capsys, "plan", tmp_path / "junk.safetensors", "--flops", "0.5")
    assert_one_line_error(code, err, "not a readable")
    from safetensors.torch import save_file
    import torch
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    code, _, err = run_cli(capsys, "plan", tmp_path / "foreign.safetensors", "--flops", "0.5")
    assert_one_line_error(code, err, "not a vitslim score file")
    code, _, err = run_cli(capsys, "plan", tmp_path, "--flops", "0.5")
    assert_one_line_error(code, err, "does not exist")


# ----------------------------------------------------------------------------- slim / eval / sweep / bench
def test_slim_writes_loadable_model_and_exports(capsys, quick_run, tmp_path):
    out = tmp_path / "slim"
    code, stdout, err = run_cli(capsys, "slim", quick_run, "--flops", "0.5", "--out", out, "--export")
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "slim.json").is_file() and (out / "model.pt2").is_file()
    assert "GFLOPs" in stdout
    from vitslim_core import count_cost, load_slim
    m = load_slim(out)
    assert abs(count_cost(m).flops_ratio - 0.5) < 0.01


def test_slim_with_plan_file_and_mismatched_plan(capsys, quick_run, tmp_path):
    code, _, err = run_cli(capsys, "plan", quick_run, "--flops", "0.7", "--save", tmp_path / "p.json")
    assert code == 0, err
    code, _, err = run_cli(capsys, "slim", quick_run, "--plan", tmp_path / "p.json", "--out", tmp_path / "s")
    assert code == 0, err
    # a plan made for another architecture
    import timm
    from vitslim_core import MaskScores, arch_spec, plan_for_flops
    other = MaskScores.dense(arch_spec(timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2)))
    plan_for_flops(other, 0.9).save(tmp_path / "other.json")
    code, _, err = run_cli(capsys, "slim", quick_run, "--plan", tmp_path / "other.json", "--out", tmp_path / "s2")
    assert_one_line_error(code, err, "another architecture")
    code, _, err = run_cli(capsys, "slim", quick_run, "--flops", "0.5", "--plan", tmp_path / "p.json",
                           "--out", tmp_path / "s3")
    assert_one_line_error(code, err, "not both")


def test_slim_without_weights_is_clear(capsys, quick_run, tmp_path):
    import shutil
    run = tmp_path / "noweights"
    shutil.copytree(quick_run, run)
    (run / "model.safetensors").unlink()
    code, _, err = run_cli(capsys, "slim", run, "--flops", "0.5", "--out", tmp_path / "s")
    assert_one_line_error(code, err, "model.safetensors")


def test_eval_slim_run_and_budget(capsys, quick_run, tmp_path):
    code, _, err = run_cli(capsys, "slim", quick_run, "--flops", "0.6", "--out", tmp_path / "s")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", tmp_path / "s", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["n"] == 360 and 0 <= r["top1"] <= 100 and r["top5"] >= r["top1"]
    code, out, err = run_cli(capsys, "eval", quick_run, "--flops", "0.6", "--json")
    assert code == 0, err
    assert json.loads(out)["top1"] == pytest.approx(r["top1"])  # same plan, same slim model
    code, out, err = run_cli(capsys, "eval", quick_run)
    assert code == 0 and "top-1" in out


def test_eval_bad_inputs(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "no_such_model_xyz")
    assert_one_line_error(code, err, "no_such_model_xyz")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "eval", tmp_path / "empty")
    assert_one_line_error(code, err)


def test_sweep_writes_table_and_plot(capsys, quick_run, tmp_path):
    code, out, err = run_cli(capsys, "sweep", quick_run, "--budgets", "0.5,1.0", "--out", tmp_path)
    assert code == 0, err
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [r["target"] for r in rows] == [0.5, 1.0]
    assert (tmp_path / "sweep.csv").read_text().startswith("target,")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_tiny_model_prints_table(capsys, quick_run):
    code, out, err = run_cli(capsys, "bench", quick_run, "--flops", "0.5", "--batch", "4", "--runs", "2",
                             "--warmup", "1", "--rounds", "1", "--threads", "1")
    assert code == 0, err
    assert "speedup" in out and "dense" in out and "slim 0.50" in out


def test_bench_bad_budget(capsys, quick_run):
    code, _, err = run_cli(capsys, "bench", quick_run, "--flops", "0,2")
    assert_one_line_error(code, err)


# ----------------------------------------------------------------------------- search / retrain
def test_search_cli_bad_inputs(capsys, tmp_path):
    code, _, err = run_cli(capsys, "search", "--model", "not_a_model_abc", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "not_a_model_abc")
    code, _, err = run_cli(capsys, "search", "--data", "imagefolder:" + str(tmp_path), "--out", tmp_path / "r")
    assert_one_line_error(code, err, "train/ and val/")
    code, _, err = run_cli(capsys, "search", "--data", "mnist", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "mnist")
    code, _, err = run_cli(capsys, "search", "--checkpoint", tmp_path / "missing.pth", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "missing.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 100)
    code, _, err = run_cli(capsys, "search", "--checkpoint", tmp_path / "bad.safetensors", "--out", tmp_path / "r")
    assert_one_line_error(code, err)
    code, _, err = run_cli(capsys, "search", "--resume", "--out", tmp_path / "fresh")
    assert_one_line_error(code, err, "checkpoint")


def test_search_cli_runs(capsys, tmp_path):
    code, out, err = run_cli(capsys, "search", "--max-steps", "3", "--batch-size", "16", "--epochs", "1",
                             "--out", tmp_path / "r", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "r" / "scores.safetensors").is_file() and "vitslim plan" in out


def test_retrain_cli_runs_and_bad_inputs(capsys, quick_run, tmp_path):
    code, out, err = run_cli(capsys, "retrain", quick_run, "--flops", "0.5", "--max-steps", "3", "--batch-size",
                             "16", "--epochs", "1", "--out", tmp_path / "rt", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "rt" / "last" / "slim.json").is_file() and (tmp_path / "rt" / "plan.json").is_file()
    code, _, err = run_cli(capsys, "retrain", quick_run, "--out", tmp_path / "rt2")
    assert_one_line_error(code, err, "budget")
    code, _, err = run_cli(capsys, "retrain", tmp_path / "nothing", "--flops", "0.5", "--out", tmp_path / "rt3")
    assert_one_line_error(code, err, "does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("cmd", [["eval", "DEMO"], ["search", "--max-steps", "1"]])
def test_asking_for_cuda_without_a_gpu_is_one_line(cmd, tmp_path, capsys):
    from vitslim_core.cli import main
    from vitslim_core.demo import DEMO_DIR
    argv = [str(DEMO_DIR) if c == "DEMO" else c for c in cmd] + ["--device", "cuda"]
    if cmd[0] == "search":
        argv += ["--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err
