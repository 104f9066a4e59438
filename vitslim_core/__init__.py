"""vitslim: ViT-Slim search, budgets, physical slimming and retraining for timm vision transformers."""
from .cost import Cost, count_cost
from .errors import (BudgetError, DataError, PlanMismatchError, ScoreFileError, UnsupportedModelError,
                     VitSlimError)
from .masks import add_masks, get_masks, remove_masks
from .plan import BudgetWarning, SlimPlan, plan_for_flops, plan_for_ratios, removal_order
from .scores import MaskScores
from .spec import ArchSpec, arch_spec

__version__ = "0.1.0"

__all__ = [
    "ArchSpec", "BudgetError", "BudgetWarning", "Cost", "DataError", "MaskScores", "PlanMismatchError",
    "ScoreFileError", "SlimPlan", "UnsupportedModelError", "VitSlimError", "add_masks", "arch_spec",
    "count_cost", "get_masks", "plan_for_flops", "plan_for_ratios", "remove_masks", "removal_order",
]
