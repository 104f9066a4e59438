"""The ``vitslim`` command (also ``python -m vitslim_core``).

Every command has ``--help``; on bad input it prints one line ``vitslim: error: ...`` and exits 2.
Set VITSLIM_DEBUG=1 to see tracebacks of unexpected errors.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import VitSlimError
from .io import refuse_overlap


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"budget must be in (0, 1], got {text}")
    return v


def _mix(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(not math.isfinite(p) or p < 0 for p in parts):
        raise argparse.ArgumentTypeError("mix must be three non-negative numbers: attn,mlp,token")
    return parts  # type: ignore[return-value]


MAX_INT_ARG = 1 << 31  # larger counts/sizes are typos (and overflow C longs further down)


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= v <= MAX_INT_ARG:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}" if v < low else f"is too large: {v}")
        return v
    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _finite_float(low: float | None = None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        return v
    parse.__name__ = "number"
    return parse


_number = _finite_float()
_non_negative = _finite_float(0.0)


def _device(text: str) -> str:
    from .train import check_device
    try:
        return check_device(text)
    except VitSlimError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _threads(text: str) -> int:
    v = _positive_int(text)
    limit = 4 * (os.cpu_count() or 1)
    if v > limit:  # OpenMP crashes (or fails to create kernels) far above the core count
        raise argparse.ArgumentTypeError(f"at most {limit} threads on this machine ({os.cpu_count()} cores), got {v}")
    return v


# ----------------------------------------------------------------------------- shared options
# Every option that more than one command takes is defined once here; ``_options`` adds them by name
# (``default=`` and ``help=`` may be overridden per command).
OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "data": (("--data",), dict(help="dataset (default: the one the run was made for): digits | fashion-mnist[:PATH] | "
                                    "synthetic[:N] | imagefolder:PATH | cifar10:PATH | cifar100:PATH")),
    "data_root": (("--data-root",), dict(default="data", help="torchvision's root folder for fashion-mnist without "
                                                             "a PATH (default %(default)s)")),
    "download": (("--download",), dict(action="store_true",
                                       help="allow downloading a dataset that is not on disk (torchvision)")),
    "no_augment": (("--no-augment",), dict(action="store_true", help="no training augmentation")),
    "device": (("--device",), dict(type=_device, default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")),
    "batch_size": (("--batch-size",), dict(type=_positive_int, default=128, help="batch size (default %(default)s)")),
    "plan": (("--plan",), dict(help="a plan JSON file (from vitslim plan --save) instead of a budget")),
    "multiple": (("--multiple",), dict(type=_positive_int,
                                       help="round kept dims per head and MLP width up to a multiple "
                                            "(default: 8 for heads of >= 32 dims, else 1)")),
    "json": (("--json",), dict(action="store_true", help="print JSON")),
    "distill_tau": (("--distill-tau",), dict(type=_non_negative, default=1.0, help="distillation temperature")),
    "distill_alpha": (("--distill-alpha",), dict(type=_non_negative, default=0.5,
                                                 help="weight of the distillation loss")),
    "pretrained": (("--pretrained",), dict(action="store_true", help="for a timm name: download timm's "
                                                                        "pretrained weights (needs internet)")),
    "checkpoint": (("--checkpoint",), dict(help="for a timm name: local .pth/.safetensors weights")),
    "img_size": (("--img-size",), dict(type=_positive_int, help="input resolution (default: the model's)")),
    "mixup": (("--mixup",), dict(type=_non_negative, default=0.0, help="timm Mixup alpha (0: off)")),
    "cutmix": (("--cutmix",), dict(type=_non_negative, default=0.0, help="timm CutMix alpha (0: off)")),
    "smoothing": (("--smoothing",), dict(type=_non_negative, default=0.0, help="label smoothing (default %(default)s)")),
    "drop_path": (("--drop-path",), dict(type=_non_negative, default=0.0, help="stochastic depth rate")),
    "recipe": (("--recipe",), dict(choices=["paper"], help="preset settings: paper = the official ViT-Slim "
                                                          "recipe (flags given as well override it)")),
}

_RECIPE_PARSERS: dict[str, argparse.ArgumentParser] = {}  # commands that take --recipe, by name
_RECIPE_DESTS = {"label_smoothing": "smoothing"}  # config field -> argparse dest where they differ


def _apply_recipe(parser: argparse.ArgumentParser, a: argparse.Namespace, argv: Sequence[str] | None):
    """Parse again with the recipe's settings as the defaults, so flags on the command line still win."""
    from .recipes import recipe
    sub = _RECIPE_PARSERS[a.command]
    settings = {_RECIPE_DESTS.get(k, k): v for k, v in recipe(a.recipe, a.command).items()}
    sub.set_defaults(**settings)
    return parser.parse_args(argv)


