"""Distil inside a Hugging Face ``transformers.Trainer`` script, and LoRA students through ``peft``.

:class:`DistillationTrainer` is a ``transformers.Trainer`` whose loss is kdistill's
:class:`~kdistill.Distiller`: swap the class, add ``teacher=`` (and ``feature_pairs=``, ``alpha=``,
``beta=``, ``temperature=``), and the rest of the script — ``TrainingArguments``, datasets,
collators, callbacks, ``train(resume_from_checkpoint=...)`` — stays as it was.

What the Trainer sees and what it does not:

* the **student** is the Trainer's ``model``: it alone is wrapped (DDP, accelerate), checkpointed
  (``model.safetensors``, or the LoRA adapter for a ``peft`` student) and gradient-checkpointed;
* the **teacher** is frozen, in eval mode, on the student's device, and never a submodule of
  anything the Trainer touches, so it is in no optimizer, no DDP bucket and no checkpoint;
* the feature pairs' **adapters** (student feature → teacher feature's shape) are trained: they
  join the optimizer as extra parameter groups, and are saved beside the student as
  ``adapters.safetensors`` in each checkpoint folder (never inside the student's weights, which
  must stay loadable by ``from_pretrained``), and loaded back on resume.

Multi-process launch (``torchrun``, ``accelerate launch``) works as for a plain Trainer: each process
distils its share of every global batch, DDP averages the student's gradients, and a callback
averages the adapters' gradients over the processes before each optimizer step (DDP does not see
them), so every process takes the update that one process takes on the whole global batch when
the per-process losses have equal weight (rows, or equal token counts; the loss is a per-batch mean).
Feature pairs under DeepSpeed or FSDP are refused: those own the gradients' reduction.

Every loss term (``ce``, ``response``, ``feature``, ``feature/<student>-><teacher>``) is logged with
``loss``, averaged over the same logging interval as Hugging Face averages ``loss``, so that
``loss = β·(α·response + feature) + ce`` holds for the logged numbers too.

For a causal-LM student with a large vocabulary the loss is chunked (``chunk_tokens``, ``"auto"`` by
default): no ``(N, T, V)`` logits tensor exists, in training or in evaluation. ``evaluate()`` then
reports ``eval_loss`` alone and ``predict()`` returns no predictions; a ``compute_metrics``, which
needs the logits, turns ``"auto"`` chunking off (and refuses an explicit ``chunk_tokens``).

``transformers`` (and ``peft``, for :func:`lora_student`) are optional extras: this module is
never imported by the core or by ``import kdistill``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdistill.core.calls import default_logits, first_tensor, is_causal_lm
from kdistill.core.distiller import Distiller, FeaturePair
from kdistill.core.errors import CheckpointError, ConfigError

try:
    import transformers
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ConfigError(
        "kdistill.integrations.transformers needs the transformers extra: pip install 'kdistill[transformers]'"
    ) from None

ADAPTERS_NAME = "adapters.safetensors"
PEFT_PREFIX = "base_model.model."  # what peft.get_peft_model puts before the wrapped model's layer names


def _peft() -> Any:
    """The ``peft`` package, or a :class:`ConfigError` naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA students need the peft extra: pip install 'kdistill[peft]'") from None
    return peft


def lora_student(
    student: nn.Module,
    *,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: Sequence[str] | str | None = None,
    lora_dropout: float = 0.0,
    **lora_config: Any,
) -> nn.Module:
    """``student`` wrapped by ``peft.get_peft_model`` with a ``LoraConfig``: only the LoRA weights
    (and any ``modules_to_save`` given in ``lora_config``) are trainable.

    ``target_modules`` None lets ``peft`` pick the attention projections it knows for the
    architecture. Feature pairs may keep the unwrapped model's layer names
    (``model.layers.1``): :class:`DistillationTrainer` adds peft's ``base_model.model.`` prefix.

    Raises:
        ConfigError: ``peft`` is not installed.
    """
    peft = _peft()
    if is_causal_lm(student):  # a PeftModelForCausalLM, which keeps generate() and the causal shift
        lora_config.setdefault("task_type", "CAUSAL_LM")
    config = peft.LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules,
        lora_dropout=lora_dropout,
        **lora_config,
    )
    return peft.get_peft_model(student, config)


