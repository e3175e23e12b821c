"""The teacher-output cache built by two gloo processes, each its share of the batches, is the cache
one process builds; a failure on either rank fails both, publishes nothing and hangs neither."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdistill.cache import TeacherCache
from kdistill.core.errors import KDistillError
from kdistill.data import ShiftViews, TensorData
from kdistill.distributed import World, world
from tests.conftest import TinyConvNet, spawn_or_fail

SAMPLES, BATCH = 40, 16  # 3 batches per view (16, 16, 8); 3 views: 9 batches, 5 on rank 0 and 4 on rank 1
STORAGES = ("float16", "topk")


def _build(rank: int, size: int, root: str, fail: str) -> None:
    """As rank ``rank`` of ``size``, build a cache of each storage in ``root/ranks/<storage>`` with the
    other ranks; first, on rank 0 of a run without ``fail``, build each in ``root/alone/<storage>`` as one
    process. Write to ``root/rank<r>.json`` the batch size of every teacher forward of each build and
    the error raised, if any. ``fail``: ``rank:call`` makes that rank's teacher raise at that forward;
    ``unseen`` hides rank 0's private directory from rank 1 (a directory the ranks do not share)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = TinyConvNet(8).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(SAMPLES, 1, 8, 8, generator=generator)
    data = TensorData(inputs, torch.randint(0, 10, (SAMPLES,), generator=generator))
    calls: dict[str, list[int]] = {}

    def count(module, args) -> None:
        batches = calls[next(reversed(calls))]  # the build under way
        batches.append(len(args[0]))
        if fail == f"{rank}:{len(batches)}":
            raise RuntimeError("the teacher ran out of memory")

    def build(where: str, storage: str, place: World) -> None:
        calls[f"{where}/{storage}"] = []
        TeacherCache.build(
            Path(root) / where / storage,
            teacher,
            data,
            layers=["conv2"],
            augment=ShiftViews(SAMPLES, views=3),
            storage=storage,
            topk=3 if storage == "topk" else None,
            temperature=2.0 if storage == "topk" else None,
            batch_size=BATCH,
            progress=False,
            place=place,
        )

    teacher.register_forward_pre_hook(count)
    if rank == 0 and not fail:
        for storage in STORAGES:
            build("alone", storage, World())
    real_is_dir = Path.is_dir
    hidden = mock.patch.object(Path, "is_dir", lambda path: not path.name.endswith(".partial") and real_is_dir(path))
    outcome: dict = {}
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=size)
    try:
        with hidden if fail == "unseen" and rank == 1 else contextlib.nullcontext():
            for storage in STORAGES[: 1 if fail else None]:
                build("ranks", storage, world())
    except Exception as error:
        outcome = {"error": type(error).__name__, "message": str(error)}
    finally:
        dist.destroy_process_group()
    Path(root, f"rank{rank}.json").write_text(json.dumps({"calls": calls, **outcome}))


def _spawn(root: Path, fail: str = "", timeout: float = 120) -> list[dict]:
    """Run ``_build`` on 2 processes; a rank still running after ``timeout`` seconds is a hang."""
    hang = f"the ranks did not finish within {timeout} s: one waits for another that failed"
    spawn_or_fail(_build, (2, str(root), fail), timeout, hang)
    return [json.loads((root / f"rank{rank}.json").read_text()) for rank in range(2)]


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_the_cache_two_ranks_build_is_the_cache_one_process_builds(tmp_path):
    ranks = _spawn(tmp_path)
    assert [report.get("error") for report in ranks] == [None, None]
    for storage in STORAGES:
        # Each rank ran the teacher on its own share only, and the shares are one process's batches.
        assert ranks[0]["calls"][f"alone/{storage}"] == [16, 16, 8] * 3
        assert ranks[0]["calls"][f"ranks/{storage}"] == [16, 16, 8, 16, 16]
        assert ranks[1]["calls"][f"ranks/{storage}"] == [8, 16, 16, 8]

        # Every stored array is bit-equal: the same rows computed on the same batches by the same code.
        want, got = _files(tmp_path / "alone" / storage), _files(tmp_path / "ranks" / storage)
        assert sorted(got) == sorted(want) and len(want) > 2
        for name in want:
            if name != "meta.json":
                assert got[name] == want[name], (storage, name)
        meta_alone, meta_ranks = json.loads(want["meta.json"]), json.loads(got["meta.json"])
        # The top-k statistics are reduced over the ranks (sums and maxima): one process's, up to the
        # order of the float64 additions.
        statistics = ["truncation_kl_mean", "truncation_kl_max", "rest_mass_mean", "rest_mass_max"]
        for key in set(meta_alone) - {"meta_sha256", *statistics}:
            assert meta_ranks[key] == meta_alone[key], key
        for key in statistics if storage == "topk" else []:
            assert meta_alone[key] > 0
            assert meta_ranks[key] == pytest.approx(meta_alone[key], rel=1e-12), key
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == list(STORAGES)  # nothing temporary left


