"""A causal language model cut to a kept set of token ids plus one "other" entry (spec section 6).

Torch only, duck-typed: the wrapped model is reached through the Hugging Face methods it carries
(``get_input_embeddings``, ``get_output_embeddings``, ``set_…``, ``config.vocab_size``), never
through a ``transformers`` import, so this module belongs to the core (docs/architecture.md).

Notation: ``V`` the full vocabulary size, ``K`` the kept ids (sorted), ``|K| + 1`` compact ids:
compact id ``i < |K|`` is full id ``K[i]``, compact id ``|K|`` ("other") stands uniformly for the
``rest = V − |K|`` dropped ids, so ``p_s(v) = p_s(other) / rest`` for ``v ∉ K``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.core.errors import ConfigError, VocabularyError


class PrunedVocabulary(nn.Module):
    """A causal LM cut to the kept token ids K plus one "other" entry standing uniformly for the
    ``V − |K|`` others: ``p_s(v) = p_s(other) / (V − |K|)`` for ``v ∉ K`` (spec §6).

    The model is changed in place: its input embedding and output head are cut to ``|K| + 1`` rows
    (the kept rows copied, the "other" row the mean of the dropped rows), tied if they were tied.
    A learnable scalar ``other_bias``, initialised to ``log(rest)``, is added to the "other" logit,
    so that "other" starts with about the total mass the full head gave the dropped ids.
    ``model.config.vocab_size`` stays ``V``: the wrapper still reads and predicts full ids, and
    Hugging Face causal LMs do not read it in a forward pass without ``labels``.

    Args:
        model: a Hugging Face-style causal LM (``get_input_embeddings``/``get_output_embeddings``,
            their setters, ``config.vocab_size = V``).
        kept: the full ids to keep, any order; repeats are dropped (sorted, unique).

    Raises:
        ConfigError: no kept ids, ids outside ``[0, V)``, every id kept (nothing to prune), or a
            model without an input embedding and output head.
    """

    def __init__(self, model: nn.Module, kept: Sequence[int] | Tensor) -> None:
        super().__init__()
        embedding = _method(model, "get_input_embeddings")()
        head = _method(model, "get_output_embeddings")()
        if not isinstance(embedding, nn.Embedding) or not isinstance(head, nn.Linear):
            raise ConfigError(
                "PrunedVocabulary needs a causal LM with an nn.Embedding input embedding and an nn.Linear "
                f"output head, got {type(embedding).__name__} and {type(head).__name__}"
            )
        config = getattr(model, "config", None)
        vocab_size = getattr(config, "vocab_size", None)
        vocab_size = vocab_size if isinstance(vocab_size, int) else embedding.num_embeddings
        ids = _kept_ids(kept, vocab_size)

        self.model = model
        self.vocab_size = vocab_size
        self.other = int(ids.numel())
        self.rest = vocab_size - self.other
        is_kept = torch.zeros(vocab_size, dtype=torch.bool)
        is_kept[ids] = True
        device = embedding.weight.device
        self.register_buffer("kept", ids.to(device))
        self.register_buffer("dropped", torch.arange(vocab_size)[~is_kept].to(device))
        # Full id → compact id (dropped ids → other): one gather per call instead of a search.
        table = torch.full((vocab_size,), self.other, dtype=torch.long)
        table[ids] = torch.arange(self.other)
        self.register_buffer("table", table.to(device))

        tied = head.weight is embedding.weight or bool(getattr(config, "tie_word_embeddings", False))
        with torch.no_grad():
            new_embedding = nn.Embedding(
                self.other + 1,
                embedding.embedding_dim,
                padding_idx=self._compact_padding(embedding.padding_idx),
                device=device,
                dtype=embedding.weight.dtype,
            )
            new_embedding.weight.copy_(_cut_rows(embedding.weight, self.kept, self.dropped))
            new_head = nn.Linear(
                head.in_features, self.other + 1, bias=head.bias is not None, device=device, dtype=head.weight.dtype
            )
            if tied:
                new_head.weight = new_embedding.weight  # one parameter, as the full model had
            else:
                new_head.weight.copy_(_cut_rows(head.weight, self.kept, self.dropped))
            if head.bias is not None:
                new_head.bias.copy_(_cut_rows(head.bias, self.kept, self.dropped))
        _method(model, "set_input_embeddings")(new_embedding)
        _method(model, "set_output_embeddings")(new_head)
        self.other_bias = nn.Parameter(torch.tensor(math.log(self.rest), dtype=head.weight.dtype, device=device))

    def _compact_padding(self, padding_idx: int | None) -> int | None:
        # A padding id outside K would freeze the "other" row (padding rows get no gradient).
        if padding_idx is None or not bool((self.kept == padding_idx).any()):
            return None
        return int(self.table[padding_idx])

    def compact(self, ids: Tensor) -> Tensor:
        """Full ids ``(...)`` → compact ids ``(...)``: ids outside K become ``other``; negative ids
        (``ignore_index``, −100) are left as they are.

        Raises:
            VocabularyError: an id ``≥ V``.
        """
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise VocabularyError(f"token id {int(ids.max())} is outside the vocabulary of {self.vocab_size} ids")
        return torch.where(ids < 0, ids, self.table[ids.clamp_min(0)])

    def forward(self, input_ids: Tensor, **kwargs: Any) -> Any:
        """The inner model on ``compact(input_ids)`` ``(N, T)``; its output's ``.logits`` are
        ``(N, T, |K| + 1)``, the last column with ``other_bias`` added. Other keyword arguments
        (``attention_mask``, ``past_key_values``, ``use_cache``, …) pass through."""
        output = self.model(input_ids=self.compact(input_ids), **kwargs)
        bias = F.pad(self.other_bias.reshape(1), (self.other, 0))  # (|K| + 1,): 0 … 0, other_bias
        if isinstance(output, Tensor):
            return output + bias
        if isinstance(output, tuple):  # return_dict=False: the logits come first
            return (output[0] + bias, *output[1:])
        output.logits = output.logits + bias
        return output

    def coarsen(self, teacher_logits: Tensor, temperature: float) -> Tensor:
        """Full-vocabulary logits ``(..., V)`` → ``(..., |K| + 1)`` such that ``softmax(out / τ)`` is
        ``softmax(teacher_logits / τ)`` coarsened to ``K ∪ {other}``: the kept columns as they are,
        "other" ``= τ · logsumexp(z_dropped / τ)``. At least float32 (float64 stays)."""
        logits = teacher_logits if teacher_logits.dtype == torch.float64 else teacher_logits.float()
        kept = logits.index_select(-1, self.kept)
        other = temperature * (logits.index_select(-1, self.dropped) / temperature).logsumexp(-1, keepdim=True)
        return torch.cat([kept, other], -1)

    def tempered_offset(self, temperature: float) -> Tensor | None:
        """The ``(|K| + 1,)`` offset that tempers compact logits as the full-vocabulary ones are, or
        None at ``τ = 1`` (no offset).

        Convention: the student is tempered as its FULL-vocabulary logits are. Its full logit of each
        dropped id is ``z_other − log(rest)``; coarsening ``softmax(z_full / τ)`` to ``K ∪ {other}``
        gives "other" the compact logit ``z_other + (τ − 1)·log(rest)``, so the offset is 0 on the
        kept columns and ``(τ − 1)·log(rest)`` on "other". Tempering the compact ``|K| + 1`` softmax
        directly would leave it out (at ``τ = 2`` a student equal to its teacher would not score 0).
        Float64 on the model's device; the caller casts it to its logits' dtype.
        """
        if temperature == 1:
            return None
        offset = torch.zeros(self.other + 1, dtype=torch.float64, device=self.kept.device)
        offset[self.other] = (temperature - 1) * math.log(self.rest)
        return offset

    def tempered(self, logits: Tensor, temperature: float) -> Tensor:
        """Compact logits ``(..., |K| + 1)`` → ``(..., |K| + 1)`` such that ``softmax(out / τ)`` is the
        student's full-vocabulary distribution tempered at ``τ``, ``softmax(z_full / τ)``, coarsened to
        ``K ∪ {other}``: ``logits`` plus :meth:`tempered_offset` (the same tensor at ``τ = 1``). The
        student's counterpart of :meth:`coarsen`; the response term reads it, CE (at ``τ = 1``) does not."""
        offset = self.tempered_offset(temperature)
        return logits if offset is None else logits + offset.to(dtype=logits.dtype, device=logits.device)

    def log_probs(self, logits: Tensor, ids: Tensor) -> Tensor:
        """Full-vocabulary ``log p_s(ids)`` at ``τ = 1``: compact logits ``(..., |K| + 1)`` and FULL
        ids ``(...)`` → ``(...)``, ``log p_s(other) − log(rest)`` for ids outside K. Negative ids
        (ignored positions) give 0, so a masked sum needs no further step."""
        log_p = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), -1)
        compact = self.compact(ids)
        picked = log_p.gather(-1, compact.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        picked = torch.where(compact == self.other, picked - math.log(self.rest), picked)
        return torch.where(compact < 0, torch.zeros_like(picked), picked)

    def full_log_probs(self, logits: Tensor) -> Tensor:
        """``(..., |K| + 1)`` compact logits → ``(..., V)`` full log-probabilities (they sum to one
        over V). Materialises V columns: for tests and small inputs."""
        log_p = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), -1)
        spread = log_p[..., self.other :] - math.log(self.rest)
        full = spread.expand(*log_p.shape[:-1], self.vocab_size).contiguous()
        return full.index_copy(-1, self.kept, log_p[..., : self.other].contiguous())

    def predict(self, logits: Tensor) -> Tensor:
        """Full-vocabulary argmax ids ``(...)`` from compact logits ``(..., |K| + 1)``: the kept id
        with the largest probability, unless ``p(other) / rest`` is larger, then the smallest id
        not in K (each dropped id has that probability; argmax takes the first)."""
        log_p = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), -1)
        best, position = log_p[..., : self.other].max(-1)
        other = log_p[..., self.other] - math.log(self.rest)
        return torch.where(other > best, self.dropped[0], self.kept[position])

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, kept={self.other}, rest={self.rest}"


