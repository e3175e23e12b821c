"""Built-in model families and loading users' own models.

Built-in names (``kdistill inspect --list`` prints them): ``cnn`` (plain conv
stages of configurable width and depth), ``mlp``, and CIFAR-style ResNets
(``resnet`` with ``depth``/``width``, and the usual ``resnet8x4`` … ``resnet32x4``).
A user's own model is ``package.module:function`` returning an ``nn.Module``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.core.errors import CheckpointError, ConfigError, did_you_mean


def _positive(model: str, **sizes: object) -> None:
    """Refuse sizes that are not positive integers before any layer is built: torch would fail
    later with an internal message, or warn about zero-element tensors and build a broken model."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{model}: {name} must be a positive integer, got {value!r}")


def _positive_list(model: str, name: str, values: Sequence[object]) -> None:
    """Like :func:`_positive` for a list of widths (``channels``, ``hidden``)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ConfigError(f"{model}: {name} must be a list of positive integers, got {values!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"{model}: {name} must be positive integers, got {list(values)!r}")


class ConvNet(nn.Module):
    """Plain CNN: ``stage1 … stageK`` (each ``convs`` × [3×3 conv, BN, ReLU], then 2×2 max-pool),
    global average pooling, ``fc``. Input ``(N, in_channels, H, W)``."""

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128),
        in_channels: int = 1,
        num_classes: int = 10,
        convs: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _positive_list("cnn", "channels", channels)
        _positive("cnn", in_channels=in_channels, num_classes=num_classes, convs=convs)
        previous = in_channels
        for index, width in enumerate(channels, start=1):
            layers: list[nn.Module] = []
            for _ in range(convs):
                layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                previous = width
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            self.add_module(f"stage{index}", nn.Sequential(*layers))
        self.num_stages = len(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{index}")(x)
        return self.fc(self.dropout(self.pool(x).flatten(1)))


class MLP(nn.Module):
    """``flatten → hidden1 … hiddenK → fc`` with ReLU; each ``hiddenI`` is ``Linear + ReLU``."""

    def __init__(self, hidden: Sequence[int] = (256, 128), in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        _positive_list("mlp", "hidden", hidden)
        _positive("mlp", in_features=in_features, num_classes=num_classes)
        previous = in_features
        self.num_hidden = len(hidden)
        for index, width in enumerate(hidden, start=1):
            self.add_module(f"hidden{index}", nn.Sequential(nn.Linear(previous, width), nn.ReLU()))
            previous = width
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for index in range(1, self.num_hidden + 1):
            x = getattr(self, f"hidden{index}")(x)
        return self.fc(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, as in the CRD/RepDistiller zoo): ``conv1``,
    ``layer1``–``layer3`` of ``(depth − 2) / 6`` basic blocks each, ``fc``.
    ``width`` multiplies the channels ``(16, 32, 64)``; ``resnet8x4`` is depth 8,
    channels ``(32, 64, 128, 256)`` with a wider stem, as in that zoo."""

    def __init__(
        self,
        depth: int = 8,
        width: int = 1,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _positive("resnet", depth=depth, width=width, in_channels=in_channels, num_classes=num_classes)
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"resnet depth must be 6n + 2 (8, 14, 20, 32, …), got {depth}")
        if channels is not None:
            _positive_list("resnet", "channels", channels)
            if len(channels) < 2:
                raise ConfigError(f"resnet: channels must be [stem, stage1, …] (two or more), got {list(channels)}")
        blocks = (depth - 2) // 6
        stem, *stages = channels or [16 * width, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()
        )
        previous = stem
        for index, width_out in enumerate(stages, start=1):
            layers = [
                BasicBlock(previous if b == 0 else width_out, width_out, 1 if index == 1 or b else 2)
                for b in range(blocks)
            ]
            self.add_module(f"layer{index}", nn.Sequential(*layers))
            previous = width_out
        self.num_layers = len(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for index in range(1, self.num_layers + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(self.pool(x).flatten(1))


def _resnet_x4(depth: int) -> Callable[..., ResNet]:
    def build(in_channels: int = 1, num_classes: int = 10) -> ResNet:
        return ResNet(depth, in_channels=in_channels, num_classes=num_classes, channels=(32, 64, 128, 256))

    build.__doc__ = f"resnet{depth}x4: CIFAR ResNet-{depth} with 4× channels (32, 64, 128, 256)."
    return build


def hf_model(
    path: str, task: str = "sequence-classification", num_classes: int | None = None, **kwargs: Any
) -> nn.Module:
    """hf: a local Hugging Face model; args ``path`` (directory or package.module:function), ``task``.

    ``task``: sequence-classification (default), token-classification, causal-lm or base.
    Needs ``kdistill[transformers]``; nothing is downloaded."""
    from kdistill.integrations.hf import load_model

    if task in ("sequence-classification", "token-classification") and num_classes is not None:
        kwargs.setdefault("num_labels", num_classes)
    return load_model(path, task, **kwargs)


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": ConvNet,
    "mlp": MLP,
    "resnet": ResNet,
    "resnet8x4": _resnet_x4(8),
    "resnet14x4": _resnet_x4(14),
    "resnet32x4": _resnet_x4(32),
    "hf": hf_model,
}


def import_object(path: str, what: str = "factory") -> Any:
    """``package.module:name`` → the object, with a one-line error when it does not import."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{what} {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module may raise anything on import
        raise ConfigError(f"cannot import module {module_name!r} for {what} {path!r}: {error}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(f"module {module_name!r} has no {attribute!r}{did_you_mean(attribute, names)}") from None


def check_model_name(name: str) -> None:
    """Fail fast on a model name that is neither built in nor an importable factory."""
    if ":" in name:
        import_object(name)
    elif name not in BUILTIN_MODELS and name != "shrink":
        raise ConfigError(
            f"unknown model {name!r}{did_you_mean(name, BUILTIN_MODELS)} "
            f"(built in: {', '.join(BUILTIN_MODELS)}; or 'package.module:function')"
        )


def build_model(
    name: str, args: dict[str, Any] | None = None, *, input_shape: Sequence[int] = (), num_classes: int | None = None
) -> nn.Module:
    """Build a built-in model by name, or call a ``package.module:function`` factory.

    Built-in models get ``in_channels`` / ``in_features`` and ``num_classes`` from the data
    (``input_shape`` without the batch dimension) unless ``args`` sets them.
    """
    args = dict(args or {})
    check_model_name(name)
    if ":" in name:
        factory = import_object(name)
        try:
            model = factory(**args)
        except TypeError as error:
            raise ConfigError(f"model factory {name!r} rejected its args {args}: {error}") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")
        return model
    builder = BUILTIN_MODELS[name]
    accepted = inspect.signature(builder).parameters
    if num_classes is not None:
        args.setdefault("num_classes", num_classes)
    if input_shape:
        _check_input_fits(name, args, accepted, tuple(int(size) for size in input_shape))
        if "in_channels" in accepted:
            args.setdefault("in_channels", int(input_shape[0]))
        if "in_features" in accepted:
            args.setdefault("in_features", int(torch.Size(input_shape).numel()))
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [key for key in args if key not in accepted]
    if unknown and not takes_any:
        raise ConfigError(f"model {name!r} has no argument {unknown[0]!r}{did_you_mean(unknown[0], accepted)}")
    try:
        return builder(**args)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model {name!r} with args {args}: {error}") from None


def _check_input_fits(name: str, args: dict[str, Any], accepted: Mapping[str, Any], shape: tuple[int, ...]) -> None:
    """A built-in model against one input's ``shape``: convolutional models take images ``(C, H, W)``,
    and ``in_channels`` / ``in_features`` set by hand must match the data (else torch fails mid-forward)."""
    if "in_channels" in accepted and len(shape) != 3:
        raise ConfigError(f"model {name!r} takes images (C, H, W); the inputs have shape {shape} (try mlp)")
    given = args.get("in_channels")
    if "in_channels" in accepted and isinstance(given, int) and 1 <= given != shape[0]:
        plural = "s" if shape[0] != 1 else ""
        raise ConfigError(
            f"model {name!r}: in_channels {given} does not match the inputs of shape {shape} "
            f"({shape[0]} channel{plural}); leave in_channels out to take it from the data"
        )
    given = args.get("in_features")
    features = int(torch.Size(shape).numel())
    if "in_features" in accepted and isinstance(given, int) and 1 <= given != features:
        raise ConfigError(
            f"model {name!r}: in_features {given} does not match the inputs of shape {shape} "
            f"({features} features once flattened); leave in_features out to take it from the data"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_weights(model: nn.Module, path: str | Path, role: str = "model") -> None:
    """Load a safetensors file or a plain state dict (``torch.load(weights_only=True)``) into ``model``.

    Nothing is unpickled beyond tensors and containers; a truncated file or one made for
    another architecture raises :class:`~kdistill.core.errors.CheckpointError` naming the problem.

    Tied weights stay tied: ``load_state_dict`` copies into the model's existing parameters, so an
    embedding and head that are one ``Parameter`` remain one. A file that holds a tied tensor once
    without recording the other key (written by earlier kdistill language-model runs, or by other
    tools that drop tied keys) gets the missing key from the key it is tied to in ``model``.
    """
    from kdistill.checkpoint import read_state_dict, tied_keys

    state = read_state_dict(path)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    for key, source in tied_keys(own).items():
        if key not in state and source in state:
            state[key] = state[source]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        detail = (
            f"{len(missing)} missing (e.g. {missing[:2]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})" if unexpected else "",
            f"{len(mismatched)} with other shapes (e.g. {mismatched[0]}: file {tuple(state[mismatched[0]].shape)}, "
            f"model {tuple(own[mismatched[0]].shape)})"
            if mismatched
            else "",
        )
        raise CheckpointError(
            f"{path}: weights do not fit the {role}'s architecture: " + "; ".join(d for d in detail if d)
        )
    model.load_state_dict(state)
