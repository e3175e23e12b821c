"""Pure loss functions and the registries that name them.

Student first, teacher second, always. Response losses take logits rows of
shape ``(R, C)`` (already flattened and masked by the caller) and return the
divergence at temperature ``τ`` *without* the ``τ²`` factor; the distiller
applies ``τ²`` in one place. Feature losses take two tensors of equal shape
``(N, ...)`` and an optional ``(N, T)`` mask of real tokens.

Adding a loss is adding an entry to :data:`RESPONSE_LOSSES` or
:data:`FEATURE_LOSSES` (or passing the function itself); the distiller never
changes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.core.errors import ConfigError, did_you_mean

ResponseLoss = Callable[..., Tensor]  # (student_rows, teacher_rows, temperature[, labels=rows]) -> scalar
FeatureLoss = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def kl_rows(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per-row ``KL(P_t ‖ P_s)`` with ``P = softmax(z / τ)``, in float32 (or float64) log space.

    Args:
        student_logits: ``(R, C)``.
        teacher_logits: ``(R, C)``; carries no gradient in practice.
        temperature: ``τ > 0``.

    Returns:
        ``(R,)`` divergences, each ``≥ 0``, float32 unless the logits are float64.
    """
    log_p_student = F.log_softmax(_at_least_float32(student_logits) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(_at_least_float32(teacher_logits) / temperature, dim=-1)
    return _kl_log_space(log_p_teacher, log_p_student)


def _kl_log_space(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(P ‖ Q) = Σ_c P (log P − log Q)`` over the last dimension, from log-probabilities."""
    p = log_p.exp()
    # Where P gives a class probability 0 (a -inf logit), its term is 0, not 0·∞.
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``mean_rows KL(P_t ‖ P_s)`` for ``(R, C)`` logits (no ``τ²``; see module doc)."""
    return kl_rows(student_logits, teacher_logits, temperature).mean()


# -- the language-model divergences of spec section 6 ------------------------------------------
# Each takes (R, C) student and teacher logits and τ, works in float32 (float64 stays) log space
# and returns the mean over rows without τ²; its extra parameter is a keyword, so
# ``functools.partial(generalized_jsd, beta=0.9)`` is a response loss too.


def _log_probabilities(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``(log P_s, log P_t)``, each ``(R, C)``, with ``P = softmax(z / τ)`` in at least float32."""
    log_p_student = F.log_softmax(_at_least_float32(student_logits) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(_at_least_float32(teacher_logits) / temperature, dim=-1)
    return log_p_student, log_p_teacher


def log_mixture(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """``log(w·P + (1 − w)·Q)`` from log-probabilities, exact at ``w = 0`` and ``w = 1``."""
    if weight == 0:
        return log_q
    if weight == 1:
        return log_p
    # logaddexp never forms w·P + (1 − w)·Q in linear space, so tiny probabilities keep their digits.
    return torch.logaddexp(log_p + math.log(weight), log_q + math.log1p(-weight))


def _check_weight(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value!r}")


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``mean_rows KL(P_s ‖ P_t)``: the mode-seeking direction (no ``τ²``)."""
    log_p_student, log_p_teacher = _log_probabilities(student_logits, teacher_logits, temperature)
    return _kl_log_space(log_p_student, log_p_teacher).mean()


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float = 0.5) -> Tensor:
    """GKD's generalized Jensen–Shannon divergence (Agarwal et al. 2024), mean over rows, no ``τ²``.

    ``JSD_β = β·KL(P_t ‖ M) + (1 − β)·KL(P_s ‖ M)`` with ``M = β·P_t + (1 − β)·P_s``; ``β = 0.5``
    is the symmetric JSD. Convention at the ends: the formula is identically 0 at ``β = 0`` and
    ``β = 1``, and ``JSD_β / β → KL(P_t ‖ P_s)`` as ``β → 0``, ``JSD_β / (1 − β) → KL(P_s ‖ P_t)``
    as ``β → 1``; so, like TRL's ``generalized_jsd_loss``, ``beta=0`` *is* the forward KL
    ``KL(P_t ‖ P_s)`` and ``beta=1`` the reverse KL ``KL(P_s ‖ P_t)`` (those limits without the
    vanishing scale), and ``0 < β < 1`` is the formula itself.
    """
    _check_weight("the jsd beta", beta)
    log_p_student, log_p_teacher = _log_probabilities(student_logits, teacher_logits, temperature)
    if beta == 0:
        return _kl_log_space(log_p_teacher, log_p_student).mean()
    if beta == 1:
        return _kl_log_space(log_p_student, log_p_teacher).mean()
    log_mix = log_mixture(log_p_teacher, log_p_student, beta)
    rows = beta * _kl_log_space(log_p_teacher, log_mix) + (1 - beta) * _kl_log_space(log_p_student, log_mix)
    return rows.mean()


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float, skew: float = 0.1) -> Tensor:
    """DistiLLM's skew KL (Ko et al. 2024): ``mean_rows KL(P_t ‖ λ·P_t + (1 − λ)·P_s)``, no ``τ²``.

    ``skew`` is λ (0.1 in the paper); ``λ = 0`` is the forward KL. Mixing in the teacher keeps
    the divergence finite, at most ``log(1/λ)``, when the student gives a class almost nothing.
    """
    _check_weight("the skew", skew)
    log_p_student, log_p_teacher = _log_probabilities(student_logits, teacher_logits, temperature)
    return _kl_log_space(log_p_teacher, log_mixture(log_p_teacher, log_p_student, skew)).mean()


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float, skew: float = 0.1) -> Tensor:
    """DistiLLM's skew reverse KL: ``mean_rows KL(P_s ‖ λ·P_s + (1 − λ)·P_t)``, no ``τ²``.

    ``skew`` is λ (0.1 in the paper); ``λ = 0`` is the reverse KL.
    """
    _check_weight("the skew", skew)
    log_p_student, log_p_teacher = _log_probabilities(student_logits, teacher_logits, temperature)
    return _kl_log_space(log_p_student, log_mixture(log_p_student, log_p_teacher, skew)).mean()


