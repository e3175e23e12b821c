"""Crash-safe writing and safe, verified reading of weights and training checkpoints.

Writes go to a private temporary file in the same directory, are fsynced, then renamed
over the target (atomic on POSIX), and the directory is fsynced: a crash leaves
either the old file or the new one, never a torn one; two processes writing the same
file each use their own temporary, so a reader sees one complete version or the other.
A write that fails (a full disk, a file-size limit) raises :class:`WriteError` naming the
file, and the old file stays as it was.

Reads use safetensors or ``torch.load(weights_only=True)``, which refuses to unpickle
anything but tensors and plain containers; the format is told by the file's first bytes,
whatever its suffix.

Integrity: every file kdistill writes carries a SHA-256 of its content, checked on reading
(cache files once per process): safetensors files hold it in their metadata under
:data:`DIGEST_KEY` (over the tensors in key order), training checkpoints as an entry
:data:`DIGEST_KEY` of the saved dict (over a canonical walk of the rest). A mismatch
raises :class:`~kdistill.core.errors.CheckpointError` naming the damaged file. Files without
a digest (written elsewhere, or by an older kdistill) load as before, unchecked: they
cannot be told apart from any other foreign file, and refusing them would strand old runs.

Tied weights (one tensor under several keys, e.g. a causal LM's embedding and head) are written
once, the other keys recorded in the metadata under :data:`ALIASES_KEY`, and restored on reading.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kdistill import faults
from kdistill.core.errors import CheckpointError, KDistillError

DIGEST_KEY = "kdistill.sha256"
ALIASES_KEY = "kdistill.aliases"  # safetensors metadata: {dropped_key: kept_key} of tied tensors
_CHUNK = 1 << 20
_FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_WRITE_FAILURE_WORDS = ("iostream", "write", "writing", "i/o", "os error", "space", "too large", "unexpected pos")

# (device, inode, size, mtime, digest) of cache files already checked in this process.
_verified: set[tuple[int, int, int, int, str]] = set()


class WriteError(KDistillError):
    """A file could not be written (full disk, file-size limit, permissions); the old one is intact."""


def write_failure(path: str | Path, error: BaseException) -> WriteError:
    """A :class:`WriteError` naming ``path`` and why ``error`` happened (a full disk is said as such)."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, OSError):
        reason = error.strerror or first
        full = error.errno in _FULL_DISK
    else:
        # Writers report a failed write in their own words: torch.save a RuntimeError ("basic_ios::clear:
        # iostream error", "file write failed", "unexpected pos 896 vs 790"), safetensors a SafetensorError
        # ("I/O error: File too large (os error 27)").
        reason = f"{type(error).__name__}: {first}"
        full = any(word in first.lower() for word in _WRITE_FAILURE_WORDS)
    if full:
        reason += " (is the disk full, or a quota or file-size limit reached?)"
    return WriteError(f"cannot write {path}: {reason}; any earlier version of it is unchanged")


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, then move the result onto ``path`` atomically.

    Any failure while writing raises :class:`WriteError` (a :class:`KDistillError` from
    ``write`` passes unchanged), removes the temporary file and leaves ``path`` untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp gives every writer its own temporary: concurrent writers never share one.
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise write_failure(path, error) from error
    os.close(descriptor)
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        faults.reached("checkpoint")
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, Exception) and not isinstance(error, KDistillError):
            raise write_failure(path, error) from error
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_stale_temporaries(directory: str | Path) -> None:
    """Delete temporary files that a crash in :func:`atomic_write` left behind."""
    for stale in Path(directory).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


# -- digests -------------------------------------------------------------------------------


