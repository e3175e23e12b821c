"""Sharded training with FSDP2 (``train.strategy: fsdp``): student, teacher and optimizer state
split across the ranks, for models that do not fit one device.

What is sharded (one rule, :func:`blocks`): each *block* of a model gets its own
``fully_shard`` group, then the model's root takes the parameters left (embeddings, head,
norms). The blocks are the children of the model's outermost ``nn.ModuleList`` s (a transformer's
stack of layers: Hugging Face's ``model.layers``, GPT-2's ``h``); a model without one (kdistill's
``cnn``, ``resnet``, ``mlp``) shards each direct child that holds parameters (its stages). A
block's parameters are gathered for its forward (and again for its backward) and freed after
(``reshard_after_forward=True``), so a rank holds its shard of everything plus one block in full.
FSDP2 shards parameters, not activations: forward hooks (feature pairs) see whole outputs, and
layer paths are unchanged (``fully_shard`` wraps nothing).

The frozen teacher is sharded the same way (it has no gradients; every rank calls it in step).
Adapters are sharded too, in the group of the task's root: one code path for their gradients
(reduce-scattered with the rest), optimizer state and checkpoints, at the price of one small
all-gather per step that rides with the root group's.

Checkpoints are written with ``torch.distributed.checkpoint``: every rank writes its own shards
(nothing is gathered on one rank) into ``checkpoint-<token>.dcp/``, and ``checkpoint.pt`` (written
atomically afterwards, by rank 0) names the directory it belongs to, so a crash mid-write leaves
the previous checkpoint in force. Such a checkpoint loads at any world size, one process included.
Weights files (``student.safetensors``) are gathered whole, one tensor at a time into rank 0's
CPU memory, and written by rank 0 as usual.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from kdistill import distributed
from kdistill.core.errors import CheckpointError, ConfigError


def blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that get their own ``fully_shard`` group (see the module docstring): the children
    of the outermost ``nn.ModuleList`` s, else the direct children that hold parameters (and have a forward)."""
    found: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                found.extend(child)
            else:
                walk(child)

    walk(model)
    found = found or list(model.children())
    # A container without forward (an adapters' ModuleDict) cannot gather its own parameters: the root takes them.
    return [m for m in found if any(True for _ in m.parameters()) and type(m).forward is not nn.Module.forward]


def active(strategy: str) -> bool:
    """Whether ``strategy`` shards here: ``fsdp`` under several processes (in one it trains as plain)."""
    return strategy == "fsdp" and distributed.world().distributed


def shard(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None, *, root: bool = True) -> nn.Module:
    """``fully_shard`` on each of ``model``'s :func:`blocks` not sharded yet, then (``root``) on its
    root, over all ranks on ``device``'s type (shards move to ``device``). ``amp_dtype`` (CUDA
    ``train.amp``) becomes FSDP's mixed precision: parameters gathered in that dtype, gradients
    reduced in float32.

    FSDP fixes a module's place (root or nested) at its first forward: a model whose root the
    trainer will shard inside a bigger task (a student inside a distiller) gets ``root=False`` and
    must not run before the trainer has sharded the task."""
    if amp_dtype == torch.float16:
        raise ConfigError(
            "train.strategy fsdp trains in float16 only with a gradient scaler, which sharded models lack here: "
            "set train.amp to bf16 or off (auto picks float16 on a GPU without bf16)"
        )
    options = {
        "mesh": init_device_mesh(device.type, (distributed.world().size,)),
        "reshard_after_forward": True,
        "mp_policy": MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
        if amp_dtype is not None
        else MixedPrecisionPolicy(),
    }
    for block in blocks(model):
        if not isinstance(block, FSDPModule):
            fully_shard(block, **options)
    if root and not isinstance(model, FSDPModule):
        fully_shard(model, **options)
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce gradients at the next backward (the last of an accumulation group) or keep them local."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


@contextlib.contextmanager
def root_gathered(model: nn.Module) -> Iterator[None]:
    """Within it, the parameters of a sharded ``model``'s root group (a task's embeddings, norms,
    head, adapters) are whole: for calling a submodule of ``model`` (the student, to evaluate it)
    without ``model``'s own forward, which would gather them. The blocks gather their own as they
    run. Every rank must enter it."""
    if not isinstance(model, FSDPModule):
        yield
        return
    # FSDP2 decides which module is the root at the first forward; a block that ran first (here,
    # inside the eval model, as when a run resumes at an epoch's end) would make itself a root.
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s whole state dict: a sharded model's is gathered one tensor at a time into rank 0's
    CPU memory (every rank must call it; the others get ``{}``); a plain model's is its own."""
    if not is_sharded(model):
        return model.state_dict()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Gathered apart, tied parameters (a causal LM's embedding and head) come back as copies: tie them
    # again, so that the weights file stores them once, as a plain model's does.
    first: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(parameter), name)
        if kept != name and kept in state:
            state[name] = state[kept]
    return state


def local_bytes(tensors) -> int:
    """Bytes that this rank holds of ``tensors`` (a DTensor counts its local shard)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of ``optimizer``'s state tensors on this rank (moments, step counters)."""
    return local_bytes(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


# -- checkpoints -------------------------------------------------------------------------------


def save_sharded(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Write ``model`` and ``optimizer`` into a new ``checkpoint-<token>.dcp`` directory of ``run_dir``,
    each rank its own shards; returns the directory's name (every rank must call it)."""
    place = distributed.world()
    name = distributed.main_value(f"checkpoint-{secrets.token_hex(6)}.dcp", place)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.save(state, checkpoint_id=run_dir / name, no_dist=not place.distributed)
    return name


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`save_sharded` wrote into ``model`` and ``optimizer``, resharded to this world."""
    if not (directory / ".metadata").is_file():
        raise CheckpointError(f"{directory}: the sharded checkpoint is missing or incomplete")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=directory, no_dist=not distributed.world().distributed)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:  # DCP's CheckpointException is a RuntimeError
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{directory}: does not fit this run's models or settings: {first}") from None


def remove_unused(run_dir: Path, keep: str) -> None:
    """Delete the ``checkpoint-*.dcp`` directories of ``run_dir`` other than ``keep``: superseded
    ones, and any that a crash left half-written (no ``checkpoint.pt`` names those)."""
    for directory in run_dir.glob("checkpoint-*.dcp"):
        if directory.name != keep:
            shutil.rmtree(directory, ignore_errors=True)
