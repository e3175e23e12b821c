"""Batches: what the trainer consumes, and the resumable order kdistill gives map-style data.

A **batch** is what a ``DataLoader`` yields, in any of these shapes:

* ``(inputs, labels)`` or ``[inputs, labels]`` — a tensor pair, or token inputs and labels;
* ``inputs`` alone (a tensor) — unlabelled data, distillation only;
* a mapping: ``{"inputs": ..., "labels": ..., <facts>}`` — ``inputs`` a tensor or a dict of token
  tensors — or a Hugging Face style mapping of model keywords (``input_ids``, ``attention_mask``,
  …, optionally ``labels``), which becomes ``inputs`` whole (labels taken out).

Facts about the samples travel inside the batch, never through signature inspection: a mapping
batch may carry ``index`` (the samples' positions in the dataset, which a teacher-output cache and
per-sample augmentation views need) and ``epoch``. What reaches the task as keyword arguments is
decided where the run is assembled (a ``transform`` given to the trainer), not by the trainer.

**Order and resume.** :class:`EpochBatchSampler` is a batch sampler whose epoch ``e`` order is a
pure function of ``(seed, e)``, that splits each global batch across ranks, and that can start
mid-epoch (:meth:`EpochBatchSampler.start_at`) without reading the skipped batches. A
``DataLoader`` built on it (:func:`make_loader`, any ``num_workers``) therefore resumes exactly.
A loader with another sampler is resumed by replaying the epoch's first batches: exact for a
``DataLoader(shuffle=True)`` (its ``RandomSampler`` is reseeded from ``(seed, epoch)`` each epoch)
and for samplers with ``set_epoch`` (``DistributedSampler``), and for any loader whose order is
otherwise deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, Sampler

from kdistill.distributed import World, shard, world

RESERVED = ("inputs", "labels")


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s order (and of a loader's generator in it): one formula for all."""
    return seed * 1_000_003 + epoch


class EpochBatchSampler(Sampler[list[int]]):
    """This rank's share of each global batch of a seeded, per-epoch shuffled order.

    Args:
        num_samples: the dataset's length.
        batch_size: the *global* batch; rank ``r`` of ``n`` takes every ``n``-th sample of it from
            ``r`` (a batch smaller than the world is padded by repetition so that every rank has one).
        seed: epoch ``e``'s permutation is drawn from a generator seeded with ``seed·1,000,003 + e``.
        shuffle: False keeps the dataset's order (evaluation).
        place: the process's rank and world size (default: the current process group).
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int = 0, shuffle: bool = True, place: World | None = None
    ) -> None:
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle
        self.place = place if place is not None else world()
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order from its first batch."""
        self.epoch, self.start = epoch, 0

    def start_at(self, batch: int) -> None:
        """Begin the current epoch at batch ``batch`` (resuming mid-epoch: nothing before it is read)."""
        self.start = batch

    def order(self) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for start in range(self.start * self.batch_size, self.num_samples, self.batch_size):
            yield shard(order[start : start + self.batch_size], self.place).tolist()

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)


def make_loader(
    dataset: Any,
    batch_size: int,
    seed: int = 0,
    *,
    shuffle: bool = True,
    workers: int = 0,
    pin_memory: bool = False,
    place: World | None = None,
) -> DataLoader:
    """A ``DataLoader`` over a map-style ``dataset`` in :class:`EpochBatchSampler` order.

    A dataset with ``__getitems__`` (kdistill's :class:`~kdistill.data.TensorData`) hands over whole
    batches, as fast as indexing a tensor; any other map-style dataset is collated by torch's
    ``default_collate`` from its ``(input, label)`` items. ``place``: whose share of each global
    batch to load (default: this process's rank; ``World()`` for all of it, e.g. evaluation)."""
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, shuffle, place)
    collate = _as_is if hasattr(dataset, "__getitems__") else None
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,  # workers see each epoch's sampler state afresh
        generator=torch.Generator().manual_seed(seed),  # workers' seeds, apart from the global RNG
    )


def _as_is(batch: Any) -> Any:
    return batch


def epoch_sampler(loader: Iterable) -> Any:
    """The loader's sampler that takes ``set_epoch`` (ours or ``DistributedSampler``), if any."""
    for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            return sampler
        inner = getattr(sampler, "sampler", None)  # a BatchSampler around a DistributedSampler
        if hasattr(inner, "set_epoch"):
            return inner
    return None


def epoch_batches(loader: Iterable, epoch: int, start: int = 0, seed: int = 0) -> Iterator[Any]:
    """Epoch ``epoch``'s batches from number ``start`` on: skipped by the sampler when it can
    (:meth:`EpochBatchSampler.start_at`), else by reading and dropping the first ``start``.

    The epoch's order is made reproducible where the loader allows: a sampler with ``set_epoch``
    is told the epoch; a ``DataLoader(shuffle=True)``'s ``RandomSampler`` gets a generator seeded
    with ``(seed, epoch)`` (what a resumed epoch needs to repeat the interrupted one's order)."""
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):  # the workers' seeds of epoch `epoch`, also after a resume
        generator.manual_seed(epoch_seed(seed, epoch))
    sampler = epoch_sampler(loader)
    if sampler is not None:
        sampler.set_epoch(epoch)
    else:
        random = getattr(loader, "sampler", None)
        if isinstance(random, RandomSampler):
            if random.generator is None:
                random.generator = torch.Generator()
            random.generator.manual_seed(epoch_seed(seed, epoch))
    skip = start
    if start and hasattr(sampler, "start_at"):
        sampler.start_at(start)
        skip = 0
    # Starting a DataLoader's iterator draws its workers' base seed from the global RNG unless the
    # loader has a generator of its own: keep the global stream (dropout, mixup) independent of it,
    # so that a resumed epoch draws exactly what the uninterrupted one did.
    rng = torch.get_rng_state()
    iterator = iter(loader)
    for _ in range(skip):  # replayed batches' random transforms draw nothing from the run's stream
        next(iterator, None)
    torch.set_rng_state(rng)
    yield from iterator


def unpack(batch: Any) -> tuple[Any, Tensor | None, dict[str, Any]]:
    """``(inputs, labels, facts)`` of a batch in any of the module docstring's shapes."""
    if isinstance(batch, Tensor):
        return batch, None, {}
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1], {}
        if len(batch) == 1:
            return batch[0], None, {}
        raise TypeError(f"a tuple batch must be (inputs, labels) or (inputs,), got {len(batch)} elements")
    if isinstance(batch, Mapping):
        if "inputs" in batch:
            facts = {key: value for key, value in batch.items() if key not in RESERVED}
            return batch["inputs"], batch.get("labels"), facts
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return inputs, batch.get("labels"), {}
    raise TypeError(f"cannot read a batch of type {type(batch).__name__}: expected (inputs, labels) or a mapping")


def loader_length(loader: Iterable) -> int | None:
    """Batches per epoch, or None for an iterable without a length."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