def _check_adapter_support(trainer: transformers.Trainer) -> None:
    """Refuse feature pairs where their adapters would silently not train.

    DeepSpeed and FSDP own the optimizer and the gradients' reduction (a DeepSpeed config with its
    own optimizer never calls ``create_optimizer``): the adapters, which live outside the student,
    would escape both. The adapter callbacks need ``TrainerCallback.on_pre_optimizer_step`` and
    ``on_optimizer_step`` (newer transformers releases); without them gradients would add up.
    """
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise ConfigError(
            "feature pairs with trainable adapters are not supported with DeepSpeed or FSDP; "
            "use response distillation (no feature_pairs) or plain multi-process (DDP) launch"
        )
    hooks = ("on_pre_optimizer_step", "on_optimizer_step")
    missing = [hook for hook in hooks if not hasattr(transformers.TrainerCallback, hook)]
    if missing:
        raise ConfigError(
            f"feature pairs need transformers' TrainerCallback.{missing[0]} (transformers {transformers.__version__} "
            "lacks it): upgrade transformers, or use response distillation (no feature_pairs)"
        )


def merge_lora(student: nn.Module) -> nn.Module:
    """The plain model with the LoRA weights folded into its own (``merge_and_unload``), for export:
    its outputs equal the LoRA student's, and it needs no ``peft`` to load."""
    merge = getattr(student, "merge_and_unload", None)
    if merge is None:
        raise ConfigError(f"{type(student).__name__} is not a peft (LoRA) model: there is nothing to merge")
    return merge()


def _pair_on_student(student: nn.Module, pair: FeaturePair) -> FeaturePair:
    """``pair`` with its student path as seen on ``student``: a peft model names the wrapped
    model's layers ``base_model.model.<path>``, and users write the path they know."""
    names = dict(student.named_modules())
    if pair.student in names or PEFT_PREFIX + pair.student not in names:
        return pair
    return FeaturePair(
        PEFT_PREFIX + pair.student, pair.teacher, pair.weight, pair.loss, adapter=pair.adapter, layout=pair.layout
    )


class _ZeroAdapterGradients(transformers.TrainerCallback):
    """Clears the adapters' gradients after each optimizer step, as the Trainer does for the model's."""

    def __init__(self, adapters: nn.Module) -> None:
        self.adapters = adapters

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.adapters.zero_grad(set_to_none=True)


