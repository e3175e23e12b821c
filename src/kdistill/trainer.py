"""A training loop that knows nothing about distillation.

The model is any ``nn.Module`` whose ``forward(inputs, labels, **facts)`` returns a mapping with a
``loss`` to backpropagate; every other scalar in that mapping is logged, and a ``logits`` entry
gives the running training accuracy. The loop consumes batches (:mod:`kdistill.batches`): a
``DataLoader`` or any iterable of ``(inputs, labels)`` pairs or mappings, or a map-style dataset,
which it loads in :class:`~kdistill.batches.EpochBatchSampler` order. Which of a batch's facts
(``index``, ``epoch``) reach the model is said by ``facts=``, not found by inspecting signatures.

Determinism: with a map-style dataset the batch order of epoch ``e`` comes from a generator seeded
by ``(seed, e)``, augmentation is a function of (sample, epoch), and a checkpoint stores the
position inside the epoch with every RNG state, so a resumed run repeats an uninterrupted one
exactly (on the same machine and thread count). A ``DataLoader`` of your own resumes by replaying
the epoch's first batches: exact when its order is deterministic (see the README).

Evaluation, best-epoch selection and early stopping, metric writers, the progress bar and the
Ctrl-C handler are callbacks (:mod:`kdistill.callbacks`) around :meth:`Trainer.fit`'s short loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill import distributed, faults, fsdp
from kdistill.batches import epoch_batches, loader_length, make_loader, unpack
from kdistill.callbacks import Callback, MetricsWriter, ProgressBar, SelectBest, SigintRequestsStop
from kdistill.checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint, save_weights
from kdistill.config import TrainConfig
from kdistill.core.errors import CheckpointError, ConfigError, NonFiniteLossError
from kdistill.data import TensorData, move

CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` produced."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_accuracy: float | None = None
    interrupted: bool = False
    seconds: float = 0.0


def pick_device(name: str) -> torch.device:
    """``auto`` → CUDA when there is one, else the CPU; a named device must exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device {name!r} is not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device is {name!r} but this machine has no CUDA device; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"train.device is {name!r} but MPS is not available here; use auto or cpu")
    return device


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device``: None off CUDA or when off; ``auto`` is bf16
    where the GPU supports it, else fp16."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def eval_batches(data: Any, batch_size: int) -> Iterable[Any]:
    """Batches of an evaluation set in its own order: a :class:`TensorData`, a map-style dataset,
    or an iterable of batches (a ``DataLoader``)."""
    if isinstance(data, TensorData):
        return data.batches(batch_size)
    if _is_dataset(data):
        return make_loader(data, batch_size, shuffle=False, place=distributed.World())
    return data