def _method(model: nn.Module, name: str) -> Any:
    method = getattr(model, name, None)
    if not callable(method):
        raise ConfigError(f"PrunedVocabulary needs a causal LM with {name}(), {type(model).__name__} has none")
    return method


def _kept_ids(kept: Sequence[int] | Tensor, vocab_size: int) -> Tensor:
    """The kept ids as a sorted, unique ``(|K|,)`` long tensor, after checking them."""
    try:
        ids = torch.as_tensor(kept)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(f"kept token ids must be a sequence of integers: {error}") from None
    if ids.dim() != 1 or ids.numel() == 0:
        raise ConfigError(f"kept token ids must be a non-empty list of ids, got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ConfigError(f"kept token ids must be integers, got {ids.dtype}")
    ids = ids.long().cpu().unique(sorted=True)
    if int(ids[0]) < 0 or int(ids[-1]) >= vocab_size:
        bad = int(ids[0]) if int(ids[0]) < 0 else int(ids[-1])
        raise ConfigError(f"kept token id {bad} is outside the vocabulary [0, {vocab_size})")
    if ids.numel() == vocab_size:
        raise ConfigError(f"the kept ids are all {vocab_size} ids of the vocabulary: nothing to prune")
    return ids


def _cut_rows(weight: Tensor, kept: Tensor, dropped: Tensor) -> Tensor:
    """``(V, ...)`` → ``(|K| + 1, ...)``: the kept rows, then the mean of the dropped ones."""
    return torch.cat([weight[kept], weight[dropped].mean(0, keepdim=True)], 0)
