"""Evaluating causal language models: perplexity, next-token agreement, throughput and greedy decoding.

Nothing here knows about distillation. Every function takes a Hugging Face style causal LM (called
as ``model(input_ids=…, attention_mask=…)``, logits in ``.logits``) or anything that looks like one,
such as :class:`kdistill.core.vocabulary.PrunedVocabulary`, which is used duck-typed: a model with a
``log_probs(logits, ids)`` method gives its full-vocabulary log-probabilities that way, and one with
``predict(logits)`` gives its full-vocabulary argmax that way.

Positions follow the Hugging Face convention (spec §6): labels are the input ids unshifted, the logits
at position ``t`` predict the token at ``t + 1``, and positions labelled −100 or with attention mask 0
count nowhere. Every function puts the model in eval mode and restores its training mode afterwards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill.core.calls import call_model, default_logits, split_labels
from kdistill.data import Batched, Inputs, move, primary

IGNORE_INDEX = -100


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; each model's own training mode restored on leaving."""
    modes = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives (CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def next_token_targets(inputs: Inputs, labels: Tensor | None) -> tuple[Inputs, Tensor]:
    """The model inputs and the ``(N, T − 1)`` next-token targets of one batch.

    ``labels``: Hugging Face token labels ``(N, T)`` (unshifted; a ``labels`` entry in ``inputs`` is
    taken out and used instead); anything else (class labels, ``None``) means "the input ids". Targets
    are ``labels[:, 1:]`` with −100 wherever ``attention_mask[:, 1:]`` is 0, so padding never counts.
    """
    inputs, labels = split_labels(inputs, labels)
    ids = primary(inputs)
    if labels is None or labels.shape != ids.shape:
        labels = ids
    targets = labels[:, 1:].clone()
    if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), Tensor):
        targets[inputs["attention_mask"][:, 1:] == 0] = IGNORE_INDEX
    return inputs, targets


def next_token_logits(model: nn.Module, inputs: Inputs) -> Tensor:
    """``(N, T − 1, C)``: the logits of positions ``0 … T − 2``, each predicting the following token."""
    return default_logits(call_model(model, inputs))[:, :-1]


def token_log_probs(model: nn.Module, logits: Tensor, targets: Tensor, vocabulary: Any = None) -> Tensor:
    """Full-vocabulary ``log p(target)``, ``(N, T − 1)``, at least float32 (float64 for a float64 model).

    ``vocabulary`` (or else ``model`` itself) with a ``log_probs(logits, ids)`` method — a pruned
    vocabulary — computes it from its compact logits; otherwise a log-softmax over ``C`` is gathered.
    Ignored targets (−100) are read as id 0: their value is meaningless and must be masked out.
    """
    ids = targets.clamp_min(0)
    source = vocabulary if vocabulary is not None else model
    if hasattr(source, "log_probs"):
        return source.log_probs(logits, ids).to(torch.promote_types(logits.dtype, torch.float32))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half logits: softmax in float32
    # gather − logsumexp is log_softmax at the targets without a second (N, T, V) output tensor
    return logits.gather(-1, ids[..., None])[..., 0] - logits.logsumexp(-1)


def predicted_ids(model: nn.Module, logits: Tensor) -> Tensor:
    """Full-vocabulary argmax ids ``(...)`` of logits ``(..., C)`` (a model's own ``predict`` if it has one)."""
    return model.predict(logits) if hasattr(model, "predict") else logits.argmax(-1)


def _index_batches(data: Batched, batch_size: int, desc: str) -> Iterator[Tensor]:
    """The data's index batches, with a progress bar when there are many."""
    batches = math.ceil(len(data) / batch_size)
    return iter(tqdm(data.index_batches(batch_size), total=batches, desc=desc, leave=False, disable=batches < 10))


def perplexity(model: nn.Module, data: Batched, *, batch_size: int = 8, vocabulary: Any = None) -> float:
    """``exp(mean −log p(next token))`` over the counted positions of ``data`` (spec §6).

    Args:
        model: a causal LM; its logits ``(N, T, C)``.
        data: batches of ``({"input_ids": (N, T), "attention_mask": (N, T)}, labels)``; token labels
            ``(N, T)`` are used as they are (−100 = not counted), other labels mean "the input ids".
        batch_size: sequences per forward pass.
        vocabulary: an object with ``log_probs(logits, ids)`` that turns the model's logits into
            full-vocabulary log-probabilities (default: the model's own method, when it has one).

    Returns:
        The perplexity; the negative log-likelihoods are summed in float64. ``nan`` when no position counts.
    """
    device = device_of(model)
    total, count = torch.zeros((), dtype=torch.float64), 0
    with evaluating(model):
        for indices in _index_batches(data, batch_size, "perplexity"):
            inputs, targets = next_token_targets(*data.take(indices))
            inputs, targets = move(inputs, device), targets.to(device)
            log_p = token_log_probs(model, next_token_logits(model, inputs), targets, vocabulary)
            counted = targets != IGNORE_INDEX
            total -= log_p[counted].double().sum().cpu()
            count += int(counted.sum())
    return math.exp(float(total) / count) if count else math.nan


