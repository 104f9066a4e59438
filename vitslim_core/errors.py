"""Errors the engine raises on bad input. Front-ends print ``str(err)`` as one line."""


class VitSlimError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""


class UnsupportedModelError(VitSlimError):
    """The model has a part that ViT-Slim cannot mask or slim (names the part)."""


class ScoreFileError(VitSlimError):
    """A score, plan or slim-model file is missing, corrupt, foreign or of another version."""


class BudgetError(VitSlimError):
    """A budget outside (0, 1] or one that cannot be reached."""


class DataError(VitSlimError):
    """A dataset name or path that cannot be used."""


class PlanMismatchError(VitSlimError):
    """A plan or score file made for another architecture."""
