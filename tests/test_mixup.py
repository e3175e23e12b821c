"""The mixup wrapper: mixed views for the task, the mixed cross-entropy on top."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill import Distiller
from kdistill.pipeline import Mixup, Supervised, with_mixup


def test_mixup_loss_is_the_weighted_cross_entropy_of_both_labels():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    inputs, labels = torch.randn(8, 5), torch.randint(0, 3, (8,))
    task = Mixup(Supervised(model), strength=0.4).train()
    torch.manual_seed(1)
    out = task(inputs, labels)
    torch.manual_seed(1)  # replay the same draws by hand
    weight = torch.distributions.Beta(torch.tensor(0.4), torch.tensor(0.4)).sample((8,))
    partner = torch.randperm(8)
    mixed = weight[:, None] * inputs + (1 - weight[:, None]) * inputs[partner]
    log_p = torch.log_softmax(model(mixed), -1)
    want = -(weight * log_p[torch.arange(8), labels] + (1 - weight) * log_p[torch.arange(8), labels[partner]]).mean()
    # float32, the same math in another order: a mean of 8 rows of log-softmax terms (|log p| ~ 1)
    # is off by a few ulp per term at most, so 64 ε ≈ 8e-6 relative holds whatever the CPU's kernels.
    tolerance = 64 * torch.finfo(torch.float32).eps
    assert out["loss"].item() == pytest.approx(want.item(), rel=tolerance)
    assert out["ce"].item() == pytest.approx(want.item(), rel=tolerance)


def test_mixup_keeps_the_distillers_terms_on_the_mixed_view():
    torch.manual_seed(0)
    teacher, student = nn.Linear(5, 3), nn.Linear(5, 3)
    distiller = Distiller(teacher, student, temperature=2.0)
    task = Mixup(distiller, strength=1.0).train()
    out = task(torch.randn(8, 5), torch.randint(0, 3, (8,)))
    assert out["loss"].item() == pytest.approx(out["response"].item() + out["ce"].item(), rel=1e-6)
    assert not teacher.training


def test_mixup_is_off_in_eval_and_at_strength_zero():
    model = nn.Linear(5, 3)
    supervised = Supervised(model)
    assert with_mixup(supervised, 0.0) is supervised
    task = Mixup(supervised, 1.0).eval()
    inputs, labels = torch.randn(4, 5), torch.randint(0, 3, (4,))
    assert task(inputs, labels)["loss"].item() == pytest.approx(supervised(inputs, labels)["loss"].item())
