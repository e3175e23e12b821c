"""Is memory bounded by the batch, not the data? (issue #14: data larger than memory)

Three arms, each run in fresh processes, one thread each:

* ``factory``: the same run — a dataset factory's lazily generated 28×28 images, the demo's teacher
  (random weights, given as a file: nothing to train) and student, live distillation, the same 40
  optimizer updates, one evaluation, the report — on 20,000 and on 200,000 training samples
  (validation and test sets scale with them). Under glibc's allocator as it comes (what
  ``kdistill train`` uses) and under fixed mmap thresholds (``MALLOC_MMAP_THRESHOLD_=t
  MALLOC_TRIM_THRESHOLD_=2t``, what the README suggests for data much larger than memory).
  Goal: the 200k run's peak ≤ 1.15× the 20k run's.
* ``folder``: the same run on an image folder (``data.dataset: folder``) of 2,000 and of 20,000
  generated 28×28 grayscale PNGs in 10 class sub-folders. Goal: ≤ 1.15×.
* ``speed``: one distillation epoch of the demo (3,600 ``mnist5k`` digits, batch 128, live teacher)
  per allocator setting, each setting in its own process, the settings interleaved round by round
  (a shuffled order each round), each process timing ``--epochs`` epochs after a warm-up one.

Peak resident memory is the process's ``ru_maxrss``; "above start" subtracts what the process
held after importing kdistill and torch.

    .venv/bin/python benchmarks/memory.py      # ~15 minutes on 2 busy cores; writes benchmarks/results/memory.{json,md}
    .venv/bin/python benchmarks/memory.py --sizes 2000 20000 --images 200 2000 --repeats 1 --rounds 1 \\
        --thresholds 1048576 --results-dir /tmp/memory   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import machine, write_tables

HERE = Path(__file__).resolve().parent
UNTOUCHED = "glibc default"
BOUNDED = str(1024 * 1024)  # the fixed mmap threshold the README suggests for data larger than memory (bytes)


class Generated(torch.utils.data.Dataset):
    """``size`` images made on demand from their index (the same image every time): never all in memory."""

    def __init__(self, size: int, offset: int = 0) -> None:
        self.size, self.offset = size, offset
        self.targets = [(offset + i) % 10 for i in range(size)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        label = self.targets[index]
        return image_of(self.offset + index, label), label


def image_of(seed: int, label: int) -> torch.Tensor:
    """A ``(1, 28, 28)`` image in [0, 1]: noise with a learnable class mark."""
    image = 0.3 * torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(seed))
    image[0, 2 * label : 2 * label + 6, 4:24] += 0.7
    return image


def splits(size: int):
    return Generated(size), Generated(size // 10, offset=10**9)


def generated_2000():
    return splits(2_000)


def generated_20000():
    return splits(20_000)


def generated_200000():
    return splits(200_000)


def write_folder(root: Path, count: int) -> Path:
    """``count`` 28×28 grayscale PNGs of :func:`image_of`, in ``root/<class>/`` (10 classes)."""
    from PIL import Image

    for index in range(count):
        label = index % 10
        pixels = (255 * image_of(index, label).clamp(0, 1)[0]).to(torch.uint8).numpy()
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(root / str(label) / f"{index:06d}.png")
    return root


def allocator_env(setting: str) -> dict[str, str]:
    """The environment of an allocator setting: glibc's own, or a fixed threshold in bytes."""
    if setting == UNTOUCHED:
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": setting, "MALLOC_TRIM_THRESHOLD_": str(2 * int(setting))}


def label(setting: str) -> str:
    if setting == UNTOUCHED:
        return "glibc default"
    return f"`MALLOC_MMAP_THRESHOLD_={setting}` ({mebibytes(int(setting))})"


def mebibytes(count: int) -> str:
    return f"{count // 1024} KiB" if count < 1024**2 else f"{count / 1024**2:g} MiB"


CHILD = """
import resource, sys, torch
sys.path.insert(0, {here!r})
from kdistill.cli import main
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = main({argv!r})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT", code, start, peak)
"""


