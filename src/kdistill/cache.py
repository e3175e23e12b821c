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

The fingerprint (a hash of the teacher's weights, the dataset's inputs and labels, the
augmentation, the cached layers and the storage type) is checked on opening: a stale
cache is refused with the reason, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill.data import Inputs, ShiftViews, TensorData, move, primary, select
from kdistill.distiller import call_model, default_logits
from kdistill.errors import KDistillError
from kdistill.hooks import FeatureRecorder, first_tensor
from kdistill.losses import TopKLogits

FORMAT = 1
STORAGE = {"float16": np.float16, "float32": np.float32, "topk": np.float32}


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
    data: TensorData,
    augment: ShiftViews | None,
    layers: Sequence[str],
    storage: str,
    topk: int | None = None,
    temperature: float | None = None,
) -> dict[str, Any]:
    """What a cache must match to be valid for a run (top-k storage also fixes ``k`` and ``τ``)."""
    found = {
        "format": FORMAT,
        "teacher": tensor_digest(list(teacher.state_dict().values())),
        "data": tensor_digest([*_tensors(data.inputs), data.labels]),
        "augment": augment.identity() if augment is not None else "none",
        "layers": list(layers),
        "storage": storage,
    }
    if storage == "topk":
        found.update(topk=topk, temperature=temperature)
    return found


def _tensors(inputs: Inputs) -> list[Tensor]:
    return [inputs[key] for key in sorted(inputs)] if isinstance(inputs, dict) else [inputs]


def token_length(inputs: Inputs) -> int | None:
    """The number of tokens of token inputs (``None`` for tensors)."""
    return int(primary(inputs).shape[1]) if isinstance(inputs, dict) and "input_ids" in inputs else None


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
            self.logits = {
                name: np.load(directory / f"{name}.npy", mmap_mode="r")
                for name in ("topk-values", "topk-indices", "topk-log-rest")
            }
        else:
            self.logits = np.load(directory / "logits.npy", mmap_mode="r")
        self.features = {
            layer: np.load(directory / f"feature-{i}.npy", mmap_mode="r") for i, layer in enumerate(self.layers)
        }

    @classmethod
    def open(cls, directory: str | Path, expected: dict[str, Any]) -> TeacherCache:
        """Open the cache in ``directory``; refuse it unless its fingerprint equals ``expected``."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise StaleCacheError(f"teacher cache {directory} is incomplete or missing (no meta.json)")
        meta = json.loads(meta_path.read_text())
        found = meta.get("fingerprint", {})
        changed = [key for key in expected if found.get(key) != expected[key]]
        if changed:
            raise StaleCacheError(
                f"teacher cache {directory} is stale: its {', '.join(changed)} differ from this run's "
                "(delete it, or set distill.teacher_cache: auto to rebuild)"
            )
        return cls(directory, meta)

    @classmethod
    def build(
        cls,
        directory: str | Path,
        teacher: nn.Module,
        data: TensorData,
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
    ) -> TeacherCache:
        """Run ``teacher`` over every (view, sample) of ``data`` and store its outputs.

        ``storage``: ``float16`` or ``float32`` logits, or ``topk``: the ``topk`` largest logits and the
        log of the remaining probability mass at ``temperature`` (see :func:`kdistill.losses.topk_kl_rows`
        for the approximation this makes to the KL and its error bound).
        """
        if storage not in STORAGE:
            raise KDistillError(f"unknown cache storage {storage!r} (choose {', '.join(STORAGE)})")
        if storage == "topk" and not (topk and topk >= 1 and temperature and temperature > 0):
            raise KDistillError("top-k cache storage needs topk ≥ 1 and the run's temperature")
        directory = Path(directory)
        views = 1 if augment is None else augment.views
        if views is None:
            raise KDistillError(
                "a teacher cache cannot hold a fresh augmented view every epoch: set data.augment_views "
                "to cache that many fixed views per sample, or data.augment: none"
            )
        expected = fingerprint(teacher, data, augment, layers, storage, topk, temperature)
        partial = directory.with_name(directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        teacher = teacher.eval().to(device)
        n, dtype = len(data), STORAGE[storage]
        arrays: dict[str, np.memmap] = {}
        with FeatureRecorder(teacher, layers, feature_fn, "teacher") as recorder, torch.no_grad():
            bar = tqdm(total=views * n, desc="teacher cache", disable=progress is False or None, leave=False)
            for view in range(views):
                for indices in data.index_batches(batch_size):
                    inputs = select(data.inputs, indices)  # token inputs untrimmed: one shape for all
                    if augment is not None:
                        inputs = augment(inputs, indices, view)
                    recorder.clear()
                    logits = default_logits(call_model(teacher, move(inputs, device)))
                    if storage == "topk":
                        top = TopKLogits.from_logits(logits, min(topk, logits.shape[-1]), temperature)
                        outputs = {
                            "topk-values": top.values,
                            "topk-indices": top.indices,
                            "topk-log-rest": top.log_rest,
                        }
                    else:
                        outputs = {"logits": logits}
                    features = recorder.pop()
                    for i, layer in enumerate(recorder.paths):
                        outputs[f"feature-{i}"] = features[layer]
                    rows = view * n + indices.numpy()
                    for name, value in outputs.items():
                        target = np.int32 if name == "topk-indices" else dtype
                        if name not in arrays:
                            arrays[name] = np.lib.format.open_memmap(
                                partial / f"{name}.npy", mode="w+", dtype=target, shape=(views * n, *value.shape[1:])
                            )
                        arrays[name][rows] = value.cpu().numpy().astype(target)
                    bar.update(len(indices))
            bar.close()
        for array in arrays.values():
            array.flush()
        meta = {
            "fingerprint": expected,
            "samples": n,
            "views": views,
            "tokens": token_length(data.inputs),
            "bytes_per_sample": sum(a.nbytes for a in arrays.values()) / (views * n),
        }
        (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)  # complete caches only: a crash leaves just the .partial folder
        return cls(directory, meta)

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


class CachedDistillation(nn.Module):
    """A distiller that reads its teacher's outputs from a :class:`TeacherCache` instead of
    running the teacher (the trainer passes each batch's ``indices`` and ``epoch``)."""

    def __init__(self, distiller: nn.Module, cache: TeacherCache) -> None:
        super().__init__()
        self.distiller = distiller
        self.cache = cache

    def forward(self, inputs: Inputs, labels: Tensor | None = None, *, indices: Tensor, epoch: int = 0) -> dict:
        logits, features = self.cache.lookup(indices, epoch, token_length(inputs))
        device = primary(inputs).device
        logits = (
            TopKLogits(*(part.to(device) for part in logits)) if isinstance(logits, TopKLogits) else logits.to(device)
        )
        teacher_outputs = (logits, {k: v.to(device) for k, v in features.items()})
        return self.distiller(inputs, labels, teacher_outputs=teacher_outputs)
