"""The model-agnostic trainer: schedules, determinism, checkpoints, resume, early stopping."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdistill.config import TrainConfig
from kdistill.core.errors import NonFiniteLossError
from kdistill.data import ShiftViews, TensorData
from kdistill.pipeline import Supervised
from kdistill.trainer import Trainer, evaluate


def toy_data(n: int = 96, seed: int = 0) -> TensorData:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 1, 6, 6, generator=generator)
    mean = inputs.mean(dim=(1, 2, 3))  # shift-augmentation barely changes it
    labels = (mean > 0.08).long() + (mean > -0.08).long()
    return TensorData(inputs, labels)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(64, 4))


def make_trainer(tmp_path=None, model=None, augment=None, **overrides) -> Trainer:
    settings = {"epochs": 3, "lr": 1e-2, "seed": 3, **overrides}
    model = model or toy_model()
    task = Supervised(model)
    data = toy_data()
    return Trainer(
        task,
        task.parameters(),
        data,
        TrainConfig(**settings),
        batch_size=16,
        eval_model=model,
        eval_sets={"validation": toy_data(32, seed=1)},
        augment=augment,
        run_dir=tmp_path,
    )


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.eval_model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_seed_gives_identical_weights():
    first, second = make_trainer(), make_trainer()
    first.fit()
    second.fit()
    assert_same(weights(first), weights(second))


def test_training_learns_the_toy_task():
    trainer = make_trainer(epochs=8)
    before = evaluate(trainer.eval_model, toy_data(), 64)["accuracy"]
    trainer.fit()
    assert evaluate(trainer.eval_model, toy_data(), 64)["accuracy"] > max(before, 0.5)


@pytest.mark.parametrize("stop_after", [1, 7, 12])  # inside epoch 1, inside epoch 2, at the epoch 2 boundary
def test_resume_after_interruption_gives_the_same_final_weights(tmp_path, stop_after):
    uninterrupted = make_trainer(tmp_path / "a", augment=ShiftViews(96))
    uninterrupted.fit()

    interrupted = make_trainer(tmp_path / "b", augment=ShiftViews(96))
    steps = {"n": 0}

    def stop_after_n(module, inputs, output):
        steps["n"] += 1
        if steps["n"] == stop_after:
            interrupted.stop_requested = True  # what Ctrl-C does

    handle = interrupted.eval_model.register_forward_hook(stop_after_n)
    result = interrupted.fit()
    handle.remove()
    assert result.interrupted

    resumed = make_trainer(tmp_path / "b", augment=ShiftViews(96))
    resumed.fit(resume=True)
    assert_same(weights(uninterrupted), weights(resumed))
    on_disk = load_file(str(tmp_path / "b" / "student.safetensors"))
    assert_same(weights(uninterrupted), on_disk)
    # The metrics log holds each step once, as if never interrupted.
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [(r["kind"], r["step"]) for r in reference]


def test_checkpoint_holds_what_resuming_needs(tmp_path):
    make_trainer(tmp_path).fit()
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "state", "history"} <= set(payload)
    assert payload["state"]["epoch"] == 3
    assert (tmp_path / "student_best.safetensors").exists()
    assert list((tmp_path / "tensorboard").iterdir())


def test_warmup_then_cosine_schedule():
    trainer = make_trainer(epochs=4, warmup_epochs=1)  # 6 updates per epoch, 24 in all
    factors = [trainer._lr_factor(u) for u in range(24)]
    assert factors[0] < factors[3] < factors[5] < 1.0 + 1e-9
    assert factors[6] == pytest.approx(1.0)
    assert factors[15] == pytest.approx(0.5, abs=0.1)
    assert factors[23] < 0.02


def test_step_and_constant_schedules():
    step = make_trainer(epochs=4, schedule="step", step_epochs=2, step_gamma=0.5)
    assert [step._lr_factor(u) for u in (0, 11, 12, 23)] == [1.0, 1.0, 0.5, 0.5]
    constant = make_trainer(schedule="constant")
    assert constant._lr_factor(17) == 1.0


def test_sgd_with_momentum_and_gradient_clipping():
    trainer = make_trainer(optimizer="sgd", grad_clip=0.01, lr=0.1)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    before = weights(trainer)
    trainer.fit()
    # With clipping at 0.01 and lr 0.1 no parameter can move more than 3 epochs × 6 × 0.1 × 0.01 (×2 for momentum).
    moved = max(
        (after - before[k]).abs().max().item() for k, after in weights(trainer).items() if after.is_floating_point()
    )
    assert 0 < moved < 18 * 0.1 * 0.01 * 10


def test_gradient_accumulation_halves_the_updates():
    plain, accumulated = make_trainer(epochs=1), make_trainer(epochs=1, accumulate=2)
    plain.fit()
    accumulated.fit()
    assert plain.scheduler.last_epoch == 6 and accumulated.scheduler.last_epoch == 3


def test_early_stopping_stops_when_validation_stalls():
    trainer = make_trainer(epochs=30, lr=1e-6, early_stopping=2)
    result = trainer.fit()
    assert len(result.history) < 30


def test_non_finite_loss_stops_with_the_step():
    model = toy_model()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"term ce at step 0 \(epoch 1\); the last good checkpoint is kept"):
        make_trainer(model=model).fit()
