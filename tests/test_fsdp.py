"""``train.strategy: fsdp``: two CPU processes (gloo) shard a tiny Llama student and teacher and take
the same steps as one process; sharded checkpoints resume at another world size."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdistill import Distiller, FeaturePair, fsdp
from kdistill.callbacks import Callback
from kdistill.checkpoint import read_state_dict
from kdistill.config import TrainConfig, from_dict
from kdistill.core.errors import CheckpointError, ConfigError
from kdistill.data import TensorData
from kdistill.trainer import Trainer
from tests.lm_models import llama

PAIR = "feature/model.layers.1->model.layers.3"
BATCH = 8


def data() -> TensorData:
    ids = torch.randint(0, 64, (32, 6), generator=torch.Generator().manual_seed(1))
    return TensorData(ids, ids)  # a causal LM's labels are its input ids


def make(run_dir, epochs: int, strategy: str = "fsdp") -> tuple[Trainer, Distiller]:
    """The same job in every process: a Llama student distilled from a wider one, one feature pair."""
    teacher = llama(1, hidden=32, exact=False).eval()
    student = llama(2, exact=False)
    if fsdp.active(strategy):
        fsdp.shard(teacher, torch.device("cpu"), None)
    torch.manual_seed(3)
    train = data()
    pairs = [FeaturePair("model.layers.1", "model.layers.3")]
    distiller = Distiller(teacher, student, pairs, sample_input=train.inputs[:2])
    config = TrainConfig(epochs=epochs, lr=0.01, schedule="constant", seed=3, device="cpu", strategy=strategy)
    parameters = distiller.trainable_parameters()
    trainer = Trainer(distiller, parameters, train, config, batch_size=BATCH, eval_model=student, run_dir=run_dir)
    return trainer, distiller


def full_batch_features(distiller: Distiller) -> float:
    """The feature term on one whole batch (the same on every rank), before any training."""
    with torch.no_grad():
        ids = data().inputs[:BATCH]
        return float(distiller(ids, ids)[PAIR])


def worker(rank: int, world: int, init_file: str, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer, distiller = make(os.path.join(tmp, "multi"), epochs=2)
        feature = full_batch_features(distiller)
        trainer.fit()
        student = list(distiller.student.parameters())
        report = {
            "feature": feature,
            "sharded": all(isinstance(p, torch.distributed.tensor.DTensor) for p in student),
            "param_bytes": fsdp.local_bytes(student),
            "optimizer_bytes": fsdp.optimizer_state_bytes(trainer.optimizer),
        }
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as handle:
            json.dump(report, handle)
        # A one-process sharded checkpoint resumes here, in two.
        resumed, _ = make(os.path.join(tmp, "single"), epochs=3)
        resumed.fit(resume=True)
    finally:
        dist.destroy_process_group()


def step_losses(run_dir, key: str = "loss", kind: str = "step") -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in lines if r["kind"] == kind]


def assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_sharded_processes_match_one_and_resume_at_another_world_size(tmp_path):
    """~25 s: one two-process spawn, four short one-process runs."""
    reference, plain = make(tmp_path / "reference", epochs=2, strategy="ddp")
    feature = full_batch_features(plain)
    reference.fit()
    after_two = read_state_dict(tmp_path / "reference" / "student.safetensors")
    make(tmp_path / "single", epochs=1)[0].fit()  # one process, sharded checkpoint format

    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    # The loss logged at every step (the mean over ranks) is the one-process loss.
    torch.testing.assert_close(
        torch.tensor(step_losses(tmp_path / "multi")),
        torch.tensor(step_losses(tmp_path / "reference")),
        rtol=1e-4,
        atol=0,
    )
    # Feature pairs on sharded blocks see whole activations: the one-process value.
    for rank in ranks:
        assert rank["sharded"]
        assert rank["feature"] == pytest.approx(feature, rel=1e-5)
    # Each rank holds about half of the student's parameters and of its optimizer state (AdamW: two
    # moments per parameter, plus a step counter per tensor).
    student = list(plain.student.parameters())
    full = fsdp.local_bytes(student)
    for rank in ranks:
        assert 0.45 * full <= rank["param_bytes"] <= 0.55 * full
        assert 0.45 * 2 * full <= rank["optimizer_bytes"] <= 0.55 * 2 * full + 4 * len(student) * 8
    # The student exported whole by rank 0 is the one-process student, and runs as a plain model.
    exported = read_state_dict(tmp_path / "multi" / "student.safetensors")
    assert_same_weights(exported, after_two)
    model = llama(0, exact=False).eval()
    model.load_state_dict(exported)
    ids = data().inputs[:4]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference.eval_model.eval()(ids).logits, rtol=1e-4, atol=1e-5)

    # Both checkpoints end where an uninterrupted one-process run ends: two processes → one, one → two.
    reference, _ = make(tmp_path / "reference", epochs=3, strategy="ddp")
    reference.fit(resume=True)
    want = read_state_dict(tmp_path / "reference" / "student.safetensors")
    (tmp_path / "multi" / "checkpoint-halfwritten.dcp").mkdir()  # left by a crash: not named, removed
    resumed, _ = make(tmp_path / "multi", epochs=3)
    resumed.fit(resume=True)
    assert not (tmp_path / "multi" / "checkpoint-halfwritten.dcp").exists()
    assert len(list((tmp_path / "multi").glob("checkpoint-*.dcp"))) == 1
    assert_same_weights(read_state_dict(tmp_path / "multi" / "student.safetensors"), want)
    assert_same_weights(read_state_dict(tmp_path / "single" / "student.safetensors"), want)


def test_a_checkpoint_resumes_only_under_its_own_strategy(tmp_path):
    make(tmp_path / "run", epochs=1, strategy="ddp")[0].fit()
    with pytest.raises(CheckpointError, match=r"written with train\.strategy ddp; it cannot resume under fsdp"):
        make(tmp_path / "run", epochs=2, strategy="fsdp")[0].fit(resume=True)


def test_strategy_is_validated():
    with pytest.raises(ConfigError, match=r"train.strategy must be one of 'ddp', 'fsdp'"):
        from_dict({"train": {"strategy": "zero3"}})
    with pytest.raises(ConfigError, match="cannot read a teacher-output cache"):
        from_dict({"train": {"strategy": "fsdp"}, "distill": {"teacher_cache": "/tmp/somewhere"}})
    assert from_dict({"train": {"strategy": "fsdp"}}).train.strategy == "fsdp"


@pytest.mark.slow
def test_torchrun_trains_the_cli_sharded(tmp_path):
    """~25 s: teacher, baseline and distilled student of the tiny digits config, each phase sharded."""
    import subprocess
    import sys

    from tests.test_cli import TINY

    env = {**os.environ, "KDISTILL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "kdistill", "train"]
    command += ["/dev/null", "--out", str(tmp_path / "run"), *TINY, "--set", "train.strategy=fsdp"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher cache: off (train.strategy fsdp runs the sharded teacher live)" in result.stderr
    assert result.stdout.count("| student |") == 1  # rank 0 alone reports, on plain models
    for phase in ("teacher", "baseline", "distill"):
        assert len(list((tmp_path / "run" / phase).glob("checkpoint-*.dcp"))) == 1
    # The exported weights are whole: they load into the plain student the config builds.
    from kdistill.models import build_model

    student = build_model("cnn", {"channels": [2, 4]}, input_shape=(1, 8, 8), num_classes=10)
    student.load_state_dict(read_state_dict(tmp_path / "run" / "distill" / "student.safetensors"))
    assert read_state_dict(tmp_path / "run" / "distill" / "adapters.safetensors")


class Stack(torch.nn.Module):
    """Blocks in a ``ModuleList`` and a head beside them: the head lands in the task's root group."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