def _options(p: argparse.ArgumentParser | Any, *names: str, **overrides: dict[str, Any]) -> None:
    """Add shared options by name; ``overrides[name]`` replaces parts of their definition."""
    for name in names:
        flags, kw = OPTIONS[name]
        p.add_argument(*flags, **{**kw, **overrides.get(name, {})})


# ----------------------------------------------------------------------------- search
def _add_loop_args(p: argparse.ArgumentParser, epochs: int, lr: float, batch: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=epochs, help="training epochs (default %(default)s)")
    _options(g, "batch_size", batch_size=dict(default=batch, help="GLOBAL batch size, split over torchrun "
                                                                 "processes (default %(default)s)"))
    g.add_argument("--lr", type=_non_negative, default=lr, help="peak learning rate of AdamW (default %(default)s)")
    g.add_argument("--weight-decay", type=_non_negative, default=0.05, help="AdamW weight decay (default %(default)s)")
    g.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning-rate schedule after warm-up (default %(default)s)")
    g.add_argument("--min-lr-ratio", type=_non_negative, default=0.01,
                   help="final learning rate of the cosine, as a fraction of --lr (default %(default)s)")
    g.add_argument("--warmup-steps", type=_non_negative_int, default=0, help="linear warm-up steps before the schedule")
    g.add_argument("--warmup-epochs", type=_non_negative, default=0.0, help="warm-up in epochs (added to the steps)")
    g.add_argument("--max-steps", type=_non_negative_int, default=0, help="stop after this many steps (0: all epochs)")
    g.add_argument("--grad-clip", type=_non_negative, default=0.0, help="clip gradient norm (0: off)")
    g.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default %(default)s)")
    _options(g, "device")
    g.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the trained model (falls back to eager where it cannot compile)")
    g.add_argument("--workers", type=_non_negative_int, default=0, help="data loader workers (default %(default)s)")
    g.add_argument("--log-every", type=_positive_int, default=10, help="history record every N steps")
    g.add_argument("--checkpoint-every", type=_non_negative_int, default=0,
                   help="also checkpoint every N steps (always at each epoch end)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")


def _loop_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                schedule=a.schedule, min_lr_ratio=a.min_lr_ratio, warmup_epochs=a.warmup_epochs,
                recipe=a.recipe, warmup_steps=a.warmup_steps, max_steps=a.max_steps, grad_clip=a.grad_clip, seed=a.seed,
                device=a.device, amp=not a.no_amp, num_workers=a.workers, log_every=a.log_every,
                checkpoint_every=a.checkpoint_every, compile=a.compile)


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=default_model, required=default_model is None,
                   help="timm model name (deit_small_patch16_224, ...), digits-vit or fashion-vit "
                        "(default %(default)s)")
    src = g.add_mutually_exclusive_group()
    _options(src, "pretrained", "checkpoint", pretrained=dict(help="download timm's pretrained weights (needs internet)"),
             checkpoint=dict(help="local .pth/.safetensors weights for --model"))
    _options(g, "img_size", "data", "data_root", "download", "no_augment", data=dict(default="digits", help=(
        "digits | fashion-mnist[:PATH] | synthetic[:N] | imagefolder:PATH | cifar10:PATH | cifar100:PATH "
        "(default %(default)s)")))


