"""An ``.npz`` written by ``np.savez`` is memory-mapped and read a batch at a time; one written by
``np.savez_compressed`` is loaded whole, as before, when it fits in memory."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill import data as data_module
from kdistill.cache import data_digest
from kdistill.cli import main
from kdistill.config import DataConfig
from kdistill.core.errors import ConfigError
from kdistill.data import MappedData, TensorData, load_data, splits_digest
from tests.test_cli import TINY


def arrays(n: int = 120, shape: tuple[int, ...] = (1, 8, 8), seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, size=(n, *shape))
    return {"x_train": x, "y_train": rng.integers(0, 4, n)}


def config(path, **settings) -> DataConfig:
    return DataConfig(dataset="npz", path=str(path), augment="none", **settings)


class RowSpy:
    """Stands in for the mapped array and records which rows are asked for."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.asked = array, []

    def __getitem__(self, rows):
        self.asked.append(np.asarray(rows).tolist())
        return self.array[rows]


def test_an_uncompressed_npz_is_mapped_and_a_batch_reads_only_its_rows(tmp_path):
    data = arrays()
    np.savez(tmp_path / "d.npz", **data)
    splits = load_data(config(tmp_path / "d.npz"))
    assert all(isinstance(part, MappedData) for part in (splits.train, splits.validation, splits.test))
    mapped = splits.train.dataset.array
    assert isinstance(mapped, np.memmap) and str(mapped.filename) == str(tmp_path / "d.npz")
    assert splits.train.dataset is splits.test.dataset  # one map, split by rows: nothing copied
    spy = RowSpy(mapped)
    splits.train.dataset._array = spy
    batch = torch.tensor([5, 0, 9])
    inputs, labels = splits.train.take(batch)
    rows = splits.train.rows[batch]
    assert spy.asked == [rows.tolist()]
    want = (data["x_train"][rows.numpy()] - splits.train.mean) / splits.train.std  # float64 reference
    torch.testing.assert_close(inputs, torch.from_numpy(want).float())
    assert labels.tolist() == data["y_train"][rows.numpy()].tolist()


@pytest.mark.parametrize(
    "shape, dtype, with_test",
    [((1, 8, 8), np.float64, True), ((6, 5), np.uint8, False), ((7,), np.float32, False)],
)
def test_mapped_batches_equal_the_in_memory_batches(tmp_path, shape, dtype, with_test):
    """Below STATISTICS_SAMPLE the bounded sample is the whole training split: the same statistics,
    so the same batches, as the compressed file loaded whole (the path every npz took before)."""
    data = {key: value.astype(dtype) if key[0] == "x" else value for key, value in arrays(150, shape).items()}
    if with_test:
        data |= {key.replace("train", "test"): value for key, value in arrays(30, shape, seed=1).items()}
    np.savez(tmp_path / "u.npz", **data)
    np.savez_compressed(tmp_path / "c.npz", **data)
    for settings in ({}, {"train_samples": 50, "validation_fraction": 0.2}):
        mapped, loaded = (load_data(config(tmp_path / name, **settings)) for name in ("u.npz", "c.npz"))
        assert isinstance(mapped.train, MappedData) and isinstance(loaded.train, TensorData)
        assert (mapped.input_shape, mapped.num_classes) == (loaded.input_shape, loaded.num_classes)
        for which in ("train", "validation", "test"):
            lazy, eager = getattr(mapped, which), getattr(loaded, which)
            assert len(lazy) == len(eager)
            inputs, labels = lazy.take(torch.arange(len(lazy)))
            torch.testing.assert_close(inputs, eager.inputs)
            assert torch.equal(labels, eager.labels)


def test_a_compressed_npz_is_loaded_whole_when_it_fits(tmp_path, monkeypatch):
    data = arrays()
    np.savez_compressed(tmp_path / "c.npz", **data)
    np.savez(tmp_path / "u.npz", **data)
    assert isinstance(load_data(config(tmp_path / "c.npz")).train, TensorData)
    # 61 kB of float64 inputs, then 2 × 31 kB as float32: 124 kB with the labels, not 60 kB
    monkeypatch.setattr(data_module, "available_memory", lambda: 60_000)
    with pytest.raises(ConfigError, match=r"would need 12\d kB of memory .* np\.savez \(uncompressed\)"):
        load_data(config(tmp_path / "c.npz"))
    assert isinstance(load_data(config(tmp_path / "u.npz")).train, MappedData)  # a map needs no such room


def test_a_fortran_ordered_array_is_loaded_whole(tmp_path):
    data = arrays()
    np.savez(tmp_path / "f.npz", x_train=np.asfortranarray(data["x_train"]), y_train=data["y_train"])
    np.savez(tmp_path / "c.npz", **data)
    fortran, mapped = load_data(config(tmp_path / "f.npz")), load_data(config(tmp_path / "c.npz"))
    assert isinstance(fortran.train, TensorData)
    torch.testing.assert_close(fortran.train.inputs, mapped.train.take(torch.arange(len(mapped.train)))[0])