class StopAfter(Callback):
    """A Ctrl-C at update ``update``: the trainer checkpoints and returns."""

    def __init__(self, update: int) -> None:
        self.update = update

    def on_step_end(self, trainer, state, record) -> None:
        if state["update"] == self.update:
            trainer.stop_requested = True


class ShrinkAtEpochEnd(Callback):
    """A user's callback that edits the weights once an epoch is evaluated (as pruning would)."""

    def on_epoch_end(self, trainer, state, record) -> bool:
        with torch.no_grad():
            for parameter in trainer.eval_model.parameters():
                parameter.mul_(0.9)
        return False


def evaluated_run(run_dir, strategy: str, stop_after: int | None = None, resume: bool = False) -> None:
    """Two epochs of a plain classifier, evaluated after each outside the task's own forward; a
    callback edits the weights at each epoch's end."""
    from kdistill.pipeline import Supervised

    torch.manual_seed(0)
    model = Stack()
    if fsdp.active(strategy):
        fsdp.shard(model, torch.device("cpu"), None, root=False)
    task = Supervised(model)
    generator = torch.Generator().manual_seed(1)
    train = TensorData(torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator))
    config = TrainConfig(epochs=2, lr=0.01, schedule="constant", seed=0, device="cpu", strategy=strategy)
    trainer = Trainer(
        task,
        task.parameters(),
        train,
        config,
        batch_size=8,
        eval_model=model,
        eval_sets={"validation": train},
        run_dir=run_dir,
        callbacks=[ShrinkAtEpochEnd(), *([StopAfter(stop_after)] if stop_after is not None else [])],
    )
    trainer.fit(resume=resume)


