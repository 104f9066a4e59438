"""Which timm ViT architectures with pretrained weights ViT-Slim accepts, by timm class.

Every distinct architecture name of ``timm.list_models(pretrained=True)`` (tags dropped) that starts with
``vit_``, ``deit``, ``eva``, ``beit``, ``flexivit``, ``samvit`` or ``naflex`` is built on the meta device
(shapes only, no weights, no download) and given to ``add_masks``; accepted names also get their dense
cost (``count_cost``). Prints one row per timm class (accepted / refused) and, for refused names, the
reason ``add_masks`` gave, grouped.

    python benchmarks/bench_coverage.py [--names]   # --names: also list every refused name
"""
from __future__ import annotations

import argparse
import collections
import sys
import warnings
from pathlib import Path

import timm
import torch
from timm.models import split_model_name_tag

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitslim_core import add_masks, count_cost  # noqa: E402
from vitslim_core.errors import VitSlimError  # noqa: E402

PREFIXES = ("vit_", "deit", "eva", "beit", "flexivit", "samvit", "naflex")


def architecture_names() -> list[str]:
    names = {split_model_name_tag(n)[0] for n in timm.list_models(pretrained=True)}
    return sorted(n for n in names if n.startswith(PREFIXES))


def try_name(name: str) -> tuple[str, str | None]:
    """(timm class, None if accepted else the refusal reason)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    cls = type(model).__name__
    try:
        add_masks(model)
        count_cost(model)
    except VitSlimError as e:
        return cls, str(e)
    return cls, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", action="store_true", help="list every refused name with its reason")
    args = ap.parse_args()
    names = architecture_names()
    by_class: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    reasons: dict[str, list[str]] = collections.defaultdict(list)
    for name in names:
        cls, reason = try_name(name)
        by_class[cls][reason is not None] += 1
        if reason is not None:
            reasons[f"{cls}: {reason}"].append(name)
    width = max(len(c) for c in by_class) + 2
    print(f"{'timm class':<{width}}{'accepted':>9}{'refused':>9}")
    for cls, (ok, bad) in sorted(by_class.items(), key=lambda kv: -sum(kv[1])):
        print(f"{cls:<{width}}{ok:>9}{bad:>9}")
    accepted = sum(v[0] for v in by_class.values())
    print(f"{'total':<{width}}{accepted:>9}{len(names) - accepted:>9}")
    print(f"\naccepted {accepted} of {len(names)} architecture names\n")
    print("refusals (count, class: reason):")
    for why, group in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        print(f"{len(group):>4}  {why}")
        if args.names:
            print("      " + ", ".join(group))


if __name__ == "__main__":
    main()
