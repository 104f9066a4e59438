"""Other ways to choose units, behind the interface of the searched scores; Torch-Pruning; a narrower ViT.

A *scorer* (Torch-Pruning style: a swappable object with one method) turns a model, and for some a few
calibration batches, into a ``MaskScores`` with the shapes of a run's scores: attention (H, d) per layer
(``head_dim`` mode), MLP (h,), tokens as raw scores whose ``token_value`` ranks the patches. So
``plan_for_flops`` and ``slim_model`` treat every method exactly as they treat a ViT-Slim search:

* ``RandomScorer(seed)``: uniform random importances in every dimension;
* ``MagnitudeScorer()``: per head-dim the L2 norm of its q, k and v rows of ``qkv`` (with their biases)
  and its ``proj`` column; per MLP unit the L2 norm of its ``fc1`` row (with its bias) and ``fc2``
  column. Tokens have no weights: a (layer, patch) pair scores the mean L2 norm of that patch's
  residual-stream activation entering the block over the calibration batches, divided by the layer's
  mean over patches (the residual norm grows with depth; without the division the last layers'
  norms would decide every layer, because token masks are made monotone);
* ``TaylorScorer()``: first-order Taylor, ``|w * dL/dw|`` summed over the weights (and biases) of a
  unit as above, per batch, summed over the batches; tokens ``|m * dL/dm|`` of a token mask m = 1.

Importances become token raw scores by ``raw = 3 * imp / max(imp)`` (monotone, so the ranking is kept).

``prune_with_torch_pruning`` prunes a copy of a dense timm ViT with Torch-Pruning (``pip install
torch-pruning``, the ``compare`` extra): attention head dims (the same dims in every head of a layer,
TP's rule) and MLP channels, never the residual width and never tokens. TP's default local pruning
removes the same fraction of every layer; the fraction is bisected to the MACs of a target (first one
fraction for both, then the MLP fraction alone, because one head dim is a coarse step). The result's
structure is also returned as a ``SlimPlan`` (all tokens kept), so ``count_cost`` gives its exact MACs;
``measured_macs`` checks them with ``FlopCounterMode``.

``narrow_recipe`` gives the recipe of the same ViT made narrower (residual width, then MLP width) to
a FLOPs ratio: the "just train a smaller dense model" baseline.
"""
from __future__ import annotations

import abc
import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import BudgetError, VitSlimError
from .masks import TOKEN_INIT, TOKEN_SCALE, add_masks, get_masks, remove_masks
from .scores import MaskScores

Batch = tuple[torch.Tensor, torch.Tensor]


