"""How close is a distillation step to its limits? (issue: speed)

One thread, the demo's models (a 94k-parameter CNN teacher, a 6.3k-parameter student) on the
real `mnist5k` digits, batch 128, AdamW. Step variants run interleaved in one process, in a shuffled
order each round, and each round reads a fresh random batch (the same one for every variant): a fixed
batch would read the same cached rows every time and time a hot cache.

* plain student step (cross-entropy only) — the floor of any distillation step;
* teacher forward alone;
* live distillation (response only; and response + one 1×1-conv-adapted feature pair);
* cached distillation (teacher outputs read from a float16 `TeacherCache`; same two variants).

Limits: cached ÷ plain → 1.0; live ÷ (plain + teacher forward) → 1.0. Also measured: epoch time
of the demo's distillation phase with and without the cache (4 fixed shift views), and the
cache's size per sample for each storage option.

    .venv/bin/python benchmarks/speed.py          # ~2 minutes; writes benchmarks/results/speed.{json,md}
    .venv/bin/python benchmarks/speed.py --rounds 2 --epoch-rounds 1 --results-dir /tmp/speed   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import itertools
import random
import tempfile
import time
from pathlib import Path

import torch
from timing import interleave, machine, single_thread, summary, write_tables

from kdistill import Distiller, FeaturePair
from kdistill.cache import CachedDistillation, TeacherCache
from kdistill.config import DataConfig, TrainConfig
from kdistill.data import ShiftViews, load_data
from kdistill.models import build_model
from kdistill.pipeline import Supervised
from kdistill.trainer import Trainer

PAIR = [FeaturePair("stage2", "stage2")]  # (N, 16, 7, 7) → (N, 64, 7, 7): a 1×1 convolution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--epoch-rounds", type=int, default=3)
    parser.add_argument(
        "--results-dir", type=Path, default=None, help="where to write speed.{json,md} (default benchmarks/results)"
    )
    args = parser.parse_args()
    single_thread()
    splits = load_data(DataConfig(dataset="mnist5k", augment="none"))
    shape, classes = splits.input_shape, splits.num_classes
    torch.manual_seed(0)
    teacher = build_model("cnn", {"channels": [32, 64, 128]}, input_shape=shape, num_classes=classes).eval()
    student = build_model("cnn", {"channels": [8, 16, 32]}, input_shape=shape, num_classes=classes)
    workdir = Path(tempfile.mkdtemp(prefix="kdistill-speed-"))

    caches = {}
    for storage in ("float16", "float32"):
        for layers in ([], ["stage2"]):
            name = f"{storage}, {'logits + stage2 feature' if layers else 'logits only'}"
            caches[name] = TeacherCache.build(
                workdir / name.replace(" ", "_"), teacher, splits.train, layers=layers, storage=storage, progress=False
            )
    caches["topk (k=3, τ=4), logits only"] = TeacherCache.build(
        workdir / "topk", teacher, splits.train, storage="topk", topk=3, temperature=4.0, progress=False
    )
    cache_response = caches["float16, logits only"]
    cache_feature = caches["float16, logits + stage2 feature"]

    batch, warmup = 128, 5
    # A fresh random batch every round, as in training: one fixed batch would read the same 128
    # cached rows every time (a hot cache) and flatter the cached variants. Round r of every variant
    # reads batch r; the rows are gathered before timing, as a data loader would have them ready.
    batches = [
        (indices, splits.train.inputs[indices], splits.train.labels[indices])
        for indices in random_batches(len(splits.train), batch, warmup + args.rounds)
    ]

    def step_fn(model, parameters, cached: bool = False):
        optimizer = torch.optim.AdamW(list(parameters), lr=1e-3)
        rounds = itertools.cycle(batches)

        def step() -> None:
            indices, inputs, labels = next(rounds)
            keywords = {"indices": indices, "epoch": 0} if cached else {}
            loss = model(inputs, labels, **keywords)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    def forward_fn():
        rounds = itertools.cycle(batches)
        return lambda: teacher_forward(teacher, next(rounds)[1])

    def distiller(pairs):
        return Distiller(teacher, copy.deepcopy(student), pairs, sample_input=splits.train.inputs[:2])

    plain = Supervised(copy.deepcopy(student))
    live, live_feature = distiller([]), distiller(PAIR)
    cached, cached_feature = distiller([]), distiller(PAIR)
    variants = {
        "plain student step": step_fn(plain, plain.parameters()),
        "teacher forward": forward_fn(),
        "live, response": step_fn(live, live.trainable_parameters()),
        "cached, response": step_fn(
            CachedDistillation(cached, cache_response), cached.trainable_parameters(), cached=True
        ),
        "live, response + feature": step_fn(live_feature, live_feature.trainable_parameters()),
        "cached, response + feature": step_fn(
            CachedDistillation(cached_feature, cache_feature), cached_feature.trainable_parameters(), cached=True
        ),
    }
    times = interleave(variants, rounds=args.rounds, warmup=warmup)
    rows = {name: summary(seconds, batch) for name, seconds in times.items()}
    ms = {name: row["median_ms"] for name, row in rows.items()}
    ratios = {
        "cached, response ÷ plain": ms["cached, response"] / ms["plain student step"],
        "cached, response + feature ÷ plain": ms["cached, response + feature"] / ms["plain student step"],
        "live, response ÷ (plain + teacher forward)": ms["live, response"]
        / (ms["plain student step"] + ms["teacher forward"]),
        "live, response + feature ÷ (plain + teacher forward)": ms["live, response + feature"]
        / (ms["plain student step"] + ms["teacher forward"]),
    }

    epochs = demo_epochs(teacher, student, splits, workdir, args.epoch_rounds)
    sizes = {name: cache.bytes_per_sample for name, cache in caches.items()}
    result = {
        "machine": machine(),
        "batch_size": batch,
        "rounds": args.rounds,
        "steps": rows,
        "ratios": ratios,
        "epoch_seconds": epochs,
        "cache_bytes_per_sample": sizes,
    }
    lines = [
        "| step (batch 128, 1 thread) | median ms | p10 ms | p90 ms | samples/s |",
        "|---|---|---|---|---|",
        *(
            f"| {n} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | {r['samples_per_s']:,.0f} |"
            for n, r in rows.items()
        ),
        "",
        "| ratio (medians, one run) | value |",
        "|---|---|",
        *(f"| {name} | **{value:.3f}** |" for name, value in ratios.items()),
        "",
        "| demo distillation phase, one epoch (3,600 images, 4 fixed shift views) | median s |",
        "|---|---|",
        *(f"| {name} | {value:.2f} |" for name, value in epochs.items()),
        "",
        "| cache storage | bytes per sample |",
        "|---|---|",
        *(f"| {name} | {value:,.0f} |" for name, value in sizes.items()),
        "",
        f"{args.rounds} interleaved rounds; {result['machine']['threads']} thread; load average "
        f"{result['machine']['load_average'][0]} on a {result['machine']['cpus']}-core shared machine.",
        "",
    ]
    path = write_tables("speed", result, "\n".join(lines), args.results_dir)
    print("\n".join(lines))
    print(f"wrote {path}")


def random_batches(samples: int, batch: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` batches of ``batch`` distinct sample indices in ``[0, samples)``, each drawn afresh
    (seeded, so a rerun times the same rows)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(samples, generator=generator)[:batch] for _ in range(count)]


@torch.no_grad()
def teacher_forward(teacher, inputs) -> None:
    teacher(inputs)


def demo_epochs(teacher, student, splits, workdir: Path, rounds: int) -> dict[str, float]:
    """Seconds per epoch of the demo's distillation (response only) with a live and a cached teacher."""
    views = ShiftViews(len(splits.train), views=4)
    cache = TeacherCache.build(workdir / "views", teacher, splits.train, augment=views, progress=False)
    config = TrainConfig(epochs=1)
    seconds: dict[str, list[float]] = {"live teacher": [], "cached teacher": []}
    order, shuffler = list(seconds), random.Random(0)
    for _ in range(rounds):
        shuffler.shuffle(order)  # neither variant always runs first (see timing.interleave)
        for name in order:
            distiller = Distiller(teacher, copy.deepcopy(student), sample_input=splits.train.inputs[:2])
            model = CachedDistillation(distiller, cache) if name == "cached teacher" else distiller
            trainer = Trainer(model, distiller.trainable_parameters(), splits.train, config, augment=views)
            started = time.perf_counter()
            trainer.fit()
            seconds[name].append(time.perf_counter() - started)
    return {name: sorted(values)[len(values) // 2] for name, values in seconds.items()}


if __name__ == "__main__":
    main()
