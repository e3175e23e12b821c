"""A dataset factory's datasets are used as they are: read item by item, never copied whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kdistill.cli import main
from kdistill.config import DataConfig
from kdistill.data import LazyData, load_data
from tests import lazy_factories
from tests.test_cli import TINY


def test_a_factory_dataset_is_used_as_it_is_not_copied():
    splits = load_data(DataConfig(dataset="tests.lazy_factories:with_targets", augment="none"))
    assert isinstance(splits.train, LazyData) and isinstance(splits.test, LazyData)
    assert splits.train.dataset is splits.validation.dataset  # one dataset object, split by rows
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 4
    lazy_factories.READS["items"] = 0
    inputs, _ = splits.train.take(torch.arange(5))
    assert inputs.shape == (5, 1, 8, 8) and lazy_factories.READS["items"] == 5  # only what a batch needs
    assert abs(float(splits.train.take(torch.arange(len(splits.train)))[0].mean())) < 0.2  # normalised


def test_labels_come_from_targets_checked_against_a_sample_of_items():
    lazy_factories.READS["items"] = 0
    x, y = lazy_factories.arrays()
    LazyData(lazy_factories.Items(x, y, with_targets=True))
    assert lazy_factories.READS["items"] <= 16  # a sample checks that targets are the items' labels
    lazy_factories.READS["items"] = 0
    LazyData(lazy_factories.Items(x, y))
    assert lazy_factories.READS["items"] == len(y)  # no targets: each label read once


def test_targets_that_disagree_with_the_items_are_not_used():
    x, y = lazy_factories.arrays()
    dataset = lazy_factories.Items(x, y, with_targets=True)
    dataset.targets = [label + 1 for label in dataset.targets]  # e.g. raw labels under a target_transform
    assert torch.equal(LazyData(dataset).labels, torch.as_tensor(y))


@pytest.mark.slow
def test_a_factory_trains_the_same_student_as_the_same_arrays_in_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    x, y = lazy_factories.arrays()
    np.savez(tmp_path / "same.npz", x_train=x[:160], y_train=y[:160], x_test=x[160:], y_test=y[160:])
    common = [*TINY, "--set", "data.augment=none", "--set", "data.batch_size=32", "--quiet"]
    lazy = ["--set", "data.dataset=tests.lazy_factories:same_as_npz"]
    eager = ["--set", "data.dataset=npz", "--set", f"data.path={tmp_path / 'same.npz'}"]
    for name, source in (("lazy", lazy), ("eager", eager)):
        assert main(["train", "/dev/null", "--out", str(tmp_path / name), *common, *source]) == 0
    for phase in ("baseline", "distill"):
        first, second = (load_file(str(tmp_path / run / phase / "student.safetensors")) for run in ("lazy", "eager"))
        assert all(torch.equal(first[k], second[k]) for k in first), phase


def test_a_factory_that_returns_no_datasets_is_one_line(capsys, tmp_path):
    args = ["train", "/dev/null", "--out", str(tmp_path / "out"), "--quiet"]
    assert main([*args, "--set", "data.dataset=tests.lazy_factories:not_a_dataset"]) == 2
    err = capsys.readouterr().err
    assert "must be a map-style dataset" in err and len(err.strip().splitlines()) == 1, err


def test_an_image_folder_is_decoded_batch_by_batch(tmp_path, monkeypatch):
    from PIL import Image

    from kdistill.data import FolderImages

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for index in range(6):
            pixels = rng.integers(0, 256, size=(5, 7), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{index}.png")
    splits = load_data(DataConfig(dataset="folder", path=str(tmp_path), augment="none", validation_fraction=0))
    assert isinstance(splits.train, LazyData) and isinstance(splits.train.dataset, FolderImages)
    assert splits.input_shape == (1, 5, 7)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    inputs, labels = splits.train.take(torch.arange(3))
    assert len(opened) == 3  # only this batch's files
    row = int(splits.train.rows[1])
    want = np.asarray(real_open(splits.train.dataset.files[row]), dtype=np.float32) / 255.0
    got = inputs[1, 0] * splits.train.std + splits.train.mean
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=0, atol=1e-6)
    assert int(labels[1]) == splits.train.dataset.targets[row]


def test_loading_a_factory_reads_a_bounded_number_of_items():
    """Labels come from a sample-checked targets list and statistics from a bounded sample; the
    digest (a full pass) is taken only when something asks for it."""
    from kdistill.data import STATISTICS_SAMPLE, splits_digest

    lazy_factories.READS["items"] = 0
    splits = load_data(DataConfig(dataset="tests.lazy_factories:with_targets", augment="none"))
    assert lazy_factories.READS["items"] <= 2 * 16 + 3 * min(200, STATISTICS_SAMPLE) + 1
    before = lazy_factories.READS["items"]
    digest = splits_digest(splits)
    assert lazy_factories.READS["items"] == before + 200  # one pass over every split, once
    assert splits_digest(splits) == digest and lazy_factories.READS["items"] == before + 200
