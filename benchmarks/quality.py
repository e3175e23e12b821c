"""Does distillation beat training the student alone? A paired, multi-seed study (issue: quality).

For one dataset and the shipped defaults (`kdistill demo`'s config), every seed trains, from the
same initial weights, with the same budget, batches and augmentation:

* ``baseline``: the student alone (cross-entropy);
* ``response``: response distillation, the defaults;
* ``response + feature``: the same plus one feature pair (``--pair student:teacher``).

One teacher serves all seeds (trained once, cached; ``teacher.epochs`` pinned to 20, the budget of
every committed table, unless ``--set`` says otherwise). Reported: mean ± sample std (n − 1) of
last-epoch test accuracy and of the test accuracy at the best *validation* epoch, the paired
difference to the baseline with its 95 % Student-t interval, wins per seed, the share of the
teacher–baseline gap closed, and wall time — and the same paired difference on the *validation*
split, which is the only number any choice of settings may be based on (the test columns are read
once, after choosing).

    .venv/bin/python benchmarks/quality.py --seeds 5                       # mnist5k, ~15 min
    .venv/bin/python benchmarks/quality.py --seeds 5 --dataset digits      # ~3 min
    .venv/bin/python benchmarks/quality.py --set distill.temperature=2     # any config override
    .venv/bin/python benchmarks/quality.py --arms response --cache-dir /tmp/kd  # skip the feature arm,
                                                                      # keep the teacher for next time
    .venv/bin/python benchmarks/quality.py --from-json benchmarks/results/quality-mnist5k.json
                                                # no training: rewrite a result's summary and table
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
from kdistill.report import paired_difference
from kdistill.trainer import evaluate

# The teacher budget of every committed table (benchmarks/results/quality-*.json): pinned, so that
# the commands in docs/quality.md reproduce them whatever the config's default teacher budget is.
TEACHER_EPOCHS = 20


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
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="train nothing: rewrite the summary and the table of this results file from its per-seed runs",
    )
    args = parser.parse_args()
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        result["summary"] = summarise(result)
        text = table(result)
        path = write_tables(args.from_json.stem, result, text, args.from_json.parent)
        print(text)
        print(f"wrote {path}")
        return
    student_layer, teacher_layer = args.pair.split(":")
    workdir = Path(tempfile.mkdtemp(prefix="kdistill-quality-"))
    cache_dir = args.cache_dir or workdir / "cache"
    overrides = study_overrides(args.dataset, str(cache_dir), args.set)
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
    teacher_epochs = TEACHER_EPOCHS
    for seed in range(args.seeds):
        for name, extra in variants.items():
            config = load_config(_demo_config_path(), [*overrides, f"train.seed={seed}", *extra])
            teacher_epochs = config.teacher.epochs
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
    result = {
        "machine": machine(),
        "dataset": args.dataset,
        "seeds": args.seeds,
        # what differs from the demo config besides the pinned teacher budget (recorded apart)
        "overrides": [o for o in overrides[2:] if o != f"teacher.epochs={TEACHER_EPOCHS}"],
        "teacher_epochs": teacher_epochs,
        "teacher_accuracy": teacher_accuracy,
        "teacher_validation_accuracy": teacher_validation,
        "runs": runs,
        "seconds": seconds,
    }
    result["summary"] = summarise(result)
    text = table(result)
    path = write_tables(args.name or f"quality-{args.dataset}", result, text)
    print(text)
    print(f"wrote {path}")


def study_overrides(dataset: str, cache_dir: str, sets: list[str]) -> list[str]:
    """The config overrides of every variant: the dataset and cache first, then the pinned teacher
    budget, then the user's ``--set`` (which may change it), then the small-image models for ``digits``."""
    overrides = [f"data.dataset={dataset}", f"cache_dir={cache_dir}", f"teacher.epochs={TEACHER_EPOCHS}", *sets]
    if dataset == "digits":  # 8×8 images: two pooling stages for both models
        overrides += ["teacher.args={channels: [32, 64]}", "student.args={channels: [8, 16]}"]
    return overrides


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


