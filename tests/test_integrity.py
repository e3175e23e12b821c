"""Stored bytes are verified: a damaged weights file, checkpoint or teacher-output cache is refused
with the file's name, a failed write keeps the old file, and formats are told by content."""

from __future__ import annotations

import errno
import json
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kdistill import KDistillError
from kdistill.cache import StaleCacheError, TeacherCache, fingerprint
from kdistill.checkpoint import (
    atomic_write,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
    save_weights,
)
from kdistill.cli import main
from kdistill.core.errors import CheckpointError
from kdistill.data import ShiftViews, TensorData
from tests.conftest import TinyConvNet
from tests.test_bad_input import DIGITS, digest


def flip_byte(path: Path, offset: int) -> None:
    """Invert every bit of the byte at ``offset`` (negative: from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def zip_member_offset(path: Path, suffix: str) -> int:
    """Where the (stored, uncompressed) bytes of the zip member whose name ends in ``suffix`` start."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    raw = path.read_bytes()
    name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_length + extra_length


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return TinyConvNet(4).state_dict()


# -- weights and checkpoints ---------------------------------------------------------------------


def test_a_flipped_byte_in_saved_weights_is_refused_naming_the_file(tmp_path, state):
    path = tmp_path / "student.safetensors"
    save_weights(state, path)
    for key, value in read_state_dict(path).items():  # intact: loads, bit for bit
        assert torch.equal(value, state[key])
    flip_byte(path, -3)  # inside the last tensor's bytes (the header comes first)
    with pytest.raises(CheckpointError, match=rf"{path}: damaged"):
        read_state_dict(path)


def test_a_flipped_tensor_byte_in_a_checkpoint_is_refused(tmp_path, state):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"format": 1, "model": state, "history": [{"loss": 0.25}]}, path)
    payload = load_checkpoint(path)
    assert payload["history"] == [{"loss": 0.25}] and "kdistill.sha256" not in payload
    flip_byte(path, zip_member_offset(path, "data/0") + 1)
    with pytest.raises(CheckpointError, match=rf"{path}: damaged"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=rf"{path}: damaged"):  # also when read as a teacher's weights
        read_state_dict(path)


def test_a_changed_number_outside_the_tensors_of_a_checkpoint_is_refused(tmp_path, state):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"format": 1, "model": state, "state": {"lr": 0.123456789}}, path)
    raw = path.read_bytes()
    stored = struct.pack(">d", 0.123456789)  # pickle keeps a float as 8 big-endian bytes
    assert raw.count(stored) == 1
    flip_byte(path, raw.index(stored) + 7)  # the lowest bits of the mantissa: still a valid float
    with pytest.raises(CheckpointError, match=rf"{path}: damaged"):
        load_checkpoint(path)


def test_files_without_a_digest_load_unchecked_as_before(tmp_path, state):
    save_file(state, tmp_path / "foreign.safetensors")
    torch.save({"state_dict": state}, tmp_path / "foreign.pt")
    for name in ("foreign.safetensors", "foreign.pt"):
        loaded = read_state_dict(tmp_path / name)
        assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_safetensors_content_is_read_whatever_the_suffix(tmp_path, state):
    save_weights(state, tmp_path / "weights.pt")
    torch.save(state, tmp_path / "weights.safetensors")  # a torch zip under the other suffix
    for name in ("weights.pt", "weights.safetensors"):
        loaded = read_state_dict(tmp_path / name)
        assert all(torch.equal(loaded[key], value) for key, value in state.items())
    with pytest.raises(CheckpointError, match="safetensors weights file, not a torch checkpoint"):
        load_checkpoint(tmp_path / "weights.pt")


# -- writing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("basic_ios::clear: iostream error")],
    ids=["ENOSPC", "torch-iostream"],
)
def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, failure):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"the previous checkpoint")

    def write(temporary: str) -> None:
        Path(temporary).write_bytes(b"half a check")
        raise failure

    with pytest.raises(KDistillError, match=rf"cannot write {path}: .*disk full"):
        atomic_write(path, write)
    assert path.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left


