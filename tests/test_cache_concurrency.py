"""Runs of a sweep that share a cache directory: several processes, started together, build the
same teacher-output cache and write the same trained-teacher weights file, round after round.
Every one must succeed and read exactly the same teacher outputs, and nothing temporary is left."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

WORKERS = 4
ROUNDS = 10


def _teacher_and_data():
    from kdistill.data import ShiftViews, TensorData
    from tests.conftest import TinyConvNet

    torch.manual_seed(0)
    teacher = TinyConvNet(8).eval()
    generator = torch.Generator().manual_seed(1)
    data = TensorData(torch.randn(192, 1, 8, 8, generator=generator), torch.randint(0, 10, (192,), generator=generator))
    return teacher, data, ShiftViews(192, views=3)


def _worker(root: str, rank: int, barrier, results) -> None:
    """Each round: wait for the others, then do what a run does (reuse the cache if it is there, else
    build it; open it; read every row), and write then read back the shared weights file."""
    torch.set_num_threads(1)
    try:
        from kdistill.cache import TeacherCache, fingerprint, tensor_digest
        from kdistill.checkpoint import read_state_dict, save_weights

        teacher, data, augment = _teacher_and_data()
        expected = fingerprint(teacher, data, augment, ["conv2"], "float16")
        own_weights = {"w": torch.full((1 << 18,), float(rank)), "b": torch.arange(rank + 1.0)}
        for round_ in range(ROUNDS):
            directory = Path(root) / f"round-{round_}" / "cache"
            barrier.wait(timeout=120)
            if not (directory / "meta.json").exists():
                TeacherCache.build(
                    directory, teacher, data, layers=["conv2"], augment=augment, batch_size=32, progress=False
                )
            cache = TeacherCache.open(directory, expected)
            rows = torch.arange(192)
            outputs = [
                tensor
                for epoch in range(3)
                for tensor in (cache.lookup(rows, epoch)[0], *cache.lookup(rows, epoch)[1].values())
            ]
            weights = Path(root) / f"round-{round_}" / "teacher.safetensors"
            barrier.wait(timeout=120)
            for _ in range(5):  # readers and writers interleave: every read is one writer's complete file
                save_weights(own_weights, weights)
                state = read_state_dict(weights)
                writer = int(state["w"][0])
                assert torch.equal(state["w"], torch.full((1 << 18,), float(writer)))
                assert torch.equal(state["b"], torch.arange(writer + 1.0))
            results.put((rank, round_, tensor_digest(outputs), None))
    except BaseException:
        results.put((rank, -1, None, traceback.format_exc()))


def test_concurrent_runs_share_one_cache_directory_safely(tmp_path):
    from kdistill.cache import TeacherCache, fingerprint

    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
    barrier, results = context.Barrier(WORKERS), context.Queue()
    processes = [
        context.Process(target=_worker, args=(str(tmp_path), rank, barrier, results)) for rank in range(WORKERS)
    ]
    for process in processes:
        process.start()
    reports = []
    try:
        while len(reports) < WORKERS * ROUNDS:
            reports.append(results.get(timeout=300))
            assert reports[-1][3] is None, f"worker {reports[-1][0]} failed:\n{reports[-1][3]}"
    except queue.Empty:
        raise AssertionError(f"workers stopped answering after {len(reports)} results") from None
    finally:
        for process in processes:
            process.join(timeout=60 if len(reports) == WORKERS * ROUNDS else 0)
            if process.is_alive():  # a failure: the others wait at the barrier, stop them now
                process.kill()
                process.join()
    assert all(process.exitcode == 0 for process in processes)

    # Every process read the same outputs in every round, and they are the teacher's (to float16 rounding).
    assert len({digest for _, _, digest, _ in reports}) == 1
    teacher, data, augment = _teacher_and_data()
    cache = TeacherCache.open(tmp_path / "round-0" / "cache", fingerprint(teacher, data, augment, ["conv2"], "float16"))
    with torch.no_grad():
        for epoch in range(3):
            shown = augment(data.inputs, torch.arange(192), epoch)
            logits, features = cache.lookup(torch.arange(192), epoch)
            torch.testing.assert_close(logits, teacher(shown), rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(features["conv2"], teacher.conv2(teacher.conv1(shown)), rtol=1e-3, atol=1e-3)

    # Nothing temporary is left beside the caches or the weights files.
    for round_ in range(ROUNDS):
        assert sorted(p.name for p in (tmp_path / f"round-{round_}").iterdir()) == ["cache", "teacher.safetensors"]


def test_a_second_build_keeps_the_complete_cache_already_there(tmp_path):
    """The first complete cache wins: a later builder verifies it and discards its own, so a
    process reading the first one never has it deleted under it."""
    from kdistill.cache import TeacherCache

    teacher, data, augment = _teacher_and_data()
    first = TeacherCache.build(tmp_path / "cache", teacher, data, layers=["conv2"], augment=augment, progress=False)
    inode = (first.directory / "logits.npy").stat().st_ino
    second = TeacherCache.build(tmp_path / "cache", teacher, data, layers=["conv2"], augment=augment, progress=False)
    assert (second.directory / "logits.npy").stat().st_ino == inode
    rows = torch.arange(192)
    assert torch.equal(second.lookup(rows, 2)[0], first.lookup(rows, 2)[0])  # the first reader still reads
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


BUILD_SCRIPT = """
import sys
import torch
from kdistill.cache import TeacherCache
from tests.test_cache_concurrency import _teacher_and_data

torch.set_num_threads(1)
teacher, data, augment = _teacher_and_data()
TeacherCache.build(sys.argv[1], teacher, data, layers=["conv2"], augment=augment, batch_size=32, progress=False)
"""


@pytest.mark.parametrize("kill_at", ["cache:2", "cache:2:INT"])
def test_a_build_killed_midway_leaves_nothing_that_outlives_the_next_build(tmp_path, kill_at):
    """Ctrl-C removes the build's temporary directory at once; after SIGKILL, the next build of the
    same cache deletes the dead process's leftovers (and only those)."""
    from kdistill.cache import TeacherCache

    environment = {**os.environ, "KDISTILL_KILL_AT": kill_at, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parent.parent
    killed = subprocess.run(
        [sys.executable, "-c", BUILD_SCRIPT, str(tmp_path / "cache")],
        env=environment,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if kill_at.endswith("INT"):
        assert killed.returncode == -signal.SIGINT and "KeyboardInterrupt" in killed.stderr, killed.stderr[-300:]
        assert list(tmp_path.iterdir()) == []
    else:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-300:]
        assert [p.name.endswith(".partial") for p in tmp_path.iterdir()] == [True]  # what the dead build left
    teacher, data, augment = _teacher_and_data()
    TeacherCache.build(tmp_path / "cache", teacher, data, layers=["conv2"], augment=augment, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
