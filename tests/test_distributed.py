"""Two CPU processes with gloo take the same steps as one process on the same global batch."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from kdistill import Distiller, FeaturePair
from kdistill.config import TrainConfig
from kdistill.data import TensorData
from kdistill.trainer import Trainer


class Net(nn.Module):
    """No batch norm: its statistics are per rank under DDP, which would break exact equality."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU())
        self.fc = nn.Linear(2 * width * 16, 5)

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x)).flatten(1))


class Recording(Distiller):
    """Remembers the feature term that this rank computed at every step."""

    seen: list[float]

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.seen.append(float(out["feature/conv2->conv2"].detach()))
        return out


def make(run_dir, epochs: int):
    torch.manual_seed(0)
    teacher, student = Net(8).eval(), Net(3)
    generator = torch.Generator().manual_seed(1)
    data = TensorData(torch.randn(64, 1, 8, 8, generator=generator), torch.randint(0, 5, (64,), generator=generator))
    distiller = Recording(teacher, student, [FeaturePair("conv2", "conv2")], sample_input=data.inputs[:2])
    distiller.seen = []
    config = TrainConfig(epochs=epochs, lr=0.01, schedule="constant", seed=3)
    trainer = Trainer(distiller, distiller.trainable_parameters(), data, config, batch_size=16, run_dir=run_dir)
    return trainer, distiller


def worker(rank: int, world: int, init_file: str, run_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer, distiller = make(run_dir, epochs=2)
        assert isinstance(trainer.forward_model, nn.parallel.DistributedDataParallel)
        trainer.fit()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump({"feature": distiller.seen, "batch_rows": 16 // world}, handle)
    finally:
        dist.destroy_process_group()


def step_losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "step"]


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume_in_one(tmp_path):
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    single, _ = make(single_dir, epochs=2)
    single.fit()

    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(multi_dir), str(tmp_path)), nprocs=2, join=True)

    # The loss logged at each step (the mean over ranks) equals the one-process loss.
    torch.testing.assert_close(
        torch.tensor(step_losses(multi_dir)), torch.tensor(step_losses(single_dir)), rtol=1e-4, atol=1e-5
    )
    # Every rank computed a non-zero, finite feature term at every step: hooks work under DDP.
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())["feature"]
        assert len(seen) == 8 and all(0 < value < float("inf") for value in seen)
    # The final student matches the one-process run.
    want, got = load_file(str(single_dir / "student.safetensors")), load_file(str(multi_dir / "student.safetensors"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    # Only rank 0 wrote: one metrics file, one checkpoint, no DDP prefixes in it.
    checkpoint = torch.load(multi_dir / "checkpoint.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in checkpoint["model"])

    # The two-process checkpoint resumes in one process and ends where a one-process run ends.
    resumed, _ = make(multi_dir, epochs=3)
    resumed.fit(resume=True)
    reference, _ = make(tmp_path / "reference", epochs=3)
    reference.fit()
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torchrun_runs_the_cli_with_two_processes(tmp_path):
    import subprocess
    import sys

    from tests.test_cli import TINY

    env = {**os.environ, "KDISTILL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "kdistill",
        "train",
        "/dev/null",
        "--out",
        str(tmp_path / "run"),
        *TINY,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| student |") == 1  # rank 0 alone reports
    assert (tmp_path / "run" / "report.json").exists()
    assert len(list((tmp_path / "run").rglob("metrics.jsonl"))) == 3  # teacher, baseline, distill: once each


def _failing_on_main_worker(rank: int, init_file: str, tmp: str) -> None:
    from kdistill import distributed
    from kdistill.core.errors import KDistillError

    def unreadable() -> str:
        raise PermissionError("cache directory is not writable")

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        distributed.main_decides(distributed.world(), unreadable)
    except (KDistillError, PermissionError) as error:
        with open(os.path.join(tmp, f"rank{rank}"), "w") as handle:
            handle.write(f"{type(error).__name__}: {error}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_an_unexpected_error_on_rank_0_reaches_every_rank(tmp_path):
    """~5 s. Rank 0 raises its own error; the others learn of it instead of waiting in the broadcast."""
    from tests.conftest import spawn_or_fail

    hang = "rank 1 waited forever for rank 0"
    spawn_or_fail(_failing_on_main_worker, (str(tmp_path / "init"), str(tmp_path)), 60, hang)
    assert (tmp_path / "rank0").read_text() == "PermissionError: cache directory is not writable"
    assert (tmp_path / "rank1").read_text() == (
        "KDistillError: rank 0 failed: PermissionError: cache directory is not writable"
    )
