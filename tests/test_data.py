"""Built-in data and users' own data without downloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kdistill.config import DataConfig
from kdistill.core.errors import ConfigError
from kdistill.data import ShiftViews, load_data


def test_digits_has_fixed_splits_and_normalised_inputs():
    first, second = load_data(DataConfig(dataset="digits")), load_data(DataConfig(dataset="digits"))
    assert first.input_shape == (1, 8, 8) and first.num_classes == 10
    assert len(first.train) + len(first.validation) + len(first.test) == 1797
    assert torch.equal(first.test.labels, second.test.labels)
    assert abs(float(first.train.inputs.mean())) < 1e-4


@pytest.mark.slow
def test_mnist5k_is_shuffled_real_digits():
    splits = load_data(DataConfig(dataset="mnist5k", validation_fraction=0.0))
    assert len(splits.train) == 4000 and len(splits.test) == 1000 and splits.input_shape == (1, 28, 28)
    counts = torch.bincount(splits.test.labels, minlength=10)
    assert counts.min() > 60  # shuffled: every class is in the test split


def write_folder(root, sizes=((6, 6), (6, 6)), mode="L"):
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for index in range(5):
            array = np.full(sizes[0], 20 * index + (100 if label == "dog" else 0), dtype=np.uint8)
            Image.fromarray(array).convert(mode).save(root / label / f"{index}.png")


def test_image_folder_one_subfolder_per_class(tmp_path):
    write_folder(tmp_path)
    splits = load_data(DataConfig(dataset="folder", path=str(tmp_path), test_fraction=0.2, validation_fraction=0))
    assert splits.input_shape == (1, 6, 6) and splits.num_classes == 2
    assert len(splits.train) == 8 and len(splits.test) == 2


def test_image_folder_colour_and_resizing(tmp_path):
    write_folder(tmp_path, mode="RGB")
    splits = load_data(DataConfig(dataset="folder", path=str(tmp_path), image_size=[4, 5], validation_fraction=0))
    assert splits.input_shape == (3, 4, 5)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="has no images"):
        load_data(DataConfig(dataset="folder", path=str(tmp_path / "empty")))
    write_folder(tmp_path / "broken")
    (tmp_path / "broken" / "cat" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="cannot read image"):
        load_data(DataConfig(dataset="folder", path=str(tmp_path / "broken")))
    with pytest.raises(ConfigError, match="no class sub-folders"):
        load_data(DataConfig(dataset="folder", path=str(tmp_path / "empty" / "a")))


def test_npz_arrays(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(
        path,
        x_train=rng.normal(size=(20, 5)),
        y_train=rng.integers(0, 3, 20),
        x_test=rng.normal(size=(6, 5)),
        y_test=rng.integers(0, 3, 6),
    )
    splits = load_data(DataConfig(dataset="npz", path=str(path), validation_fraction=0))
    assert splits.input_shape == (5,) and len(splits.test) == 6
    np.savez(tmp_path / "bad.npz", x=rng.normal(size=(3, 2)))
    with pytest.raises(ConfigError, match="needs arrays x_train and y_train"):
        load_data(DataConfig(dataset="npz", path=str(tmp_path / "bad.npz")))


def test_factory_dataset(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "import torch\n"
        "def build():\n"
        "    train = [(torch.randn(3), i % 2) for i in range(10)]\n"
        "    test = [(torch.randn(3), i % 2) for i in range(4)]\n"
        "    return train, test\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    splits = load_data(DataConfig(dataset="mydata:build", validation_fraction=0))
    assert splits.input_shape == (3,) and len(splits.train) == 10
    with pytest.raises(ConfigError, match="cannot import module 'nodata'"):
        load_data(DataConfig(dataset="nodata:build"))


def test_non_finite_inputs_are_refused(tmp_path):
    x = np.ones((10, 4))
    x[3, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x_train=x, y_train=np.arange(10) % 2)
    with pytest.raises(ConfigError, match="NaN or infinite"):
        load_data(DataConfig(dataset="npz", path=str(tmp_path / "nan.npz")))


def test_shift_views_move_content_and_are_fixed_per_sample_and_view():
    images = torch.zeros(6, 1, 8, 8)
    images[:, 0, 4, 4] = 1.0
    views = ShiftViews(6, pixels=2)
    moved = [views(images, torch.arange(6), epoch) for epoch in range(10)]
    assert all(m.shape == images.shape and float(m.sum()) <= 6.0 for m in moved)
    positions = {tuple(m[0].nonzero()[0].tolist()) for m in moved if m[0].sum() > 0}
    assert len(positions) > 3  # a new view most epochs
    # The same sample gets the same view whatever batch it is in.
    alone = views(images[3:4], torch.tensor([3]), 7)
    torch.testing.assert_close(alone[0], moved[7][3])
    cycled = ShiftViews(6, pixels=2, views=3)
    torch.testing.assert_close(cycled(images, torch.arange(6), 4), cycled(images, torch.arange(6), 1))