# ====================================================================== helpers
def calibration_batches(dataset: Any, n_batches: int = 4, batch_size: int = 64, seed: int = 0) -> list[Batch]:
    """``n_batches`` fixed batches of ``(images, labels)`` drawn without replacement from ``dataset``."""
    n = len(dataset)
    if n == 0 or n_batches < 1 or batch_size < 1:
        raise VitSlimError("calibration needs a non-empty dataset, at least one batch and a positive batch size")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for b in range(n_batches):
        idx = order[b * batch_size:(b + 1) * batch_size]
        if not idx:
            break
        items = [dataset[i] for i in idx]
        out.append((torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])))
    return out


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without masks, in eval mode."""
    net = copy.deepcopy(model)
    if get_masks(net) is not None:
        remove_masks(net)
    return net.eval()


def token_raw(importance: torch.Tensor) -> list[torch.Tensor]:
    """Non-negative (L, M) importances as token raw scores in [0, 3], same order (global, all layers)."""
    imp = importance.double().clamp_min(0)
    top = float(imp.max()) if imp.numel() else 0.0
    raw = torch.full_like(imp, TOKEN_INIT) if top <= 0 or not math.isfinite(top) else TOKEN_INIT * imp / top
    return [r.float() for r in raw]


def _scores(like: MaskScores, attn: Sequence[torch.Tensor], mlp: Sequence[torch.Tensor],
            token: Sequence[torch.Tensor], info: dict[str, Any]) -> MaskScores:
    meta = {**like.meta, "baseline": info}
    return MaskScores(like.spec, "head_dim", [a.detach().float().cpu() for a in attn],
                      [m.detach().float().cpu() for m in mlp], [t.detach().float().cpu() for t in token], meta)


def _heads(blk: nn.Module) -> tuple[int, int]:
    return int(blk.attn.num_heads), int(blk.attn.head_dim)


def _need_batches(batches: Iterable[Batch], who: str) -> list[Batch]:
    batches = list(batches)
    if not batches:
        raise VitSlimError(f"{who} needs calibration batches (calibration_batches(train_set))")
    return batches


# ====================================================================== scorers
class Scorer(abc.ABC):
    """Turns a model (and calibration batches) into importances shaped like a run's scores.

    Attributes:
        name: short name for tables.
        tokens: how the token dimension is scored (weights say nothing about tokens).
    """

    name: str = "scorer"
    tokens: str = ""

    @abc.abstractmethod
    def score(self, model: nn.Module, like: MaskScores, batches: Iterable[Batch] = ()) -> MaskScores:
        """Importance of every unit of ``model`` as a ``MaskScores`` with the shapes of ``like``.

        Args:
            model: a timm ViT of ``like``'s architecture (masks, if any, are ignored).
            like: scores of the run (architecture and metadata are copied; values are not used).
            batches: calibration batches of training data, for the scorers that read data.
        """

    def __call__(self, model: nn.Module, like: MaskScores, batches: Iterable[Batch] = ()) -> MaskScores:
        return self.score(model, like, batches)

    def describe(self) -> dict[str, Any]:
        return {"scorer": self.name, "tokens": self.tokens}


@dataclass
class RandomScorer(Scorer):
    """Uniform random importances (seeded) in all three dimensions."""

    seed: int = 0
    name: str = "random"
    tokens: str = "random"

    def score(self, model: nn.Module, like: MaskScores, batches: Iterable[Batch] = ()) -> MaskScores:
        s = like.spec
        g = torch.Generator().manual_seed(self.seed)
        attn = [torch.rand(s.num_heads, s.head_dim, generator=g) for _ in range(s.depth)]
        mlp = [torch.rand(s.mlp_hidden, generator=g) for _ in range(s.depth)]
        token = token_raw(torch.rand(s.depth, s.num_patches, generator=g))
        return _scores(like, attn, mlp, token, {**self.describe(), "seed": self.seed})


@dataclass
class MagnitudeScorer(Scorer):
    """Weight norms per unit; tokens by their mean activation norm per layer (see the module docstring)."""

    name: str = "magnitude"
    tokens: str = "mean activation norm per (layer, patch), normalised per layer"

    @torch.no_grad()
    def score(self, model: nn.Module, like: MaskScores, batches: Iterable[Batch] = ()) -> MaskScores:
        batches = _need_batches(batches, "MagnitudeScorer (token activations)")
        net = plain_copy(model)
        like.spec.check_same_shape(_spec(net), "model")
        attn, mlp = [], []
        for blk in net.blocks:
            H, d = _heads(blk)
            qkv, proj = blk.attn.qkv, blk.attn.proj
            sq = qkv.weight.pow(2).sum(1)  # (3 * H * d,), rows laid out (3, H, d)
            if qkv.bias is not None:
                sq = sq + qkv.bias.pow(2)
            sq = sq.view(3, H, d).sum(0) + proj.weight.pow(2).sum(0).view(H, d)
            attn.append(sq.sqrt())
            fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
            sm = fc1.weight.pow(2).sum(1) + fc2.weight.pow(2).sum(0)
            if fc1.bias is not None:
                sm = sm + fc1.bias.pow(2)
            mlp.append(sm.sqrt())
        norms = _token_activation_norms(net, batches, like.spec.num_prefix_tokens)  # (L, M)
        norms = norms / norms.mean(dim=1, keepdim=True).clamp_min(1e-12)
        return _scores(like, attn, mlp, token_raw(norms), {**self.describe(), "batches": len(batches)})


def _token_activation_norms(net: nn.Module, batches: list[Batch], prefix: int) -> torch.Tensor:
    """Mean L2 norm of each patch token entering each block, (L, M)."""
    sums: list[torch.Tensor] = [torch.zeros(0)] * len(net.blocks)
    count = 0
    hooks = []

    def hook(l: int):
        def fn(module: nn.Module, args: tuple) -> None:
            x = args[0]  # (B, N, C)
            v = x[:, prefix:, :].float().norm(dim=-1).sum(0)  # (M,)
            sums[l] = v if sums[l].numel() == 0 else sums[l] + v
        return fn

    for l, blk in enumerate(net.blocks):
        hooks.append(blk.register_forward_pre_hook(hook(l)))
    try:
        for x, _ in batches:
            net(x)
            count += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(sums) / max(1, count)


@dataclass
class TaylorScorer(Scorer):
    """First-order Taylor importance ``|w * dL/dw|`` per unit; tokens ``|m * dL/dm|`` of a token mask."""

    name: str = "taylor"
    tokens: str = "|m * dL/dm| of a token mask at m = 1"

    def score(self, model: nn.Module, like: MaskScores, batches: Iterable[Batch] = ()) -> MaskScores:
        batches = _need_batches(batches, "TaylorScorer")
        net = plain_copy(model)
        s = like.spec
        s.check_same_shape(_spec(net), "model")
        add_masks(net)  # all kept: the logits are unchanged; only the token masks' gradients are read
        masks = get_masks(net)
        for p in net.parameters():
            p.requires_grad_(True)
        L, H, d = s.depth, s.num_heads, s.head_dim
        attn = torch.zeros(L, H, d, dtype=torch.float64)
        mlp = torch.zeros(L, s.mlp_hidden, dtype=torch.float64)
        token = torch.zeros(L, s.num_patches, dtype=torch.float64)
        # m = tanh(raw) / tanh(3): dL/dm = dL/draw / (dm/draw), at raw = 3 where m = 1
        dm_draw = (1.0 - math.tanh(TOKEN_INIT) ** 2) / TOKEN_SCALE

        def wg(p: torch.Tensor) -> torch.Tensor:
            if p.grad is None:  # a unit the loss does not reach (e.g. an unused head)
                return torch.zeros(p.shape, dtype=torch.float64)
            return (p.detach() * p.grad).abs().double()

        for x, y in batches:
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            for l, blk in enumerate(net.blocks):
                qkv, proj, fc1, fc2 = blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2
                rows = wg(qkv.weight).sum(1)  # (3 * H * d,)
                if qkv.bias is not None:
                    rows = rows + wg(qkv.bias)
                attn[l] += rows.view(3, H, d).sum(0) + wg(proj.weight).sum(0).view(H, d)
                units = wg(fc1.weight).sum(1) + wg(fc2.weight).sum(0)
                if fc1.bias is not None:
                    units = units + wg(fc1.bias)
                mlp[l] += units
                token[l] += masks.token_scores.grad[l].detach().abs().double() / dm_draw
        return _scores(like, list(attn), list(mlp), token_raw(token), {**self.describe(), "batches": len(batches)})


SCORERS = {"random": RandomScorer, "magnitude": MagnitudeScorer, "taylor": TaylorScorer}


def _spec(model: nn.Module):
    from .spec import arch_spec
    return arch_spec(model)


# ====================================================================== costs measured by torch
def measured_macs(model: nn.Module, input_size: Sequence[int] | None = None) -> int:
    """MACs of one image's forward pass as ``torch.utils.flop_counter.FlopCounterMode`` counts them (/2),
    with fused attention switched off for the count (timm and slim attention alike)."""
    from torch.utils.flop_counter import FlopCounterMode
    from .bench import input_shape
    flags = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    was_training = model.training
    try:
        for m, _ in flags:
            m.fused_attn = False
        model.eval()
        x = torch.zeros(1, *(input_size or input_shape(model)))
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        for m, f in flags:
            m.fused_attn = f
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


# ====================================================================== Torch-Pruning
TP_IMPORTANCES = ("magnitude", "taylor")


@dataclass
class PrunedModel:
    """A model pruned by Torch-Pruning and its structure as a plan.

    Attributes:
        model: the pruned copy (timm modules with narrower linears; ``model.slim_plan`` is ``plan``).
        plan: kept head-dims and MLP units per layer; all tokens kept.
        attn_ratio, mlp_ratio: TP's per-layer pruning ratios of attention dims and MLP channels.
        importance: "magnitude" or "taylor".
    """

    model: nn.Module
    plan: Any
    attn_ratio: float
    mlp_ratio: float
    importance: str
    info: dict[str, Any] = field(default_factory=dict)


def _tp_importance(name: str):
    import torch_pruning as tp
    if name == "magnitude":
        return tp.importance.MagnitudeImportance()
    if name == "taylor":
        return tp.importance.TaylorImportance()
    raise VitSlimError(f"Torch-Pruning importance must be one of {', '.join(TP_IMPORTANCES)}, got {name!r}")


def _import_tp():
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        raise VitSlimError("Torch-Pruning is not installed: pip install 'vitslim[compare]' "
                           "(or pip install torch-pruning)") from None


def _tp_prune_once(base: nn.Module, spec, attn_ratio: float, mlp_ratio: float, importance: str,
                   grads: dict[str, torch.Tensor] | None):
    """Prune a copy of ``base`` with TP at the given per-layer ratios; returns (model, plan)."""
    import torch_pruning as tp
    from .plan import SlimPlan

    net = copy.deepcopy(base)
    if grads is not None:  # deepcopy drops .grad; TaylorImportance reads it
        for n, p in net.named_parameters():
            if n in grads:
                p.grad = grads[n].clone()
    qkvs = [blk.attn.qkv for blk in net.blocks]
    fc1s = [blk.mlp.fc1 for blk in net.blocks]
    keep = set(map(id, qkvs + fc1s))
    # everything but qkv (head dims) and fc1 (MLP channels) is left alone: the residual width stays
    ignored = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in keep]
    example = torch.zeros(1, spec.in_chans, *spec.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unwrapped parameters" (cls_token, pos_embed): never pruned here
        pruner = tp.pruner.MetaPruner(
            net, example, importance=_tp_importance(importance), global_pruning=False,
            pruning_ratio=attn_ratio, pruning_ratio_dict={m: mlp_ratio for m in fc1s},
            ignored_layers=ignored, num_heads={m: spec.num_heads for m in qkvs},
            prune_head_dims=True, prune_num_heads=False)
        removed = {id(m): set() for m in qkvs + fc1s}
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                mod = dep.target.module
                if id(mod) in removed and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                    removed[id(mod)].update(int(i) for i in idxs)
            group.prune()
    L, H, d, h = spec.depth, spec.num_heads, spec.head_dim, spec.mlp_hidden
    attn = np.ones((L, H, d), bool)
    mlp = np.ones((L, h), bool)
    for l, blk in enumerate(net.blocks):
        rows = np.zeros(3 * H * d, bool)
        rows[sorted(removed[id(qkvs[l])])] = True
        rows = rows.reshape(3, H, d)
        if not (rows[0] == rows[1]).all() or not (rows[0] == rows[2]).all():
            raise VitSlimError("Torch-Pruning removed different q, k and v dims; cannot describe it as a plan")
        attn[l] = ~rows[0]
        mlp[l, sorted(removed[id(fc1s[l])])] = False
        _fix_attention(blk.attn, d)
        if blk.attn.qkv.out_features != 3 * int(attn[l].sum()) or blk.mlp.fc1.out_features != int(mlp[l].sum()):
            raise VitSlimError("Torch-Pruning's pruned widths do not match the indices it reported")
    plan = SlimPlan(spec, attn, mlp, np.ones((L, spec.num_patches), bool),
                    {"method": "torch-pruning", "importance": importance, "attn_ratio": attn_ratio,
                     "mlp_ratio": mlp_ratio})
    net.slim_plan = plan
    for p in net.parameters():
        p.grad = None
    return net, plan


@torch.no_grad()
def _fix_attention(attn: nn.Module, orig_head_dim: int) -> None:
    """Make a TP-pruned timm Attention consistent: its head_dim/attn_dim attributes, and the ORIGINAL
    attention scale. timm's fused path uses SDPA's default 1/sqrt(new head_dim); folding
    sqrt(new/orig) into the q rows (and setting ``scale`` for the unfused path) keeps the pretrained
    function on the kept dims, as ``slim_model`` does."""
    H = int(attn.num_heads)
    d_new = attn.qkv.out_features // (3 * H)
    if d_new < 1:
        raise VitSlimError("Torch-Pruning removed every dim of an attention layer")
    attn.head_dim, attn.attn_dim = d_new, H * d_new
    attn.scale = d_new ** -0.5
    f = math.sqrt(d_new / orig_head_dim)
    attn.qkv.weight[: H * d_new] *= f
    if attn.qkv.bias is not None:
        attn.qkv.bias[: H * d_new] *= f


def prune_with_torch_pruning(model: nn.Module, flops: float, importance: str = "magnitude",
                             batches: Iterable[Batch] = (), tol: float = 0.005, iters: int = 14) -> PrunedModel:
    """Prune a copy of a dense timm ViT with Torch-Pruning to ``flops`` of its MACs.

    Args:
        model: the dense model (masks, if any, are ignored; the input is not modified).
        flops: target MACs as a fraction of the dense model's, in (0, 1].
        importance: "magnitude" (``tp.importance.MagnitudeImportance``) or "taylor"
            (``tp.importance.TaylorImportance``, gradients summed over ``batches``).
        batches: calibration batches (needed for "taylor").
        tol: relative MACs error above which a ``BudgetWarning`` is issued.
        iters: bisection steps per stage.
    """
    from .cost import count_cost
    from .plan import BudgetWarning
    from .spec import arch_spec

    _import_tp()
    if not 0 < flops <= 1:
        raise BudgetError(f"FLOPs budget must be in (0, 1], got {flops!r}")
    _tp_importance(importance)
    base = plain_copy(model)
    spec = arch_spec(base)
    grads = None
    if importance == "taylor":
        batches = _need_batches(batches, "Torch-Pruning's TaylorImportance")
        base.zero_grad(set_to_none=True)
        for x, y in batches:  # accumulated gradients, as TP's examples do
            F.cross_entropy(base(x), y).backward()
        grads = {n: p.grad.detach().clone() for n, p in base.named_parameters() if p.grad is not None}
        base.zero_grad(set_to_none=True)
    dense = count_cost(spec).macs
    target = flops * dense
    # at least one head dim and one MLP unit per layer (TP keeps int(n * (1 - ratio)) of n)
    hi = 1.0 - 1.0 / min(spec.head_dim, spec.mlp_hidden) - 1e-9
    tried: dict[tuple[float, float], tuple[float, Any]] = {}

    def cost(a: float, m: float) -> float:
        key = (round(a, 12), round(m, 12))
        if key not in tried:
            _, plan = _tp_prune_once(base, spec, a, m, importance, grads)
            tried[key] = (count_cost(spec, plan).macs, None)
        return tried[key][0]

    def bisect(f, lo: float, up: float) -> float:
        """The ratio in [lo, up] whose MACs are closest to the target (MACs fall as the ratio rises)."""
        best = min((lo, up), key=lambda r: abs(f(r) - target))
        for _ in range(iters):
            if abs(f(best) - target) <= 0.1 * tol * target:
                break
            mid = (lo + up) / 2
            c = f(mid)
            if abs(c - target) < abs(f(best) - target):
                best = mid
            if c > target:
                lo = mid
            else:
                up = mid
        return best

    a = m = bisect(lambda r: cost(r, r), 0.0, hi)
    if abs(cost(a, m) - target) > tol * target:
        m = bisect(lambda r: cost(a, r), 0.0, hi)
    net, plan = _tp_prune_once(base, spec, a, m, importance, grads)
    achieved = count_cost(spec, plan).macs / dense
    if abs(achieved - flops) > tol * flops:
        warnings.warn(f"Torch-Pruning reached {achieved:.4f} of dense FLOPs for a target of {flops:.4f}",
                      BudgetWarning, stacklevel=2)
    info = {"importance": importance, "attn_ratio": a, "mlp_ratio": m, "target": flops, "achieved": achieved,
            "global_pruning": False, "prune": "head dims (same in every head of a layer) and MLP channels",
            "tokens": "not pruned (Torch-Pruning prunes weights only)", "prunings_tried": len(tried) + 1}
    plan.info.update(info)
    return PrunedModel(net, plan, a, m, importance, info)


# ====================================================================== a narrower dense ViT
def narrow_recipe(recipe: dict[str, Any], flops: float, tol: float = 0.005) -> dict[str, Any]:
    """The recipe of the same ViT made narrower to ``flops`` of its dense MACs.

    The residual width C steps through multiples of the head count (heads stay, head_dim shrinks);
    for each C the MLP width h is solved for the target, and the candidate within ``tol`` whose
    h / C is closest to the original MLP ratio wins (the closest in MACs when none is within ``tol``).

    Returns:
        ``{"name", "kwargs"}`` with ``embed_dim`` and ``mlp_ratio`` set (``models.rebuild_model`` builds it).
    """
    from .cost import count_cost
    from .models import rebuild_model
    from .spec import arch_spec

    if not 0 < flops <= 1:
        raise BudgetError(f"FLOPs budget must be in (0, 1], got {flops!r}")

    def build(kwargs: dict[str, Any]):
        with torch.device("meta"):
            return arch_spec(rebuild_model({"name": recipe["name"], "kwargs": kwargs}))

    def macs(C: int, h: int) -> int:  # the cost model reads widths only: no model needed per candidate
        return count_cost(dataclasses.replace(s0, embed_dim=C, head_dim=C // H, mlp_hidden=h)).macs

    base_kw = dict(recipe.get("kwargs", {}))
    s0 = build(base_kw)
    target = flops * count_cost(s0).macs
    H, ratio0 = s0.num_heads, s0.mlp_hidden / s0.embed_dim
    if s0.head_dim * H != s0.embed_dim:
        raise VitSlimError(f"{recipe['name']}: narrowing needs heads * head_dim == embed_dim")
    cands = []
    for C in range(H, s0.embed_dim + 1, H):
        c1, c2 = macs(C, 1), macs(C, 2)
        h = int(round((target - c1) / (c2 - c1))) + 1
        if h >= 1:
            cands.append((abs(macs(C, h) - target) / target, abs(h / C - ratio0), C, h))
    if not cands:
        raise BudgetError(f"no narrower {recipe['name']} reaches {flops:.3f} of its FLOPs")
    good = [c for c in cands if c[0] <= tol]
    _, _, C, h = min(good, key=lambda c: c[1]) if good else min(cands)
    kw = {**base_kw, "embed_dim": C, "mlp_ratio": (h + 0.5) / C}  # timm's int(C * ratio) is then h
    built = build(kw)
    if (built.embed_dim, built.mlp_hidden) != (C, h) or count_cost(built).macs != macs(C, h):
        raise VitSlimError(f"{recipe['name']} narrowed to width {C}, MLP {h} did not build as expected")
    return {"name": recipe["name"], "kwargs": kw}