def child_env(setting: str, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(OMP_NUM_THREADS="1", KDISTILL_CACHE=str(workdir / "cache"), PYTHONPATH=str(HERE))
    return {**env, **allocator_env(setting)}


def run_child(code: str, setting: str, workdir: Path, what: str) -> str:
    """Run ``code`` in a fresh Python under allocator ``setting``; its ``RESULT …`` line."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(setting, workdir))
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{what} failed:\n{done.stderr[-2000:]}")
    return line


def run_one(data: list[str], samples: int, teacher: Path, workdir: Path, setting: str) -> dict:
    """One training run in a fresh process: its peak memory and time."""
    argv = [
        "train", "/dev/null", "--out", str(Path(tempfile.mkdtemp(dir=workdir)) / "run"), "--quiet",
        *[arg for item in data for arg in ("--set", item)], "--set", "data.augment=none",
        "--set", f"teacher.weights={teacher}", "--set", "baseline=false",
        "--set", "distill.teacher_cache=off", "--set", "train.max_steps=40", "--set", "data.batch_size=128",
        "--set", "data.eval_batch_size=256",
    ]  # fmt: skip
    started = time.perf_counter()
    line = run_child(CHILD.format(here=str(HERE), argv=argv), setting, workdir, f"the run on {data}")
    _, code, start_kb, peak_kb = line.split()
    if code != "0":
        raise SystemExit(f"the run on {data} exited with status {code}")
    return {
        "samples": samples,
        "allocator": label(setting),
        "peak_mb": int(peak_kb) / 1024,
        "start_mb": int(start_kb) / 1024,
        "above_start_mb": (int(peak_kb) - int(start_kb)) / 1024,
        "seconds": time.perf_counter() - started,
    }


def peak_arm(title: str, datasets: dict[int, list[str]], settings: list[str], repeats: int, teacher, workdir):
    """Rows of a peak-memory table and each setting's ratio (the largest peak of the large runs
    over the smallest of the small ones: the least favourable pairing)."""
    lines = [
        f"| allocator | {title} | peak RSS of each run (MB) | at start (MB) | peak above start (MB) | run time (s) |",
        "|---|---|---|---|---|---|",
    ]
    runs, ratios = [], {}
    small, large = sorted(datasets)
    for setting in settings:
        mine = [run_one(datasets[n], n, teacher, workdir, setting) for _ in range(repeats) for n in (small, large)]
        for n in (small, large):
            of_n = [run for run in mine if run["samples"] == n]
            lines.append(
                f"| {label(setting)} | {n:,} | {_column(of_n, 'peak_mb')} | {of_n[0]['start_mb']:.0f} "
                f"| {_column(of_n, 'above_start_mb')} | {_column(of_n, 'seconds')} |"
            )
        peaks = {n: [run["peak_mb"] for run in mine if run["samples"] == n] for n in (small, large)}
        ratios[label(setting)] = max(peaks[large]) / min(peaks[small])
        runs += mine
    return lines, runs, ratios


SPEED_CHILD = """
import json, sys, time, copy, torch
sys.path.insert(0, {here!r})
from kdistill import Distiller
from kdistill.config import DataConfig, TrainConfig
from kdistill.data import load_data
from kdistill.models import build_model
from kdistill.trainer import Trainer
torch.set_num_threads(1)
splits = load_data(DataConfig(dataset="mnist5k"))
torch.manual_seed(0)
teacher = build_model("cnn", {{"channels": [32, 64, 128]}}, input_shape=splits.input_shape, num_classes=10)
student = build_model("cnn", {{"channels": [8, 16, 32]}}, input_shape=splits.input_shape, num_classes=10)
teacher.requires_grad_(False)
times = []
for epoch in range({epochs} + 1):
    distiller = Distiller(teacher, copy.deepcopy(student))
    start = time.perf_counter()
    Trainer(distiller, distiller.trainable_parameters(), splits.train, TrainConfig(epochs=1), batch_size=128).fit()
    times.append(time.perf_counter() - start)
