"""Is memory bounded by the batch, not the data? (issue #14: data larger than memory)

The same run — a dataset factory's lazily generated 28×28 images, the demo's teacher (random weights,
given as a file: nothing to train) and student, live distillation, the same 40 optimizer updates,
one evaluation — on 20,000 and on 200,000 training samples, each in a fresh process. Peak resident
memory is the process's ``ru_maxrss``; "above start" subtracts what the process held after importing
kdistill and torch. Goal: the 200k run's peak ≤ 1.15× the 20k run's. Each size runs twice, under
glibc's default allocator settings and under ``MALLOC_MMAP_THRESHOLD_=131072``: with the default, the
allocator's dynamic mmap threshold moves large tensors onto the heap, where fragmentation grows with
the number of batches a process has seen (not with what it holds).

    .venv/bin/python benchmarks/memory.py             # ~3 minutes; writes benchmarks/results/memory.{json,md}
    .venv/bin/python benchmarks/memory.py --sizes 2000 20000 --results-dir /tmp/memory   # smoke test
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import machine, write_tables

HERE = Path(__file__).resolve().parent


class Generated(torch.utils.data.Dataset):
    """``size`` images made on demand from their index (the same image every time): never all in memory."""

    def __init__(self, size: int, offset: int = 0) -> None:
        self.size, self.offset = size, offset
        self.targets = [(offset + i) % 10 for i in range(size)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        label = self.targets[index]
        generator = torch.Generator().manual_seed(self.offset + index)
        image = 0.3 * torch.rand(1, 28, 28, generator=generator)
        image[0, 2 * label : 2 * label + 6, 4:24] += 0.7  # a learnable class mark
        return image, label


def splits(size: int):
    return Generated(size), Generated(size // 10, offset=10**9)


def generated_20000():
    return splits(20_000)


def generated_200000():
    return splits(200_000)


def generated_2000():
    return splits(2_000)


CHILD = """
import resource, sys, torch
sys.path.insert(0, {here!r})
from kdistill.cli import main
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = main({argv!r})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT", code, start, peak)
"""


def run_one(size: int, teacher: Path, workdir: Path, repeat: int = 0, allocator: str = "") -> dict[str, float]:
    argv = [
        "train", "/dev/null", "--out", str(workdir / f"run{size}-{repeat}{allocator[:6]}"), "--quiet",
        "--set", f"data.dataset=memory:generated_{size}", "--set", "data.augment=none",
        "--set", f"teacher.weights={teacher}", "--set", "baseline=false",
        "--set", "distill.teacher_cache=off", "--set", "train.max_steps=40", "--set", "data.batch_size=128",
        "--set", "data.eval_batch_size=256",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDISTILL_CACHE": str(workdir / "cache"), "PYTHONPATH": str(HERE)}
    if allocator:
        env["MALLOC_MMAP_THRESHOLD_"] = allocator
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(here=str(HERE), argv=argv)], capture_output=True, text=True, env=env
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT")), None)
    if done.returncode != 0 or line is None or line.split()[1] != "0":
        raise SystemExit(f"the {size} run failed:\n{done.stderr[-2000:]}")
    _, _, start_kb, peak_kb = line.split()
    return {
        "samples": size,
        "allocator": f"MALLOC_MMAP_THRESHOLD_={allocator}" if allocator else "glibc default",
        "peak_mb": int(peak_kb) / 1024,
        "start_mb": int(start_kb) / 1024,
        "above_start_mb": (int(peak_kb) - int(start_kb)) / 1024,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[20_000, 200_000])
    parser.add_argument("--repeats", type=int, default=2, help="runs per size (fresh processes)")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args()
    from safetensors.torch import save_file

    from kdistill.models import build_model

    workdir = Path(tempfile.mkdtemp(prefix="kdistill-memory-"))
    torch.manual_seed(0)
    teacher = build_model("cnn", {"channels": [32, 64, 128]}, input_shape=(1, 28, 28), num_classes=10)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, workdir / "teacher.safetensors")
    teacher_file = workdir / "teacher.safetensors"
    lines = [
        "| allocator | training samples | peak RSS of each run (MB) | at start (MB) | peak above start (MB) "
        "| run time (s) |",
        "|---|---|---|---|---|---|",
    ]
    result_rows, ratios = [], {}
    for allocator in ("", "131072"):  # glibc's default, then a fixed mmap threshold (no heap fragmentation)
        runs = [run_one(size, teacher_file, workdir, r, allocator) for r in range(args.repeats) for size in args.sizes]
        peaks = {size: [run for run in runs if run["samples"] == size] for size in args.sizes}
        for size, mine in peaks.items():
            start = mine[0]["start_mb"]
            lines.append(
                f"| {mine[0]['allocator']} | {size:,} | {_column(mine, 'peak_mb')} | {start:.0f} "
                f"| {_column(mine, 'above_start_mb')} | {_column(mine, 'seconds')} |"
            )
        small, large = (peaks[size] for size in args.sizes)
        # The least favourable pairing: the largest peak of the big runs over the smallest of the small ones.
        ratios[runs[0]["allocator"]] = max(r["peak_mb"] for r in large) / min(r["peak_mb"] for r in small)
        result_rows += runs
    ratio_text = "; ".join(f"{name}: **{value:.3f}**" for name, value in ratios.items())
    info = machine()
    lines += [
        "",
        f"Largest peak of the {args.sizes[1]:,}-sample runs ÷ smallest of the {args.sizes[0]:,}-sample runs — "
        f"{ratio_text} (goal ≤ 1.15). Every run trains 40 optimizer updates (batch 128, evaluation batch 256) "
        "and evaluates once, on a factory's lazily generated data (`benchmarks/memory.py: Generated`), one "
        f"process each, 1 thread; load average {info['load_average']}.",
    ]
    result = {"machine": info, "runs": result_rows, "peak_ratio": ratios}
    path = write_tables("memory", result, "\n".join(lines) + "\n", args.results_dir)
    print("\n".join(lines))
    print(f"\nwrote {path}")


def _column(runs: list[dict], key: str) -> str:
    return ", ".join(f"{run[key]:.0f}" for run in runs)


if __name__ == "__main__":
    main()
