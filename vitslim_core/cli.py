"""The ``vitslim`` command (also ``python -m vitslim_core``).

Every command has ``--help``; on bad input it prints one line ``vitslim: error: ...`` and exits 2.
Set VITSLIM_DEBUG=1 to see tracebacks of unexpected errors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import VitSlimError


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
    if len(parts) != 3 or any(p < 0 for p in parts):
        raise argparse.ArgumentTypeError("mix must be three non-negative numbers: attn,mlp,token")
    return parts  # type: ignore[return-value]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


# ----------------------------------------------------------------------------- search
def _add_loop_args(p: argparse.ArgumentParser, epochs: int, lr: float, batch: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=epochs, help="training epochs (default %(default)s)")
    g.add_argument("--batch-size", type=_positive_int, default=batch,
                   help="GLOBAL batch size, split over torchrun processes (default %(default)s)")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate of AdamW (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps before cosine decay")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda (default %(default)s)")
    g.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    g.add_argument("--workers", type=int, default=0, help="data loader workers (default %(default)s)")
    g.add_argument("--log-every", type=_positive_int, default=10, help="history record every N steps")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="also checkpoint every N steps (always at each epoch end)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")


def _loop_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                warmup_steps=a.warmup_steps, max_steps=a.max_steps, grad_clip=a.grad_clip, seed=a.seed,
                device=a.device, amp=not a.no_amp, num_workers=a.workers, log_every=a.log_every,
                checkpoint_every=a.checkpoint_every)


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=default_model, required=default_model is None,
                   help="timm model name (deit_small_patch16_224, ...) or digits-vit (default %(default)s)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights (needs internet)")
    src.add_argument("--checkpoint", help="local .pth/.safetensors weights for --model")
    g.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    g.add_argument("--data", default="digits",
                   help="digits | synthetic[:N] | imagefolder:PATH | cifar10:PATH | cifar100:PATH (default %(default)s)")
    g.add_argument("--no-augment", action="store_true", help="no training augmentation")


def cmd_search(a: argparse.Namespace) -> int:
    from .search import SearchConfig, search
    cfg = SearchConfig(model=a.model, pretrained=a.pretrained, checkpoint=a.checkpoint, img_size=a.img_size,
                       data=a.data, augment=not a.no_augment, out=a.out, attn_mode=a.attn_mode,
                       w_attn=a.w_attn, w_mlp=a.w_mlp, w_token=a.w_token, search_attn=not a.no_attn,
                       search_mlp=not a.no_mlp, search_token=not a.no_token, distill=a.distill,
                       distill_tau=a.distill_tau, distill_alpha=a.distill_alpha, masks_only=a.masks_only,
                       mask_lr=a.mask_lr, drop_path=a.drop_path, **_loop_kwargs(a))
    res = search(cfg, resume=a.resume)
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
    g.add_argument("--attn-mode", default="head_dim", choices=["head_dim", "head", "uniform"],
                   help="attention scores per head-dim (paper), per head, or per dim shared by heads")
    g.add_argument("--w-attn", type=float, default=2e-4, help="l1 weight of attention scores (default %(default)s)")
    g.add_argument("--w-mlp", type=float, default=5e-5, help="l1 weight of MLP scores (default %(default)s)")
    g.add_argument("--w-token", type=float, default=1e-4, help="l1 weight of token scores (default %(default)s)")
    g.add_argument("--no-attn", action="store_true", help="do not search attention")
    g.add_argument("--no-mlp", action="store_true", help="do not search MLP units")
    g.add_argument("--no-token", action="store_true", help="do not search tokens")
    g.add_argument("--mask-lr", type=float, help="learning rate of the scores (default: --lr)")
    g.add_argument("--masks-only", action="store_true", help="train only the scores and norm layers")
    g.add_argument("--distill", action="store_true", help="distil from the unmasked model (soft targets)")
    g.add_argument("--distill-tau", type=float, default=1.0, help="distillation temperature")
    g.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation loss")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    _add_loop_args(p, epochs=10, lr=1e-4, batch=64)
    p.set_defaults(func=cmd_search)


# ----------------------------------------------------------------------------- plan
def _load_scores(path: str):
    from .scores import MaskScores
    return MaskScores.load(path)


def make_plan(scores, a: argparse.Namespace):
    from .plan import plan_for_flops, plan_for_ratios
    manual = any(v is not None for v in (a.attn, a.mlp, a.token))
    if a.flops is not None and manual:
        raise VitSlimError("give either --flops or --attn/--mlp/--token, not both")
    if manual:
        return plan_for_ratios(scores, attn=a.attn or 1.0, mlp=a.mlp or 1.0, token=a.token or 1.0,
                               multiple=a.multiple)
    if a.flops is None:
        raise VitSlimError("give a budget: --flops RATIO or --attn/--mlp/--token fractions")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_for_flops(scores, a.flops, mix=a.mix, multiple=a.multiple)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return plan


def _add_budget_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("budget (either --flops or the three fractions)")
    g.add_argument("--flops", type=_ratio, help="FLOPs budget as a fraction of the dense model, e.g. 0.6")
    g.add_argument("--attn", type=_ratio, help="fraction of attention units to keep")
    g.add_argument("--mlp", type=_ratio, help="fraction of MLP units to keep")
    g.add_argument("--token", type=_ratio, help="fraction of (layer, patch) token pairs to keep")
    g.add_argument("--mix", type=_mix, help="relative pruning speed attn,mlp,token for --flops (default 1,1,1)")
    g.add_argument("--multiple", type=_positive_int, default=1,
                   help="round kept dims per head and MLP width up to a multiple (default %(default)s)")


def cmd_plan(a: argparse.Namespace) -> int:
    scores = _load_scores(a.run)
    plan = make_plan(scores, a)
    if a.json:
        print(json.dumps(plan.summary(), indent=1))
    else:
        print(plan.table())
    if a.save:
        plan.save(a.save)
        print(f"wrote {a.save}", file=sys.stderr if a.json else sys.stdout)
    return 0


def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="turn a budget into a per-layer plan",
                       description="Print which heads, dims, MLP units and tokens survive a budget, per layer.")
    p.add_argument("run", help="search run folder or scores.safetensors")
    _add_budget_args(p)
    p.add_argument("--save", help="write the plan as JSON to this file")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    p.set_defaults(func=cmd_plan)


# ----------------------------------------------------------------------------- demo / app
def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import build_demo
    out = build_demo(a.out, quick=a.quick)
    print(f"wrote the demo run to {out}")
    return 0


def add_demo(sub) -> None:
    from .demo import DEMO_DIR
    p = sub.add_parser("demo", help="rebuild the bundled digits demo end to end (CPU)",
                       description="Train the tiny digits ViT, search it, and write the bundled demo run.")
    p.add_argument("--out", default=str(DEMO_DIR), help="where to write the run (default: the bundled assets)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    p.set_defaults(func=cmd_demo)


COMMANDS: list[Callable] = [add_search, add_plan, add_demo]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = _Parser(prog="vitslim", description="ViT-Slim: search, slim and retrain timm vision transformers.")
    p.add_argument("--version", action="version", version=f"vitslim {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    debug = os.environ.get("VITSLIM_DEBUG", "") not in ("", "0")
    try:
        return int(a.func(a) or 0)
    except VitSlimError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"vitslim: error: {msg}", file=sys.stderr)
        if debug:
            raise
        return 2
    except KeyboardInterrupt:
        print("vitslim: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as e:
        print(f"vitslim: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
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
