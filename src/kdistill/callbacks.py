"""What happens around the training loop, as small objects the loop calls (minGPT's and Hugging
Face's idea): metric writers, the progress bar, best-epoch selection with early stopping, and the
Ctrl-C handler. None of them knows about distillation, caches or the run's file layout beyond
the directory it was given.

A callback implements any of ``on_fit_start(trainer, state)``, ``on_epoch_start(trainer, state)``,
``on_step_end(trainer, state, record)`` (``record``: the step's logged scalars),
``on_epoch_end(trainer, state, record)`` (the epoch's evaluation; return True to stop training)
and ``on_fit_end(trainer, state)``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class Callback:
    """Does nothing; subclasses override what they need."""

    def on_fit_start(self, trainer: Any, state: dict[str, Any]) -> None: ...

    def on_epoch_start(self, trainer: Any, state: dict[str, Any]) -> None: ...

    def on_step_end(self, trainer: Any, state: dict[str, Any], record: dict[str, float]) -> None: ...

    def on_epoch_end(self, trainer: Any, state: dict[str, Any], record: dict[str, float]) -> bool:
        return False

    def on_fit_end(self, trainer: Any, state: dict[str, Any]) -> None: ...


class MetricsWriter(Callback):
    """``metrics.jsonl`` (one JSON object per step and per epoch) and TensorBoard events in ``run_dir``.

    On resume, records written after the checkpoint are dropped: they will be written again."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.handle = None
        self.tensorboard = None

    def on_fit_start(self, trainer: Any, state: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if trainer.resumed and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if _before(json.loads(line), state["epoch"], state["batch"])
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self.handle = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        except ImportError:  # the optional `tensorboard` extra is not installed
            self.tensorboard = None

    def on_step_end(self, trainer: Any, state: dict[str, Any], record: dict[str, float]) -> None:
        self._write({"kind": "step", **record})
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("epoch", "batch", "step"):
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"])

    def on_epoch_end(self, trainer: Any, state: dict[str, Any], record: dict[str, float]) -> bool:
        self._write({"kind": "epoch", "step": state["update"], **record})
        if self.tensorboard is not None:
            for key, value in record.items():
                if "/" in key:
                    self.tensorboard.add_scalar(key, value, record["epoch"])
        return False

    def _write(self, record: dict[str, Any]) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def on_fit_end(self, trainer: Any, state: dict[str, Any]) -> None:
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


class ProgressBar(Callback):
    """A tqdm bar per epoch on stderr with the running loss (and accuracy when logits come out)."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar = None

    def on_epoch_start(self, trainer: Any, state: dict[str, Any]) -> None:
        self.bar = tqdm(
            total=trainer.steps_per_epoch,
            initial=state["batch"],
            desc=f"{self.description} {state['epoch'] + 1}/{trainer.epochs or '?'}",
            leave=False,
            disable=None,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def on_step_end(self, trainer: Any, state: dict[str, Any], record: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(trainer.running.postfix(), refresh=False)

    def on_epoch_end(self, trainer: Any, state: dict[str, Any], record: dict[str, float]) -> bool:
        self.close()
        return False

    def on_fit_end(self, trainer: Any, state: dict[str, Any]) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class SelectBest(Callback):
    """Keeps the epoch with the best ``select_on`` accuracy in ``state["best_epoch"]`` (the trainer
    writes its weights when it saves the epoch, after every callback) and stops after ``patience``
    epochs without a better one. ``select_on`` None: the last epoch is the chosen one."""

    def __init__(self, select_on: str | None, patience: int | None) -> None:
        self.select_on, self.patience = select_on, patience

    def on_epoch_end(self, trainer: Any, state: dict[str, Any], record: dict[str, float]) -> bool:
        if self.select_on is None:
            state["best_epoch"] = record["epoch"]
            return False
        accuracy = record[f"{self.select_on}/accuracy"]
        if state["best_accuracy"] is None or accuracy > state["best_accuracy"]:
            state["best_accuracy"], state["best_epoch"], state["stale"] = accuracy, record["epoch"], 0
        else:
            state["stale"] += 1
        if self.patience is not None and state["stale"] >= self.patience:
            trainer.log(
                f"{trainer.description}: early stopping, no better {self.select_on} accuracy for {self.patience} epochs"
            )
            return True
        return False


class SigintRequestsStop:
    """While training, the first Ctrl-C asks the loop to stop at the next safe point (the end of
    the accumulation group), checkpoint and return; a second one interrupts at once."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.previous = None

    def __enter__(self) -> SigintRequestsStop:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum: int, frame: Any) -> None:
        if self.trainer.stop_requested:
            raise KeyboardInterrupt
        self.trainer.stop_requested = True

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
