"""The bad-input catalogue: each mistake gets one line on stderr, exit status 2, no traceback,
and nothing that an earlier run wrote is lost."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdistill.cli import main
from tests.test_cli import TINY

DIGITS = [
    "--set",
    "data.dataset=digits",
    "--set",
    "teacher.epochs=1",
    "--set",
    "train.epochs=1",
    "--set",
    "teacher.args={channels: [4, 8]}",
    "--set",
    "student.args={channels: [2, 4]}",
]


class Planted:
    """Unpickling this runs code: the safe loader must refuse it before that happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    paths = {"root": root}
    # A finished run whose results must survive every mistake below.
    paths["run"] = root / "run"
    assert (
        main(
            ["train", "/dev/null", "--out", str(paths["run"]), "--quiet", *TINY, "--set", f"cache_dir={root / 'cache'}"]
        )
        == 0
    )
    (root / "empty" / "a").mkdir(parents=True)
    paths["no_images"] = root / "empty"
    broken = root / "broken"
    for label in ("a", "b"):
        (broken / label).mkdir(parents=True)
        for index in range(3):
            Image.fromarray(np.full((8, 8), 30 * index, dtype=np.uint8)).save(broken / label / f"{index}.png")
    (broken / "a" / "corrupt.png").write_bytes(b"\x89PNG this is not an image")
    paths["broken_images"] = broken
    np.savez(root / "empty.npz", x_train=np.zeros((0, 4)), y_train=np.zeros((0,), dtype=int))
    paths["empty_npz"] = root / "empty.npz"
    x = np.random.default_rng(0).normal(size=(40, 1, 8, 8))
    x[3, 0, 2, 2] = np.inf
    np.savez(root / "nan.npz", x_train=x, y_train=np.arange(40) % 4)
    paths["nan_npz"] = root / "nan.npz"
    np.savez(root / "float_labels.npz", x_train=np.zeros((10, 4)), y_train=np.linspace(0, 1, 10))
    paths["float_labels"] = root / "float_labels.npz"
    weights = paths["run"] / "distill" / "student.safetensors"
    paths["truncated"] = root / "truncated.safetensors"
    paths["truncated"].write_bytes(weights.read_bytes()[:100])
    paths["truncated_pt"] = root / "truncated.pt"
    paths["truncated_pt"].write_bytes((paths["run"] / "distill" / "checkpoint.pt").read_bytes()[:300])
    paths["other_arch"] = paths["run"] / "teacher" / "teacher.safetensors"  # a teacher's weights for the student
    paths["evil"] = root / "evil.pt"
    paths["pwned"] = root / "pwned"
    paths["evil"].write_bytes(pickle.dumps({"weight": Planted(paths["pwned"])}))
    paths["yaml_error"] = root / "broken.yaml"
    paths["yaml_error"].write_text("train:\n  epochs: 3\n  lr: [0.1\n")
    paths["a_file"] = root / "a_file"
    paths["a_file"].write_text("")
    return paths