@pytest.mark.parametrize(
    ("fail", "failed", "words"),
    [
        ("1:2", 1, "RuntimeError: the teacher ran out of memory"),  # while the ranks write their rows
        ("0:1", 0, "RuntimeError: the teacher ran out of memory"),  # while rank 0 sizes the cache
        ("unseen", 1, "rank 1 cannot see .*, which rank 0 created; .* file system they share"),
    ],
)
def test_a_failure_on_one_rank_fails_both_and_publishes_nothing(tmp_path, fail, failed, words):
    ranks = _spawn(tmp_path, fail=fail)
    other = 1 - failed
    assert ranks[failed]["error"] == ("KDistillError" if fail == "unseen" else "RuntimeError")  # its own error
    assert re.search(words, f"{ranks[failed]['error']}: {ranks[failed]['message']}"), ranks[failed]
    assert ranks[other]["error"] == "KDistillError"  # the other rank's says which rank failed, and why
    assert re.search(f"{words}.* \\(on rank {failed}\\)$", ranks[other]["message"]), ranks[other]
    caches = tmp_path / "ranks"
    assert not caches.exists() or list(caches.iterdir()) == []  # no cache, no private directory


class Ragged(torch.nn.Module):
    """A teacher whose output width follows the batch size: a later batch's rows do not fit the files."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, : len(x)]


def test_rows_of_another_shape_than_the_first_batch_are_refused_and_nothing_is_left(tmp_path):
    data = TensorData(torch.randn(SAMPLES, 1, 8, 8), torch.zeros(SAMPLES, dtype=torch.long))
    with pytest.raises(KDistillError, match=r"logits output at row 32 has shape \(8,\), not \(16,\) as in the first"):
        TeacherCache.build(tmp_path / "cache", Ragged(), data, batch_size=BATCH, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_cli_run_under_torchrun_builds_the_cache_on_both_ranks_and_distils_the_same_student(tmp_path):
    """One process builds the cache (the rank-0-built cache of before); two ranks under torchrun build it
    again from the same teacher: equal caches, and the students distilled from them are equal."""
    from safetensors.torch import load_file

    from tests.test_cli import TINY

    settings = [*TINY, "--set", "baseline=false", "--set", "distill.teacher_cache=auto"]
    one, two = tmp_path / "cache-one", tmp_path / "cache-two"

    def train(cache: Path, out: str, *launcher: str) -> str:
        env = {**os.environ, "KDISTILL_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, *launcher, "-m", "kdistill", "train", "/dev/null", "--out", str(tmp_path / out)]
        result = subprocess.run([*command, *settings], capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    train(one, "alone")  # trains the teacher, and builds the cache in one process
    shutil.copytree(one, two, ignore=shutil.ignore_patterns("teacher-outputs"))  # the same teacher, no cache
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    said = train(one, "from-one", *torchrun)
    assert "teacher cache: reusing" in said, said
    assert re.search(r"teacher cache: built .* by 2 ranks\)", train(two, "from-two", *torchrun))

    (built_by_one,), (built_by_two,) = (list((root / "teacher-outputs").iterdir()) for root in (one, two))
    assert built_by_one.name == built_by_two.name  # the same fingerprint
    assert _files(built_by_two) == _files(built_by_one)
    want = load_file(str(tmp_path / "from-one" / "distill" / "student.safetensors"))
    got = load_file(str(tmp_path / "from-two" / "distill" / "student.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def _key_worker(rank: int, init_file: str, out: str) -> None:
    from kdistill.config import from_dict
    from kdistill.data import Splits
    from kdistill.pipeline import teacher_cache_key

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        part = TensorData(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
        # Each node's copy of the same folder: other file times, another local digest.
        splits = Splits("copy", part, None, part, 2, source_digest=f"files-on-node-{rank}")
        with open(os.path.join(out, f"key{rank}"), "w") as handle:
            handle.write(teacher_cache_key(from_dict({}), splits))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_keys_the_trained_teacher_by_rank_0s_data_digest(tmp_path):
    """~5 s. Otherwise rank 0 could find a cached teacher while another rank trains one, and hang."""
    mp.spawn(_key_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "key0").read_text() == (tmp_path / "key1").read_text()


def _reuse_worker(rank: int, init_file: str, tmp: str) -> None:
    from kdistill.config import from_dict
    from kdistill.pipeline import prepare_teacher

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Each node has its own cache directory; only rank 0's holds the trained teacher.
        config = from_dict({"cache_dir": os.path.join(tmp, f"cache{rank}")})
        prepare_teacher(config, torch.nn.Linear(4, 3), _copy_splits(rank), Path(tmp) / "run", False, print)
        Path(tmp, f"reused{rank}").touch()
    finally:
        dist.destroy_process_group()


def _copy_splits(rank: int):
    from kdistill.data import Splits

    part = TensorData(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    return Splits("copy", part, None, part, 2, source_digest="same-data")


@pytest.mark.slow
def test_rank_0_decides_whether_a_trained_teacher_is_reused(tmp_path):
    """~5 s. A rank that trained while rank 0 loaded would wait for it forever."""
    from kdistill.checkpoint import save_weights
    from kdistill.config import from_dict
    from kdistill.pipeline import cached_teacher_path

    path = cached_teacher_path(from_dict({"cache_dir": str(tmp_path / "cache0")}), _copy_splits(0))
    path.parent.mkdir(parents=True)
    save_weights(torch.nn.Linear(4, 3).state_dict(), path)
    hang = "the ranks hung: one trained the teacher while the other had loaded it"
    spawn_or_fail(_reuse_worker, (str(tmp_path / "init"), str(tmp_path)), 60, hang)
    assert (tmp_path / "reused0").exists() and (tmp_path / "reused1").exists()
    assert not (tmp_path / "run" / "teacher").exists()  # nobody trained
