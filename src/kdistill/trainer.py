"""A training loop that knows nothing about distillation.

The model is any ``nn.Module`` whose ``forward(inputs, labels)`` returns a mapping
with a ``loss`` to backpropagate; every other scalar in that mapping is logged,
and a ``logits`` entry gives the running training accuracy.

Determinism: the batch order of epoch ``e`` comes from a generator seeded by
``(seed, e)``, augmentation is a function of (sample, epoch), and a checkpoint
stores the position inside the epoch with every RNG state, so a resumed run
repeats an uninterrupted one exactly (on the same machine).

A model whose ``forward`` takes ``indices`` / ``epoch`` keywords also receives the
batch's sample indices and the epoch (a distiller reading cached teacher outputs
needs them).
"""

from __future__ import annotations

import inspect
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill import distributed, faults
from kdistill.checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint, save_weights
from kdistill.config import TrainConfig
from kdistill.data import TensorData, move
from kdistill.errors import CheckpointError, ConfigError, NonFiniteLossError

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


@torch.inference_mode()
def evaluate(
    model: nn.Module, data: TensorData, batch_size: int, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` (logits out) on ``data``."""
    from kdistill.distiller import call_model, default_logits

    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for inputs, labels in data.batches(batch_size):
        inputs, labels = move(inputs, device), labels.to(device)
        logits = default_logits(call_model(model, inputs)).float()
        correct += int((logits.argmax(-1) == labels).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    model.train(was_training)
    return {"accuracy": correct / len(data), "loss": loss / len(data)}


class Trainer:
    """Trains ``model`` on ``train_data`` with the optimiser and schedule of ``config``.

    Args:
        model: returns a mapping with ``loss`` from ``model(inputs, labels)``.
        parameters: what the optimiser trains (e.g. ``distiller.trainable_parameters()``).
        train_data: the training split.
        config: optimiser, schedule, epochs, clipping, accumulation, AMP, seed.
        eval_model: maps inputs to logits for evaluation (default ``model``), e.g. the student.
        eval_sets: named splits evaluated after every epoch, e.g. ``validation`` and ``test``.
        select_on: the eval set whose accuracy picks the best epoch and drives early
            stopping; never the test set in an honest run. ``None``: the last epoch is kept.
        augment: ``(inputs, indices, epoch) -> inputs`` applied to each training batch, e.g.
            :class:`kdistill.data.ShiftViews`; a pure function of its arguments.
        run_dir: where ``checkpoint.pt``, ``<weights_name>.safetensors`` (the eval model after the
            last epoch), ``<weights_name>_best.safetensors``, ``metrics.jsonl`` and TensorBoard
            events go; ``None`` writes nothing.
        log: receives one human-readable line per epoch (e.g. ``print``); ``None`` is silent.
    """

    def __init__(
        self,
        model: nn.Module,
        parameters: Iterable[nn.Parameter],
        train_data: TensorData,
        config: TrainConfig,
        *,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        eval_model: nn.Module | None = None,
        eval_sets: Mapping[str, TensorData] | None = None,
        select_on: str | None = "validation",
        augment: Callable[[Tensor, Tensor, int], Tensor] | None = None,
        run_dir: str | Path | None = None,
        log: Callable[[str], None] | None = None,
        description: str = "train",
        weights_name: str = "student",
    ) -> None:
        self.model = model
        self.config = config
        self.train_data = train_data
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.eval_model = eval_model if eval_model is not None else model
        self.eval_sets = dict(eval_sets or {})
        self.select_on = select_on if select_on in self.eval_sets else None
        self.augment = augment
        accepted = inspect.signature(model.forward).parameters
        self.batch_keywords = [name for name in ("indices", "epoch") if name in accepted]
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.world = distributed.world()
        self.writes = self.run_dir is not None and self.world.is_main  # rank 0 alone writes
        self.log = (log or (lambda line: None)) if self.world.is_main else (lambda line: None)
        self.description = description
        self.weights_name = weights_name
        self.device = pick_device(config.device)
        self.model.to(self.device)
        self.eval_model.to(self.device)
        # Only what the optimizer trains is wrapped: a distiller's teacher is not a submodule.
        self.forward_model = (
            torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.index is not None else None
            )
            if self.world.distributed
            else model
        )
        self.parameters = [p for p in parameters if p.requires_grad]
        self.optimizer = self._optimizer()
        self.steps_per_epoch = math.ceil(len(train_data) / batch_size)
        # Each epoch ends with an update, so a last group shorter than `accumulate` is an update too.
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / config.accumulate)
        self.total_updates = self.updates_per_epoch * config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._stop_requested = False

    # -- set-up ------------------------------------------------------------------------------

    def _optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(
                self.parameters, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.momentum > 0
            )
        return torch.optim.AdamW(self.parameters, lr=c.lr, weight_decay=c.weight_decay)

    def _lr_factor(self, update: int) -> float:
        """Linear warm-up, then cosine to 0, steps of ``step_gamma``, or constant."""
        c = self.config
        updates_per_epoch = self.updates_per_epoch
        warmup = c.warmup_epochs * updates_per_epoch
        if update < warmup:
            return (update + 1) / (warmup + 1)
        if c.schedule == "cosine":
            progress = (update - warmup) / max(1.0, self.total_updates - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if c.schedule == "step":
            return c.step_gamma ** int(update // updates_per_epoch // c.step_epochs)
        return 1.0

    def _amp_dtype(self) -> torch.dtype | None:
        mode = self.config.amp
        if self.device.type != "cuda" or mode == "off":
            return None
        if mode == "fp16":
            return torch.float16
        if mode == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainResult:
        """Train for ``config.epochs`` epochs (or resume from ``run_dir/checkpoint.pt``)."""
        c = self.config
        state = {"epoch": 0, "batch": 0, "update": 0, "best_accuracy": None, "best_epoch": None, "stale": 0}
        result = TrainResult()
        if self.writes and self.run_dir.is_dir():
            remove_stale_temporaries(self.run_dir)  # left by a crash inside a checkpoint write
        if resume:
            state, result.history = self._restore()
        else:
            torch.manual_seed(c.seed)
        writer = _MetricsWriter(
            self.run_dir if self.writes else None, (state["epoch"], state["batch"]) if resume else None
        )
        started = time.perf_counter()
        self.model.train()
        try:
            with self._sigint_requests_stop():
                while state["epoch"] < c.epochs and not self._stop_requested:
                    epoch = state["epoch"]
                    self._run_epoch(state, writer)
                    if self._stop_requested:
                        break
                    record = {"epoch": epoch + 1, **self._evaluate(), "seconds": time.perf_counter() - started}
                    # Rank 0's numbers decide the best epoch and early stopping for every rank.
                    record = distributed.main_value(record, self.world)
                    result.history.append(record)
                    writer.epoch(record, state["update"])
                    stop = self._select(state, record)
                    state["epoch"], state["batch"] = epoch + 1, 0
                    self._save(state, result.history)
                    self.log(self._epoch_line(record, state))
                    if stop:
                        self.log(
                            f"{self.description}: early stopping, no better {self.select_on} accuracy "
                            f"for {c.early_stopping} epochs"
                        )
                        break
                if self._stop_requested:
                    self._save(state, result.history)
                    result.interrupted = True
        finally:
            writer.close()
        result.best_epoch, result.best_accuracy = state["best_epoch"], state["best_accuracy"]
        result.seconds = time.perf_counter() - started
        return result

    def _run_epoch(self, state: dict[str, Any], writer: _MetricsWriter) -> None:
        c = self.config
        epoch = state["epoch"]
        order = torch.randperm(len(self.train_data), generator=_generator(c.seed, epoch))
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=state["batch"],
            desc=f"{self.description} {epoch + 1}/{c.epochs}",
            leave=False,
            disable=None if self.world.is_main else True,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        running = _Running()
        for index, global_indices in enumerate(self.train_data.index_batches(self.batch_size, order)):
            if index < state["batch"]:
                continue  # resuming: these batches were trained before the checkpoint
            indices = distributed.shard(global_indices, self.world)
            inputs, labels = self.train_data.take(indices)
            if self.augment is not None:
                inputs = self.augment(inputs, indices, epoch)
            faults.reached("step")
            closes_group = (index + 1) % c.accumulate == 0 or index + 1 == self.steps_per_epoch
            lr = self.scheduler.get_last_lr()[0]  # the rate this step's update (if any) uses
            out = self._step(move(inputs, self.device), labels.to(self.device), indices, state, closes_group)
            scalars = {k: float(v.detach()) for k, v in out.items() if isinstance(v, Tensor) and v.dim() == 0}
            scalars = distributed.mean_over_ranks(scalars, self.world)
            logits = out.get("logits")
            if isinstance(logits, Tensor):
                running.add_accuracy(logits.detach(), labels.to(self.device))
            running.add_loss(scalars["loss"])
            writer.step({"epoch": epoch + 1, "batch": index, "step": state["update"], "lr": lr, **scalars})
            state["batch"] = index + 1
            bar.update(1)
            bar.set_postfix(running.postfix(), refresh=False)
            # A stop (Ctrl-C) waits for the end of the accumulation group: a checkpoint taken mid-group
            # would lose the gradients accumulated so far, and the resumed run would differ.
            if closes_group:
                self._stop_requested = distributed.any_rank(self._stop_requested, self.world)
                if self._stop_requested:
                    break
        bar.close()

    def _step(
        self, inputs: Tensor, labels: Tensor, indices: Tensor, state: dict[str, Any], closes_group: bool
    ) -> Mapping[str, Tensor]:
        """One micro-batch: forward, backward of its share of the group's mean loss, and the
        optimizer update when it ``closes_group`` (the ``accumulate``-th batch, or the epoch's last)."""
        c = self.config
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        )
        where = f"at step {state['update']} (epoch {state['epoch'] + 1}); the last good checkpoint is kept"
        # DDP: gradients are all-reduced only on the group's last backward.
        no_sync = self.forward_model.no_sync() if self.world.distributed and not closes_group else nullcontext()
        with no_sync:
            try:
                with autocast:
                    keywords = {"indices": indices, "epoch": state["epoch"]}
                    out = self.forward_model(inputs, labels, **{k: keywords[k] for k in self.batch_keywords})
            except NonFiniteLossError as error:  # raised by the Distiller, which names the term
                raise NonFiniteLossError(f"{error} {where}", term=error.term, step=state["update"]) from None
            loss = out["loss"]
            if not torch.isfinite(loss):
                terms = [k for k, v in out.items() if isinstance(v, Tensor) and v.dim() == 0 and not torch.isfinite(v)]
                term = next((t for t in terms if t != "loss"), "loss")
                raise NonFiniteLossError(f"non-finite loss in term {term} {where}", term=term, step=state["update"])
            # The group's gradient is the mean over its batches; the epoch's last group may be shorter.
            group_start = state["batch"] - state["batch"] % c.accumulate
            group_size = min(c.accumulate, self.steps_per_epoch - group_start)
            self.scaler.scale(loss / group_size).backward()
        if closes_group:
            if c.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.parameters, c.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            state["update"] += 1
        return out

    def _evaluate(self) -> dict[str, float]:
        faults.reached("evaluate")
        record = {}
        for name, data in self.eval_sets.items():
            for metric, value in evaluate(self.eval_model, data, self.eval_batch_size, self.device).items():
                record[f"{name}/{metric}"] = value
        return record

    def _select(self, state: dict[str, Any], record: dict[str, float]) -> bool:
        """Update the best epoch; return True when early stopping says stop."""
        if self.select_on is None:
            state["best_epoch"] = record["epoch"]
            return False
        accuracy = record[f"{self.select_on}/accuracy"]
        if state["best_accuracy"] is None or accuracy > state["best_accuracy"]:
            state["best_accuracy"], state["best_epoch"], state["stale"] = accuracy, record["epoch"], 0
            if self.writes:
                save_weights(self.eval_model.state_dict(), self.run_dir / f"{self.weights_name}_best.safetensors")
        else:
            state["stale"] += 1
        patience = self.config.early_stopping
        return patience is not None and state["stale"] >= patience

    def _epoch_line(self, record: dict[str, float], state: dict[str, Any]) -> str:
        parts = [f"{self.description} epoch {record['epoch']}/{self.config.epochs}"]
        parts += [f"{k} {v:.4f}" for k, v in record.items() if k.endswith("accuracy")]
        parts.append(f"{record['seconds']:.0f}s")
        return "  ".join(parts)

    # -- checkpoints ------------------------------------------------------------------------------

    def _save(self, state: dict[str, Any], history: list[dict[str, float]]) -> None:
        if not self.writes:
            distributed.barrier(self.world)  # wait until rank 0 has written it
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), **_cuda_rng()},
            "state": state,
            "history": history,
        }
        save_checkpoint(payload, self.run_dir / "checkpoint.pt")
        if state["batch"] == 0:  # epoch boundary: the student's weights as of now
            save_weights(self.eval_model.state_dict(), self.run_dir / f"{self.weights_name}.safetensors")
        distributed.barrier(self.world)

    def _restore(self) -> tuple[dict[str, Any], list[dict[str, float]]]:
        if self.run_dir is None:
            raise CheckpointError("cannot resume without a run directory")
        path = self.run_dir / "checkpoint.pt"
        payload = load_checkpoint(path)
        try:
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

    # -- Ctrl-C ------------------------------------------------------------------------------

    def _sigint_requests_stop(self):
        """While training, the first Ctrl-C finishes the current step, checkpoints and returns;
        a second one interrupts at once."""
        trainer = self

        class Handler:
            def __enter__(self):
                self.previous = None
                if threading.current_thread() is threading.main_thread():
                    self.previous = signal.signal(signal.SIGINT, self.handle)
                return self

            def handle(self, signum, frame):
                if trainer._stop_requested:
                    raise KeyboardInterrupt
                trainer._stop_requested = True

            def __exit__(self, *exc):
                if self.previous is not None:
                    signal.signal(signal.SIGINT, self.previous)

        return Handler()


class _Running:
    def __init__(self) -> None:
        self.loss_sum, self.loss_count, self.correct, self.seen = 0.0, 0, 0, 0

    def add_loss(self, value: float) -> None:
        self.loss_sum += value
        self.loss_count += 1

    def add_accuracy(self, logits: Tensor, labels: Tensor) -> None:
        if logits.dim() == 2 and labels.dim() == 1 and logits.shape[0] == labels.shape[0]:
            self.correct += int((logits.argmax(-1) == labels).sum())
            self.seen += labels.numel()

    def postfix(self) -> dict[str, str]:
        out = {"loss": f"{self.loss_sum / max(1, self.loss_count):.4f}"}
        if self.seen:
            out["acc"] = f"{self.correct / self.seen:.3f}"
        return out


class _MetricsWriter:
    """``metrics.jsonl`` (one JSON object per step and per epoch) and TensorBoard events."""

    def __init__(self, run_dir: Path | None, keep_through: tuple[int, int] | None) -> None:
        self.path = run_dir / "metrics.jsonl" if run_dir is not None else None
        self.handle = None
        self.tensorboard = None
        if self.path is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if keep_through is not None and self.path.exists():
            # Resuming: drop records written after the checkpoint, they will be written again.
            kept = [line for line in self.path.read_text().splitlines() if _before(json.loads(line), *keep_through)]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self.handle = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # the optional `tensorboard` extra is not installed
            self.tensorboard = None

    def step(self, record: dict[str, float]) -> None:
        self._write({"kind": "step", **record})
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("epoch", "batch", "step"):
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"])

    def epoch(self, record: dict[str, float], step: int) -> None:
        self._write({"kind": "epoch", "step": step, **record})
        if self.tensorboard is not None:
            for key, value in record.items():
                if "/" in key:
                    self.tensorboard.add_scalar(key, value, record["epoch"])

    def _write(self, record: dict[str, Any]) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _before(record: dict[str, Any], epochs_done: int, batches_done: int) -> bool:
    """Was ``record`` written before a checkpoint taken after ``epochs_done`` epochs and
    ``batches_done`` batches of the next one?"""
    if record.get("kind") == "epoch":
        return record["epoch"] <= epochs_done
    return record["epoch"] <= epochs_done or (record["epoch"] == epochs_done + 1 and record["batch"] < batches_done)


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _cuda_rng() -> dict[str, Any]:
    return {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
