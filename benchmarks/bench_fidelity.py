"""Does it work? ViT-Slim against other ways of slimming at equal FLOPs, before and after the same retraining.

For every method, budget and seed ("cell") the script builds the slimmed model, evaluates it on the
test set (top-1, NLL), retrains it with one retraining setting shared by every method, evaluates it
again, and caches the cell in ``fidelity.json`` as soon as it is done (re-running skips finished cells;
``--fresh`` starts over). Then all models of a budget are timed side by side on the CPU (batch 64,
interleaved rounds, median) and the table, the target checks, a seaborn figure and a markdown table
are written.

Methods (``--methods``, comma-separated keys; default all):

  vitslim          ViT-Slim scores, attention + MLP + tokens, from the searched weights (scores folded)
  random           the same solver fed with random scores, from the pretrained dense weights
  magnitude        ... weight-magnitude scores (tokens: mean activation norm per layer and patch)
  taylor           ... first-order Taylor scores |w * dL/dw| (tokens: |m * dL/dm| of a token mask)
  tp-magnitude     Torch-Pruning, MagnitudeImportance: head dims + MLP channels (no tokens), same MACs
  tp-taylor        Torch-Pruning, TaylorImportance
  scratch          a narrower dense ViT of the same FLOPs trained from scratch with as many training
                   images as pretrain + search + retrain of ViT-Slim (its own from-scratch recipe)
  vitslim-attn / vitslim-mlp / vitslim-token
                   ablations: the same ViT-Slim scores pruning one dimension only (mix=(1,0,0) etc.)
  vitslim-head / vitslim-uniform
                   the other attention modes: their own searches with the run's search settings

    python benchmarks/bench_fidelity.py --run vitslim_core/assets/fashion      # the full comparison
    python benchmarks/bench_fidelity.py --fast                                # seconds, digits demo
    python benchmarks/bench_fidelity.py --budgets 0.5 --seeds 0 --methods vitslim,tp-magnitude

The models are small: on a 2-core machine two workers with one thread each keep both cores busy, where
one process with two threads mostly waits (3-10x slower per step on a busy 2-core machine). Both write the
same results (cells are merged under a lock); a last invocation then times all models alone:

    OMP_NUM_THREADS=1 python benchmarks/bench_fidelity.py --run RUN --methods scratch --skip-timing &
    OMP_NUM_THREADS=1 python benchmarks/bench_fidelity.py --run RUN --skip-timing \
        --methods vitslim,random,magnitude,taylor,tp-magnitude,tp-taylor,vitslim-attn,vitslim-mlp,\
vitslim-token,vitslim-head,vitslim-uniform
    wait; python benchmarks/bench_fidelity.py --run RUN      # every cell cached: only the timing runs

Targets (printed, never asserted): at 50% FLOPs after retraining ViT-Slim within 1.0 point of dense and
ahead of every baseline by more than one standard deviation; all three dimensions at least as good as
each one alone (the paper's claim); the ragged slim model at least as fast as Torch-Pruning's.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitslim_core.errors import BudgetError, VitSlimError  # noqa: E402

FORMAT = "vitslim-fidelity"
FORMAT_VERSION = 1
RESULTS_DIR = ROOT / "benchmarks" / "results"
BASE_NAME = "fidelity"
WITHIN_DENSE = 1.0  # points of top-1
TARGET_BUDGET = 0.5


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    group: str          # "ViT-Slim", "baseline", "ablation", "attention mode"
    start: str          # what its weights start from
    tokens: str         # how it treats tokens
    kind: str           # "vitslim", "scorer", "tp", "scratch"
    mix: tuple[float, float, float] | None = None
    mode: str = "head_dim"
    seeded: bool = False  # the pruned structure itself depends on the seed


METHODS: dict[str, Method] = {m.key: m for m in (
    Method("vitslim", "ViT-Slim (attn+MLP+tokens)", "ViT-Slim", "searched", "searched scores", "vitslim"),
    Method("random", "random scores", "baseline", "pretrained", "random", "scorer", seeded=True),
    Method("magnitude", "weight magnitude", "baseline", "pretrained", "mean activation norm", "scorer"),
    Method("taylor", "Taylor |w*dL/dw|", "baseline", "pretrained", "Taylor |m*dL/dm|", "scorer"),
    Method("tp-magnitude", "Torch-Pruning magnitude", "baseline", "pretrained", "not pruned", "tp"),
    Method("tp-taylor", "Torch-Pruning Taylor", "baseline", "pretrained", "not pruned", "tp"),
    Method("scratch", "dense, same FLOPs, from scratch", "baseline", "random init", "all kept", "scratch"),
    Method("vitslim-attn", "ViT-Slim attention only", "ablation", "searched", "not pruned", "vitslim",
           mix=(1.0, 0.0, 0.0)),
    Method("vitslim-mlp", "ViT-Slim MLP only", "ablation", "searched", "not pruned", "vitslim", mix=(0.0, 1.0, 0.0)),
    Method("vitslim-token", "ViT-Slim tokens only", "ablation", "searched", "searched scores", "vitslim",
           mix=(0.0, 0.0, 1.0)),
    Method("vitslim-head", "ViT-Slim, whole heads", "attention mode", "searched (own search)", "searched scores",
           "vitslim", mode="head"),
    Method("vitslim-uniform", "ViT-Slim, uniform dims", "attention mode", "searched (own search)",
           "searched scores", "vitslim", mode="uniform"),
)}
BASELINES = ("random", "magnitude", "taylor", "tp-magnitude", "tp-taylor", "scratch")
SINGLE_DIMS = ("vitslim-attn", "vitslim-mlp", "vitslim-token")


@dataclass
class FidelityConfig:
    """Every setting of a comparison (recorded in ``fidelity.json``)."""

    run: str = ""
    pretrained: str = ""
    out: str = str(RESULTS_DIR)
    work: str = ""
    budgets: tuple[float, ...] = (0.5, 0.3)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    # the one retraining setting of every method (not of "scratch", which trains from scratch)
    retrain_steps: int = 200
    batch_size: int = 128
    lr: float = 5e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int = 10
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    distill: str = "soft"  # soft distillation from the PRETRAINED dense model, or "none"
    distill_alpha: float = 0.5
    distill_tau: float = 1.0
    # data-driven scorers and Torch-Pruning's Taylor: fixed batches of the training split
    calib_batches: int = 8
    calib_batch_size: int = 64
    eval_limit: int = 0           # 0: the whole test set
    eval_batch_size: int = 256
    search_max_steps: int = 0     # 0: the run's own search length (attention-mode searches)
    pretrain_images: int = 0      # 0: read from the run's demo.json
    scratch_max_steps: int = 0    # 0: no cap (the fast mode caps it)
    latency_batch: int = 64
    latency_runs: int = 10
    latency_rounds: int = 3
    latency_warmup: int = 3
    threads: int = 0
    skip_timing: bool = False     # for a worker running beside another one: time the models at the end, alone
    fast: bool = False

    # what changes the numbers of a cell (budgets, seeds, methods, out and timing settings do not)
    RESULT_FIELDS = ("run", "pretrained", "retrain_steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps",
                     "weight_decay", "label_smoothing", "distill", "distill_alpha", "distill_tau", "calib_batches",
                     "calib_batch_size", "eval_limit", "search_max_steps", "pretrain_images", "scratch_max_steps",
                     "fast")

    def fingerprint(self) -> str:
        d = {k: getattr(self, k) for k in self.RESULT_FIELDS}
        d["run"], d["pretrained"] = str(Path(d["run"]).resolve()), str(Path(d["pretrained"]).resolve())
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


def fast_config(**overrides: Any) -> FidelityConfig:
    """A few steps per method, one seed, one budget, a tiny eval subset: for tests and CI."""
    base = dict(budgets=(0.5,), seeds=(0,), retrain_steps=3, batch_size=32, warmup_steps=0, calib_batches=1,
                calib_batch_size=16, eval_limit=64, eval_batch_size=64, search_max_steps=3, scratch_max_steps=3,
                latency_runs=2, latency_rounds=1, latency_warmup=1, fast=True)
    return FidelityConfig(**{**base, **overrides})


def default_run() -> Path:
    from vitslim_core.demo import DEMO_DIR
    fashion = DEMO_DIR.parent / "fashion"
    return fashion if (fashion / "scores.safetensors").is_file() else DEMO_DIR


# ====================================================================== the shared state of one comparison
class Context:
    """The run, the pretrained model, data, calibration batches and caches of pruned structures."""

    def __init__(self, cfg: FidelityConfig, log: Callable[[str], None]) -> None:
        from safetensors.torch import load_file
        from vitslim_core.baselines import calibration_batches
        from vitslim_core.data import load_for
        from vitslim_core.models import rebuild_model
        from vitslim_core.run_folder import check_weights, load_run

        self.cfg, self.log = cfg, log
        self.run = Path(cfg.run)
        self.scores, self.searched = load_run(self.run)  # masks hold the searched scores (folded by slim_model)
        self.spec = self.scores.spec
        self.recipe = self.scores.model_recipe
        dense = rebuild_model(self.recipe, expect=self.spec)
        state = load_file(cfg.pretrained)
        check_weights(state, dense.state_dict(), cfg.pretrained)
        dense.load_state_dict(state, strict=True)
        self.dense = dense.eval()
        self.data_cfg = dict(self.scores.meta.get("data") or {})
        self.input_size = (self.spec.in_chans, *self.spec.img_size)
        plain = load_for(self.data_cfg, input_size=self.input_size, augment=False)
        self.test = plain.test
        if cfg.eval_limit:
            self.test = torch.utils.data.Subset(self.test, range(min(cfg.eval_limit, len(self.test))))
        self.data_name = plain.name
        self.calib = calibration_batches(plain.train, cfg.calib_batches, cfg.calib_batch_size, seed=0)
        self._train_sets: dict[int, Any] = {}
        self._scores: dict[Any, Any] = {}
        self._tp: dict[Any, Any] = {}
        self._runs: dict[str, tuple] = {"head_dim": (self.scores, self.searched)}
        self.search_record: dict[str, Any] = {}

    def train_set(self, seed: int):
        from vitslim_core.data import load_for
        if seed not in self._train_sets:
            self._train_sets[seed] = load_for(self.data_cfg, input_size=self.input_size, augment=True, seed=seed).train
        return self._train_sets[seed]

    # -- run facts
    def search_steps(self, scores=None) -> int:
        """Optimizer steps of a search: from its header, else its last evaluation, else its settings."""
        meta = (scores or self.scores).meta
        s = meta.get("search") or {}
        steps = meta.get("total_steps") or meta.get("step") or (meta.get("eval") or {}).get("step")
        if not steps:
            per_epoch = len(self.train_set(0)) // max(1, int(s.get("batch_size", 1)))
            steps = int(s.get("epochs", 0)) * per_epoch
            steps = min(steps, int(s["max_steps"])) if s.get("max_steps") else steps
        return int(steps)

    def search_images(self, scores=None) -> int:
        s = (scores or self.scores).meta.get("search") or {}
        return self.search_steps(scores) * int(s.get("batch_size", 0))

    def search_epochs(self, scores=None) -> float:
        return round(self.search_images(scores) / max(1, len(self.train_set(0))), 2)

    def pretrain_images(self) -> int:
        if self.cfg.pretrain_images:
            return int(self.cfg.pretrain_images)
        info = _read_json(self.run / "demo.json") or {}
        steps = info.get("pretrain_steps") or (info.get("dense_test") or {}).get("step") or 0
        return int(steps) * int(scratch_recipe(self.recipe["name"]).get("batch_size", 0))

    # -- the models of each method
    def mode_run(self, mode: str) -> tuple:
        """Scores and searched model of a search in attention mode ``mode`` (cached on disk in work/)."""
        if mode in self._runs:
            return self._runs[mode]
        from vitslim_core.run_folder import load_run
        from vitslim_core.search import SearchConfig, search
        names = {f.name for f in dataclasses.fields(SearchConfig)}
        base = {k: v for k, v in (self.scores.meta.get("search") or {}).items() if k in names}
        out = Path(self.cfg.work) / f"search-{mode}"
        settings = {**base, "attn_mode": mode, "checkpoint": str(Path(self.cfg.pretrained).resolve()),
                    "pretrained": False, "out": str(out), "device": "cpu",
                    "max_steps": self.cfg.search_max_steps or base.get("max_steps", 0)}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        stamp = out / "fidelity_search.json"
        done = _read_json(stamp) or {}
        if done.get("key") != key or not (out / "scores.safetensors").is_file():
            self.log(f"searching in attention mode {mode!r} with the run's settings ...")
            t0 = time.perf_counter()
            with _quiet():
                search(SearchConfig(**settings))
            (out / "checkpoint.pt").unlink(missing_ok=True)
            done = {"key": key, "seconds": round(time.perf_counter() - t0, 1), "settings": settings}
            stamp.write_text(json.dumps(done, indent=1, default=str))
            self.log(f"  search ({mode}) took {done['seconds']:.0f} s")
        self.search_record[mode] = {"seconds": done.get("seconds"), "folder": str(out)}
        self._runs[mode] = load_run(out)
        return self._runs[mode]

    def vitslim_plan(self, budget: float, mix=None, mode: str = "head_dim"):
        from vitslim_core.plan import BudgetWarning, plan_for_flops
        scores, _ = self.mode_run(mode)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BudgetWarning)
            plan = plan_for_flops(scores, budget, mix=mix)
        note = "; ".join(str(w.message) for w in caught if issubclass(w.category, BudgetWarning))
        return plan, note

    def target_ratio(self, budget: float) -> float:
        """The exact FLOPs ratio of ViT-Slim's own plan: Torch-Pruning and the scratch model aim at it."""
        return self.vitslim_plan(budget)[0].flops_ratio

    def scorer_scores(self, method: Method, seed: int):
        from vitslim_core.baselines import SCORERS
        key = (method.key, seed if method.seeded else None)
        if key not in self._scores:
            scorer = SCORERS[method.key](seed=seed) if method.seeded else SCORERS[method.key]()
            self._scores[key] = scorer(self.dense, self.scores, self.calib)
        return self._scores[key]

    def tp_model(self, method: Method, budget: float):
        from vitslim_core.baselines import prune_with_torch_pruning
        key = (method.key, budget)
        if key not in self._tp:
            imp = method.key.split("-", 1)[1]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._tp[key] = prune_with_torch_pruning(self.dense, self.target_ratio(budget), imp, self.calib)
        res = self._tp[key]
        model = copy.deepcopy(res.model)
        model.slim_plan = res.plan
        return model, res.plan, res.info

    def build(self, method: Method, budget: float, seed: int) -> tuple[nn.Module, dict[str, Any]]:
        """The model of a method before retraining, and facts about it.

        Raises:
            BudgetError: the method cannot reach the budget (e.g. MLP only at 50%).
        """
        from vitslim_core.baselines import measured_macs, narrow_recipe
        from vitslim_core.cost import count_cost
        from vitslim_core.models import rebuild_model
        from vitslim_core.plan import plan_for_flops
        from vitslim_core.slim import slim_model

        info: dict[str, Any] = {}
        if method.kind == "vitslim":
            plan, note = self.vitslim_plan(budget, method.mix, method.mode)
            _, searched = self.mode_run(method.mode)
            model = slim_model(searched, plan)
            info.update(note=note, kept=plan.kept_fractions())
        elif method.kind == "scorer":
            plan = plan_for_flops(self.scorer_scores(method, seed), budget)
            model = slim_model(self.dense, plan, fold_scores=False)
            info.update(kept=plan.kept_fractions())
        elif method.kind == "tp":
            model, plan, tp_info = self.tp_model(method, budget)
            macs = measured_macs(model, self.input_size)
            if macs != plan.macs:
                raise VitSlimError(f"{method.key}: count_cost says {plan.macs} MACs, FlopCounterMode {macs}")
            info.update(kept=plan.kept_fractions(), attn_ratio=tp_info["attn_ratio"], mlp_ratio=tp_info["mlp_ratio"],
                        flop_counter_macs=macs)
        elif method.kind == "scratch":
            rec = narrow_recipe(self.recipe, self.target_ratio(budget))
            torch.manual_seed(seed)
            model = rebuild_model(rec)
            info.update(recipe=rec, embed_dim=rec["kwargs"]["embed_dim"],
                        mlp_hidden=int(model.blocks[0].mlp.fc1.out_features))
        else:
            raise VitSlimError(f"unknown method kind {method.kind!r}")
        c = count_cost(model)
        info.update(macs=c.macs, flops_ratio=c.macs / count_cost(self.dense).macs, params=c.params)
        return model, info