def agreement(student: nn.Module, teacher: nn.Module, data: Batched, *, batch_size: int = 8) -> float:
    """The share of counted next-token positions where the student's full-vocabulary argmax equals the
    teacher's (each model's ``predict`` when it has one). ``nan`` when no position counts."""
    device = device_of(student)
    same, count = 0, 0
    with evaluating(student, teacher):
        for indices in _index_batches(data, batch_size, "agreement"):
            inputs, targets = next_token_targets(*data.take(indices))
            counted = targets.to(device) != IGNORE_INDEX
            student_ids = predicted_ids(student, next_token_logits(student, move(inputs, device)))
            teacher_inputs = move(inputs, device_of(teacher))
            teacher_ids = predicted_ids(teacher, next_token_logits(teacher, teacher_inputs)).to(device)
            same += int((student_ids == teacher_ids)[counted].sum())
            count += int(counted.sum())
    return same / count if count else math.nan


def tokens_per_second(model: nn.Module, data: Batched, *, batch_size: int = 8, batches: int = 10) -> float:
    """Forward-pass throughput in tokens per second (attention-masked tokens, or every input id).

    Eval mode, no gradients; one untimed warm-up batch first (allocations, lazy initialisation), then
    the next ``batches`` batches (fewer if the data runs out; the warm-up batch again if it is the
    only one) timed with ``time.perf_counter``. The caller fixes the thread count.
    """
    device = device_of(model)
    loaded = []
    for indices in data.index_batches(batch_size):  # read before timing: only the model is measured
        inputs, _ = split_labels(data.take(indices)[0])
        loaded.append(move(inputs, device))
        if len(loaded) > batches:
            break
    if not loaded:
        raise ValueError("tokens_per_second: the data is empty")
    timed = loaded[1:] or loaded
    tokens = sum(_token_count(inputs) for inputs in timed)
    with evaluating(model):
        call_model(model, loaded[0])
        _synchronize(device)
        start = time.perf_counter()
        for inputs in timed:
            call_model(model, inputs)
        _synchronize(device)
        elapsed = time.perf_counter() - start
    return tokens / elapsed


def _kv_cache(output: Any) -> dict[str, Any]:
    """The keyword that hands a model output's KV cache back to the model: ``cache`` in recent
    transformers releases (which renamed ``past_key_values`` and deprecated the old name), else
    ``past_key_values``. Read from the output, so wrappers that pass keywords through work too."""
    if isinstance(output, Mapping) and "cache" in output:
        return {"cache": output["cache"]}
    return {"past_key_values": output.past_key_values}


def _token_count(inputs: Inputs) -> int:
    if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), Tensor):
        return int(inputs["attention_mask"].sum())
    return primary(inputs).numel()


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy_generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    """Batch-1 greedy decoding with the KV cache.

    The prompt is run once (``use_cache=True``), then each chosen token alone with the returned KV
    cache (``past_key_values``); the next id is the argmax of the last logits (``model.predict`` when the model
    has one, e.g. a pruned vocabulary). Stops after the tokenizer's EOS (the model config's when the
    tokenizer has none; it is kept, as Hugging Face's ``generate`` keeps it) or ``max_new_tokens`` tokens.

    Returns:
        ``(continuation, ms_per_token)``: the generated tokens decoded without special tokens, and the
        wall time of the whole decoding (prompt pass included: it yields the first token) per
        generated token (``nan`` for ``max_new_tokens`` 0).
    """
    if max_new_tokens < 1:
        return "", math.nan
    device = device_of(model)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)  # (1, P)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    generated: list[int] = []
    with evaluating(model):
        _synchronize(device)
        start = time.perf_counter()
        output = model(input_ids=ids, use_cache=True)
        while True:
            token = int(predicted_ids(model, default_logits(output)[:, -1])[0])
            generated.append(token)
            if token == eos or len(generated) >= max_new_tokens:
                break
            output = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **_kv_cache(output))
        _synchronize(device)
        elapsed = time.perf_counter() - start
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return text, 1000 * elapsed / len(generated)


__all__ = ["agreement", "greedy_generate", "next_token_targets", "perplexity", "tokens_per_second"]
