"""Ctrl-C during `kdistill train` keeps a checkpoint; --resume ends with the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import TINY

SETTINGS = [*TINY, "--set", "train.epochs=6"]


def start(out, cache, *extra) -> subprocess.Popen:
    env = {**os.environ, "KDISTILL_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "kdistill", "train", "/dev/null", "--out", str(out), *SETTINGS, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_ctrl_c_then_resume_matches_an_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    reference = start(tmp_path / "reference", cache)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    run = start(tmp_path / "run", cache)
    checkpoint = tmp_path / "run" / "distill" / "checkpoint.pt"
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    code = run.wait(timeout=120)
    err = run.stderr.read()
    if code == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert code == 130, err
    assert "resume with: kdistill train /dev/null" in err and "--resume" in err
    assert "Traceback" not in err
    torch.load(checkpoint, weights_only=True)  # readable

    resumed = start(tmp_path / "run", cache, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    for phase in ("baseline", "distill"):
        want = load_file(str(tmp_path / "reference" / phase / "student.safetensors"))
        got = load_file(str(tmp_path / "run" / phase / "student.safetensors"))
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), phase