def scratch_recipe(name: str) -> dict[str, Any]:
    """The from-scratch training recipe of a model built here (the one that trained the pretrained model)."""
    from vitslim_core import models
    if hasattr(models, "local_recipe"):
        try:
            return dict(models.local_recipe(name))
        except VitSlimError:
            pass
    if name == getattr(models, "DEMO_MODEL", None):
        return dict(models.DEMO_TRAIN)
    raise VitSlimError(f"no from-scratch recipe for {name!r}: the 'scratch' method needs a model built here")


# ====================================================================== training and evaluation
def _loop_config(cfg: FidelityConfig, steps: int, n_train: int, seed: int, **kw: Any):
    from vitslim_core.train import LoopConfig, steps_per_epoch
    spe = steps_per_epoch(n_train, kw.get("batch_size", cfg.batch_size))
    base = dict(epochs=max(1, math.ceil(steps / spe)), max_steps=steps, batch_size=cfg.batch_size, lr=cfg.lr,
                min_lr_ratio=cfg.min_lr_ratio, schedule="cosine", weight_decay=cfg.weight_decay,
                warmup_steps=cfg.warmup_steps, seed=seed, device="cpu", log_every=50, amp=False)
    return LoopConfig(**{**base, **kw})


def retrain_model(model: nn.Module, teacher: nn.Module | None, train_set, cfg: FidelityConfig, seed: int,
                  work: Path) -> dict[str, Any]:
    """The retraining every method gets: same steps, lr, schedule, batch, loss and distillation."""
    from vitslim_core.train import supervised_step
    loop = _loop_config(cfg, cfg.retrain_steps, len(train_set), seed)
    step_fn = supervised_step(teacher, None, cfg.label_smoothing, cfg.distill_tau, cfg.distill_alpha)
    return _train(model, step_fn, train_set, loop, work, seed)


