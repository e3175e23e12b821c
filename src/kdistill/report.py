"""The compression report: measure models and write ``report.json``, ``report.md`` and plots.

Nothing here knows about distillation: it measures modules that map inputs to
logits and compares them with the first one (the teacher).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.checkpoint import untied
from kdistill.core.calls import call_model, default_logits
from kdistill.data import Data, Inputs, first_inputs, primary, select, trim_padding

ROLES = ("teacher", "baseline", "student")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_mb(model: nn.Module) -> float:
    """Bytes of the model's state dict (parameters and buffers), a tied tensor (one tensor under
    several keys: a causal LM's embedding and head) counted once, in MB (10⁶ bytes): what a
    safetensors export holds (it stores a tied tensor once too), give or take its small header."""
    return sum(t.numel() * t.element_size() for t in untied(model.state_dict()).values()) / 1e6


@torch.inference_mode()
def predictions(model: nn.Module, data: Data, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([default_logits(call_model(model, inputs)).argmax(-1) for inputs, _ in data.batches(batch_size)])


@torch.inference_mode()
def time_models(
    models: Mapping[str, nn.Module], sample: Inputs, batch_size: int, rounds: int = 100, batch_rounds: int = 7
) -> dict[str, dict[str, float]]:
    """Median batch-1 latency (ms, over ``rounds``) and throughput (samples/s at ``batch_size``, median
    of ``batch_rounds``), one thread, the models interleaved round by round so that machine noise
    hits them alike. Token batches are trimmed to their longest sentence, as in training."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, batch = (trim_padding(select(sample, slice(0, size))) for size in (1, batch_size))
        batch_len = len(primary(batch))
        for model in models.values():
            model.eval()
            for _ in range(5):
                call_model(model, single)
            call_model(model, batch)
        latency = _interleaved(models, single, rounds)
        batch_time = _interleaved(models, batch, batch_rounds)
    finally:
        torch.set_num_threads(threads)
    return {
        name: {
            "latency_ms": 1000 * statistics.median(latency[name]),
            "throughput": batch_len / statistics.median(batch_time[name]),
        }
        for name in models
    }