FULL_DISK_SCRIPT = """
import resource, signal, sys, torch
from kdistill.checkpoint import save_checkpoint, save_weights
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
big = {"w": torch.zeros(1 << 19)}  # 2 MB of float32
for save, name in ((save_checkpoint, "checkpoint.pt"), (save_weights, "student.safetensors")):
    try:
        save(big if save is save_weights else {"format": 1, "model": big}, sys.argv[1] + "/" + name)
    except Exception as error:
        print(type(error).__name__, "|", error)
"""


def test_a_real_write_past_a_file_size_limit_is_one_clear_error(tmp_path):
    for name in ("checkpoint.pt", "student.safetensors"):
        (tmp_path / name).write_bytes(b"old")
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 2, result.stdout + result.stderr
    for line, name in zip(lines, ("checkpoint.pt", "student.safetensors")):
        assert line.startswith("WriteError | cannot write ") and name in line and "disk full" in line, line
        assert (tmp_path / name).read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "student.safetensors"]


# -- the teacher-output cache --------------------------------------------------------------------


@pytest.fixture
def data() -> TensorData:
    generator = torch.Generator().manual_seed(0)
    return TensorData(torch.randn(24, 1, 8, 8, generator=generator), torch.randint(0, 10, (24,), generator=generator))


@pytest.fixture
def teacher() -> TinyConvNet:
    torch.manual_seed(0)
    return TinyConvNet(8).eval()


def build(directory: Path, teacher: TinyConvNet, data: TensorData, augment: ShiftViews | None = None):
    return TeacherCache.build(
        directory, teacher, data, layers=["conv2"], augment=augment, storage="float32", batch_size=10, progress=False
    )


def expected_of(teacher, data, augment=None):
    return fingerprint(teacher, data, augment, ["conv2"], "float32")


@pytest.mark.parametrize("name", ["logits.npy", "feature-0.npy"])
def test_a_flipped_byte_in_a_cache_file_is_refused_naming_it(tmp_path, teacher, data, name):
    cache = build(tmp_path / "cache", teacher, data)
    flip_byte(cache.directory / name, -5)
    with pytest.raises(CheckpointError, match=rf"{cache.directory / name}: damaged"):
        TeacherCache.open(cache.directory, expected_of(teacher, data))


def test_a_truncated_cache_file_is_refused_naming_it(tmp_path, teacher, data):
    cache = build(tmp_path / "cache", teacher, data)
    path = cache.directory / "logits.npy"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=rf"{path}"):
        TeacherCache.open(cache.directory, expected_of(teacher, data))


@pytest.mark.parametrize(
    "garble",
    [
        lambda text: text[: len(text) // 2],  # cut short
        lambda text: "\x00\xff" + text,  # not text
        lambda text: text.replace('"samples": 24', '"samples": 12'),  # parses, but lies
        lambda text: text.replace('"storage": "float32"', '"storage": "float16"'),  # not stale: damaged
    ],
    ids=["cut", "binary", "changed-count", "changed-fingerprint"],
)
def test_a_garbled_meta_json_is_refused_naming_it(tmp_path, teacher, data, garble):
    cache = build(tmp_path / "cache", teacher, data)
    meta = cache.directory / "meta.json"
    meta.write_bytes(garble(meta.read_text()).encode("latin-1"))
    with pytest.raises(CheckpointError, match=rf"{meta} is damaged"):
        TeacherCache.open(cache.directory, expected_of(teacher, data))


def test_a_cache_without_checksums_from_an_older_version_is_refused_as_stale(tmp_path, teacher, data):
    cache = build(tmp_path / "cache", teacher, data)
    meta_path = cache.directory / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["fingerprint"]["format"] = 1
    for key in ("sha256", "meta_sha256"):
        del meta[key]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StaleCacheError, match="its format differ"):
        TeacherCache.open(cache.directory, expected_of(teacher, data))