def train_from_scratch(model: nn.Module, train_set, images: int, cfg: FidelityConfig, seed: int, recipe: dict,
                       work: Path) -> dict[str, Any]:
    """The narrower dense model's training: its own from-scratch recipe, ``images`` training images."""
    import torch.nn.functional as F
    from vitslim_core.train import steps_per_epoch
    bs = int(recipe["batch_size"])
    steps = max(1, math.ceil(images / bs))
    if cfg.scratch_max_steps:
        steps = min(steps, cfg.scratch_max_steps)
    spe = steps_per_epoch(len(train_set), bs)
    loop = _loop_config(cfg, steps, len(train_set), seed, batch_size=bs, lr=recipe["lr"],
                        weight_decay=recipe["weight_decay"], min_lr_ratio=0.0,
                        warmup_steps=int(round(recipe.get("warmup_epochs", 0) * spe)),
                        grad_clip=recipe.get("clip_grad", 0.0))
    smoothing = recipe.get("label_smoothing", 0.0)

    def step_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor):
        logits = m(x)
        return F.cross_entropy(logits, y, label_smoothing=smoothing), {}

    return _train(model, step_fn, train_set, loop, work, seed)


def _train(model: nn.Module, step_fn, train_set, loop, work: Path, seed: int) -> dict[str, Any]:
    from vitslim_core.train import param_groups, run_loop, setup_distributed
    torch.manual_seed(seed)
    model.train()
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        history = run_loop(model, step_fn, train_set, None, loop, Path(tmp),
                           param_groups(model, loop.weight_decay, loop.lr, None), setup_distributed("cpu"),
                           desc="fidelity")
    model.eval()
    return {"steps": int(history["step"]), "images": int(history["step"]) * loop.batch_size,
            "seconds": round(float(history.get("train_seconds", 0.0)), 1),
            "final_loss": (history["log"][-1]["loss"] if history["log"] else None)}


