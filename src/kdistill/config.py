"""Run configuration: frozen dataclasses that mirror the YAML file one to one.

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
naming the dotted key (and the closest valid one). ``--set a.b=value``
overrides are applied to the raw mapping before validation, so they obey the
same rules. YAML is read with ``yaml.safe_load``: no tags, no code.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from kdistill.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class PairConfig:
    """One feature pair: ``student`` and ``teacher`` layer paths, ``weight``, ``loss``."""

    student: str
    teacher: str
    weight: float = 1.0
    loss: str = "mse"

    def __post_init__(self) -> None:
        _require(self.weight >= 0, "weight", "must be ≥ 0", self.weight)


@dataclass(frozen=True)
class ModelConfig:
    """A model: a built-in name (``cnn``, ``resnet8x4``, ``hf`` for a local Hugging Face model, …)
    or ``package.module:function``, its keyword ``args``, and optional ``weights`` (safetensors or
    a state dict). A student may be ``shrink`` (args ``every`` or ``layers``): the teacher's
    architecture with fewer blocks, initialised from the (trained) teacher's weights."""

    model: str = "cnn"
    args: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None


@dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    """The teacher. Without ``weights`` it is first trained on the run's data for
    ``epochs`` epochs (with the ``train`` settings but its own ``seed``, and mixup of
    strength ``mixup``, 0 for none) and cached for later runs: runs that differ only in
    ``train.seed`` share one teacher."""

    args: dict[str, Any] = field(default_factory=lambda: {"channels": [32, 64, 128]})
    epochs: int = 20
    mixup: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "epochs", "must be ≥ 1", self.epochs)
        _require(self.mixup >= 0, "mixup", "must be ≥ 0", self.mixup)
        _require(
            self.model != "shrink", "model", "cannot be shrink (shrink makes a student from the teacher)", "shrink"
        )


@dataclass(frozen=True)
class StudentConfig(ModelConfig):
    args: dict[str, Any] = field(default_factory=lambda: {"channels": [8, 16, 32]})


TEXT_DATASETS = ("rotten-tomatoes", "text")


@dataclass(frozen=True)
class DataConfig:
    """``dataset``: ``mnist5k``, ``digits``, ``rotten-tomatoes`` (text), ``folder`` (``path`` holds
    one sub-folder per class), ``npz`` (``path`` to a file with ``x_train, y_train[, x_test,
    y_test]``), ``text`` (``path`` to a CSV file with ``text`` and ``label`` columns), or
    ``package.module:function`` returning ``(train, test)`` datasets. Text is tokenized with
    ``tokenizer`` (a local Hugging Face tokenizer directory or ``package.module:function`` giving
    one) to at most ``max_length`` tokens. ``train_samples`` keeps only that many training samples
    (a fixed subset), to fit a budget."""

    dataset: str = "mnist5k"
    path: str | None = None
    test_fraction: float = 0.2
    validation_fraction: float = 0.1
    augment: Literal["none", "shift"] = "shift"
    augment_views: int | None = 10
    image_size: list[int] | None = None
    tokenizer: str | None = None
    max_length: int = 128
    train_samples: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 1000

    def __post_init__(self) -> None:
        _require(0 < self.test_fraction < 1, "test_fraction", "must be between 0 and 1", self.test_fraction)
        _require(
            0 <= self.validation_fraction < 1, "validation_fraction", "must be in [0, 1)", self.validation_fraction
        )
        _require(self.batch_size >= 1, "batch_size", "must be ≥ 1", self.batch_size)
        _require(
            self.augment_views is None or self.augment_views >= 1, "augment_views", "must be ≥ 1", self.augment_views
        )
        _require(self.eval_batch_size >= 1, "eval_batch_size", "must be ≥ 1", self.eval_batch_size)
        if self.image_size is not None:
            ok = len(self.image_size) == 2 and all(size >= 1 for size in self.image_size)
            _require(ok, "image_size", "must be [height, width] of positive integers", self.image_size)
        if self.dataset in ("folder", "npz", "text") and not self.path:
            raise ConfigError(f"data.path: dataset {self.dataset!r} needs a path")
        _require(self.max_length >= 2, "max_length", "must be ≥ 2", self.max_length)
        _require(
            self.train_samples is None or self.train_samples >= 1, "train_samples", "must be ≥ 1", self.train_samples
        )
        if self.is_text:
            if not self.tokenizer:
                raise ConfigError(f"data.tokenizer: the text dataset {self.dataset!r} needs a tokenizer directory")
            _require(
                self.augment == "none", "augment", "must be none for text (shift moves image pixels)", self.augment
            )

    @property
    def is_text(self) -> bool:
        return self.dataset in TEXT_DATASETS


