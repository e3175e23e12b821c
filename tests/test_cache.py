"""The teacher-output cache: same losses as a live teacher, and never stale."""

from __future__ import annotations

import copy

import pytest
import torch

from kdistill import Distiller, FeaturePair, KDistillError
from kdistill.cache import CachedDistillation, StaleCacheError, TeacherCache, fingerprint
from kdistill.config import TrainConfig
from kdistill.data import ShiftViews, TensorData
from kdistill.trainer import Trainer
from tests.conftest import TinyConvNet


@pytest.fixture
def data() -> TensorData:
    generator = torch.Generator().manual_seed(0)
    return TensorData(torch.randn(40, 1, 8, 8, generator=generator), torch.randint(0, 10, (40,), generator=generator))


def build(tmp_path, teacher, data, augment=None, storage="float32", layers=("conv2",)):
    return TeacherCache.build(
        tmp_path / "cache",
        teacher,
        data,
        layers=list(layers),
        augment=augment,
        storage=storage,
        batch_size=16,
        progress=False,
    )


@pytest.mark.parametrize("augment", [None, ShiftViews(40, views=3)])
def test_cached_and_live_training_give_the_same_losses_and_weights(tmp_path, data, augment):
    torch.manual_seed(0)
    teacher, student = TinyConvNet(16), TinyConvNet(4)
    pairs = [FeaturePair("conv2", "conv2")]
    live = Distiller(teacher, copy.deepcopy(student), pairs, sample_input=data.inputs[:2])
    cached = Distiller(teacher, copy.deepcopy(student), pairs, sample_input=data.inputs[:2])
    cached.adapters.load_state_dict(live.adapters.state_dict())
    cache = build(tmp_path, teacher, data, augment)
    config = TrainConfig(epochs=4, seed=1)
    runs = {}
    for name, model, distiller in [("live", live, live), ("cached", CachedDistillation(cached, cache), cached)]:
        trainer = Trainer(
            model,
            distiller.trainable_parameters(),
            data,
            config,
            batch_size=16,
            augment=augment,
            run_dir=tmp_path / name,
        )
        trainer.fit()
        runs[name] = distiller
    for key, value in runs["live"].state_dict().items():
        torch.testing.assert_close(runs["cached"].state_dict()[key], value, rtol=1e-5, atol=1e-6)
    live_metrics = (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()
    cached_metrics = (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()
    assert len(live_metrics) == len(cached_metrics)


def test_cache_lookup_equals_the_teachers_outputs(tmp_path, data):
    teacher = TinyConvNet(16).eval()
    views = ShiftViews(40, views=2)
    cache = build(tmp_path, teacher, data, views)
    indices = torch.tensor([3, 17, 39])
    for epoch in (0, 1, 2):
        logits, features = cache.lookup(indices, epoch)
        with torch.no_grad():
            shown = views(data.inputs[indices], indices, epoch)
            torch.testing.assert_close(logits, teacher(shown))
            torch.testing.assert_close(features["conv2"], teacher.conv2(teacher.conv1(shown)))


def test_float16_storage_halves_the_size_within_half_precision(tmp_path, data):
    teacher = TinyConvNet(16).eval()
    full = build(tmp_path / "a", teacher, data, storage="float32")
    half = build(tmp_path / "b", teacher, data, storage="float16")
    assert half.bytes_per_sample == pytest.approx(full.bytes_per_sample / 2)
    indices = torch.arange(40)
    torch.testing.assert_close(half.lookup(indices)[0], full.lookup(indices)[0], rtol=2e-3, atol=2e-3)


def test_a_changed_teacher_dataset_or_augmentation_makes_the_cache_stale(tmp_path, data):
    teacher = TinyConvNet(16)
    cache = build(tmp_path, teacher, data)
    expected = fingerprint(teacher, data, None, ["conv2"], "float32")
    TeacherCache.open(cache.directory, expected)  # valid
    changed_teacher = copy.deepcopy(teacher)
    with torch.no_grad():
        changed_teacher.fc.bias += 0.01
    with pytest.raises(StaleCacheError, match="its teacher differ"):
        TeacherCache.open(cache.directory, fingerprint(changed_teacher, data, None, ["conv2"], "float32"))
    other = TensorData(data.inputs.clone(), data.labels.clone())
    other.inputs[0, 0, 0, 0] += 1
    with pytest.raises(StaleCacheError, match="its data differ"):
        TeacherCache.open(cache.directory, fingerprint(teacher, other, None, ["conv2"], "float32"))
    with pytest.raises(StaleCacheError, match="augment"):
        TeacherCache.open(cache.directory, fingerprint(teacher, data, ShiftViews(40, views=2), ["conv2"], "float32"))


def test_fresh_views_every_epoch_cannot_be_cached(tmp_path, data):
    with pytest.raises(KDistillError, match=r"set data\.augment_views"):
        build(tmp_path, TinyConvNet(16), data, ShiftViews(40, views=None))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_kl_error_is_within_its_stated_bound(k):
    from kdistill.core.losses import TopKLogits, kl_rows, topk_kl_rows

    generator = torch.Generator().manual_seed(k)
    student = torch.randn(64, 30, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(64, 30, generator=generator, dtype=torch.float64)
    temperature = 2.0
    top = TopKLogits.from_logits(teacher, k, temperature)
    error = kl_rows(student, teacher, temperature) - topk_kl_rows(student, top, temperature)
    # Bound: 0 ≤ error ≤ r · max_j log(Q_t(j) / Q_s(j)) over the classes outside the top k.
    rest = torch.ones_like(teacher, dtype=torch.bool).scatter(-1, top.indices, False)
    log_q_t = torch.log_softmax((teacher / temperature).masked_fill(~rest, float("-inf")), -1)
    log_q_s = torch.log_softmax((student / temperature).masked_fill(~rest, float("-inf")), -1)
    bound = top.log_rest.exp() * (log_q_t - log_q_s).masked_fill(~rest, float("-inf")).amax(-1)
    assert (error >= -1e-5).all()
    assert (error <= bound + 1e-5).all()
    # And it is the chain rule's remainder exactly: r · KL(Q_t ‖ Q_s).
    remainder = top.log_rest.exp() * (log_q_t.exp() * (log_q_t - log_q_s)).masked_fill(~rest, 0).sum(-1)
    torch.testing.assert_close(error, remainder, rtol=1e-4, atol=1e-5)


def test_topk_with_every_class_kept_is_the_exact_kl():
    from kdistill.core.losses import TopKLogits, kl_rows, topk_kl_rows

    student, teacher = torch.randn(2, 5, 7, dtype=torch.float64).unbind(0)
    top = TopKLogits.from_logits(teacher, 7, 1.5)
    torch.testing.assert_close(topk_kl_rows(student, top, 1.5), kl_rows(student, teacher, 1.5), rtol=1e-5, atol=1e-6)


def test_topk_cache_trains_through_the_distiller(tmp_path, data):
    from kdistill.core.losses import TopKLogits

    torch.manual_seed(0)
    teacher = TinyConvNet(16).eval()
    cache = TeacherCache.build(
        tmp_path / "topk", teacher, data, storage="topk", topk=3, temperature=4.0, batch_size=16, progress=False
    )
    logits, _ = cache.lookup(torch.tensor([0, 5]))
    with torch.no_grad():
        want = TopKLogits.from_logits(teacher(data.inputs[[0, 5]]), 3, 4.0)
    assert torch.equal(logits.values, want.values.half().float())  # the values are stored in float16
    assert torch.equal(logits.indices, want.indices)
    distiller = Distiller(teacher, TinyConvNet(4), temperature=4.0)
    out = CachedDistillation(distiller, cache)(data.inputs[:8], data.labels[:8], index=torch.arange(8))
    out["loss"].backward()
    assert torch.isfinite(out["response"]) and out["response"] > 0
    assert cache.bytes_per_sample == 3 * 2 + 3 * 4 + 4  # float16 values, int32 ids, float32 log-rest


def test_training_from_the_cache_leaves_the_teacher_where_it_was():
    # A trainer moves its task to the device (.to); a float64 cast shows the same on any machine.
    teacher, student = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    task = CachedDistillation(Distiller(teacher, student), cache=None)
    task.double()
    assert student.weight.dtype == torch.float64
    assert teacher.weight.dtype == torch.float32  # the cache replaces it: it stays off the device
    live = Distiller(teacher, torch.nn.Linear(4, 3)).double()
    assert live.teacher.weight.dtype == torch.float64  # a live teacher moves with its distiller