def evaluate_model(model: nn.Module, ctx: Context) -> dict[str, float]:
    from vitslim_core.train import evaluate
    ev = evaluate(model, ctx.test, batch_size=ctx.cfg.eval_batch_size)
    return {"top1": ev["top1"], "nll": ev["loss"], "n": ev["n"]}


# ====================================================================== the results file
def load_results(path: Path, cfg: FidelityConfig, fresh: bool) -> dict[str, Any]:
    """Cached results of the same settings; a fresh skeleton when ``fresh``, absent, or other settings."""
    new = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": cfg.fingerprint(),
           "config": cfg.to_dict(), "cells": {}, "before": {}, "unreachable": {}, "latency": {}, "searches": {}}
    if fresh or not path.is_file():
        return new
    old = _read_json(path)
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise VitSlimError(f"{path} is not a fidelity results file; use --fresh to replace it")
    if old.get("fingerprint") != cfg.fingerprint():
        raise VitSlimError(f"{path} holds results of other settings (run, retraining, data or fast mode); "
                           f"use --fresh to start over or --out for another folder")
    old["config"] = {**old.get("config", {}), **{k: v for k, v in cfg.to_dict().items()
                                                 if k not in cfg.RESULT_FIELDS}}
    for k in SECTIONS:
        old.setdefault(k, {})
    return old