def test_a_cache_is_hashed_once_per_process_however_often_it_is_opened(tmp_path, teacher, data, monkeypatch):
    from kdistill import checkpoint

    cache = build(tmp_path / "cache", teacher, data)
    hashed: list[str] = []
    original = checkpoint.file_sha256
    monkeypatch.setattr(checkpoint, "file_sha256", lambda path: hashed.append(Path(path).name) or original(path))
    for _ in range(3):
        TeacherCache.open(cache.directory, expected_of(teacher, data))
    assert sorted(hashed) == ["feature-0.npy", "logits.npy"]


def test_a_cache_larger_than_the_free_space_is_refused_before_writing(tmp_path, teacher, data, monkeypatch):
    from kdistill import cache as cache_module

    per_sample = 10 * 4 + 16 * 4 * 4 * 4  # float32 logits and conv2 features of TinyConvNet(8)
    needed = 5 * 24 * per_sample
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: usage._replace(free=needed - 1))
    target = tmp_path / "caches" / "one"
    with pytest.raises(KDistillError, match=r"would take 127\.7 KB \(5 view\(s\) × 24 samples × 1,064 bytes\)"):
        build(target, teacher, data, ShiftViews(24, views=5))
    assert not (tmp_path / "caches").exists()  # nothing written, not even the parent directory
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: usage._replace(free=needed))
    assert build(target, teacher, data, ShiftViews(24, views=5)).bytes_per_sample == per_sample


def test_a_full_disk_while_building_a_cache_is_one_clear_error_and_leaves_nothing(tmp_path, teacher, data, monkeypatch):
    from kdistill import cache as cache_module

    def no_space(descriptor: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module.os, "posix_fallocate", no_space)  # what a full disk answers
    with pytest.raises(KDistillError, match=rf"cannot write {tmp_path / 'cache'}: No space left .*disk full"):
        build(tmp_path / "cache", teacher, data)
    assert list(tmp_path.iterdir()) == []


def test_a_cache_path_that_is_a_file_is_refused(tmp_path, teacher, data):
    path = tmp_path / "cache-file"
    path.write_text("not a directory")
    with pytest.raises(KDistillError, match=rf"teacher cache {path} is a file, not a directory"):
        build(path, teacher, data)
    with pytest.raises(KDistillError, match="is a file, not a directory"):
        TeacherCache.open(path, expected_of(teacher, data))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache-file"]


def test_a_build_over_a_stale_cache_replaces_it(tmp_path, teacher, data):
    build(tmp_path / "cache", TinyConvNet(8).eval(), data)  # another teacher's
    cache = build(tmp_path / "cache", teacher, data)
    opened = TeacherCache.open(tmp_path / "cache", expected_of(teacher, data))
    with torch.no_grad():
        torch.testing.assert_close(opened.lookup(torch.arange(24))[0], teacher(data.inputs))
    assert cache.directory == opened.directory
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # nothing stale or temporary left beside it


# -- through the command line --------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> dict[str, Path]:
    """A finished tiny run with an explicit teacher cache, and damaged copies of what it wrote."""
    root = tmp_path_factory.mktemp("integrity")
    run, cache = root / "run", root / "teacher-cache"
    assert main(["train", "/dev/null", "--out", str(run), "--quiet", *run_settings(root)]) == 0
    paths = {"root": root, "run": run, "cache": cache, "teacher": run / "teacher" / "teacher.safetensors"}
    paths["flipped_student"] = root / "flipped_student.safetensors"
    shutil.copy(run / "distill" / "student.safetensors", paths["flipped_student"])
    flip_byte(paths["flipped_student"], -2)
    paths["flipped_checkpoint"] = root / "flipped_checkpoint.pt"
    shutil.copy(run / "distill" / "checkpoint.pt", paths["flipped_checkpoint"])
    flip_byte(paths["flipped_checkpoint"], zip_member_offset(paths["flipped_checkpoint"], "data/0") + 2)
    paths["resumable"] = root / "resumable"
    shutil.copytree(run, paths["resumable"])
    shutil.copy(paths["flipped_checkpoint"], paths["resumable"] / "distill" / "checkpoint.pt")
    (paths["resumable"] / "distill" / "done.json").unlink()  # as if stopped during distillation
    for name, damage in {
        "truncated_shard": lambda d: (d / "logits.npy").write_bytes((d / "logits.npy").read_bytes()[:300]),
        "flipped_shard": lambda d: flip_byte(d / "feature-0.npy", -7),
        "garbled_meta": lambda d: (d / "meta.json").write_text('{"fingerprint": {"format": 2, "teach'),
    }.items():
        paths[name] = root / name
        shutil.copytree(cache, paths[name])
        damage(paths[name])
    paths["a_file"] = root / "a_file"
    paths["a_file"].write_text("")
    return paths