@dataclass(frozen=True)
class DistillConfig:
    """The loss: ``L_total = beta · (alpha · L_resp + L_feat) + L_CE``. ``feature_pairs`` is a
    list of pairs or ``auto`` (layers proposed by ``kdistill inspect``). ``teacher_cache``:
    ``auto`` (compute the teacher's outputs once and reuse them whenever that is exact: no
    augmentation, or ``data.augment_views`` fixed views, and no mixup), ``off``, or a directory.
    ``teacher_precision``: run a live teacher in bf16/fp16 (for CUDA; under ``train.amp`` it is
    autocast already)."""

    alpha: float = 1.0
    beta: float = 1.0
    temperature: float = 4.0
    temperature_squared: bool = True
    response_loss: str = "kl"
    feature_pairs: list[PairConfig] | Literal["auto"] = field(default_factory=list)
    teacher_cache: str = "auto"
    teacher_precision: Literal["float32", "bf16", "fp16"] = "float32"
    cache_storage: Literal["float16", "float32", "topk"] = "float16"
    cache_topk: int = 20

    def __post_init__(self) -> None:
        _require(self.alpha >= 0, "alpha", "must be ≥ 0", self.alpha)
        _require(self.beta >= 0, "beta", "must be ≥ 0", self.beta)
        _require(self.temperature > 0, "temperature", "must be > 0", self.temperature)
        _require(self.cache_topk >= 1, "cache_topk", "must be ≥ 1", self.cache_topk)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation budget, shared by the teacher, the baseline and the distilled student."""

    epochs: int = 60
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    step_epochs: int = 10
    step_gamma: float = 0.1
    grad_clip: float | None = None
    accumulate: int = 1
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    early_stopping: int | None = None
    mixup: float = 0.0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "epochs", "must be ≥ 1", self.epochs)
        _require(self.lr > 0, "lr", "must be > 0", self.lr)
        _require(self.weight_decay >= 0, "weight_decay", "must be ≥ 0", self.weight_decay)
        _require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)", self.momentum)
        _require(self.warmup_epochs >= 0, "warmup_epochs", "must be ≥ 0", self.warmup_epochs)
        _require(self.step_epochs >= 1, "step_epochs", "must be ≥ 1", self.step_epochs)
        _require(self.accumulate >= 1, "accumulate", "must be ≥ 1", self.accumulate)
        _require(self.mixup >= 0, "mixup", "must be ≥ 0", self.mixup)
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0", self.grad_clip)
        _require(
            self.early_stopping is None or self.early_stopping >= 1,
            "early_stopping",
            "must be ≥ 1",
            self.early_stopping,
        )


@dataclass(frozen=True)
class Config:
    """A whole run. ``baseline: true`` also trains the student alone with the same budget."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baseline: bool = True
    out: str = "runs/run"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.data.is_text:
            for key, value in (("teacher.mixup", self.teacher.mixup), ("train.mixup", self.train.mixup)):
                _require(value == 0, key, "must be 0 for text (token ids cannot be mixed)", value)


def _require(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {what}, got {value!r}")


# -- loading -------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or the defaults, when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    for override in overrides:
        apply_override(raw, override)
    return from_dict(raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` to ``raw``; the value is read as a YAML scalar or flow sequence."""
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p.strip() for p in parts):
        raise ConfigError(f"--set {override!r}: expected key.sub=value, e.g. train.epochs=5")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {override!r}: cannot read the value {text!r}") from None
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(raw: Any, cls: type = Config, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where}: expected a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in fields:
            raise ConfigError(f"unknown key {prefix}{key}{did_you_mean(str(key), fields)}")
        if value is False and key == "teacher_cache":  # YAML reads a bare `off` as false
            value = "off"
        values[key] = _convert(value, hints[key], f"{prefix}{key}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and _is_required(f)]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]} is required")
    try:
        return cls(**values)
    except ConfigError as error:
        message = str(error)
        raise ConfigError(f"{prefix}{message}" if prefix and not message.startswith(prefix) else message) from None


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(value, hint, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = {}
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors[option] = error
        # A value of the right kind (a list for a list option) gets that option's precise error.
        for option, error in errors.items():
            if isinstance(value, list) and typing.get_origin(option) is list:
                raise error
            if isinstance(value, dict) and (dataclasses.is_dataclass(option) or typing.get_origin(option) is dict):
                raise error
        raise next(iter(errors.values())) if len(errors) == 1 else _type_error(key, hint, value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{key} must be one of {', '.join(map(repr, args))}, got {_describe(value)}"
                f"{did_you_mean(str(value), [str(a) for a in args])}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(key, hint, value)
        return [_convert(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _type_error(key, hint, value)
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise _type_error(key, hint, value)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, hint, value)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(key, hint, value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _type_error(key, hint, value)
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")  # a bug in this module, not in the user's file


def _type_error(key: str, hint: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key} must be {_type_name(hint)}, got {_describe(value)}")


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    if hint in names:
        return names[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return str(hint)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if value is not None else "null"


# -- writing -------------------------------------------------------------------------------


def to_dict(config: Any) -> Any:
    """The config as plain YAML-ready data (the inverse of :func:`from_dict`)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def dump_config(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
