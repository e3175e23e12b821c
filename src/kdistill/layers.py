"""List a model's layers with their output shapes, and propose feature pairs.

Users of every distillation library ask how to choose the layers to pair;
``kdistill inspect`` answers with this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill.core.adapters import build_adapter
from kdistill.core.calls import call_model, default_logits, first_tensor
from kdistill.core.distiller import FeaturePair
from kdistill.core.errors import FeatureShapeError


@dataclass(frozen=True)
class Layer:
    """One submodule as seen during a forward pass."""

    path: str
    type: str
    shape: tuple[int, ...] | None  # output shape with the batch dimension; None if it did not run
    params: int  # parameters owned by this module and its children
    order: int  # position in execution order (-1 if it did not run)


def trace_layers(model: nn.Module, sample_input: Any) -> list[Layer]:
    """Run ``model`` once on ``sample_input`` (eval mode, no gradients) and describe every submodule."""
    seen: dict[str, tuple[tuple[int, ...], int]] = {}
    handles = []

    def hook(path: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            try:
                shape = tuple(first_tensor(output).shape)
            except TypeError:
                return
            if path not in seen:
                seen[path] = (shape, len(seen))

        return record

    named = list(model.named_modules())
    for path, module in named:
        if path:
            handles.append(module.register_forward_hook(hook(path)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, sample_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    layers = []
    for path, module in named:
        if not path:
            continue
        shape, order = seen.get(path, (None, -1))
        layers.append(Layer(path, type(module).__name__, shape, sum(p.numel() for p in module.parameters()), order))
    return layers


def format_layers(layers: Sequence[Layer], max_depth: int | None = None) -> str:
    """A text table: path, type, output shape, parameters."""
    rows = [layer for layer in layers if max_depth is None or layer.path.count(".") < max_depth]
    width = max([len("path")] + [len(layer.path) for layer in rows])
    type_width = max([len("type")] + [len(layer.type) for layer in rows])
    lines = [f"{'path':<{width}}  {'type':<{type_width}}  {'output shape':<20}  {'params':>10}"]
    for layer in rows:
        shape = "×".join(map(str, layer.shape)) if layer.shape is not None else "(not run)"
        lines.append(f"{layer.path:<{width}}  {layer.type:<{type_width}}  {shape:<20}  {layer.params:>10,}")
    return "\n".join(lines)


def stage_layers(layers: Sequence[Layer], logits_shape: tuple[int, ...] | None = None) -> list[Layer]:
    """The model's "stages", in execution order: the direct children with parameters of the
    shallowest container that has at least two such children producing feature maps (≥ 3
    dimensions). Models without feature maps (MLPs) fall back to the top-level children with
    parameters whose 2-D outputs are not the logits."""
    ran = [layer for layer in layers if layer.shape is not None]

    def children_of(parent: str) -> list[Layer]:
        depth = parent.count(".") + 1 if parent else 0
        return [
            layer
            for layer in ran
            if layer.path.count(".") == depth and (not parent or layer.path.startswith(parent + "."))
        ]

    containers = ["", *sorted({layer.path for layer in layers}, key=lambda p: (p.count("."), p))]
    for parent in containers:
        children = [
            layer
            for layer in children_of(parent)
            if len(layer.shape) >= 3 and layer.params > 0 and layer.shape != logits_shape
        ]
        if len(children) >= 2:
            return sorted(children, key=lambda layer: layer.order)
    hidden = [
        layer for layer in children_of("") if len(layer.shape) == 2 and layer.params > 0 and layer.shape != logits_shape
    ]
    return sorted(hidden, key=lambda layer: layer.order)


def propose_pairs(teacher: nn.Module, student: nn.Module, sample_input: Any) -> list[FeaturePair]:
    """One pair per student stage: the teacher stage at the nearest relative depth whose output an
    adapter can map, preferring equal spatial sizes, then the deeper of two equally near stages."""
    with torch.no_grad():
        teacher_logits = tuple(default_logits(call_model(teacher.eval(), sample_input)).shape)
    teacher_stages = stage_layers(trace_layers(teacher, sample_input), teacher_logits)
    student_stages = stage_layers(trace_layers(student, sample_input), teacher_logits)
    pairs = []
    for index, student_layer in enumerate(student_stages):
        depth = (index + 1) / len(student_stages)
        candidates = []
        for t_index, teacher_layer in enumerate(teacher_stages):
            try:
                build_adapter(student_layer.shape, teacher_layer.shape)
            except FeatureShapeError:
                continue
            distance = abs((t_index + 1) / len(teacher_stages) - depth)
            same_size = student_layer.shape[2:] == teacher_layer.shape[2:]
            candidates.append((round(distance, 6), not same_size, -t_index, teacher_layer.path))
        if candidates:
            pairs.append(FeaturePair(student=student_layer.path, teacher=min(candidates)[3]))
    return pairs
