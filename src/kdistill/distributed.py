"""Multi-process training on PyTorch's own engine: ``torchrun --nproc_per_node=N -m kdistill train ...``.

Only the student and adapters are wrapped in ``DistributedDataParallel`` (the distiller keeps
its frozen teacher outside the module tree, so DDP neither syncs nor broadcasts it); layer
names are resolved on the unwrapped models, so hooks work whatever the wrapper. Each global
batch is split across ranks (rank ``r`` takes every ``world``-th sample of it), so N processes
take the same optimisation steps as one process on the same global batch (up to batch-norm
statistics, which stay per rank unless the model uses ``SyncBatchNorm``). Rank 0 alone writes
logs, progress bars, checkpoints and reports.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from an initialised process group (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def backend_for(cuda: bool) -> str:
    """The process group's backends: gloo for CPU tensors always, NCCL for CUDA tensors when there
    is CUDA. kdistill's own collectives (logged means, stop flags, the teacher broadcast, object
    broadcasts) run on CPU tensors, and NCCL cannot carry those: with one backend per device type
    each collective goes to the backend of its tensors' device."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def setup_from_environment() -> World:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1)
    with :func:`backend_for`. A plain single process returns at once."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend_for(cuda))
    return world()


@contextlib.contextmanager
def process_group_from_environment() -> Iterator[World]:
    """:func:`setup_from_environment` for the length of a command; the group it joined is destroyed
    at the end, while the interpreter is whole — left to the interpreter's exit, gloo's threads can
    abort the process (SIGABRT) as it finalises. After an error, a group with NCCL is left alone: the
    other ranks may still wait in a collective, and destroying an NCCL group then can block; torchrun
    ends them once this process exits. A group that already existed is left to its owner."""
    existed = dist.is_available() and dist.is_initialized()
    place = setup_from_environment()
    ok = False
    try:
        yield place
        ok = True
    finally:
        joined = not existed and dist.is_available() and dist.is_initialized()
        if joined and (ok or "nccl" not in str(dist.get_backend())):
            dist.destroy_process_group()


def shard(indices: Tensor, place: World) -> Tensor:
    """This rank's share of one global batch: every ``size``-th sample from ``rank``. A batch
    smaller than the world is padded by repetition so that every rank has a sample."""
    if not place.distributed:
        return indices
    if len(indices) < place.size:
        indices = indices.repeat((place.size + len(indices) - 1) // len(indices))[: place.size]
    return indices[place.rank :: place.size]


def mean_over_ranks(values: dict[str, float], place: World) -> dict[str, float]:
    """Each value averaged over the ranks (what a one-process run on the global batch logs)."""
    if not place.distributed or not values:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / place.size).tolist()))


def any_rank(flag: bool, place: World) -> bool:
    """True on every rank when it is true on any (e.g. a stop request that only one rank saw)."""
    if not place.distributed:
        return flag
    tensor = torch.tensor([int(flag)])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def from_main(module: torch.nn.Module, place: World) -> None:
    """Give every rank rank 0's parameters and buffers. Batch-norm running statistics are kept
    per rank during training; the teacher rank 0 saved (and caches outputs of) must be everyone's."""
    if not place.distributed:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def main_value(value, place: World):
    """Rank 0's ``value`` (any picklable object) on every rank: decisions such as early stopping
    are taken once, from rank 0's numbers, so that no rank can leave a loop the others stay in."""
    if not place.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(place: World) -> None:
    if place.distributed:
        dist.barrier()


def on_main(place: World, action, *args, **kwargs):
    """Run ``action`` on rank 0 only and return its result there (None on the other ranks); every
    rank then raises rank 0's user error, if any, so that no rank waits forever for one that failed.
    Any other exception is raised as it is on rank 0, and as a :class:`KDistillError` naming it on
    the other ranks."""
    return _on_main(place, action, args, kwargs, share=False)


def main_decides(place: World, action, *args, **kwargs):
    """:func:`on_main`, with ``action``'s (picklable) result given to every rank: a decision or a key
    that rank 0 alone computes and every rank follows."""
    return _on_main(place, action, args, kwargs, share=True)


def _on_main(place: World, action, args: tuple, kwargs: dict, *, share: bool):
    from kdistill.core.errors import KDistillError

    message, result, unexpected = None, None, None
    if place.is_main:
        try:
            result = action(*args, **kwargs)
        except KDistillError as error:
            message = str(error)
        except Exception as error:  # a bug or an OSError: told to the others, raised as it is here
            message, unexpected = f"rank 0 failed: {type(error).__name__}: {error}", error
    if place.distributed:
        box = [(message, result if share else None)]  # the error and the shared result: one broadcast
        dist.broadcast_object_list(box, src=0)
        message, shared = box[0]
        result = shared if share else result
    if unexpected is not None:
        raise unexpected
    if message is not None:
        error = KDistillError(message)
        error.from_main = True  # every rank raises it: the command line says it once
        raise error
    return result
