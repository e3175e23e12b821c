"""Does the batch-consuming trainer cost anything? (issue #14: no regression in speed)

One epoch of the demo's baseline phase — the 6.3k-parameter student on the 3,600 real `mnist5k`
training digits, batch 128, shift augmentation, AdamW, one thread — three ways, interleaved in one
process (a shuffled order each round):

* ``direct loop``: the previous trainer's data path, written out — a seeded permutation, batches
  taken from the in-memory tensors by index, augmented, forward, backward, step (no DataLoader,
  no callbacks): what the trainer did per step before it consumed batches;
* ``Trainer, TensorData``: today's `Trainer` given the dataset (it builds a DataLoader over an
  `EpochBatchSampler`; `TensorData.__getitems__` hands over whole batches), with its callbacks;
* ``Trainer, user DataLoader``: today's `Trainer` given `DataLoader(TensorDataset, shuffle=True)`,
  torch's per-sample collation (what a library user who brings a loader gets).

Goal: Trainer ÷ direct loop throughput ≥ 0.95.

    .venv/bin/python benchmarks/engine.py            # ~1 minute; writes benchmarks/results/engine.{json,md}
    .venv/bin/python benchmarks/engine.py --rounds 2 --results-dir /tmp/engine   # smoke test
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from timing import interleave, machine, single_thread, summary, write_tables
from torch.utils.data import DataLoader, TensorDataset

from kdistill.config import DataConfig, TrainConfig
from kdistill.data import ShiftViews, load_data
from kdistill.models import build_model
from kdistill.pipeline import Supervised
from kdistill.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args()
    single_thread()
    splits = load_data(DataConfig(dataset="mnist5k"))
    train = splits.train
    torch.manual_seed(0)
    student = build_model("cnn", {"channels": [8, 16, 32]}, input_shape=splits.input_shape, num_classes=10)
    config = TrainConfig(epochs=1, lr=3e-3, seed=0)
    augment = ShiftViews(len(train), views=10, input_shape=splits.input_shape)
    batch = 128

    def direct_loop() -> None:
        task = Supervised(copy.deepcopy(student))
        optimizer = torch.optim.AdamW(task.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 1_000_003))
        for indices in train.index_batches(batch, order):
            inputs, labels = train.take(indices)
            out = task(augment(inputs, indices, 0), labels)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            float(out["loss"].detach())  # the loop logs every scalar

    def trainer_epoch() -> None:
        task = Supervised(copy.deepcopy(student))
        Trainer(task, task.parameters(), train, config, batch_size=batch, augment=augment).fit()

    def user_loader_epoch() -> None:  # its batches carry no index, so it runs without the shift augmentation
        task = Supervised(copy.deepcopy(student))
        loader = DataLoader(TensorDataset(train.inputs, train.labels), batch_size=batch, shuffle=True)
        Trainer(task, task.parameters(), loader, config).fit()

    variants = {
        "direct loop": direct_loop,
        "Trainer, TensorData": trainer_epoch,
        "Trainer, user DataLoader (no augmentation)": user_loader_epoch,
    }
    times = interleave(variants, args.rounds, warmup=2)
    rows = {name: summary(seconds, len(train)) for name, seconds in times.items()}
    reference = rows["direct loop"]["median_ms"]
    ratio = reference / rows["Trainer, TensorData"]["median_ms"]
    lines = [
        "| one demo baseline epoch (3,600 images, batch 128, 1 thread) | median s | p10 s | p90 s | images/s |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['median_ms'] / 1000:.2f} | {row['p10_ms'] / 1000:.2f} | {row['p90_ms'] / 1000:.2f} "
            f"| {row['samples_per_s']:,.0f} |"
        )
    info = machine()
    lines += [
        "",
        f"Trainer (TensorData) ÷ direct loop throughput: **{ratio:.3f}** (goal ≥ 0.95). The Trainer variants "
        "also evaluate nothing and write nothing (no run directory); they do build their optimizer, "
        "scheduler and loader each epoch, as the direct loop builds its optimizer.",
        "",
        f"{args.rounds} interleaved rounds, {info['threads']} thread, load average {info['load_average']}.",
    ]
    result = {"machine": info, "rounds": args.rounds, "rows": rows, "trainer_over_direct_throughput": ratio}
    path = write_tables("engine", result, "\n".join(lines) + "\n", args.results_dir)
    print("\n".join(lines))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