def _feed_tensor(sha: Any, tensor: torch.Tensor) -> None:
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    sha.update(repr((str(data.dtype), tuple(tensor.shape))).encode())
    if data.numel():
        sha.update(data.view(torch.uint8).numpy())  # the raw bytes, any dtype (bfloat16 included)


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over ``tensors`` in key order: each key, dtype, shape and raw bytes."""
    sha = hashlib.sha256()
    for key in sorted(tensors):
        sha.update(repr(key).encode())
        _feed_tensor(sha, tensors[key])
    return sha.hexdigest()


def content_sha256(value: Any) -> str:
    """SHA-256 over a canonical walk of a checkpoint: tensors by dtype, shape and bytes; dicts
    in their (saved and restored) order; numbers and strings by type and exact ``repr``."""
    sha = hashlib.sha256()
    _feed(sha, value)
    return sha.hexdigest()


def _feed(sha: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        sha.update(b"T")
        _feed_tensor(sha, value)
    elif isinstance(value, Mapping):
        sha.update(b"D%d:" % len(value))
        for key, item in value.items():
            _feed(sha, key)
            _feed(sha, item)
    elif isinstance(value, (list, tuple)):
        sha.update(b"L%d:" % len(value))
        for item in value:
            _feed(sha, item)
    else:  # int, float, bool, str, None, bytes: repr is exact for each (floats round-trip)
        sha.update(repr((type(value).__name__, value)).encode())


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _identity(path: Path, digest: str) -> tuple[int, int, int, int, str]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, digest


def verify_digest(path: str | Path, recorded: Any, found: str) -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless ``found`` equals the ``recorded`` digest."""
    if not isinstance(recorded, str):
        raise CheckpointError(f"{path}: damaged: its recorded checksum is unreadable ({recorded!r})")
    if found != recorded:
        raise CheckpointError(
            f"{path}: damaged: its content does not match the SHA-256 that kdistill recorded when writing it "
            f"(recorded {recorded[:12]}…, found {found[:12]}…); restore or delete the file"
        )


def verify_file(path: str | Path, recorded: Any) -> None:
    """Check a file's bytes against the SHA-256 ``recorded`` for it, at most once per process for an
    unchanged file (same inode, size and modification time): a cache that every rank or phase opens
    again costs one pass over its bytes. (Weights and checkpoints are checked on every read instead:
    reading them already costs a pass over every byte.)"""
    path = Path(path)
    identity = _identity(path, str(recorded))
    if identity in _verified:
        return
    verify_digest(path, recorded, file_sha256(path))
    _verified.add(identity)


# -- writing ---------------------------------------------------------------------------------


def tied_keys(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Keys of ``state`` whose tensor is an earlier key's tensor (tied weights: a causal LM's input
    embedding and output head) → that earlier key.

    "The same tensor" is the same memory, offset, shape, stride and dtype: a view of only part of
    another tensor's memory is not tied (it is saved as a copy). Empty tensors are never tied (they
    all may report address 0)."""
    first: dict[tuple[Any, ...], str] = {}
    tied = {}
    for key, tensor in state.items():
        if tensor.numel() == 0:
            continue
        identity = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if identity in first:
            tied[key] = first[identity]
        else:
            first[identity] = key
    return tied


def untied(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each tied tensor (:func:`tied_keys`) kept once, under its first key."""
    tied = tied_keys(state)
    return {key: tensor for key, tensor in state.items() if key not in tied}