def evaluate(model: nn.Module, data: Any, batch_size: int, device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` (logits out) on ``data`` (see :func:`eval_batches`)."""
    from kdistill.core.calls import call_model, default_logits

    was_training = model.training
    model.eval()
    correct, loss, seen = 0, 0.0, 0
    # A sharded model's blocks gather into buffers that training reuses: made under inference mode,
    # they could never be written by training again (no_grad makes ordinary tensors).
    with torch.no_grad() if fsdp.is_sharded(model) else torch.inference_mode():
        for batch in eval_batches(data, batch_size):
            inputs, labels, _ = unpack(batch)
            inputs, labels = move(inputs, device), labels.to(device)
            logits = default_logits(call_model(model, inputs)).float()
            correct += int((logits.argmax(-1) == labels).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            seen += len(labels)
    model.train(was_training)
    return {"accuracy": correct / max(1, seen), "loss": loss / max(1, seen)}


def _is_dataset(data: Any) -> bool:
    """A map-style dataset (items by index), as opposed to an iterable of batches."""
    if isinstance(data, torch.utils.data.DataLoader):
        return False
    if isinstance(data, torch.utils.data.IterableDataset):
        return False
    return hasattr(data, "__getitems__") or isinstance(data, torch.utils.data.Dataset)


class Trainer:
    """Trains ``model`` on ``train_data`` with the optimiser and schedule of ``config``.

    Args:
        model: returns a mapping with ``loss`` from ``model(inputs, labels, **facts)``.
        parameters: what the optimiser trains (e.g. ``distiller.trainable_parameters()``).
        train_data: a ``DataLoader`` (or any iterable of batches, see :mod:`kdistill.batches`), or
            a map-style dataset such as :class:`~kdistill.data.TensorData`, loaded in seeded
            per-epoch order, ``batch_size`` at a time (``workers`` loader processes), split
            across ranks under DDP and FSDP.
        config: optimiser, schedule, epochs or ``max_steps``, clipping, accumulation, AMP, seed, and
            ``strategy``: under several processes ``ddp`` wraps ``model`` in
            ``DistributedDataParallel``; ``fsdp`` shards it (:func:`kdistill.fsdp.shard`: its blocks
            not sharded yet, then its root) and its optimizer state, and writes sharded checkpoints
            (in one process it trains as plain, with checkpoints in the sharded format). The
            ``parameters`` must then be ``model``'s own, and ``train.amp`` on CUDA becomes FSDP's
            mixed-precision policy instead of autocast.
        eval_model: maps inputs to logits for evaluation (default ``model``), e.g. the student.
        eval_sets: named evaluation sets (datasets or loaders) evaluated after every epoch.
        select_on: the eval set whose accuracy picks the best epoch and drives early
            stopping; never the test set in an honest run. ``None``: the last epoch is kept.
        augment: ``(inputs, index, epoch) -> inputs`` applied to each training batch, e.g.
            :class:`kdistill.data.ShiftViews`; a pure function of its arguments. Needs batches
            that carry ``index`` (map-style datasets loaded by the trainer do).
        facts: the batch facts passed to the model as keyword arguments, from ``index`` (the
            samples' dataset positions) and ``epoch`` (added by the trainer); by default those the
            model declares in a ``batch_facts`` attribute (a distiller reading cached teacher
            outputs declares both), else none.
        run_dir: where ``checkpoint.pt``, ``<weights_name>.safetensors`` (the eval model after the
            last epoch), ``<weights_name>_best.safetensors``, ``metrics.jsonl`` and TensorBoard
            events go; ``None`` writes nothing.
        log: receives one human-readable line per epoch (e.g. ``print``); ``None`` is silent.
        callbacks: more :class:`~kdistill.callbacks.Callback` objects, called after the built-in ones.
    """

    def __init__(
        self,
        model: nn.Module,
        parameters: Iterable[nn.Parameter],
        train_data: Any,
        config: TrainConfig,
        *,
        batch_size: int = 128,
        workers: int = 0,
        eval_batch_size: int = 1000,
        eval_model: nn.Module | None = None,
        eval_sets: Mapping[str, Any] | None = None,
        select_on: str | None = "validation",
        augment: Callable[[Tensor, Tensor, int], Tensor] | None = None,
        facts: tuple[str, ...] | None = None,
        run_dir: str | Path | None = None,
        log: Callable[[str], None] | None = None,
        description: str = "train",
        weights_name: str = "student",
        callbacks: Iterable[Callback] = (),
    ) -> None:
        self.model = model
        self.config = config
        self.loader = (
            make_loader(train_data, batch_size, config.seed, workers=workers) if _is_dataset(train_data) else train_data
        )
        self.eval_batch_size = eval_batch_size
        self.eval_model = eval_model if eval_model is not None else model
        self.eval_sets = dict(eval_sets or {})
        self.augment = augment
        self.facts = tuple(facts if facts is not None else getattr(model, "batch_facts", ()))
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.world = distributed.world()
        self.writes = self.run_dir is not None and self.world.is_main  # rank 0 alone writes
        self.log = (log or (lambda line: None)) if self.world.is_main else (lambda line: None)
        self.description = description
        self.weights_name = weights_name
        self.device = pick_device(config.device)
        self.sharded = config.strategy == "fsdp"  # sharded checkpoints, in one process too
        parameters = [p for p in parameters if p.requires_grad]
        if fsdp.active(config.strategy):
            # Sharded before it moves: the whole model never lands on the device. The parameters
            # become DTensors, so the optimizer's are found again by name.
            names = self._named(parameters)
            fsdp.shard(model, self.device, amp_dtype(config.amp, self.device))
            current = dict(model.named_parameters())
            parameters = [current[name] for name in names]
        self.model.to(self.device)
        self.eval_model.to(self.device)
        # Only what the optimizer trains is wrapped: a distiller's teacher is not a submodule.
        self.forward_model = model
        if self.world.distributed and not self.sharded:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.index is not None else None
            )
        self.parameters = parameters
        self.optimizer = self._optimizer()
        self.steps_per_epoch = loader_length(self.loader)  # None: an iterable of unknown length
        if self.steps_per_epoch is None and config.max_steps is None:
            raise ConfigError("train.max_steps is required for data of unknown length (an iterable dataset)")
        if self.steps_per_epoch == 0:
            raise ConfigError("the training data yields no batches")
        if self.steps_per_epoch is None and self.world.distributed and config.accumulate > 1:
            # The group that ends an unknown-length pass is only known after its last backward, which
            # ran without DDP's all-reduce: its update would drift the ranks apart.
            raise ConfigError("train.accumulate > 1 needs data of known length under multi-process training")
        # Each epoch ends with an update, so a last group shorter than `accumulate` is an update too.
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / config.accumulate) if self.steps_per_epoch else None
        if config.max_steps is not None:
            self.total_updates = config.max_steps
            per_epoch = self.updates_per_epoch
            self.epochs = math.ceil(config.max_steps / per_epoch) if per_epoch else None
        else:
            self.total_updates, self.epochs = self.updates_per_epoch * config.epochs, config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        # Under FSDP the mixed-precision policy casts (see shard), not autocast.
        self.amp_dtype = None if fsdp.active(config.strategy) else amp_dtype(config.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        select = select_on if select_on in self.eval_sets else None
        # Written with the epoch that SelectBest chose, when the epoch is saved (_save).
        self.best_path = self.run_dir / f"{weights_name}_best.safetensors" if self.run_dir and select else None
        self.callbacks: list[Callback] = [SelectBest(select, config.early_stopping)]
        if self.writes:
            self.callbacks.append(MetricsWriter(self.run_dir))
        if self.world.is_main:
            self.callbacks.append(ProgressBar(description))
        self.callbacks += list(callbacks)
        self.stop_requested = False
        self.resumed = False
        self.running = _Running()

    # -- set-up ------------------------------------------------------------------------------

    def _named(self, parameters: list[nn.Parameter]) -> list[str]:
        names = {id(p): name for name, p in self.model.named_parameters()}
        if any(id(p) not in names for p in parameters):
            raise ConfigError("train.strategy fsdp trains only parameters of the model it is given")
        return [names[id(p)] for p in parameters]

    def _optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(
                self.parameters, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.momentum > 0
            )
        return torch.optim.AdamW(self.parameters, lr=c.lr, weight_decay=c.weight_decay)

    def _lr_factor(self, update: int) -> float:
        """Linear warm-up, then cosine to 0, steps of ``step_gamma``, or constant (epochs of updates;
        for data of unknown length an "epoch" is ``max_steps / epochs`` updates)."""
        c = self.config
        updates_per_epoch = self.updates_per_epoch or max(1, self.total_updates // c.epochs)
        warmup = c.warmup_epochs * updates_per_epoch
        if update < warmup:
            return (update + 1) / (warmup + 1)
        if c.schedule == "cosine":
            progress = (update - warmup) / max(1.0, self.total_updates - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if c.schedule == "step":
            return c.step_gamma ** int(update // updates_per_epoch // c.step_epochs)
        return 1.0

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainResult:
        """Train for ``config.epochs`` epochs or ``config.max_steps`` updates (or resume from
        ``run_dir/checkpoint.pt``): batches in, ``loss`` out, step; callbacks do the rest."""
        state = {"epoch": 0, "batch": 0, "update": 0, "best_accuracy": None, "best_epoch": None, "stale": 0}
        result = TrainResult()
        if self.writes and self.run_dir.is_dir():
            # Left by a crash inside a checkpoint write. (Sharded directories that no checkpoint.pt
            # names go at the first save: until then an earlier checkpoint.pt stays whole.)
            remove_stale_temporaries(self.run_dir)
        self.resumed = resume
        if resume:
            state, result.history = self._restore()
        else:
            torch.manual_seed(self.config.seed)
        started = time.perf_counter()
        self.model.train()
        self._fire("on_fit_start", state)
        try:
            with SigintRequestsStop(self):
                while not self._finished(state):
                    self._fire("on_epoch_start", state)
                    self._run_epoch(state)
                    # One decision for all ranks: a Ctrl-C that reached one rank after the epoch's
                    # last check must not send it to the checkpoint while the others evaluate.
                    self.stop_requested = distributed.any_rank(self.stop_requested, self.world)
                    if self.stop_requested:
                        self._save(state, result.history)
                        result.interrupted = True
                        break
                    record = {"epoch": state["epoch"] + 1, **self._evaluate(), "seconds": time.perf_counter() - started}
                    # Rank 0's numbers decide the best epoch and early stopping for every rank.
                    record = distributed.main_value(record, self.world)
                    result.history.append(record)
                    stop = any([callback.on_epoch_end(self, state, record) for callback in self.callbacks])
                    state["epoch"], state["batch"] = state["epoch"] + 1, 0
                    self._save(state, result.history)
                    self.log(self._epoch_line(record))
                    if stop:
                        break
        finally:
            self._fire("on_fit_end", state)
        result.best_epoch, result.best_accuracy = state["best_epoch"], state["best_accuracy"]
        result.seconds = time.perf_counter() - started
        return result

    def _finished(self, state: dict[str, Any]) -> bool:
        if self.config.max_steps is not None and state["update"] >= self.config.max_steps:
            return True
        return self.epochs is not None and state["epoch"] >= self.epochs

    def _fire(self, event: str, state: dict[str, Any]) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, state)

    def _run_epoch(self, state: dict[str, Any]) -> None:
        """The epoch's batches from ``state["batch"]`` on, until its end, ``max_steps``, or a stop."""
        c, epoch = self.config, state["epoch"]
        self.running = _Running()
        pending = 0  # batches whose gradients wait for the group's update
        for index, batch in enumerate(epoch_batches(self.loader, epoch, state["batch"], c.seed), start=state["batch"]):
            inputs, labels, facts = unpack(batch)
            if self.augment is not None:
                if "index" not in facts:
                    raise ConfigError("augmentation needs batches that carry the samples' index")
                inputs = self.augment(inputs, facts["index"], epoch)
            facts["epoch"] = epoch
            faults.reached("step")
            labels = labels.to(self.device) if labels is not None else None
            closes_group = (index + 1) % c.accumulate == 0 or index + 1 == self.steps_per_epoch
            lr = self.scheduler.get_last_lr()[0]  # the rate this step's update (if any) uses
            out = self._forward_backward(move(inputs, self.device), labels, facts, state, closes_group)
            pending += 1
            if closes_group:
                self._update(pending)
                pending = 0
                state["update"] += 1
            scalars = {k: float(v.detach()) for k, v in out.items() if isinstance(v, Tensor) and v.dim() == 0}
            scalars = distributed.mean_over_ranks(scalars, self.world)
            self.running.add(scalars["loss"], out.get("logits"), labels)
            state["batch"] = index + 1
            record = {"epoch": epoch + 1, "batch": index, "step": state["update"], "lr": lr, **scalars}
            self._fire_step(state, record)
            # A stop (Ctrl-C) waits for the end of the accumulation group: a checkpoint taken mid-group
            # would lose the gradients accumulated so far, and the resumed run would differ.
            if closes_group:
                self.stop_requested = distributed.any_rank(self.stop_requested, self.world)
                if self.stop_requested or self._finished(state):
                    return
        if pending:  # data of unknown length ended mid-group: that group is an update too
            self._update(pending)
            state["update"] += 1

    def _fire_step(self, state: dict[str, Any], record: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_step_end(self, state, record)

    def _forward_backward(
        self, inputs: Any, labels: Tensor | None, facts: dict[str, Any], state: dict[str, Any], closes_group: bool
    ) -> Mapping[str, Tensor]:
        """One micro-batch: forward, and backward of its loss (gradients are averaged over the
        group at the update)."""
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        )
        where = f"at step {state['update']} (epoch {state['epoch'] + 1}); the last good checkpoint is kept"
        # DDP and FSDP: gradients are reduced only on the group's last backward.
        no_sync = nullcontext()
        if self.world.distributed and not closes_group and not self.sharded:
            no_sync = self.forward_model.no_sync()
        fsdp.set_gradient_sync(self.model, closes_group)
        keywords = {name: _to(facts[name], self.device) for name in self.facts if name in facts}
        with no_sync:
            try:
                with autocast:
                    out = self.forward_model(inputs, labels, **keywords)
            except NonFiniteLossError as error:  # raised by the Distiller, which names the term
                raise NonFiniteLossError(f"{error} {where}", term=error.term, step=state["update"]) from None
            loss = out["loss"]
            if not torch.isfinite(loss):
                terms = [k for k, v in out.items() if isinstance(v, Tensor) and v.dim() == 0 and not torch.isfinite(v)]
                term = next((t for t in terms if t != "loss"), "loss")
                raise NonFiniteLossError(f"non-finite loss in term {term} {where}", term=term, step=state["update"])
            self.scaler.scale(loss).backward()
        return out

    def _update(self, group_size: int) -> None:
        """The optimizer step on the mean gradient of the group's ``group_size`` batches."""
        if group_size > 1:
            for parameter in self.parameters:
                if parameter.grad is not None:
                    parameter.grad.div_(group_size)
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def _evaluate(self) -> dict[str, float]:
        faults.reached("evaluate")
        record = {}
        with fsdp.root_gathered(self.model):  # the eval model runs without the task's root forward
            for name, data in self.eval_sets.items():
                for metric, value in evaluate(self.eval_model, data, self.eval_batch_size, self.device).items():
                    record[f"{name}/{metric}"] = value
        return record

    def _epoch_line(self, record: dict[str, float]) -> str:
        parts = [f"{self.description} epoch {record['epoch']}/{self.epochs or '?'}"]
        parts += [f"{k} {v:.4f}" for k, v in record.items() if k.endswith("accuracy")]
        parts.append(f"{record['seconds']:.0f}s")
        return "  ".join(parts)

    # -- checkpoints ------------------------------------------------------------------------------

    def _save(self, state: dict[str, Any], history: list[dict[str, float]]) -> None:
        if self.run_dir is None:
            return
        # Sharded: every rank writes its shards and gathers the weights; rank 0 writes the rest.
        sharded = fsdp.save_sharded(self.run_dir, self.model, self.optimizer) if self.sharded else None
        # At an epoch's end: the weights as every callback left them, gathered once (on every rank) for
        # the epoch's weights file and, when SelectBest chose this epoch, the best weights.
        weights = fsdp.full_state_dict(self.eval_model) if state["batch"] == 0 else None
        if not self.writes:
            distributed.barrier(self.world)  # wait until rank 0 has written it
            return
        # Written before the checkpoint that records the epoch: a crash in between redoes the epoch,
        # which writes them again; written after, a crash would leave the last epoch's files stale.
        if weights is not None and self.best_path is not None and state["best_epoch"] == state["epoch"]:
            save_weights(weights, self.best_path)
        if weights is not None:  # the student's weights as of now
            save_weights(weights, self.run_dir / f"{self.weights_name}.safetensors")
        if sharded is not None:
            tensors = {"sharded": sharded}
        else:
            tensors = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        payload = {
            "format": CHECKPOINT_FORMAT,
            **tensors,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), **_cuda_rng()},
            "state": state,
            "history": history,
        }
        save_checkpoint(payload, self.run_dir / "checkpoint.pt")  # from here on the new checkpoint is in force
        if sharded is not None:
            fsdp.remove_unused(self.run_dir, keep=sharded)
        distributed.barrier(self.world)

    def _restore(self) -> tuple[dict[str, Any], list[dict[str, float]]]:
        if self.run_dir is None:
            raise CheckpointError("cannot resume without a run directory")
        path = self.run_dir / "checkpoint.pt"
        payload = load_checkpoint(path)
        if self.sharded != ("sharded" in payload):
            written, now = ("fsdp", "ddp") if "sharded" in payload else ("ddp", "fsdp")
            raise CheckpointError(f"{path}: written with train.strategy {written}; it cannot resume under {now}")
        if self.sharded:
            fsdp.load_sharded(self.run_dir / str(payload["sharded"]), self.model, self.optimizer)
            if self.writes:
                fsdp.remove_unused(self.run_dir, keep=str(payload["sharded"]))  # half-written by a crash
        try:
            if not self.sharded:
                self.model.load_state_dict(payload["model"])
                self.optimizer.load_state_dict(payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
            self.scaler.load_state_dict(payload["scaler"])
        except (RuntimeError, ValueError, KeyError) as error:
            first = str(error).strip().splitlines()[0]
            raise CheckpointError(f"{path}: does not fit this run's models or settings: {first}") from None
        try:
            torch.set_rng_state(payload["rng"]["torch"])
            if "cuda" in payload["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
            state, history = dict(payload["state"]), list(payload["history"])
            missing = {"epoch", "batch", "update", "best_accuracy", "best_epoch", "stale"} - set(state)
            if missing:
                raise KeyError(sorted(missing)[0])
        except (RuntimeError, TypeError, ValueError, KeyError) as error:
            raise CheckpointError(f"{path}: its RNG state or position is damaged ({type(error).__name__})") from None
        return state, history


class _Running:
    def __init__(self) -> None:
        self.loss_sum, self.loss_count, self.correct, self.seen = 0.0, 0, 0, 0

    def add(self, loss: float, logits: Any, labels: Tensor | None) -> None:
        self.loss_sum += loss
        self.loss_count += 1
        if not isinstance(logits, Tensor) or labels is None:
            return
        logits = logits.detach()
        if logits.dim() == 2 and labels.dim() == 1 and logits.shape[0] == labels.shape[0]:
            self.correct += int((logits.argmax(-1) == labels).sum())
            self.seen += labels.numel()

    def postfix(self) -> dict[str, str]:
        out = {"loss": f"{self.loss_sum / max(1, self.loss_count):.4f}"}
        if self.seen:
            out["acc"] = f"{self.correct / self.seen:.3f}"
        return out


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


def _cuda_rng() -> dict[str, Any]:
    return {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
