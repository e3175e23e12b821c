"""Run configuration: frozen dataclasses that mirror the YAML file one to one.

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
naming the dotted key (and the closest valid one). ``--set a.b=value``
overrides are applied to the raw mapping before validation, so they obey the
same rules. YAML is read with a stricter ``yaml.SafeLoader`` (no tags, no code)
that refuses duplicate keys and absurd nesting and reads ``1e-3`` as a number.

Every number has a range (the ``MAX_*`` constants below): a typo such as
``augment_views: 1e8`` fails here, naming the key, instead of deep inside a run.
An integer key accepts a number written in any spelling whose value is a whole
number (``1e3`` is 1000); ``2.5`` is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from kdistill.core.errors import ConfigError, did_you_mean

# Upper bounds of the numeric keys. They are far above any sensible value and only catch typos
# and unit mistakes early, with the key named, instead of hours into a run.
MAX_EPOCHS = 10_000  # epochs of either model, step_epochs, early_stopping
MAX_STEPS = 2**40  # train.max_steps (optimizer updates)
MAX_WORKERS = 256  # data.workers: DataLoader processes
MAX_COUNT = 2**20  # batch sizes, accumulate, max_length (tokens), cache_topk (classes kept)
MAX_VIEWS = 1_000  # augment_views: the teacher cache holds one output per view per sample
MAX_IMAGE_SIDE = 4_096  # image_size, each side (the memory estimate of a run is made elsewhere)
MAX_WEIGHT = 1e6  # loss weights (alpha, beta, pair weights) and grad_clip; FitNets-style weights reach ~1e4
MAX_TEMPERATURE = 100.0  # softmax(z/τ) is already uniform to float32 precision far below this
MAX_LR = 100.0
MAX_WEIGHT_DECAY = 10.0
MAX_MIXUP = 100.0  # Beta(α, α) is a point mass at 0.5 long before this
SEED_LIMIT = 2**32  # exclusive; the trainer seeds generators with seed·1,000,003 + epoch < 2^64
SAMPLE_LIMIT = 2**63  # exclusive; sample counts must fit numpy's int64
MAX_YAML_DEPTH = 100  # deeper YAML is refused before Python's recursion limit is reached
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


@dataclass(frozen=True)
class PairConfig:
    """One feature pair: ``student`` and ``teacher`` layer paths, ``weight``, ``loss``."""

    student: str
    teacher: str
    weight: float = 1.0
    loss: str = "mse"

    def __post_init__(self) -> None:
        _require_range("weight", self.weight, 0, MAX_WEIGHT)


@dataclass(frozen=True)
class ModelConfig:
    """A model: a built-in name (``cnn``, ``resnet8x4``, ``hf`` for a local Hugging Face model, …)
    or ``package.module:function``, its keyword ``args``, and optional ``weights`` (safetensors or
    a state dict). A student may be ``shrink`` (args ``every`` or ``layers``): the teacher's
    architecture with fewer blocks, initialised from the (trained) teacher's weights."""

    model: str = "cnn"
    args: dict[str, Any] | None = None
    weights: str | None = None

    # Default ``args`` of built-in families, by model name: they apply only to that family, so a
    # factory or another built-in without ``args`` gets ``{}`` (not a cnn's channels).
    default_args: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        if self.args is None:  # not given (or null): the family's defaults; copied, never shared
            object.__setattr__(self, "args", copy.deepcopy(self.default_args.get(self.model, {})))


@dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    """The teacher. Without ``weights`` it is first trained on the run's data for
    ``epochs`` epochs (default: ``train.epochs``, the student's budget; with the ``train``
    settings but its own ``seed``, and mixup of strength ``mixup``, 0 for none) and cached
    for later runs: runs that differ only in ``train.seed`` share one teacher. ``args``
    defaults to ``{channels: [32, 64, 128]}`` for ``cnn`` and to ``{}`` for any other model."""

    default_args: ClassVar[dict[str, dict[str, Any]]] = {"cnn": {"channels": [32, 64, 128]}}
    epochs: int | None = None
    mixup: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        # epochs None is "train.epochs": Config resolves it, so a teacher is never given a
        # smaller budget than its student by default.
        _require_range("epochs", self.epochs, 1, MAX_EPOCHS)
        _require_range("mixup", self.mixup, 0, MAX_MIXUP)
        _require_range("seed", self.seed, 0, SEED_LIMIT, high_open=True)
        _require(
            self.model != "shrink", "model", "cannot be shrink (shrink makes a student from the teacher)", "shrink"
        )


