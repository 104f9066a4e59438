"""Accuracy vs FLOPs without retraining: slim the searched model at many budgets and evaluate each."""
from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence


from .io import atomic_write_bytes, atomic_write_json
from .plan import BudgetWarning, plan_for_flops
from .train import evaluate

DEFAULT_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def sweep(run: str | Path, budgets: Sequence[float] = DEFAULT_BUDGETS, data: str | None = None,
          batch_size: int = 128, device: str = "cpu", multiple: int | None = None,
          progress: Callable[[int, int, dict], None] | None = None, data_root: str | Path = "data",
          download: bool = False) -> list[dict[str, Any]]:
    """Evaluate the physically slimmed model of a run at each FLOPs budget (no retraining).

    Always on the test split (the numbers to publish), never on a validation split.

    Returns rows with target, flops_ratio, gflops, params, top1, top5, loss.
    """
    from .data import load_for
    from .run_folder import load_run
    from .slim import slim_model

    scores, model = load_run(run)
    bundle = load_for(scores.meta.get("data") or {}, data,
                      input_size=(scores.spec.in_chans, *scores.spec.img_size), data_root=data_root,
                      download=download)
    rows = []
    for i, b in enumerate(sorted(set(float(x) for x in budgets))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BudgetWarning)
            plan = plan_for_flops(scores, b, multiple=multiple)
        slim = slim_model(model, plan)
        ev = evaluate(slim, bundle.test, batch_size=batch_size, device=device)
        row = {"target": b, "flops_ratio": plan.flops_ratio, "gflops": plan.cost.gflops, "params": plan.params,
               "top1": ev["top1"], "top5": ev["top5"], "loss": ev["loss"], "kind": "slim (no retraining)"}
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(budgets), row)
    return rows


def write_sweep(rows: list[dict[str, Any]], out: str | Path) -> dict[str, Path]:
    """Write ``sweep.json``, ``sweep.csv`` and ``sweep.png`` into folder ``out``."""
    from .viz import accuracy_curve_figure
    out = Path(out)
    atomic_write_json(out / "sweep.json", {"rows": rows})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / "sweep.csv", buf.getvalue().encode())
    fig = accuracy_curve_figure(rows)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    atomic_write_bytes(out / "sweep.png", png.getvalue())
    return {"json": out / "sweep.json", "csv": out / "sweep.csv", "png": out / "sweep.png"}
