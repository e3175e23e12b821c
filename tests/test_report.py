"""The report's numbers on tiny models whose answers are known."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdistill.data import TensorData
from kdistill.report import gap_closed, markdown, measure, parameter_count, size_mb, write_report


class Fixed(nn.Module):
    """Predicts class ``inputs[:, k]``'s argmax over a fixed permutation of columns."""

    def __init__(self, width: int, permutation: list[int]) -> None:
        super().__init__()
        self.linear = nn.Linear(4, width)
        self.register_buffer("permutation", torch.tensor(permutation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.permutation] + 0 * self.linear(x).sum()


def test_parameter_count_and_size_of_known_models():
    linear = nn.Linear(10, 5)  # 55 float32 parameters = 220 bytes
    assert parameter_count(linear) == 55
    assert size_mb(linear) == pytest.approx(220 / 1e6)
    bn = nn.BatchNorm1d(4)  # 8 parameters + running mean/var (8 floats) + num_batches_tracked (int64)
    assert parameter_count(bn) == 8
    assert size_mb(bn) == pytest.approx((16 * 4 + 8) / 1e6)
    assert size_mb(nn.Linear(10, 5).half()) == pytest.approx(110 / 1e6)


def test_accuracy_agreement_and_ratios():
    inputs = torch.eye(4).repeat(5, 1)  # each row's argmax is its position
    labels = torch.arange(4).repeat(5)
    test = TensorData(inputs, labels)
    teacher = Fixed(16, [0, 1, 2, 3])  # always right
    baseline = Fixed(2, [1, 0, 2, 3])  # wrong on classes 0 and 1 → 50 %
    student = Fixed(2, [0, 1, 3, 2])  # wrong on classes 2 and 3 → 50 %, 50 % agreement
    report = measure({"teacher": teacher, "baseline": baseline, "student": student}, test, timing_rounds=6)
    assert report["teacher"]["accuracy"] == 1.0
    assert report["baseline"]["accuracy"] == 0.5 and report["student"]["accuracy"] == 0.5
    assert report["student"]["agreement"] == 0.5
    assert "agreement" not in report["teacher"]
    assert report["teacher"]["params"] == 4 * 16 + 16 and report["student"]["params"] == 4 * 2 + 2
    assert report["ratios"]["params"] == pytest.approx(80 / 10)
    assert report["ratios"]["gap_closed"] == 0.0
    for role in ("teacher", "baseline", "student"):
        assert report[role]["latency_ms"] > 0 and report[role]["throughput"] > 0


def test_gap_closed():
    assert gap_closed(0.98, 0.96, 0.97) == pytest.approx(0.5)
    assert gap_closed(0.98, 0.96, 0.95) == pytest.approx(-0.5)
    assert gap_closed(0.96, 0.96, 0.97) is None


def test_written_report_files(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {"kind": "step", "step": i, "epoch": 1, "loss": 1.0 / (i + 1), "ce": 0.5, "response": 0.2, "feature": 0.1}
        for i in range(20)
    ] + [{"kind": "epoch", "epoch": 1, "step": 20, "test/accuracy": 0.9}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = {
        "teacher": {"accuracy": 0.98, "params": 100, "size_mb": 0.4, "latency_ms": 2.0, "throughput": 1000.0},
        "baseline": {
            "accuracy": 0.95,
            "params": 10,
            "size_mb": 0.04,
            "latency_ms": 0.5,
            "throughput": 4000.0,
            "agreement": 0.95,
        },
        "student": {
            "accuracy": 0.97,
            "params": 10,
            "size_mb": 0.04,
            "latency_ms": 0.5,
            "throughput": 4000.0,
            "agreement": 0.97,
        },
    }
    from kdistill.report import ratios

    report["ratios"] = ratios(report)
    files = write_report(tmp_path, report, {"distill": metrics}, "test report")
    assert {f.name for f in files} == {"report.json", "report.md", "training.png", "comparison.png"}
    text = (tmp_path / "report.md").read_text()
    assert "10.0× fewer parameters" in text and "closed **67 %**" in text
    assert "![training](plots/training.png)" in text
    assert markdown(report).count("| student |") == 1
