"""SIGKILL (or Ctrl-C) at any point loses nothing: checkpoints stay readable, --resume ends bit-identical,
and resuming a finished run changes none of its weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import TINY

SETTINGS = [*TINY, "--set", "train.epochs=3", "--set", "teacher.epochs=2"]


def train(out, cache, *extra, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "KDISTILL_CACHE": str(cache)}
    env.pop("KDISTILL_KILL_AT", None)
    if kill_at:
        env["KDISTILL_KILL_AT"] = kill_at
    command = [sys.executable, "-m", "kdistill", "train", "/dev/null", "--out", str(out), "--quiet", *SETTINGS, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    result = train(root / "run", root / "cache")
    assert result.returncode == 0, result.stderr
    return root / "run"


def final_weights(run):
    return {phase: load_file(str(run / phase / "student.safetensors")) for phase in ("baseline", "distill")} | {
        "adapters": load_file(str(run / "distill" / "adapters.safetensors"))
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at",
    [
        "step:5",  # teacher training, first epoch
        "checkpoint:2",  # the teacher's first best-weights write (write 1 is config.yaml)
        "step:40",  # baseline, mid-epoch
        "evaluate:4",  # the baseline's second evaluation
        "checkpoint:9",  # the trained teacher's write into the cache of teachers
        "cache:2",  # the teacher-output cache build
        "cache:2:INT",  # Ctrl-C during the teacher-output cache build
        "step:60",  # the first distillation epoch
        "checkpoint:18",  # the distillation phase's first best-weights write
        "checkpoint:19",  # the distillation phase's first checkpoint
        "step:75",  # distillation, mid-epoch
        "checkpoint:25",  # the trained adapters' write
        "report:1",  # every phase finished (done.json written), before the report: resume a finished run
    ],
)
def test_sigkill_then_resume_is_bit_identical(reference, tmp_path, kill_at):
    run, cache = tmp_path / "run", tmp_path / "cache"
    killed = train(run, cache, kill_at=kill_at)
    expected = 130 if kill_at.endswith(":INT") else -signal.SIGKILL
    assert killed.returncode == expected, (kill_at, killed.returncode, killed.stderr[-500:])
    for checkpoint in run.glob("*/checkpoint.pt"):
        torch.load(checkpoint, weights_only=True)  # never torn
    resumed = train(run, cache, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not list(run.glob("*/.*.tmp")), "a crashed write left its temporary file behind"
    want, got = final_weights(reference), final_weights(run)
    for name in want:
        assert want[name].keys() == got[name].keys()
        for key in want[name]:
            assert torch.equal(want[name][key], got[name][key]), (kill_at, name, key)
