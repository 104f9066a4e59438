"""What both front-ends (Gradio app, Jupyter widgets) say about a plan, without any UI library.

The app renders these with its CSS classes and element ids, the widgets with inline styles (a notebook
has no app stylesheet); the numbers and words come from here once.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from vitslim_core.plan import SlimPlan

TABLE_HEADERS = ("layer", "heads", "dims per head", "attention dims", "MLP units", "tokens", "MFLOPs",
                 "% of dense layer")


class Card(NamedTuple):
    key: str
    value: str
    sub: str
    elem: str  # element id in the app
    main: bool = False


def fmt_params(n: float) -> str:
    return f"{n / 1e6:.3g} M" if n >= 1e5 else f"{n / 1e3:.3g} k"


def fmt_flops(n: float) -> str:
    return f"{n / 1e9:.3g} G" if n >= 1e8 else f"{n / 1e6:.3g} M"


def one_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def readout_cards(plan: SlimPlan) -> list[Card]:
    """The always-visible numbers of a plan: FLOPs, predicted speedup, parameters, kept units."""
    c, s = plan.cost, plan.spec
    heads = int((plan.attn.sum(2) > 0).sum())
    attn_kept, mlp_kept, tok_kept = int(plan.attn.sum()), int(plan.mlp.sum()), int(plan.token.sum())
    speed = 1.0 / c.flops_ratio if c.flops_ratio > 0 else float("inf")
    return [
        Card("FLOPs", fmt_flops(c.macs), f"<b>{100 * c.flops_ratio:.1f}%</b> of {fmt_flops(c.dense_macs)} dense",
             "vs-flops", True),
        Card("predicted speedup", f"{speed:.2f}×", "1 / FLOPs ratio", "vs-speedup", True),
        Card("parameters", fmt_params(c.params), f"{100 * c.params_ratio:.1f}% of {fmt_params(c.dense_params)}",
             "vs-params"),
        Card("heads", f"{heads}/{s.depth * s.num_heads}", "with at least one dim", "vs-heads"),
        Card("attention dims", f"{attn_kept}/{plan.attn.size}", f"{100 * attn_kept / plan.attn.size:.0f}% kept",
             "vs-dims"),
        Card("MLP units", f"{mlp_kept}/{plan.mlp.size}", f"{100 * mlp_kept / plan.mlp.size:.0f}% kept", "vs-mlp"),
        Card("tokens", f"{tok_kept}/{plan.token.size}",
             f"(layer, patch) pairs; last layer {int(plan.token[-1].sum())}/{s.num_patches}", "vs-tokens"),
    ]


def budget_stamp(plan: SlimPlan) -> str:
    """The budget a view was drawn for, in one line (FLOPs and kept units, as the readout cards say them).

    Every view that is not redrawn together with the readout carries it, so a page never shows two
    budgets without saying so (and tests can check that all views agree).
    """
    attn, mlp, tok = int(plan.attn.sum()), int(plan.mlp.sum()), int(plan.token.sum())
    return (f"{100 * plan.cost.flops_ratio:.1f}% FLOPs · {attn}/{plan.attn.size} attention dims · "
            f"{mlp}/{plan.mlp.size} MLP units · {tok}/{plan.token.size} tokens")


def rounding_note(plan: SlimPlan) -> str:
    """A sentence about width rounding, or '' when the plan keeps exact widths."""
    q = int(plan.info.get("multiple") or 1)
    return (f"Kept widths are rounded up to multiples of {q} per head and per MLP (fast matrix kernels)."
            if q > 1 else "")


def layer_rows(plan: SlimPlan) -> list[list[Any]]:
    """The per-layer architecture of a plan, one row per block (columns: ``TABLE_HEADERS``)."""
    s = plan.spec
    return [[r["layer"], f"{r['heads']}/{s.num_heads}", " ".join(str(x) for x in r["dims_per_head"]),
             f"{r['attn_dims']}/{s.attn_dim}", f"{r['mlp']}/{s.mlp_hidden}", f"{r['tokens']}/{s.num_patches}",
             round(r["macs"] / 1e6, 3), round(100 * r["macs_ratio"], 1)] for r in plan.layers()]


def table_total(plan: SlimPlan) -> tuple[str, str]:
    """(MFLOPs, % of dense) of the whole model, patch embedding and head included."""
    c = plan.cost
    return f"{c.macs / 1e6:.3f}", f"{100 * c.flops_ratio:.1f}"
