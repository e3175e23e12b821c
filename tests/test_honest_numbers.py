"""Honest numbers (issues 12.14, 12.11, 12.1): noise computed from the test size, a warning when a
student outscores its teacher, paired differences with the sample standard deviation and a Student-t
interval, benchmark tables regenerated from the committed results, and benchmarks that do not time a
hot cache or a fixed variant order."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from kdistill.data import TensorData
from kdistill.report import (
    accuracy_warnings,
    binomial_half_width,
    markdown,
    measure,
    paired_difference,
    ratios,
    t_quantile,
    write_report,
)
from tests.test_report import Fixed

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the benchmark scripts import their sibling `timing`

import quality  # noqa: E402
import speed  # noqa: E402
import timing  # noqa: E402


def entry(accuracy: float) -> dict[str, float]:
    return {"accuracy": accuracy, "params": 10, "size_mb": 0.04, "latency_ms": 0.5, "throughput": 4000.0}


def hand_report(teacher: float, baseline: float, student: float, samples: int = 1000) -> dict:
    report = {"teacher": entry(teacher), "baseline": entry(baseline), "student": entry(student)}
    report["ratios"] = ratios(report)
    report["evaluated_on"] = {
        "samples": samples,
        "latency_batch": 1,
        "throughput_batch": 256,
        "threads": 1,
        "device": "cpu",
    }
    return report


# --- the noise of one run's accuracy, from n and p -----------------------------------------------


def test_noise_half_width_is_1_96_binomial_standard_errors():
    # By hand: p = 0.973, n = 1000 → SE = sqrt(0.973 · 0.027 / 1000) = 0.0051255…; 1.96 · SE = 0.010046…
    assert binomial_half_width(0.973, 1000) == pytest.approx(1.96 * math.sqrt(0.973 * 0.027 / 1000), rel=1e-12)
    assert binomial_half_width(0.973, 1000) == pytest.approx(0.010046, abs=1e-6)
    # p = 0.9 on 400 samples: SE = 0.3 / 20 = 0.015 exactly, so the interval is ±2.94 pp.
    assert binomial_half_width(0.9, 400) == pytest.approx(0.0294, abs=1e-12)
    assert binomial_half_width(1.0, 1000) == 0.0  # no spread at 100 %: the formula's own limit


def test_report_states_the_noise_of_its_own_test_size():
    text = markdown(hand_report(0.98, 0.96, 0.973, samples=1000))
    assert "±1.00 pp" in text and "1,000 test samples" in text and "97.30 %" in text
    small = markdown(hand_report(0.95, 0.85, 0.9, samples=400))
    assert "±2.94 pp" in small
    assert "±0.6 pp" not in text + small  # the old hard-coded figure


# --- a student (or baseline) that outscores its teacher ------------------------------------------


def test_warning_when_the_student_beats_its_teacher(tmp_path):
    inputs = torch.eye(4).repeat(5, 1)
    labels = torch.arange(4).repeat(5)
    teacher = Fixed(16, [1, 0, 2, 3])  # wrong on classes 0 and 1 → 50 %
    baseline = Fixed(2, [1, 0, 2, 3])  # 50 %: a tie is no warning
    student = Fixed(2, [0, 1, 2, 3])  # always right → 100 %
    report = measure({"teacher": teacher, "baseline": baseline, "student": student}, TensorData(inputs, labels), 256, 6)
    assert len(report["warnings"]) == 1
    warning = report["warnings"][0]
    assert "student" in warning and "teacher.epochs" in warning and "100.00 %" in warning
    write_report(tmp_path, report, {}, "t")
    assert json.loads((tmp_path / "report.json").read_text())["warnings"] == [warning]
    assert f"**Warning:** {warning}" in (tmp_path / "report.md").read_text()


def test_warning_names_a_baseline_that_beats_its_teacher():
    warnings = accuracy_warnings(hand_report(0.95, 0.96, 0.97))
    assert len(warnings) == 2
    assert warnings[0].startswith("the baseline (96.00 %)") and warnings[1].startswith("the student (97.00 %)")


def test_no_warning_when_the_teacher_is_best(tmp_path):
    inputs = torch.eye(4).repeat(5, 1)
    labels = torch.arange(4).repeat(5)
    models = {"teacher": Fixed(16, [0, 1, 2, 3]), "student": Fixed(2, [1, 0, 2, 3])}  # 100 % vs 50 %
    report = measure(models, TensorData(inputs, labels), 256, 6)
    assert report["warnings"] == []
    assert "Warning" not in markdown(report)
    assert accuracy_warnings(hand_report(0.98, 0.96, 0.98)) == []  # equal is not "outscores"


# --- paired differences over seeds ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("df", "expected"),  # two-sided 95 % quantiles t(0.975, df), from any printed t table
    [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)],
)
def test_t_quantile_matches_the_printed_table(df, expected):
    assert t_quantile(df) == pytest.approx(expected, abs=5e-4)


def test_paired_difference_uses_n_minus_1_and_a_t_interval():
    baseline = [0.90, 0.91, 0.92, 0.93, 0.94]
    distilled = [0.91, 0.93, 0.95, 0.97, 0.99]  # differences 0.01 … 0.05
    out = paired_difference(distilled, baseline)
    # By hand: mean 0.03; squared deviations sum to 0.001, over n − 1 = 4 → sd = sqrt(0.00025).
    sd = math.sqrt(0.001 / 4)
    assert out["n"] == 5
    assert out["mean"] == pytest.approx(0.03, abs=1e-12)
    assert out["std"] == pytest.approx(sd, rel=1e-9)
    assert out["std"] != pytest.approx(math.sqrt(0.001 / 5), rel=1e-3)  # not the population std
    assert out["half_width"] == pytest.approx(2.776 * sd / math.sqrt(5), rel=2e-4)
    assert out["low"] == pytest.approx(0.03 - out["half_width"])
    assert out["high"] == pytest.approx(0.03 + out["half_width"])
    assert (out["wins"], out["ties"]) == (5, 0)
    single = paired_difference([0.5], [0.4])
    assert single["std"] == 0.0 and math.isnan(single["half_width"])  # one seed: no interval


# --- the quality tables, regenerated from the committed results ----------------------------------


def test_quality_table_regenerates_test_and_validation_from_the_committed_json():
    result = json.loads((BENCHMARKS / "results" / "quality-mnist5k.json").read_text())
    text = quality.table(result)
    runs = result["runs"]
    for split in ("last", "validation"):
        deltas = [r[split] - b[split] for r, b in zip(runs["response"], runs["baseline"])]
        mean, sd = statistics.mean(deltas), statistics.stdev(deltas)  # sample std (n − 1)
        half = 2.776 * sd / math.sqrt(len(deltas))
        cell = f"{100 * mean:+.2f} ± {100 * sd:.2f} pp [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}]"
        assert cell in text, cell
    assert "teacher trained 20 epochs" in text
    assert "95 % interval" in text and "n − 1" in text


def test_quality_table_of_an_older_result_without_validation():
    result = json.loads((BENCHMARKS / "results" / "quality-mnist5k-60epochs.json").read_text())
    text = quality.table(result)
    response = next(line for line in text.splitlines() if line.startswith("| response |"))
    assert response.count("—") >= 3  # validation columns: not recorded then


def test_quality_pins_the_teacher_budget_of_the_committed_tables():
    overrides = quality.study_overrides("mnist5k", "/tmp/cache", ["train.seed=3"])
    assert "teacher.epochs=20" in overrides
    assert overrides.index("teacher.epochs=20") < overrides.index("train.seed=3")  # --set still wins


# --- benchmark timing hygiene --------------------------------------------------------------------


def test_interleave_shuffles_the_variant_order_each_round():
    calls: list[str] = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times = timing.interleave(variants, rounds=20, warmup=0)
    assert all(len(seconds) == 20 for seconds in times.values())
    orders = {tuple(calls[4 * r : 4 * r + 4]) for r in range(20)}
    assert all(sorted(order) == list("abcd") for order in orders)  # every variant once per round
    assert len(orders) > 1  # not the same fixed order every round
    assert sum(order[0] == "a" for order in orders) < len(orders)  # "a" does not always go first


def test_speed_reads_a_fresh_random_batch_each_round():
    batches = speed.random_batches(samples=3600, batch=128, count=20, seed=0)
    assert len(batches) == 20
    for indices in batches:
        assert indices.shape == (128,) and len(set(indices.tolist())) == 128
        assert int(indices.min()) >= 0 and int(indices.max()) < 3600
    assert len({tuple(indices.tolist()) for indices in batches}) == 20  # never the same rows twice


@pytest.mark.parametrize("script", sorted(path.stem for path in BENCHMARKS.glob("*.py")))
def test_every_benchmark_script_imports(script):
    # A benchmark runs for minutes to an hour: a name it imports from a sibling or from kdistill that
    # no longer exists must fail here, not at the start of somebody's long run.
    import importlib

    importlib.import_module(script)