SECTIONS = ("cells", "before", "unreachable", "latency", "searches")


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Write the results atomically, merged with what another process running the same settings (e.g.
    ``--methods scratch`` in a second terminal) wrote meanwhile: its cells are kept, ours win on a tie.
    The results folder is locked while merging (``flock``)."""
    import fcntl
    from vitslim_core.io import atomic_write_json
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        disk = _read_json(path) if path.is_file() else None
        if isinstance(disk, dict) and disk.get("fingerprint") == results.get("fingerprint"):
            for k in SECTIONS:
                results[k] = {**(disk.get(k) or {}), **results.get(k, {})}
            results.setdefault("dense", disk.get("dense"))
        atomic_write_json(path, results)
    finally:
        os.close(fd)  # releases the lock


def cell_key(method: str, budget: float, seed: int | None = None) -> str:
    return f"{method}|{budget:g}" + ("" if seed is None else f"|{seed}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _quiet():
    """No progress bars from the shared loop while the benchmark prints its own line per cell."""
    old = os.environ.get("VITSLIM_NO_PROGRESS")
    os.environ["VITSLIM_NO_PROGRESS"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VITSLIM_NO_PROGRESS", None)
        else:
            os.environ["VITSLIM_NO_PROGRESS"] = old


# ====================================================================== the benchmark
def run(cfg: FidelityConfig, fresh: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every cell of ``cfg``, time the models, write json/md/png; returns the results."""
    cfg = dataclasses.replace(cfg)
    cfg.run = str(cfg.run or default_run())
    cfg.pretrained = str(cfg.pretrained or Path(cfg.run) / "pretrained.safetensors")
    cfg.work = str(cfg.work or (ROOT / "runs" / "fidelity" if not cfg.fast else Path(cfg.out) / "work"))
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise VitSlimError(f"unknown methods {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if not Path(cfg.pretrained).is_file():
        raise VitSlimError(f"no pretrained dense weights at {cfg.pretrained} (pass --pretrained FILE)")
    for b in cfg.budgets:
        if not 0 < b <= 1:
            raise VitSlimError(f"budgets must be in (0, 1], got {b}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{BASE_NAME}.json"
    results = load_results(path, cfg, fresh)
    if fresh and path.is_file():  # replaced, not merged with (see save_results)
        from vitslim_core.io import atomic_write_json
        atomic_write_json(path, results)
    t_start = time.perf_counter()
    with _quiet():
        ctx = Context(cfg, log)
        results["run"] = {"run": cfg.run, "dataset": ctx.data_name, "model": ctx.recipe["name"],
                          "test_images": len(ctx.test), "pretrain_images": ctx.pretrain_images(),
                          "search_images": ctx.search_images(), "search_epochs": ctx.search_epochs(),
                          "threads": torch.get_num_threads(),
                          "demo_seconds": {k: v for k, v in (_read_json(ctx.run / "demo.json") or {}).items()
                                           if k in ("pretrain_seconds", "search_seconds")}}
        if "dense" not in results:
            from vitslim_core.cost import count_cost
            t0 = time.perf_counter()
            c = count_cost(ctx.dense)
            results["dense"] = {**evaluate_model(ctx.dense, ctx), "macs": c.macs, "params": c.params,
                                "seconds": round(time.perf_counter() - t0, 1)}
            save_results(path, results)
        log(f"dense {ctx.recipe['name']} on {ctx.data_name} ({len(ctx.test)} test images): "
            f"top-1 {results['dense']['top1']:.2f}%, NLL {results['dense']['nll']:.4f}")
        todo = [(m, b, s) for b in cfg.budgets for m in cfg.methods for s in cfg.seeds]
        for i, (mkey, budget, seed) in enumerate(todo):
            key = cell_key(mkey, budget, seed)
            if key in results["cells"] or cell_key(mkey, budget) in results["unreachable"]:
                continue
            run_cell(ctx, results, METHODS[mkey], budget, seed, f"[{i + 1}/{len(todo)}]")
            save_results(path, results)
        if not cfg.skip_timing:
            for budget in cfg.budgets:
                time_budget(ctx, results, budget)
                save_results(path, results)
        results["searches"].update(ctx.search_record)
    results["last_seconds"] = round(time.perf_counter() - t_start, 1)
    save_results(path, results)
    write_outputs(results, out, log)
    return results


def run_cell(ctx: Context, results: dict, method: Method, budget: float, seed: int, tag: str) -> None:
    cfg = ctx.cfg
    t0 = time.perf_counter()
    if method.kind == "scratch":
        try:
            scratch_recipe(ctx.recipe["name"])
        except VitSlimError as e:  # e.g. a hub model: no recipe to train it from scratch with
            results["unreachable"][cell_key(method.key, budget)] = f"skipped: {e}"
            ctx.log(f"{tag} {method.key:15s} {budget:4.0%}: skipped ({e})")
            return
    try:
        model, info = ctx.build(method, budget, seed)
    except BudgetError as e:
        results["unreachable"][cell_key(method.key, budget)] = str(e)
        ctx.log(f"{tag} {method.key:15s} {budget:4.0%}: unreachable ({e})")
        return
    t_build = time.perf_counter() - t0
    bkey = cell_key(method.key, budget, seed if method.seeded else None)
    before = None
    if method.kind != "scratch":
        before = results["before"].get(bkey)
        if before is None:
            before = evaluate_model(model, ctx)
            results["before"][bkey] = before
    t1 = time.perf_counter()
    work = Path(cfg.work)
    if method.kind == "scratch":
        images = ctx.pretrain_images() + ctx.search_images() + cfg.retrain_steps * cfg.batch_size
        tr = train_from_scratch(model, ctx.train_set(seed), images, cfg, seed,
                                scratch_recipe(ctx.recipe["name"]), work)
        total_images = tr["images"]
    else:
        teacher = ctx.dense if cfg.distill == "soft" else None
        tr = retrain_model(model, teacher, ctx.train_set(seed), cfg, seed, work)
        total_images = ctx.pretrain_images() + tr["images"]
        if method.kind == "vitslim":
            mode_scores = ctx.mode_run(method.mode)[0]
            info.update(search_images=ctx.search_images(mode_scores), search_epochs=ctx.search_epochs(mode_scores))
            total_images += info["search_images"]
    t2 = time.perf_counter()
    after = evaluate_model(model, ctx)
    t3 = time.perf_counter()
    cell = {"method": method.key, "budget": budget, "seed": seed, **info, "before": before, "after": after,
            "train": tr, "total_images": total_images,
            "seconds": {"build": round(t_build, 1), "retrain": round(t2 - t1, 1), "eval": round(t3 - t2, 1),
                        "total": round(t3 - t0, 1)}}
    results["cells"][cell_key(method.key, budget, seed)] = cell
    b_top1 = "  n/a" if before is None else f"{before['top1']:5.1f}"
    b_nll = "  n/a" if before is None else f"{before['nll']:.3f}"
    ctx.log(f"{tag} {method.key:15s} {budget:4.0%} seed {seed}: FLOPs {100 * info['flops_ratio']:5.1f}%, "
            f"top-1 {b_top1} -> {after['top1']:5.1f}, NLL {b_nll} -> {after['nll']:.3f} "
            f"({tr['steps']} steps in {t2 - t1:.0f} s; cell {t3 - t0:.0f} s)")


def time_budget(ctx: Context, results: dict, budget: float) -> None:
    """Time the models of every method at one budget side by side (interleaved rounds, median)."""
    from vitslim_core.bench import compare_latency
    cfg = ctx.cfg
    # every method with results at this budget, not only this invocation's: one run times them all
    done = {c["method"] for c in results["cells"].values() if c["budget"] == budget}
    methods = [m for m in METHODS if (m in cfg.methods or m in done)
               and cell_key(m, budget) not in results["unreachable"]]
    key = f"{budget:g}"
    have = results["latency"].get(key)
    if have and set(methods) <= set(have.get("methods", [])):
        return
    models = {}
    for m in methods:
        try:
            models[m] = ctx.build(METHODS[m], budget, cfg.seeds[0])[0].eval()
        except BudgetError:
            continue
    t0 = time.perf_counter()
    rows = compare_latency(ctx.dense, models, batch_size=cfg.latency_batch, runs=cfg.latency_runs,
                           warmup=cfg.latency_warmup, rounds=cfg.latency_rounds)
    results["latency"][key] = {"methods": list(models), "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
                               "threads": torch.get_num_threads(),
                          "demo_seconds": {k: v for k, v in (_read_json(ctx.run / "demo.json") or {}).items()
                                           if k in ("pretrain_seconds", "search_seconds")}}
    ctx.log(f"timed {len(models)} models at {budget:.0%} FLOPs (batch {cfg.latency_batch}, "
            f"{cfg.latency_rounds} interleaved rounds) in {time.perf_counter() - t0:.0f} s")


# ====================================================================== summaries
def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan), len(vals)


def summarize(results: dict) -> list[dict[str, Any]]:
    """One row per (budget, method): means and standard deviations over seeds."""
    cfg = results.get("config", {})
    rows = []
    budgets = sorted({c["budget"] for c in results["cells"].values()} |
                     {float(k.split("|")[1]) for k in results["unreachable"]}, reverse=True)
    lat = results.get("latency", {})
    for b in budgets:
        lrows = {r["model"]: r for r in (lat.get(f"{b:g}") or {}).get("rows", [])}
        for key, m in METHODS.items():
            cells = [c for c in results["cells"].values() if c["method"] == key and c["budget"] == b]
            un = results["unreachable"].get(cell_key(key, b))
            if not cells and not un:
                continue
            row: dict[str, Any] = {"budget": b, "method": key, "label": m.label, "group": m.group, "start": m.start,
                                   "tokens": m.tokens, "unreachable": un, "n": len(cells)}
            if cells:
                for stage in ("before", "after"):
                    for metric in ("top1", "nll"):
                        mu, sd, _ = _stats([(c[stage] or {}).get(metric) for c in cells])
                        row[f"{stage}_{metric}"], row[f"{stage}_{metric}_std"] = mu, sd
                row["flops_ratio"] = statistics.fmean(c["flops_ratio"] for c in cells)
                row["params"] = statistics.fmean(c["params"] for c in cells)
                row["total_images"] = statistics.fmean(c["total_images"] for c in cells)
                row["retrain_steps"] = cells[0]["train"]["steps"]
                row["kept"] = cells[0].get("kept")
                row["seconds"] = sum(c["seconds"]["total"] for c in cells)
                if cells[0].get("search_epochs") is not None:
                    row["search_epochs"] = cells[0]["search_epochs"]
            lr = lrows.get(key)
            if lr:
                row["images_per_s"], row["speedup"] = lr["images_per_s"], lr["speedup"]
            rows.append(row)
    return rows


def checks(results: dict) -> list[dict[str, Any]]:
    """The targets, each with PASS / FAIL / n/a and the numbers behind it."""
    rows = {(r["budget"], r["method"]): r for r in summarize(results)}
    dense = results.get("dense", {}).get("top1", math.nan)
    out = []

    def add(kind: str, ok: bool | None, text: str) -> None:
        out.append({"kind": kind, "status": "n/a" if ok is None else ("PASS" if ok else "FAIL"), "text": text})

    def get(b: float, m: str):
        r = rows.get((b, m))
        return r if r and not r.get("unreachable") and r.get("n") else None

    def fmt(r):
        sd = r["after_top1_std"]
        return f"{r['after_top1']:.2f}" + ("" if math.isnan(sd) else f" ± {sd:.2f}")

    b = TARGET_BUDGET
    vs = get(b, "vitslim")
    if vs is None:
        add("target", None, f"ViT-Slim at {b:.0%} FLOPs was not run")
    else:
        gap = dense - vs["after_top1"]
        add("target", gap <= WITHIN_DENSE, f"{b:.0%} FLOPs: ViT-Slim {fmt(vs)} within {WITHIN_DENSE:.1f} point of "
                                         f"dense {dense:.2f} (gap {gap:+.2f})")
        for m in BASELINES:
            r = get(b, m)
            if r is None:
                un = (rows.get((b, m)) or {}).get("unreachable")
                why = ("skipped" if un.startswith("skipped") else "unreachable") if un else "not run"
                add("target", None, f"{b:.0%} FLOPs: ViT-Slim vs {METHODS[m].label}: {why}")
                continue
            sds = [s for s in (vs["after_top1_std"], r["after_top1_std"]) if not math.isnan(s)]
            sd = max(sds) if sds else math.nan
            margin = vs["after_top1"] - r["after_top1"]
            ok = None if math.isnan(sd) else margin > sd
            add("target", ok, f"{b:.0%} FLOPs: ViT-Slim {fmt(vs)} vs {METHODS[m].label} {fmt(r)}: ahead by "
                              f"{margin:+.2f}" + ("" if math.isnan(sd) else f", one std = {sd:.2f}")
                + (" (one seed: no std)" if ok is None else ""))
    for bb in sorted({k[0] for k in rows}, reverse=True):
        vs = get(bb, "vitslim")
        for m in SINGLE_DIMS:
            r = rows.get((bb, m))
            if r is None:
                continue
            if r.get("unreachable") or vs is None:
                add("paper", None, f"{bb:.0%} FLOPs: all three vs {METHODS[m].label}: "
                                   f"{'unreachable for one dimension alone' if r.get('unreachable') else 'not run'}")
                continue
            add("paper", vs["after_top1"] >= r["after_top1"],
                f"{bb:.0%} FLOPs: all three {fmt(vs)} >= {METHODS[m].label} {fmt(r)}")
        for m in ("tp-magnitude", "tp-taylor"):
            r = rows.get((bb, m))
            if vs is None or r is None or "images_per_s" not in r or "images_per_s" not in vs:
                continue
            add("speed", vs["images_per_s"] >= r["images_per_s"],
                f"{bb:.0%} FLOPs: ViT-Slim {vs['images_per_s']:.0f} img/s >= {METHODS[m].label} "
                f"{r['images_per_s']:.0f} img/s ({vs['flops_ratio']:.1%} vs {r['flops_ratio']:.1%} FLOPs)")
    return out


def _pm(mu: float, sd: float, digits: int = 2) -> str:
    if mu is None or math.isnan(mu):
        return "—"
    return f"{mu:.{digits}f}" + ("" if sd is None or math.isnan(sd) else f" ± {sd:.{digits}f}")


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    head = ["FLOPs", "method", "starts from", "tokens", "search ep.", "FLOPs achieved", "params (k)",
            "kept attn/MLP/tok", "top-1 before", "NLL before", "top-1 after", "NLL after", "train images (k)",
            "img/s (b64)", "speedup", "n", "cell s"]
    d = results.get("dense", {})
    lat_dense = next((r for v in results.get("latency", {}).values() for r in v.get("rows", [])
                      if r["model"] == "dense"), None)
    body = [["100%", "dense (pretrained)", "—", "all kept", "—", "100.0%", f"{d.get('params', 0) / 1e3:.0f}",
             "1/1/1", f"{d.get('top1', math.nan):.2f}", f"{d.get('nll', math.nan):.4f}", "—", "—",
             f"{(results.get('run') or {}).get('pretrain_images', 0) / 1e3:.0f}",
             f"{lat_dense['images_per_s']:.0f}" if lat_dense else "—", "1.00x", "1", f"{d.get('seconds', 0):.0f}"]]
    for r in summarize(results):
        if r.get("unreachable"):
            what = "skipped" if r["unreachable"].startswith("skipped") else "unreachable"
            body.append([f"{r['budget']:.0%}", r["label"], r["start"], r["tokens"], "—", what, "—", "—",
                         "—", "—", "—", "—", "—", "—", "—", "0", "—"])
            continue
        k = r.get("kept") or {}
        kept = "/".join(f"{k[x]:.2f}" for x in ("attn", "mlp", "token")) if k else "—"
        body.append([f"{r['budget']:.0%}", r["label"], r["start"], r["tokens"],
                     f"{r['search_epochs']:g}" if r.get("search_epochs") is not None else "—",
                     f"{100 * r['flops_ratio']:.1f}%", f"{r['params'] / 1e3:.0f}", kept,
                     _pm(r["before_top1"], r["before_top1_std"]), _pm(r["before_nll"], r["before_nll_std"], 4),
                     _pm(r["after_top1"], r["after_top1_std"]), _pm(r["after_nll"], r["after_nll_std"], 4),
                     f"{r['total_images'] / 1e3:.0f}",
                     f"{r['images_per_s']:.0f}" if "images_per_s" in r else "—",
                     f"{r['speedup']:.2f}x" if "speedup" in r else "—", str(r["n"]), f"{r['seconds']:.0f}"])
    return head, body


def text_table(results: dict) -> str:
    head, body = table_rows(results)
    w = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(n) for v, n in zip(row, w)) for row in [head, *body])


