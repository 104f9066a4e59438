"""Front-ends over ``vitslim_core``: the Gradio exploration app (``app.ui.build_app``).

Importing this package is cheap; ``app.ui`` imports Gradio.
"""
from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("build_app", "launch_app"):
        from . import ui
        return getattr(ui, name)
    raise AttributeError(name)