def _interleaved(models: Mapping[str, nn.Module], inputs: Inputs, rounds: int) -> dict[str, list[float]]:
    """Seconds per call, round by round, in a shuffled order each round: whichever model runs right
    after the large teacher inherits its memory state, so no model may always hold that place."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    shuffler = random.Random(0)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            model = models[name]
            start = time.perf_counter()
            call_model(model, inputs)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def measure(
    models: Mapping[str, nn.Module], test: Data, batch_size: int = 256, timing_rounds: int = 100
) -> dict[str, Any]:
    """``report.json``'s content for ``models`` (``teacher`` first; ``student`` and, when
    trained, ``baseline`` after it), evaluated on ``test`` on the CPU."""
    models = {name: model.to("cpu").eval() for name, model in models.items()}
    predicted = {name: predictions(model, test, batch_size) for name, model in models.items()}
    timings = time_models(models, first_inputs(test, batch_size), batch_size, rounds=timing_rounds)
    report: dict[str, Any] = {}
    for name, model in models.items():
        entry = {
            "accuracy": float((predicted[name] == test.labels).float().mean()),
            "params": parameter_count(model),
            "size_mb": size_mb(model),
            **timings[name],
        }
        if name != "teacher" and "teacher" in predicted:
            entry["agreement"] = float((predicted[name] == predicted["teacher"]).float().mean())
        report[name] = entry
    report["ratios"] = ratios(report)
    report["warnings"] = accuracy_warnings(report)
    report["evaluated_on"] = {
        "samples": len(test),
        "latency_batch": 1,
        "throughput_batch": min(batch_size, len(test)),
        "threads": 1,
        "device": "cpu",
    }
    return report


def ratios(report: Mapping[str, Any]) -> dict[str, float | None]:
    teacher, student = report["teacher"], report["student"]
    out: dict[str, float | None] = {
        "params": teacher["params"] / student["params"],
        "size": teacher["size_mb"] / student["size_mb"],
        "latency": teacher["latency_ms"] / student["latency_ms"],
        "throughput": student["throughput"] / teacher["throughput"],
    }
    if "baseline" in report:
        out["gap_closed"] = gap_closed(teacher["accuracy"], report["baseline"]["accuracy"], student["accuracy"])
    return out


def gap_closed(teacher: float, baseline: float, student: float) -> float | None:
    """``(student − baseline) / (teacher − baseline)``: the share of the teacher–baseline accuracy
    gap that distillation closed (None when the baseline already matches or beats the teacher)."""
    gap = teacher - baseline
    return (student - baseline) / gap if gap > 0 else None


def accuracy_warnings(report: Mapping[str, Any]) -> list[str]:
    """One sentence for each model that outscores its teacher on the test set.

    A student (or the baseline) that beats its teacher means the teacher is not the ceiling this
    comparison assumes: most often it was under-trained, and a distilled student then learns a
    weaker target than the data allows."""
    teacher = report["teacher"]["accuracy"]
    return [
        f"the {role} ({100 * report[role]['accuracy']:.2f} %) outscores its teacher ({100 * teacher:.2f} %): "
        "the teacher is probably under-trained; give it a longer budget (teacher.epochs) or bring a "
        "stronger one (teacher.weights)."
        for role in ROLES[1:]
        if role in report and report[role]["accuracy"] > teacher
    ]


def binomial_half_width(accuracy: float, samples: int, z: float = 1.96) -> float:
    """Half-width ``z · sqrt(p (1 − p) / n)`` of the interval of an accuracy ``p`` measured on
    ``n = samples`` independent test samples: 95 % at the default ``z``, the binomial standard
    error itself at ``z = 1`` (normal approximation; 0 at p = 0 or 1, where it understates the
    true uncertainty)."""
    return z * math.sqrt(accuracy * (1 - accuracy) / samples)


def t_quantile(degrees_of_freedom: int, confidence: float = 0.95) -> float:
    """The two-sided Student-t quantile ``t((1 + confidence) / 2, df)``: 2.776 for df = 4 at 95 %."""
    # scipy is installed with scikit-learn (a dependency, for the `digits` data); imported here
    # so that a plain `import kdistill` does not pay for it.
    from scipy.stats import t

    return float(t.ppf((1 + confidence) / 2, degrees_of_freedom))


def paired_difference(values: list[float], reference: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Summary of the per-seed differences ``values[i] − reference[i]`` (two arms that share each
    seed's initial weights and batches): ``mean``, ``std`` (the sample standard deviation, n − 1),
    the Student-t interval ``low``/``high`` = mean ∓ ``half_width`` (n − 1 degrees of freedom; NaN
    for a single seed), ``n``, and the seeds on which ``values`` was higher (``wins``) or equal (``ties``)."""
    if len(values) != len(reference) or not values:
        raise ValueError(f"paired_difference: {len(values)} values against {len(reference)} references")
    deltas = [v - r for v, r in zip(values, reference)]
    n = len(deltas)
    mean = statistics.mean(deltas)
    std = statistics.stdev(deltas) if n > 1 else 0.0
    half_width = t_quantile(n - 1, confidence) * std / math.sqrt(n) if n > 1 else math.nan
    return {
        "mean": mean,
        "std": std,
        "half_width": half_width,
        "low": mean - half_width,
        "high": mean + half_width,
        "n": n,
        "wins": sum(d > 0 for d in deltas),
        "ties": sum(d == 0 for d in deltas),
    }


