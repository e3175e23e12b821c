"""A loss that turns NaN stops the run at that step, names the term and keeps the last good checkpoint."""

from __future__ import annotations

import torch

from kdistill.cli import main
from tests.test_cli import TINY

POISONED_STUDENT = '''
import torch
from kdistill.models import ConvNet

class Poisoned(ConvNet):
    """Trains normally for `healthy` forward passes, then its logits turn NaN."""

    def __init__(self, healthy, **kwargs):
        super().__init__(**kwargs)
        self.healthy = healthy
        self.calls = 0

    def forward(self, x):
        logits = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls > self.healthy:
                logits = logits * float("nan")
        return logits

def build(healthy=30, **kwargs):
    return Poisoned(healthy, channels=[2, 4], **kwargs)
'''


def test_injected_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    (tmp_path / "poisoned.py").write_text(POISONED_STUDENT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = [
        "train",
        "/dev/null",
        "--out",
        str(out),
        "--quiet",
        *TINY,
        "--set",
        "baseline=false",
        "--set",
        "student.model=poisoned:build",
        "--set",
        "student.args={healthy: 15}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    # digits: 1294 training samples, batch 128 → 11 steps per epoch; forward 16 is step 15, in epoch 2.
    assert err == (
        "kdistill: error: non-finite loss in term ce, response (the student's logits are not finite: check the "
        "inputs and the learning rate) at step 15 (epoch 2); the last good checkpoint is kept"
    )
    checkpoint = torch.load(out / "distill" / "checkpoint.pt", weights_only=True)
    assert checkpoint["state"]["epoch"] == 1 and checkpoint["state"]["batch"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
