"""The spec's formulas written out by hand in float64, loop by loop, as the oracle."""

from __future__ import annotations

import math

import torch


def softmax_row(row: list[float], temperature: float) -> list[float]:
    scaled = [v / temperature for v in row]
    top = max(scaled)
    exps = [math.exp(v - top) for v in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def response(student, teacher, temperature, labels=None, ignore_index=-100, squared=True) -> float:
    """τ² · mean over kept rows of Σ_c P_t (log P_t − log P_s)."""
    classes = student.shape[-1]
    s_rows = student.double().reshape(-1, classes).tolist()
    t_rows = teacher.double().reshape(-1, classes).tolist()
    keep = [True] * len(s_rows) if labels is None else [int(v) != ignore_index for v in labels.reshape(-1)]
    values = []
    for s_row, t_row, kept in zip(s_rows, t_rows, keep):
        if not kept:
            continue
        p_s, p_t = softmax_row(s_row, temperature), softmax_row(t_row, temperature)
        values.append(sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s)))
    if not values:
        return 0.0
    return (temperature**2 if squared else 1.0) * sum(values) / len(values)


def cross_entropy(student, labels, ignore_index=-100) -> float:
    classes = student.shape[-1]
    rows = student.double().reshape(-1, classes).tolist()
    values = []
    for row, label in zip(rows, labels.reshape(-1).tolist()):
        if label == ignore_index:
            continue
        values.append(-math.log(softmax_row(row, 1.0)[label]))
    return sum(values) / len(values) if values else 0.0


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    flat_a, flat_b = a.double().reshape(-1).tolist(), b.double().reshape(-1).tolist()
    return sum((x - y) ** 2 for x, y in zip(flat_a, flat_b)) / len(flat_a)


def total(alpha, beta, response_value, feature_terms, weights, ce_value) -> float:
    feature = sum(w * f for w, f in zip(weights, feature_terms))
    return beta * (alpha * response_value + feature) + ce_value
