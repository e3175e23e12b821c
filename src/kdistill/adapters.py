"""Adapters: learned maps from a student feature to its teacher feature's shape.

Rules, by the feature's number of dimensions (batch first):

* equal shapes → identity (no parameters);
* ``(N, D)`` → linear ``D_s → D_t``;
* ``(N, T, D)`` with equal ``T`` → linear on the last (hidden) dimension, per token;
* ``(N, C, L)`` with different lengths or equal ``L`` → 1×1 ``Conv1d`` on channels, and
  linear resizing of ``L`` when lengths differ;
* ``(N, C, H, W)`` → 1×1 ``Conv2d`` on channels, and spatial resizing when sizes
  differ (average pooling when the teacher's map is an integer factor smaller,
  bilinear interpolation otherwise).

Anything else raises :class:`~kdistill.errors.FeatureShapeError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import FeatureShapeError


class Resize(nn.Module):
    """Resize the trailing spatial dimensions of ``(N, C, *S)`` to ``size``."""

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


def build_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int], name: str = "") -> nn.Module:
    """The adapter that maps a student feature of ``student_shape`` to ``teacher_shape``.

    Both shapes include the batch dimension. See the module docstring for the rules.
    """
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
    if ndim == 3 and student_shape[1] == teacher_shape[1]:  # (N, T, D): tokens, map the hidden size
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