@dataclass(frozen=True)
class StudentConfig(ModelConfig):
    """The student. ``args`` defaults to ``{channels: [8, 16, 32]}`` for ``cnn``, else ``{}``.

    ``vocabulary`` (language-model runs only, ``data.dataset: corpus``): ``corpus`` cuts the student's
    embedding and head to the token ids of the train split plus one "other" entry (spec §6),
    ``full`` keeps the teacher's whole vocabulary; null elsewhere."""

    default_args: ClassVar[dict[str, dict[str, Any]]] = {"cnn": {"channels": [8, 16, 32]}}
    vocabulary: Literal["corpus", "full"] | None = None


TEXT_DATASETS = ("rotten-tomatoes", "text")
CORPUS = "corpus"  # data.dataset of a language-model run (kdistill.lm_run)
# The built-in causal-LM teacher's name (kdistill.integrations.hf.SMOLLM2; not imported: hf needs transformers).
LM_TEACHERS = ("smollm2-135m", "hf")
LM_TEACHER_ARGS = ("path", "task", "gguf_file")  # the args of an `hf` causal-LM teacher
SHRINK_ARGS = ("every", "layers", "path")

# Defaults that differ for a language-model run (data.dataset: corpus), filled in for the keys a
# config leaves out: a batch is a few blocks of block_size tokens (evaluation logits are
# blocks × tokens × vocabulary floats), the teacher is pretrained (never trained, so no mixup),
# and the teacher cache keeps the top-k of each token's next-token distribution (a full one
# would take vocabulary × 2 bytes per token: 98 kB for SmolLM2's 49,152 ids).
LM_DEFAULTS: dict[str, dict[str, Any]] = {
    "teacher": {"mixup": 0.0},
    "student": {"vocabulary": "corpus"},
    "data": {
        "augment": "none",
        "augment_views": None,
        "validation_fraction": 0.05,
        "test_fraction": 0.05,
        "batch_size": 4,
        "eval_batch_size": 8,
    },
    "distill": {"temperature": 1.0, "cache_storage": "topk", "cache_topk": 64},
}


