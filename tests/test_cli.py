"""The command line end to end on `digits` with tiny models (seconds each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.cli import main

TINY = [
    "--set",
    "data.dataset=digits",
    "--set",
    "teacher.args={channels: [8, 16]}",
    "--set",
    "teacher.epochs=2",
    "--set",
    "student.args={channels: [2, 4]}",
    "--set",
    "train.epochs=2",
    "--set",
    "distill.feature_pairs=auto",
]


def kdistill(*args: str, cache: Path) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess, as a user would."""
    command = [sys.executable, "-m", "kdistill", *args]
    env = {"KDISTILL_CACHE": str(cache), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.yaml"
    config.write_text("# kdistill train tiny.yaml\nbaseline: true\n")
    result = kdistill("train", str(config), "--out", str(root / "run"), *TINY, cache=root / "cache")
    assert result.returncode == 0, result.stderr
    return root / "run"


def test_train_writes_everything_the_spec_lists(finished_run):
    for name in [
        "config.yaml",
        "report.json",
        "report.md",
        "plots/training.png",
        "plots/comparison.png",
        "distill/checkpoint.pt",
        "distill/student.safetensors",
        "distill/metrics.jsonl",
        "distill/adapters.safetensors",
        "baseline/student.safetensors",
        "teacher/teacher.safetensors",
    ]:
        assert (finished_run / name).exists(), name
    assert list((finished_run / "distill" / "tensorboard").iterdir())
    report = json.loads((finished_run / "report.json").read_text())
    for role in ("teacher", "student", "baseline"):
        assert {"accuracy", "params", "size_mb", "latency_ms", "throughput"} <= set(report[role])
    assert "agreement" in report["student"] and "agreement" in report["baseline"]
    assert {"params", "size", "latency", "gap_closed"} <= set(report["ratios"])
    assert report["ratios"]["params"] == pytest.approx(report["teacher"]["params"] / report["student"]["params"])
    steps = [json.loads(line) for line in (finished_run / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "ce", "response", "feature", "lr"} <= set(steps[0])
    resolved = (finished_run / "config.yaml").read_text()
    assert "stage1" in resolved and "feature_pairs: auto" not in resolved  # auto pairs are spelled out


def test_student_checkpoint_holds_no_teacher(finished_run):
    student = load_file(str(finished_run / "distill" / "student.safetensors"))
    teacher = load_file(str(finished_run / "teacher" / "teacher.safetensors"))
    assert sum(t.numel() for t in student.values()) < sum(t.numel() for t in teacher.values())
    checkpoint = torch.load(finished_run / "distill" / "checkpoint.pt", weights_only=True)
    keys = [k.removeprefix("distiller.") for k in checkpoint["model"]]  # "distiller." when the cache feeds it
    assert keys and all(k.startswith(("student.", "adapters.")) for k in keys)


def test_eval_report_and_export(finished_run, tmp_path, capsys):
    assert main(["eval", str(finished_run)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["report", str(finished_run)]) == 0
    assert "| student |" in capsys.readouterr().out
    out = tmp_path / "student.safetensors"
    assert main(["export", str(finished_run), "--out", str(out)]) == 0
    assert load_file(str(out)).keys() == load_file(str(finished_run / "distill" / "student.safetensors")).keys()


def test_onnx_export_matches_pytorch(finished_run, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from kdistill.cli import _load_run
    from kdistill.models import load_weights

    out = tmp_path / "student.onnx"
    assert main(["export", str(finished_run), "--format", "onnx", "--out", str(out)]) == 0
    _, splits, _, student = _load_run(str(finished_run))
    load_weights(student, finished_run / "distill" / "student.safetensors")
    inputs = splits.test.inputs[:7]
    with torch.no_grad():
        expected = student.eval()(inputs).numpy()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"inputs": inputs.numpy()})[0]
    assert abs(got - expected).max() < 1e-4


def test_existing_results_are_never_overwritten_silently(finished_run, tmp_path):
    before = (finished_run / "report.json").read_text()
    result = kdistill("train", "/dev/null", "--out", str(finished_run), *TINY, cache=tmp_path)
    assert result.returncode == 2
    assert "already holds results" in result.stderr and "--resume" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (finished_run / "report.json").read_text() == before


def test_resume_of_a_finished_run_repeats_nothing(finished_run, tmp_path):
    before = load_file(str(finished_run / "distill" / "student.safetensors"))
    result = kdistill("train", "/dev/null", "--out", str(finished_run), "--resume", *TINY, cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "already finished" in result.stderr
    after = load_file(str(finished_run / "distill" / "student.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_inspect_lists_layers_and_proposes_pairs(capsys):
    assert (
        main(
            [
                "inspect",
                "cnn",
                "--args",
                "{channels: [32, 64]}",
                "--input-shape",
                "1,28,28",
                "--student",
                "cnn",
                "--student-args",
                "{channels: [8, 16]}",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "stage1.0" in out and "Conv2d" in out and "2×32×28×28" in out
    assert "{student: stage2, teacher: stage2}" in out
    assert main(["inspect", "--list"]) == 0
    assert "resnet8x4" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["train", "/dev/null", "--set", "train.epoch=3"], "unknown key train.epoch; did you mean 'epochs'"),
        (["train", "/dev/null", "--set", "train.epochs=three"], "train.epochs must be an integer"),
        (["train", "/dev/null", "--set", "distill.temperature=-2"], "temperature must be > 0"),
        (["train", "/dev/null", "--set", "data.batch_size=0"], "data.batch_size must be ≥ 1"),
        (["train", "/dev/null", "--set", "data.dataset=mnist"], "unknown dataset 'mnist'; did you mean 'mnist5k'"),
        (["train", "/dev/null", "--set", "student.model=cnnn"], "unknown model 'cnnn'; did you mean 'cnn'"),
        (["train", "/dev/null", "--set", "nonsense"], "expected key.sub=value"),
        (["inspect", "cnn", "--input-shape", "a,b"], "expected integers"),
        (["eval", "/nonexistent"], "not a kdistill run directory"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    assert main([*args, "--out", str(tmp_path / "r")] if args[0] == "train" else args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_yaml_syntax_error_names_the_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("train:\n  epochs: 3\n  lr: [0.1\n")
    assert main(["train", str(config), "--out", str(tmp_path / "r")]) == 2
    assert "YAML syntax error at line" in capsys.readouterr().err


def test_train_mixup_reaches_both_the_baseline_and_the_distilled_student(tmp_path):
    from kdistill.cli import main as cli

    out = tmp_path / "run"
    args = [
        "train",
        "/dev/null",
        "--out",
        str(out),
        "--quiet",
        *TINY,
        "--set",
        "train.epochs=1",
        "--set",
        "train.mixup=1.0",
        "--set",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    assert cli(args) == 0
    for phase in ("baseline", "distill"):
        checkpoint = torch.load(out / phase / "checkpoint.pt", weights_only=True)
        assert all(key.startswith("task.") for key in checkpoint["model"]), phase  # wrapped in Mixup