def total_variation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``mean_rows ½ Σ_c |P_t − P_s|``, in ``[0, 1]`` (no ``τ²``)."""
    p_student = F.softmax(_at_least_float32(student_logits) / temperature, dim=-1)
    p_teacher = F.softmax(_at_least_float32(teacher_logits) / temperature, dim=-1)
    return 0.5 * (p_teacher - p_student).abs().sum(dim=-1).mean()


def decoupled_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    labels: Tensor | None = None,
    target_weight: float = 1.0,
    non_target_weight: float = 8.0,
) -> Tensor:
    """Decoupled KD (Zhao et al. 2022, "Decoupled Knowledge Distillation"), without ``τ²``.

    ``DKD = target_weight · KL(b_t ‖ b_s) + non_target_weight · KL(p̂_t ‖ p̂_s)`` where
    ``b = [p_gt, 1 − p_gt]`` is the binary target/non-target split of ``softmax(z/τ)`` and
    ``p̂`` is the softmax over the non-target classes only. The paper's CIFAR-100 setting is
    ``(1, 8)``. Without labels, the teacher's top class stands in for the ground truth.

    Args:
        student_logits: ``(R, C)``; teacher_logits: ``(R, C)``; labels: ``(R,)`` or None.
    """
    student = _at_least_float32(student_logits) / temperature
    teacher = _at_least_float32(teacher_logits) / temperature
    target = teacher.argmax(-1) if labels is None else labels.long()
    is_target = F.one_hot(target, student.shape[-1]).bool()
    log_p_student, log_p_teacher = F.log_softmax(student, -1), F.log_softmax(teacher, -1)

    def binary(log_p: Tensor) -> Tensor:  # log [p_gt, 1 − p_gt], stable via logsumexp over each group
        log_target = log_p.masked_fill(~is_target, float("-inf")).logsumexp(-1)
        log_rest = log_p.masked_fill(is_target, float("-inf")).logsumexp(-1)
        return torch.stack([log_target, log_rest], -1)

    target_part = _kl_log_space(binary(log_p_teacher), binary(log_p_student))
    # Softmax over the non-target classes: the target's logit is removed (−∞), not just down-weighted.
    non_target_teacher = F.log_softmax(teacher.masked_fill(is_target, float("-inf")), -1)
    non_target_student = F.log_softmax(student.masked_fill(is_target, float("-inf")), -1)
    non_target_part = _kl_log_space(non_target_teacher, non_target_student)
    return (target_weight * target_part + non_target_weight * non_target_part).mean()


class TopKLogits(NamedTuple):
    """A teacher's logits kept as its top ``k`` classes plus the probability mass of the rest.

    ``values``/``indices``: ``(..., k)`` raw logits and class ids; ``log_rest``: ``(...)`` the log of
    ``r = Σ_{j ∉ top-k} softmax(z/τ)_j`` at the cache's temperature ``τ``.
    """

    values: Tensor
    indices: Tensor
    log_rest: Tensor

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float) -> TopKLogits:
        values, indices = logits.float().topk(k, dim=-1)
        log_p = F.log_softmax(logits.float() / temperature, -1)
        log_rest = log_p.scatter(-1, indices, float("-inf")).logsumexp(-1)
        return cls(values, indices, log_rest)

    def rows(self, keep: Tensor | None) -> TopKLogits:
        """Flattened to ``(R, k)`` rows, keeping those where ``keep`` is true."""
        k = self.values.shape[-1]
        flat = TopKLogits(self.values.reshape(-1, k), self.indices.reshape(-1, k), self.log_rest.reshape(-1))
        return flat if keep is None else TopKLogits(*(part[keep] for part in flat))


def topk_kl_rows(student_logits: Tensor, teacher: TopKLogits, temperature: float) -> Tensor:
    """Per-row KL between the teacher and student distributions coarsened to k + 1 outcomes:
    the teacher's top-k classes, and "any other class" (carrying the teacher's mass ``r``).

    By the chain rule ``KL(P_t ‖ P_s) = KL_coarse + r · KL(Q_t ‖ Q_s)``, where ``Q`` are the
    distributions renormalised over the other classes, so this is a lower bound of the full
    KL with error ``0 ≤ KL − KL_coarse ≤ r · max_j log(Q_t(j) / Q_s(j))``: small when ``r`` is.
    """
    log_p_student = F.log_softmax(_at_least_float32(student_logits) / temperature, -1)
    return topk_kl_from_log_probs(log_p_student, teacher, temperature)


def topk_kl_from_log_probs(log_p_student: Tensor, teacher: TopKLogits, temperature: float) -> Tensor:
    """:func:`topk_kl_rows` from the student's ``(R, C)`` log-probabilities at ``τ`` (``(R,)`` out)."""
    student_top = log_p_student.gather(-1, teacher.indices)
    student_rest = log_p_student.scatter(-1, teacher.indices, float("-inf")).logsumexp(-1)
    log_kept = torch.log1p(-teacher.log_rest.exp().clamp(max=1 - 1e-7))  # log(1 − r)
    teacher_top = F.log_softmax(teacher.values / temperature, -1) + log_kept[:, None]
    p_top, p_rest = teacher_top.exp(), teacher.log_rest.exp()
    top_terms = (p_top * (teacher_top - student_top)).sum(-1)
    rest_terms = torch.where(p_rest > 0, p_rest * (teacher.log_rest - student_rest), 0.0)
    return top_terms + rest_terms


