"""Command line of the app: ``vitslim app [RUN ...]`` and ``python -m vitslim_app [RUN ...]``.

This module imports nothing heavy, so ``vitslim --help`` stays fast; Gradio and torch are imported
when the app starts.

Start-up is mostly imports (torch and Gradio, about 4 s each on 2 busy cores). Gradio's own import
spends half of its time rewriting typing stubs (``skip_gradio_stub_writing``). Nothing else is loaded
before the page is on screen: warming up in the background while the browser loads the page (samples,
matplotlib) was measured to delay the maps by a second (one Python process, two busy cores); the
weights load after the first page is complete (``Explorer.page_ready``).
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path
from typing import Any, Sequence

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class _NoGradioStubs(importlib.abc.MetaPathFinder):
    """Finds ``gradio.component_meta`` like the normal path finder, and once it is loaded replaces its
    ``create_or_modify_pyi`` (called for every component class as Gradio imports) by a no-op."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "gradio.component_meta":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_patch(module: Any) -> None:
            exec_module(module)
            if callable(getattr(module, "create_or_modify_pyi", None)):
                module.create_or_modify_pyi = _no_stub
        loader.exec_module = exec_then_patch
        return spec


def _no_stub(*args: Any, **kwargs: Any) -> None:
    return None


def skip_gradio_stub_writing() -> None:
    """Make the coming ``import gradio`` skip rewriting Gradio's ``.pyi`` typing stubs.

    Gradio re-parses the source of every component class with ``ast`` and rewrites its stub file each
    time it is imported (about 2 s of its 4 s import on two busy cores; also an ``app/ui.pyi`` for our
    own component). The stubs are for editors; nothing at run time reads them. No effect once Gradio is
    imported, or with VITSLIM_GRADIO_STUBS=1.
    """
    if "gradio" in sys.modules or os.environ.get("VITSLIM_GRADIO_STUBS") == "1":
        return
    if not any(isinstance(f, _NoGradioStubs) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoGradioStubs())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The app's options (shared by ``vitslim app`` and ``python -m vitslim_app``)."""
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help="search run folders (or their scores.safetensors); default: the two bundled runs "
                        "(Fashion-MNIST first when its data set is installed, else the digits demo)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s; anything else exposes the app on the network)")
    p.add_argument("--port", type=port_number, default=7860, help="port, 1-65535 (default %(default)s)")
    p.add_argument("--auth", metavar="USER:PASS", help="require this user name and password")
    p.add_argument("--workdir", help="folder for uploads, exports and retraining output (default: a temp dir)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")


def port_number(text: str) -> int:
    """A TCP port (argparse type): 1 to 65535."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {v}")
    return v


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must look like USER:PASS")
    return user, password


def check_runs(runs: Sequence[str]) -> list[Path]:
    """Run folders that exist and hold a score file (one-line errors otherwise)."""
    from vitslim_core.errors import ScoreFileError
    out = []
    for r in runs:
        p = Path(r).expanduser()
        folder = p.parent if p.is_file() else p
        if not (folder / "scores.safetensors").is_file():
            raise ScoreFileError(f"{r} is not a search run folder (no scores.safetensors)")
        out.append(folder.resolve())
    if not out:
        from vitslim_core.demo import DEMO_DIR

        from .runs import bundled_runs
        out = bundled_runs()
        if not out:
            raise ScoreFileError(f"the bundled demo is missing ({DEMO_DIR}); rebuild it with `vitslim demo` "
                                 "or pass a run folder")
    return out


def serve(a: argparse.Namespace) -> int:
    """Start the app and block until Ctrl-C."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from vitslim_core.errors import VitSlimError
    try:
        auth = parse_auth(a.auth)
    except ValueError as e:
        raise VitSlimError(str(e)) from None
    runs = check_runs(a.runs)
    if a.host not in LOCAL_HOSTS:
        print(f"warning: listening on {a.host}: anyone who can reach this address can use the app"
              + ("" if auth else " (no --auth given)") + " and run jobs on this machine", file=sys.stderr)
    from .ui import build_app, launch_app
    demo = build_app(runs=runs, workdir=a.workdir)
    print(f"vitslim app: {len(runs)} run(s); work dir {demo.explorer.workdir}", flush=True)
    launch_app(demo, host=a.host, port=a.port, auth=auth, open_browser=not a.no_browser)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitslim_app", description="The ViT-Slim exploration app (Gradio).")
    add_arguments(p)
    a = p.parse_args(argv)
    from vitslim_core.errors import VitSlimError
    try:
        return serve(a)
    except VitSlimError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
