"""The demo as a newcomer runs it: real MNIST digits, the shipped defaults, a few minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_distils_a_several_times_smaller_student_that_beats_the_baseline(tmp_path):
    env = {**os.environ, "KDISTILL_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "kdistill", "demo", "--out", str(tmp_path / "demo")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["ratios"]["params"] >= 5
    assert report["ratios"]["latency"] > 1
    assert report["student"]["accuracy"] > report["baseline"]["accuracy"], report
    assert "closed" in result.stdout and "| student |" in result.stdout