def notes(results: dict) -> list[str]:
    cfg = results.get("config", {})
    run = results.get("run", {})
    seeds = sorted({c["seed"] for c in results.get("cells", {}).values()})
    out = []
    if cfg.get("fast"):
        out.append("FAST MODE: a few steps per method on a tiny evaluation subset; these numbers mean nothing.")
    out.append(f"Data: {run.get('dataset')} ({run.get('test_images')} test images), model {run.get('model')}, "
               f"run {run.get('run')}. Top-1 in %, NLL = mean cross-entropy, mean ± standard deviation over "
               f"seeds {', '.join(map(str, seeds))} (n = cells; 'cell s' = their wall time summed).")
    out.append(f"Retraining, the same for every method except the scratch model: {cfg.get('retrain_steps')} steps "
               f"at batch {cfg.get('batch_size')}, AdamW lr {cfg.get('lr')} (cosine to {cfg.get('min_lr_ratio')}x, "
               f"{cfg.get('warmup_steps')} warm-up steps), weight decay {cfg.get('weight_decay')}, label smoothing "
               f"{cfg.get('label_smoothing')}, distillation: "
               + (f"soft (KL, tau {cfg.get('distill_tau')}, alpha {cfg.get('distill_alpha')}) from the pretrained "
                  f"dense model" if cfg.get("distill") == "soft" else "none")
               + "; the dataset's training augmentation; seeds change the data order and augmentation.")
    out.append("ViT-Slim rows start from the searched weights with the scores folded in; their train images "
               f"include pretraining ({run.get('pretrain_images', 0) / 1e3:.0f}k) and the search "
               f"({run.get('search_images', 0) / 1e3:.0f}k, {run.get('search_epochs')} epochs). Baselines start "
               "from the pretrained dense weights (no search). The scratch model is a narrower dense ViT of the "
               "same FLOPs trained from random init with as many images as ViT-Slim's pretrain + search + "
               "retrain, with the pretrained model's own from-scratch recipe and no teacher.")
    out.append("Scorers feed the same FLOPs solver (plan_for_flops, all three dimensions at equal fractions): "
               "random (seeded; its structure changes with the seed), weight magnitude (q/k/v rows + proj column "
               "per head-dim, fc1 row + fc2 column per MLP unit; tokens: mean activation norm of each patch "
               "entering each block, normalised per layer), Taylor (|w * dL/dw| summed per unit over "
               f"{cfg.get('calib_batches')} batches of {cfg.get('calib_batch_size')} training images; tokens "
               "|m * dL/dm| of a token mask).")
    out.append("Torch-Pruning: MetaPruner, local pruning (TP's default: the same fraction of every layer), head "
               "dims (the same dims in every head of a layer) and MLP channels, never the residual width; "
               "tokens are not pruned (TP prunes weights). The fraction is bisected to the MACs of ViT-Slim's plan "
               "(first one fraction for both, then the MLP fraction); MACs counted by count_cost and checked "
               "against FlopCounterMode (fused attention off). The original attention scale is kept.")
    out.append("Ablations are the cheap kind: the same all-three ViT-Slim scores pruning one dimension "
               "(mix=(1,0,0) etc.), not separate single-dimension searches. Attention modes 'head' and 'uniform' "
               "had their own searches with the run's search settings. 'unreachable': one dimension alone "
               "cannot remove that many FLOPs.")
    demo = run.get("demo_seconds") or {}
    searches = results.get("searches") or {}
    cell_s = sum(c["seconds"]["total"] for c in results.get("cells", {}).values())
    parts = [f"cells {cell_s:.0f} s in all"]
    if demo.get("pretrain_seconds") is not None:
        parts.insert(0, f"the run's pretraining {demo['pretrain_seconds']:.0f} s and search "
                        f"{demo.get('search_seconds', 0):.0f} s (its demo.json)")
    parts += [f"the '{m}' search {v['seconds']:.0f} s" for m, v in searches.items() if v.get("seconds") is not None]
    parts += [f"timing at {float(b):.0%} {v.get('seconds', 0):.0f} s" for b, v in results.get("latency", {}).items()]
    out.append("Time (wall, this machine): " + "; ".join(parts) + ".")
    lat = results.get("latency", {})
    if lat:
        any_l = next(iter(lat.values()))
        out.append(f"Throughput: CPU, {any_l.get('threads')} threads, batch {cfg.get('latency_batch')}, median "
                   f"of {cfg.get('latency_rounds')} interleaved rounds of {cfg.get('latency_runs')} passes; all "
                   "models of one budget in one run; speedup over the dense model in the same run.")
    return out


