"""How the core talks to a model it did not write: call it, read its logits, features, mask and
labels, and check that a teacher and a student read the same tokens.

Torch only, duck-typed: Hugging Face models work here through the attributes they carry
(``.logits``, ``attention_mask``, ``config.vocab_size``), never through a ``transformers`` import, so
the core (:mod:`kdistill.core.distiller`, :mod:`kdistill.core.hooks`) and the application (cache, report,
pipeline, trainer) share one set of rules. See docs/architecture.md for the layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.core.errors import ClassCountError, ConfigError, VocabularyError
from kdistill.core.vocabulary import PrunedVocabulary


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def default_logits(output: Any) -> Tensor:
    """The default logits rule: a tensor is the logits; else ``.logits`` (Hugging Face
    ``ModelOutput``), a mapping's ``"logits"`` entry, or a tuple's first element."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output:
        return default_logits(output[0])
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; pass logits_fn=")


def token_mask(inputs: Any) -> Tensor | None:
    """The ``(N, T)`` attention mask of Hugging Face style inputs, if any."""
    if isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
        if isinstance(mask, Tensor):
            return mask
    return None


def split_labels(inputs: Any, labels: Tensor | None = None) -> tuple[Any, Tensor | None]:
    """Take a ``labels`` entry out of a mapping input (Hugging Face batches carry one).

    Returns ``(inputs without "labels", labels)``; inputs that are not a mapping, or hold no
    ``labels``, come back unchanged with ``labels``. Models must never receive the entry: a Hugging
    Face model would compute its own loss from it (spec section 6).

    Raises:
        ConfigError: ``labels`` is given both ways with different values (equal values, or the
            same tensor, are one set of labels).
    """
    if not isinstance(inputs, Mapping) or "labels" not in inputs:
        return inputs, labels
    inner = inputs["labels"]
    rest = {key: value for key, value in inputs.items() if key != "labels"}
    if labels is not None and labels is not inner and inner is not None:
        same = (
            isinstance(inner, Tensor)
            and inner.shape == labels.shape
            and bool(torch.equal(inner.to(device=labels.device, dtype=labels.dtype), labels))
        )
        if not same:
            raise ConfigError(
                "labels are given twice, as the labels argument and as the inputs' 'labels' entry, "
                "with different values; pass them one way"
            )
    return rest, labels if labels is not None else inner


def first_tensor(output: Any) -> Tensor:
    """The default feature rule: the first tensor found depth-first in ``output``.

    A tensor is itself; a tuple or list yields its first tensor; a mapping (a dict
    or a Hugging Face ``ModelOutput``, whose first field is the main output, e.g.
    ``last_hidden_state``) yields its first tensor value. Pass your own function as
    ``feature_fn`` when a layer's main output is elsewhere.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        candidates = list(output.values())
    elif isinstance(output, (tuple, list)):
        candidates = list(output)
    else:
        candidates = []
    for value in candidates:
        try:
            return first_tensor(value)
        except TypeError:
            continue
    raise TypeError(f"no tensor found in a layer output of type {type(output).__name__}")


def is_causal_lm(model: nn.Module) -> bool:
    """Is ``model`` a causal language model, whose logits at ``t`` predict the token at ``t + 1``?

    True for a :class:`~kdistill.core.vocabulary.PrunedVocabulary` and for a model whose class name ends
    in ``ForCausalLM`` or ``LMHeadModel`` (the Hugging Face naming: ``LlamaForCausalLM``,
    ``GPT2LMHeadModel``); by name so that the core needs no ``transformers`` import; a wrapper
    (peft's ``PeftModel``, DDP, ``torch.compile``) is asked about the model it wraps. Token
    classifiers (``BertForTokenClassification``) and everything else are not.
    """
    if isinstance(model, PrunedVocabulary):
        return True
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return True
    # Wrappers say nothing by their name: peft's PeftModel (get_base_model), DDP (.module),
    # torch.compile (._orig_mod). Ask what they wrap.
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else getattr(model, "module", None)
    inner = inner if isinstance(inner, nn.Module) else getattr(model, "_orig_mod", None)
    return isinstance(inner, nn.Module) and inner is not model and is_causal_lm(inner)


def check_vocabularies(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a teacher and student that read different tokens or name their labels differently.

    Only checked for models with a Hugging Face style ``config``, read by attribute
    (``config.vocab_size``, ``config.id2label``) so that the core needs no ``transformers``
    import. A class-count mismatch without label names is caught later, from the logits' shapes.

    Raises:
        VocabularyError: the two ``vocab_size`` differ.
        ClassCountError: as many labels on both sides, but named or ordered differently.
    """
    teacher_config, student_config = getattr(teacher, "config", None), getattr(student, "config", None)
    if isinstance(student, PrunedVocabulary):
        tv = getattr(teacher_config, "vocab_size", None)
        if isinstance(tv, int) and tv != student.vocab_size:
            raise VocabularyError(
                f"teacher and pruned student vocabularies differ ({tv} vs {student.vocab_size} tokens): "
                "the student must be cut from a model reading the teacher's tokenizer"
            )
        return
    if teacher_config is None or student_config is None:
        return
    tv, sv = getattr(teacher_config, "vocab_size", None), getattr(student_config, "vocab_size", None)
    if isinstance(tv, int) and isinstance(sv, int) and tv != sv:
        raise VocabularyError(
            f"teacher and student vocabularies differ ({tv} vs {sv} tokens): both must read the same "
            "tokenizer's ids (shrink the teacher, or pick a student of the same family)"
        )
    tl, sl = getattr(teacher_config, "id2label", None), getattr(student_config, "id2label", None)
    if isinstance(tl, dict) and isinstance(sl, dict) and len(tl) == len(sl) and tl != sl:
        raise ClassCountError(f"teacher and student label sets differ: {tl} vs {sl}")
