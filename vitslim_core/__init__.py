"""vitslim: ViT-Slim search, budgets, physical slimming and retraining for timm vision transformers."""
from .cost import Cost, count_cost
from .errors import (BudgetError, DataError, PlanMismatchError, ScoreFileError, UnsupportedModelError,
                     VitSlimError)
from .masks import add_masks, get_masks, remove_masks
from .plan import (BudgetWarning, SlimPlan, default_multiple, official_token_fraction, plan_for_flops,
                   plan_for_ratios, removal_order)
from .scores import MaskScores
# functions named like their modules are bound eagerly, so the name means the function
from .retrain import RetrainConfig, retrain
from .run_folder import load_run, run_status
from .search import SearchConfig, search
from .sweep import sweep
from .spec import ArchSpec, arch_spec

__version__ = "0.1.0"


def __getattr__(name: str):
    """Heavier parts (training, slimming, export) load on first use, so ``import vitslim_core`` stays fast."""
    lazy = {"slim_model": "slim", "apply_hard_masks": "slim", "save_slim": "slim", "load_slim": "slim",
            "export_program": "export", "export_onnx": "export", "evaluate": "train",
            "measure_latency": "bench"}
    if name in lazy:
        import importlib
        return getattr(importlib.import_module(f".{lazy[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ArchSpec", "BudgetError", "BudgetWarning", "Cost", "DataError", "MaskScores", "PlanMismatchError",
    "ScoreFileError", "SlimPlan", "UnsupportedModelError", "VitSlimError", "add_masks", "arch_spec",
    "count_cost", "get_masks", "official_token_fraction", "plan_for_flops", "plan_for_ratios", "remove_masks", "removal_order",
    "default_multiple", "slim_model", "apply_hard_masks", "save_slim", "load_slim", "export_program", "export_onnx",
    "search", "SearchConfig", "load_run", "run_status", "retrain", "RetrainConfig", "evaluate", "measure_latency", "sweep",
]
