"""A run directory's promises: checked before training, locked while in use, never lost to
``--force`` or ``--resume``, and refused by eval/report/export while unfinished."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from kdistill.cli import main
from kdistill.rundir import RunLock
from tests.test_bad_input import digest
from tests.test_cli import TINY

RESULTS = ("config.yaml", "teacher", "baseline", "distill", "report.json")


def train(out: Path, *extra: str) -> int:
    return main(["train", "/dev/null", "--out", str(out), "--quiet", *TINY, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDISTILL_CACHE", str(root / "cache"))
        assert train(root / "run") == 0
    return root / "run"


@pytest.fixture(autouse=True)
def _cache(finished, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE", str(finished.parent / "cache"))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_resume_of_a_finished_run_changes_none_of_its_files(finished, capsys):
    assert (finished / "distill" / "adapters.safetensors").exists()  # the trained adapters, among the rest
    before = digest(finished)
    assert train(finished, "--resume") == 0
    assert digest(finished) == before


@pytest.mark.slow
def test_a_cache_too_big_for_the_disk_is_refused_before_any_training(tmp_path, monkeypatch, capsys):
    import shutil as real_shutil

    import kdistill.cache

    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(kdistill.cache.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    assert train(tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "would take" in err and "free" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "teachers").exists()


@pytest.mark.slow
def test_results_moved_aside_by_a_force_killed_before_it_started_come_back(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = digest(run)
    aside = run / ".replaced-12345"  # what a --force killed between moving aside and writing config.yaml leaves
    aside.mkdir()
    for name in ("config.yaml", "teacher", "baseline", "distill", "report.json", "report.md", "plots"):
        os.replace(run / name, aside / name)
    assert train(run, "--resume") == 0
    assert not aside.exists() and digest(run) == before


BAD_STARTS = {
    "unknown response loss": (["--set", "distill.response_loss=kll"], "unknown response loss 'kll'"),
    "unknown feature loss": (
        ["--set", "distill.feature_pairs=[{student: stage2, teacher: stage2, loss: mse2}]"],
        "unknown feature loss 'mse2'",
    ),
    "layer only in the teacher": (
        [
            "--set",
            "teacher.args={channels: [8, 16, 32]}",
            "--set",
            "distill.feature_pairs=[{student: stage3, teacher: stage3}]",
        ],
        "student has no layer 'stage3'",
    ),
    "unmappable pair": (
        ["--set", "distill.feature_pairs=[{student: fc, teacher: stage1}]"],
        "no adapter maps a student feature",
    ),
    "top-k cache with dkd": (
        ["--set", "distill.cache_storage=topk", "--set", "distill.response_loss=dkd"],
        "supports the kl response loss only",
    ),
    "missing npz": (["--set", "data.dataset=npz", "--set", "data.path=/no/such.npz"], "does not exist"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_STARTS))
def test_a_bad_start_fails_before_any_training_and_leaves_nothing(case, finished, tmp_path, capsys):
    extra, message = BAD_STARTS[case]
    out = tmp_path / "out"
    teachers = finished.parent / "cache" / "teachers"
    known = set(teachers.iterdir())
    started = time.perf_counter()
    capsys.readouterr()
    assert train(out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not any((out / name).exists() for name in RESULTS), "a failed start left results that block the rerun"
    assert set(teachers.iterdir()) == known, "a teacher was trained before the error"
    assert time.perf_counter() - started < 60


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing npz", "layer only in the teacher", "unknown response loss"])
def test_force_with_bad_input_keeps_the_earlier_results(case, finished, capsys):
    before = digest(finished)
    assert train(finished, "--force", *BAD_STARTS[case][0]) == 2
    assert digest(finished) == before


@pytest.mark.slow
def test_force_replaces_a_finished_run_once_the_new_one_starts(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    (copy / "report.md").write_text("old report")
    assert train(copy, "--force", "--set", "baseline=false") == 0
    assert not (copy / "baseline").exists(), "the earlier run's baseline survived a --force replace"
    assert "old report" not in (copy / "report.md").read_text()
    assert not list(copy.glob(".replaced-*"))


def test_a_second_process_on_a_locked_run_directory_gets_one_line(tmp_path):
    with RunLock(tmp_path / "run"):
        result = subprocess.run(
            [sys.executable, "-m", "kdistill", "train", "/dev/null", "--out", str(tmp_path / "run"), *TINY],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "KDISTILL_CACHE": str(tmp_path / "cache")},
        )
    assert result.returncode == 2
    assert (
        result.stderr.strip().startswith("kdistill: error:") and "in use by another kdistill process" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "report", "export"])
def test_an_unfinished_run_is_refused_by_eval_report_and_export(command, finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "distill" / "done.json").unlink()  # as after a kill in the distillation phase
    (run / "report.json").unlink()
    before = digest(run)
    capsys.readouterr()
    assert main([command, str(run)]) == 2
    err = capsys.readouterr().err
    assert "unfinished" in err and "--resume" in err and len(err.strip().splitlines()) == 1, err
    assert digest(run) == before and not (run / "report.json").exists()
    if command != "report":  # naming a weights file is a deliberate choice
        assert main([command, str(run), "--weights", str(run / "distill" / "student.safetensors")]) == 0


@pytest.mark.slow
def test_a_refused_resume_names_the_key_that_changed(finished, capsys):
    capsys.readouterr()
    assert train(finished, "--resume", "--set", "train.lr=0.01") == 2
    err = capsys.readouterr().err
    assert "train.lr" in err, err


def test_ctrl_c_before_the_run_starts_does_not_suggest_a_resume(tmp_path, monkeypatch, capsys):
    import kdistill.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kdistill.pipeline, "load_data", interrupted)
    assert main(["train", "/dev/null", "--out", str(tmp_path / "out"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err and "nothing was written" in err, err


@pytest.mark.slow
def test_editing_the_data_file_trains_a_new_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    x, y = rng.normal(size=(60, 1, 8, 8)).astype(np.float32), np.arange(60) % 3
    np.savez(path, x_train=x, y_train=y)
    settings = [*TINY, "--set", "data.dataset=npz", "--set", f"data.path={path}", "--set", "data.augment=none"]
    assert main(["train", "/dev/null", "--out", str(tmp_path / "a"), *settings]) == 0
    x[0, 0, 0, 0] += 1.0  # the same path, one value edited
    np.savez(path, x_train=x, y_train=y)
    capsys.readouterr()
    assert main(["train", "/dev/null", "--out", str(tmp_path / "b"), *settings]) == 0
    err = capsys.readouterr().err
    assert "reusing the one trained before" not in err, "a teacher trained on other data was reused"
    assert len(list((tmp_path / "cache" / "teachers").iterdir())) == 2


@pytest.mark.slow
def test_the_same_seed_gives_the_same_student_whether_the_teacher_was_trained_or_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    settings = ["--set", "baseline=false", "--set", "distill.feature_pairs=auto"]
    assert train(tmp_path / "trained", *settings) == 0  # trains the teacher
    assert train(tmp_path / "cached", *settings) == 0  # finds it cached
    for name in ("student.safetensors", "adapters.safetensors"):
        first, second = (load_file(str(tmp_path / run / "distill" / name)) for run in ("trained", "cached"))
        assert first.keys() == second.keys()
        assert all((first[k] == second[k]).all() for k in first), name


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_damaged_files_in_kdistills_own_cache_are_rebuilt_not_trusted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    assert train(tmp_path / "first", "--set", "baseline=false") == 0
    [teacher] = (tmp_path / "cache" / "teachers").glob("*.safetensors")
    [outputs] = (tmp_path / "cache" / "teacher-outputs").iterdir()
    flip_a_byte(teacher)
    flip_a_byte(outputs / "logits.npy")
    capsys.readouterr()
    assert main(["train", "/dev/null", "--out", str(tmp_path / "second"), *TINY, "--set", "baseline=false"]) == 0
    err = capsys.readouterr().err
    assert "damaged" in err and "training it again" in err and "rebuilding it" in err, err
    for name in ("student.safetensors", "adapters.safetensors"):  # the same run as the first
        first, second = (load_file(str(tmp_path / run / "distill" / name)) for run in ("first", "second"))
        assert all((first[k] == second[k]).all() for k in first), name


def test_force_moves_config_yaml_aside_first(tmp_path, monkeypatch):
    """While config.yaml is still in the run directory nothing has moved, so a kill during the move
    can never make the earlier results look replaced."""
    from kdistill.rundir import Replaced

    run = tmp_path / "run"
    run.mkdir()
    for name in ("report.json", "report.md", "config.yaml"):
        (run / name).write_text(name)
    moved = []
    real = os.replace
    monkeypatch.setattr("kdistill.rundir.os.replace", lambda a, b: moved.append(Path(a).name) or real(a, b))
    Replaced(run, ["report.json", "report.md", "config.yaml"])
    assert moved[0] == "config.yaml"