def test_a_member_shorter_than_its_header_says_is_one_line(tmp_path):
    data = arrays(10, (4,))
    header = np.lib.format.header_data_from_array_1_0(np.zeros((100, 4)))
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:
        with archive.open("x_train.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, header)  # 100 rows promised, 10 given
            member.write(data["x_train"].tobytes())
        with archive.open("y_train.npy", "w") as member:
            np.lib.format.write_array(member, np.arange(100) % 2)
    with pytest.raises(ConfigError, match=r"cannot read .* as \.npz: x_train holds 320 bytes of data but its header"):
        load_data(config(tmp_path / "short.npz"))


@pytest.mark.parametrize(
    "x, y, message",
    [
        (np.float64(3.0), np.arange(3), "got a scalar"),
        (np.zeros((5, 4)), np.arange(6), "5 inputs but 6 labels"),
        (np.zeros((5, 4)), np.linspace(0, 1, 5), "labels must be integers"),
        (np.array([["1", "x"]] * 5), np.arange(5), "inputs must be numbers"),
    ],
)
def test_bad_arrays_are_one_line(tmp_path, x, y, message):
    np.savez(tmp_path / "bad.npz", x_train=x, y_train=y)
    with pytest.raises(ConfigError, match=message):
        load_data(config(tmp_path / "bad.npz"))


def test_a_mapped_split_pickles_as_its_location(tmp_path):
    """DataLoader workers started by spawn receive the split: they must map the file, not a copy."""
    np.savez(tmp_path / "d.npz", **arrays(2000, (64,)))
    train = load_data(config(tmp_path / "d.npz")).train
    copy = pickle.loads(pickle.dumps(train))
    assert len(pickle.dumps(train)) < 200_000  # the inputs alone are 1 MB
    batch = torch.arange(7)
    assert all(torch.equal(a, b) for a, b in zip(train.take(batch), copy.take(batch), strict=True))


def test_digests_of_a_mapped_split_follow_its_values(tmp_path):
    data = arrays()
    np.savez(tmp_path / "a.npz", **data)
    data["x_train"][17, 0, 3, 3] += 1.0
    np.savez(tmp_path / "b.npz", **data)
    first, again, edited = (load_data(config(tmp_path / name)) for name in ("a.npz", "a.npz", "b.npz"))
    assert splits_digest(first) == splits_digest(again) != splits_digest(edited)
    assert data_digest(first.train) == data_digest(again.train)
    # Rewritten in place: mapped arrays are known by their file's size and modification time.
    np.savez(tmp_path / "a.npz", **data)
    os.utime(tmp_path / "a.npz", ns=(1, 1))  # whatever the file system's clock granularity
    rewritten = load_data(config(tmp_path / "a.npz"))
    assert splits_digest(rewritten) != splits_digest(first)
    assert data_digest(rewritten.train) != data_digest(first.train)


def test_a_run_trains_on_a_mapped_npz(tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    np.savez(tmp_path / "d.npz", **arrays(160))
    sets = ["data.dataset=npz", f"data.path={tmp_path / 'd.npz'}", "teacher.epochs=1", "train.epochs=1"]
    args = ["train", "/dev/null", "--out", str(tmp_path / "run"), "--quiet", *TINY]
    assert main([*args, *[word for item in sets for word in ("--set", item)]]) == 0
    assert (tmp_path / "run" / "distill" / "student.safetensors").is_file()


def anonymous_memory() -> int:
    """Bytes of this process's private memory (``RssAnon``). A map's pages, once read, count in
    ``RssFile``: the kernel's file cache, which it drops again when memory runs short."""
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_building_a_mapped_split_of_200_mb_takes_little_memory(tmp_path):
    """The splits of a 200 MB file are built (statistics from a bounded sample) and a batch is
    read with far less memory than the file; loading it whole held it twice over (> 400 MB)."""
    path = tmp_path / "big.npz"
    np.savez(path, x_train=np.zeros((50_000, 1000), np.float32), y_train=np.arange(50_000) % 10)
    assert path.stat().st_size > 200e6
    before = anonymous_memory()
    splits = load_data(config(path))
    splits.train.take(torch.arange(256))
    assert anonymous_memory() - before < 50e6


def test_statistics_of_a_large_mapped_split_sample_all_of_it_not_its_first_rows(tmp_path, monkeypatch):
    # Sorted by class, as files often are: the first rows are all one class (inputs 0), the rest 10.
    monkeypatch.setattr(data_module, "STATISTICS_SAMPLE", 10)
    x = np.concatenate([np.zeros((60, 4), np.float32), np.full((60, 4), 10.0, np.float32)])
    y = np.repeat([0, 1], 60)
    np.savez(tmp_path / "sorted.npz", x_train=x, y_train=y, x_test=x[::10], y_test=y[::10])
    splits = load_data(config(tmp_path / "sorted.npz", validation_fraction=0.0))
    assert isinstance(splits.train, MappedData)
    assert splits.train.mean == pytest.approx(5.0)  # the first 10 rows alone would give 0
    rows = data_module.statistics_rows(splits.train)
    assert len(rows) == 10 and int(rows[0]) == 0 and int(rows[-1]) == len(splits.train) - 1
