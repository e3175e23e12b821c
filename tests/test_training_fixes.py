"""Gradient accumulation, stops mid-group, devices, damaged RNG state and rank-0 decisions."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kdistill import distributed
from kdistill.checkpoint import load_checkpoint, save_checkpoint
from kdistill.config import TrainConfig
from kdistill.core.errors import CheckpointError, ConfigError
from kdistill.data import TensorData
from kdistill.pipeline import Supervised
from kdistill.trainer import Trainer, pick_device
from tests.test_trainer import assert_same, toy_data, toy_model


def plain_model() -> nn.Module:
    """No dropout: a hand-written reference can follow it exactly."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4))


def trainer_for(model, run_dir=None, data=None, **overrides) -> Trainer:
    task = Supervised(model)
    settings = {"epochs": 3, "lr": 1e-2, "seed": 3, **overrides}
    return Trainer(task, task.parameters(), data or toy_data(), TrainConfig(**settings), batch_size=16, run_dir=run_dir)


def test_cosine_schedule_counts_every_update_so_the_last_one_still_learns(tmp_path):
    # 96 samples / 16 = 6 batches per epoch; accumulate 4 → 2 updates per epoch (4 + 2 batches).
    trainer = trainer_for(toy_model(), tmp_path, accumulate=4, schedule="cosine")
    trainer.fit()
    assert trainer.total_updates == 6
    assert trainer.scheduler.last_epoch == trainer.total_updates
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    update_lrs = [r["lr"] for r in steps if r["kind"] == "step" and (r["batch"] in (3, 5))]
    assert len(update_lrs) == 6
    assert all(lr > 1e-4 for lr in update_lrs), update_lrs  # none ran at learning rate 0


def test_a_short_last_group_is_the_mean_of_its_own_batches():
    """6 batches with accumulate 4: the epoch's second update is the mean gradient of 2 batches."""
    data = toy_data()
    data = TensorData(data.inputs.double(), data.labels)
    model = plain_model().double()
    reference = plain_model().double()
    trainer = trainer_for(
        model,
        data=data,
        epochs=1,
        accumulate=4,
        optimizer="sgd",
        momentum=0.0,
        weight_decay=0.0,
        schedule="constant",
        lr=0.1,
    )
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(3 * 1_000_003 + 0))
    trainer.fit()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for group in (order[:64], order[64:]):
        optimizer.zero_grad()
        losses = [
            nn.functional.cross_entropy(reference(data.inputs[batch]), data.labels[batch]) for batch in group.split(16)
        ]
        (sum(losses) / len(losses)).backward()
        optimizer.step()
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


class SigintAt(nn.Module):
    """A task that sends this process SIGINT at its ``at``-th training call, like a Ctrl-C."""

    def __init__(self, task: nn.Module, at: int) -> None:
        super().__init__()
        self.task, self.at, self.calls = task, at, 0

    def forward(self, inputs, labels=None):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), signal.SIGINT)
        return self.task(inputs, labels)


@pytest.mark.parametrize("accumulate", [2, 3])
def test_ctrl_c_at_any_step_of_a_group_resumes_bit_identically(tmp_path, accumulate):
    reference = trainer_for(toy_model(), accumulate=accumulate)
    reference.fit()
    for at in range(1, 18):  # 6 batches × 3 epochs: every instant
        run_dir = tmp_path / f"stop-{at}"
        model = toy_model()
        task = SigintAt(Supervised(model), at)
        first = Trainer(
            task, task.parameters(), toy_data(), reference.config, batch_size=16, run_dir=run_dir, eval_model=model
        )
        result = first.fit()
        assert result.interrupted, at
        resumed_model = toy_model()
        task = SigintAt(Supervised(resumed_model), at=0)  # never fires; the same state-dict keys
        resumed = Trainer(
            task,
            task.parameters(),
            toy_data(),
            reference.config,
            batch_size=16,
            run_dir=run_dir,
            eval_model=resumed_model,
        )
        resumed.fit(resume=True)
        assert_same(reference.model.model.state_dict(), resumed_model.state_dict())


def test_a_device_that_is_not_there_is_one_clear_error():
    with pytest.raises(ConfigError, match="not a device"):
        pick_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device("cuda")
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device("cuda:1")
    assert pick_device("cpu") == torch.device("cpu")


def test_a_damaged_rng_state_in_a_checkpoint_is_named(tmp_path):
    trainer_for(toy_model(), tmp_path, epochs=1).fit()
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    payload["rng"]["torch"] = torch.zeros(7, dtype=torch.uint8)
    save_checkpoint(payload, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="RNG state"):
        trainer_for(toy_model(), tmp_path, epochs=2).fit(resume=True)


def test_process_group_has_a_backend_for_the_cpu_collectives():
    assert distributed.backend_for(cuda=False) == "gloo"
    # On GPUs kdistill's CPU tensors (logged means, stop flags, the teacher broadcast) go to gloo.
    assert distributed.backend_for(cuda=True) == "cpu:gloo,cuda:nccl"


def _early_stop_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Each rank evaluates a different validation set: rank-local decisions would disagree.
        task = Supervised(toy_model())
        trainer = Trainer(
            task,
            task.parameters(),
            toy_data(),
            TrainConfig(epochs=8, lr=0.05, seed=3, early_stopping=1),
            batch_size=16,
            eval_model=task.model,
            eval_sets={"validation": toy_data(16, seed=10 + rank)},
        )
        result = trainer.fit()
        del trainer, task  # DDP's reducer goes before the process group it uses
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump({"epochs": len(result.history), "best": result.best_epoch}, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_early_stopping_is_decided_once_for_all_ranks(tmp_path):
    from tests.conftest import spawn_or_fail

    hang = "the ranks hung: they disagreed about stopping"
    spawn_or_fail(_early_stop_worker, (2, str(tmp_path / "init"), str(tmp_path)), 120, hang)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]


def test_a_crash_once_the_last_checkpoint_is_written_leaves_the_last_epochs_weights(tmp_path, monkeypatch):
    from kdistill import trainer as trainer_module
    from kdistill.checkpoint import read_state_dict

    trainer_for(toy_model(), tmp_path / "whole", epochs=2).fit()
    save_checkpoint, saved = trainer_module.save_checkpoint, []

    def crash_after_the_last(payload, path):
        save_checkpoint(payload, path)
        saved.append(payload["state"]["epoch"])
        if payload["state"]["epoch"] == 2:  # in force now: the process dies before anything else
            raise SystemExit("killed")

    monkeypatch.setattr(trainer_module, "save_checkpoint", crash_after_the_last)
    with pytest.raises(SystemExit):
        trainer_for(toy_model(), tmp_path / "crashed", epochs=2).fit()
    monkeypatch.setattr(trainer_module, "save_checkpoint", save_checkpoint)
    trainer_for(toy_model(), tmp_path / "crashed", epochs=2).fit(resume=True)  # finished: nothing left to run
    assert saved == [1, 2]
    want = read_state_dict(tmp_path / "whole" / "student.safetensors")
    got = read_state_dict(tmp_path / "crashed" / "student.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key  # the same process, machine and seed: the same bits