class _AverageAdapterGradients(transformers.TrainerCallback):
    """Keeps the adapters identical on every process of a multi-process (DDP) run.

    The adapters are not part of the student that the Trainer wraps with DDP, so DDP neither
    broadcasts their initial weights nor averages their gradients. This callback does both by hand:
    at the start of training it copies rank 0's adapters to every process (as DDP does for the
    student), and before each optimizer step (after gradient accumulation, when DDP has averaged the
    student's gradients) it replaces each adapter gradient with its mean over the processes. Every
    process then applies the same update, the one a single process would apply to the mean of the
    processes' losses. Gradient clipping, which the Trainer does before this point, covers the
    student alone, as in a one-process run.
    """

    def __init__(self, adapters: nn.Module) -> None:
        self.adapters = adapters

    @staticmethod
    def _distributed() -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._distributed():
            return
        with torch.no_grad():
            for tensor in self.adapters.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._distributed():
            return
        # Every process ran the same pairs, so the same adapter parameters hold gradients on all of
        # them: the collective lines up. One flat tensor: one all-reduce instead of one per tensor.
        grads = [p.grad for p in self.adapters.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= torch.distributed.get_world_size()
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains ``model`` (the student) to reproduce ``teacher``.

    The loss is kdistill's :class:`~kdistill.Distiller` (spec sections 1, 2 and 6):
    ``L = β·(α·L_resp + L_feat) + L_CE``, the causal-LM shift for ``*ForCausalLM`` students, a
    batch's ``labels`` entry taken out (neither model receives it) and used for CE.

    Args:
        model: the student (a ``PreTrainedModel``, a ``peft`` model, or any ``nn.Module`` taking the
            batch's keys as keyword arguments).
        teacher: the trained model; frozen, put in eval mode and on the student's device.
        feature_pairs: layers to match (paths as in ``named_modules()``); ``()`` for response only.
        alpha, beta, temperature: the formula's ``α``, ``β``, ``τ``.
        divergence: the response loss, a name in :data:`kdistill.core.losses.RESPONSE_LOSSES` or a
            function ``(student_rows, teacher_rows, τ) -> scalar``.
        temperature_squared, ignore_index, causal_lm, teacher_dtype, logits_fn, feature_fn: as for
            :class:`~kdistill.Distiller`.
        chunk_tokens: the chunked loss for causal LMs (``chunk_tokens`` of :class:`~kdistill.Distiller`):
            a number of positions per chunk, ``"auto"`` (the default: on for a vocabulary of at least
            :data:`kdistill.core.distiller.AUTO_CHUNK_VOCABULARY` ids, as the config's ``distill.chunk_tokens``)
            or None (off). Chunked, the loss has no logits: evaluation gives the loss alone (see
            :meth:`prediction_step`). With a ``compute_metrics``, which reads the logits, ``"auto"``
            means off and a number is refused.
        sample_input: a batch to build the adapters from; by default the first
            ``per_device_train_batch_size`` examples of ``train_dataset``, collated.
        **trainer_kwargs: everything ``transformers.Trainer`` takes (``args``, ``train_dataset``,
            ``data_collator``, ``callbacks``, ...).

    The adapters are built here (before the optimizer exists) under a forked RNG, so the run's
    data order and dropout are those of the same script without distillation.
    """

    # The Distiller's loss is a per-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher: nn.Module | None = None,
        feature_pairs: Sequence[FeaturePair] = (),
        *,
        alpha: float = 1.0,
        beta: float = 1.0,
        temperature: float = 4.0,
        divergence: str | Callable = "kl",
        temperature_squared: bool = True,
        ignore_index: int = -100,
        causal_lm: bool | None = None,
        teacher_dtype: torch.dtype | None = None,
        logits_fn: Callable[[Any], Tensor] = default_logits,
        feature_fn: Callable[[Any], Tensor] = first_tensor,
        chunk_tokens: int | Literal["auto"] | None = "auto",
        sample_input: Any = None,
        **trainer_kwargs: Any,
    ) -> None:
        if model is None or teacher is None:
            raise ConfigError("DistillationTrainer needs both model= (the student) and teacher=")
        if trainer_kwargs.get("model_init") is not None:
            raise ConfigError("DistillationTrainer does not support model_init: pass the student as model=")
        if trainer_kwargs.get("compute_metrics") is not None:
            # The metrics read the student's logits, which the chunked loss never forms.
            if chunk_tokens == "auto":
                chunk_tokens = None
            elif chunk_tokens is not None:
                raise ConfigError(
                    f"compute_metrics needs the student's logits, and chunk_tokens={chunk_tokens!r} computes none: "
                    "set chunk_tokens=None (or 'auto') to evaluate with metrics"
                )
        super().__init__(model=model, **trainer_kwargs)
        # The Distiller reads the labels itself; no num_items_in_batch is needed (nor counted).
        self.model_accepts_loss_kwargs = False
        self.teacher = teacher
        self._place_teacher(self.model)
        self.distiller = Distiller(
            teacher,
            self.model,
            [_pair_on_student(self.model, pair) for pair in feature_pairs],
            alpha=alpha,
            beta=beta,
            temperature=temperature,
            temperature_squared=temperature_squared,
            response_loss=divergence,
            ignore_index=ignore_index,
            logits_fn=logits_fn,
            feature_fn=feature_fn,
            causal_lm=causal_lm,
            teacher_dtype=teacher_dtype,
            chunk_tokens=chunk_tokens,
        )
        if self.distiller.pairs:
            # Adapter initialisation draws random numbers: fork the RNG so that distilling does not
            # change the data order or dropout masks of the script it drops into.
            with torch.random.fork_rng(devices=[]):
                batch = sample_input if sample_input is not None else self._sample_batch()
                self.distiller.build(self._prepare_inputs(batch))
        self._term_sums: dict[str, Tensor] = {}
        self._term_count = 0
        if self.adapter_parameters():
            _check_adapter_support(self)
        # The Trainer zeroes only the model's gradients after an update; the adapters' would add up.
        self.add_callback(_ZeroAdapterGradients(self.distiller.adapters))
        if self.args.world_size > 1 and self.adapter_parameters():
            # DDP averages the student's gradients only: average the adapters' too.
            self.add_callback(_AverageAdapterGradients(self.distiller.adapters))

    # -- set-up -------------------------------------------------------------------------------

    def _place_teacher(self, student: nn.Module) -> None:
        """Move the teacher to the student's device (the Trainer may place the student late)."""
        student_device = next((p.device for p in student.parameters()), None)
        teacher_device = next((p.device for p in self.teacher.parameters()), None)
        if student_device is not None and teacher_device is not None and student_device != teacher_device:
            self.teacher.to(student_device)

    def _sample_batch(self) -> Any:
        """The first training batch's examples, collated: the shapes the adapters are built for."""
        dataset = self.train_dataset
        if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ConfigError(
                "feature pairs need a batch to size their adapters: give sample_input= "
                "(or a train_dataset that can be indexed)"
            )
        count = min(len(dataset), self.args.per_device_train_batch_size)
        if count == 0:
            raise ConfigError("the training dataset is empty")
        return self.data_collator([dataset[index] for index in range(count)])

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapters' trainable parameters, in pair order (what joins the optimizer)."""
        return [p for p in self.distiller.adapters.parameters() if p.requires_grad]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer for the student, plus the adapters as extra parameter groups
        (weight decay as the Trainer decides it: not on biases and norms)."""
        optimizer = super().create_optimizer(model)
        adapters = self.adapter_parameters()
        if not adapters:
            return optimizer
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if any(id(p) in present for p in adapters):
            return optimizer  # a user-given optimizer that already holds them
        decay = set(self.get_decay_parameter_names(self.distiller.adapters))
        named = [(name, p) for name, p in self.distiller.adapters.named_parameters() if p.requires_grad]
        with_decay = [p for name, p in named if name in decay]
        without_decay = [p for name, p in named if name not in decay]
        if with_decay:
            optimizer.add_param_group({"params": with_decay, "weight_decay": self.args.weight_decay})
        if without_decay:
            optimizer.add_param_group({"params": without_decay, "weight_decay": 0.0})
        return optimizer

    # -- the loss -------------------------------------------------------------------------------

    @contextmanager
    def _student_called_as(self, model: nn.Module) -> Iterator[None]:
        """Let the Distiller call the student through ``model``, the Trainer's wrapped student
        (DDP, accelerate): the hooks sit on the inner modules, which are the same objects."""
        modules = self.distiller._modules
        original = modules["student"]
        if model is original:
            yield
            return
        modules["student"] = model
        try:
            yield
        finally:
            modules["student"] = original

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The Distiller's total loss for one batch (a mean over its rows or tokens); during
        training its terms are added up for :meth:`log`. ``num_items_in_batch`` is not used: the
        loss is a per-batch mean, which the Trainer scales for gradient accumulation.

        The outputs (``return_outputs``) are ``{"loss", "logits"}``, the student's ``(N, T, V)`` or
        ``(N, C)`` logits; just ``{"loss"}`` under the chunked loss, which forms no logits."""
        self._place_teacher(model)
        with self._student_called_as(model):
            out = self.distiller(inputs)
        if model.training:
            for name, value in out.items():
                if name not in ("loss", "logits") and isinstance(value, Tensor) and value.dim() == 0:
                    value = value.detach().double()
                    self._term_sums[name] = self._term_sums[name] + value if name in self._term_sums else value
            self._term_count += 1
        loss = out["loss"]
        if not return_outputs:
            return loss
        logits = out.get("logits")  # none under chunk_tokens
        return loss, ({"loss": loss} if logits is None else {"loss": loss, "logits": logits})

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The Trainer's evaluation step; under the chunked loss ``(loss, None, None)``: there are no
        logits to return, and computing them in full would undo what chunking saves (the Trainer
        keeps every batch's predictions). ``evaluate()`` reports ``eval_loss``; for predictions or
        ``compute_metrics`` use ``chunk_tokens=None``."""
        chunked = self.distiller.chunk_size is not None
        return super().prediction_step(model, inputs, prediction_loss_only or chunked, ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the terms' means since the last log to a training log (the one with ``loss``).

        Hugging Face logs the mean of the micro-batches' losses over the interval (summed losses,
        each divided by the accumulation steps, divided by the updates); the terms are averaged the
        same way, and over processes as ``loss`` is, so ``loss = β·(α·response + feature) + ce``.
        """
        if "loss" in logs and self._term_count:
            names = list(self._term_sums)
            means = torch.stack([self._term_sums[name] for name in names]) / self._term_count
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            logs = {**logs, **{name: float(value) for name, value in zip(names, means.tolist())}}
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)

    # -- checkpoints ------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The student as the Trainer saves it, and the adapters beside it in ``adapters.safetensors``."""
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and self.adapter_parameters():
            self.save_adapters(output_dir)

    def save_adapters(self, folder: str | os.PathLike) -> None:
        """Write the adapters' weights to ``folder/adapters.safetensors``; the metadata names the
        pairs, so that loading into a run with other pairs fails instead of mixing them up."""
        from safetensors.torch import save_file

        tensors = {
            name: value.detach().cpu().contiguous() for name, value in self.distiller.adapters.state_dict().items()
        }
        metadata = {"format": "pt", "pairs": json.dumps([pair.name for pair in self.distiller.pairs])}
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, ADAPTERS_NAME), metadata=metadata)

    def load_adapters(self, folder: str | os.PathLike) -> None:
        """Load ``folder/adapters.safetensors`` into the adapters.

        Raises:
            CheckpointError: the file is missing, was written for other feature pairs, or does
                not fit the adapters.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = os.path.join(folder, ADAPTERS_NAME)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: the checkpoint holds no adapters for the feature pairs")
        with safe_open(path, framework="pt") as handle:
            saved_pairs = json.loads((handle.metadata() or {}).get("pairs", "null"))
        pairs = [pair.name for pair in self.distiller.pairs]
        if saved_pairs != pairs:
            raise CheckpointError(f"{path} holds adapters for the pairs {saved_pairs}, this run has {pairs}")
        try:
            self.distiller.adapters.load_state_dict(load_file(path))
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0]
            raise CheckpointError(f"{path} does not fit this run's adapters: {first}") from None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The student as the Trainer loads it, then the adapters saved beside it."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.adapter_parameters():
            self.load_adapters(resume_from_checkpoint)