@dataclass(frozen=True)
class DataConfig:
    """``dataset``: ``mnist5k``, ``digits``, ``rotten-tomatoes`` (text), ``folder`` (``path`` holds
    one sub-folder per class), ``npz`` (``path`` to a file with ``x_train, y_train[, x_test,
    y_test]``), ``text`` (``path`` to a CSV file with ``text`` and ``label`` columns), or
    ``package.module:function`` returning ``(train, test)`` datasets. Text is tokenized with
    ``tokenizer`` (a local Hugging Face tokenizer directory or ``package.module:function`` giving
    one) to at most ``max_length`` tokens. ``train_samples`` keeps only that many training samples
    (a fixed subset), to fit a budget. ``workers``: DataLoader processes that load training batches."""

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
    workers: int = 0
    block_size: int = 128
    train_tokens: int | None = None
    eval_tokens: int | None = None

    def __post_init__(self) -> None:
        _require(0 < self.test_fraction < 1, "test_fraction", "must be between 0 and 1", self.test_fraction)
        _require(
            0 <= self.validation_fraction < 1, "validation_fraction", "must be in [0, 1)", self.validation_fraction
        )
        _require_range("batch_size", self.batch_size, 1, MAX_COUNT)
        _require_range("workers", self.workers, 0, MAX_WORKERS)
        _require_range(
            "augment_views",
            self.augment_views,
            1,
            MAX_VIEWS,
            why=" (the teacher cache stores every view of every sample; null gives a fresh view each epoch)",
        )
        _require_range("eval_batch_size", self.eval_batch_size, 1, MAX_COUNT)
        if self.image_size is not None:
            ok = len(self.image_size) == 2 and all(1 <= size <= MAX_IMAGE_SIDE for size in self.image_size)
            _require(ok, "image_size", f"must be [height, width], each from 1 to {MAX_IMAGE_SIDE:,}", self.image_size)
        if self.dataset in ("folder", "npz", "text", CORPUS) and not self.path:
            raise ConfigError(f"data.path: dataset {self.dataset!r} needs a path")
        _require_range("max_length", self.max_length, 2, MAX_COUNT)
        _require_range("train_samples", self.train_samples, 1, SAMPLE_LIMIT, high_open=True)
        # Two tokens at least: a block of one has no next token to predict.
        _require_range("block_size", self.block_size, 2, MAX_COUNT)
        _require_range("train_tokens", self.train_tokens, 1, SAMPLE_LIMIT, high_open=True)
        _require_range("eval_tokens", self.eval_tokens, 1, SAMPLE_LIMIT, high_open=True)
        if self.dataset == CORPUS:
            _require(
                self.tokenizer is None, "tokenizer", "must be null for corpus (the teacher's is used)", self.tokenizer
            )
            _require(
                self.augment == "none", "augment", "must be none for corpus (shift moves image pixels)", self.augment
            )
            _require(
                self.train_samples is None,
                "train_samples",
                "must be null for corpus (use train_tokens)",
                self.train_samples,
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
    autocast already).

    ``chunk_tokens``: for causal LMs, compute head, response and CE this many tokens at a time without
    full logits; ``auto`` = 1,024 when the vocabulary is ≥ 32,768, null = off. (Off for other models;
    a number for them is refused.)

    On-policy distillation (language-model runs only, :class:`kdistill.onpolicy.OnPolicyDistillation`):
    ``on_policy`` is λ, the probability that a batch is on-policy (0: never, the default); such a batch's
    prompts are the first ``prompt_tokens`` tokens of each block (fewer than ``data.block_size``), the
    student samples ``max_new_tokens`` tokens after each at ``sampling_temperature`` with nucleus
    ``top_p``, and the live teacher scores them. The baseline is never on-policy. With ``prompt_file``
    (a UTF-8 text file, one prompt per non-empty line, each at most ``prompt_tokens`` tokens of the run's
    tokenizer without special tokens) the prompts are drawn from the file instead, deterministically per
    batch, each batch's cut to its shortest drawn prompt (no left padding).

    GKD-style training (on-policy batches with GKD's default divergence, the generalized JSD with
    β = 0.5, which ``jsd`` is): set ``on_policy`` > 0 and ``response_loss: jsd``, and keep the
    teacher's full distribution for the off-policy batches: ``cache_storage: float16`` (a cache of
    2 bytes per kept id per token) or ``teacher_cache: off`` (a live teacher forward per step). The
    defaults stay ``kl`` and, for language-model runs, the top-k cache, which serves ``kl`` only and
    refuses ``jsd``."""

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
    chunk_tokens: int | Literal["auto"] | None = "auto"
    on_policy: float = 0.0
    prompt_tokens: int = 32
    max_new_tokens: int = 32
    sampling_temperature: float = 1.0
    top_p: float = 1.0
    prompt_file: str | None = None

    def __post_init__(self) -> None:
        _require_range("alpha", self.alpha, 0, MAX_WEIGHT)
        _require_range("beta", self.beta, 0, MAX_WEIGHT)
        _require_range("temperature", self.temperature, 0, MAX_TEMPERATURE, low_open=True)
        _require_range("cache_topk", self.cache_topk, 1, MAX_COUNT)
        # from_dict refuses these already; a DistillConfig built in Python gets the same words.
        chunk = self.chunk_tokens
        _require(
            chunk is None or chunk == "auto" or (isinstance(chunk, int) and not isinstance(chunk, bool)),
            "chunk_tokens",
            "must be a number of tokens, 'auto' or null",
            chunk,
        )
        if isinstance(chunk, int):
            _require_range("chunk_tokens", chunk, 1, MAX_COUNT)
        _require_range("on_policy", self.on_policy, 0, 1)
        _require_range("prompt_tokens", self.prompt_tokens, 1, MAX_COUNT)
        _require_range("max_new_tokens", self.max_new_tokens, 1, MAX_COUNT)
        _require_range("sampling_temperature", self.sampling_temperature, 0, MAX_TEMPERATURE, low_open=True)
        _require_range("top_p", self.top_p, 0, 1, low_open=True)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation budget, shared by the teacher, the baseline and the distilled student.

    ``step_gamma`` is in (0, 1]: the step schedule multiplies the learning rate by it every
    ``step_epochs`` epochs, so 1 is a constant rate and more than 1 would grow it without end.
    ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether it exists is checked
    when the run starts). ``max_steps``: optimizer updates to train for, overriding ``epochs``
    (as in Hugging Face; the last epoch may stop midway); needed for data of unknown length.
    ``strategy``: how several processes train (:mod:`kdistill.distributed`): ``ddp`` replicates the
    student on every rank, ``fsdp`` shards student, teacher and optimizer state across the ranks
    (:mod:`kdistill.fsdp`); in one process both train as plain."""

    epochs: int = 60
    max_steps: int | None = None
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
    strategy: Literal["ddp", "fsdp"] = "ddp"

    def __post_init__(self) -> None:
        _require_range("epochs", self.epochs, 1, MAX_EPOCHS)
        _require_range("max_steps", self.max_steps, 1, MAX_STEPS)
        _require_range("lr", self.lr, 0, MAX_LR, low_open=True)
        _require_range("weight_decay", self.weight_decay, 0, MAX_WEIGHT_DECAY)
        _require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)", self.momentum)
        # warmup_epochs ≤ epochs is checked by Config, which knows the teacher's epochs too.
        _require(self.warmup_epochs >= 0, "warmup_epochs", "must be ≥ 0", self.warmup_epochs)
        _require_range("step_epochs", self.step_epochs, 1, MAX_EPOCHS)
        _require_range("step_gamma", self.step_gamma, 0, 1, low_open=True)
        _require_range("accumulate", self.accumulate, 1, MAX_COUNT)
        _require_range("mixup", self.mixup, 0, MAX_MIXUP)
        _require_range("grad_clip", self.grad_clip, 0, MAX_WEIGHT, low_open=True)
        _require_range("early_stopping", self.early_stopping, 1, MAX_EPOCHS)
        _require_range("seed", self.seed, 0, SEED_LIMIT, high_open=True)
        _require(
            DEVICE_PATTERN.fullmatch(self.device) is not None,
            "device",
            "must be auto, cpu, cuda, cuda:N or mps",
            self.device,
        )


