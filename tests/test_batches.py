"""The trainer consumes batches: user DataLoaders (with workers), iterable data with max_steps,
mapping batches, and facts that reach a task only when it declares them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from kdistill.batches import EpochBatchSampler, make_loader, unpack
from kdistill.config import TrainConfig
from kdistill.core.errors import ConfigError
from kdistill.data import TensorData
from kdistill.distributed import World
from kdistill.pipeline import Supervised
from kdistill.trainer import Trainer
from tests.test_trainer import assert_same, toy_data, toy_model
from tests.test_training_fixes import SigintAt


def tensors() -> TensorDataset:
    data = toy_data()
    return TensorDataset(data.inputs, data.labels)


def run(loader_factory, run_dir, at: int | None = None, **settings):
    model = toy_model()
    task = SigintAt(Supervised(model), at or 0)
    config = TrainConfig(epochs=3, lr=1e-2, seed=3, **settings)
    trainer = Trainer(task, task.parameters(), loader_factory(), config, eval_model=model, run_dir=run_dir)
    return trainer, model


@pytest.mark.parametrize("workers", [0, 2])
def test_a_users_shuffling_dataloader_resumes_bit_identically(tmp_path, workers):
    def loader():
        return DataLoader(tensors(), batch_size=16, shuffle=True, num_workers=workers)

    reference, reference_model = run(loader, tmp_path / "reference")
    reference.fit()
    for at in (4, 9):  # inside epochs 1 and 2
        first, _ = run(loader, tmp_path / f"run{at}", at)
        assert first.fit().interrupted
        resumed, model = run(loader, tmp_path / f"run{at}")
        resumed.fit(resume=True)
        assert_same(reference_model.state_dict(), model.state_dict())


class Noisy(torch.utils.data.Dataset):
    """A random transform inside the dataset: it draws from torch's RNG for every item."""

    def __init__(self) -> None:
        self.data = tensors()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        inputs, label = self.data[index]
        return inputs + 0.1 * torch.rand_like(inputs), label


@pytest.mark.parametrize(("workers", "at"), [(0, 4), (0, 9), (2, 6)])  # mid-epoch in-process; an epoch's end
def test_a_dataloader_with_random_transforms_resumes_bit_identically(tmp_path, workers, at):
    def loader():
        return DataLoader(Noisy(), batch_size=16, shuffle=True, num_workers=workers)

    reference, reference_model = run(loader, tmp_path / "reference")
    reference.fit()
    first, _ = run(loader, tmp_path / "run", at)
    assert first.fit().interrupted
    resumed, model = run(loader, tmp_path / "run")
    resumed.fit(resume=True)
    assert_same(reference_model.state_dict(), model.state_dict())


def test_the_trainers_own_loader_with_workers_resumes_bit_identically(tmp_path):
    def trainer(run_dir, at=0):
        model = toy_model()
        task = SigintAt(Supervised(model), at)
        config = TrainConfig(epochs=2, lr=1e-2, seed=3)
        return Trainer(
            task, task.parameters(), toy_data(), config, batch_size=16, workers=2, eval_model=model, run_dir=run_dir
        ), model

    reference, reference_model = trainer(tmp_path / "a")
    reference.fit()
    first, _ = trainer(tmp_path / "b", at=8)
    assert first.fit().interrupted
    resumed, model = trainer(tmp_path / "b")
    resumed.fit(resume=True)
    assert_same(reference_model.state_dict(), model.state_dict())


class Stream(IterableDataset):
    """An endless-looking stream with no length, the same on every pass."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(40):
            yield torch.randn(1, 6, 6, generator=generator), torch.randint(0, 4, (), generator=generator)


def test_iterable_data_trains_for_max_steps_and_needs_them():
    loader = DataLoader(Stream(), batch_size=8)
    task = Supervised(toy_model())
    with pytest.raises(ConfigError, match="max_steps is required"):
        Trainer(task, task.parameters(), loader, TrainConfig(epochs=1))
    trainer = Trainer(task, task.parameters(), loader, TrainConfig(epochs=1, max_steps=12, accumulate=2))
    trainer.fit()
    assert trainer.scheduler.last_epoch == 12  # 5 batches a pass: 2 + 2 + 1 (the short last group) each


def test_max_steps_stops_mid_epoch_and_overrides_epochs(tmp_path):
    task = Supervised(toy_model())
    trainer = Trainer(
        task, task.parameters(), toy_data(), TrainConfig(epochs=50, max_steps=8), batch_size=16, run_dir=tmp_path
    )
    result = trainer.fit()
    assert trainer.scheduler.last_epoch == 8 and trainer.epochs == 2  # 6 batches an epoch
    assert len(result.history) == 2  # the stopped epoch is evaluated and checkpointed too


def test_batches_of_every_documented_shape_unpack():
    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    assert unpack((x, y))[1] is y and unpack([x, y])[0] is x
    assert unpack(x) == (x, None, {})
    inputs, labels, facts = unpack({"inputs": x, "labels": y, "index": torch.arange(2)})
    assert inputs is x and labels is y and set(facts) == {"index"}
    tokens = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": y}
    inputs, labels, facts = unpack(tokens)
    assert set(inputs) == {"input_ids"} and labels is y and facts == {}
    with pytest.raises(TypeError):
        unpack((x, y, y, y))


class Recorder(nn.Module):
    """A task that records the keyword arguments it receives."""

    def __init__(self, declares: tuple[str, ...] | None) -> None:
        super().__init__()
        self.inner = Supervised(toy_model())
        if declares is not None:
            self.batch_facts = declares
        self.seen: list[set[str]] = []

    def forward(self, inputs, labels=None, **facts):
        self.seen.append(set(facts))
        return self.inner(inputs, labels)


@pytest.mark.parametrize(
    ("declares", "expected"), [(None, set()), (("index",), {"index"}), (("index", "epoch"), {"index", "epoch"})]
)
def test_facts_reach_a_task_only_when_it_declares_them(declares, expected):
    task = Recorder(declares)
    Trainer(task, task.parameters(), toy_data(), TrainConfig(epochs=1), batch_size=32).fit()
    assert task.seen and all(seen == expected for seen in task.seen)


def test_epoch_batch_sampler_matches_the_global_batches_split_across_ranks():
    whole = list(EpochBatchSampler(10, 4, seed=1, place=World()))
    ranks = [list(EpochBatchSampler(10, 4, seed=1, place=World(rank, 2))) for rank in range(2)]
    for batch, first, second in zip(whole, *ranks):
        assert sorted(first + second) == sorted(batch) or len(batch) < 2
    sampler = EpochBatchSampler(10, 4, seed=1, place=World())
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.start_at(1)
    assert list(sampler) == full[1:]


def test_tensordata_loader_yields_whole_batches_with_their_index():
    data = TensorData(torch.arange(10.0)[:, None], torch.arange(10) % 3)
    batch = next(iter(make_loader(data, 4, seed=0, shuffle=False, place=World())))
    assert torch.equal(batch["index"], torch.arange(4)) and torch.equal(batch["inputs"][:, 0], torch.arange(4.0))
