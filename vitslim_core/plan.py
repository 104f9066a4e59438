"""SlimPlan (which units survive) and the budget solvers.

Units and their order of removal
--------------------------------
Every dimension is a list of *units*, each with an importance |score|:

* attention: one head-dim (mode "head_dim"), one whole head ("head") or one dim shared by all heads of
  a layer ("uniform");
* MLP: one hidden unit;
* tokens: one (layer, patch) pair. Token masks must be monotone (a patch dropped at layer l stays
  dropped later), so a pair's importance is e[l, p] = max over l' >= l of |value[l', p]|; thresholding e
  is exactly "one global threshold, then OR from the last layer back" of the paper. Ties go to the later
  layer first, so every prefix of the order is monotone, one (layer, patch) pair at a time. The best patch
  of the last layer is never removed, so every layer keeps at least one patch.

Within a dimension, units of all layers are ranked together (one global threshold, as in the paper):
keeping a fraction ``r`` keeps the ``r * n`` most important units. ``plan_for_ratios`` does exactly that.

How ``plan_for_flops`` splits a budget
--------------------------------------
The solver removes units from all three dimensions at once, at speeds given by ``mix`` (default equal):
after "time" t it has removed the fraction ``min(1, mix_k * t)`` of dimension k, lowest importance first.
Merging the three removal lists by time gives one sequence of single-unit removals; the exact FLOPs after
every prefix of it are computed in one vectorised pass, and the prefix whose FLOPs are closest to the
target is the plan. So, with the default mix, a 60% budget removes the same fraction of attention dims,
MLP units and (layer, token) pairs, and the fraction is chosen so the cost is right.
Because every budget picks a prefix of the same sequence, a larger budget never removes a unit that a
smaller one kept (DESIGN invariant 5). Dimensions the search did not train get mix 0 (never pruned).

``multiple`` rounds each head's kept dims (and each layer's MLP width) UP to a multiple, adding back the
next-best units of that head/layer; the FLOPs curve is computed with the rounded widths, so costs stay exact.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .cost import Cost, count_cost, fixed_macs, layer_macs, pool_macs
from .errors import BudgetError, ScoreFileError
from .io import atomic_write_json, read_json
from .scores import MaskScores
from .spec import ArchSpec

PLAN_FORMAT = "vitslim-plan"
PLAN_VERSION = 1
DEFAULT_TOL = 0.005  # relative FLOPs error accepted by plan_for_flops


class BudgetWarning(UserWarning):
    """The requested FLOPs budget can only be approximated."""


@dataclass
class SlimPlan:
    """Boolean keep-masks of every unit: attn (L, H, d), mlp (L, h), token (L, M) patch positions.

    Prefix tokens are always kept and are not part of ``token``.
    """

    spec: ArchSpec
    attn: np.ndarray
    mlp: np.ndarray
    token: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    _cost: Cost | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.attn = np.asarray(self.attn, dtype=bool)
        self.mlp = np.asarray(self.mlp, dtype=bool)
        self.token = np.asarray(self.token, dtype=bool)
        self.validate()

    @classmethod
    def full(cls, spec: ArchSpec) -> "SlimPlan":
        """The plan that keeps everything."""
        L = spec.depth
        return cls(spec, np.ones((L, spec.num_heads, spec.head_dim), bool), np.ones((L, spec.mlp_hidden), bool),
                   np.ones((L, spec.num_patches), bool), {"method": "full"})

    def validate(self) -> None:
        s = self.spec
        for name, arr, shape in (("attn", self.attn, (s.depth, s.num_heads, s.head_dim)),
                                 ("mlp", self.mlp, (s.depth, s.mlp_hidden)),
                                 ("token", self.token, (s.depth, s.num_patches))):
            if arr.shape != shape:
                raise ScoreFileError(f"plan {name} masks have shape {arr.shape}, expected {shape}")
        if s.num_prefix_tokens == 0 and not self.token.any(axis=1).all():
            raise BudgetError("a plan must keep at least one patch token in every layer of a model without prefix tokens")
        if (self.token[1:] & ~self.token[:-1]).any():
            raise ScoreFileError("plan token masks are not monotone (a token re-appears after being dropped)")

    # ------------------------------------------------------------------ numbers
    @property
    def cost(self) -> Cost:
        if self._cost is None:
            self._cost = count_cost(self.spec, self)
        return self._cost

    @property
    def macs(self) -> int:
        return self.cost.macs

    @property
    def params(self) -> int:
        return self.cost.params

    @property
    def flops_ratio(self) -> float:
        return self.cost.flops_ratio

    def widths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-layer (attention dims, MLP units, tokens including the prefix tokens)."""
        s = self.spec
        return (self.attn.reshape(s.depth, -1).sum(1), self.mlp.sum(1), s.num_prefix_tokens + self.token.sum(1))

    def kept_fractions(self) -> dict[str, float]:
        return {"attn": float(self.attn.mean()), "mlp": float(self.mlp.mean()), "token": float(self.token.mean())}

    def layers(self) -> list[dict[str, Any]]:
        """Per-layer kept counts and MACs."""
        s = self.spec
        A, h, N = self.widths()
        macs = layer_macs(s, A, h, N)
        dense = int(layer_macs(s, s.attn_dim, s.mlp_hidden, s.num_tokens))
        dims = self.attn.sum(2)
        return [{"layer": l, "heads": int((dims[l] > 0).sum()), "dims_per_head": [int(x) for x in dims[l]],
                 "attn_dims": int(A[l]), "mlp": int(h[l]), "tokens": int(N[l] - s.num_prefix_tokens),
                 "macs": int(macs[l]), "macs_ratio": float(macs[l] / dense)} for l in range(s.depth)]

    def summary(self) -> dict[str, Any]:
        """JSON-able digest: what the app's endpoints return."""
        c = self.cost
        return {"flops": c.macs, "gflops": c.gflops, "flops_ratio": c.flops_ratio, "params": c.params,
                "params_ratio": c.params_ratio, "dense_flops": c.dense_macs, "dense_params": c.dense_params,
                "kept": self.kept_fractions(), "layers": self.layers(), "info": dict(self.info)}

    def table(self) -> str:
        """A per-layer text table (heads kept, dims per head, MLP width, tokens kept, FLOPs)."""
        s = self.spec
        rows = [("layer", "heads", "dims per head", "MLP", "tokens", "MFLOPs", "% of layer")]
        for r in self.layers():
            rows.append((str(r["layer"]), f"{r['heads']}/{s.num_heads}", " ".join(str(x) for x in r["dims_per_head"]),
                         f"{r['mlp']}/{s.mlp_hidden}", f"{r['tokens']}/{s.num_patches}",
                         f"{r['macs'] / 1e6:.2f}", f"{100 * r['macs_ratio']:.1f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
        c = self.cost
        lines.append(f"total: {c.gflops:.4g} GFLOPs ({100 * c.flops_ratio:.1f}% of {c.dense_macs / 1e9:.4g}), "
                     f"{c.params / 1e6:.3f} M params ({100 * c.params_ratio:.1f}%)")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        c = self.cost
        layers = [{"heads": [np.flatnonzero(hd).tolist() for hd in self.attn[l]],
                   "mlp": np.flatnonzero(self.mlp[l]).tolist(),
                   "tokens": np.flatnonzero(self.token[l]).tolist()} for l in range(self.spec.depth)]
        return {"format": PLAN_FORMAT, "format_version": PLAN_VERSION, "arch": self.spec.to_dict(),
                "flops": c.macs, "params": c.params, "dense_flops": c.dense_macs, "dense_params": c.dense_params,
                "flops_ratio": c.flops_ratio, "info": self.info, "layers": layers}

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> "SlimPlan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise ScoreFileError(f"{source} is not a vitslim plan")
        if d.get("format_version") != PLAN_VERSION:
            raise ScoreFileError(f"{source} has plan format version {d.get('format_version')!r}; "
                                 f"this vitslim reads version {PLAN_VERSION}")
        try:
            spec = ArchSpec.from_dict(d["arch"], error=ScoreFileError)
            L, H, hd, hm, M = spec.depth, spec.num_heads, spec.head_dim, spec.mlp_hidden, spec.num_patches
            layers = d["layers"]
            if not isinstance(layers, list) or len(layers) != L:
                raise ValueError(f"expected {L} layers")
            attn = np.zeros((L, H, hd), bool)
            mlp = np.zeros((L, hm), bool)
            token = np.zeros((L, M), bool)
            for l, lay in enumerate(layers):
                if len(lay["heads"]) != H:
                    raise ValueError(f"layer {l} lists {len(lay['heads'])} heads, expected {H}")
                for h, idx in enumerate(lay["heads"]):
                    attn[l, h, _indices(idx, hd, f"layer {l} head {h}")] = True
                mlp[l, _indices(lay["mlp"], hm, f"layer {l} mlp")] = True
                token[l, _indices(lay["tokens"], M, f"layer {l} tokens")] = True
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ScoreFileError(f"{source} is damaged ({e})") from None
        try:
            plan = cls(spec, attn, mlp, token, dict(d.get("info") or {}))
        except (BudgetError, TypeError, ValueError) as e:
            raise ScoreFileError(f"{source} is damaged ({e})") from None
        if "flops" in d and d["flops"] != plan.macs:
            raise ScoreFileError(f"{source} is inconsistent: it states {d['flops']} FLOPs, its masks cost {plan.macs}")
        return plan

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SlimPlan":
        return cls.from_dict(read_json(path, "plan file"), source=f"plan file {path}")


def _indices(idx: Any, n: int, where: str) -> np.ndarray:
    arr = np.asarray(idx)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: indices must be a list of integers")
    if arr.min() < 0 or arr.max() >= n or len(np.unique(arr)) != len(arr):
        raise ValueError(f"{where}: indices out of range 0..{n - 1} or repeated")
    return arr


# ====================================================================== the removal order
def _round_up(c: np.ndarray, q: int, n: int) -> np.ndarray:
    return np.minimum(n, -(-c // q) * q) if q > 1 else c


@dataclass
class _Dim:
    """One dimension's units in removal order."""

    order: np.ndarray      # unit ids (flat index into the dimension's score array), first removed first
    group: np.ndarray      # group id of each unit, indexed by unit id
    pos: np.ndarray        # position of each unit inside its group's removal list, indexed by unit id
    group_size: np.ndarray  # units per group
    total: int             # all units of the dimension (incl. ones never removed)


class RemovalOrder:
    """All units of a MaskScores in one removal sequence, with the exact FLOPs after every prefix."""

    def __init__(self, scores: MaskScores, mix: Sequence[float] = (1.0, 1.0, 1.0), multiple: int = 1) -> None:
        if len(mix) != 3 or any((not math.isfinite(w)) or w < 0 for w in mix) or not any(w > 0 for w in mix):
            raise BudgetError("mix must be three non-negative weights (attn, mlp, token), not all zero")
        if int(multiple) < 1:
            raise BudgetError("multiple must be a positive integer")
        self.scores, self.spec, self.mix, self.q = scores, scores.spec, tuple(float(w) for w in mix), int(multiple)
        self.dims = {"attn": self._attn_dim(), "mlp": self._ranked(scores.mlp_values(), groups_per_layer=1),
                     "token": self._token_dim()}
        self._build_sequence()

    # -- units of each dimension
    @staticmethod
    def _sort(imp: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
        flat = imp.reshape(-1)
        keys = [np.arange(flat.size)] + ([tiebreak.reshape(-1)] if tiebreak is not None else []) + [flat]
        return np.lexsort(keys)  # ascending importance, then tiebreak, then index

    @staticmethod
    def _positions(order: np.ndarray, group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
        g = group[order]
        size = np.bincount(group, minlength=n_groups)  # all units, removable or not
        removable = np.bincount(g, minlength=n_groups)
        # rank inside group along the removal order: a stable sort by group keeps the removal order
        by_group = np.argsort(g, kind="stable")
        starts = np.concatenate([[0], np.cumsum(removable)[:-1]])
        pos = np.full(group.size, np.iinfo(np.int64).max, dtype=np.int64)  # never removed: always kept
        pos[order[by_group]] = np.arange(order.size) - starts[g[by_group]]
        return pos, size

    def _ranked(self, values: np.ndarray, groups_per_layer: int) -> _Dim:
        imp = np.abs(values)
        L = imp.shape[0]
        per_layer = imp[0].size
        group = (np.arange(imp.size) // (per_layer // groups_per_layer)).astype(np.int64)
        order = self._sort(imp)
        pos, size = self._positions(order, group, L * groups_per_layer)
        return _Dim(order, group, pos, size, imp.size)

    def _attn_dim(self) -> _Dim:
        s, mode = self.spec, self.scores.attn_mode
        imp = self.scores.attn_units()
        if mode == "head_dim":
            return self._ranked(imp, groups_per_layer=s.num_heads)  # a group is one head
        if mode == "head":
            return self._ranked(imp, groups_per_layer=s.num_heads)  # a group is one head (one unit)
        return self._ranked(imp, groups_per_layer=1)  # uniform: a group is one layer's shared dims

    def _token_dim(self) -> _Dim:
        s = self.spec
        imp = np.abs(self.scores.token_values())  # (L, M)
        eff = np.maximum.accumulate(imp[::-1], axis=0)[::-1]  # e[l,p] = max over l' >= l
        layer = np.broadcast_to(np.arange(s.depth)[:, None], eff.shape)
        order = self._sort(eff, tiebreak=-layer)  # equal e: later layer removed first
        # the last layer's best patch stays everywhere, so every layer keeps >= 1 patch
        best = order[-1] % s.num_patches
        keep_forever = (np.arange(eff.size) % s.num_patches) == best
        order = order[~keep_forever[order]]
        group = (np.arange(eff.size) // s.num_patches).astype(np.int64)
        pos, size = self._positions(order, group, s.depth)
        return _Dim(order, group, pos, size, eff.size)

    # -- the merged sequence and its FLOPs curve
    def _unit_sizes(self) -> tuple[int, int]:
        """(heads sharing one attention unit, dims per attention unit)."""
        s, mode = self.spec, self.scores.attn_mode
        return {"head_dim": (1, 1), "head": (1, s.head_dim), "uniform": (s.num_heads, 1)}[mode]

    def _width_deltas(self, name: str) -> np.ndarray:
        """Change of the layer width (attention dims / MLP units / tokens) at each removal of a dimension."""
        s, d = self.spec, self.dims[name]
        if name == "token":
            return -np.ones(d.order.size, dtype=np.int64)
        j = d.pos[d.order]  # units of the group removed before this one
        n = d.group_size[d.group[d.order]]
        if name == "attn":
            heads, dims = self._unit_sizes()
            if self.scores.attn_mode == "head":
                return -np.full(d.order.size, s.head_dim, dtype=np.int64)
            return heads * (_round_up(n - j - 1, self.q, n) - _round_up(n - j, self.q, n)) * dims
        return _round_up(n - j - 1, self.q, n) - _round_up(n - j, self.q, n)

    def _build_sequence(self) -> None:
        s = self.spec
        names = ("attn", "mlp", "token")
        times, kinds, idx = [], [], []
        for k, name in enumerate(names):
            d, w = self.dims[name], self.mix[k]
            if w <= 0 or d.order.size == 0:
                continue
            n = d.order.size
            times.append((np.arange(1, n + 1) / d.total) / w)
            kinds.append(np.full(n, k))
            idx.append(np.arange(n))
        if not times:  # nothing removable (e.g. one patch and only tokens allowed): only the full plan
            times, kinds, idx = [np.zeros(0)], [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        t = np.concatenate(times)
        kind = np.concatenate(kinds)
        pos = np.concatenate(idx)
        seq = np.lexsort((kind, t))
        self.kind, self.pos_in_dim = kind[seq], pos[seq]  # event e removes dims[kind].order[pos_in_dim]
        E = seq.size
        L = s.depth
        widths = {"attn": s.attn_dim, "mlp": s.mlp_hidden, "token": s.num_tokens}
        state = {}
        for k, name in enumerate(names):
            deltas = np.zeros(E, dtype=np.int64)
            layer = np.zeros(E, dtype=np.int64)
            sel = self.kind == k
            if sel.any():
                d = self.dims[name]
                grp = d.group[d.order[self.pos_in_dim[sel]]]
                layer[sel] = grp * L // d.group_size.size
                deltas[sel] = self._width_deltas(name)[self.pos_in_dim[sel]]
            m = np.zeros((E + 1, L), dtype=np.int64)
            m[np.arange(1, E + 1), layer] = deltas
            state[name] = widths[name] + np.cumsum(m, axis=0)  # (E+1, L) width of each layer after e events
        self.macs = (fixed_macs(s) + layer_macs(s, state["attn"], state["mlp"], state["token"]).sum(1)
                     + pool_macs(s, state["token"][:, -1]))
        self.dense_macs = int(self.macs[0])
        self.counts = np.zeros((E + 1, 3), dtype=np.int64)  # units removed per dimension after e events
        for k in range(3):
            self.counts[1:, k] = np.cumsum(self.kind == k)

    # -- plans
    def plan(self, removed: Sequence[int], info: dict[str, Any] | None = None) -> SlimPlan:
        """The plan after removing the first ``removed[k]`` units of each dimension (attn, mlp, token)."""
        s = self.spec
        masks = {}
        for k, name in enumerate(("attn", "mlp", "token")):
            d = self.dims[name]
            r = int(min(max(removed[k], 0), d.order.size))
            gone = np.bincount(d.group[d.order[:r]], minlength=d.group_size.size)
            n = d.group_size
            if name != "token" and not (name == "attn" and self.scores.attn_mode == "head"):
                gone = n - _round_up(n - gone, self.q, n)
            masks[name] = d.pos >= gone[d.group]
        a = masks["attn"]
        mode = self.scores.attn_mode
        if mode == "head":
            a = np.repeat(a.reshape(s.depth, s.num_heads, 1), s.head_dim, axis=2)
        elif mode == "uniform":
            a = np.repeat(a.reshape(s.depth, 1, s.head_dim), s.num_heads, axis=1)
        return SlimPlan(s, a.reshape(s.depth, s.num_heads, s.head_dim), masks["mlp"].reshape(s.depth, -1),
                        masks["token"].reshape(s.depth, -1), dict(info or {}))

    def ratios_to_removed(self, attn: float, mlp: float, token: float) -> list[int]:
        out = []
        for name, r in zip(("attn", "mlp", "token"), (attn, mlp, token)):
            _check_ratio(r, f"{name} keep ratio")
            d = self.dims[name]
            out.append(int(min(d.order.size, round((1.0 - r) * d.total))))
        return out

    def nearest(self, ratio: float) -> int:
        """Index of the prefix whose FLOPs are closest to ``ratio`` of dense (ties keep more)."""
        target = ratio * self.dense_macs
        neg = -self.macs  # non-decreasing
        i = int(np.searchsorted(neg, -target, side="left"))
        cands = [c for c in (i - 1, i) if 0 <= c < self.macs.size]
        return min(cands, key=lambda c: (abs(self.macs[c] - target), c))

    @property
    def min_ratio(self) -> float:
        return float(self.macs[-1] / self.dense_macs)


def _check_ratio(r: float, what: str) -> None:
    try:
        ok = 0.0 < float(r) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise BudgetError(f"{what} must be in (0, 1], got {r!r}")


def default_multiple(spec: ArchSpec) -> int:
    """Width rounding used when none is given: 8 for ViT/DeiT-sized heads, 1 for tiny models.

    Measured on DeiT-S (CPU, batch 32): odd widths such as 1070 run matmuls up to 40% slower than
    1072, and rounding to 8 raised the speedup/FLOPs efficiency from ~0.75-0.83 to ~0.9-1.0. Tiny
    heads (the digits demo has 16 dims per head) would lose too much resolution, so they stay at 1.
    """
    return 8 if spec.head_dim >= 32 and spec.head_dim % 8 == 0 and spec.mlp_hidden % 8 == 0 else 1


def removal_order(scores: MaskScores, mix: Sequence[float] | None = None, multiple: int | None = None) -> RemovalOrder:
    """The (cached) removal order of a MaskScores; mix defaults to 1 for searched dimensions, 0 otherwise."""
    if multiple is None:
        multiple = default_multiple(scores.spec)
    if mix is None:
        searched = scores.searched()
        mix = tuple(1.0 if searched[k] else 0.0 for k in ("attn", "mlp", "token"))
    key = ("order", tuple(float(w) for w in mix), int(multiple), scores.fingerprint())
    if key not in scores._cache:
        scores._cache[key] = RemovalOrder(scores, mix, multiple)
    return scores._cache[key]


def plan_for_ratios(scores: MaskScores, attn: float = 1.0, mlp: float = 1.0, token: float = 1.0,
                    multiple: int = 1) -> SlimPlan:
    """Keep the given fraction of each dimension's units, ranked globally over layers (the paper's rule).

    Args:
        scores: searched scores.
        attn: fraction of attention units kept (head-dims, heads or shared dims by mode).
        mlp: fraction of MLP hidden units kept.
        token: fraction of (layer, patch) pairs kept after making token masks monotone.
        multiple: round kept widths per head/layer up to this multiple (default 1: exactly the fractions;
            None: ``default_multiple``, faster kernels but slightly more kept).
    """
    order = removal_order(scores, (1.0, 1.0, 1.0), multiple)
    multiple = order.q
    removed = order.ratios_to_removed(attn, mlp, token)
    return order.plan(removed, {"method": "ratios", "attn": attn, "mlp": mlp, "token": token, "multiple": multiple})


def plan_for_flops(scores: MaskScores, ratio: float, mix: Sequence[float] | None = None, multiple: int | None = None,
                   tol: float = DEFAULT_TOL, strict: bool = False) -> SlimPlan:
    """The plan whose exact FLOPs are closest to ``ratio`` of the dense model's.

    Args:
        scores: searched scores.
        ratio: FLOPs budget as a fraction of dense FLOPs, in (0, 1].
        mix: relative pruning speeds of (attn, mlp, token); None: 1 for searched dimensions, 0 otherwise.
        multiple: round kept widths per head/layer up to this multiple (None: ``default_multiple``).
        tol: accepted relative FLOPs error; outside it a BudgetWarning is issued (BudgetError if strict).
        strict: raise instead of warning when the budget can only be approximated.

    Raises:
        BudgetError: ratio outside (0, 1] or below the smallest reachable cost.
    """
    _check_ratio(ratio, "FLOPs budget")
    order = removal_order(scores, mix, multiple)
    if ratio < order.min_ratio * (1 - tol):
        raise BudgetError(f"impossible budget: {ratio:.3f} of dense FLOPs is below the smallest reachable "
                          f"{order.min_ratio:.3f} for this model")
    k = order.nearest(ratio)
    achieved = float(order.macs[k] / order.dense_macs)
    info = {"method": "flops", "target": float(ratio), "achieved": achieved, "mix": list(order.mix),
            "multiple": order.q}
    plan = order.plan(order.counts[k].tolist(), info)
    if abs(achieved - ratio) > tol * ratio:
        msg = (f"FLOPs budget {ratio:.4f} is not reachable within {100 * tol:.1f}%: "
               f"the nearest plan has {achieved:.4f}")
        if strict:
            raise BudgetError(msg)
        warnings.warn(msg, BudgetWarning, stacklevel=2)
    return plan


def official_token_fraction(scores: MaskScores, keep: float) -> float:
    """The fraction of (layer, patch) pairs the official code keeps when asked to keep ``keep`` of them.

    The official code takes the global threshold that keeps ``keep`` of the raw token scores, then ORs
    the masks from the last layer back (a patch kept at a later layer is kept at every earlier one), so it
    keeps more pairs than asked. ``plan_for_ratios(scores, token=official_token_fraction(scores, r))``
    keeps the same pairs as the official rule for ``r`` (the ranking is the same; only the count differs).
    """
    _check_ratio(keep, "token keep fraction")
    imp = np.abs(scores.token_values()).ravel()
    n_keep = max(1, int(round(keep * imp.size)))
    threshold = np.sort(imp)[::-1][n_keep - 1]
    eff = np.maximum.accumulate(np.abs(scores.token_values())[::-1], axis=0)[::-1]
    return float((eff >= threshold).mean())
