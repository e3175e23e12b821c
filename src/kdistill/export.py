"""Export the plain student: its own weights and nothing else (no hooks, no adapters, no teacher)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from kdistill.checkpoint import atomic_write, save_weights
from kdistill.core.errors import KDistillError


def export_safetensors(model: nn.Module, path: str | Path) -> Path:
    """The model's state dict as safetensors."""
    save_weights(model.state_dict(), path)
    return Path(path)


def export_onnx(model: nn.Module, sample_input: torch.Tensor, path: str | Path, opset: int = 18) -> Path:
    """The model as ONNX with a dynamic batch dimension (needs the ``onnx`` extra)."""
    try:
        import onnx  # noqa: F401  (the exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError:
        raise KDistillError("ONNX export needs the onnx extra: pip install 'kdistill[onnx]'") from None
    model = model.eval().to("cpu")

    def write(temporary: str) -> None:
        # The exporter logs progress and notes about optional torchvision ops; keep the CLI's output clean.
        quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
        levels = [logger.level for logger in quiet]
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                model,
                (sample_input,),
                temporary,
                input_names=["inputs"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)

    atomic_write(path, write)
    return Path(path)
