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


def _kl(p, q) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def dkd(student, teacher, labels, temperature, alpha=1.0, beta=8.0) -> float:
    """Zhao et al. 2022, eq. (1)-(4), row by row: α·KL(b_t‖b_s) + β·KL(p̂_t‖p̂_s), times τ²."""
    values = []
    for s_row, t_row, gt in zip(student.double().tolist(), teacher.double().tolist(), labels.tolist()):
        p_s, p_t = softmax_row(s_row, temperature), softmax_row(t_row, temperature)
        b_s, b_t = [p_s[gt], 1 - p_s[gt]], [p_t[gt], 1 - p_t[gt]]
        rest_s = [p / (1 - p_s[gt]) for c, p in enumerate(p_s) if c != gt]
        rest_t = [p / (1 - p_t[gt]) for c, p in enumerate(p_t) if c != gt]
        values.append(alpha * _kl(b_t, b_s) + beta * _kl(rest_t, rest_s))
    return temperature**2 * sum(values) / len(values)


def _pearson(x, y) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def dist(student, teacher, temperature, beta=1.0, gamma=1.0) -> float:
    """Huang et al. 2022: τ²·(β·(1 − mean_i ρ(rows)) + γ·(1 − mean_c ρ(columns)))."""
    p_s = [softmax_row(r, temperature) for r in student.double().tolist()]
    p_t = [softmax_row(r, temperature) for r in teacher.double().tolist()]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(p_s, p_t)) / len(p_s)
    columns = range(len(p_s[0]))
    intra = 1 - sum(_pearson([r[c] for r in p_s], [r[c] for r in p_t]) for c in columns) / len(columns)
    return temperature**2 * (beta * inter + gamma * intra)