def _pearson_distance(a: Tensor, b: Tensor, dim: int) -> Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    correlation = (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim)).clamp_min(1e-8)
    return (1 - correlation).mean()


def correlation_distance(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    inter_weight: float = 1.0,
    intra_weight: float = 1.0,
) -> Tensor:
    """DIST (Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher"), without ``τ²``.

    ``inter_weight · (1 − mean_rows ρ(P_s[i, :], P_t[i, :])) + intra_weight · (1 − mean_classes
    ρ(P_s[:, c], P_t[:, c]))`` with ``ρ`` the Pearson correlation and ``P = softmax(z/τ)``: the
    student matches the teacher's ranking within a sample and across the batch, not its exact
    probabilities.
    """
    p_student = F.softmax(_at_least_float32(student_logits) / temperature, -1)
    p_teacher = F.softmax(_at_least_float32(teacher_logits) / temperature, -1)
    inter = _pearson_distance(p_student, p_teacher, dim=1)
    intra = _pearson_distance(p_student, p_teacher, dim=0) if p_student.shape[0] > 1 else inter * 0
    return inter_weight * inter + intra_weight * intra


def feature_mse(student_feature: Tensor, teacher_feature: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over all elements, in float32 (float64 stays float64).

    Args:
        student_feature: ``(N, ...)``, already adapted to the teacher's shape.
        teacher_feature: ``(N, ...)``.
        mask: optional ``(N, T)`` weights of real tokens for ``(N, T, D)`` features;
            masked positions (padding) do not count at all.
    """
    student_feature, teacher_feature = _at_least_float32(student_feature), _at_least_float32(teacher_feature)
    if mask is None:
        # The fused kernel: one pass, no (a − b)² temporary to write and read back on large maps.
        dtype = torch.promote_types(student_feature.dtype, teacher_feature.dtype)
        return F.mse_loss(student_feature.to(dtype), teacher_feature.to(dtype))
    diff = (student_feature - teacher_feature).square()
    weights = _expand_mask(mask, diff)
    per_position = diff[0, 0].numel() if diff.dim() > 2 else 1
    return (diff * weights).sum() / (weights.sum() * per_position).clamp_min(1)


def feature_cosine(student_feature: Tensor, teacher_feature: Tensor, mask: Tensor | None = None) -> Tensor:
    """``1 − cos`` between student and teacher features, averaged.

    Without a mask each sample's feature is flattened to one vector (so ``(N, C, H, W)``
    maps compare whole maps). With an ``(N, T)`` token mask, ``(N, T, D)`` features
    compare token by token over ``D`` and padding tokens do not count.
    """
    student_feature, teacher_feature = student_feature.float(), teacher_feature.float()
    if mask is None:
        cosine = F.cosine_similarity(student_feature.flatten(1), teacher_feature.flatten(1), dim=1)
        return (1 - cosine).mean()
    cosine = F.cosine_similarity(student_feature.flatten(2), teacher_feature.flatten(2), dim=2)
    weights = mask.to(cosine.dtype)
    return ((1 - cosine) * weights).sum() / weights.sum().clamp_min(1)


def _at_least_float32(tensor: Tensor) -> Tensor:
    """Half and bfloat16 are promoted to float32 (whatever autocast gave); float64 stays."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _expand_mask(mask: Tensor, like: Tensor) -> Tensor:
    if like.dim() < 2 or tuple(mask.shape) != tuple(like.shape[:2]):
        raise ValueError(
            f"a token mask of shape {tuple(mask.shape)} does not fit a feature of shape {tuple(like.shape)}"
        )
    return mask.to(like.dtype).reshape(*mask.shape, *([1] * (like.dim() - 2)))