def markdown(report: Mapping[str, Any], title: str = "Compression report", plots: list[str] = ()) -> str:
    """The human-readable ``report.md``."""
    roles = [r for r in ROLES if r in report]
    lines = [
        f"# {title}",
        "",
        "| model | accuracy | params | size (MB) | latency (ms, batch 1) | throughput (samples/s) "
        "| agreement with teacher |",
        "|---|---|---|---|---|---|---|",
    ]
    for role in roles:
        r = report[role]
        agreement = f"{100 * r['agreement']:.1f} %" if "agreement" in r else "—"
        lines.append(
            f"| {role} | {100 * r['accuracy']:.2f} % | {r['params']:,} | {r['size_mb']:.3f} | "
            f"{r['latency_ms']:.3f} | {r['throughput']:,.0f} | {agreement} |"
        )
    q = report["ratios"]
    lines += [
        "",
        f"The student has **{q['params']:.1f}× fewer parameters**, is **{q['size']:.1f}× smaller** and "
        f"**{q['latency']:.1f}× faster** at batch 1 ({q['throughput']:.1f}× the throughput) than the teacher.",
    ]
    if "baseline" in report:
        t, b, s = (report[k]["accuracy"] for k in ("teacher", "baseline", "student"))
        closed = q.get("gap_closed")
        verdict = (
            f"closed **{100 * closed:.0f} %** of the teacher–baseline gap"
            if closed is not None
            else "had no gap to close (the baseline already matches or beats the teacher)"
        )
        lines += [
            "",
            f"Distillation moved the student from {100 * b:.2f} % (trained alone, same budget) to "
            f"{100 * s:.2f} % ({100 * (s - b):+.2f} pp; teacher {100 * t:.2f} %): it {verdict}.",
        ]
    lines += [line for warning in accuracy_warnings(report) for line in ("", f"**Warning:** {warning}")]
    e = report.get("evaluated_on", {})
    if e:
        # The noise of one run's accuracy, at the student's measured accuracy on this many samples:
        # differences between the rows smaller than this are not resolved by one run.
        p = report["student"]["accuracy"]
        se = binomial_half_width(p, e["samples"], z=1.0)
        lines += [
            "",
            f"Measured on {e['samples']:,} test samples, {e['device']}, {e['threads']} thread; latency is the "
            f"median of interleaved runs at batch 1, throughput at batch {e['throughput_batch']}. "
            f"At {100 * p:.2f} % on this many samples one run's accuracy has a binomial standard error of "
            f"{100 * se:.2f} pp: its 95 % interval is ±{100 * 1.96 * se:.2f} pp.",
        ]
    for plot in plots:
        lines += ["", f"![{Path(plot).stem}]({plot})"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, report: dict[str, Any], histories: Mapping[str, Path], title: str) -> list[Path]:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``run_dir``; return the files."""
    from kdistill.checkpoint import atomic_write

    plots = plot_report(run_dir, report, histories)
    text = markdown(report, title, [p.relative_to(run_dir).as_posix() for p in plots])
    atomic_write(run_dir / "report.md", lambda path: Path(path).write_text(text))
    # Last: a finished run's report.json means every report file is in place (a --resume relies on it).
    atomic_write(run_dir / "report.json", lambda path: Path(path).write_text(json.dumps(report, indent=2) + "\n"))
    return [run_dir / "report.json", run_dir / "report.md", *plots]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_report(run_dir: Path, report: Mapping[str, Any], histories: Mapping[str, Path]) -> list[Path]:
    """``plots/training.png`` (each loss term and accuracy over training) and ``plots/comparison.png``
    (teacher, baseline and student on accuracy, size and latency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = run_dir / "plots"
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    records = {role: read_metrics(path) for role, path in histories.items()}
    if any(records.values()):
        figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(12, 4.2))
        for role, rows in records.items():
            steps = [r for r in rows if r.get("kind") == "step"]
            terms = [
                k
                for k in (steps[0] if steps else {})
                if k in ("loss", "ce", "response", "feature") or k.startswith("feature/")
            ]
            plotted: list[list[float]] = []
            for term in terms:
                values = [r[term] for r in steps]
                if not any(values) or values in plotted:  # an unused term, or `loss` equal to `ce`
                    continue
                plotted.append(values)
                loss_axis.plot([r["step"] for r in steps], _smooth(values), label=f"{role}: {term}", linewidth=1)
            epochs = [r for r in rows if r.get("kind") == "epoch"]
            for key in [k for k in (epochs[0] if epochs else {}) if k.endswith("/accuracy")]:
                accuracy_axis.plot(
                    [r["epoch"] for r in epochs],
                    [100 * r[key] for r in epochs],
                    marker=".",
                    label=f"{role}: {key.split('/')[0]}",
                )
        loss_axis.set(xlabel="optimizer step", ylabel="loss (smoothed)", yscale="log", title="loss terms")
        accuracy_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
        for axis in (loss_axis, accuracy_axis):
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        figure.tight_layout()
        written.append(directory / "training.png")
        figure.savefig(written[-1], dpi=110)
        plt.close(figure)

    roles = [r for r in ROLES if r in report]
    colours = {"teacher": "#4c72b0", "baseline": "#999999", "student": "#dd8452"}
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for axis, (key, label, scale, fmt) in zip(
        axes,
        [
            ("accuracy", "test accuracy (%)", 100, "%.2f"),
            ("size_mb", "size (MB)", 1, "%.3f"),
            ("latency_ms", "latency, batch 1, 1 thread (ms)", 1, "%.3f"),
        ],
    ):
        values = [scale * report[r][key] for r in roles]
        bars = axis.bar(roles, values, color=[colours[r] for r in roles])
        axis.bar_label(bars, fmt=fmt, fontsize=8)
        axis.set_title(label)
        if key == "accuracy":
            low = min(values)
            axis.set_ylim(max(0, low - 3 * (max(values) - low) - 1), min(100, max(values) + 1))
    figure.tight_layout()
    written.append(directory / "comparison.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)
    return written


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(max(total / min(index + 1, window), 1e-8))
    return out
