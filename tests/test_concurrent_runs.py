"""Real processes started together: two on one --out, three sharing one cache directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_cli import TINY

ROUNDS = 3


def start(out: Path, cache: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "kdistill", "train", "/dev/null", "--out", str(out), "--quiet", *TINY]
    env = {**os.environ, "KDISTILL_CACHE": str(cache)}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=600)
    return process.returncode, err


def students(run: Path) -> dict:
    return {name: load_file(str(run / "distill" / name)) for name in ("student.safetensors", "adapters.safetensors")}


def assert_same(a: dict, b: dict) -> None:
    for name in a:
        assert a[name].keys() == b[name].keys()
        assert all((a[name][k] == b[name][k]).all() for k in a[name]), name


@pytest.fixture(scope="module")
def solo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("solo")
    code, err = finish(start(root / "run", root / "cache"))
    assert code == 0, err
    return students(root / "run")


@pytest.mark.slow
def test_two_processes_on_one_run_directory_one_runs_the_other_is_told(solo, tmp_path):
    for round_ in range(ROUNDS):
        out, cache = tmp_path / f"run{round_}", tmp_path / f"cache{round_}"
        results = [finish(p) for p in [start(out, cache), start(out, cache)]]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        refused = next(err for code, err in results if code == 2)
        assert refused.count("\n") == 1 and refused.startswith("kdistill: error:"), refused
        assert "in use by another kdistill process" in refused or "already holds results" in refused, refused
        assert_same(solo, students(out))


@pytest.mark.slow
def test_three_runs_sharing_a_cache_directory_all_succeed_with_the_same_result(solo, tmp_path):
    for round_ in range(ROUNDS - 1):
        cache = tmp_path / f"cache{round_}"
        outs = [tmp_path / f"r{round_}-{i}" for i in range(3)]
        results = [finish(p) for p in [start(out, cache) for out in outs]]
        assert all(code == 0 for code, _ in results), results
        for out in outs:
            assert_same(solo, students(out))
        assert not [p for p in cache.rglob("*") if p.name.endswith(".partial")], "a build left its folder behind"
