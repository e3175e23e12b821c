"""Teacher-output cache: run the teacher over a dataset once, read its outputs back every epoch.

A cache directory holds ``meta.json`` (the fingerprint and shapes), ``logits.npy`` and one
``feature-<i>.npy`` per cached teacher layer, memory-mapped on reading. Entries are keyed
by ``view · N + sample``: without augmentation there is one view; with augmentation the
cache holds a fixed number of views per sample (:class:`kdistill.data.ShiftViews` with
``views`` set), and epoch ``e`` reads view ``e mod views`` — exactly the view the student
is shown, so cached and live distillation compute the same losses.

Token inputs (a dict with ``input_ids``) are run at the dataset's full padded length ``T``, so
every sample's token-level outputs have one shape; a lookup cuts them to the batch's length (the
batches are trimmed to their longest sentence, and padding never counts in the losses).

Language-model corpora (:class:`kdistill.corpus.CorpusBlocks`: fixed-length token blocks, labels
the input ids) are cached per token like any token inputs; their ``digest()`` is the data's
fingerprint. A pruned-vocabulary student compares itself with its teacher coarsened to the kept ids
plus "other": ``build(coarsen=…, coarsen_id=…)`` stores the coarsened logits, and ``coarsen_id`` joins
the fingerprint, so a cache made for another vocabulary is stale. Top-k storage records, over the
cached positions, the teacher's rest mass ``r`` outside its top k at ``τ`` (``rest_mass_mean`` /
``rest_mass_max``): what bounds the loss's error, since the top-k response term is the full KL less
``r·KL(Q_t ‖ Q_s)`` (``Q`` the distributions renormalised over the ids outside the top k; see
:func:`kdistill.core.losses.topk_kl_rows`), an error between 0 and ``r`` times a student-dependent KL.
It also records ``truncation_kl_mean`` / ``truncation_kl_max``, the KL from the teacher to its
uniform-rest reconstruction (:func:`truncation_kl`): how far the stored entries are from the teacher
if the rest's mass is spread uniformly, a property of the teacher alone and NOT a bound on the loss's
error. And ``bytes_per_token``.

The fingerprint (a hash of the teacher's weights, the dataset's inputs and labels, the
augmentation, the cached layers, the storage type and any coarsening) is checked on opening: a stale
cache is refused with the reason, never silently used. ``meta.json`` also records a SHA-256 of
every ``.npy`` file (and of itself), checked once per file per process on opening: a damaged or
truncated file is refused with its name. Caches of format 1 (before checksums) are stale.

Runs that share a cache directory may build the same cache at once: each builder writes its own
hidden temporary directory beside the target and renames it into place when complete; the first
complete cache wins, later builders verify it and discard theirs. A complete cache that fits the
run is never deleted, so a process reading it is never pulled from under. The ranks of one
multi-process run build one cache together, each its share of the batches (see :meth:`TeacherCache.build`).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill import faults
from kdistill.checkpoint import file_sha256, verify_file, write_failure
from kdistill.core.calls import call_model, default_logits, first_tensor, split_labels, token_mask
from kdistill.core.errors import CheckpointError, KDistillError
from kdistill.core.hooks import FeatureRecorder
from kdistill.core.losses import TopKLogits
from kdistill.data import Data, Inputs, ShiftViews, TensorData, first_inputs, move, primary, select
from kdistill.distributed import World

FORMAT = 2  # 2: meta.json records a SHA-256 of every file (format-1 caches are refused as stale)
STORAGE = {"float16": np.float16, "float32": np.float32, "topk": np.float16}  # top-k: the k values (and features)
# Top-k parts whose type does not follow STORAGE: ids are integers, and the log of the rest's mass
# stays float32 whatever the values' type (float16's 11-bit mantissa would put a 1.5 % error on a rest
# mass near e^-60, whose log is about −60 with a float16 spacing of 0.03).
TOPK_TYPES = {"topk-indices": np.dtype(np.int32), "topk-log-rest": np.dtype(np.float32)}
TRUNCATION_ROWS = 256  # positions per float64 truncation-KL chunk: 256 × 49,152 × 8 B = 100 MB at most
_Kept = TypeVar("_Kept")  # what a publisher keeps instead of its own build (see publish_directory)


class StaleCacheError(KDistillError):
    """A cache was made for another teacher, dataset, augmentation or layer set."""


def tensor_digest(tensors: Sequence[Tensor]) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        sha.update(str((tuple(data.shape), str(data.dtype))).encode())
        sha.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return sha.hexdigest()[:20]


def fingerprint(
    teacher: nn.Module,
    data: Data,
    augment: ShiftViews | None,
    layers: Sequence[str],
    storage: str,
    topk: int | None = None,
    temperature: float | None = None,
    coarsen_id: str | None = None,
) -> dict[str, Any]:
    """What a cache must match to be valid for a run (top-k storage also fixes ``k`` and ``τ``;
    ``coarsen_id`` names the coarsening of the teacher's logits, e.g. a pruned vocabulary and its τ)."""
    found = {
        "format": FORMAT,
        "teacher": tensor_digest(list(teacher.state_dict().values())),
        "data": data_digest(data),
        "augment": augment.identity() if augment is not None else "none",
        "layers": list(layers),
        "storage": storage,
    }
    if storage == "topk":
        found.update(topk=topk, temperature=temperature)
    if coarsen_id is not None:  # absent otherwise: caches built before coarsening existed stay valid
        found["coarsen"] = coarsen_id
    return found


def data_digest(data: Data) -> str:
    """The fingerprint of a split's inputs and labels: its own ``digest()`` when it has one (corpus
    blocks hash their token file), its files' ``file_identity()`` and normalisation (image folders, mapped
    arrays: nothing decoded), else its tensors (a lazy split is read through once)."""
    if callable(getattr(data, "digest", None)):
        return str(data.digest())
    identity = data.file_identity() if callable(getattr(data, "file_identity", None)) else None
    if identity is not None:
        return hashlib.sha256(f"{identity}:{data.mean!r}:{data.std!r}".encode()).hexdigest()[:20]
    if isinstance(data, TensorData):
        return tensor_digest([*_tensors(data.inputs), data.labels])
    sha = hashlib.sha256()
    for indices in data.index_batches(1024):
        sha.update(tensor_digest(_tensors(data.take(indices)[0])).encode())
    labels = getattr(data, "labels", None)  # per-sample labels, when the split has them
    if isinstance(labels, Tensor):
        sha.update(tensor_digest([labels]).encode())
    return sha.hexdigest()[:20]


def _tensors(inputs: Inputs) -> list[Tensor]:
    return [inputs[key] for key in sorted(inputs)] if isinstance(inputs, dict) else [inputs]


def token_length(inputs: Inputs) -> int | None:
    """The number of tokens of token inputs (``None`` for tensors)."""
    return int(primary(inputs).shape[1]) if isinstance(inputs, dict) and "input_ids" in inputs else None


def first_rows(data: Data, indices: Tensor) -> Inputs:
    """The inputs of ``indices``, token inputs untrimmed (every cached row has the full length)."""
    return select(data.inputs, indices) if isinstance(data, TensorData) else data.take(indices)[0]


class TeacherCache:
    """Read access to a built cache; see the module docstring."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory = directory
        self.meta = meta
        self.samples, self.views = meta["samples"], meta["views"]
        self.tokens: int | None = meta.get("tokens")  # full padded length of token inputs
        self.layers: list[str] = meta["fingerprint"]["layers"]
        self.topk = meta["fingerprint"].get("topk")
        if self.topk:
            self.logits = {name: self._load(name) for name in ("topk-values", "topk-indices", "topk-log-rest")}
        else:
            self.logits = self._load("logits")
        self.features = {layer: self._load(f"feature-{i}") for i, layer in enumerate(self.layers)}

    def _load(self, name: str) -> np.ndarray:
        """Memory-map ``<name>.npy``; a file that numpy cannot map or that holds the wrong number
        of rows is named in a :class:`CheckpointError`."""
        path = self.directory / f"{name}.npy"
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise CheckpointError(f"teacher cache file {path} is unreadable ({first}); is it truncated?") from None
        if array.ndim == 0 or array.shape[0] != self.views * self.samples:
            raise CheckpointError(
                f"teacher cache file {path} holds {array.shape[:1]} rows, not {self.views * self.samples}; "
                "is it truncated?"
            )
        return array

    @classmethod
    def open(cls, directory: str | Path, expected: dict[str, Any]) -> TeacherCache:
        """Open the cache in ``directory``; refuse it unless its fingerprint equals ``expected`` and
        every file matches the SHA-256 recorded in ``meta.json`` (checked once per file per process)."""
        directory = Path(directory)
        _refuse_a_file(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise StaleCacheError(f"teacher cache {directory} is incomplete or missing (no meta.json)")
        meta = _read_meta(meta_path)
        if "meta_sha256" in meta:  # damage first: a flipped fingerprint byte is not staleness
            _verify_meta(meta, meta_path)
        found = meta.get("fingerprint", {})
        # Both ways: a key only the cache has (a coarsening this run does not use) is a difference too.
        changed = [key for key in {**expected, **found} if found.get(key) != expected.get(key)]
        if changed:
            raise StaleCacheError(
                f"teacher cache {directory} is stale: its {', '.join(changed)} differ from this run's "
                "(delete it, or set distill.teacher_cache: auto to rebuild)"
            )
        _verify_meta(meta, meta_path)  # a current-format cache without its digest is damaged too
        for name, recorded in meta["sha256"].items():
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"teacher cache {directory} is damaged: {name} is missing; delete it to rebuild")
            verify_file(path, recorded)
        return cls(directory, meta)

    @classmethod
    def build(
        cls,
        directory: str | Path,
        teacher: nn.Module,
        data: Data,
        *,
        layers: Sequence[str] = (),
        augment: ShiftViews | None = None,
        storage: str = "float16",
        topk: int | None = None,
        temperature: float | None = None,
        batch_size: int = 500,
        device: torch.device | str = "cpu",
        feature_fn: Callable[[Any], Tensor] = first_tensor,
        progress: bool | None = None,
        expected: dict[str, Any] | None = None,
        coarsen: Callable[[Tensor], Tensor] | None = None,
        coarsen_id: str | None = None,
        place: World | None = None,
    ) -> TeacherCache:
        """Run ``teacher`` over every (view, sample) of ``data`` and store its outputs.

        ``storage``: ``float16`` or ``float32`` logits, or ``topk``: the ``topk`` largest logits and the
        log of the remaining probability mass at ``temperature`` (see :func:`kdistill.core.losses.topk_kl_rows`
        for the approximation this makes to the KL). Top-k storage records in ``meta.json``, as mean and
        max over every cached position (token positions with attention mask 0 left out):

        * ``rest_mass_mean`` / ``rest_mass_max``: the teacher's mass ``r`` outside its top k at ``τ``.
          It bounds the loss's error: ``0 ≤ KL − KL_topk = r·KL(Q_t ‖ Q_s)`` (``Q`` renormalised over
          the ids outside the top k), ``r`` times a KL that depends on the student.
        * ``truncation_kl_mean`` / ``truncation_kl_max``: the KL from the teacher to its uniform-rest
          reconstruction (:func:`truncation_kl`); it describes the teacher alone and is no bound on
          the loss's error.

        The teacher runs as it is given, without autocast: ``distill.teacher_precision`` (the Distiller's
        ``teacher_dtype``) does not apply to a cache build, so a float32 teacher's cache holds float32
        teacher outputs (then stored as ``storage`` says) even when a live teacher would run in bf16/fp16.

        ``coarsen``: applied to the teacher's logits ``(..., V)`` before they are stored (whatever the
        storage), e.g. ``lambda z: pruned.coarsen(z, τ)`` for a pruned-vocabulary student; the cache then
        holds ``(..., C')`` logits, top-k ids among the ``C'`` coarse entries. ``coarsen_id`` names it
        (required with ``coarsen``) and joins the fingerprint. ``data`` may be corpus blocks (a
        ``Batched`` with a ``digest()``; see :func:`data_digest`).

        Safe for several processes building the same ``directory`` at once: each writes a private
        temporary directory beside it and renames it into place; the first complete cache wins, and
        the others verify it and discard their own. A cache that would not fit on the disk is refused
        after the first batch, before anything big is written; a failure leaves nothing behind.

        ``place``: the ranks of one run (:func:`kdistill.distributed.world`) build one cache together:
        every rank calls ``build`` with the same arguments and runs the teacher on its own contiguous run
        of the batches one process would run (so the stored bytes are one process's); rank 0 makes the
        private directory, every rank writes its rows into it, and rank 0 hashes and publishes it. The
        directory must be on a file system that every rank sees (a rank that does not is an error). A
        failure on any rank is raised on every rank, and nothing is published.
        """
        if storage not in STORAGE:
            raise KDistillError(f"unknown cache storage {storage!r} (choose {', '.join(STORAGE)})")
        if storage == "topk" and not (topk and topk >= 1 and temperature and temperature > 0):
            raise KDistillError("top-k cache storage needs topk ≥ 1 and the run's temperature")
        if (coarsen is None) != (coarsen_id is None):
            raise KDistillError(
                "a coarsened teacher cache needs both coarsen and coarsen_id (the name that makes a cache "
                "built for another vocabulary stale)"
            )
        directory = Path(directory)
        _refuse_a_file(directory)
        views = 1 if augment is None else augment.views
        if views is None:
            raise KDistillError(
                "a teacher cache cannot hold a fresh augmented view every epoch: set data.augment_views "
                "to cache that many fixed views per sample, or data.augment: none"
            )
        if expected is None:  # the caller may have computed it already (a lazy dataset is read to hash it)
            expected = fingerprint(teacher, data, augment, layers, storage, topk, temperature, coarsen_id)
        place = place or World()
        home = next((parameter.device for parameter in teacher.parameters()), None)  # where it goes back to
        teacher = teacher.eval().to(device)
        n, dtype = len(data), STORAGE[storage]
        batches = [(view, start) for view in range(views) for start in range(0, n, batch_size)]
        mine = batches[_share(len(batches), place)]  # every row computed on the same batch as by one process
        truncation = _Truncation() if storage == "topk" else None
        partial: Path | None = None  # rank 0's: it alone removes it
        bar = tqdm(
            total=sum(min(start + batch_size, n) - start for _, start in mine),
            desc="teacher cache",
            disable=(progress is False or None) if place.is_main else True,
            leave=False,
        )
        try:
            with FeatureRecorder(teacher, layers, feature_fn, "teacher") as recorder, torch.no_grad():

                def run(view: int, start: int) -> tuple[Inputs, dict[str, Tensor]]:
                    """The inputs and the outputs to store of samples ``start …`` of ``view``."""
                    indices = torch.arange(start, min(start + batch_size, n))
                    inputs = first_rows(data, indices)  # token inputs untrimmed: one shape for all
                    if augment is not None:
                        inputs = augment(inputs, indices, view)
                    recorder.clear()
                    inputs, _ = split_labels(inputs)  # a Hugging Face batch's labels never reach the teacher
                    logits = default_logits(call_model(teacher, move(inputs, device)))
                    if coarsen is not None:
                        logits = coarsen(logits)
                    if storage == "topk":
                        top = TopKLogits.from_logits(logits, min(topk, logits.shape[-1]), temperature)
                        truncation.add(logits, top.indices, temperature, token_mask(inputs))
                        outputs = {
                            "topk-values": top.values,
                            "topk-indices": top.indices,
                            "topk-log-rest": top.log_rest,
                        }
                    else:
                        outputs = {"logits": logits}
                    features = recorder.pop()
                    outputs.update({f"feature-{i}": features[layer] for i, layer in enumerate(recorder.paths)})
                    return inputs, outputs

                # Rank 0 sizes the files from its first batch: nothing big is written before the space is checked.
                first: dict[str, Tensor] | None = None
                plan, failure = None, None
                if place.is_main:
                    try:
                        if not batches:
                            raise KDistillError(f"teacher cache {directory}: the dataset is empty")
                        inputs, first = run(*mine[0])
                        layout = {
                            name: (TOPK_TYPES.get(name, np.dtype(dtype)), tuple(value.shape[1:]))
                            for name, value in first.items()
                        }
                        _check_free_space(directory, views, n, layout)
                        _remove_orphans(directory)
                        partial = _private_directory(directory, ".partial", owned=True)
                        _allocate(partial, views * n, layout)
                        plan = (partial, layout, token_length(inputs))  # untrimmed rows: every sample's length
                    except Exception as error:
                        failure = error
                shared, layout, tokens = _settle(directory, place, failure, plan)[0]
                # Every rank writes its rows into rank 0's files.
                failure = None
                try:
                    if not shared.is_dir():
                        raise KDistillError(
                            f"teacher cache {directory}: rank {place.rank} cannot see {shared}, which rank 0 created; "
                            "all ranks build one cache together, so it must be on a file system they share "
                            "(on several nodes, point KDISTILL_CACHE or distill.teacher_cache at a shared one)"
                        )
                    with _RowWriter(shared, layout) as files:
                        for view, start in mine:
                            outputs = first if first is not None else run(view, start)[1]
                            first = None
                            files.write(view * n + start, outputs)
                            bar.update(min(start + batch_size, n) - start)
                            faults.reached("cache")
                except Exception as error:
                    failure = error
                parts = _settle(directory, place, failure, truncation)
            # Rank 0 records and publishes the cache once every rank's rows are written.
            built, failure = None, None
            if place.is_main:
                try:
                    digests = {f"{name}.npy": file_sha256(partial / f"{name}.npy") for name in layout}
                    bytes_per_sample = sum(_row_bytes(*spec) for spec in layout.values())
                    meta = {
                        "fingerprint": expected,
                        "samples": n,
                        "views": views,
                        "tokens": tokens,
                        "bytes_per_sample": bytes_per_sample,
                        "bytes_per_token": bytes_per_sample / tokens if tokens else None,
                        **(_Truncation.merged(parts).summary() if truncation is not None else {}),
                        "sha256": digests,
                    }
                    meta["meta_sha256"] = _meta_digest(meta)
                    (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
                    built = _publish(partial, directory, expected, meta)
                except Exception as error:
                    failure = error
            meta = _settle(directory, place, failure, None if built is None else built.meta)[0]
            return built if built is not None else cls(directory, meta)
        except OSError as error:
            raise write_failure(directory, error) from error
        finally:
            bar.close()
            if partial is not None:
                shutil.rmtree(partial, ignore_errors=True)  # ours alone: gone once published or failed
            if home is not None:  # every rank built: none keeps a whole teacher on its device for training
                teacher.to(home)

    def lookup(
        self, indices: Tensor, epoch: int = 0, tokens: int | None = None
    ) -> tuple[Tensor | TopKLogits, dict[str, Tensor]]:
        """Teacher logits (or :class:`TopKLogits`) and features, float32, of ``indices`` as seen in ``epoch``;
        token-level outputs cut to the first ``tokens`` positions (a trimmed batch's length)."""
        rows = (epoch % self.views) * self.samples + indices.cpu().numpy()

        def read(array: np.ndarray, token_level: bool) -> Tensor:
            value = array[rows]
            if tokens is not None and token_level:
                value = value[:, :tokens]
            dtype = None if value.dtype == np.int32 else np.float32
            return torch.from_numpy(np.ascontiguousarray(value, dtype=dtype))

        if self.topk:
            token_level = self._token_level(self.logits["topk-values"])  # the other two parts follow it
            parts = [read(self.logits[name], token_level) for name in ("topk-values", "topk-indices", "topk-log-rest")]
            logits = TopKLogits(parts[0], parts[1].long(), parts[2])
        else:
            logits = read(self.logits, self._token_level(self.logits))
        return logits, {layer: read(array, self._token_level(array)) for layer, array in self.features.items()}

    def _token_level(self, array: np.ndarray) -> bool:
        """(N, T, …) outputs of token inputs; (N, C) logits and pooled features never are."""
        return self.tokens is not None and array.ndim >= 3 and array.shape[1] == self.tokens

    @property
    def bytes_per_sample(self) -> float:
        return float(self.meta["bytes_per_sample"])

    @property
    def bytes_per_token(self) -> float | None:
        """Bytes stored per token position (every output, features included); ``None`` for non-token data."""
        value = self.meta.get("bytes_per_token")
        return None if value is None else float(value)

    @property
    def truncation_kl_mean(self) -> float | None:
        """Top-k storage: the mean over cached positions of :func:`truncation_kl`, the KL from the teacher
        to its uniform-rest reconstruction (``None`` otherwise). Not a bound on the loss's error: see
        :attr:`rest_mass_max`."""
        return self.meta.get("truncation_kl_mean")

    @property
    def truncation_kl_max(self) -> float | None:
        """Top-k storage: the largest :func:`truncation_kl` of any cached position (``None`` otherwise)."""
        return self.meta.get("truncation_kl_max")

    @property
    def rest_mass_mean(self) -> float | None:
        """Top-k storage: the mean over cached positions of the teacher's mass ``r`` outside its top k
        at ``τ`` (``None`` otherwise, and for caches built before it was recorded)."""
        return self.meta.get("rest_mass_mean")

    @property
    def rest_mass_max(self) -> float | None:
        """Top-k storage: the largest rest mass ``r`` of any cached position (``None`` otherwise). The
        top-k response term at a position is the full KL less ``r·KL(Q_t ‖ Q_s)`` (see the module
        docstring), so the loss's error is at most this times the student's KL on the rest."""
        return self.meta.get("rest_mass_max")


def truncation_kl(logits: Tensor, indices: Tensor, temperature: float) -> Tensor:
    """``KL(P ‖ P̂)`` per position, float64: the KL from the teacher to its uniform-rest reconstruction.

    ``P = softmax(logits / τ)`` over ``C`` entries; ``P̂`` keeps P on the top-k ids ``indices`` and
    spreads the rest's mass ``r`` uniformly over the other ``C − k``:
    ``KL = Σ_{j ∉ top-k} p_j · log(p_j (C − k) / r)`` (0 when ``k = C`` or ``r = 0``). It measures the
    teacher alone; it is NOT a bound on the top-k loss's error, which is ``r·KL(Q_t ‖ Q_s)`` and depends
    on the student (see :func:`rest_mass` and :func:`kdistill.core.losses.topk_kl_rows`).

    Args:
        logits: ``(R, C)``.
        indices: ``(R, k)`` the top-k ids of each row.
        temperature: ``τ > 0``.

    Returns:
        ``(R,)`` float64.
    """
    others = logits.shape[-1] - indices.shape[-1]
    if others == 0:
        return torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    log_p = torch.log_softmax(logits.double() / temperature, -1).scatter(-1, indices, float("-inf"))
    log_rest = log_p.logsumexp(-1, keepdim=True)  # log r
    terms = log_p.exp() * (log_p - log_rest + math.log(others))
    return torch.where(log_p > float("-inf"), terms, 0.0).sum(-1)  # 0 · log 0 = 0


def rest_mass(logits: Tensor, indices: Tensor, temperature: float) -> Tensor:
    """The teacher's mass outside its top k, ``r = Σ_{j ∉ top-k} softmax(logits / τ)_j``, per position.

    What bounds the top-k loss's error: ``0 ≤ KL(P_t ‖ P_s) − KL_topk = r·KL(Q_t ‖ Q_s)``, with ``Q``
    the distributions renormalised over the ids outside the top k (:func:`kdistill.core.losses.topk_kl_rows`).

    Args:
        logits: ``(R, C)``.
        indices: ``(R, k)`` the top-k ids of each row.
        temperature: ``τ > 0``.

    Returns:
        ``(R,)`` float64; 0 when ``k = C``.
    """
    log_p = torch.log_softmax(logits.double() / temperature, -1).scatter(-1, indices, float("-inf"))
    return log_p.logsumexp(-1).exp()  # logsumexp of k = C entries, all −inf, is −inf: r = 0


class _Truncation:
    """Running means and maxima of :func:`truncation_kl` and :func:`rest_mass` over the positions a build caches."""

    def __init__(self) -> None:
        self.total, self.count, self.largest = 0.0, 0, 0.0
        self.rest_total, self.rest_largest = 0.0, 0.0

    def add(self, logits: Tensor, indices: Tensor, temperature: float, mask: Tensor | None) -> None:
        """``logits`` ``(..., C)`` and their top-k ``indices`` ``(..., k)``; positions where ``mask``
        (an ``(N, T)`` attention mask of token logits ``(N, T, C)``) is 0 do not count."""
        rows, ids = logits.reshape(-1, logits.shape[-1]), indices.reshape(-1, indices.shape[-1])
        if mask is not None and mask.shape == logits.shape[:-1]:
            keep = mask.reshape(-1).to(rows.device) != 0
            rows, ids = rows[keep], ids[keep]
        for start in range(0, rows.shape[0], TRUNCATION_ROWS):  # bounded float64 copies of a large vocabulary
            kl = truncation_kl(rows[start : start + TRUNCATION_ROWS], ids[start : start + TRUNCATION_ROWS], temperature)
            self.total += float(kl.sum())
            self.largest = max(self.largest, float(kl.max()))
            rest = rest_mass(rows[start : start + TRUNCATION_ROWS], ids[start : start + TRUNCATION_ROWS], temperature)
            self.rest_total += float(rest.sum())
            self.rest_largest = max(self.rest_largest, float(rest.max()))
        self.count += rows.shape[0]

    @classmethod
    def merged(cls, parts: Sequence[_Truncation]) -> _Truncation:
        """The statistics over the positions of all ``parts`` (each rank's share of a build)."""
        whole = cls()
        for part in parts:  # sums and maxima: one process's values, up to the order of the float64 sums
            whole.total += part.total
            whole.count += part.count
            whole.rest_total += part.rest_total
            whole.largest = max(whole.largest, part.largest)
            whole.rest_largest = max(whole.rest_largest, part.rest_largest)
        return whole

    def summary(self) -> dict[str, float | None]:
        if not self.count:
            return dict.fromkeys(("truncation_kl_mean", "truncation_kl_max", "rest_mass_mean", "rest_mass_max"))
        return {
            "truncation_kl_mean": self.total / self.count,
            "truncation_kl_max": self.largest,
            "rest_mass_mean": self.rest_total / self.count,
            "rest_mass_max": self.rest_largest,
        }


def _refuse_a_file(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise KDistillError(
            f"teacher cache {directory} is a file, not a directory: name a directory for distill.teacher_cache "
            "(or auto)"
        )


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of ``meta`` without its own digest, in a canonical JSON form."""
    rest = {key: value for key, value in meta.items() if key != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _read_meta(path: Path) -> dict[str, Any]:
    """The parsed ``meta.json``; a garbled one is named in a :class:`CheckpointError`."""
    try:
        meta = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"teacher cache file {path} is damaged ({type(error).__name__}: {error}); delete {path.parent} to rebuild"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint", {}), dict):
        raise CheckpointError(f"teacher cache file {path} is damaged (not a cache description)")
    return meta


def _verify_meta(meta: dict[str, Any], path: Path) -> None:
    """Refuse a ``meta.json`` whose content changed after it was written (a flipped digit of a count
    parses but would misplace every row)."""
    if meta.get("meta_sha256") != _meta_digest(meta) or not isinstance(meta.get("sha256"), dict):
        raise CheckpointError(
            f"teacher cache file {path} is damaged: its content does not match its recorded SHA-256; "
            f"delete {path.parent} to rebuild"
        )


def _row_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _human(size: float) -> str:
    """``1234567`` → ``"1.2 MB"``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000:
            return f"{size:,.1f} {unit}"
        size /= 1000
    return f"{size:,.1f} PB"


def check_space(
    directory: Path,
    teacher: nn.Module,
    data: Data,
    *,
    layers: Sequence[str] = (),
    views: int = 1,
    storage: str = "float16",
    topk: int | None = None,
    feature_fn: Callable[[Any], Tensor] = first_tensor,
) -> None:
    """Refuse a cache that would not fit the free disk at ``directory`` — before any training:
    the size is estimated from the teacher's outputs on two samples (its weights do not matter)."""
    was_training = teacher.training
    teacher.eval()
    try:
        with FeatureRecorder(teacher, layers, feature_fn, "teacher") as recorder, torch.no_grad():
            inputs, _ = split_labels(first_inputs(data, 2))
            recorder.clear()
            logits = default_logits(call_model(teacher, inputs))
            features = recorder.pop()
    finally:
        teacher.train(was_training)
    dtype = np.dtype(STORAGE[storage])
    if storage == "topk":
        k = min(topk or 1, logits.shape[-1])
        rest = tuple(logits.shape[1:-1])
        layout = {
            "topk-values": (dtype, (*rest, k)),
            "topk-indices": (TOPK_TYPES["topk-indices"], (*rest, k)),
            "topk-log-rest": (TOPK_TYPES["topk-log-rest"], rest),
        }
    else:
        layout = {"logits": (dtype, tuple(logits.shape[1:]))}
    for i, layer in enumerate(recorder.paths):
        layout[f"feature-{i}"] = (dtype, tuple(features[layer].shape[1:]))
    _check_free_space(directory, views, len(data), layout)


def _check_free_space(
    directory: Path, views: int, samples: int, layout: dict[str, tuple[np.dtype, tuple[int, ...]]]
) -> None:
    """Refuse a cache larger than the free space where it would be written, before writing it."""
    per_sample = sum(_row_bytes(*spec) for spec in layout.values())
    needed = views * samples * per_sample
    existing = directory.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise KDistillError(
            f"teacher cache {directory} would take {_human(needed)} ({views:,} view(s) × {samples:,} samples × "
            f"{per_sample:,} bytes) but only {_human(free)} is free there: lower data.augment_views, use "
            "distill.cache_storage: float16 or topk, or set distill.teacher_cache: off"
        )


def _private_directory(directory: Path, suffix: str, owned: bool = False) -> Path:
    """A new, uniquely named hidden directory beside ``directory`` (same file system: renames are
    atomic); ``owned`` puts this process's id and host in its name (see :func:`_remove_orphans`)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    owner = f"pid{os.getpid()}@{socket.gethostname()}." if owned else ""
    return Path(tempfile.mkdtemp(prefix=f".{directory.name}.{owner}", suffix=suffix, dir=directory.parent))


def _remove_orphans(directory: Path) -> None:
    """Delete the temporary directories of builds of ``directory`` that were killed: their process is
    gone from this host. Those of live processes, or of other hosts, are never touched."""
    if not directory.parent.is_dir():
        return
    prefix, host = f".{directory.name}.pid", socket.gethostname()
    for entry in directory.parent.glob(f".{glob.escape(directory.name)}.pid*.partial"):
        match = re.fullmatch(r"(\d+)@(.+)\.[^.]+\.partial", entry.name[len(prefix) :])
        if match is None or match.group(2) != host:
            continue
        try:
            os.kill(int(match.group(1)), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:  # it exists, under another user
            pass


def _allocate(partial: Path, rows: int, layout: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
    """One ``.npy`` file per output, its blocks reserved on disk: a full disk is an error here,
    not a failed write halfway through the build."""
    for name, (dtype, shape) in layout.items():
        path = partial / f"{name}.npy"
        np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, *shape))  # the header, the size
        with open(path, "r+b") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise


class _RowWriter:
    """Writes runs of rows into the ``.npy`` files of a cache being built, in place, with ``pwrite``:
    the ranks of a build each write their own bytes (memory maps write whole pages back, and on a network
    file system a page holding two nodes' rows would keep only one node's)."""

    def __init__(self, partial: Path, layout: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
        self.layout = layout
        self.files: dict[str, tuple[int, int]] = {}  # name → (descriptor, offset of row 0)
        try:
            for name in layout:
                path = partial / f"{name}.npy"
                offset = np.load(path, mmap_mode="r").offset  # the .npy header's length
                self.files[name] = (os.open(path, os.O_WRONLY), offset)
        except BaseException:
            self.__exit__(OSError)
            raise

    def __enter__(self) -> _RowWriter:
        return self

    def __exit__(self, failed: type[BaseException] | None, *_: object) -> None:
        """Close the files; on success, first make the rows durable (rank 0 hashes and publishes them next)."""
        for handle, _ in self.files.values():
            try:
                if failed is None:
                    os.fsync(handle)
            finally:
                os.close(handle)

    def write(self, first_row: int, outputs: dict[str, Tensor]) -> None:
        """Store ``outputs`` (each ``(R, ...)``) as rows ``first_row … first_row + R − 1``."""
        for name, value in outputs.items():
            dtype, shape = self.layout[name]
            if tuple(value.shape[1:]) != shape:
                raise KDistillError(
                    f"teacher cache: the teacher's {name} output at row {first_row} has shape "
                    f"{tuple(value.shape[1:])}, not {shape} as in the first batch"
                )
            handle, offset = self.files[name]
            data = memoryview(np.ascontiguousarray(value.cpu().numpy().astype(dtype))).cast("B")
            position = offset + first_row * _row_bytes(dtype, shape)
            while data:  # pwrite may write less than asked
                written = os.pwrite(handle, data, position)
                data, position = data[written:], position + written


def _share(count: int, place: World) -> slice:
    """This rank's contiguous run of ``count`` batches: runs differ by one batch at most, and rank 0's
    is empty only when ``count`` is 0 (it sizes the cache from its first batch)."""
    return slice(-(-count * place.rank // place.size), -(-count * (place.rank + 1) // place.size))  # ceilings


def _settle(directory: Path, place: World, failure: Exception | None, payload: Any) -> list[Any]:
    """Every rank's ``payload``, once all ranks got here. If one failed, all raise: the failed rank its
    own ``failure``, the others a :class:`KDistillError` that names it (so that no rank waits for it)."""
    if not place.distributed:
        if failure is not None:
            raise failure
        return [payload]
    message = None
    if isinstance(failure, OSError):  # in the words the failed rank raises it (see build)
        message = str(write_failure(directory, failure))
    elif isinstance(failure, KDistillError):
        message = str(failure)
    elif failure is not None:
        message = f"teacher cache {directory}: {type(failure).__name__}: {failure}"
    gathered: list[Any] = [None] * place.size
    dist.all_gather_object(gathered, (message, payload))
    if failure is not None:
        raise failure
    for rank, (message, _) in enumerate(gathered):
        if message is not None:
            error = KDistillError(f"{message} (on rank {rank})")
            error.from_main = True  # the failed rank and rank 0 say it; the others stay quiet
            raise error
    return [part for _, part in gathered]


def _publish(partial: Path, directory: Path, expected: dict[str, Any], meta: dict[str, Any]) -> TeacherCache:
    """Rename the complete cache ``partial`` to ``directory``; if a cache for ``expected`` is there
    already (another process won the race), verify and use that one instead."""

    def first_complete() -> TeacherCache | None:
        try:
            return TeacherCache.open(directory, expected)  # first complete one wins
        except KDistillError:
            return None  # stale, incomplete or damaged: replaced

    kept = publish_directory(partial, directory, what="teacher cache", build="cache", keep=first_complete)
    return kept if kept is not None else TeacherCache(directory, meta)


def publish_directory(
    partial: Path,
    directory: Path,
    *,
    what: str,
    build: str,
    keep: Callable[[], _Kept | None] | None = None,
) -> _Kept | None:
    """Rename the complete build ``partial`` to ``directory``, retrying against concurrent builders.

    When ``directory`` is occupied, ``keep()`` (if given) decides: a value means the one there is
    kept (returned; ``partial`` is left for the caller to delete), ``None`` that it is replaced. It is
    first moved aside atomically, so no reader ever sees a half-deleted directory, then deleted.
    Returns ``None`` once ``partial`` is in place; ``what`` and ``build`` name the directory and the
    build in the error raised after too many lost races."""
    for _ in range(10):
        try:
            os.rename(partial, directory)  # atomic; fails if ``directory`` is a non-empty directory
            return None
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if keep is not None and (kept := keep()) is not None:
            return kept
        # If a racing builder had just put a valid one there, its readers keep their memory maps
        # after the unlink; the next round publishes ours.
        aside = _private_directory(directory, ".old")
        try:
            os.rename(directory, aside)
        except FileNotFoundError:
            aside.rmdir()
            continue
        shutil.rmtree(aside, ignore_errors=True)
    raise KDistillError(f"{what} {directory}: could not put the new {build} in place (too many concurrent builders)")


class CachedDistillation(nn.Module):
    """A distiller that reads its teacher's outputs from a :class:`TeacherCache` instead of
    running the teacher. It needs each batch's facts ``index`` (the samples' dataset positions)
    and ``epoch`` (which augmented view), and says so in ``batch_facts`` for the trainer."""

    batch_facts = ("index", "epoch")

    def __init__(self, distiller: nn.Module, cache: TeacherCache) -> None:
        super().__init__()
        self.distiller = distiller
        self.cache = cache

    def _apply(self, fn: Callable, recurse: bool = True) -> CachedDistillation:
        # .to(device) moves the student and the adapters; the teacher, which the cache replaces,
        # stays where it is (a distiller alone moves it along: see Distiller._apply).
        nn.Module._apply(self.distiller, fn, recurse)
        return self

    def forward(self, inputs: Inputs, labels: Tensor | None = None, *, index: Tensor, epoch: int = 0) -> dict:
        logits, features = self.cache.lookup(index, epoch, token_length(inputs))
        device = primary(inputs).device
        logits = (
            TopKLogits(*(part.to(device) for part in logits)) if isinstance(logits, TopKLogits) else logits.to(device)
        )
        teacher_outputs = (logits, {k: v.to(device) for k, v in features.items()})
        return self.distiller(inputs, labels, teacher_outputs=teacher_outputs)