def cmd_search(a: argparse.Namespace) -> int:
    from .search import SearchConfig, search
    cfg = SearchConfig(model=a.model, pretrained=a.pretrained, checkpoint=a.checkpoint, img_size=a.img_size,
                       data=a.data, augment=not a.no_augment, out=a.out, attn_mode=a.attn_mode,
                       w_attn=a.w_attn, w_mlp=a.w_mlp, w_token=a.w_token, search_attn=not a.no_attn,
                       search_mlp=not a.no_mlp, search_token=not a.no_token, distill=a.distill,
                       distill_tau=a.distill_tau, distill_alpha=a.distill_alpha, masks_only=a.masks_only,
                       mask_lr=a.mask_lr, drop_path=a.drop_path, mixup=a.mixup, cutmix=a.cutmix,
                       label_smoothing=a.smoothing, data_root=a.data_root, download=a.download, **_loop_kwargs(a))
    res = search(cfg, resume=a.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only the first process reports
        return 0
    if res.history.get("eval"):
        ev = res.history["eval"][-1]
        print(f"searched masks: top-1 {ev['top1']:.2f}% on the test split (masked model)")
    print(f"wrote {res.run_dir}/scores.safetensors, model.safetensors, history.json")
    print(f"next: vitslim plan {res.run_dir} --flops 0.6")
    return 0


def add_search(sub) -> None:
    p = sub.add_parser("search", help="learn ViT-Slim masks (one training run)",
                       description="Learn soft masks over attention head-dims, MLP units and tokens with an l1 "
                                   "penalty, starting from a pretrained model. Multi-GPU: "
                                   "torchrun --nproc_per_node=N -m vitslim_core search ...")
    _add_model_args(p, "digits-vit")
    p.add_argument("--out", default="runs/search", help="run folder to write (default %(default)s)")
    g = p.add_argument_group("search")
    g.add_argument("--attn-mode", default=None, choices=["head_dim", "head", "uniform"],
                   help="attention scores per head-dim (paper), per head, or per dim shared by heads (default: "
                        "head_dim, or head for models with rotary embeddings or a q/k norm)")
    g.add_argument("--w-attn", type=_non_negative, default=5e-5, help="l1 weight of attention scores (default %(default)s)")
    g.add_argument("--w-mlp", type=_non_negative, default=1.25e-5, help="l1 weight of MLP scores (default %(default)s)")
    g.add_argument("--w-token", type=_non_negative, default=2.5e-5, help="l1 weight of token scores (default %(default)s)")
    g.add_argument("--no-attn", action="store_true", help="do not search attention")
    g.add_argument("--no-mlp", action="store_true", help="do not search MLP units")
    g.add_argument("--no-token", action="store_true", help="do not search tokens")
    g.add_argument("--mask-lr", type=_non_negative, help="learning rate of the scores (default: --lr)")
    g.add_argument("--masks-only", action="store_true", help="train only the scores and norm layers")
    g.add_argument("--distill", action="store_true", help="distil from the unmasked model (soft targets)")
    _options(g, "distill_tau", "distill_alpha", "drop_path", "mixup", "cutmix", "smoothing", "recipe")
    _add_loop_args(p, epochs=10, lr=1e-4, batch=64)
    p.set_defaults(func=cmd_search)
    _RECIPE_PARSERS["search"] = p


# ----------------------------------------------------------------------------- plan
def _load_scores(path: str):
    from .scores import MaskScores
    return _note_incomplete(MaskScores.load(path))


def _note_incomplete(scores):
    """Say so on stderr when the scores come from an unfinished search (the command still runs)."""
    from .run_folder import run_status
    note = run_status(scores)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return scores


def make_plan(scores, a: argparse.Namespace):
    from .plan import plan_for_flops, plan_for_ratios
    manual = any(v is not None for v in (a.attn, a.mlp, a.token))
    if a.flops is not None and manual:
        raise VitSlimError("give either --flops or --attn/--mlp/--token, not both")
    if manual:
        return plan_for_ratios(scores, attn=a.attn or 1.0, mlp=a.mlp or 1.0, token=a.token or 1.0,
                               multiple=a.multiple or 1)
    if a.flops is None:
        raise VitSlimError("give a budget: --flops RATIO or --attn/--mlp/--token fractions")
    return plan_for_flops(scores, a.flops, mix=a.mix, multiple=a.multiple)  # BudgetWarning: see _Warnings


def _add_budget_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("budget (either --flops or the three fractions)")
    g.add_argument("--flops", type=_ratio, help="FLOPs budget as a fraction of the dense model, e.g. 0.6")
    g.add_argument("--attn", type=_ratio, help="fraction of attention units to keep")
    g.add_argument("--mlp", type=_ratio, help="fraction of MLP units to keep")
    g.add_argument("--token", type=_ratio, help="fraction of (layer, patch) token pairs to keep")
    g.add_argument("--mix", type=_mix, help="relative pruning speed attn,mlp,token for --flops (default 1,1,1)")
    _options(g, "multiple")


def cmd_plan(a: argparse.Namespace) -> int:
    scores = _load_scores(a.run)
    plan = make_plan(scores, a)
    if a.json:
        print(json.dumps(plan.summary(), indent=1))
    else:
        print(plan.table())
    if a.save:
        from .run_folder import RUN_FILES, run_dir_of
        refuse_overlap(a.save, [run_dir_of(a.run) / n for n in RUN_FILES] + [a.run], "--save")
        plan.save(a.save)
        print(f"wrote {a.save}", file=sys.stderr if a.json else sys.stdout)
    return 0


def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="turn a budget into a per-layer plan",
                       description="Print which heads, dims, MLP units and tokens survive a budget, per layer.")
    p.add_argument("run", help="search run folder or scores.safetensors")
    _add_budget_args(p)
    p.add_argument("--save", help="write the plan as JSON to this file")
    _options(p, "json", json=dict(help="print a JSON summary instead of the table"))
    p.set_defaults(func=cmd_plan)