def save_weights(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as safetensors, atomically, with its digest in the metadata.

    A tensor that several keys share (tied weights) is stored once, under its first key; the others
    are recorded in the metadata under :data:`ALIASES_KEY` (``{dropped_key: kept_key}``, JSON) and
    :func:`read_state_dict` restores them. safetensors itself refuses tensors that share memory. The
    digest covers the restored state dict (every key, tied ones included), so a damaged alias map is
    caught like damaged tensors, and a file without aliases has the digest it always had.
    """
    tied = tied_keys(state)
    tensors = {k: v.detach().to("cpu") for k, v in state.items() if k not in tied}
    # A tensor that shares memory with another without being the same tensor (a view of part of it):
    # safetensors refuses those too, so each is written as a copy of its own.
    storages = [t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()]
    shared = {p for p in storages if storages.count(p) > 1}
    tensors = {
        k: (v.clone() if v.numel() and v.untyped_storage().data_ptr() in shared else v).contiguous()
        for k, v in tensors.items()
    }
    full = {**tensors, **{key: tensors[kept] for key, kept in tied.items()}}
    metadata = {DIGEST_KEY: tensors_sha256(full)}
    if tied:
        metadata[ALIASES_KEY] = json.dumps(tied, sort_keys=True)
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write a training checkpoint (tensors, numbers, strings, lists, dicts), atomically, with the
    digest of its content as its last entry."""
    stored = {**payload, DIGEST_KEY: content_sha256(payload)}
    atomic_write(path, lambda temporary: torch.save(stored, temporary))


# -- reading ---------------------------------------------------------------------------------


def stored_format(path: str | Path) -> str | None:
    """``"safetensors"`` or ``"torch"`` as told by the file's first bytes, ``None`` if neither."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header (checked first: the
    # length's low byte can be anything, 0x80 included).
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"  # torch.save's zip archive, or a legacy (pickle protocol ≥ 2) file
    return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True``, verifying its digest when it has one."""
    payload = _torch_load(Path(path))
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"{path}: not a kdistill training checkpoint")
    return payload


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``torch.save``-d dict of tensors (told apart by
    content, not suffix), its digest verified when it has one.

    A file that holds ``{"state_dict": ...}`` or ``{"model": ...}`` (common checkpoint
    layouts) yields the inner dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    kind = stored_format(path) or ("safetensors" if path.suffix == ".safetensors" else "torch")
    if kind == "safetensors":
        return _read_safetensors(path)
    state = _torch_load(path)
    for key in ("state_dict", "model", "student"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, verified against the digest in its metadata if it has one.

    safetensors opens the file once for the header and again for the tensors' bytes, so a writer that
    replaces the file in between (another run saving the same weights) gives a header and tensors of
    two versions: a mismatch while the file changed under us is read again, not called damage.
    """
    for _ in range(10):
        before = _identity(path, "")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
            error = None
        except (SafetensorError, OSError, ValueError, RuntimeError) as caught:  # torch's mapping: RuntimeError
            error = caught
        changed = _identity(path, "") != before
        if error is not None:
            if changed:
                continue
            raise CheckpointError(f"{path}: not a readable safetensors file ({error}); is it truncated?") from None
        if ALIASES_KEY in metadata:
            state = _with_aliases(path, state, metadata[ALIASES_KEY])
        if DIGEST_KEY not in metadata:
            return state
        found = tensors_sha256(state)
        if found != metadata[DIGEST_KEY] and changed:
            continue
        verify_digest(path, metadata[DIGEST_KEY], found)
        return state
    raise CheckpointError(f"{path}: the file kept changing while it was read (another process rewriting it?)")


def _with_aliases(path: Path, state: dict[str, torch.Tensor], recorded: str) -> dict[str, torch.Tensor]:
    """``state`` with the tied keys that :func:`save_weights` stored once restored: each dropped key
    maps to the very tensor of its kept key (so a model loading it gets the same values in both)."""
    try:
        aliases = json.loads(recorded)
        if not isinstance(aliases, dict):
            raise ValueError("not a mapping")
        restored = {str(dropped): state[kept] for dropped, kept in aliases.items()}
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: damaged: its record of tied tensors is unreadable ({error})") from None
    return {**state, **restored}


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; a dict saved by :func:`save_checkpoint` is verified and
    returned without its digest entry."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if stored_format(path) == "safetensors":
        raise CheckpointError(f"{path}: this is a safetensors weights file, not a torch checkpoint")
    try:
        # A file object, not the path: torch.load hands any path ending in .safetensors to safetensors,
        # whatever the file holds.
        with warnings.catch_warnings(), open(path, "rb") as handle:
            warnings.simplefilter("ignore", UserWarning)  # torch notes foreign pickle protocols; either way
            payload = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unsafe content"
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than tensors "
            f"(loading uses weights_only=True and never runs code from a file): {first}"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError, KeyError) as error:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({type(error).__name__}); is it truncated?"
        ) from None
    if isinstance(payload, dict) and DIGEST_KEY in payload:
        recorded = payload.pop(DIGEST_KEY)
        verify_digest(path, recorded, content_sha256(payload))
    return payload
