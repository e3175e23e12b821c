"""Interleaved timing shared by the benchmark scripts (see ../shared/docs/measuring.md).

Variants run round by round in one process (A, C, B, then B, A, C, ...: every variant once per
round, in a freshly shuffled order) so that machine noise hits all of them alike and no variant
always runs right after the same one; we report the median and p10/p90 of each and ratios of medians.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def single_thread() -> None:
    """Time with one thread: on a shared 2-core machine two threads mean nothing."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def interleave(
    variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 3, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each variant: ``warmup`` untimed rounds, then ``rounds`` timed ones.

    Each round calls every variant once, in an order shuffled afresh (seeded, so a rerun repeats
    it): whichever variant follows a large one inherits its cache and allocator state, so no
    variant may always hold the same place."""
    order = list(variants)
    shuffler = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(warmup + rounds):
        shuffler.shuffle(order)
        for name in order:
            start = time.perf_counter()
            variants[name]()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def summary(seconds: list[float], batch_size: int) -> dict[str, float]:
    """Median, p10 and p90 milliseconds and samples per second at the median."""
    ordered = sorted(seconds)
    median = statistics.median(ordered)
    return {
        "median_ms": 1000 * median,
        "p10_ms": 1000 * ordered[int(0.1 * (len(ordered) - 1))],
        "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))],
        "samples_per_s": batch_size / median,
    }


def machine() -> dict[str, object]:
    """What ran the benchmark: record it next to every table."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in load],
    }


def write_tables(name: str, result: dict, markdown: str, directory: Path | None = None) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` under ``benchmarks/results``; return the markdown path."""
    directory = directory or Path(__file__).resolve().parent / "results"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    path = directory / f"{name}.md"
    path.write_text(markdown)
    return path
