"""Adapters: learned maps from a student feature to its teacher feature's shape.

Rules, by the feature's number of dimensions (batch first):

* equal shapes → identity (no parameters);
* ``(N, D)`` → linear ``D_s → D_t``;
* 3-D features have one of two layouts, which shapes alone cannot tell apart
  (``(2, 6, 32) → (2, 6, 16)`` is "hidden size 32 → 16" for tokens, "length 32 → 16" for a
  1-D convolution's map), so the layout decides:

  * ``layout="tokens"``, ``(N, T, D)`` (transformers, channels last): linear on the last
    (hidden) dimension, per token; the token counts ``T`` must be equal;
  * ``layout="channels"``, ``(N, C, L)`` (1-D convolutions, channels first): 1×1 ``Conv1d``
    when the channels differ, and resizing of ``L`` when the lengths differ (average pooling
    when the teacher's map is an integer factor shorter, linear interpolation otherwise);
  * ``layout=None`` (not known): equal sizes of dimension 1 mean tokens, different ones
    channels. :class:`~kdistill.Distiller` passes ``"channels"`` when a paired layer contains a
    1-D convolution or pooling module (see :func:`infer_layout`), and a
    :class:`~kdistill.FeaturePair`'s own ``layout`` wins over both;
* ``(N, C, H, W)`` → 1×1 ``Conv2d`` on channels, and spatial resizing when sizes
  differ (average pooling when the teacher's map is an integer factor smaller,
  bilinear interpolation otherwise).

Anything else raises :class:`~kdistill.core.errors.FeatureShapeError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.core.errors import ConfigError, FeatureShapeError

Layout = Literal["tokens", "channels"]
LAYOUTS = ("tokens", "channels")

# Modules whose 3-D outputs are (N, C, L), channels first: 1-D convolutions and pooling.
CHANNELS_FIRST_1D = (
    nn.Conv1d,
    nn.ConvTranspose1d,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
)


def infer_layout(*layers: nn.Module) -> Layout | None:
    """``"channels"`` when one of ``layers`` is or contains a 1-D convolution or pooling module
    (:data:`CHANNELS_FIRST_1D`), else None (the shape rule of :func:`build_adapter` applies).

    A block that holds a 1-D convolution internally but returns channels-last tokens (a Conformer
    block) is misread by this rule: give its pair ``layout="tokens"``.
    """
    for layer in layers:
        if any(isinstance(module, CHANNELS_FIRST_1D) for module in layer.modules()):
            return "channels"
    return None


class Resize(nn.Module):
    """Resize the trailing spatial dimensions of ``(N, C, *S)`` to ``size`` (one or two of them)."""

    def __init__(self, size: Sequence[int]) -> None:
        super().__init__()
        self.size = tuple(int(s) for s in size)

    def forward(self, x: Tensor) -> Tensor:
        source = x.shape[2:]
        if all(s % t == 0 for s, t in zip(source, self.size)):
            pool = F.adaptive_avg_pool2d if len(self.size) == 2 else F.adaptive_avg_pool1d
            return pool(x, self.size)
        mode = "bilinear" if len(self.size) == 2 else "linear"
        return F.interpolate(x, size=self.size, mode=mode, align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def build_adapter(
    student_shape: Sequence[int], teacher_shape: Sequence[int], name: str = "", layout: Layout | None = None
) -> nn.Module:
    """The adapter that maps a student feature of ``student_shape`` to ``teacher_shape``.

    Both shapes include the batch dimension; ``layout`` (``"tokens"``, ``"channels"`` or None)
    says how to read 3-D features. See the module docstring for the rules.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)} or None, got {layout!r}")
    student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
    if student_shape == teacher_shape:
        return nn.Identity()

    def fail(why: str) -> FeatureShapeError:
        label = f"feature pair {name}: " if name else ""
        return FeatureShapeError(
            f"{label}no adapter maps a student feature of shape {student_shape} "
            f"to a teacher feature of shape {teacher_shape} ({why})"
        )

    if len(student_shape) != len(teacher_shape):
        raise fail("they have different numbers of dimensions; pick layers of the same kind")
    if student_shape[0] != teacher_shape[0]:
        raise fail("their batch sizes differ")
    ndim = len(student_shape)
    if ndim == 2:
        return nn.Linear(student_shape[1], teacher_shape[1])
    if ndim == 3 and layout is None:  # shapes alone: equal dimension 1 reads as tokens
        layout = "tokens" if student_shape[1] == teacher_shape[1] else "channels"
    if ndim == 3 and layout == "tokens":  # (N, T, D): map the hidden size, token by token
        if student_shape[1] != teacher_shape[1]:
            raise fail("their token counts differ; token features must come from the same tokens")
        return nn.Linear(student_shape[2], teacher_shape[2])
    if ndim in (3, 4):  # (N, C, L) or (N, C, H, W): channels by 1×1 convolution
        conv_type = nn.Conv1d if ndim == 3 else nn.Conv2d
        layers: list[nn.Module] = []
        if student_shape[1] != teacher_shape[1]:
            layers.append(conv_type(student_shape[1], teacher_shape[1], kernel_size=1))
        if student_shape[2:] != teacher_shape[2:]:
            resize = Resize(teacher_shape[2:])
            # Resizing commutes with a 1×1 convolution; do it first when it shrinks the map.
            shrinks = _numel(teacher_shape[2:]) < _numel(student_shape[2:])
            layers.insert(0 if shrinks else len(layers), resize)
        return layers[0] if len(layers) == 1 else nn.Sequential(*layers)
    raise fail(f"{ndim}-dimensional features are not supported; pass adapter= to the pair")


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for s in shape:
        total *= s
    return total