def select_rows(logits: Tensor, labels: Tensor | None, ignore_index: int, mask: Tensor | None = None) -> Tensor:
    """Flatten ``(N, C)`` or ``(N, T, C)`` logits to ``(R, C)`` rows that count.

    A row counts unless its label equals ``ignore_index`` or its ``mask`` entry
    (same shape as the labels, e.g. an attention mask) is 0.
    """
    rows = logits.reshape(-1, logits.shape[-1])
    keep = _kept(labels, ignore_index, mask)
    if keep is None:
        return rows
    if keep.numel() != rows.shape[0]:
        raise ValueError(
            f"{keep.numel()} labels/mask entries for {rows.shape[0]} logit rows of shape {tuple(logits.shape)}"
        )
    return rows if bool(keep.all()) else rows[keep]  # the common case copies nothing


def _kept(labels: Tensor | None, ignore_index: int, mask: Tensor | None) -> Tensor | None:
    keep = None
    if labels is not None:
        keep = labels.reshape(-1) != ignore_index
    if mask is not None:
        real = mask.reshape(-1).bool()
        keep = real if keep is None else keep & real
    return keep


def accepts_labels(loss: Callable) -> bool:
    """Does a response loss take the kept rows' ``labels=`` (as DKD does)?"""
    try:
        return "labels" in inspect.signature(loss).parameters
    except (TypeError, ValueError):
        return False


