"""The :class:`Distiller`: teacher + student + adapters → the spec's loss dict."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.core import chunked, losses
from kdistill.core.adapters import LAYOUTS, Layout, build_adapter, infer_layout

# The model-calling helpers lived here and stay importable from this module (callers outside the
# core should import them from kdistill.core.calls).
from kdistill.core.calls import (
    call_model,
    check_vocabularies,
    default_logits,
    first_tensor,
    is_causal_lm,
    split_labels,
    token_mask,
)
from kdistill.core.errors import ClassCountError, ConfigError, FeatureShapeError, NonFiniteLossError
from kdistill.core.hooks import FeatureRecorder, StopForward, find_module
from kdistill.core.losses import TopKLogits
from kdistill.core.vocabulary import PrunedVocabulary

TeacherLogits = Tensor | TopKLogits  # dense (..., C) logits, or a top-k cache's


class TeacherHidden(NamedTuple):
    """A live teacher under ``chunk_tokens``, in place of its logits."""

    hidden: Tensor
    """``(N, T, H_t)`` final hidden states, the input of its head."""
    head: nn.Linear
    """Its output head ``H_t → V``."""
    coarsen: Callable[[Tensor], Tensor] | None
    """For a pruned-vocabulary student: ``(b, V)`` logits rows → ``(b, |K| + 1)``; else None."""


AUTO_CHUNK_VOCABULARY = 32_768
"""``chunk_tokens="auto"`` chunks when the vocabulary (teacher's or student's full one) is at least this."""
DEFAULT_CHUNK_TOKENS = 1024
"""Rows per chunk for ``chunk_tokens="auto"``: ``(1024, V)`` is 201 MB in float32 at V = 49,152."""


@dataclass(frozen=True)
class FeaturePair:
    """One feature-distillation term: ``weight · loss(adapter(h_student), h_teacher)``.

    Args:
        student: dotted path of the student layer (as in ``named_modules()``).
        teacher: dotted path of the teacher layer.
        weight: ``w_i`` in the spec's ``L_feat = Σ w_i · MSE``.
        loss: a name in :data:`kdistill.core.losses.FEATURE_LOSSES` or a function.
        adapter: a module to use instead of the one built from the shapes.
        layout: how to read 3-D features: ``"tokens"`` ``(N, T, D)`` or ``"channels"``
            ``(N, C, L)``; None infers it (see :mod:`kdistill.core.adapters`).
    """

    student: str
    teacher: str
    weight: float = 1.0
    loss: str | Callable = "mse"
    adapter: nn.Module | None = field(default=None, compare=False, repr=False)
    layout: Layout | None = None

    @property
    def name(self) -> str:
        """``"<student>-><teacher>"``, the suffix of the pair's ``feature/...`` entry."""
        return f"{self.student}->{self.teacher}"


