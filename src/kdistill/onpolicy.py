"""On-policy distillation (GKD, Agarwal et al. 2024; MiniLLM, Gu et al. 2024): the student learns
from the teacher on continuations the student itself samples.

:class:`OnPolicyDistillation` is a task module like :class:`kdistill.cache.CachedDistillation`: the
:class:`~kdistill.trainer.Trainer` calls it as ``task(inputs, labels, index=…, epoch=…)``. For each
batch it decides, with probability λ (``fraction``), whether the batch is on-policy:

* off-policy: the batch goes unchanged to ``off_policy`` (e.g. a ``CachedDistillation``) or to the
  distiller with the live teacher; with λ = 0 training is bit-identical to training without the wrapper;
* on-policy: the prompts are the first ``prompt_tokens`` tokens of each block, the student samples
  ``max_new_tokens`` tokens after each (KV cache, no gradient, temperature, top-p), the live teacher
  scores prompt + continuation in one forward pass, and the loss is the distiller's divergence on the
  generated tokens only. With ``prompts`` (a prompt file's, ``distill.prompt_file``) the prompts are
  drawn from those instead (see :meth:`OnPolicyDistillation.batch_prompts`).

Determinism without RNG state: whether a batch is on-policy, and the seed of the generator it samples
with, are hashes of ``(seed, epoch, the batch's sample indices)``. Nothing is drawn from torch's global
RNG, so a checkpoint needs no extra state and a resumed run samples exactly what the uninterrupted one
sampled (on the same machine and thread count).

Positions follow the Hugging Face causal-LM convention (spec §6, :func:`kdistill.core.distiller.next_token_positions`):
labels are the input ids unshifted, the logits at ``t`` predict the token at ``t + 1``, and positions
labelled −100 or with attention mask 0 count nowhere.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.core.calls import default_logits, split_labels
from kdistill.core.errors import ConfigError
from kdistill.core.vocabulary import PrunedVocabulary
from kdistill.data import Batched, primary
from kdistill.lm_eval import IGNORE_INDEX, _kv_cache, device_of, evaluating, token_log_probs

logger = logging.getLogger(__name__)

LIVE_TEACHER_NOTE = (
    "on-policy batches are scored by the live teacher (a teacher-output cache cannot hold the teacher's "
    "outputs for text the student has just written); off-policy batches keep using the cache, if any"
)


def batch_seed(seed: int, epoch: int, index: Tensor, purpose: str) -> int:
    """A 63-bit integer that is a pure function of ``(purpose, seed, epoch, index)``.

    ``index``: the batch's ``(n,)`` sample indices, in batch order. Used instead of a stateful RNG so
    that a resumed run makes exactly the decisions of the uninterrupted one.
    """
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{purpose}:{int(seed)}:{int(epoch)}:".encode())
    digest.update(np.ascontiguousarray(index.detach().cpu().numpy().astype(np.int64)).tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def is_on_policy(fraction: float, seed: int, epoch: int, index: Tensor) -> bool:
    """Whether a batch is on-policy: ``u < fraction`` with ``u`` uniform in ``[0, 1)``, hashed from
    ``(seed, epoch, index)``. Always False for ``fraction = 0``, always True for ``fraction = 1``."""
    return batch_seed(seed, epoch, index, "on-policy") / 2.0**63 < fraction


def sample_next_ids(
    model: nn.Module, logits: Tensor, *, temperature: float, top_p: float, generator: torch.Generator
) -> Tensor:
    """One sampled full-vocabulary id per row from next-token logits ``(N, C)`` → ``(N,)`` long.

    ``softmax(logits / temperature)`` (a pruned student's logits tempered as its full-vocabulary logits
    are, see :meth:`~kdistill.core.vocabulary.PrunedVocabulary.tempered`), cut to its top-p nucleus (the
    fewest most probable entries whose mass reaches ``top_p``, renormalised), sampled with
    ``generator``. For a
    :class:`~kdistill.core.vocabulary.PrunedVocabulary` the draw is over its ``|K| + 1`` compact ids (top-p
    too: "other" is one entry) and a drawn "other" becomes an id drawn uniformly from the ``V − |K|``
    dropped ids, which is exactly the full-vocabulary distribution the spec gives the pruned student
    (``p(v) = p(other) / (V − |K|)`` for ``v ∉ K``). Every call draws the same number of random
    values whatever was drawn, so the generator's stream does not depend on the outcome.
    """
    if isinstance(model, PrunedVocabulary):  # tempered as its full-vocabulary logits are (spec §6)
        logits = model.tempered(logits, temperature)
    probabilities = F.softmax((logits if logits.dtype == torch.float64 else logits.float()) / temperature, -1)
    if top_p < 1.0:
        # Stable sort: ties keep id order, so the nucleus is the same on every run.
        sorted_p, order = probabilities.sort(dim=-1, descending=True, stable=True)
        # Keep an entry while the mass before it is below top_p (the first entry always stays).
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        chosen = torch.multinomial(sorted_p * keep, 1, generator=generator)
        ids = order.gather(-1, chosen)[:, 0]
    else:
        ids = torch.multinomial(probabilities, 1, generator=generator)[:, 0]
    if not isinstance(model, PrunedVocabulary):
        return ids
    spread = torch.randint(model.rest, (ids.shape[0],), generator=generator, device=ids.device)
    return torch.where(ids == model.other, model.dropped[spread], model.kept[ids.clamp_max(model.other - 1)])


def sample_continuations(
    model: nn.Module,
    prompts: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator,
    eos_token_id: int | Collection[int] | None = None,
    pad_token_id: int = 0,
) -> tuple[Tensor, Tensor]:
    """Sample continuations of ``prompts`` ``(N, P)`` (full ids, no padding) with the KV cache.

    The prompts run once (``use_cache=True``), then each sampled token alone with the returned cache,
    as :func:`kdistill.lm_eval.greedy_generate` does. A row stops after its first EOS (kept, as Hugging
    Face's ``generate`` keeps it); later positions hold ``pad_token_id`` with attention mask 0. Decoding
    ends after ``max_new_tokens`` tokens or when every row has stopped. Runs in eval mode without
    gradients (the model's training mode is restored); the sampled ids are plain integers.

    Returns:
        ``(ids, attention_mask)``, both ``(N, P + M)`` long, ``M ≤ max_new_tokens`` the generated length.
    """
    stops = _eos_ids(eos_token_id, prompts.device)
    finished = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
    tokens: list[Tensor] = []
    alive: list[Tensor] = []
    with evaluating(model):
        output = model(input_ids=prompts, use_cache=True)
        for step in range(max_new_tokens):
            drawn = sample_next_ids(
                model, default_logits(output)[:, -1], temperature=temperature, top_p=top_p, generator=generator
            )
            alive.append(~finished)
            drawn = torch.where(finished, torch.full_like(drawn, pad_token_id), drawn)
            tokens.append(drawn)
            if stops is not None:
                finished = finished | torch.isin(drawn, stops)
            if bool(finished.all()) or step + 1 == max_new_tokens:
                break
            output = model(input_ids=drawn[:, None], use_cache=True, **_kv_cache(output))
    generated = torch.stack(tokens, 1) if tokens else prompts.new_zeros((prompts.shape[0], 0))
    mask = torch.stack(alive, 1).long() if alive else generated
    return torch.cat([prompts, generated], 1), torch.cat([torch.ones_like(prompts), mask], 1)


def _eos_ids(eos_token_id: int | Collection[int] | None, device: torch.device) -> Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def model_eos_id(model: nn.Module) -> int | list[int] | None:
    """The EOS id(s) a Hugging Face model's config names (a pruned vocabulary's inner model's)."""
    inner = model.model if isinstance(model, PrunedVocabulary) else model
    return getattr(getattr(inner, "config", None), "eos_token_id", None)


def prompts_of(inputs: Any, prompt_tokens: int) -> Tensor:
    """The first ``prompt_tokens`` ids ``(N, P)`` of each block of token ``inputs``.

    Raises:
        ConfigError: blocks shorter than ``prompt_tokens``, or padding inside a prompt (rows of different
            prompt lengths would need left padding, which the sampler does not do).
    """
    ids = primary(inputs)
    if ids.dim() != 2 or ids.shape[1] < prompt_tokens:
        raise ConfigError(
            f"on-policy prompts are the first {prompt_tokens} tokens of each block, but the blocks have shape "
            f"{tuple(ids.shape)}: lower distill.prompt_tokens"
        )
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(mask, Tensor) and not bool(mask[:, :prompt_tokens].bool().all()):
        raise ConfigError(
            f"a block has padding inside its first {prompt_tokens} tokens (the on-policy prompt): "
            "lower distill.prompt_tokens or drop short blocks"
        )
    return ids[:, :prompt_tokens]


def checked_prompts(prompts: Tensor | list[Tensor], prompt_tokens: int) -> list[Tensor]:
    """``prompts`` (an ``(n, P')`` tensor or ``n`` 1-D tensors) as a list of 1-D long CPU tensors.

    Raises:
        ConfigError: no prompts, an empty prompt, or one longer than ``prompt_tokens`` ids.
    """
    rows = list(prompts.unbind(0)) if isinstance(prompts, Tensor) and prompts.dim() == 2 else list(prompts)
    if not rows:
        raise ConfigError("distill.prompt_file: no prompts (one prompt per non-empty line)")
    checked = []
    for number, row in enumerate(rows, 1):
        row = torch.as_tensor(row).detach().long().cpu().reshape(-1)
        if row.numel() == 0:
            raise ConfigError(f"distill.prompt_file: prompt {number} is empty (0 tokens)")
        if row.numel() > prompt_tokens:
            raise ConfigError(
                f"distill.prompt_file: prompt {number} has {row.numel()} tokens, more than distill.prompt_tokens "
                f"({prompt_tokens}); shorten it or raise prompt_tokens"
            )
        checked.append(row)
    return checked


def generated_labels(ids: Tensor, attention_mask: Tensor, prompt_tokens: int) -> Tensor:
    """Labels ``(N, T)`` for a sampled sequence: the ids, −100 on the prompt and on padding, so that with
    the causal shift only the generated tokens are scored."""
    labels = ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :prompt_tokens] = IGNORE_INDEX
    return labels


class OnPolicyDistillation(nn.Module):
    """A fraction λ of the batches trains on the student's own samples, scored by the live teacher.

    Args:
        distiller: a :class:`~kdistill.core.distiller.Distiller` of causal LMs (``causal_lm``), whose response
            loss is the divergence (``jsd`` with β = 0.5 as in GKD, ``reverse_kl`` as in MiniLLM: the
            distiller's choice, at its τ).
        fraction: λ in [0, 1], the probability that a batch is on-policy.
        prompt_tokens: ``P``, how many leading tokens of each block are the prompt.
        max_new_tokens: ``M``, at most how many tokens the student samples after each prompt.
        sampling_temperature: the student's sampling temperature (> 0), independent of the distiller's τ.
        top_p: nucleus sampling mass in (0, 1]; 1 samples from the whole distribution.
        seed: with the epoch and the batch's indices, decides which batches are on-policy and what they sample.
        off_policy: the task for off-policy batches (e.g. a ``CachedDistillation`` of the same distiller),
            given the batch facts it declares in ``batch_facts``; None: the distiller with the live teacher.
        eos_token_id: where a sampled row stops (one id or several); None: the student's config's.
        pad_token_id: the id written after a row's EOS (masked out everywhere).
        prompts: None: the prompts are the first ``prompt_tokens`` tokens of each block; else the
            prompts to draw from (a prompt file's, tokenized): an ``(n, P')`` tensor or ``n`` 1-D tensors of
            1 to ``prompt_tokens`` ids each (see :meth:`batch_prompts`).
        log: receives the one-time note that on-policy batches use the live teacher (default: this
            module's logger, level INFO).

    On-policy loss: ``β · (α · L_resp + L_feat)`` of the distiller on the sampled sequences, L_resp over
    the generated tokens only (the EOS included, the prompt and the padding after EOS excluded). The
    distiller's cross-entropy is *not* in it: on its own samples it would be the student's likelihood of
    what it just wrote, not a target; it stays in the returned dict as ``ce``, detached, for logging.
    The distiller is called with ``ce_weight=0`` (the labels still choose the generated positions), so
    this holds for a chunked distiller (``chunk_tokens``) too.
    With ``alpha = 0`` there is no response term and λ > 0 is refused.

    ``forward(inputs, labels, *, index, epoch)`` returns the loss dict of the batch's task; on-policy
    dicts also have ``generated_tokens`` (counted tokens per row, mean).

    Under DDP each process decides per batch from its own share of the sample indices (``index``), so in
    one step some processes can train on-policy and others not; λ is then the probability per process
    share (per process batch), not for the global batch as a whole.
    """

    batch_facts = ("index", "epoch")

    def __init__(
        self,
        distiller: nn.Module,
        *,
        fraction: float,
        prompt_tokens: int,
        max_new_tokens: int,
        sampling_temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        off_policy: nn.Module | None = None,
        eos_token_id: int | Collection[int] | None = None,
        pad_token_id: int = 0,
        log: Callable[[str], None] | None = None,
        prompts: Tensor | list[Tensor] | None = None,
    ) -> None:
        super().__init__()
        _check(_is_number(fraction) and 0.0 <= fraction <= 1.0, "distill.on_policy (λ) must be in [0, 1]", fraction)
        for name, count in (("prompt_tokens", prompt_tokens), ("max_new_tokens", max_new_tokens)):
            _check(isinstance(count, int) and count >= 1, f"distill.{name} must be an integer ≥ 1", count)
        _check(
            _is_number(sampling_temperature) and math.isfinite(sampling_temperature) and sampling_temperature > 0,
            "distill.sampling_temperature must be a finite number > 0",
            sampling_temperature,
        )
        _check(_is_number(top_p) and 0.0 < top_p <= 1.0, "distill.top_p must be in (0, 1]", top_p)
        if fraction > 0 and not getattr(distiller, "causal_lm", False):
            raise ConfigError("on-policy distillation needs causal language models (the distiller's causal_lm)")
        if fraction > 0 and getattr(distiller, "alpha", 1.0) == 0:
            raise ConfigError("on-policy distillation trains on the response term, but distill.alpha is 0")
        self.distiller = distiller
        self.off_policy = off_policy
        self.fraction = float(fraction)
        self.prompt_tokens, self.max_new_tokens = prompt_tokens, max_new_tokens
        self.sampling_temperature, self.top_p, self.seed = float(sampling_temperature), float(top_p), int(seed)
        self.eos_token_id = eos_token_id if eos_token_id is not None else model_eos_id(distiller.student)
        self.pad_token_id = pad_token_id
        self.prompts = None if prompts is None else checked_prompts(prompts, prompt_tokens)
        self.log = log if log is not None else logger.info
        self._noted = False
        # Counts of this process's batches (not checkpointed: for reports, not for training).
        self.on_policy_batches = 0
        self.off_policy_batches = 0

    def forward(self, inputs: Any, labels: Tensor | None = None, *, index: Tensor, epoch: int = 0) -> dict[str, Tensor]:
        if not is_on_policy(self.fraction, self.seed, epoch, index):
            self.off_policy_batches += 1
            if self.off_policy is None:
                return self.distiller(inputs, labels)
            facts = {"index": index, "epoch": epoch}
            wanted = getattr(self.off_policy, "batch_facts", ())
            return self.off_policy(inputs, labels, **{name: facts[name] for name in wanted if name in facts})
        self.on_policy_batches += 1
        if not self._noted:
            self.log(LIVE_TEACHER_NOTE)
            self._noted = True
        sequence, sampled_labels = self.on_policy_batch(inputs, index=index, epoch=epoch)
        # The divergence alone (see the class docstring: no cross-entropy on the student's own samples).
        # The distiller leaves CE out itself rather than this module rebuilding the loss from the
        # reported terms: under chunk_tokens those carry no gradient, only the distiller's loss does.
        out = self.distiller(sequence, sampled_labels, ce_weight=0.0)
        counted = (sampled_labels[:, 1:] != IGNORE_INDEX).sum(1).double().mean()
        return {**out, "generated_tokens": counted}

    @torch.no_grad()
    def on_policy_batch(self, inputs: Any, *, index: Tensor, epoch: int = 0) -> tuple[dict[str, Tensor], Tensor]:
        """The sampled batch: ``({"input_ids", "attention_mask"}, labels)``, each ``(N, P + M)``, labels −100
        on the prompt and after EOS. A pure function of the student's weights, ``inputs``, ``index``,
        ``epoch`` and ``seed``; uses no global RNG."""
        inputs, _ = split_labels(inputs)
        if self.prompts is None:
            prompts = prompts_of(inputs, self.prompt_tokens)
        else:
            prompts = self.batch_prompts(index, epoch).to(primary(inputs).device)
        student = self.distiller.student
        generator = torch.Generator(device=prompts.device)
        generator.manual_seed(batch_seed(self.seed, epoch, index, "sample"))
        ids, mask = sample_continuations(
            student,
            prompts,
            max_new_tokens=self.max_new_tokens,
            temperature=self.sampling_temperature,
            top_p=self.top_p,
            generator=generator,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        return {"input_ids": ids, "attention_mask": mask}, generated_labels(ids, mask, prompts.shape[1])

    def batch_prompts(self, index: Tensor, epoch: int = 0) -> Tensor:
        """The batch's ``(N, L)`` prompts from ``self.prompts``, ``N = len(index)``: drawn uniformly with
        replacement by a generator seeded from ``(seed, epoch, index)`` (stateless, so resume is exact),
        each cut to its first ``L`` ids, ``L`` the shortest drawn prompt's length.

        Why cut rather than left-pad: a Hugging Face Llama takes positions from ``cache_position``, not
        from the attention mask, so a left-padded row would see its prompt at shifted positions unless
        every call (sampling steps and the teacher's pass) passed matching ``position_ids``. Cutting to
        the shortest keeps every row unpadded and exactly what a batch of one would see.
        """
        assert self.prompts is not None
        generator = torch.Generator().manual_seed(batch_seed(self.seed, epoch, index, "prompt"))
        chosen = torch.randint(len(self.prompts), (len(index),), generator=generator).tolist()
        length = min(len(self.prompts[i]) for i in chosen)
        return torch.stack([self.prompts[i][:length] for i in chosen])

    def extra_repr(self) -> str:
        return (
            f"fraction={self.fraction}, prompt_tokens={self.prompt_tokens}, max_new_tokens={self.max_new_tokens}, "
            f"sampling_temperature={self.sampling_temperature}, top_p={self.top_p}, seed={self.seed}"
        )


def teacher_nll_of_samples(
    student: nn.Module,
    teacher: nn.Module,
    prompts_data: Batched,
    *,
    prompt_tokens: int,
    max_new_tokens: int,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    eos_token_id: int | Collection[int] | None = None,
) -> float:
    """The teacher's mean per-token negative log-likelihood (nats) of the student's sampled continuations.

    The prompts are the first ``prompt_tokens`` tokens of each block of ``prompts_data`` (held-out
    blocks); the student samples up to ``max_new_tokens`` tokens after each (as in training: EOS stops a
    row and counts; each batch's generator is seeded from ``seed`` and its indices, so the result does
    not depend on anything but the arguments); the teacher scores prompt + continuation in one pass, at
    temperature 1, over its full vocabulary. The mean is over every generated token, summed in float64.
    How much the teacher agrees with what the student writes: the quantity on-policy training targets.
    ``nan`` when nothing was generated.
    """
    eos = eos_token_id if eos_token_id is not None else model_eos_id(student)
    device, teacher_device = device_of(student), device_of(teacher)
    total, count = torch.zeros((), dtype=torch.float64), 0
    with evaluating(student, teacher):
        for indices in prompts_data.index_batches(batch_size):
            inputs, _ = split_labels(prompts_data.take(indices)[0])
            prompts = prompts_of(inputs, prompt_tokens).to(device)
            generator = torch.Generator(device=device)
            generator.manual_seed(batch_seed(seed, 0, indices, "evaluate"))
            ids, mask = sample_continuations(
                student,
                prompts,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
                eos_token_id=eos,
            )
            ids, mask = ids.to(teacher_device), mask.to(teacher_device)
            targets = generated_labels(ids, mask, prompt_tokens)[:, 1:]
            logits = default_logits(teacher(input_ids=ids, attention_mask=mask))[:, :-1]
            counted = targets != IGNORE_INDEX
            total -= token_log_probs(teacher, logits, targets)[counted].double().sum().cpu()
            count += int(counted.sum())
    return float(total) / count if count else math.nan


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, message: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{message}, got {value!r}")


__all__ = [
    "OnPolicyDistillation",
    "batch_seed",
    "checked_prompts",
    "is_on_policy",
    "sample_continuations",
    "sample_next_ids",
    "teacher_nll_of_samples",
]