@dataclass(frozen=True)
class Config:
    """A whole run. ``baseline: true`` also trains the student alone with the same budget.

    ``teacher.epochs`` left null is resolved here to ``train.epochs``, so the rest of the code
    (and the resolved config.yaml) always sees an integer."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baseline: bool = True
    out: str = "runs/run"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.teacher.epochs is None:
            object.__setattr__(self, "teacher", dataclasses.replace(self.teacher, epochs=self.train.epochs))
        warmup = self.train.warmup_epochs
        _require(
            warmup <= self.train.epochs, "train.warmup_epochs", f"must be ≤ train.epochs ({self.train.epochs})", warmup
        )
        if self.teacher.weights is None:  # the teacher is trained with the train settings, warm-up included
            epochs = self.teacher.epochs
            _require(warmup <= epochs, "train.warmup_epochs", f"must be ≤ teacher.epochs ({epochs})", warmup)
        if self.data.is_text or self.data.dataset == CORPUS:
            for key, value in (("teacher.mixup", self.teacher.mixup), ("train.mixup", self.train.mixup)):
                _require(value == 0, key, "must be 0 for text (token ids cannot be mixed)", value)
        if self.data.dataset == CORPUS:
            _require(
                self.train.strategy == "ddp",
                "train.strategy",
                "language-model runs (data.dataset: corpus) train in one process, so they cannot shard; leave it ddp",
                self.train.strategy,
            )
            self._check_language_model()
            return
        if self.student.vocabulary is not None:
            raise ConfigError(
                "student.vocabulary applies to language-model runs (data.dataset: corpus) only, "
                f"got {self.student.vocabulary!r}"
            )
        d = self.distill
        if self.train.strategy == "fsdp" and d.teacher_cache not in ("auto", "off"):
            raise ConfigError(
                "distill.teacher_cache: train.strategy fsdp runs the sharded teacher live (every rank calls it "
                f"in step), so it cannot read a teacher-output cache; set teacher_cache to off, got {d.teacher_cache!r}"
            )
        if isinstance(d.chunk_tokens, int):  # "auto" is simply off here
            raise ConfigError(
                "distill.chunk_tokens applies to causal language models only (data.dataset: corpus), "
                f"got {d.chunk_tokens!r}; leave it auto or null"
            )
        _require(
            d.on_policy == 0,
            "distill.on_policy",
            "applies to language-model runs (data.dataset: corpus) only; leave it 0",
            d.on_policy,
        )
        _require(
            d.prompt_file is None,
            "distill.prompt_file",
            "applies to language-model runs (data.dataset: corpus) only; leave it null",
            d.prompt_file,
        )

    def _check_language_model(self) -> None:
        """What a language-model run (data.dataset: corpus) needs, checked before anything loads.

        The teacher is a pretrained causal LM that kdistill never trains (``teacher.weights``, if
        given, is loaded over it); the student is cut from it by ``shrink``; the loss is response
        and cross-entropy only (a feature cache would hold hidden states for every token)."""
        teacher, student = self.teacher, self.student
        _require(
            teacher.model in LM_TEACHERS,
            "teacher.model",
            "must be a pretrained causal LM for corpus (smollm2-135m, or hf with args {path: DIR, task: causal-lm}); "
            "kdistill never trains a language-model teacher",
            teacher.model,
        )
        args = teacher.args or {}
        if teacher.model == "hf":
            unknown = sorted(set(args) - set(LM_TEACHER_ARGS))
            if unknown:
                raise ConfigError(
                    f"unknown key teacher.args.{unknown[0]}{did_you_mean(str(unknown[0]), LM_TEACHER_ARGS)} "
                    f"(a causal-LM teacher takes {', '.join(LM_TEACHER_ARGS)})"
                )
            _require(
                isinstance(args.get("path"), str),
                "teacher.args.path",
                "must name the model directory",
                args.get("path"),
            )
            task = args.get("task", "causal-lm")
            _require(task == "causal-lm", "teacher.args.task", "must be causal-lm for corpus", task)
        else:
            _require(not args, "teacher.args", "must be empty for the built-in smollm2-135m", args)
        _require(
            student.model == "shrink",
            "student.model",
            "must be shrink for corpus (the student is cut from the teacher's blocks)",
            student.model,
        )
        unknown = sorted(set(student.args or {}) - set(SHRINK_ARGS))
        if unknown:
            raise ConfigError(
                f"unknown key student.args.{unknown[0]}{did_you_mean(str(unknown[0]), SHRINK_ARGS)} "
                f"(shrink takes {', '.join(SHRINK_ARGS)})"
            )
        d = self.distill
        _require(
            not d.feature_pairs,
            "distill.feature_pairs",
            "must be empty for corpus (response and cross-entropy only)",
            d.feature_pairs,
        )
        if isinstance(d.chunk_tokens, int) and d.response_loss == "dist":
            raise ConfigError(
                "distill.chunk_tokens: the dist response loss correlates each class across the whole batch, so "
                f"it cannot be computed chunk by chunk; set chunk_tokens to null or pick another loss, "
                f"got {d.chunk_tokens}"
            )
        # Only the key's type: the file itself is read when a run prepares (lm_run.prepare), not on every
        # load, so `kdistill generate` and a finished run's --resume work once the file is moved or gone.
        _require(
            d.prompt_file is None or (isinstance(d.prompt_file, str) and bool(d.prompt_file.strip())),
            "distill.prompt_file",
            "must be the path of a text file (one prompt per non-empty line) or null",
            d.prompt_file,
        )
        if d.on_policy > 0:
            # OnPolicyDistillation's own refusals, made here: before anything loads or is written.
            _require(
                d.prompt_tokens < self.data.block_size,
                "distill.prompt_tokens",
                f"must be < data.block_size ({self.data.block_size}) with on_policy > 0 (the prompt is the first "
                "prompt_tokens tokens of a block)",
                d.prompt_tokens,
            )
            _require(
                d.alpha > 0,
                "distill.alpha",
                "must be > 0 with on_policy > 0 (on-policy batches train on the response term alone)",
                d.alpha,
            )


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of ``distill.prompt_file``: its non-empty lines (surrounding whitespace stripped), in order.

    Their token counts are checked against ``distill.prompt_tokens`` once the tokenizer is loaded
    (:func:`kdistill.onpolicy.checked_prompts`).

    Raises:
        ConfigError: the file cannot be read (missing, a directory, not UTF-8) or has no non-empty line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise ConfigError(f"distill.prompt_file: cannot read {str(path)!r}: {reason}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"distill.prompt_file: no prompts in {str(path)!r} (one prompt per non-empty line)")
    return prompts


def _require(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {what}, got {value!r}")


def _require_range(
    key: str,
    value: float | None,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> None:
    """Raise unless ``low ≤ value ≤ high`` (``<`` on an open side); None (not set) passes."""
    if value is None:
        return
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    what = f"must be {'>' if low_open else '≥'} {_bound(low)} and {'<' if high_open else '≤'} {_bound(high)}{why}"
    _require(above and below, key, what, value)


def _bound(number: float) -> str:
    """A bound as people write it: ``2^32``, ``1,048,576``, ``0.5``."""
    if float(number).is_integer():
        whole = int(number)
        if whole >= 2**32 and whole & (whole - 1) == 0:
            return f"2^{whole.bit_length() - 1}"
        return f"{whole:,}"
    return str(number)


# -- loading -------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no tags, no code) that also refuses what YAML itself lets through.

    * A key given twice in one mapping: YAML keeps the last silently, so a second ``train:``
      section would drop the first one's settings.
    * Nesting deeper than ``MAX_YAML_DEPTH``: PyYAML composes recursively, and thousands of
      levels end in a RecursionError instead of a message.
    * ``1e-3``, ``3e4``, ``+1E-3``: YAML 1.1 reads numbers with an exponent but no dot or no
      exponent sign as strings; every common spelling is read as a float here (as YAML 1.2 does).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"nested more than {MAX_YAML_DEPTH} levels deep at line {mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overriding keys is fine
                    continue
                key = self.construct_object(key_node)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    continue
                if first is not key_node:
                    raise ConfigError(f"duplicate key {key!r} {_where(first.start_mark, key_node.start_mark)}")
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _where(first: yaml.Mark, second: yaml.Mark) -> str:
    """``at lines 3 and 7``, or ``at line 1, columns 2 and 9`` for one line (a ``--set`` value)."""
    if first.line != second.line:
        return f"at lines {first.line + 1} and {second.line + 1}"
    return f"at line {first.line + 1}, columns {first.column + 1} and {second.column + 1}"


def _parse_yaml(text: str) -> Any:
    """``text`` read with :class:`_StrictLoader`; its refusals raise ConfigError without context."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # safe: a SafeLoader subclass
    except ConfigError:  # the loader's own refusals (a ValueError too): already worded
        raise
    except RecursionError:  # a safety net: _StrictLoader bounds the depth before this can happen
        raise ConfigError(f"nested more than {MAX_YAML_DEPTH} levels deep") from None
    except ValueError as error:  # a scalar Python cannot build: a 5,000-digit integer, month 13
        raise ConfigError(f"a value cannot be read: {str(error).split(';')[0]}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or the defaults, when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    for override in overrides:
        apply_override(raw, override)
    return from_dict(raw)


def with_lm_defaults(raw: Any) -> Any:
    """``raw`` with :data:`LM_DEFAULTS` filled in for the keys it leaves out, when it is a
    language-model run (``data.dataset: corpus``); anything else unchanged (and not copied)."""
    data = raw.get("data") if isinstance(raw, dict) else None
    if not isinstance(data, dict) or data.get("dataset") != CORPUS:
        return raw
    filled = dict(raw)
    for section, defaults in LM_DEFAULTS.items():
        given = filled.get(section, {})
        if isinstance(given, dict):  # a section that is not a mapping is refused by from_dict
            filled[section] = {**defaults, **given}
    return filled


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; any problem (missing file, syntax, duplicate keys, depth)
    is one ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error}") from None
    try:
        raw = _parse_yaml(text)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
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
        value = _parse_yaml(text) if text.strip() else None
    except ConfigError as error:
        raise ConfigError(f"--set {key}: {error}") from None
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
    if cls is Config:
        raw = with_lm_defaults(raw)
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
        if isinstance(value, float) and value.is_integer():  # 1e3 or 3.0: a whole number, spelt as a float
            if abs(value) >= SAMPLE_LIMIT:
                raise ConfigError(f"{key} must be an integer below 2^63, got {value!r}")
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, hint, value)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(key, hint, value)
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range is as unusable as inf
            raise ConfigError(f"{key} must be a finite number, got an integer too large for a float") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
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
    """The resolved config as YAML; :func:`read_yaml` + :func:`from_dict` give ``config`` back."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def differences(a: Config, b: Config) -> list[str]:
    """The dotted keys whose values differ between ``a`` and ``b``, in config order.

    Sections and mappings (``teacher.args``) are compared key by key (``teacher.args.channels``);
    lists (``distill.feature_pairs``) and other values as a whole. Used to name what changed
    when a ``--resume`` is refused."""
    return _differences(to_dict(a), to_dict(b), "")


def _differences(a: Any, b: Any, prefix: str) -> list[str]:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        # type() too: 1 == 1.0 == True in Python, but they are different config values
        return [] if type(a) is type(b) and a == b else [prefix.rstrip(".")]
    keys = list(a) + [k for k in b if k not in a]
    return [name for k in keys for name in _differences(a.get(k, _MISSING), b.get(k, _MISSING), f"{prefix}{k}.")]


_MISSING = object()  # a key present on one side only