def markdown(results: dict) -> str:
    head, body = table_rows(results)
    lines = ["# ViT-Slim against baselines at equal FLOPs", ""]
    lines += [f"- {n}" for n in notes(results)] + [""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    lines += ["", "## Targets", ""]
    lines += [f"- **{c['status']}** ({c['kind']}) {c['text']}" for c in checks(results)]
    lines += ["", f"Wall time of the last invocation: {results.get('last_seconds', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def figure(results: dict):
    """Top-1 against FLOPs, one line per method, bands from the seeds (seaborn's own error bars)."""
    import pandas as pd
    import seaborn as sns

    recs = []
    for c in results["cells"].values():
        m = METHODS[c["method"]]
        for stage in ("before", "after"):
            if c.get(stage):
                recs.append({"method": m.label, "group": m.group, "FLOPs budget (%)": 100 * c["budget"],
                             "stage": "before retraining" if stage == "before" else "after retraining",
                             "top-1 (%)": c[stage]["top1"]})
    df = pd.DataFrame(recs)
    order = [m.label for m in METHODS.values() if m.label in set(df["method"])] if len(df) else []
    palette = sns.color_palette("tab20" if len(order) > 10 else "tab10", len(order))
    g = sns.relplot(data=df, x="FLOPs budget (%)", y="top-1 (%)", hue="method", hue_order=order, style="group",
                    palette=palette,
                    col="stage", col_order=["before retraining", "after retraining"], kind="line", marker="o",
                    errorbar="sd", height=4.0, aspect=1.05, facet_kws={"sharey": False})
    dense = results.get("dense", {}).get("top1")
    for ax in g.axes.flat:
        if dense is not None:
            ax.axhline(dense, color="k", ls="--", lw=1)
            ax.annotate("dense", (ax.get_xlim()[1], dense), ha="right", va="bottom", fontsize=8)
        ax.grid(alpha=0.3)
    run = results.get("run", {})
    title = f"{run.get('dataset')} test set" + (" (FAST MODE: meaningless numbers)" if results["config"].get("fast")
                                                 else "") + ", bands: ±1 sd over seeds"
    g.figure.suptitle(title, y=1.02, fontsize=10)
    return g.figure


def write_outputs(results: dict, out: Path, log: Callable[[str], None] = print) -> dict[str, Path]:
    from vitslim_core.io import atomic_write_bytes
    import matplotlib.pyplot as plt
    paths = {"json": out / f"{BASE_NAME}.json", "md": out / f"{BASE_NAME}.md", "png": out / f"{BASE_NAME}.png"}
    atomic_write_bytes(paths["md"], markdown(results).encode())
    fig = figure(results)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(paths["png"], buf.getvalue())
    log("")
    for n in notes(results):
        log(n)
    log("")
    log(text_table(results))
    log("")
    log("Targets:")
    for c in checks(results):
        log(f"  [{c['status']:4s}] ({c['kind']}) {c['text']}")
    log(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return paths


# ====================================================================== command line
def parse_args(argv: Sequence[str] | None = None) -> tuple[FidelityConfig, bool]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="search run folder (default: the Fashion-MNIST run if bundled, "
                                                "else the digits demo)")
    ap.add_argument("--pretrained", default=None, help="dense weights (default: RUN/pretrained.safetensors)")
    ap.add_argument("--out", default=None, help=f"results folder (default {RESULTS_DIR}; fast mode: a temp folder)")
    ap.add_argument("--work", default=None, help="searches and scratch files (default runs/fidelity)")
    ap.add_argument("--budgets", default=None, help="FLOPs budgets, e.g. 0.5,0.3")
    ap.add_argument("--seeds", default=None, help="retraining seeds, e.g. 0,1,2")
    ap.add_argument("--methods", default=None, help=f"comma-separated, from: {', '.join(METHODS)}")
    ap.add_argument("--retrain-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--distill", choices=("soft", "none"), default=None)
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images (0: all)")
    ap.add_argument("--pretrain-images", type=int, default=None, help="images the dense model was pretrained on "
                                                                      "(default: from RUN/demo.json)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-timing", action="store_true", help="train and evaluate only (a worker beside another "
                                                               "one); a later run without it times the models")
    ap.add_argument("--fast", action="store_true", help="a few steps per method, 1 seed, tiny eval subset")
    ap.add_argument("--fresh", action="store_true", help="discard cached cells and start over")
    a = ap.parse_args(argv)
    over: dict[str, Any] = {}
    if a.budgets:
        over["budgets"] = tuple(float(x) for x in a.budgets.split(","))
    if a.seeds:
        over["seeds"] = tuple(int(x) for x in a.seeds.split(","))
    if a.methods:
        over["methods"] = tuple(x.strip() for x in a.methods.split(",") if x.strip())
    for name in ("run", "pretrained", "work", "retrain_steps", "batch_size", "lr", "distill", "eval_limit",
                 "pretrain_images", "threads", "skip_timing"):
        v = getattr(a, name)
        if v is not None:
            over[name] = v
    if a.fast:
        over["out"] = a.out or tempfile.mkdtemp(prefix="vitslim-fidelity-")
        cfg = fast_config(**over)
    else:
        over["out"] = a.out or str(RESULTS_DIR)
        cfg = FidelityConfig(**over)
    return cfg, a.fresh


def main(argv: Sequence[str] | None = None) -> int:
    cfg, fresh = parse_args(argv)
    try:
        run(cfg, fresh=fresh, log=lambda s: print(s, flush=True))
    except VitSlimError as e:
        print(f"bench_fidelity: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
