"""Data, model and `inspect` fixes: shifting 1-D signals, memory estimates before decoding, one clear
line for malformed data and model arguments, and a digest of the data for the teacher cache key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kdistill import data as data_module
from kdistill.cli import main
from kdistill.config import DataConfig
from kdistill.core.errors import ConfigError
from kdistill.data import ShiftViews, Splits, TensorData, load_data, shift, splits_digest
from kdistill.models import build_model
from tests.test_data import write_folder

# -- 1. shift augmentation on signals, and saying when it does nothing ------------------------------


def test_shift_moves_1d_signals_along_their_last_axis():
    signals = torch.zeros(5, 2, 10, dtype=torch.float64)
    signals[:, :, 5] = 1.0
    offsets = torch.tensor([[0, 0], [4, 4], [0, 2], [3, 1], [1, 3]])
    moved = shift(signals, offsets, pixels=2)
    assert moved.shape == signals.shape
    for n in range(5):
        expected = torch.zeros(2, 10, dtype=torch.float64)
        expected[:, 5 + 2 - int(offsets[n, 1])] = 1.0  # offset o moves content by pixels − o
        torch.testing.assert_close(moved[n], expected, rtol=0, atol=0)


def test_shift_fills_signal_borders_with_each_samples_minimum():
    signals = torch.arange(2 * 3 * 6, dtype=torch.float64).reshape(2, 3, 6) - 10
    moved = shift(signals, torch.tensor([[0, 0], [0, 4]]), pixels=2)
    # Sample 0 moves right by 2: its two first columns are the sample's minimum.
    assert (moved[0, :, :2] == signals[0].min()).all()
    torch.testing.assert_close(moved[0, :, 2:], signals[0, :, :4], rtol=0, atol=0)
    assert (moved[1, :, 4:] == signals[1].min()).all()
    torch.testing.assert_close(moved[1, :, :4], signals[1, :, 2:], rtol=0, atol=0)


def test_shift_views_of_signals_are_fixed_per_sample_and_view():
    signals = torch.zeros(6, 1, 20)
    signals[:, 0, 10] = 1.0
    views = ShiftViews(6, pixels=2, input_shape=(1, 20))
    moved = [views(signals, torch.arange(6), epoch) for epoch in range(10)]
    assert len({int(m[0, 0].argmax()) for m in moved}) > 2  # the signal really moves
    torch.testing.assert_close(views(signals[3:4], torch.tensor([3]), 7)[0], moved[7][3])


def test_shift_leaves_images_as_before():
    images = torch.randn(4, 3, 7, 9, dtype=torch.float64)
    offsets = torch.tensor([[0, 4], [1, 2], [4, 0], [2, 3]])
    moved = shift(images, offsets, pixels=2)
    for n in range(4):
        background = images[n].min()
        padded = torch.nn.functional.pad(images[n] - background, (2, 2, 2, 2)) + background
        r, c = offsets[n].tolist()
        torch.testing.assert_close(moved[n], padded[:, r : r + 7, c : c + 9], rtol=0, atol=0)


def test_shift_views_say_where_they_apply_and_their_identity_says_what_they_do():
    assert ShiftViews.applies_to(torch.zeros(3, 1, 8, 8))
    assert ShiftViews.applies_to(torch.zeros(3, 1, 40))
    assert not ShiftViews.applies_to(torch.zeros(3, 40))
    assert not ShiftViews.applies_to({"input_ids": torch.zeros(3, 5, dtype=torch.long)})
    images = ShiftViews(3, views=2, input_shape=(1, 8, 8)).identity()
    signals = ShiftViews(3, views=2, input_shape=(1, 40)).identity()
    vectors = ShiftViews(3, views=2, input_shape=(40,)).identity()
    assert len({images, signals, vectors}) == 3
    assert vectors == "none"
    assert "2d" in images and "1d" in signals
    # Without knowing the inputs, the identity still differs from the old one, which did not shift signals.
    assert ShiftViews(3, views=2).identity() != "shift(pixels=2, views=2, seed=0)"


def test_shift_views_do_nothing_on_vectors_and_say_so_once():
    vectors = torch.randn(4, 40)
    views = ShiftViews(4, input_shape=(40,))
    assert torch.equal(views(vectors, torch.arange(4), 3), vectors)
    note = views.note(vectors)
    assert note is not None and "data.augment" in note and "(40,)" in note
    assert ShiftViews(4).note(torch.zeros(4, 1, 8, 8)) is None
    assert ShiftViews(4).note(torch.zeros(4, 1, 40)) is None


# -- 2. an image folder that would not fit in memory --------------------------------------------------


def test_folder_refuses_an_image_size_that_cannot_fit_before_decoding(tmp_path, monkeypatch):
    write_folder(tmp_path)
    monkeypatch.setattr(data_module, "available_memory", lambda: 10_000)
    # 10 images of 1×40×40 float32 = 64 kB, held twice: more than the 10 kB available.
    with pytest.raises(ConfigError, match=r"10 images of 40×40.*lower data\.image_size"):
        load_data(DataConfig(dataset="folder", path=str(tmp_path), image_size=[40, 40]))
    monkeypatch.setattr(data_module, "available_memory", lambda: 10_000_000)
    splits = load_data(DataConfig(dataset="folder", path=str(tmp_path), image_size=[40, 40]))
    assert splits.input_shape == (1, 40, 40)


def test_folder_refuses_a_huge_image_size_quickly(tmp_path, monkeypatch):
    write_folder(tmp_path)
    # data.image_size is capped at 4,096 a side, but 10 such images still need 1.34 GB (held twice).
    monkeypatch.setattr(data_module, "available_memory", lambda: 10**9)
    with pytest.raises(ConfigError, match=r"1\.34 GB of memory to hold 10 images of 4096×4096"):
        load_data(DataConfig(dataset="folder", path=str(tmp_path), image_size=[4096, 4096]))


def test_available_memory_is_positive():
    assert data_module.available_memory() > 0


# -- 3, 4. malformed data ---------------------------------------------------------------------------


def npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_that_is_not_a_zip_archive(tmp_path):
    (tmp_path / "text.npz").write_text("x_train,y_train\n1,2\n")
    np.save(tmp_path / "array.npy", np.zeros((4, 4)))
    (tmp_path / "array.npz").write_bytes((tmp_path / "array.npy").read_bytes())
    for name in ("text.npz", "array.npz"):
        with pytest.raises(ConfigError, match=r"not an \.npz archive"):
            load_data(DataConfig(dataset="npz", path=str(tmp_path / name)))


def test_npz_labels_must_be_one_per_sample(tmp_path):
    rng = np.random.default_rng(0)
    path = npz(tmp_path / "d.npz", x_train=rng.normal(size=(20, 4)), y_train=rng.integers(0, 3, (20, 2)))
    with pytest.raises(ConfigError, match=r"one integer label per sample.*\(20, 2\)"):
        load_data(DataConfig(dataset="npz", path=str(path)))
    column = npz(tmp_path / "c.npz", x_train=rng.normal(size=(20, 4)), y_train=rng.integers(0, 3, (20, 1)))
    assert load_data(DataConfig(dataset="npz", path=str(column))).train.labels.dim() == 1


def test_npz_test_inputs_shaped_like_training_inputs(tmp_path):
    rng = np.random.default_rng(0)
    path = npz(
        tmp_path / "d.npz",
        x_train=rng.normal(size=(20, 1, 6, 6)),
        y_train=rng.integers(0, 3, 20),
        x_test=rng.normal(size=(6, 1, 8, 8)),
        y_test=rng.integers(0, 3, 6),
    )
    with pytest.raises(ConfigError, match=r"test inputs have shape \(1, 8, 8\) but the training inputs \(1, 6, 6\)"):
        load_data(DataConfig(dataset="npz", path=str(path)))


def test_npz_absurd_label_is_refused_before_anything_is_allocated(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 20)
    labels[4] = 10**9
    path = npz(tmp_path / "d.npz", x_train=rng.normal(size=(20, 4)), y_train=labels)
    with pytest.raises(ConfigError, match=r"labels go up to 1000000000.*at most 1,000 classes"):
        load_data(DataConfig(dataset="npz", path=str(path)))


def test_many_classes_are_fine_when_the_data_has_as_many_samples(tmp_path):
    labels = np.arange(1500)
    path = npz(tmp_path / "d.npz", x_train=np.random.default_rng(0).normal(size=(1500, 2)), y_train=labels)
    assert load_data(DataConfig(dataset="npz", path=str(path))).num_classes == 1500


@pytest.mark.parametrize("present", ["x_test", "y_test"])
def test_npz_test_arrays_come_in_pairs(tmp_path, present):
    rng = np.random.default_rng(0)
    extra = {"x_test": rng.normal(size=(6, 4))} if present == "x_test" else {"y_test": rng.integers(0, 3, 6)}
    path = npz(tmp_path / "d.npz", x_train=rng.normal(size=(20, 4)), y_train=rng.integers(0, 3, 20), **extra)
    with pytest.raises(ConfigError, match=f"has {present} but not {'y_test' if present == 'x_test' else 'x_test'}"):
        load_data(DataConfig(dataset="npz", path=str(path)))


def test_folder_with_one_image_per_class_says_the_training_split_is_too_small(tmp_path):
    for label, value in (("a", 30), ("b", 200)):
        (tmp_path / label).mkdir()
        Image.fromarray(np.full((6, 6), value, dtype=np.uint8)).save(tmp_path / label / "0.png")
    with pytest.raises(ConfigError, match=r"training split has 1 sample"):
        load_data(DataConfig(dataset="folder", path=str(tmp_path)))


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("cnn", {"channels": [-4, 8]}, r"channels must be positive integers, got \[-4, 8\]"),
        ("cnn", {"channels": [0, 8]}, r"channels must be positive integers, got \[0, 8\]"),
        ("cnn", {"in_channels": 0}, "in_channels must be a positive integer"),
        ("resnet", {"width": 0}, "width must be a positive integer"),
        ("resnet", {"in_channels": -1}, "in_channels must be a positive integer"),
        ("resnet8x4", {"num_classes": 0}, "num_classes must be a positive integer"),
        ("mlp", {"hidden": [0]}, r"hidden must be positive integers, got \[0\]"),
        ("mlp", {"hidden": [-2]}, r"hidden must be positive integers, got \[-2\]"),
        ("mlp", {"num_classes": -5}, "num_classes must be a positive integer"),
    ],
)
def test_builtin_models_refuse_non_positive_sizes_without_torch_warnings(name, args, message, recwarn):
    with pytest.raises(ConfigError, match=message):
        build_model(name, args, input_shape=(1, 8, 8), num_classes=10)
    assert not [w for w in recwarn if "zero-element" in str(w.message)]


def test_builtin_models_check_sizes_given_against_the_inputs():
    with pytest.raises(ConfigError, match=r"in_features 10 .*784 features"):
        build_model("mlp", {"in_features": 10}, input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ConfigError, match=r"in_channels 3 .*1 channel\)"):
        build_model("cnn", {"in_channels": 3}, input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ConfigError, match=r"takes images \(C, H, W\).*\(1, 2, 3, 4, 5\)"):
        build_model("resnet", {}, input_shape=(1, 2, 3, 4, 5), num_classes=10)
    assert build_model("mlp", {}, input_shape=(1, 28, 28), num_classes=10).fc.out_features == 10


# -- 5. a digest of the data for the trained-teacher cache key ---------------------------------------


def tiny_splits(inputs: torch.Tensor, labels: torch.Tensor) -> Splits:
    return Splits(
        "t",
        TensorData(inputs[:6], labels[:6]),
        TensorData(inputs[6:8], labels[6:8]),
        TensorData(inputs[8:], labels[8:]),
        3,
    )


def test_splits_digest_sees_one_changed_pixel_and_nothing_else(tmp_path):
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.rand(10, 1, 4, 4, generator=generator), torch.arange(10) % 3
    digest = splits_digest(tiny_splits(inputs, labels))
    assert digest == splits_digest(tiny_splits(inputs.clone(), labels.clone()))
    for part in (slice(0, 6), slice(6, 8), slice(8, 10)):  # a pixel in each split
        edited = inputs.clone()
        edited[part][0, 0, 1, 2] += 1 / 255
        assert splits_digest(tiny_splits(edited, labels)) != digest
    relabelled = labels.clone()
    relabelled[9] = 1  # was 0
    assert splits_digest(tiny_splits(inputs, relabelled)) != digest
    # The same bytes in another shape are other data.
    assert splits_digest(tiny_splits(inputs.reshape(10, 1, 2, 8), labels)) != digest


def test_splits_digest_of_a_folder_changes_when_one_pixel_of_one_file_does(tmp_path):
    write_folder(tmp_path)
    config = DataConfig(dataset="folder", path=str(tmp_path))
    before = splits_digest(load_data(config))
    assert splits_digest(load_data(config)) == before
    image = np.asarray(Image.open(tmp_path / "cat" / "3.png")).copy()
    image[2, 4] += 1
    Image.fromarray(image).save(tmp_path / "cat" / "3.png")
    assert splits_digest(load_data(config)) != before


def test_splits_digest_of_token_inputs():
    ids = torch.arange(40).reshape(10, 4)
    tokens = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    splits = Splits("t", TensorData(tokens, torch.arange(10) % 2), None, TensorData(tokens, torch.arange(10) % 2), 2)
    edited = {"input_ids": ids.clone(), "attention_mask": torch.ones_like(ids)}
    edited["input_ids"][3, 1] = 99
    other = Splits("t", TensorData(edited, torch.arange(10) % 2), None, TensorData(tokens, torch.arange(10) % 2), 2)
    assert splits_digest(splits) != splits_digest(other)


# -- the CLI catalogue: one line each -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad_data")
    rng = np.random.default_rng(0)
    (root / "text.npz").write_text("x_train,y_train\n1,2\n")
    np.save(root / "array.npy", np.zeros((4, 4)))
    (root / "array.npz").write_bytes((root / "array.npy").read_bytes())
    one = root / "one"
    for label, value in (("a", 30), ("b", 200)):
        (one / label).mkdir(parents=True)
        Image.fromarray(np.full((6, 6), value, dtype=np.uint8)).save(one / label / "0.png")
    write_folder(root / "folder")
    npz(root / "labels2d.npz", x_train=rng.normal(size=(20, 1, 4, 4)), y_train=rng.integers(0, 3, (20, 2)))
    npz(
        root / "mismatch.npz",
        x_train=rng.normal(size=(20, 1, 6, 6)),
        y_train=rng.integers(0, 3, 20),
        x_test=rng.normal(size=(6, 1, 8, 8)),
        y_test=rng.integers(0, 3, 6),
    )
    labels = rng.integers(0, 3, 20)
    labels[0] = 10**9
    npz(root / "huge_label.npz", x_train=rng.normal(size=(20, 1, 4, 4)), y_train=labels)
    xy = {"x_train": rng.normal(size=(20, 1, 4, 4)), "y_train": rng.integers(0, 3, 20)}
    npz(root / "x_test_only.npz", **xy, x_test=rng.normal(size=(6, 1, 4, 4)))
    npz(root / "y_test_only.npz", **xy, y_test=rng.integers(0, 3, 6))
    return {name: str(root / name) for name in ("text.npz", "array.npz", "one", "folder")} | {
        name: str(root / f"{name}.npz") for name in ("labels2d", "mismatch", "huge_label", "x_test_only", "y_test_only")
    }


def train(*sets: str) -> list[str]:
    args = ["train", "/dev/null", "--quiet", "--force", "--set", "teacher.epochs=1", "--set", "train.epochs=1"]
    for item in sets:
        args += ["--set", item]
    return args


def npz_run(f: dict[str, str], name: str) -> list[str]:
    return train("data.dataset=npz", f"data.path={f[name]}")


CATALOGUE = {
    "text file named .npz": (lambda f: npz_run(f, "text.npz"), "not an .npz archive"),
    ".npy renamed .npz": (lambda f: npz_run(f, "array.npz"), "not an .npz archive"),
    "one image per class": (
        lambda f: train("data.dataset=folder", f"data.path={f['one']}"),
        "training split has 1 sample",
    ),
    "2-D labels": (lambda f: npz_run(f, "labels2d"), "one integer label per sample"),
    "test inputs of another shape": (lambda f: npz_run(f, "mismatch"), "test inputs have shape (1, 8, 8)"),
    "a label of 1e9": (lambda f: npz_run(f, "huge_label"), "labels go up to 1000000000"),
    "x_test without y_test": (lambda f: npz_run(f, "x_test_only"), "has x_test but not y_test"),
    "y_test without x_test": (lambda f: npz_run(f, "y_test_only"), "has y_test but not x_test"),
    "negative cnn channels": (
        lambda f: train("data.dataset=digits", "teacher.args={channels: [-4, 8]}"),
        "channels must be positive integers",
    ),
    "zero cnn channels": (
        lambda f: train("data.dataset=digits", "student.args={channels: [0, 4]}"),
        "channels must be positive integers",
    ),
    "zero resnet width": (
        lambda f: train("data.dataset=digits", "teacher.model=resnet", "teacher.args={width: 0}"),
        "width must be a positive integer",
    ),
    "negative mlp hidden": (
        lambda f: train("data.dataset=digits", "student.model=mlp", "student.args={hidden: [-1]}"),
        "hidden must be positive integers",
    ),
    "inspect 5-D input": (lambda f: ["inspect", "cnn", "--input-shape", "1,2,3,4,5"], "takes images (C, H, W)"),
    "inspect 1-D input": (lambda f: ["inspect", "cnn", "--input-shape", "5"], "takes images (C, H, W)"),
    "inspect huge input": (lambda f: ["inspect", "cnn", "--input-shape", "3,100000,100000"], "use a smaller"),
    "inspect negative classes": (lambda f: ["inspect", "cnn", "--classes", "-5"], "--classes must be ≥ 1"),
    "inspect zero channels": (
        lambda f: ["inspect", "cnn", "--args", "{channels: [0, 4]}"],
        "channels must be positive integers",
    ),
    "inspect mismatched mlp": (
        lambda f: ["inspect", "mlp", "--args", "{in_features: 10}", "--input-shape", "1,28,28"],
        "in_features 10",
    ),
    "inspect model that cannot run": (
        lambda f: ["inspect", "tests.conftest:TinyConvNet", "--input-shape", "3,8,8"],
        "cannot run on inputs of shape 3×8×8",
    ),
}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_data_and_model_input_gets_one_clear_line(case, bad_files, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    build, message = CATALOGUE[case]
    args = build(bad_files)
    if args[0] == "train":
        args += ["--out", str(tmp_path / "out")]
    assert_one_clear_line(args, message, capsys)


def assert_one_clear_line(args: list[str], message: str, capsys) -> None:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdistill: error:"), err
    assert message in err, err
    assert "internal error" not in err and "Traceback" not in err


def test_a_folder_too_big_for_memory_gets_one_clear_line(bad_files, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_module, "available_memory", lambda: 10**9)
    args = train("data.dataset=folder", f"data.path={bad_files['folder']}", "data.image_size=[4096, 4096]")
    assert_one_clear_line([*args, "--out", str(tmp_path / "out")], "lower data.image_size", capsys)