# ----------------------------------------------------------------------------- slim / retrain / eval
def _plan_from_args(scores, a: argparse.Namespace):
    from .plan import SlimPlan
    if getattr(a, "plan", None):
        if a.flops is not None or any(v is not None for v in (a.attn, a.mlp, a.token)):
            raise VitSlimError("give either --plan or a budget, not both")
        plan = SlimPlan.load(a.plan)
        scores.spec.check_same_shape(plan.spec, f"plan file {a.plan}")
        return plan
    return make_plan(scores, a)


def cmd_slim(a: argparse.Namespace) -> int:
    from .export import export_onnx, export_program
    from .run_folder import load_run
    from .slim import save_slim, slim_model
    refuse_overlap(a.out, [a.run, a.plan])  # the slim folder is replaced whole
    scores, model = load_run(a.run)
    _note_incomplete(scores)
    plan = _plan_from_args(scores, a)
    slim = slim_model(model, plan)
    slim.slim_data = scores.meta.get("data") or {}
    out = save_slim(slim, a.out)
    c = plan.cost
    print(f"slim model: {c.gflops:.4g} GFLOPs ({100 * c.flops_ratio:.1f}% of dense), "
          f"{c.params / 1e6:.3f} M params ({100 * c.params_ratio:.1f}%) -> {out}")
    if a.export:
        path = export_program(slim, Path(a.out) / "model.pt2")
        print(f"exported program: {path}")
    if a.onnx:
        path = export_onnx(slim, Path(a.out) / "model.onnx")
        print(f"exported ONNX: {path}")
    return 0


def add_slim(sub) -> None:
    p = sub.add_parser("slim", help="make the physically smaller model for a budget",
                       description="Slice the searched model's weights to a plan: a smaller nn.Module that "
                                   "needs no masks, saved as model.safetensors + slim.json.")
    p.add_argument("run", help="search run folder (scores.safetensors + model.safetensors)")
    _add_budget_args(p)
    _options(p, "plan")
    p.add_argument("--out", required=True, help="folder to write the slim model to (replaced whole)")
    p.add_argument("--export", action="store_true", help="also write a torch.export program model.pt2")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (needs the onnx package)")
    p.set_defaults(func=cmd_slim)


def cmd_retrain(a: argparse.Namespace) -> int:
    from .retrain import RetrainConfig, retrain
    cfg = RetrainConfig(run=a.run, out=a.out, plan=a.plan, flops=a.flops, attn=a.attn, mlp=a.mlp, token=a.token,
                        multiple=a.multiple, data=a.data, distill=a.distill, distill_tau=a.distill_tau,
                        distill_alpha=a.distill_alpha, mixup=a.mixup, cutmix=a.cutmix,
                        label_smoothing=a.smoothing, drop_path=a.drop_path, augment=not a.no_augment,
                        data_root=a.data_root, download=a.download, **_loop_kwargs(a))
    res = retrain(cfg, resume=a.resume)
    if os.environ.get("RANK", "0") != "0":
        return 0
    c = res.plan.cost
    best = f"best top-1 {res.best_top1:.2f}%" if res.best_top1 is not None else "no evaluation yet"
    print(f"retrained slim model ({100 * c.flops_ratio:.1f}% FLOPs): {best}; wrote {res.out}/best and {res.out}/last")
    return 0


