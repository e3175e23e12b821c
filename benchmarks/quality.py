"""Does distillation beat training the student alone? A paired, multi-seed study (issue: quality).

For one dataset and the shipped defaults (`kdistill demo`'s config), every seed trains, from the
same initial weights, with the same budget, batches and augmentation:

* ``baseline``: the student alone (cross-entropy);
* ``response``: response distillation, the defaults;
* ``response + feature``: the same plus one feature pair (``--pair student:teacher``).

One teacher serves all seeds (trained once, cached). Reported: mean ± std of last-epoch test
accuracy and of the test accuracy at the best *validation* epoch, the paired difference to the
baseline, wins per seed, the share of the teacher–baseline gap closed, and wall time — and the
same paired difference on the *validation* split, which is the only number any choice of settings
may be based on (the test columns are read once, after choosing).

    .venv/bin/python benchmarks/quality.py --seeds 5                       # mnist5k, ~15 min
    .venv/bin/python benchmarks/quality.py --seeds 5 --dataset digits      # ~3 min
    .venv/bin/python benchmarks/quality.py --set distill.temperature=2     # any config override
    .venv/bin/python benchmarks/quality.py --arms response --cache-dir /tmp/kd  # skip the feature arm,
                                                                      # keep the teacher for next time
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from timing import machine, write_tables

from kdistill.cli import _demo_config_path
from kdistill.config import load_config
from kdistill.data import load_data
from kdistill.models import load_weights
from kdistill.pipeline import build_pair, cached_teacher_path, run
from kdistill.trainer import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--pair", default="stage2:stage2", help="student:teacher layers of the feature variant")
    parser.add_argument("--set", action="append", default=[], help="config overrides for every variant")
    parser.add_argument("--name", default=None, help="results file name (default quality-<dataset>)")
    parser.add_argument(
        "--arms", default="response,feature", help="distilled arms to run: response, feature or both (default)"
    )
    parser.add_argument("--cache-dir", default=None, help="teacher/cache directory to reuse across studies")
    args = parser.parse_args()
    student_layer, teacher_layer = args.pair.split(":")
    workdir = Path(tempfile.mkdtemp(prefix="kdistill-quality-"))
    cache_dir = args.cache_dir or workdir / "cache"
    overrides = [f"data.dataset={args.dataset}", f"cache_dir={cache_dir}", *args.set]
    if args.dataset == "digits":  # 8×8 images: two pooling stages for both models
        overrides += ["teacher.args={channels: [32, 64]}", "student.args={channels: [8, 16]}"]
    arms = {arm.strip() for arm in args.arms.split(",")}
    if not arms or arms - {"response", "feature"}:
        parser.error(f"--arms: expected response, feature or both, got {args.arms!r}")
    feature = [f"distill.feature_pairs=[{{student: {student_layer}, teacher: {teacher_layer}}}]"]
    variants = {}
    if "response" in arms:
        variants["response"] = []
    if "feature" in arms:  # only one arm trains the baseline
        variants["response + feature"] = feature if "response" not in arms else ["baseline=false", *feature]
    runs: dict[str, list[dict]] = {"baseline": [], **{name: [] for name in variants}}
    seconds: dict[str, float] = {name: 0.0 for name in runs}
    teacher_accuracy = teacher_validation = None
    for seed in range(args.seeds):
        for name, extra in variants.items():
            config = load_config(_demo_config_path(), [*overrides, f"train.seed={seed}", *extra])
            out = workdir / f"{name.replace(' ', '')}-{seed}"
            started = time.perf_counter()
            report = run(config, out, log=lambda line: None)
            teacher_accuracy = report["teacher"]["accuracy"]
            if teacher_validation is None:
                teacher_validation = teacher_validation_accuracy(config)
            runs[name].append(phase(out / "distill", report["student"]["accuracy"]))
            if "baseline" in report:
                runs["baseline"].append(phase(out / "baseline", report["baseline"]["accuracy"]))
                seconds["baseline"] += phase_seconds(out / "baseline")
            seconds[name] += (
                time.perf_counter() - started - (phase_seconds(out / "baseline") if "baseline" in report else 0)
            )
            print(f"seed {seed} {name}: {runs[name][-1]}  baseline: {runs['baseline'][-1]}", flush=True)
    table = summarise(runs, teacher_accuracy, teacher_validation, seconds)
    result = {
        "machine": machine(),
        "dataset": args.dataset,
        "seeds": args.seeds,
        "overrides": overrides[2:],
        "teacher_accuracy": teacher_accuracy,
        "teacher_validation_accuracy": teacher_validation,
        "runs": runs,
        "summary": table,
    }
    lines = [
        f"`{args.dataset}`, {args.seeds} seeds, teacher {100 * teacher_accuracy:.2f} % test, "
        f"{100 * teacher_validation:.2f} % validation (overrides: {', '.join(overrides[2:]) or 'none'})",
        "",
        "| variant | last epoch | best-validation epoch | Δ vs baseline (last) | wins | gap closed "
        "| validation: last | Δ | gap closed | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['last']} | {row['best']} | {row.get('delta', '—')} | {row.get('wins', '—')} "
            f"| {row.get('gap_closed', '—')} | {row['validation']} | {row.get('validation_delta', '—')} "
            f"| {row.get('validation_gap_closed', '—')} | {row['seconds']:.0f} |"
        )
    lines += [
        "",
        "Accuracies are percentages, mean ± std over seeds; Δ is the paired difference. The best epoch is "
        "chosen on the validation split, never on the test split; the validation columns are what choices "
        "are made on.",
        "",
    ]
    path = write_tables(args.name or f"quality-{args.dataset}", result, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")


def epoch_records(directory: Path) -> list[dict]:
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "epoch"]


def phase(directory: Path, last_accuracy: float) -> dict[str, float]:
    """Last-epoch test and validation accuracy, and the test accuracy at the best validation epoch."""
    epochs = epoch_records(directory)
    best = max(epochs, key=lambda r: (r["validation/accuracy"], r["epoch"]))
    return {
        "last": last_accuracy,
        "best": best["test/accuracy"],
        "best_epoch": best["epoch"],
        "validation": epochs[-1]["validation/accuracy"],
    }


def teacher_validation_accuracy(config) -> float:
    """The cached teacher's accuracy on the validation split."""
    splits = load_data(config.data)
    teacher, _ = build_pair(config, splits)
    load_weights(teacher, cached_teacher_path(config), "teacher")
    return evaluate(teacher, splits.validation, config.data.eval_batch_size)["accuracy"]