def summarise(result: dict) -> dict[str, dict]:
    """Per variant: mean and sample std (n − 1) of each split's accuracy, and for the distilled arms
    the paired difference to the baseline (``paired_difference``: mean, std, 95 % t interval, wins)
    with the share of the teacher–baseline gap it closes, on test (``delta``) and validation.
    Works on older results that recorded no validation accuracy (those entries are left out)."""
    runs = result["runs"]
    teachers = {"last": result["teacher_accuracy"], "validation": result.get("teacher_validation_accuracy")}
    summary = {}
    for name, rows in runs.items():
        row: dict = {"seconds": seconds_of(result)[name]}
        for key in ("last", "best", "validation"):
            values = [r[key] for r in rows if key in r]
            if len(values) == len(rows):
                row[key] = {
                    "mean": statistics.mean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                }
        if name != "baseline":
            for key, prefix in (("last", ""), ("validation", "validation_")):
                if key not in row or teachers[key] is None:
                    continue
                baseline = [b[key] for b in runs["baseline"]]
                delta = paired_difference([r[key] for r in rows], baseline)
                gap = teachers[key] - statistics.mean(baseline)
                row[f"{prefix}delta"] = delta
                row[f"{prefix}gap_closed"] = delta["mean"] / gap if gap > 0 else None
        summary[name] = row
    return summary


def seconds_of(result: dict) -> dict[str, float]:
    """Wall seconds per variant (older results kept them only in their summary)."""
    if "seconds" in result:
        return result["seconds"]
    return {name: row["seconds"] for name, row in result["summary"].items()}


def table(result: dict) -> str:
    """The markdown heading, table and notes of one study, from its results (``main``'s or a
    committed JSON's): test and validation side by side, paired Δ with its 95 % interval."""
    summary = summarise(result)
    # Results written before `teacher_epochs` was recorded all used the then-default of 20.
    validation = result.get("teacher_validation_accuracy")
    threads = result["machine"]["threads"]
    heading = (
        f"`{result['dataset']}`, {result['seeds']} seeds, teacher trained "
        f"{result.get('teacher_epochs', TEACHER_EPOCHS)} epochs: {100 * result['teacher_accuracy']:.2f} % test, "
        + (f"{100 * validation:.2f} % validation" if validation is not None else "validation not recorded")
        + f"; {threads} thread{'s' if threads != 1 else ''} (overrides: {', '.join(result['overrides']) or 'none'})"
    )
    lines = [
        heading,
        "",
        "| variant | test: last epoch | best-validation epoch | Δ vs baseline, mean ± sd [95 % interval] | wins "
        "| gap closed | validation: last epoch | Δ, mean ± sd [95 % interval] | wins | gap closed | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        cells = [name, mean_sd(row.get("last")), mean_sd(row.get("best"))]
        for prefix in ("", "validation_"):
            if prefix:
                cells.append(mean_sd(row.get("validation")))
            delta = row.get(f"{prefix}delta")
            gap = row.get(f"{prefix}gap_closed")
            cells += [
                delta_cell(delta),
                wins_cell(delta),
                "—" if delta is None or gap is None else f"{100 * gap:.0f} %",
            ]
        cells.append(f"{row['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracies are percentages, mean ± sample standard deviation (n − 1) over seeds. Δ is the per-seed "
        "paired difference to the baseline (same initial weights and batches): mean ± sd and its 95 % interval "
        "(Student t, n − 1 degrees of freedom); an interval that contains 0 leaves the sign unresolved. Wins "
        "count the seeds where the arm beat the baseline. The best epoch is chosen on the validation split, "
        "never on the test split; the validation columns are what choices are made on.",
        "",
    ]
    return "\n".join(lines)


def mean_sd(values: dict | None) -> str:
    return "—" if values is None else f"{100 * values['mean']:.2f} ± {100 * values['std']:.2f}"


def delta_cell(delta: dict | None) -> str:
    if delta is None:
        return "—"
    cell = f"{100 * delta['mean']:+.2f} ± {100 * delta['std']:.2f} pp"
    if delta["n"] > 1:
        cell += f" [{100 * delta['low']:+.2f}, {100 * delta['high']:+.2f}]"
    return cell


def wins_cell(delta: dict | None) -> str:
    if delta is None:
        return "—"
    ties = f" ({delta['ties']} tied)" if delta["ties"] else ""
    return f"{delta['wins']}/{delta['n']}{ties}"


if __name__ == "__main__":
    main()
