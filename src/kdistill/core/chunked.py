"""A head-and-divergence loss for big vocabularies that never holds the full ``(N, V)`` logits.

A language model's last layer maps ``N`` hidden states ``(N, H)`` to logits ``(N, V)``; at
``N = 8,192`` tokens and ``V = 49,152`` one float32 logits tensor is 1.6 GB, and autograd keeps
several (student and teacher logits, log-softmaxes, their gradients). Here the rows go through the
head ``chunk_size`` at a time: one chunk's student logits ``(chunk, V)`` are computed, turned into
the loss and, in place, into the gradient of the loss with respect to those logits, which two
matrix products carry back to the hidden states and the head (weight and bias) right away. Only
those gradients are kept for the backward pass, so the extra memory is ``O(chunk × V)`` (plus
the head's gradient, which any training step holds), there is no second pass over the head and
nothing is recomputed. The teacher's logits, when given as hidden states and a head, are computed
without gradient :data:`TEACHER_ROWS` rows at a time (one matrix product reads the teacher's head
once per slab), so they never exist in full either; the elementwise work runs on blocks of
:data:`BLOCK_ROWS` rows, so that its dozen temporaries stay a few MB each.

The gradient with respect to the student logits is derived by hand for the divergences of spec
section 6 (see each ``_*_gradient``); any other row-wise response loss (``dkd``, a user function
returning a mean over rows) gets it from a local autograd call on one block's logits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.core import losses
from kdistill.core.errors import ClassCountError, ConfigError

TEACHER_ROWS = 256
"""Rows of teacher logits computed at once: ``(256, V)``, 50 MB at V = 49,152."""
BLOCK_ROWS = 16
"""Rows per elementwise block: each temporary is ``(16, V)``, 3.1 MB at V = 49,152."""

Head = nn.Linear | Tensor | tuple[Tensor, Tensor | None]
# (log P_s, log P_t, **parameters) -> (per-row divergence (b,), its gradient w.r.t. s = z_s / τ (b, V))
DivergenceGradient = Callable[..., tuple[Tensor, Tensor]]


# -- analytic gradients ------------------------------------------------------------------------
# With s = z_s / τ and P = softmax(s), a row function f(P) has ∂f/∂s = P ⊙ (u − ⟨P, u⟩), u = ∂f/∂P
# (the softmax Jacobian); each function below gives u in closed form. ∂/∂z_s is that over τ.


def _through_softmax(p_student: Tensor, du: Tensor) -> Tensor:
    """``P ⊙ (u − ⟨P, u⟩)``: the gradient w.r.t. the logits ``s`` of ``f`` with ``∂f/∂P = u``, both ``(b, V)``."""
    return p_student * (du - (p_student * du).sum(-1, keepdim=True))


def _weighted_log_ratio(p: Tensor, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """``(KL(P ‖ Q) rows (b,), log P − log Q (b, V))``; a class with ``P = 0`` adds 0, not 0·∞."""
    log_ratio = log_p - log_q
    return torch.where(p > 0, p * log_ratio, 0.0).sum(-1), log_ratio


def _kl_gradient(log_p_student: Tensor, log_p_teacher: Tensor) -> tuple[Tensor, Tensor]:
    """``KL(P_t ‖ P_s)``; ``∂/∂s = P_s − P_t``."""
    p_teacher = log_p_teacher.exp()
    rows, _ = _weighted_log_ratio(p_teacher, log_p_teacher, log_p_student)
    return rows, log_p_student.exp() - p_teacher


def _reverse_kl_gradient(log_p_student: Tensor, log_p_teacher: Tensor) -> tuple[Tensor, Tensor]:
    """``KL(P_s ‖ P_t)``; ``u = log P_s − log P_t`` (+1, which the softmax Jacobian cancels)."""
    p_student = log_p_student.exp()
    rows, log_ratio = _weighted_log_ratio(p_student, log_p_student, log_p_teacher)
    return rows, p_student * (log_ratio - rows[:, None])


def _jsd_gradient(log_p_student: Tensor, log_p_teacher: Tensor, beta: float = 0.5) -> tuple[Tensor, Tensor]:
    """``β·KL(P_t ‖ M) + (1 − β)·KL(P_s ‖ M)``, ``M = β·P_t + (1 − β)·P_s``; ``u = (1 − β)(log P_s − log M)``.

    (The ``−β·P_t/M`` and ``−(1 − β)·P_s/M`` terms of ``∂/∂P_s`` sum to the constant ``−1``.)
    ``β = 0`` and ``β = 1`` are the forward and reverse KL, as in :func:`kdistill.core.losses.generalized_jsd`.
    """
    losses._check_weight("the jsd beta", beta)
    if beta == 0:
        return _kl_gradient(log_p_student, log_p_teacher)
    if beta == 1:
        return _reverse_kl_gradient(log_p_student, log_p_teacher)
    log_mix = losses.log_mixture(log_p_teacher, log_p_student, beta)
    p_student, p_teacher = log_p_student.exp(), log_p_teacher.exp()
    teacher_rows, _ = _weighted_log_ratio(p_teacher, log_p_teacher, log_mix)
    student_rows, log_ratio = _weighted_log_ratio(p_student, log_p_student, log_mix)
    gradient = (1 - beta) * p_student * (log_ratio - student_rows[:, None])
    return beta * teacher_rows + (1 - beta) * student_rows, gradient


def _skew_kl_gradient(log_p_student: Tensor, log_p_teacher: Tensor, skew: float = 0.1) -> tuple[Tensor, Tensor]:
    """``KL(P_t ‖ M)``, ``M = λ·P_t + (1 − λ)·P_s``; ``u = −(1 − λ)·P_t / M``."""
    losses._check_weight("the skew", skew)
    if skew == 0:  # P_t / P_s could overflow where P_s underflows; the KL form has no ratio
        return _kl_gradient(log_p_student, log_p_teacher)
    log_mix = losses.log_mixture(log_p_teacher, log_p_student, skew)
    p_teacher = log_p_teacher.exp()
    rows, log_ratio = _weighted_log_ratio(p_teacher, log_p_teacher, log_mix)
    ratio = torch.where(p_teacher > 0, log_ratio.exp(), 0.0)  # P_t / M ≤ 1/λ
    return rows, _through_softmax(log_p_student.exp(), -(1 - skew) * ratio)


def _skew_reverse_kl_gradient(log_p_student: Tensor, log_p_teacher: Tensor, skew: float = 0.1) -> tuple[Tensor, Tensor]:
    """``KL(P_s ‖ M)``, ``M = λ·P_s + (1 − λ)·P_t``; ``u = log P_s − log M − λ·P_s / M`` (+1)."""
    losses._check_weight("the skew", skew)
    log_mix = losses.log_mixture(log_p_student, log_p_teacher, skew)
    p_student = log_p_student.exp()
    rows, log_ratio = _weighted_log_ratio(p_student, log_p_student, log_mix)
    du = log_ratio - skew * log_ratio.exp() if skew > 0 else log_ratio  # P_s / M ≤ 1/λ
    return rows, _through_softmax(p_student, du)


def _tvd_gradient(log_p_student: Tensor, log_p_teacher: Tensor) -> tuple[Tensor, Tensor]:
    """``½ Σ |P_t − P_s|``; ``u = ½·sign(P_s − P_t)`` (0 at ties, as autograd's ``abs``)."""
    p_student, p_teacher = log_p_student.exp(), log_p_teacher.exp()
    difference = p_student - p_teacher
    return 0.5 * difference.abs().sum(-1), _through_softmax(p_student, 0.5 * difference.sign())


def _topk_kl_gradient(log_p_student: Tensor, teacher: losses.TopKLogits, temperature: float) -> tuple[Tensor, Tensor]:
    """The coarse KL of :func:`kdistill.core.losses.topk_kl_rows` and its gradient w.r.t. ``s``.

    ``f = −Σ_{i∈K} a_i log P_s(i) − r·log P_s(rest)`` + constants, with ``a`` the teacher's top-k
    probabilities and ``r`` its remaining mass, so ``∂f/∂s_j = P_s(j)·(Σa + r) − a_j`` for ``j ∈ K``
    and ``P_s(j)·(Σa + r − r / P_s(rest))`` otherwise.
    """
    rows = losses.topk_kl_from_log_probs(log_p_student, teacher, temperature)
    log_kept = torch.log1p(-teacher.log_rest.exp().clamp(max=1 - 1e-7))  # log(1 − r), as in the value
    p_top = (F.log_softmax(teacher.values / temperature, -1) + log_kept[:, None]).exp().to(log_p_student.dtype)
    p_rest = teacher.log_rest.exp().to(log_p_student.dtype)
    student_rest = log_p_student.scatter(-1, teacher.indices, float("-inf")).logsumexp(-1)
    total = p_top.sum(-1) + p_rest  # 1 up to the clamp above
    rest_weight = torch.where(p_rest > 0, p_rest * (-student_rest).exp(), 0.0)  # r / P_s(rest)
    p_student = log_p_student.exp()
    gradient = p_student * (total - rest_weight)[:, None]
    top = p_student.gather(-1, teacher.indices) * total[:, None] - p_top
    return rows, gradient.scatter_(-1, teacher.indices, top)


ANALYTIC_GRADIENTS: dict[Callable, DivergenceGradient] = {
    losses.kl_divergence: _kl_gradient,
    losses.reverse_kl: _reverse_kl_gradient,
    losses.generalized_jsd: _jsd_gradient,
    losses.skew_kl: _skew_kl_gradient,
    losses.skew_reverse_kl: _skew_reverse_kl_gradient,
    losses.total_variation: _tvd_gradient,
}
"""Registry functions whose gradient w.r.t. the student logits is written out above."""


class _Divergence(NamedTuple):
    """A resolved response loss: the registry function, and its analytic gradient if it has one."""

    function: Callable
    gradient: DivergenceGradient | None
    parameters: dict[str, Any]


def _resolve_divergence(divergence: str | Callable) -> _Divergence:
    function = losses.resolve(divergence, losses.RESPONSE_LOSSES, "response")
    base, parameters = function, {}
    if isinstance(function, functools.partial) and not function.args:  # e.g. partial(generalized_jsd, beta=0.9)
        base, parameters = function.func, dict(function.keywords)
    if base is losses.correlation_distance:
        raise ConfigError(
            "the dist response loss correlates each class across the whole batch, so it cannot be "
            "computed chunk by chunk; use kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd or dkd"
        )
    return _Divergence(function, ANALYTIC_GRADIENTS.get(base), parameters)


# -- the teacher, row by row -------------------------------------------------------------------


class _Teacher:
    """The teacher's outputs for any rows: stored logits, a top-k cache, hidden states + head (and an
    optional row-wise transform of their logits), or nothing (cross-entropy only)."""

    def __init__(self, teacher: Any, rows: int, vocabulary: int) -> None:
        self.logits: Tensor | None = None
        self.topk: losses.TopKLogits | None = None
        self.hidden: Tensor | None = None
        self.transform: Callable[[Tensor], Tensor] | None = None
        self.vocabulary = vocabulary
        self.absent = teacher is None
        if teacher is None:
            found = rows
        elif isinstance(teacher, losses.TopKLogits):
            self.topk = losses.TopKLogits(*(part.detach() for part in teacher))
            found = teacher.values.shape[0]
        elif isinstance(teacher, Tensor):
            self.logits = teacher.detach()
            found = teacher.shape[0]
            if teacher.dim() != 2 or teacher.shape[1] != vocabulary:
                raise ClassCountError(
                    f"teacher logits have shape {tuple(teacher.shape)} but the student head predicts "
                    f"{vocabulary} classes: they must be (N, {vocabulary})"
                )
        elif isinstance(teacher, tuple) and len(teacher) in (2, 3):
            self.weight, self.bias = (part.detach() if part is not None else None for part in _head_parts(teacher[1]))
            self.hidden = teacher[0].detach().to(self.weight.dtype)  # e.g. bf16 hidden states, a float32 head
            self.transform = teacher[2] if len(teacher) == 3 else None
            found = self.hidden.shape[0]
            # With a transform (e.g. a pruned student's coarsen) the head's width is the teacher's own
            # vocabulary; the transformed rows are checked against the student's in rows().
            columns_ok = self.transform is not None or self.weight.shape[0] == vocabulary
            if self.hidden.dim() != 2 or self.weight.dim() != 2 or self.weight.shape[1] != self.hidden.shape[1]:
                columns_ok = False
            if not columns_ok:
                raise ClassCountError(
                    f"teacher hidden states {tuple(self.hidden.shape)} and head weight {tuple(self.weight.shape)} "
                    f"do not give (N, {vocabulary}) logits like the student's head"
                )
        else:
            raise TypeError(
                "teacher must be logits (N, V), (teacher_hidden, teacher_head[, transform]), a TopKLogits or None"
            )
        if found != rows:
            raise ValueError(f"the teacher has {found} rows but the student {rows}")

    def rows(self, index: Tensor, buffer: Tensor | None) -> Tensor | losses.TopKLogits | None:
        """The teacher's logits ``(b, V)`` or top-k entries for the rows ``index`` ``(b,)`` (None: no teacher).

        Logits are written into ``buffer[:b]`` (``(≥ b, V)``, the dtype they are computed in) when
        the dtypes agree, so that slab after slab reuses the same memory (no fresh pages to fault in).
        """
        if self.absent:
            return None
        if self.topk is not None:
            return losses.TopKLogits(*(part.index_select(0, index) for part in self.topk))
        if self.transform is not None:  # (b, V_teacher) logits, transformed row by row to (b, V)
            with torch.no_grad():
                found = self.transform(F.linear(self.hidden.index_select(0, index), self.weight, self.bias))
            if found.shape != (index.numel(), self.vocabulary):
                raise ClassCountError(
                    f"the teacher's transformed logits have shape {tuple(found.shape)}, "
                    f"the student's head predicts {self.vocabulary} classes"
                )
            return found if buffer is None else found.to(buffer.dtype)
        source = self.logits if self.logits is not None else self.weight
        if buffer is None or source.dtype != buffer.dtype:
            with torch.no_grad():  # the teacher never needs gradients
                if self.logits is not None:
                    found = self.logits.index_select(0, index)
                else:
                    found = F.linear(self.hidden.index_select(0, index), self.weight, self.bias)
            return found if buffer is None else found.to(buffer.dtype)
        out = buffer[: index.numel()]
        if self.logits is not None:
            return torch.index_select(self.logits, 0, index, out=out)
        with torch.no_grad():
            torch.mm(self.hidden.index_select(0, index), self.weight.T, out=out)
            return out if self.bias is None else out.add_(self.bias)


def _slice_rows(
    teacher: Tensor | losses.TopKLogits | None, start: int, length: int
) -> Tensor | losses.TopKLogits | None:
    """Rows ``start : start + length`` of teacher logits or of top-k entries (views, no copy)."""
    if teacher is None:
        return None
    if isinstance(teacher, losses.TopKLogits):
        return losses.TopKLogits(*(part[start : start + length] for part in teacher))
    return teacher[start : start + length]


def _head_parts(head: Head) -> tuple[Tensor, Tensor | None]:
    """``(weight (V, H), bias (V,) or None)`` of an ``nn.Linear``, a weight, or a ``(weight, bias)`` pair."""
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if isinstance(head, Tensor):
        return head, None
    weight, bias = head
    return weight, bias


# -- one block of rows ---------------------------------------------------------------------------


class _Settings(NamedTuple):
    divergence: _Divergence
    temperature: float
    response_scale: float  # ∂ loss / ∂ (sum over counted rows of D): β·α·τ² / count (τ² if asked)
    ce_scale: float  # ∂ loss / ∂ (sum of CE rows): ce_weight / count, 0 without labels
    needs_gradient: bool
    response_offset: Tensor | None = None  # (V,) added to the student's logits in the response term only


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """``z / τ``, without a copy at ``τ = 1``."""
    return logits if temperature == 1 else logits / temperature


def _block(
    student_logits: Tensor, teacher: Tensor | losses.TopKLogits | None, labels: Tensor | None, settings: _Settings
) -> tuple[Tensor, Tensor]:
    """Sums of the divergence and CE over one block's rows, and the block's loss gradient, in place.

    Args:
        student_logits: ``(b, V)``, overwritten with ``∂ loss / ∂ z_s`` when gradients are needed.
        teacher: ``(b, V)`` logits, top-k rows, or None (no teacher: CE only); labels: ``(b,)`` or None.

    The response term reads ``z_s + settings.response_offset`` when there is an offset; a constant
    shift of the logits leaves the gradient's form as it is (``∂/∂z_s = ∂/∂(z_s + offset)``). CE reads ``z_s``.

    Returns:
        ``(Σ_rows D, Σ_rows CE)``, float64 scalars.
    """
    temperature, divergence, offset = settings.temperature, settings.divergence, settings.response_offset
    gradient = log_p_student = None
    # The response term's logits: a (b, V) copy only when there is an offset (a pruned student at τ ≠ 1).
    response_logits = student_logits if offset is None or teacher is None else student_logits + offset
    if teacher is None:  # cross-entropy only: no divergence, no response gradient
        rows = student_logits.new_zeros(1)
    elif isinstance(teacher, losses.TopKLogits):
        log_p_student = F.log_softmax(_scaled(response_logits, temperature), -1)
        rows, gradient = _topk_kl_gradient(log_p_student, teacher, temperature)
    elif divergence.gradient is not None:
        log_p_student = F.log_softmax(_scaled(response_logits, temperature), -1)
        log_p_teacher = F.log_softmax(_scaled(teacher, temperature), -1)
        rows, gradient = divergence.gradient(log_p_student, log_p_teacher, **divergence.parameters)
    else:  # any other row-wise loss: autograd on this block only, so its graph is (b, V) at most
        with torch.enable_grad():
            block = response_logits.detach().requires_grad_()
            keywords = {"labels": labels} if labels is not None and losses.accepts_labels(divergence.function) else {}
            total = divergence.function(block, teacher, temperature, **keywords) * block.shape[0]
            (gradient,) = torch.autograd.grad(total, block) if settings.needs_gradient else (None,)
        rows = total.detach().reshape(1)
        gradient = None if gradient is None else gradient * temperature  # below, all gradients are over τ
    response_sum = rows.sum(dtype=torch.float64)
    ce_sum = response_sum.new_zeros(())
    if labels is not None:
        # CE is at τ = 1 on the logits without offset: reuse the divergence's log-softmax when it is that.
        reusable = temperature == 1 and log_p_student is not None and response_logits is student_logits
        log_p_one = log_p_student if reusable else None
        log_p_one = F.log_softmax(student_logits, -1) if log_p_one is None else log_p_one
        ce_sum = -log_p_one.gather(-1, labels[:, None]).sum(dtype=torch.float64)
    if settings.needs_gradient:  # the logits are read for the last time: write the gradient over them
        if settings.response_scale and gradient is not None:
            torch.mul(gradient, settings.response_scale / temperature, out=student_logits)
        else:
            student_logits.zero_()
        if labels is not None and settings.ce_scale:  # ∂CE/∂z = softmax(z) − one_hot(label)
            student_logits.add_(log_p_one.exp(), alpha=settings.ce_scale)
            minus_scale = torch.full_like(student_logits[:, :1], -settings.ce_scale)
            student_logits.scatter_add_(-1, labels[:, None], minus_scale)
    return response_sum, ce_sum


def _slab(
    student_logits: Tensor, teacher: Tensor | losses.TopKLogits | None, labels: Tensor | None, settings: _Settings
) -> tuple[Tensor, Tensor]:
    """:func:`_block` over the rows of a slab ``(s, V)``, :data:`BLOCK_ROWS` at a time; the summed sums."""
    response_sum = ce_sum = 0.0
    for start in range(0, student_logits.shape[0], BLOCK_ROWS):
        block_labels = None if labels is None else labels[start : start + BLOCK_ROWS]
        block_teacher = _slice_rows(teacher, start, BLOCK_ROWS)
        response, ce = _block(student_logits[start : start + BLOCK_ROWS], block_teacher, block_labels, settings)
        response_sum, ce_sum = response_sum + response, ce_sum + ce
    return response_sum, ce_sum


# -- the autograd function ---------------------------------------------------------------------


class _ChunkedLoss(torch.autograd.Function):
    """Loss and gradients in one forward pass; backward only scales the saved gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student_hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        teacher: _Teacher,
        labels: Tensor | None,
        rows: Tensor,
        weights: tuple[float, float, float],
        settings: _Settings,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        dtype = torch.float64 if torch.float64 in (student_hidden.dtype, weight.dtype) else torch.float32
        hidden, head_weight = student_hidden.to(dtype), weight.to(dtype)
        if settings.response_offset is not None:  # in the logits' dtype: a float64 offset would promote them
            settings = settings._replace(response_offset=settings.response_offset.to(hidden))
        head_bias = None if bias is None else bias.to(dtype)
        wants = ctx.needs_input_grad[:3] if settings.needs_gradient else (False, False, False)
        grad_hidden = torch.zeros_like(hidden) if wants[0] else None
        grad_weight = torch.zeros_like(head_weight) if wants[1] else None
        grad_bias = torch.zeros_like(head_bias) if wants[2] else None
        response_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
        ce_sum = torch.zeros_like(response_sum)
        # The only (chunk, V) tensor, reused by every chunk (and the teacher's (slab, V) one): fresh
        # allocations of that size would be new pages for the kernel to fault in, chunk after chunk.
        vocabulary, largest_chunk = head_weight.shape[0], min(chunk_size, rows.numel())
        logits_buffer = hidden.new_empty(largest_chunk, vocabulary)
        dense = teacher.topk is None and not teacher.absent and teacher.transform is None
        slab_buffer = hidden.new_empty(min(TEACHER_ROWS, largest_chunk), vocabulary) if dense else None
        for start in range(0, rows.numel(), chunk_size):
            index = rows[start : start + chunk_size]
            chunk_hidden = hidden.index_select(0, index)
            # Each block of these logits turns into the loss's gradient w.r.t. them, in place.
            logits = torch.mm(chunk_hidden, head_weight.T, out=logits_buffer[: index.numel()])
            if head_bias is not None:
                logits += head_bias
            for slab in range(0, index.numel(), TEACHER_ROWS):
                slab_index = index[slab : slab + TEACHER_ROWS]
                slab_labels = None if labels is None else labels.index_select(0, slab_index)
                slab_teacher = teacher.rows(slab_index, slab_buffer)
                sums = _slab(logits[slab : slab + TEACHER_ROWS], slab_teacher, slab_labels, settings)
                response_sum += sums[0]
                ce_sum += sums[1]
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, index, logits @ head_weight)
            if grad_weight is not None:
                grad_weight.addmm_(logits.T, chunk_hidden)
            if grad_bias is not None:
                grad_bias += logits.sum(0)
        count = max(rows.numel(), 1)
        response_weight, squared, ce_weight = weights
        response = (response_sum / count * squared).to(dtype)
        ce = (ce_sum / count).to(dtype)
        # Zero-weight terms must not reach the loss (0 · NaN is NaN), as in the Distiller; weight 1 is
        # not multiplied at all, so that the default loss is what it always was, bit for bit.
        weighted_ce = torch.zeros_like(ce) if ce_weight == 0 else ce if ce_weight == 1 else ce_weight * ce
        loss = weighted_ce + response_weight * response if response_weight else weighted_ce.clone()
        ctx.gradients = (
            None if grad_hidden is None else grad_hidden.to(student_hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        ctx.mark_non_differentiable(ce, response)
        return loss, ce, response

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.gradients is None:
            raise RuntimeError(
                "chunked_distillation_loss computed its gradients in the forward pass and handed them "
                "to the first backward; run the loss again for a second backward"
            )
        gradients, ctx.gradients = ctx.gradients, None  # released: autograd can take them without a copy
        scaled = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in gradients)
        return (*scaled, None, None, None, None, None, None)


def check_ce_weight(ce_weight: float) -> None:
    """Refuse a CE weight that is not a finite number ≥ 0 (a bool included: ``True`` is no weight).

    Raises:
        ConfigError: naming ``ce_weight`` and the value.
    """
    number = isinstance(ce_weight, (int, float)) and not isinstance(ce_weight, bool)
    if not (number and math.isfinite(ce_weight) and ce_weight >= 0):
        raise ConfigError(f"ce_weight must be a finite number ≥ 0, got {ce_weight!r}")


def chunked_distillation_loss(
    student_hidden: Tensor,
    student_head: Head,
    teacher: Tensor | tuple[Tensor, Head] | tuple[Tensor, Head, Callable[[Tensor], Tensor]] | losses.TopKLogits | None,
    labels: Tensor | None = None,
    *,
    divergence: str | Callable = "kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    mask: Tensor | None = None,
    temperature_squared: bool = True,
    ce_weight: float = 1.0,
    response_offset: Tensor | None = None,
) -> dict[str, Tensor]:
    """The Distiller's ``loss``, ``ce`` and ``response`` from hidden states and heads, chunk by chunk.

    Equal (to rounding) to computing ``logits = student_head(student_hidden)`` and the teacher's
    logits in full, then ``response = τ² · mean_rows D(P_s, P_t)`` (:func:`kdistill.core.losses.response_loss`
    with the registry's ``divergence``), ``ce = mean_rows CE(logits, labels)`` and
    ``loss = β·α·response + w·ce`` with ``w = ce_weight`` (the Distiller's ``L_total`` without feature
    terms); but the extra
    memory is ``O(chunk_size × V)`` instead of several ``(N, V)`` tensors (see the module doc).

    Args:
        student_hidden: ``(N, H)`` the student's final hidden states at the positions to score
            (for a causal LM: already shifted, so that row ``i`` predicts ``labels[i]``).
        student_head: an ``nn.Linear`` ``H → V``, or its weight ``(V, H)`` (tied embeddings
            included), or ``(weight, bias or None)``.
        teacher: logits ``(N, V)``; or ``(teacher_hidden (N, H_t), teacher_head)`` so its logits
            are computed block by block and never held in full; or a
            :class:`kdistill.core.losses.TopKLogits` with ``(N, k)`` entries (the ``kl`` loss only);
            or ``(teacher_hidden, teacher_head, transform)``, ``transform`` mapping ``(b, V_t)``
            teacher logits row by row to ``(b, V)`` (e.g. a pruned student's ``coarsen``);
            or None: no teacher, ``response`` is 0 and the loss is ``ce`` alone.
        labels: ``(N,)`` class ids or None (then ``ce`` is 0).
        divergence: a name in :data:`kdistill.core.losses.RESPONSE_LOSSES`, or a row-wise response loss
            (e.g. ``functools.partial(generalized_jsd, beta=0.9)``); not ``dist``, which is not row-wise.
            Like every registry entry it must return the *mean* over its rows, without ``τ²``.
        temperature: ``τ > 0``; alpha, beta: the Distiller's weights.
        ignore_index: rows with this label count in no term.
        chunk_size: rows per chunk (the memory/speed trade-off).
        mask: ``(N,)``; rows where it is 0 count in no term.
        temperature_squared: multiply the response by ``τ²`` (on by default, as the Distiller).
        ce_weight: ``w ≥ 0``, the weight of CE in ``loss`` and in its gradient. 0 leaves CE out of the
            loss (e.g. on-policy batches: the student's likelihood of its own samples is no target)
            while the labels still select the scored rows and ``ce`` is still reported.
        response_offset: ``(V,)`` constants added to every row of the student's logits in the response
            term only (CE reads the logits as they are), e.g. a pruned student's
            :meth:`kdistill.core.vocabulary.PrunedVocabulary.tempered_offset`, which tempers its "other"
            column as its full-vocabulary logits are tempered. None: no offset. Every divergence path
            (analytic, top-k, autograd fallback) reads the shifted logits; the gradient w.r.t. the
            logits is the one w.r.t. the shifted logits, a constant offset having derivative 1.

    Half and bfloat16 inputs are computed in float32 (a float32 copy of the head, ``(V, H)``); the
    gradients come back in the inputs' dtypes.

    Returns:
        ``{"loss", "ce", "response"}``, scalars in float32 (float64 for float64 inputs). Only ``loss``
        carries gradients (to ``student_hidden`` and the head's weight and bias); ``ce`` and
        ``response`` are for logging. The gradients are computed in this call, so ``loss`` supports
        one backward. With no row counted every value and gradient is 0.
    """
    weight, bias = _head_parts(student_head)
    if student_hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != student_hidden.shape[1]:
        raise ValueError(
            f"student hidden states {tuple(student_hidden.shape)} and head weight {tuple(weight.shape)} "
            "must be (N, H) and (V, H)"
        )
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    check_ce_weight(ce_weight)
    resolved = _resolve_divergence(divergence)
    if teacher is None:  # no divergence: its weight must not scale a gradient that is not there
        alpha = 0.0
    if isinstance(teacher, losses.TopKLogits) and resolved.function is not losses.kl_divergence:
        raise ConfigError("a top-k teacher supports the kl response loss only")
    count_rows, vocabulary = student_hidden.shape[0], weight.shape[0]
    if response_offset is not None and tuple(response_offset.shape) != (vocabulary,):
        raise ValueError(
            f"response_offset has shape {tuple(response_offset.shape)}, the student head predicts "
            f"{vocabulary} classes: it must be ({vocabulary},)"
        )
    teacher_rows = _Teacher(teacher, count_rows, vocabulary)
    keep = losses._kept(labels, ignore_index, mask)
    if keep is not None and keep.numel() != count_rows:
        raise ValueError(f"{keep.numel()} labels/mask entries for {count_rows} hidden-state rows")
    rows = torch.arange(count_rows, device=student_hidden.device) if keep is None else keep.nonzero().squeeze(1)
    flat_labels = None if labels is None else labels.reshape(-1).long()
    if flat_labels is not None and rows.numel():
        kept_labels = flat_labels[rows]
        if bool((kept_labels < 0).any() or (kept_labels >= vocabulary).any()):
            raise ClassCountError(f"labels must be in [0, {vocabulary}) or {ignore_index}")
    count = max(rows.numel(), 1)
    squared = temperature**2 if temperature_squared else 1.0
    response_weight = beta * alpha
    settings = _Settings(
        divergence=resolved,
        temperature=temperature,
        response_scale=response_weight * squared / count,
        ce_scale=0.0 if labels is None else ce_weight / count,
        needs_gradient=torch.is_grad_enabled()
        and any(part is not None and part.requires_grad for part in (student_hidden, weight, bias)),
        response_offset=None if response_offset is None else response_offset.detach(),
    )
    # Under autocast the chunk's matmuls would come out in bf16/fp16 beside float32 gradients: the
    # loss keeps its own precision rule (half inputs computed in float32), whatever the caller's autocast.
    with torch.autocast(student_hidden.device.type, enabled=False):
        loss, ce, response = _ChunkedLoss.apply(
            student_hidden,
            weight,
            bias,
            teacher_rows,
            flat_labels,
            rows,
            (response_weight, squared, float(ce_weight)),
            settings,
            chunk_size,
        )
    return {"loss": loss, "ce": ce, "response": response}


__all__ = ["BLOCK_ROWS", "TEACHER_ROWS", "chunked_distillation_loss"]
