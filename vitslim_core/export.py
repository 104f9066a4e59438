"""Export a (slim) ViT for deployment: a ``torch.export`` program (.pt2) or an ONNX file."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .errors import VitSlimError
from .io import atomic_save, atomic_write_bytes


def dummy_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """Zeros of the model's input shape (B, in_chans, H, W), from its plan or its patch embedding."""
    plan = getattr(model, "slim_plan", None)
    ref = next(model.parameters(), None)
    kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    if plan is not None:
        s = plan.spec
        return torch.zeros(batch, s.in_chans, *s.img_size, **kw)
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(pe, "img_size", None) is None:
        raise VitSlimError("cannot tell the model's input size; pass example_input")
    return torch.zeros(batch, pe.proj.in_channels, *pe.img_size, **kw)


class _EvalMode:
    """Run a block with the model in eval mode, restoring its mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        return self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def export_program(model: nn.Module, path: str | Path, example_input: torch.Tensor | None = None) -> Path:
    """Save the model's eval-mode forward as a ``torch.export`` program (``torch.export.load`` reads it).

    The batch dimension is dynamic when torch can export it so, else fixed to the example's batch.

    Args:
        model: a slim model (or any timm ViT).
        path: the ``.pt2`` file to write (atomically).
        example_input: an input batch; default zeros of the model's image size, batch 2.
    """
    x = example_input if example_input is not None else dummy_input(model)
    with _EvalMode(model), torch.no_grad():
        try:
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            # strict=False is torch.export's non-strict *tracing* mode (Python-level tracing instead of
            # TorchDynamo), not a lenient weight load; the exported logits are tested equal to the model's
            program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
        except Exception as e:  # noqa: BLE001 - any failure of the dynamic export falls back to a static one
            warnings.warn(f"exporting with a dynamic batch failed ({type(e).__name__}); the program has a "
                          f"fixed batch of {x.shape[0]}", stacklevel=2)
            try:
                program = torch.export.export(model, (x,), strict=False)
            except Exception as e2:  # noqa: BLE001
                raise VitSlimError(f"torch.export failed: {str(e2).splitlines()[0][:200]}") from None
    buf = io.BytesIO()
    torch.export.save(program, buf)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def export_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor | None = None,
                opset: int = 17) -> Path:
    """Save the model as ONNX with input ``image`` and output ``logits`` (dynamic batch).

    Raises:
        VitSlimError: the ``onnx`` package is missing, or the export failed.
    """
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise VitSlimError("ONNX export needs the onnx package: pip install 'vitslim[export]'") from None
    x = example_input if example_input is not None else dummy_input(model)
    path = Path(path)

    def save(tmp: Path) -> None:
        with _EvalMode(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})

    try:
        atomic_save(path, save)
    except VitSlimError:
        raise
    except Exception as e:  # noqa: BLE001 - exporter errors come in many types
        raise VitSlimError(f"ONNX export failed: {str(e).splitlines()[0][:200]}") from None
    return path

