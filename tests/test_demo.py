"""The demo as a newcomer runs it — real MNIST digits, the shipped config and its whole pipeline
(teacher, baseline, cached teacher outputs, distilled student, report) — on a short budget.

Whether the distilled student beats its baseline at the full 60-epoch budget is a claim about
accuracy, within one run's noise on one seed (see the README); it is measured over seeds by
``benchmarks/quality.py``, not asserted here, where another CPU gives other, equally valid numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_reports_a_several_times_smaller_student(tmp_path):
    env = {**os.environ, "KDISTILL_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "kdistill", "demo", "--out", str(tmp_path / "demo"), "--set", "train.epochs=3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["ratios"]["params"] >= 5
    # Three epochs learn digits well above chance (10 %), the teacher (trained first) and both students.
    for model in ("teacher", "baseline", "student"):
        assert report[model]["accuracy"] > 0.3, report
    assert "teacher cache: built" in result.stdout + result.stderr
    assert "closed" in result.stdout and "| student |" in result.stdout
    for name in ("report.md", "plots", "distill/student.safetensors"):
        assert (tmp_path / "demo" / name).exists(), name