def phase_seconds(directory: Path) -> float:
    return float(json.loads((directory / "done.json").read_text())["seconds"])


def summarise(
    runs: dict[str, list[dict]], teacher: float, teacher_validation: float, seconds: dict[str, float]
) -> dict[str, dict]:
    def mean_std(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"

    table = {}
    for name, rows in runs.items():
        row = {
            "last": mean_std([r["last"] for r in rows]),
            "best": mean_std([r["best"] for r in rows]),
            "validation": mean_std([r["validation"] for r in rows]),
            "seconds": seconds[name],
        }
        if name != "baseline":
            for key, reference, prefix in (("last", teacher, ""), ("validation", teacher_validation, "validation_")):
                deltas = [r[key] - b[key] for r, b in zip(rows, runs["baseline"])]
                gap = reference - statistics.mean(b[key] for b in runs["baseline"])
                row[f"{prefix}delta"] = (
                    f"{100 * statistics.mean(deltas):+.2f} ± {100 * statistics.pstdev(deltas):.2f} pp"
                )
                row[f"{prefix}gap_closed"] = f"{100 * statistics.mean(deltas) / gap:.0f} %" if gap > 0 else "—"
            row["wins"] = f"{sum(r['last'] > b['last'] for r, b in zip(rows, runs['baseline']))}/{len(rows)}"
        table[name] = row
    return table


if __name__ == "__main__":
    main()