def evaluated_worker(rank: int, init_file: str, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        evaluated_run(os.path.join(tmp, "multi"), "fsdp")
        # Stopped after an epoch's last update, a resumed run evaluates before any forward of its task.
        evaluated_run(os.path.join(tmp, "resumed"), "fsdp", stop_after=4)
        evaluated_run(os.path.join(tmp, "resumed"), "fsdp", resume=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_sharded_model_is_evaluated_with_its_root_parameters_gathered(tmp_path):
    """~10 s. Evaluation calls the model, not the task: its head, in the root group, is gathered for it."""
    evaluated_run(tmp_path / "single", "ddp")
    mp.spawn(evaluated_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for key in ("validation/loss", "validation/accuracy"):
        want = step_losses(tmp_path / "single", key, kind="epoch")
        assert len(want) == 2
        for run in ("multi", "resumed"):
            got = step_losses(tmp_path / run, key, kind="epoch")
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=0)
    # The best epoch's weights and the last epoch's, gathered by both ranks after every callback,
    # written whole by rank 0.
    for name in ("student_best.safetensors", "student.safetensors"):
        assert_same_weights(read_state_dict(tmp_path / "multi" / name), read_state_dict(tmp_path / "single" / name))


def test_float16_is_refused_with_what_to_set():
    with pytest.raises(ConfigError, match=r"set train\.amp to bf16 or off"):
        fsdp.shard(torch.nn.Linear(2, 2), torch.device("cpu"), torch.float16)


def test_an_epochs_weights_are_gathered_once_for_the_best_and_the_weights_file(tmp_path, monkeypatch):
    from kdistill.pipeline import Supervised

    gathered = []
    full_state_dict = fsdp.full_state_dict
    monkeypatch.setattr(fsdp, "full_state_dict", lambda model: gathered.append(1) or full_state_dict(model))
    torch.manual_seed(0)
    model = Stack()
    task = Supervised(model)
    train = TensorData(torch.randn(16, 8), torch.randint(0, 3, (16,)))
    config = TrainConfig(epochs=2, lr=0.01, seed=0, device="cpu", strategy="fsdp")
    trainer = Trainer(
        task, task.parameters(), train, config, batch_size=8, eval_model=model, eval_sets={"validation": train},
        run_dir=tmp_path,
    )  # fmt: skip
    trainer.fit()
    # One gather per epoch's end, whether or not it is the best so far (epoch 1 always is): the best
    # weights and the epoch's weights file share it.
    assert len(gathered) == 2
    assert (tmp_path / "student_best.safetensors").exists() and (tmp_path / "student.safetensors").exists()