def add_retrain(sub) -> None:
    p = sub.add_parser("retrain", help="retrain the slim model (optionally distilled from the searched one)",
                       description="Slim the searched model to a budget and retrain the physically smaller network. "
                                   "Multi-GPU: torchrun --nproc_per_node=N -m vitslim_core retrain ...")
    p.add_argument("run", help="search run folder")
    _add_budget_args(p)
    _options(p, "plan")
    p.add_argument("--out", default="runs/retrain", help="output folder (default %(default)s)")
    _options(p, "data", "data_root", "download", "no_augment")
    p.add_argument("--distill", default="soft", choices=["none", "soft", "hard"],
                   help="distil from the unslimmed searched model (default %(default)s)")
    _options(p, "distill_tau", "distill_alpha", "mixup", "cutmix", "smoothing", "drop_path", "recipe",
             smoothing=dict(default=0.1))
    _add_loop_args(p, epochs=5, lr=2e-4, batch=64)
    p.set_defaults(func=cmd_retrain)
    _RECIPE_PARSERS["retrain"] = p


def load_any_model(target: str, a: argparse.Namespace):
    """A slim folder, a search run (masked, or slimmed with a budget) or a timm model; plus its data meta."""
    from .models import build_model, data_config
    path = Path(target)
    if (path / "slim.json").is_file():
        from .slim import load_slim
        m = load_slim(path)
        return m, dict(getattr(m, "slim_data", {}) or {}), f"slim model {path}"
    if path.is_dir() or path.suffix == ".safetensors":
        from .run_folder import load_run
        scores, model = load_run(path if path.is_dir() else path.parent)
        meta = dict(scores.meta.get("data") or {})
        if a.flops is not None or any(v is not None for v in (a.attn, a.mlp, a.token)):
            from .slim import slim_model
            plan = make_plan(scores, a)
            return slim_model(model, plan), meta, f"{path} slimmed to {100 * plan.flops_ratio:.1f}% FLOPs"
        return model, meta, f"searched model {path} (soft masks)"
    if path.exists():
        raise VitSlimError(f"{target} is neither a slim-model folder nor a search run")
    if "/" in target or "\\" in target or target.startswith("."):
        raise VitSlimError(f"{target} does not exist (give a slim-model folder, a search run or a timm model name)")
    model, _ = build_model(target, pretrained=a.pretrained, checkpoint=a.checkpoint)
    meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config(model).items()}
    return model, meta, f"{target}"


def cmd_eval(a: argparse.Namespace) -> int:
    from .bench import input_shape
    from .train import evaluate, resolve_device
    model, meta, what = load_any_model(a.target, a)
    from .data import load_for
    bundle = load_for(meta, a.data, input_size=input_shape(model), data_root=a.data_root, download=a.download)
    ds = bundle.test if a.split == "test" else bundle.train
    device = resolve_device(a.device)
    ev = evaluate(model.to(device), ds, batch_size=a.batch_size, device=device)
    if a.json:
        print(json.dumps({"target": a.target, **ev}))
    else:
        print(f"{what} on {bundle.name} {a.split} ({ev['n']} images): top-1 {ev['top1']:.2f}%  "
              f"top-5 {ev['top5']:.2f}%  loss {ev['loss']:.4f}")
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 and loss of a dense, searched or slim model",
                       description="Evaluate a slim-model folder, a search run (optionally slimmed with a budget) "
                                   "or a timm model on a dataset split.")
    p.add_argument("target", help="slim folder, search run folder, or timm model name")
    _add_budget_args(p)
    _options(p, "data", "data_root", "download")
    p.add_argument("--split", default="test", choices=["test", "train"])
    _options(p, "batch_size", "device", "pretrained", "checkpoint", "json")
    p.set_defaults(func=cmd_eval)


def _budget_list(text: str) -> list[float]:
    vals = [_ratio(t) for t in text.split(",") if t.strip()]
    if not vals:
        raise argparse.ArgumentTypeError("give budgets like 0.3,0.5,0.7")
    return vals