print("RESULT", json.dumps({{"seconds": times[1:], "samples": len(splits.train)}}))
"""


def speed_arm(settings: list[str], rounds: int, epochs: int, workdir: Path) -> tuple[list[str], dict]:
    """One-epoch distillation throughput of each setting, interleaved round by round."""
    times: dict[str, list[float]] = {setting: [] for setting in settings}
    shuffler, order, samples = random.Random(0), list(settings), 0
    for _ in range(rounds):
        shuffler.shuffle(order)
        for setting in order:
            code = SPEED_CHILD.format(here=str(HERE), epochs=epochs)
            line = run_child(code, setting, workdir, f"the speed run under {label(setting)}")
            result = json.loads(line.split(" ", 1)[1])
            times[setting] += result["seconds"]
            samples = result["samples"]
    reference = statistics.median(times[UNTOUCHED])
    lines = [
        f"| allocator | one distillation epoch ({samples:,} images), median s | p10 s | p90 s | images/s "
        "| throughput ÷ glibc default |",
        "|---|---|---|---|---|---|",
    ]
    rows = {}
    for setting in settings:
        ordered = sorted(times[setting])
        median = statistics.median(ordered)
        rows[label(setting)] = {"seconds": ordered, "median_s": median, "ratio": reference / median}
        lines.append(
            f"| {label(setting)} | {median:.2f} | {ordered[int(0.1 * (len(ordered) - 1))]:.2f} "
            f"| {ordered[int(0.9 * (len(ordered) - 1))]:.2f} | {samples / median:,.0f} | {reference / median:.3f} |"
        )
    return lines, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes",
        type=int,
        nargs=2,
        choices=[2_000, 20_000, 200_000],
        default=[20_000, 200_000],
        help="factory training samples (the factories generated_<n> defined here)",
    )
    parser.add_argument("--images", type=int, nargs=2, default=[2_000, 20_000], help="images in each folder")
    parser.add_argument("--repeats", type=int, default=2, help="runs per size and allocator (fresh processes)")
    parser.add_argument(
        "--thresholds",
        type=int,
        nargs="*",
        default=[131072, 4194304, 16777216],
        help="fixed mmap thresholds to compare",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the speed arm")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per speed process")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args()
    from safetensors.torch import save_file

    from kdistill.models import build_model

    began = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="kdistill-memory-"))
    torch.manual_seed(0)
    teacher = build_model("cnn", {"channels": [32, 64, 128]}, input_shape=(1, 28, 28), num_classes=10)
    teacher_file = workdir / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, teacher_file)
    fixed = [str(t) for t in args.thresholds if str(t) != BOUNDED]

    factory = {n: [f"data.dataset=memory:generated_{n}"] for n in args.sizes}
    factory_lines, factory_runs, factory_ratios = peak_arm(
        "training samples", factory, [UNTOUCHED, BOUNDED], args.repeats, teacher_file, workdir
    )
    sweep_lines, sweep_runs, sweep_ratios = peak_arm("training samples", factory, fixed, 1, teacher_file, workdir)
    folders = {n: ["data.dataset=folder", f"data.path={write_folder(workdir / f'images{n}', n)}"] for n in args.images}
    folder_lines, folder_runs, folder_ratios = peak_arm(
        "images in the folder", folders, [UNTOUCHED, BOUNDED], args.repeats, teacher_file, workdir
    )
    speed_lines, speed_rows = speed_arm([UNTOUCHED, BOUNDED, *fixed], args.rounds, args.epochs, workdir)

    def ratio_text(ratios: dict[str, float]) -> str:
        return "; ".join(f"{name}: **{value:.3f}**" for name, value in ratios.items())

    info = machine()
    minutes = (time.perf_counter() - began) / 60
    small, large = args.sizes
    lines = [
        f"## A factory's lazily generated data: {small:,} vs {large:,} training samples",
        "",
        *factory_lines,
        "",
        f"Largest peak of the {large:,}-sample runs ÷ smallest of the {small:,}-sample runs — "
        f"{ratio_text(factory_ratios)} (goal ≤ 1.15).",
        "",
        "Fixed mmap thresholds (`MALLOC_MMAP_THRESHOLD_=t MALLOC_TRIM_THRESHOLD_=2t`), one run per size:",
        "",
        *sweep_lines,
        "",
        f"Ratios — {ratio_text(sweep_ratios)}.",
        "",
        f"## An image folder: {args.images[0]:,} vs {args.images[1]:,} PNGs (28×28 grayscale, 10 classes)",
        "",
        *folder_lines,
        "",
        f"Largest peak of the {args.images[1]:,}-image runs ÷ smallest of the {args.images[0]:,}-image runs — "
        f"{ratio_text(folder_ratios)} (goal ≤ 1.15).",
        "",
        "## What each allocator setting costs in speed",
        "",
        *speed_lines,
        "",
        f"{args.rounds} interleaved rounds of one process per setting, {args.epochs} timed epochs each after a "
        "warm-up epoch (the demo's teacher, live, and student; batch 128; no evaluation).",
        "",
        "Every memory run trains 40 optimizer updates (batch 128, evaluation batch 256), evaluates the validation "
        "and test sets, and writes the report; one process each, 1 thread. Validation and test sets grow with the "
        f"data. {info['cpus']} CPUs, load average at the end {info['load_average']}; the whole benchmark took "
        f"{minutes:.0f} minutes (`.venv/bin/python benchmarks/memory.py`).",
    ]
    result = {
        "machine": info,
        "minutes": minutes,
        "factory": {"runs": factory_runs, "peak_ratio": factory_ratios},
        "thresholds": {"runs": sweep_runs, "peak_ratio": sweep_ratios},
        "folder": {"runs": folder_runs, "peak_ratio": folder_ratios},
        "speed": speed_rows,
    }
    path = write_tables("memory", result, "\n".join(lines) + "\n", args.results_dir)
    print("\n".join(lines))
    print(f"\nwrote {path}")


def _column(runs: list[dict], key: str) -> str:
    return ", ".join(f"{run[key]:.0f}" for run in runs)


if __name__ == "__main__":
    main()