def run_settings(root: Path) -> list[str]:
    """The fixture run's settings: it keeps its teacher's outputs in ``root/teacher-cache``."""
    cache = root / "teacher-cache"
    cache_settings = ["--set", f"distill.teacher_cache={cache}", "--set", f"cache_dir={root / 'c'}"]
    return [*DIGITS, "--set", "data.augment=none", "--set", "distill.feature_pairs=auto", *cache_settings]


def with_cache(directory: Path, teacher: Path) -> list[str]:
    """A run that reuses the fixture run's teacher and reads its teacher outputs from ``directory``."""
    return [
        "train",
        "/dev/null",
        *DIGITS,
        "--set",
        "data.augment=none",
        "--set",
        "distill.feature_pairs=auto",
        "--set",
        f"distill.teacher_cache={directory}",
        "--set",
        f"teacher.weights={teacher}",
    ]


CASES = {
    "damaged student weights": (
        lambda f: ["eval", str(f["run"]), "--weights", str(f["flipped_student"])],
        "flipped_student.safetensors: damaged",
    ),
    "damaged checkpoint as teacher weights": (
        lambda f: ["train", "/dev/null", *DIGITS, "--set", f"teacher.weights={f['flipped_checkpoint']}"],
        "flipped_checkpoint.pt: damaged",
    ),
    "resume from a damaged checkpoint": (
        lambda f: ["train", "/dev/null", "--out", str(f["resumable"]), *run_settings(f["root"]), "--resume"],
        "checkpoint.pt: damaged",
    ),
    "truncated teacher-cache file": (
        lambda f: with_cache(f["truncated_shard"], f["teacher"]),
        "truncated_shard/logits.npy: damaged",
    ),
    "damaged teacher-cache file": (
        lambda f: with_cache(f["flipped_shard"], f["teacher"]),
        "flipped_shard/feature-0.npy: damaged",
    ),
    "garbled teacher-cache meta.json": (
        lambda f: with_cache(f["garbled_meta"], f["teacher"]),
        "garbled_meta/meta.json is damaged",
    ),
    "teacher-cache path is a file": (
        lambda f: with_cache(f["a_file"], f["teacher"]),
        "a_file is a file, not a directory",
    ),
}


@pytest.mark.slow
def test_the_fixture_run_reads_its_own_cache_back(stored, tmp_path, monkeypatch):
    """The damaged copies fail for their damage alone: the intact cache is accepted by the same run."""
    monkeypatch.chdir(tmp_path)
    args = with_cache(stored["cache"], stored["teacher"])
    assert main([*args, "--out", str(tmp_path / "out"), "--quiet"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_damaged_or_misplaced_files_get_one_clear_line(case, stored, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    build_args, message = CASES[case]
    args = build_args(stored)
    if args[0] == "train" and "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    before = digest(stored["run"]), digest(stored["cache"])
    capsys.readouterr()
    assert main([*args, "--quiet"] if args[0] == "train" else args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdistill: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (digest(stored["run"]), digest(stored["cache"])) == before, "an earlier result changed"
    assert sorted(p.name for p in stored["a_file"].parent.iterdir() if p.name.startswith(("a_file", ".a_file"))) == [
        "a_file"
    ]