class Distiller(nn.Module):
    """Trains ``student`` to reproduce ``teacher`` (spec sections 1 and 2).

    ``L_total = β · (α · L_resp + L_feat) + L_CE`` with
    ``L_resp = τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ))`` and
    ``L_feat = Σ_i w_i · MSE(a_i(h_s^i), h_t^i)``.

    Args:
        teacher: the trained model; frozen, kept in eval mode, run without autograd,
            and deliberately *not* a submodule (never in ``state_dict()``, an optimizer or DDP).
        student: the model to train; registered as ``self.student``, unchanged.
        feature_pairs: the layers to match; ``[]`` for response distillation only.
        alpha: ``α``, weight of the response term inside ``L_distill``.
        beta: ``β``, weight of ``L_distill`` against the cross-entropy.
        temperature: ``τ``.
        temperature_squared: multiply the response term by ``τ²`` (default on).
        response_loss: a name in :data:`kdistill.core.losses.RESPONSE_LOSSES` or a function
            ``(student_rows, teacher_rows, τ) -> scalar``.
        ignore_index: label value of rows left out of the response and CE terms.
        logits_fn: extracts the logits from a model output (default :func:`default_logits`).
        feature_fn: extracts a tensor from a hooked layer's output (default
            :func:`kdistill.core.calls.first_tensor`).
        sample_input: if given, adapters are built now from the shapes it produces;
            otherwise at the first forward (call :meth:`build` before creating an optimizer).
        check_finite: raise :class:`NonFiniteLossError` naming the term when the loss
            is NaN or infinite.
        teacher_dtype: run the teacher under autocast to this dtype (``torch.bfloat16`` or
            ``torch.float16`` on CUDA) to halve its cost; the losses stay float32.
        causal_lm: the models are causal language models (spec section 6): the logits at ``t``
            predict the token at ``t + 1``. None decides by :func:`kdistill.core.calls.is_causal_lm`
            of the student.
        chunk_tokens: for a causal LM, compute the head, the response term and CE ``chunk_tokens``
            positions at a time with :func:`kdistill.core.chunked.chunked_distillation_loss`, so that no
            ``(N, T, V)`` logits tensor exists (see "Chunked loss" below). None (the default): off,
            the logits are computed in full. ``"auto"``: on, with :data:`DEFAULT_CHUNK_TOKENS`, for a
            causal LM whose vocabulary is at least :data:`AUTO_CHUNK_VOCABULARY` and whose models
            have ``nn.Linear`` output heads and a response loss that can be chunked (not ``dist``);
            off otherwise. The library default is off because the chunked output has no ``logits``
            entry; the config's ``distill.chunk_tokens`` defaults to ``"auto"``.

    ``forward(inputs, labels=None, *, teacher_outputs=None, ce_weight=1.0)`` returns a dict with
    ``loss``, ``ce``, ``response``, ``feature``, one ``feature/<student>-><teacher>`` per pair and
    ``logits``. Inputs
    that are a mapping are passed as keyword arguments (``model(**inputs)``), a tuple
    as positional ones; a mapping's ``attention_mask`` masks padding out of token-level
    terms.

    Labels inside the inputs: a mapping's ``labels`` entry (as Hugging Face batches carry)
    is taken out and used as the labels; neither model ever receives it, so a Hugging Face
    model computes no loss of its own and ``ignore_index`` applies. Given both ways, the
    ``labels`` argument and the entry must be equal (or the same tensor); different values
    raise :class:`~kdistill.core.errors.ConfigError` rather than silently pick one.

    With ``alpha = 0`` the response term carries no weight but is still reported, computed
    without gradient, whenever teacher logits exist (a live teacher, or a cache). When there
    are feature pairs, ``alpha = 0`` also stops the teacher right after its deepest paired
    layer (it saves the rest of the teacher's forward pass); there are then no teacher logits
    and the ``response`` key is left out of the output rather than reported as a made-up 0.

    Causal language models (``causal_lm``) follow Hugging Face: the labels are the input ids,
    unshifted, and the Distiller compares ``logits[:, :-1]`` with ``labels[:, 1:]`` (attention mask
    ``[:, 1:]``), see :func:`next_token_positions`. Positions labelled ``ignore_index`` and padding
    count in neither CE nor the response term, which uses exactly the positions CE scores (all
    but the last when there are no labels). The ``logits`` entry stays unshifted ``(N, T, C)``.

    A :class:`~kdistill.core.vocabulary.PrunedVocabulary` student predicts ``|K| + 1`` compact ids. CE is
    taken on ``student.compact(labels)``: for a label outside K it is ``−log p_s(other)``, which is
    the full-vocabulary NLL ``−log p_s(v) = −log p_s(other) + log(rest)`` minus the constant
    ``log(rest)``, so the gradient is the full-vocabulary one. A live teacher's logits (and cached
    dense ones with ``V`` columns) are coarsened with ``student.coarsen(·, τ)``; a cached
    :class:`~kdistill.core.losses.TopKLogits` is taken as already coarsened (its indices compact ids).
    The response term tempers the student as its full-vocabulary logits are, ``softmax(z_full / τ)``
    coarsened to ``K ∪ {other}``: its compact logits plus ``(τ − 1)·log(rest)`` on "other"
    (:meth:`~kdistill.core.vocabulary.PrunedVocabulary.tempered`), so a teacher whose full distribution is
    the student's scores 0 at any τ. CE, at ``τ = 1``, reads the compact logits as they are.

    Chunked loss (``chunk_tokens``): the student and a live teacher run with their output heads
    (``get_output_embeddings()``, an ``nn.Linear``) bypassed: each head's input, the final hidden
    states ``(N, T, H)``, is captured and the head returns an empty ``(N, T, 0)`` stand-in, so no
    full logits are computed. The hidden states are shifted like logits (``[:, :-1]`` against
    ``labels[:, 1:]``), and ``chunked_distillation_loss`` gets the student's head (for a
    :class:`~kdistill.core.vocabulary.PrunedVocabulary` student: its cut head and the bias
    ``(0, …, 0, other_bias)``, so ``other_bias`` gets its gradient; the inner model is called on the
    compact ids), and the teacher's hidden states and head (coarsened chunk by chunk for a pruned
    student) or the cached logits / :class:`TopKLogits`. Loss, ``ce``, ``response`` and every
    gradient equal the unchunked ones up to rounding. The output has no ``logits`` entry: there are
    none (callers use ``out.get("logits")``; the trainer's running accuracy only reads 2-D logits).
    A forward hook on a head module sees the ``(N, T, 0)`` stand-in. The loss's gradients are
    computed in the forward pass: one backward per forward.

    CE weight (``ce_weight`` of :meth:`forward`, ``w ≥ 0``, default 1): the loss is
    ``β · (α · L_resp + L_feat) + w · L_CE``, the labels still choosing the scored positions of every
    term. With ``w = 0`` (on-policy batches, :class:`kdistill.onpolicy.OnPolicyDistillation`: CE on the
    student's own samples is no target) CE is left out of the loss, not multiplied by 0, and still
    reported, without gradient; with ``w = 1`` the loss is the plain ``L_total``, bit for bit.

    Under ``DistributedDataParallel``: when the student's logits enter no weighted term
    (``alpha = 0`` and no labels or ``ce_weight = 0``: feature-only distillation), the loss includes them with
    weight 0, so every student parameter gets a (zero) gradient and DDP needs no
    ``find_unused_parameters=True``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        feature_pairs: Sequence[FeaturePair] = (),
        *,
        alpha: float = 1.0,
        beta: float = 1.0,
        temperature: float = 4.0,
        temperature_squared: bool = True,
        response_loss: str | Callable = "kl",
        ignore_index: int = -100,
        logits_fn: Callable[[Any], Tensor] = default_logits,
        feature_fn: Callable[[Any], Tensor] = first_tensor,
        sample_input: Any = None,
        check_finite: bool = True,
        teacher_dtype: torch.dtype | None = None,
        causal_lm: bool | None = None,
        chunk_tokens: int | Literal["auto"] | None = None,
    ) -> None:
        super().__init__()
        _check_range("temperature", temperature, minimum=0.0, inclusive=False)
        _check_range("alpha", alpha, minimum=0.0)
        _check_range("beta", beta, minimum=0.0)
        self.pairs = list(feature_pairs)
        for pair in self.pairs:
            _check_range(f"weight of feature pair {pair.name}", pair.weight, minimum=0.0)
            if pair.layout is not None and pair.layout not in LAYOUTS:
                raise ConfigError(
                    f"layout of feature pair {pair.name} must be one of {', '.join(LAYOUTS)}, got {pair.layout!r}"
                )
        names = [pair.name for pair in self.pairs]
        if len(set(names)) != len(names):
            raise ConfigError(f"feature pairs repeat: {names}")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.stops_teacher_early = self.alpha == 0 and bool(self.pairs)
        self.temperature_squared = temperature_squared
        self.ignore_index = ignore_index
        self.check_finite = check_finite
        self.teacher_dtype = teacher_dtype
        self.logits_fn = logits_fn
        self.causal_lm = is_causal_lm(student) if causal_lm is None else bool(causal_lm)
        self._response_loss = losses.resolve(response_loss, losses.RESPONSE_LOSSES, "response")
        self._feature_losses = [losses.resolve(p.loss, losses.FEATURE_LOSSES, "feature") for p in self.pairs]

        check_vocabularies(teacher, student)
        self.chunk_tokens = chunk_tokens
        self.chunk_size = _chunk_size(chunk_tokens, teacher, student, self.causal_lm, response_loss)
        self.student = student
        teacher.requires_grad_(False)
        teacher.eval()
        object.__setattr__(self, "teacher", teacher)  # see the class docstring: not a submodule

        # On demand: the hooks record only inside a step, never during other forwards of the same
        # models (a teacher-cache build, an evaluation), which would keep a batch's features alive.
        student_layers, teacher_layers = [p.student for p in self.pairs], [p.teacher for p in self.pairs]
        self._student_recorder = FeatureRecorder(student, student_layers, feature_fn, "student", on_demand=True)
        self._teacher_recorder = FeatureRecorder(teacher, teacher_layers, feature_fn, "teacher", on_demand=True)
        # Keyed by pair position: ModuleDict keys cannot hold the dots of layer paths.
        self.adapters = nn.ModuleDict()
        self._built = not self.pairs
        if sample_input is not None:
            self.build(sample_input)

    # -- construction -------------------------------------------------------------

    @torch.no_grad()
    def build(self, sample_input: Any) -> None:
        """Build the adapters from the feature shapes that ``sample_input`` produces.

        Runs teacher and student once without gradients (the student in eval mode,
        so batch-norm statistics are untouched). Does nothing if already built.
        """
        if self._built:
            return
        sample_input, _ = split_labels(sample_input)
        was_training = self.student.training
        self.student.eval()
        try:
            if self.chunk_size is not None:  # the hidden states only: no full logits, even once
                _, teacher_features = self.run_teacher_hidden(sample_input)
                _, student_features = self._run_student_hidden(sample_input)
                self._build_adapters(student_features, teacher_features)
                return
            teacher_logits, teacher_features = self.run_teacher(sample_input)
            student_logits, student_features = self._run_student(sample_input)
            if teacher_logits is not None:
                self._check_logits(student_logits, self.teacher_logits_for_student(teacher_logits, live=True))
            self._build_adapters(student_features, teacher_features)
        finally:
            self.student.train(was_training)

    def _build_adapters(self, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        reference = next(iter(student_features.values()))
        # Adapters train with the student: its parameters' dtype (float64 students get float64
        # adapters), not the feature's, which autocast may have lowered.
        dtype = next((p.dtype for p in self.student.parameters() if p.is_floating_point()), None)
        for index, pair in enumerate(self.pairs):
            student_feature = student_features[pair.student]
            teacher_feature = teacher_features[pair.teacher]
            adapter = pair.adapter
            if adapter is None:
                layout = pair.layout or infer_layout(
                    find_module(self.student, pair.student), find_module(self.teacher, pair.teacher)
                )
                adapter = build_adapter(student_feature.shape, teacher_feature.shape, pair.name, layout)
                adapter = adapter.to(dtype=dtype) if dtype is not None else adapter
            self.adapters[str(index)] = adapter.to(device=reference.device)
        self._built = True

    # -- the contract ---------------------------------------------------------------

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The student's parameters, then the adapters' (in pair order): what to optimise."""
        if not self._built:
            raise RuntimeError(
                "the adapters are built from the feature shapes: pass sample_input= to Distiller "
                "or call distiller.build(inputs) before creating the optimizer"
            )
        for parameter in list(self.student.parameters()) + list(self.adapters.parameters()):
            if parameter.requires_grad:
                yield parameter

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()  # the teacher is a fixed function: dropout off, batch-norm statistics frozen
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> Distiller:
        # .to(), .cuda(), .half() move the teacher too, although it is not a submodule.
        self.teacher._apply(fn)
        return super()._apply(fn, recurse)

    def forward(
        self,
        inputs: Any,
        labels: Tensor | None = None,
        *,
        teacher_outputs: tuple[Tensor, Mapping[str, Tensor]] | None = None,
        ce_weight: float = 1.0,
    ) -> dict[str, Tensor]:
        """One distillation step's losses; see the class docstring for the keys.

        ``teacher_outputs``, when given, is the teacher's ``(logits, {layer: feature})`` for these
        inputs (e.g. from a :class:`kdistill.cache.TeacherCache`); the teacher is then not run.
        A ``labels`` entry of a mapping ``inputs`` is the labels (see the class docstring).
        ``ce_weight``: the weight ``w ≥ 0`` of CE in the loss (see the class docstring, "CE weight").

        Raises:
            ConfigError: ``ce_weight`` is not a finite number ≥ 0.
        """
        chunked.check_ce_weight(ce_weight)
        inputs, labels = split_labels(inputs, labels)
        mask = token_mask(inputs)
        if self.chunk_size is not None:
            return self._forward_chunked(inputs, labels, mask, teacher_outputs, ce_weight)
        if teacher_outputs is None:
            teacher_logits, teacher_features = self.run_teacher(inputs)
        else:
            teacher_logits, teacher_features = teacher_outputs
        teacher_logits = self.teacher_logits_for_student(teacher_logits, live=teacher_outputs is None)
        student_logits, student_features = self._run_student(inputs)
        if isinstance(teacher_logits, Tensor):  # None when α = 0 stopped the teacher; TopKLogits from a cache
            self._check_logits(student_logits, teacher_logits)
        if not self._built:
            self._build_adapters(student_features, teacher_features)
        return self.compute_losses(
            student_logits, teacher_logits, student_features, teacher_features, labels, mask, ce_weight=ce_weight
        )

    def _forward_chunked(
        self,
        inputs: Any,
        labels: Tensor | None,
        mask: Tensor | None,
        teacher_outputs: tuple[TeacherLogits | None, Mapping[str, Tensor]] | None,
        ce_weight: float = 1.0,
    ) -> dict[str, Tensor]:
        """:meth:`forward` with ``chunk_tokens``: hidden states and heads instead of logits."""
        teacher: TeacherHidden | TeacherLogits | None
        if teacher_outputs is None:
            teacher, teacher_features = self.run_teacher_hidden(inputs)
        else:
            teacher_logits, teacher_features = teacher_outputs
            teacher = self.teacher_logits_for_student(teacher_logits, live=False)
        student_hidden, student_features = self._run_student_hidden(inputs)
        if not self._built:
            self._build_adapters(student_features, teacher_features)
        return self.compute_chunked_losses(
            student_hidden, teacher, student_features, teacher_features, labels, mask, ce_weight=ce_weight
        )

    def _run_student(self, inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's logits and hooked features for ``inputs`` (with autograd, unless disabled)."""
        self._student_recorder.clear()
        try:
            logits = self.logits_fn(call_model(self.student, inputs))
        except BaseException:
            self._student_recorder.discard()  # keep no half pass's features alive
            raise
        return logits, self._student_recorder.pop()

    def _run_student_hidden(self, inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's final hidden states ``(N, T, H)`` (its head's input; the head is not run) and
        hooked features. A pruned-vocabulary student's inner model is called on the compact ids."""
        model, model_inputs = self.student, inputs
        if isinstance(model, PrunedVocabulary):
            model, model_inputs = model.model, _compact_inputs(model, inputs)
        self._student_recorder.clear()
        try:
            with _bypassed_head(model, "student") as captured:
                call_model(model, model_inputs)
        except BaseException:
            self._student_recorder.discard()
            raise
        return _captured_hidden(captured, "student"), self._student_recorder.pop()

    @torch.no_grad()
    def run_teacher_hidden(self, inputs: Any) -> tuple[TeacherHidden | None, dict[str, Tensor]]:
        """The teacher's ``(final hidden states (N, T, H_t), head, coarsen or None)`` and hooked features,
        its head not run (see the class docstring, "Chunked loss"); None when ``alpha = 0`` stopped it."""
        head = _output_head(self.teacher, "teacher")
        hidden, features = self._teacher_pass(inputs, bypass_head=True)
        if hidden is None:
            return None, features
        coarsen = None
        if isinstance(self.student, PrunedVocabulary):
            coarsen = functools.partial(self.student.coarsen, temperature=self.temperature)
        return TeacherHidden(hidden, head, coarsen), features

    @torch.no_grad()
    def run_teacher(self, inputs: Any) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The teacher's logits and hooked features for ``inputs``, without an autograd graph.

        With ``alpha = 0`` the forward pass stops after the last paired layer and the logits are None.
        """
        return self._teacher_pass(inputs, bypass_head=False)

    def _teacher_pass(self, inputs: Any, *, bypass_head: bool) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The teacher's logits, or with ``bypass_head`` its head's input, and its hooked features."""
        self._teacher_recorder.clear()
        # With α = 0 nothing after the deepest paired teacher layer is needed: stop the teacher there.
        self._teacher_recorder.stop_when_complete = self.stops_teacher_early
        precision = nullcontext()
        if self.teacher_dtype is not None:
            device = next(self.teacher.parameters(), torch.empty(0)).device
            precision = torch.autocast(device.type, dtype=self.teacher_dtype)
        try:
            with precision:
                if bypass_head:
                    with _bypassed_head(self.teacher, "teacher") as captured:
                        call_model(self.teacher, inputs)
                    logits = _captured_hidden(captured, "teacher")
                else:
                    logits = self.logits_fn(call_model(self.teacher, inputs))
        except StopForward:
            logits = None
        except BaseException:
            self._teacher_recorder.discard()  # keep no half pass's features alive
            raise
        finally:
            self._teacher_recorder.stop_when_complete = False
        return logits, self._teacher_recorder.pop()

    def teacher_logits_for_student(self, teacher_logits: TeacherLogits | None, *, live: bool) -> TeacherLogits | None:
        """The teacher's logits over the student's outputs: for a pruned-vocabulary student, ``(..., V)``
        coarsened to ``(..., |K| + 1)`` at the Distiller's τ; otherwise unchanged.

        ``live``: the logits come from running the teacher, so they are full-vocabulary. Cached
        logits (``live=False``) are coarsened only when they have ``V`` columns (and ``V ≠ |K| + 1``);
        with ``|K| + 1`` they, like a cached :class:`TopKLogits`, are taken as already coarsened.
        """
        student = self.student
        if not isinstance(student, PrunedVocabulary) or not isinstance(teacher_logits, Tensor):
            return teacher_logits
        full = teacher_logits.shape[-1] == student.vocab_size and student.vocab_size != student.other + 1
        return student.coarsen(teacher_logits, self.temperature) if live or full else teacher_logits

    @property
    def teacher_layers(self) -> list[str]:
        """The teacher layers whose features the pairs need (what a cache must hold)."""
        return list(self._teacher_recorder.paths)

    def compute_losses(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        student_features: Mapping[str, Tensor],
        teacher_features: Mapping[str, Tensor],
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        ce_weight: float = 1.0,
    ) -> dict[str, Tensor]:
        """The loss dict from already computed outputs (also used with cached teacher outputs).

        All tensors are unshifted, as the models give them: ``(N, T, C)`` logits, ``(N, T)`` labels
        and mask for a causal LM, whose next-token shift happens here, once. For a pruned-vocabulary
        student the labels are full ids and ``teacher_logits`` are already over the student's
        ``|K| + 1`` outputs (see :meth:`teacher_logits_for_student`).

        ``teacher_logits`` is None only when ``alpha = 0`` stopped the teacher early; the output
        then has no ``response`` key. With ``alpha = 0`` and teacher logits, ``response`` is the
        real ``L_resp``, computed without gradient (it has no weight in the loss). ``ce_weight``: see
        the class docstring ("CE weight"); with 0, CE is computed without gradient, for the report only.
        """
        if isinstance(self.student, PrunedVocabulary):
            _check_compact(teacher_logits, self.student)
            if labels is not None:
                labels = self.student.compact(labels)
        # The feature terms are per position, not next-token predictions: they keep the full mask.
        scored_logits, scored_teacher, scored_labels, scored_mask = student_logits, teacher_logits, labels, mask
        if self.causal_lm:
            scored_logits, scored_teacher, scored_labels, scored_mask = next_token_positions(
                student_logits, teacher_logits, labels, mask, self.ignore_index
            )
        response = None
        if scored_teacher is not None:
            # α = 0: report L_resp (spec section 2) without building a graph for a zero-weight term.
            with torch.no_grad() if self.alpha == 0 else nullcontext():
                response = losses.response_loss(
                    self._response_logits(scored_logits),
                    scored_teacher,
                    self.temperature,
                    scored_labels,
                    ignore_index=self.ignore_index,
                    mask=scored_mask if _is_token_mask(scored_mask, scored_logits) else None,
                    temperature_squared=self.temperature_squared,
                    loss=self._response_loss,
                )
        feature, terms = self._feature_terms(student_logits, student_features, teacher_features, mask)
        if scored_labels is not None:
            # A zero-weight CE is only reported: no graph for it.
            with torch.no_grad() if ce_weight == 0 else nullcontext():
                ce = losses.cross_entropy(scored_logits, scored_labels, self.ignore_index)
        else:
            ce = student_logits.new_zeros((), dtype=torch.float32)
        # Zero-weight terms stay out of the sum (0 · NaN is NaN); weight 1 multiplies nothing, so the
        # default total is the plain L_total bit for bit, its additions in their usual order.
        weighted_ce = None if ce_weight == 0 else ce if ce_weight == 1 else ce_weight * ce
        if self.alpha == 0:
            total = self.beta * feature if weighted_ce is None else self.beta * feature + weighted_ce
            if labels is None or weighted_ce is None:
                # The logits are in no weighted term: keep them in the graph with weight 0, so every
                # student parameter gets a gradient and DDP does not fail on "unused parameters".
                total = total + student_logits.float().sum() * 0.0
        else:
            total = self.beta * (self.alpha * response + feature)
            if weighted_ce is not None:
                total = total + weighted_ce
        return self._output(total, ce, response, feature, terms, student_logits)

    def _response_logits(self, logits: Tensor) -> Tensor:
        """The student's ``(..., C)`` logits as the response term reads them: a pruned-vocabulary
        student's tempered as its full-vocabulary logits are (:meth:`PrunedVocabulary.tempered`, which
        adds ``(τ − 1)·log(rest)`` to "other"), any other student's as they are. CE reads them untouched."""
        student = self.student
        return student.tempered(logits, self.temperature) if isinstance(student, PrunedVocabulary) else logits

    def compute_chunked_losses(
        self,
        student_hidden: Tensor,
        teacher: TeacherHidden | TeacherLogits | None,
        student_features: Mapping[str, Tensor],
        teacher_features: Mapping[str, Tensor],
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        ce_weight: float = 1.0,
    ) -> dict[str, Tensor]:
        """:meth:`compute_losses` from the student's final hidden states, chunk by chunk (``chunk_tokens``).

        Args:
            student_hidden: ``(N, T, H)``, unshifted, the input of the student's head.
            teacher: a live teacher's :data:`TeacherHidden` (``(N, T, H_t)`` hidden states, head,
                coarsen), cached ``(N, T, C)`` logits or :class:`TopKLogits` over the student's outputs,
                or None (``alpha = 0`` stopped the teacher: no ``response`` key).
            labels, mask: ``(N, T)``, unshifted full ids / attention mask, or None.
            ce_weight: the weight of CE in the loss (see the class docstring, "CE weight").

        Returns:
            The keys of :meth:`compute_losses` but ``logits`` (see the class docstring).
        """
        if self.chunk_size is None:
            raise ConfigError("compute_chunked_losses needs a Distiller built with chunk_tokens")
        student = self.student
        if isinstance(student, PrunedVocabulary):
            if not isinstance(teacher, TeacherHidden):  # a live teacher's rows are coarsened inside the loss
                _check_compact(teacher, student)
            if labels is not None:
                labels = student.compact(labels)
        live = isinstance(teacher, TeacherHidden)  # (a TopKLogits is a tuple too)
        shifted_teacher = teacher.hidden if live else teacher
        hidden, shifted_teacher, scored_labels, scored_mask = next_token_positions(
            student_hidden, shifted_teacher, labels, mask, self.ignore_index
        )
        rows = hidden.shape[0] * hidden.shape[1]
        flat_teacher: Any = None
        if live:
            flat_teacher = (shifted_teacher.reshape(rows, -1), teacher.head)
            if teacher.coarsen is not None:
                flat_teacher = (*flat_teacher, teacher.coarsen)
        elif isinstance(shifted_teacher, TopKLogits):
            flat_teacher = shifted_teacher.rows(None)
        elif shifted_teacher is not None:
            flat_teacher = shifted_teacher.reshape(rows, shifted_teacher.shape[-1])
        flat_mask = scored_mask.reshape(-1) if _is_token_mask(scored_mask, hidden) else None
        # A pruned student is tempered as its full-vocabulary logits are (see _response_logits).
        offset = student.tempered_offset(self.temperature) if isinstance(student, PrunedVocabulary) else None
        values = chunked.chunked_distillation_loss(
            hidden.reshape(rows, hidden.shape[-1]),
            _student_head(student),
            flat_teacher,
            None if scored_labels is None else scored_labels.reshape(-1),
            divergence=self._response_loss,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            ignore_index=self.ignore_index,
            chunk_size=self.chunk_size,
            mask=flat_mask,
            temperature_squared=self.temperature_squared,
            ce_weight=ce_weight,
            response_offset=offset,
        )
        feature, terms = self._feature_terms(student_hidden, student_features, teacher_features, mask)
        # chunked's loss is β·α·L_resp + w·L_CE (just w·L_CE when α = 0 or there is no teacher): add β·L_feat.
        total = values["loss"] + self.beta * feature
        if (self.alpha == 0 or teacher is None) and (scored_labels is None or ce_weight == 0):
            # Nothing weighted reaches the head: chunked's loss is a 0 whose (zero) gradients reach every
            # student parameter (for DDP, as compute_losses's weight-0 logits); float32, as that one.
            total = values["loss"].float() + self.beta * feature
        response = None if teacher is None else values["response"]
        # Without labels CE is a float32 0, as compute_losses reports it (chunked's is in the loss's dtype).
        ce = values["ce"] if scored_labels is not None else student_hidden.new_zeros((), dtype=torch.float32)
        return self._output(total, ce, response, feature, terms, None)

    def _feature_terms(
        self,
        reference: Tensor,
        student_features: Mapping[str, Tensor],
        teacher_features: Mapping[str, Tensor],
        mask: Tensor | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(L_feat = Σ w_i · term_i, {"feature/<pair>": term_i})``; ``reference`` gives the device."""
        terms: dict[str, Tensor] = {}
        feature = reference.new_zeros((), dtype=torch.float32)
        for index, (pair, loss_fn) in enumerate(zip(self.pairs, self._feature_losses)):
            student_feature = self.adapters[str(index)](student_features[pair.student])
            teacher_feature = teacher_features[pair.teacher].detach()
            if student_feature.shape != teacher_feature.shape:
                raise FeatureShapeError(  # only reachable with a user-given adapter
                    f"adapter of feature pair {pair.name} gives shape {tuple(student_feature.shape)}, "
                    f"teacher feature has {tuple(teacher_feature.shape)}"
                )
            pair_mask = mask if _is_token_mask(mask, teacher_feature) else None
            term = loss_fn(student_feature, teacher_feature, pair_mask)
            terms[f"feature/{pair.name}"] = term
            feature = feature + pair.weight * term
        return feature, terms

    def _output(
        self,
        total: Tensor,
        ce: Tensor,
        response: Tensor | None,
        feature: Tensor,
        terms: dict[str, Tensor],
        logits: Tensor | None,
    ) -> dict[str, Tensor]:
        """The loss dict in the documented key order; raises on a non-finite loss (``check_finite``)."""
        head = {"loss": total, "ce": ce} if response is None else {"loss": total, "ce": ce, "response": response}
        out = {**head, "feature": feature, **terms}
        if logits is not None:
            out["logits"] = logits
        if self.check_finite and not bool(torch.isfinite(total)):
            raise _non_finite(out)
        return out

    def _check_logits(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ClassCountError(
                f"teacher predicts {teacher_logits.shape[-1]} classes but the student predicts "
                f"{student_logits.shape[-1]}; both must use the same label set"
            )
        if student_logits.shape != teacher_logits.shape:
            raise ClassCountError(
                f"teacher logits have shape {tuple(teacher_logits.shape)} but student logits "
                f"{tuple(student_logits.shape)}"
            )

    # -- hooks' lifetime ---------------------------------------------------------------

    def close(self) -> None:
        """Remove every hook from teacher and student; both models are as they were."""
        self._student_recorder.close()
        self._teacher_recorder.close()

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extra_repr(self) -> str:
        return (
            f"teacher={type(self.teacher).__name__}, alpha={self.alpha}, beta={self.beta}, "
            f"temperature={self.temperature}, causal_lm={self.causal_lm}, pairs={[p.name for p in self.pairs]}"
        )


def next_token_positions(
    student_logits: Tensor,
    teacher_logits: TeacherLogits | None,
    labels: Tensor | None,
    mask: Tensor | None,
    ignore_index: int = -100,
) -> tuple[Tensor, TeacherLogits | None, Tensor | None, Tensor | None]:
    """The Hugging Face causal-LM shift: the logits at ``t`` are scored against the token at ``t + 1``.

    ``(N, T, C)`` logits (every field of a :class:`TopKLogits`) become ``[:, :-1]``; ``(N, T)`` labels
    and attention mask ``[:, 1:]``. Padding (mask 0) is folded into the labels as ``ignore_index``,
    so CE and the response term count exactly the same positions.

    Raises:
        ConfigError: the logits are not ``(N, T, C)``.
    """
    if student_logits.dim() != 3:
        raise ConfigError(
            f"a causal language model's logits must be (N, T, C), got shape {tuple(student_logits.shape)}; "
            "pass causal_lm=False for a model that is not one"
        )
    if isinstance(teacher_logits, TopKLogits):
        teacher_logits = TopKLogits(*(part[:, :-1] for part in teacher_logits))
    elif teacher_logits is not None:
        teacher_logits = teacher_logits[:, :-1]
    mask = mask[:, 1:] if mask is not None and mask.dim() == 2 else mask
    if labels is not None:
        labels = labels[:, 1:]
        if mask is not None and mask.shape == labels.shape:
            labels = labels.masked_fill(mask == 0, ignore_index)
    return student_logits[:, :-1], teacher_logits, labels, mask


def _check_compact(teacher_logits: TeacherLogits | None, student: PrunedVocabulary) -> None:
    """Refuse teacher logits that are not over a pruned student's ``|K| + 1`` compact ids."""
    outputs = student.other + 1
    if isinstance(teacher_logits, TopKLogits):
        if teacher_logits.indices.numel() and int(teacher_logits.indices.max()) >= outputs:
            raise ClassCountError(
                f"the cached top-k teacher logits hold class id {int(teacher_logits.indices.max())}, but the "
                f"pruned student predicts {outputs} compact ids: build the cache with the student's coarsen"
            )
    elif teacher_logits is not None and teacher_logits.shape[-1] != outputs:
        raise ClassCountError(
            f"teacher logits have {teacher_logits.shape[-1]} columns, but the pruned student predicts "
            f"{outputs} compact ids: coarsen them with student.coarsen"
        )


def _is_token_mask(mask: Tensor | None, tensor: Tensor) -> bool:
    return mask is not None and tensor.dim() >= 3 and tuple(mask.shape) == tuple(tensor.shape[:2])


def _check_range(name: str, value: float, minimum: float, inclusive: bool = True) -> None:
    ok = value >= minimum if inclusive else value > minimum
    if not (isinstance(value, (int, float)) and ok and value == value and value != float("inf")):
        bound = f"≥ {minimum:g}" if inclusive else f"> {minimum:g}"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")


def _non_finite(out: Mapping[str, Tensor]) -> NonFiniteLossError:
    terms = [
        name for name, value in out.items() if name not in ("loss", "logits") and not bool(torch.isfinite(value).all())
    ]
    which = ", ".join(terms) if terms else "loss"
    logits = out.get("logits")  # none under chunk_tokens
    if logits is not None and not bool(torch.isfinite(logits).all()):
        which += " (the student's logits are not finite: check the inputs and the learning rate)"
    return NonFiniteLossError(f"non-finite loss in term {which}", term=terms[0] if terms else "loss")


# -- chunked loss helpers ---------------------------------------------------------------------------


def _output_head(model: nn.Module, role: str) -> nn.Linear:
    """``model.get_output_embeddings()``, which must be an ``nn.Linear`` for the chunked loss."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Linear):
        raise ConfigError(
            f"chunk_tokens needs the {role}'s output head as an nn.Linear from get_output_embeddings(), "
            f"{type(model).__name__} gives {type(head).__name__}; set chunk_tokens to None"
        )
    return head


def _student_head(student: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The student head's ``(weight (V, H), bias (V,) or None)``; for a pruned student the cut head's
    weight and its bias plus ``(0, …, 0, other_bias)``, built in the graph so ``other_bias`` gets a gradient."""
    if isinstance(student, PrunedVocabulary):
        head = _output_head(student.model, "student")
        other = F.pad(student.other_bias.reshape(1).to(head.weight.dtype), (student.other, 0))
        return head.weight, other if head.bias is None else head.bias + other
    head = _output_head(student, "student")
    return head.weight, head.bias


@contextmanager
def _bypassed_head(model: nn.Module, role: str) -> Iterator[list[Tensor]]:
    """Within the block, ``model``'s output head records its input and returns an empty ``(..., 0)``
    stand-in instead of its ``(..., V)`` logits; the list yielded holds the recorded inputs."""
    head = _output_head(model, role)
    captured: list[Tensor] = []

    def record(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        captured.append(hidden)
        return hidden.new_empty((*hidden.shape[:-1], 0))

    # An instance attribute shadows the class's forward; one already there (accelerate's hooks put
    # theirs there) is put back afterwards.
    previous = head.__dict__.get("forward")
    head.forward = record
    try:
        yield captured
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def _captured_hidden(captured: list[Tensor], role: str) -> Tensor:
    if len(captured) != 1 or captured[0].dim() != 3:
        shapes = [tuple(hidden.shape) for hidden in captured]
        raise ConfigError(
            f"chunk_tokens: the {role}'s output head must be called once on (N, T, H) hidden states "
            f"in a forward pass, got calls on {shapes}; set chunk_tokens to None"
        )
    return captured[0]


def _compact_inputs(student: PrunedVocabulary, inputs: Any) -> Any:
    """The inputs of a pruned student's inner model: ``input_ids`` (a mapping's entry, a tuple's first
    element, or the tensor) mapped to compact ids, as :meth:`PrunedVocabulary.forward` does."""
    if isinstance(inputs, Mapping):
        return {**inputs, "input_ids": student.compact(inputs["input_ids"])}
    if isinstance(inputs, (tuple, list)):
        return (student.compact(inputs[0]), *inputs[1:])
    return student.compact(inputs)


def _chunk_size(
    chunk_tokens: int | str | None,
    teacher: nn.Module,
    student: nn.Module,
    causal_lm: bool,
    response_loss: str | Callable,
) -> int | None:
    """Rows per chunk of the chunked loss, or None when it is off (see ``chunk_tokens`` in :class:`Distiller`).

    Raises:
        ConfigError: a value that is none of None, ``"auto"`` or a positive int; or an int where the
            chunked loss cannot run (not a causal LM, no ``nn.Linear`` heads, the ``dist`` loss).
    """
    if chunk_tokens is None:
        return None
    auto = chunk_tokens == "auto"
    if not auto and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ConfigError(f"chunk_tokens must be a positive number of tokens, 'auto' or None, got {chunk_tokens!r}")
    try:
        if not causal_lm:
            raise ConfigError("chunk_tokens applies to causal language models only (causal_lm=True)")
        heads = [_output_head(teacher, "teacher")]
        heads.append(_output_head(student.model if isinstance(student, PrunedVocabulary) else student, "student"))
        chunked._resolve_divergence(response_loss)  # dist cannot be chunked
    except ConfigError:
        if auto:
            return None
        raise
    if not auto:
        return int(chunk_tokens)
    vocabulary = max([head.out_features for head in heads] + [getattr(student, "vocab_size", 0)])
    return DEFAULT_CHUNK_TOKENS if vocabulary >= AUTO_CHUNK_VOCABULARY else None