def cmd_sweep(a: argparse.Namespace) -> int:
    from .sweep import sweep, write_sweep
    from tqdm.auto import tqdm
    _load_scores(a.run)  # a damaged run fails before the progress bar is drawn (one clean error line)
    bar = tqdm(total=len(a.budgets), desc="sweep", disable=os.environ.get("VITSLIM_NO_PROGRESS") not in (None, "", "0"))
    try:
        rows = sweep(a.run, a.budgets, data=a.data, batch_size=a.batch_size, multiple=a.multiple,
                     data_root=a.data_root, download=a.download, progress=lambda i, n, row: bar.update(1))
    finally:
        bar.close()
    paths = write_sweep(rows, a.out or a.run)
    print("  target  FLOPs   top-1   top-5")
    for r in rows:
        print(f"  {r['target']:6.2f}  {r['flops_ratio']:5.3f}  {r['top1']:6.2f}  {r['top5']:6.2f}")
    print(f"wrote {paths['json']}, {paths['csv']}, {paths['png']}")
    return 0


def add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="accuracy vs FLOPs of slim models without retraining",
                       description="Slim the searched model at several FLOPs budgets and evaluate each; writes "
                                   "sweep.json/.csv/.png (the app shows the curve).")
    p.add_argument("run", help="search run folder")
    p.add_argument("--budgets", type=_budget_list, default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                   help="comma-separated FLOPs ratios (default 0.3,...,1.0)")
    _options(p, "data", "data_root", "download")
    p.add_argument("--out", help="folder for sweep.* (default: the run folder)")
    _options(p, "batch_size", "multiple")
    p.set_defaults(func=cmd_sweep)


def cmd_bench(a: argparse.Namespace) -> int:
    import warnings as _w
    from .bench import compare_latency, format_table
    from .plan import BudgetWarning, plan_for_flops
    from .slim import slim_model
    path = Path(a.target)
    if path.is_dir() and (path / "scores.safetensors").is_file():
        from .run_folder import load_run
        scores, model = load_run(path)
    else:
        import torch
        from .models import build_model
        from .scores import MaskScores
        from .spec import arch_spec
        model, recipe = build_model(a.target, img_size=a.img_size)
        g = torch.Generator().manual_seed(0)
        scores = MaskScores.dense(arch_spec(model, recipe["name"], recipe["kwargs"]))
        # random scores: timing only depends on the kept widths, not on which units are kept
        scores.attn = [torch.rand(s.shape, generator=g) for s in scores.attn]
        scores.mlp = [torch.rand(s.shape, generator=g) for s in scores.mlp]
        scores.token = [torch.randn(s.shape, generator=g) for s in scores.token]
    from .masks import remove_masks
    slims = {}
    for b in a.flops_list:
        with _w.catch_warnings():
            _w.simplefilter("ignore", BudgetWarning)
            slims[f"slim {b:.2f}"] = slim_model(model, plan_for_flops(scores, b, multiple=a.multiple))
    remove_masks(model)
    rows = compare_latency(model, slims, batch_size=a.batch, runs=a.runs, warmup=a.warmup, threads=a.threads,
                           device=a.device, rounds=a.rounds)
    print(json.dumps(rows, indent=1) if a.json else format_table(rows))
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure dense vs slim latency",
                       description="Time the dense model and slim models at FLOPs budgets side by side "
                                   "(interleaved rounds; median and spread).")
    p.add_argument("target", help="search run folder, or a timm model name (random weights and scores)")
    p.add_argument("--flops", dest="flops_list", type=_budget_list, default=[0.7, 0.5],
                   help="comma-separated FLOPs budgets (default 0.7,0.5)")
    _options(p, "multiple", "img_size", img_size=dict(help="for a timm name: input resolution"))
    p.add_argument("--batch", type=_positive_int, default=32, help="batch size (default %(default)s)")
    p.add_argument("--threads", type=_threads, help="CPU threads (default: torch's)")
    p.add_argument("--runs", type=_positive_int, default=10, help="timed runs per round")
    p.add_argument("--warmup", type=_non_negative_int, default=3, help="untimed runs per round")
    p.add_argument("--rounds", type=_positive_int, default=3, help="interleaved rounds")
    _options(p, "device", "json", device=dict(default="cpu", help="cpu, cuda or cuda:N (default %(default)s)"))
    p.set_defaults(func=cmd_bench)