def response_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    labels: Tensor | None = None,
    *,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    temperature_squared: bool = True,
    loss: ResponseLoss = kl_divergence,
) -> Tensor:
    """``L_resp = τ² · mean_rows KL(P_t ‖ P_s)`` as in the spec, for class or token logits.

    Args:
        student_logits: ``(N, C)`` or ``(N, T, C)``.
        teacher_logits: same shape as ``student_logits``.
        temperature: ``τ > 0``.
        labels: optional ``(N,)`` or ``(N, T)``; rows labelled ``ignore_index`` are left out.
        mask: optional, shaped like the labels; rows where it is 0 are left out.
        temperature_squared: multiply by ``τ²`` (Hinton et al. 2015), on by default.
        loss: the divergence on ``(R, C)`` rows, ``kl_divergence`` by default.

    Returns:
        A float32 scalar; 0 (still attached to the graph) when no row counts.
    """
    student_rows = select_rows(student_logits, labels, ignore_index, mask)
    if isinstance(teacher_logits, TopKLogits):  # a top-k cache: the coarse KL (see topk_kl_rows)
        if loss is not kl_divergence:
            raise ValueError("a top-k teacher cache supports the kl response loss only; use float16 storage")
        teacher_rows = teacher_logits.rows(_kept(labels, ignore_index, mask))
        if student_rows.shape[0] == 0:
            return student_logits.float().sum() * 0.0
        value = topk_kl_rows(student_rows, teacher_rows, temperature).mean()
        return value * temperature**2 if temperature_squared else value
    teacher_rows = select_rows(teacher_logits, labels, ignore_index, mask)
    if student_rows.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    if accepts_labels(loss):
        label_rows = labels.reshape(-1)[_kept(labels, ignore_index, mask)] if labels is not None else None
        value = loss(student_rows, teacher_rows, temperature, labels=label_rows)
    else:
        value = loss(student_rows, teacher_rows, temperature)
    # τ² keeps the soft-target gradients, which scale as 1/τ², comparable across
    # temperatures (Hinton et al. 2015); it applies whatever α is.
    return value * temperature**2 if temperature_squared else value


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy over the rows whose label is not ``ignore_index``, in float32.

    ``logits`` is ``(N, C)`` or ``(N, T, C)``, ``labels`` ``(N,)`` or ``(N, T)``.
    Returns 0 (attached to the graph) when every row is ignored, never NaN.
    """
    rows = _at_least_float32(logits.reshape(-1, logits.shape[-1]))
    targets = labels.reshape(-1).long()
    total = F.cross_entropy(rows, targets, ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum()
    return total / count.clamp_min(1)


RESPONSE_LOSSES: dict[str, ResponseLoss] = {
    "kl": kl_divergence,
    "dkd": decoupled_kl,
    "dist": correlation_distance,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": total_variation,
}
FEATURE_LOSSES: dict[str, FeatureLoss] = {"mse": feature_mse, "cosine": feature_cosine}


def register_response_loss(name: str, loss: ResponseLoss) -> None:
    """Add ``loss`` to :data:`RESPONSE_LOSSES` as ``name`` (then ``distill.response_loss: name``).

    ``loss(student_rows, teacher_rows, temperature)`` takes ``(R, C)`` logits rows and returns the
    mean over rows of the divergence, without ``τ²`` (applied by :func:`response_loss`); it may also
    take ``labels=`` (the kept rows' labels, as DKD does). A taken name or another signature is refused."""
    _register(RESPONSE_LOSSES, "response", name, loss, ("student_rows", "teacher_rows", "temperature"))


def register_feature_loss(name: str, loss: FeatureLoss) -> None:
    """Add ``loss`` to :data:`FEATURE_LOSSES` as ``name`` (then a feature pair's ``loss: name``).

    ``loss(student_feature, teacher_feature, mask)`` takes the adapted student feature, the teacher
    feature (same shape) and a ``(N, T)`` token mask or None, and returns a scalar. A taken name or
    another signature is refused."""
    _register(FEATURE_LOSSES, "feature", name, loss, ("student_feature", "teacher_feature", "mask"))


def _register(registry: dict[str, Callable], kind: str, name: str, loss: Callable, arguments: tuple[str, ...]) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"a {kind} loss name must be a word like 'my_kl', got {name!r}")
    if name in registry:
        raise ConfigError(f"{kind} loss {name!r} is taken (by {getattr(registry[name], '__name__', registry[name])})")
    if not callable(loss):
        raise ConfigError(f"{kind} loss {name!r} must be a function, got {type(loss).__name__}")
    try:
        signature = inspect.signature(loss)
        signature.bind(*arguments)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{kind} loss {name!r} must take ({', '.join(arguments)}), its signature is {_signature_text(loss)}"
        ) from None
    registry[name] = loss


def _signature_text(loss: Callable) -> str:
    try:
        return str(inspect.signature(loss))
    except (TypeError, ValueError):
        return "unknown"


def resolve(loss: str | Callable, registry: dict[str, Callable], kind: str) -> Callable:
    """A loss function from a registry name or the function itself."""
    if callable(loss):
        return loss
    if loss not in registry:
        raise ConfigError(f"unknown {kind} loss {loss!r}{did_you_mean(loss, registry)} (known: {', '.join(registry)})")
    return registry[loss]


def __getattr__(name: str) -> Any:
    """``losses.chunked_distillation_loss`` lives in :mod:`kdistill.core.chunked` (which imports this module)."""
    if name == "chunked_distillation_loss":
        from kdistill.core.chunked import chunked_distillation_loss

        return chunked_distillation_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
