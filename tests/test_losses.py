"""The loss functions against the hand-written float64 reference of the spec."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdistill.core import losses
from tests import reference

FLOAT32_EPS = torch.finfo(torch.float32).eps


def float32_kl_error(student, teacher, temperature: float, squared: bool = True) -> float:
    """A bound on the absolute error of a float32 ``L_resp``, whatever the CPU's kernels.

    Each float32 log-softmax entry is off by a few ulp of the largest magnitude it involves
    (``|z|/τ`` before the max is subtracted, ``log C`` from the normaliser); the KL sums
    ``P_t · (log P_t − log P_s)`` over classes, so its error is bounded by a small multiple of
    ``ε · (2 max|z|/τ + log C)``, which is not small relative to a KL close to 0. Times ``τ²``.
    """
    classes = student.shape[-1]
    largest = max(float(student.abs().max()), float(teacher.abs().max())) / temperature
    return 16 * FLOAT32_EPS * (2 * largest + math.log(classes)) * (temperature**2 if squared else 1.0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 10.0])
@pytest.mark.parametrize("squared", [True, False])
def test_response_matches_reference_for_class_logits(temperature, squared):
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 7, 5, generator=generator).double().unbind(0)
    got = losses.response_loss(student, teacher, temperature, temperature_squared=squared)
    want = reference.response(student, teacher, temperature, squared=squared)
    assert got.item() == pytest.approx(want, rel=1e-10)
    single = losses.response_loss(student.float(), teacher.float(), temperature, temperature_squared=squared)
    assert single.dtype == torch.float32
    assert single.item() == pytest.approx(want, rel=0, abs=float32_kl_error(student, teacher, temperature, squared))


def test_response_without_tau_squared_is_plain_kl_divergence():
    generator = torch.Generator().manual_seed(4)
    # float64: two implementations of the same KL agree to ~1e-15, on any CPU.
    student, teacher = torch.randn(2, 9, 6, generator=generator, dtype=torch.float64).unbind(0)
    temperature = 3.0
    got = losses.response_loss(student, teacher, temperature, temperature_squared=False)
    log_p_s = torch.log_softmax(student / temperature, -1)
    log_p_t = torch.log_softmax(teacher / temperature, -1)
    plain = torch.nn.functional.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
    assert got.item() == pytest.approx(plain.item(), rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_response_on_token_logits_leaves_ignored_rows_out(temperature):
    generator = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(2, 3, 4, 6, generator=generator).unbind(0)
    labels = torch.tensor([[1, -100, 2, 3], [-100, -100, 0, 5], [4, 4, -100, 1]])
    got = losses.response_loss(student, teacher, temperature, labels, ignore_index=-100)
    want = reference.response(student, teacher, temperature, labels, ignore_index=-100)
    assert got.item() == pytest.approx(want, rel=0, abs=float32_kl_error(student, teacher, temperature))
    # Changing an ignored row changes nothing.
    student2 = student.clone()
    student2[0, 1] += 100.0
    again = losses.response_loss(student2, teacher, temperature, labels, ignore_index=-100)
    assert again.item() == pytest.approx(got.item(), rel=1e-6)


def test_response_with_every_row_ignored_is_zero_and_differentiable():
    student = torch.randn(2, 3, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4)
    labels = torch.full((2, 3), -100)
    value = losses.response_loss(student, teacher, 2.0, labels)
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("temperature", [1.0, 3.0, 7.5])
def test_response_gradient_equals_closed_form(temperature):
    generator = torch.Generator().manual_seed(6)
    student = torch.randn(8, 5, generator=generator, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    losses.response_loss(student, teacher, temperature).backward()
    p_s = torch.softmax(student.detach() / temperature, -1)
    p_t = torch.softmax(teacher / temperature, -1)
    closed_form = temperature * (p_s - p_t) / student.shape[0]
    torch.testing.assert_close(student.grad, closed_form, rtol=1e-5, atol=1e-7)


def test_response_is_computed_in_float32_from_half_logits():
    generator = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(2, 16, 10, generator=generator).unbind(0)
    got = losses.response_loss(student.half(), teacher.half(), 4.0)
    want = reference.response(student.half().float(), teacher.half().float(), 4.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=0, abs=float32_kl_error(student, teacher, 4.0))


def test_teacher_minus_infinity_logits_give_finite_loss():
    teacher = torch.tensor([[0.0, 1.0, float("-inf")]])
    student = torch.tensor([[0.5, 0.2, 0.1]], requires_grad=True)
    value = losses.response_loss(student, teacher, 1.0)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(student.grad).all()
    kept = torch.tensor([[0.0, 1.0]])
    want = reference.response(torch.log_softmax(student.detach(), -1)[:, :2], kept, 1.0)
    # Renormalising the student over the two live classes adds log of its mass there.
    mass = torch.softmax(student.detach(), -1)[0, :2].sum().item()
    # float32 throughout: KL error bound, plus a few ulp of log(mass) for the renormalisation.
    bound = float32_kl_error(student.detach(), kept, 1.0) + 16 * FLOAT32_EPS
    assert value.item() == pytest.approx(want - torch.tensor(mass).log().item(), rel=0, abs=bound)


logit_rows = st.lists(
    st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=4, max_size=4), min_size=1, max_size=5
)


@settings(max_examples=60, deadline=None)
@given(student=logit_rows, teacher=logit_rows, temperature=st.floats(0.25, 20))
def test_kl_is_non_negative(student, teacher, temperature):
    rows = min(len(student), len(teacher))
    student, teacher = torch.tensor(student[:rows]), torch.tensor(teacher[:rows])
    value = losses.response_loss(student, teacher, temperature)
    assert value.item() >= -float32_kl_error(student, teacher, temperature)  # ≥ 0 up to float32 rounding


@settings(max_examples=60, deadline=None)
@given(logits=logit_rows, temperature=st.floats(0.25, 20))
def test_kl_of_identical_logits_is_zero(logits, temperature):
    tensor = torch.tensor(logits)
    assert abs(losses.response_loss(tensor, tensor.clone(), temperature).item()) < 1e-5


@settings(max_examples=60, deadline=None)
@given(student=logit_rows, teacher=logit_rows, shift=st.floats(-50, 50), temperature=st.floats(0.5, 10))
def test_kl_is_unchanged_by_a_constant_added_to_a_row(student, teacher, shift, temperature):
    rows = min(len(student), len(teacher))
    s, t = torch.tensor(student[:rows], dtype=torch.float64), torch.tensor(teacher[:rows], dtype=torch.float64)
    base = losses.response_loss(s, t, temperature).item()
    shifted_s = s.clone()
    shifted_s[0] += shift
    shifted_t = t.clone()
    shifted_t[-1] -= shift
    assert losses.response_loss(shifted_s, shifted_t, temperature).item() == pytest.approx(base, rel=1e-3, abs=1e-3)


def test_cross_entropy_matches_reference_and_ignores_rows():
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 4, 6, generator=generator)
    labels = torch.tensor([[1, -100, 2, 3], [-100, -100, 0, 5], [4, 4, -100, 1]])
    got = losses.cross_entropy(logits, labels)
    assert got.item() == pytest.approx(reference.cross_entropy(logits, labels), rel=1e-5)


def test_cross_entropy_with_every_row_ignored_is_zero_not_nan():
    logits = torch.randn(2, 3, requires_grad=True)
    value = losses.cross_entropy(logits, torch.full((2,), -100))
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_feature_mse_matches_reference():
    generator = torch.Generator().manual_seed(9)
    a, b = torch.randn(2, 3, 4, 5, 5, generator=generator).unbind(0)
    assert losses.feature_mse(a, b).item() == pytest.approx(reference.mse(a, b), rel=1e-5)


def test_masked_feature_mse_ignores_padding_exactly():
    generator = torch.Generator().manual_seed(10)
    student, teacher = torch.randn(2, 2, 5, 3, generator=generator).unbind(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    got = losses.feature_mse(student, teacher, mask)
    real_student = torch.cat([student[0, :3], student[1, :4]])
    real_teacher = torch.cat([teacher[0, :3], teacher[1, :4]])
    # A float32 sum of n = 21 squares: relative error below (n + 2) ε whatever the summation order.
    assert got.item() == pytest.approx(reference.mse(real_student, real_teacher), rel=32 * FLOAT32_EPS)
    student[0, 4] = 1e6  # padding: any value, same loss
    assert losses.feature_mse(student, teacher, mask).item() == pytest.approx(got.item(), rel=1e-6)


def test_cosine_feature_loss_is_zero_for_parallel_features_and_respects_mask():
    feature = torch.randn(3, 4, 5)
    # float32 cosines of vectors of ≤ 20 entries: 1 − cos is 0 up to ~(D + 2) ε.
    assert losses.feature_cosine(2 * feature, feature).item() == pytest.approx(0.0, abs=32 * FLOAT32_EPS)
    mask = torch.tensor([[1, 1, 0, 0]] * 3)
    other = feature.clone()
    other[:, 2:] = -other[:, 2:]  # only padding differs
    assert losses.feature_cosine(other, feature, mask).item() == pytest.approx(0.0, abs=32 * FLOAT32_EPS)
    assert losses.feature_cosine(other, feature).item() > 0.1


def test_unknown_loss_name_lists_known_ones():
    from kdistill.core.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'mse'"):
        losses.resolve("mes", losses.FEATURE_LOSSES, "feature")


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_decoupled_kd_matches_the_papers_formula(temperature):
    generator = torch.Generator().manual_seed(11)
    student, teacher = torch.randn(2, 6, 5, generator=generator, dtype=torch.float64).unbind(0)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    got = losses.response_loss(student, teacher, temperature, labels, loss=losses.decoupled_kl)
    assert got.item() == pytest.approx(reference.dkd(student, teacher, labels, temperature), rel=1e-9)


def test_decoupled_kd_sums_to_plain_kd_with_the_right_weights():
    # KL = TCKD + (1 − p_t^gt) · NCKD (the paper's eq. 3): DKD with those weights is classic KD.
    generator = torch.Generator().manual_seed(12)
    student, teacher = torch.randn(2, 1, 7, generator=generator, dtype=torch.float64).unbind(0)
    labels = torch.tensor([3])
    weight = 1 - torch.softmax(teacher, -1)[0, 3].item()
    dkd = losses.decoupled_kl(student, teacher, 1.0, labels, target_weight=1.0, non_target_weight=weight)
    assert dkd.item() == pytest.approx(losses.kl_divergence(student, teacher, 1.0).item(), rel=1e-9)


def test_decoupled_kd_without_labels_uses_the_teachers_top_class():
    generator = torch.Generator().manual_seed(13)
    student, teacher = torch.randn(2, 5, 4, generator=generator, dtype=torch.float64).unbind(0)
    assert losses.decoupled_kl(student, teacher, 2.0).item() == pytest.approx(
        losses.decoupled_kl(student, teacher, 2.0, teacher.argmax(-1)).item(), rel=1e-12
    )


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dist_matches_the_papers_formula(temperature):
    generator = torch.Generator().manual_seed(14)
    student, teacher = torch.randn(2, 8, 6, generator=generator, dtype=torch.float64).unbind(0)
    got = losses.response_loss(student, teacher, temperature, loss=losses.correlation_distance)
    assert got.item() == pytest.approx(reference.dist(student, teacher, temperature), rel=1e-9)
    assert losses.correlation_distance(teacher, teacher.clone(), temperature).item() == pytest.approx(0, abs=1e-9)


def test_registry_losses_work_inside_the_distiller_with_ignored_rows():
    from kdistill import Distiller

    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(3, 5), torch.nn.Linear(3, 5)
    inputs, labels = torch.randn(6, 3), torch.tensor([0, 1, -100, 3, 4, 2])
    for name in ("dkd", "dist"):
        out = Distiller(teacher, student, response_loss=name, temperature=2.0)(inputs, labels)
        kept = labels != -100
        with torch.no_grad():
            want = losses.response_loss(
                student(inputs)[kept], teacher(inputs)[kept], 2.0, labels[kept], loss=losses.RESPONSE_LOSSES[name]
            )
        assert out["response"].item() == pytest.approx(want.item(), rel=1e-6)