def digest(run: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(run.rglob("*")):
        if path.is_file() and "tensorboard" not in path.parts and path.name != ".kdistill.lock":
            sha.update(path.name.encode() + path.read_bytes())
    return sha.hexdigest()


CASES = {
    "missing config file": (lambda f: ["train", "nowhere.yaml"], "config file 'nowhere.yaml' does not exist"),
    "YAML syntax error": (lambda f: ["train", str(f["yaml_error"])], "YAML syntax error at line 4"),
    "unknown key": (
        lambda f: ["train", "/dev/null", "--set", "distill.temprature=2"],
        "unknown key distill.temprature; did you mean 'temperature'",
    ),
    "wrong type": (lambda f: ["train", "/dev/null", "--set", "train.epochs=[1]"], "train.epochs must be an integer"),
    "negative temperature": (
        lambda f: ["train", "/dev/null", "--set", "distill.temperature=-1"],
        "distill.temperature must be > 0",
    ),
    "negative alpha": (lambda f: ["train", "/dev/null", "--set", "distill.alpha=-0.5"], "distill.alpha must be ≥ 0"),
    "negative beta": (lambda f: ["train", "/dev/null", "--set", "distill.beta=-2"], "distill.beta must be ≥ 0"),
    "zero batch size": (lambda f: ["train", "/dev/null", "--set", "data.batch_size=0"], "data.batch_size must be ≥ 1"),
    "negative pair weight": (
        lambda f: ["train", "/dev/null", "--set", "distill.feature_pairs=[{student: a, teacher: b, weight: -1}]"],
        "distill.feature_pairs[0].weight must be ≥ 0",
    ),
    "unknown dataset": (lambda f: ["train", "/dev/null", "--set", "data.dataset=cifar10"], "unknown dataset 'cifar10'"),
    "unknown model": (
        lambda f: ["train", "/dev/null", "--set", "teacher.model=resnet34"],
        "unknown model 'resnet34'; did you mean",
    ),
    "unknown layer": (
        lambda f: [
            "train",
            "/dev/null",
            *DIGITS,
            "--set",
            "distill.feature_pairs=[{student: stage3, teacher: stage2}]",
        ],
        "student has no layer 'stage3'; did you mean",
    ),
    "unmappable feature pair": (
        lambda f: ["train", "/dev/null", *DIGITS, "--set", "distill.feature_pairs=[{student: fc, teacher: stage1}]"],
        "no adapter maps a student feature of shape",
    ),
    "class counts differ": (
        lambda f: ["train", "/dev/null", *DIGITS, "--set", "teacher.args.num_classes=12"],
        "teacher predicts 12 classes but the student predicts 10",
    ),
    "labels outside the class range": (
        lambda f: ["train", "/dev/null", *DIGITS, "--set", "student.args.num_classes=5"],
        "labels go up to 9 but the student predicts only 5 classes",
    ),
    "non-integer labels": (
        lambda f: ["train", "/dev/null", "--set", "data.dataset=npz", "--set", f"data.path={f['float_labels']}"],
        "labels must be integers",
    ),
    "empty dataset": (
        lambda f: ["train", "/dev/null", "--set", "data.dataset=npz", "--set", f"data.path={f['empty_npz']}"],
        "split is empty",
    ),
    "folder without images": (
        lambda f: ["train", "/dev/null", "--set", "data.dataset=folder", "--set", f"data.path={f['no_images']}"],
        "has no images",
    ),
    "unreadable image": (
        lambda f: ["train", "/dev/null", "--set", "data.dataset=folder", "--set", f"data.path={f['broken_images']}"],
        "cannot read image",
    ),
    "dataset path missing": (
        lambda f: ["train", "/dev/null", "--set", "data.dataset=npz", "--set", "data.path=/no/such.npz"],
        "does not exist",
    ),
    "truncated safetensors": (
        lambda f: ["train", "/dev/null", *DIGITS, "--set", f"teacher.weights={f['truncated']}"],
        "is it truncated?",
    ),
    "truncated checkpoint": (
        lambda f: ["train", "/dev/null", *DIGITS, "--set", f"teacher.weights={f['truncated_pt']}"],
        "is it truncated?",
    ),
    "weights of another architecture": (
        lambda f: ["eval", str(f["run"]), "--weights", str(f["other_arch"])],
        "weights do not fit the student's architecture",
    ),
    "pickle that runs code": (
        lambda f: ["train", "/dev/null", *DIGITS, "--set", f"teacher.weights={f['evil']}"],
        "refused to load",
    ),
    "run directory holds results": (
        lambda f: ["train", "/dev/null", "--out", str(f["run"]), *TINY],
        "already holds results",
    ),
    "unwritable output directory": (
        lambda f: ["train", "/dev/null", "--out", str(f["a_file"] / "run")],
        "cannot write to output directory",
    ),
    "malformed --set": (lambda f: ["train", "/dev/null", "--set", "train.epochs"], "expected key.sub=value"),
    "malformed --set value": (lambda f: ["train", "/dev/null", "--set", "train.epochs=[1,"], "cannot read the value"),
    "--resume without a checkpoint": (
        lambda f: ["train", "/dev/null", "--out", str(f["root"] / "fresh"), "--resume"],
        "holds no run to resume",
    ),
    "factory that does not import": (
        lambda f: ["train", "/dev/null", "--set", "student.model=nopkg.models:small"],
        "cannot import module 'nopkg.models'",
    ),
    "non-finite inputs": (
        lambda f: ["train", "/dev/null", "--set", "data.dataset=npz", "--set", f"data.path={f['nan_npz']}"],
        "contain NaN or infinite values",
    ),
    "eval of a non-run": (lambda f: ["eval", str(f["root"])], "is not a kdistill run directory"),
    "bad inspect shape": (lambda f: ["inspect", "cnn", "--input-shape", "0,28,28"], "positive integers"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_clear_line(case, files, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    build, message = CASES[case]
    args = build(files)
    if args[0] == "train" and "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    before = digest(files["run"])
    capsys.readouterr()
    assert main([*args, "--quiet"] if args[0] == "train" else args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert digest(files["run"]) == before, "an earlier result changed"
    assert not files["pwned"].exists(), "unpickling ran planted code"


def test_the_catalogue_is_long_enough():
    assert len(CASES) >= 25


@pytest.mark.slow
def test_a_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kdistill", "train", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"kdistill: error: config file '{tmp_path / 'none.yaml'}' does not exist"