# ----------------------------------------------------------------------------- demo / app
def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import DEMO_DIR, FASHION_DIR, build_demo
    out = a.out or (FASHION_DIR if a.data == "fashion-mnist" else DEMO_DIR)
    out = build_demo(out, quick=a.quick, data=a.data, data_root=a.data_root, download=a.download)
    print(f"wrote the demo run to {out}")
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="rebuild a bundled demo run end to end (CPU)",
                       description="Train the small ViT of a bundled run from scratch, search it, and write the run "
                                   "(digits: a few minutes; fashion-mnist: about half an hour on 2 cores).")
    p.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"],
                   help="which bundled run to rebuild (default %(default)s)")
    p.add_argument("--out", help="where to write the run (default: the bundled assets of --data)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    _options(p, "data_root", "download")
    p.set_defaults(func=cmd_demo)


def cmd_app(a: argparse.Namespace) -> int:
    from vitslim_app.main import serve
    return serve(a)


def add_app(sub) -> None:
    p = sub.add_parser("app", help="open the exploration app (Gradio) on the demo or on runs",
                       description="Open the ViT-Slim exploration app in the browser: drag a FLOPs budget, see which "
                                   "heads, MLP units and tokens survive, evaluate, retrain and export. Without RUN it "
                                   "opens the bundled digits demo. Listens on 127.0.0.1 unless --host is given.")
    try:
        from vitslim_app.main import add_arguments
    except ImportError:  # the app package is not installed next to the engine
        p.add_argument("runs", nargs="*")
    else:
        add_arguments(p)
    p.set_defaults(func=cmd_app)


COMMANDS: list[Callable] = [add_search, add_plan, add_slim, add_retrain, add_eval, add_sweep, add_bench,
                            add_demo, add_app]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = _Parser(prog="vitslim", description="ViT-Slim: search, slim and retrain timm vision transformers.")
    p.add_argument("--version", action="version", version=f"vitslim {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return p


LIVE_COMMANDS = ("search", "retrain", "demo", "app")
"""Long jobs: their warnings are shown when they happen. Other commands show theirs after they succeed,
so a failing command prints exactly one line."""


class _Warnings:
    """Python warnings as one ``warning: ...`` line each (first line of the message, each text once)."""

    def __init__(self, live: bool) -> None:
        self.live, self.pending, self.seen = live, [], set()
        self._ctx = warnings.catch_warnings()

    def __enter__(self) -> "_Warnings":
        self._ctx.__enter__()  # Python's own filters stay (ResourceWarning, DeprecationWarning are not shown)
        warnings.showwarning = self._show  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)

    def _show(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
              line: Any = None) -> None:
        text = (str(message).strip().splitlines() or [category.__name__])[0][:300]
        if text in self.seen:
            return
        self.seen.add(text)
        if self.live:
            print(f"warning: {text}", file=sys.stderr, flush=True)
        else:
            self.pending.append(text)

    def flush(self) -> None:
        for text in self.pending:
            print(f"warning: {text}", file=sys.stderr)
        self.pending.clear()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed as one line
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    if getattr(a, "recipe", None):
        try:
            a = _apply_recipe(parser, a, argv)
        except SystemExit as e:
            return int(e.code or 0) if not isinstance(e.code, str) else 2
    debug = os.environ.get("VITSLIM_DEBUG", "") not in ("", "0")
    shown = _Warnings(live=a.command in LIVE_COMMANDS)
    try:
        with shown:
            code = int(a.func(a) or 0)
        shown.flush()
        return code
    except VitSlimError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"vitslim: error: {msg}", file=sys.stderr)
        if debug:
            raise
        return 2
    except KeyboardInterrupt:
        print("vitslim: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        from .io import os_error_message
        print(f"vitslim: error: {os_error_message(e)}", file=sys.stderr)
        if debug:
            raise
        return 2
    except MemoryError as e:
        print(f"vitslim: error: out of memory{': ' + str(e).splitlines()[0] if str(e) else ''} "
              "(try a smaller --batch-size)", file=sys.stderr)
        if debug:
            raise
        return 2
    except Exception as e:  # noqa: BLE001 - never show a traceback to a user by default
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"vitslim: internal error: {type(e).__name__}: {first} (set VITSLIM_DEBUG=1 for details)",
              file=sys.stderr)
        if debug:
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
