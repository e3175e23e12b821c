"""Spec section 6's divergences against hand-written float64 references, and the chunked
head-and-divergence loss against the naive one (full logits, autograd) for every divergence."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kdistill.core import chunked, losses
from kdistill.core.errors import ConfigError
from tests import reference

FLOAT32_EPS = torch.finfo(torch.float32).eps

# -- hand-written references (float64, loop by loop, as tests/reference.py) ------------------------


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def _mix(p: list[float], q: list[float], weight: float) -> list[float]:
    return [weight * a + (1 - weight) * b for a, b in zip(p, q)]


def divergence_row(name: str, p_s: list[float], p_t: list[float], beta: float = 0.5, skew: float = 0.1) -> float:
    """Spec section 6, one row: ``p_s``/``p_t`` are the student's and teacher's probabilities."""
    if name == "kl":
        return _kl(p_t, p_s)
    if name == "reverse_kl":
        return _kl(p_s, p_t)
    if name == "jsd":
        if beta == 0:
            return _kl(p_t, p_s)
        if beta == 1:
            return _kl(p_s, p_t)
        mixture = _mix(p_t, p_s, beta)
        return beta * _kl(p_t, mixture) + (1 - beta) * _kl(p_s, mixture)
    if name == "skew_kl":
        return _kl(p_t, _mix(p_t, p_s, skew))
    if name == "skew_reverse_kl":
        return _kl(p_s, _mix(p_s, p_t, skew))
    if name == "tvd":
        return 0.5 * sum(abs(a - b) for a, b in zip(p_t, p_s))
    raise KeyError(name)


def response_reference(name, student, teacher, temperature, keep=None, squared=True, **parameters) -> float:
    """``τ² · mean over kept rows`` of :func:`divergence_row` for ``(R, C)`` logits."""
    values = []
    for index, (s_row, t_row) in enumerate(zip(student.double().tolist(), teacher.double().tolist())):
        if keep is not None and not keep[index]:
            continue
        p_s = reference.softmax_row(s_row, temperature)
        p_t = reference.softmax_row(t_row, temperature)
        values.append(divergence_row(name, p_s, p_t, **parameters))
    if not values:
        return 0.0
    return (temperature**2 if squared else 1.0) * sum(values) / len(values)


SECTION_6 = ["kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def float32_error(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """Absolute error bound of a float32 divergence of these logits (as test_losses.float32_kl_error)."""
    largest = max(float(student.abs().max()), float(teacher.abs().max())) / temperature
    return 16 * FLOAT32_EPS * (2 * largest + math.log(student.shape[-1])) * temperature**2


# -- the registry's new divergences --------------------------------------------------------------


@pytest.mark.parametrize("name", SECTION_6)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_section_6_divergences_match_the_hand_written_reference(name, temperature):
    generator = torch.Generator().manual_seed(20)
    student, teacher = (3 * torch.randn(2, 9, 7, generator=generator, dtype=torch.float64)).unbind(0)
    loss = losses.RESPONSE_LOSSES[name]
    got = losses.response_loss(student, teacher, temperature, loss=loss)
    want = response_reference(name, student, teacher, temperature)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-14)
    single = losses.response_loss(student.float(), teacher.float(), temperature, loss=loss)
    assert single.dtype == torch.float32
    assert single.item() == pytest.approx(want, rel=0, abs=float32_error(student, teacher, temperature))


@pytest.mark.parametrize(
    ("name", "parameters"),
    [("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.9}), ("skew_kl", {"skew": 0.3}), ("skew_reverse_kl", {"skew": 0.5})],
)
def test_divergence_parameters_are_keywords_a_partial_can_set(name, parameters):
    generator = torch.Generator().manual_seed(21)
    student, teacher = torch.randn(2, 6, 5, generator=generator, dtype=torch.float64).unbind(0)
    loss = functools.partial(losses.RESPONSE_LOSSES[name], **parameters)
    got = losses.response_loss(student, teacher, 2.0, loss=loss)
    assert got.item() == pytest.approx(response_reference(name, student, teacher, 2.0, **parameters), rel=1e-10)
    # The registry's entry is the paper's default, which differs from these parameters.
    default = losses.response_loss(student, teacher, 2.0, loss=losses.RESPONSE_LOSSES[name])
    assert default.item() == pytest.approx(response_reference(name, student, teacher, 2.0), rel=1e-10)
    assert default.item() != pytest.approx(got.item(), rel=1e-3)


def test_jsd_limits_are_forward_and_reverse_kl_up_to_scale():
    generator = torch.Generator().manual_seed(22)
    student, teacher = torch.randn(2, 5, 6, generator=generator, dtype=torch.float64).unbind(0)
    forward = losses.kl_divergence(student, teacher, 1.5).item()
    backward = losses.reverse_kl(student, teacher, 1.5).item()
    for small in (1e-4, 1e-6):
        # JSD_β = β·KL(P_t ‖ P_s) + O(β²) near 0 and (1 − β)·KL(P_s ‖ P_t) + O((1 − β)²) near 1.
        near_zero = losses.generalized_jsd(student, teacher, 1.5, beta=small).item() / small
        near_one = losses.generalized_jsd(student, teacher, 1.5, beta=1 - small).item() / small
        assert near_zero == pytest.approx(forward, rel=50 * small)
        assert near_one == pytest.approx(backward, rel=50 * small)
    # The documented convention at the ends: the limits themselves, without the vanishing scale.
    assert losses.generalized_jsd(student, teacher, 1.5, beta=0.0).item() == pytest.approx(forward, rel=1e-12)
    assert losses.generalized_jsd(student, teacher, 1.5, beta=1.0).item() == pytest.approx(backward, rel=1e-12)
    # β = ½ is the symmetric Jensen–Shannon divergence, at most log 2.
    half = losses.generalized_jsd(student, teacher, 1.5).item()
    assert half == pytest.approx(losses.generalized_jsd(teacher, student, 1.5).item(), rel=1e-12)
    assert 0 < half <= math.log(2)


def test_skew_divergences_at_zero_skew_are_the_plain_directions_and_stay_bounded():
    generator = torch.Generator().manual_seed(23)
    student, teacher = torch.randn(2, 5, 6, generator=generator, dtype=torch.float64).unbind(0)
    assert losses.skew_kl(student, teacher, 2.0, skew=0.0).item() == pytest.approx(
        losses.kl_divergence(student, teacher, 2.0).item(), rel=1e-12
    )
    assert losses.skew_reverse_kl(student, teacher, 2.0, skew=0.0).item() == pytest.approx(
        losses.reverse_kl(student, teacher, 2.0).item(), rel=1e-12
    )
    # A student that gives the teacher's class ~nothing: the plain KL explodes, the skew KL ≤ log(1/λ).
    confident = torch.tensor([[0.0, 200.0, 0.0]], dtype=torch.float64)
    other = torch.tensor([[200.0, 0.0, 0.0]], dtype=torch.float64)
    assert losses.kl_divergence(other, confident, 1.0).item() > 100
    assert 0 < losses.skew_kl(other, confident, 1.0).item() <= math.log(1 / 0.1) + 1e-12


def test_tvd_is_half_the_l1_distance_symmetric_and_at_most_one():
    student = torch.tensor([[0.0, 300.0], [1.0, 1.0]], dtype=torch.float64)
    teacher = torch.tensor([[300.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert losses.total_variation(student, teacher, 1.0).item() == pytest.approx(0.5, rel=1e-12)  # rows 1 and 0
    assert losses.total_variation(teacher, student, 1.0).item() == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("name", ["jsd", "skew_kl", "skew_reverse_kl"])
def test_divergence_weights_outside_zero_one_are_refused(name):
    keyword = "beta" if name == "jsd" else "skew"
    student = torch.randn(2, 3)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        losses.RESPONSE_LOSSES[name](student, student, 1.0, **{keyword: 1.5})


def test_registry_names_the_section_6_divergences():
    assert set(SECTION_6) | {"dkd", "dist"} == set(losses.RESPONSE_LOSSES)
    with pytest.raises(ConfigError, match="did you mean 'jsd'"):
        losses.resolve("jds", losses.RESPONSE_LOSSES, "response")


# -- the chunked loss against the naive one ------------------------------------------------------


def naive_loss(
    hidden,
    weight,
    bias,
    teacher,
    labels=None,
    *,
    divergence="kl",
    temperature=1.0,
    alpha=1.0,
    beta=1.0,
    ignore_index=-100,
    mask=None,
    temperature_squared=True,
    ce_weight=1.0,
    response_offset=None,
):
    """What anyone would write: full logits, the library's response loss and CE, autograd; the response
    term on ``logits + response_offset`` when an offset is given, CE on the logits as they are."""
    logits = F.linear(hidden, weight, bias)
    if isinstance(teacher, tuple) and not isinstance(teacher, losses.TopKLogits):
        teacher_weight, teacher_bias = chunked._head_parts(teacher[1])
        transform = teacher[2] if len(teacher) == 3 else (lambda z: z)
        teacher = transform(F.linear(teacher[0], teacher_weight, teacher_bias)).detach()
    response = losses.response_loss(
        logits if response_offset is None else logits + response_offset,
        teacher,
        temperature,
        labels,
        ignore_index=ignore_index,
        mask=mask,
        temperature_squared=temperature_squared,
        loss=losses.resolve(divergence, losses.RESPONSE_LOSSES, "response"),
    )
    ce = logits.new_zeros(())
    if labels is not None:
        ce_labels = labels if mask is None else labels.masked_fill(mask == 0, ignore_index)
        ce = losses.cross_entropy(logits, ce_labels, ignore_index)
    weighted_ce = ce if ce_weight == 1 else ce_weight * ce
    loss = weighted_ce + beta * alpha * response if beta * alpha else weighted_ce
    return {"loss": loss, "ce": ce, "response": response}


def make_problem(rows=10, hidden=4, vocabulary=7, teacher_hidden=5, dtype=torch.float64, seed=0, scale=2.0):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return {
        "hidden": draw(rows, hidden).requires_grad_(),
        "weight": (scale * draw(vocabulary, hidden) / math.sqrt(hidden)).requires_grad_(),
        "bias": draw(vocabulary).requires_grad_(),
        "teacher_hidden": draw(rows, teacher_hidden),
        "teacher_head": torch.nn.Linear(teacher_hidden, vocabulary).to(dtype),
        "labels": torch.randint(0, vocabulary, (rows,), generator=generator),
    }


def gradients(output, problem):
    parts = [problem["hidden"], problem["weight"], problem["bias"]]
    return torch.autograd.grad(output["loss"], parts)


def compare(got, want, problem, rtol=1e-10, atol=1e-12):
    for key in ("loss", "ce", "response"):
        assert got[key].item() == pytest.approx(want[key].item(), rel=rtol, abs=atol), key
    for name, g, w in zip(("hidden", "weight", "bias"), gradients(got, problem), gradients(want, problem)):
        scale = float(w.abs().max())
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol + rtol * scale, msg=lambda m, n=name: f"{n}: {m}")


DIVERGENCES = [
    *SECTION_6,
    "dkd",
    functools.partial(losses.generalized_jsd, beta=0.9),
    functools.partial(losses.skew_kl, skew=0.4),
    functools.partial(losses.skew_reverse_kl, skew=0.0),
    functools.partial(losses.generalized_jsd, beta=0.0),
]


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=lambda d: d if isinstance(d, str) else repr(d.keywords))
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden_and_head"])
@pytest.mark.parametrize("rows", ["all", "labels", "labels_and_mask"])
def test_chunked_loss_and_gradients_equal_the_naive_ones_in_float64(divergence, teacher_kind, rows, monkeypatch):
    # Chunks of 5 rows, teacher slabs of 3, blocks of 2: none divides the next.
    monkeypatch.setattr(chunked, "TEACHER_ROWS", 3)
    monkeypatch.setattr(chunked, "BLOCK_ROWS", 2)
    problem = make_problem()
    labels = mask = None
    if rows != "all":
        labels = problem["labels"].clone()
        labels[[1, 6]] = -100
    if rows == "labels_and_mask":
        mask = torch.ones(10, dtype=torch.long)
        mask[[0, 6, 9]] = 0
    teacher = (problem["teacher_hidden"], problem["teacher_head"])
    if teacher_kind == "logits":
        teacher = problem["teacher_head"](problem["teacher_hidden"]).detach()
    settings = dict(divergence=divergence, temperature=2.5, alpha=0.7, beta=1.3, mask=mask)
    head = (problem["weight"], problem["bias"])
    got = chunked.chunked_distillation_loss(problem["hidden"], head, teacher, labels, chunk_size=5, **settings)
    want = naive_loss(problem["hidden"], *head, teacher, labels, **settings)
    compare(got, want, problem)


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
@pytest.mark.parametrize("teacher_kind", ["hidden_and_head", "none"])
def test_chunked_loss_with_a_ce_weight_equals_the_naive_one(ce_weight, teacher_kind, monkeypatch):
    """``ce_weight`` scales CE in the loss and in the analytic gradient; ``ce`` is reported unweighted."""
    monkeypatch.setattr(chunked, "TEACHER_ROWS", 3)
    monkeypatch.setattr(chunked, "BLOCK_ROWS", 2)
    problem = make_problem(seed=23)
    labels = problem["labels"].clone()
    labels[[2, 7]] = -100
    teacher = None if teacher_kind == "none" else (problem["teacher_hidden"], problem["teacher_head"])
    settings = dict(divergence="jsd", temperature=2.0, alpha=0.7, beta=1.3, ce_weight=ce_weight)
    head = (problem["weight"], problem["bias"])
    got = chunked.chunked_distillation_loss(problem["hidden"], head, teacher, labels, chunk_size=4, **settings)
    assert got["ce"].item() > 0 and not got["ce"].requires_grad
    if teacher is None:  # no teacher: the loss is the weighted CE alone (0 with weight 0, zero gradients)
        want_ce = naive_loss(problem["hidden"], *head, torch.zeros(10, 7).double(), labels)["ce"]
        assert got["ce"].item() == pytest.approx(want_ce.item(), rel=1e-10)
        assert got["loss"].item() == pytest.approx(ce_weight * want_ce.item(), rel=1e-10, abs=1e-300)
        parts = [problem["hidden"], problem["weight"], problem["bias"]]
        want_grads = torch.autograd.grad(ce_weight * want_ce, parts) if ce_weight else [p * 0 for p in parts]
        for g, w in zip(gradients(got, problem), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        return
    want = naive_loss(problem["hidden"], *head, teacher, labels, **settings)
    compare(got, want, problem)


@pytest.mark.parametrize("ce_weight", [-0.5, float("nan"), float("inf")])
def test_bad_ce_weights_are_refused(ce_weight):
    problem = make_problem(seed=24)
    with pytest.raises(ConfigError, match="ce_weight"):
        chunked.chunked_distillation_loss(
            problem["hidden"], problem["weight"], None, problem["labels"], ce_weight=ce_weight
        )


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_chunked_loss_with_a_top_k_teacher_equals_the_naive_one(temperature, with_labels, monkeypatch):
    monkeypatch.setattr(chunked, "TEACHER_ROWS", 3)
    monkeypatch.setattr(chunked, "BLOCK_ROWS", 2)
    problem = make_problem(rows=11, vocabulary=9, seed=1)
    teacher_logits = problem["teacher_head"](problem["teacher_hidden"]).detach()
    top = losses.TopKLogits.from_logits(teacher_logits, 3, temperature)
    labels = problem["labels"].clone() if with_labels else None
    mask = torch.ones(11)
    mask[4] = 0
    if labels is not None:
        labels[2] = -100
    head = (problem["weight"], problem["bias"])
    settings = dict(temperature=temperature, mask=mask, alpha=0.5)
    got = chunked.chunked_distillation_loss(problem["hidden"], head, top, labels, chunk_size=4, **settings)
    want = naive_loss(problem["hidden"], *head, top, labels, **settings)
    compare(got, want, problem)


OFFSET_CASES = [  # dkd: the autograd fallback; a top-k teacher supports kl only
    *((divergence, kind) for divergence in ("kl", "jsd", "tvd", "dkd") for kind in ("logits", "hidden_and_head")),
    ("kl", "hidden_head_transform"),
    ("dkd", "hidden_head_transform"),
    ("kl", "topk"),
]


@pytest.mark.parametrize(("divergence", "teacher_kind"), OFFSET_CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_a_response_offset_shifts_the_response_logits_and_not_ce(divergence, teacher_kind, temperature, monkeypatch):
    """``response_offset`` (V,) is added to the student's logits in the response term only (a pruned
    student's tempered "other" column); CE, at τ = 1, reads the logits as they are. At τ = 1 too: CE
    must not reuse the offset response's log-softmax."""
    monkeypatch.setattr(chunked, "TEACHER_ROWS", 3)
    monkeypatch.setattr(chunked, "BLOCK_ROWS", 2)
    problem = make_problem(seed=25)
    labels = problem["labels"].clone()
    labels[[1, 6]] = -100
    mask = torch.ones(10, dtype=torch.long)
    mask[[0, 9]] = 0
    offset = torch.zeros(7, dtype=torch.float64)
    offset[-1] = 1.7  # one column, as a pruned student's (τ − 1)·log(rest)
    teacher_logits = problem["teacher_head"](problem["teacher_hidden"]).detach()
    teacher = {
        "logits": teacher_logits,
        "hidden_and_head": (problem["teacher_hidden"], problem["teacher_head"]),
        "hidden_head_transform": (problem["teacher_hidden"], problem["teacher_head"], lambda z: 0.5 * z),
        "topk": losses.TopKLogits.from_logits(teacher_logits, 3, temperature),
    }[teacher_kind]
    settings = dict(divergence=divergence, temperature=temperature, alpha=0.7, beta=1.3, mask=mask)
    head = (problem["weight"], problem["bias"])
    got = chunked.chunked_distillation_loss(
        problem["hidden"], head, teacher, labels, chunk_size=4, response_offset=offset, **settings
    )
    want = naive_loss(problem["hidden"], *head, teacher, labels, response_offset=offset, **settings)
    compare(got, want, problem)
    # Without the offset the response differs: the offset is not ignored.
    plain = naive_loss(problem["hidden"], *head, teacher, labels, **settings)
    assert abs(plain["response"].item() - want["response"].item()) > 1e-3
    assert got["ce"].item() == pytest.approx(plain["ce"].item(), rel=1e-12)


def test_a_response_offset_of_another_width_is_refused():
    problem = make_problem(seed=26)
    with pytest.raises(ValueError, match="response_offset"):
        chunked.chunked_distillation_loss(
            problem["hidden"],
            (problem["weight"], problem["bias"]),
            problem["teacher_head"](problem["teacher_hidden"]).detach(),
            response_offset=torch.zeros(6, dtype=torch.float64),
        )


@pytest.mark.parametrize("name", SECTION_6)
def test_chunked_response_equals_the_hand_written_reference(name):
    problem = make_problem(rows=6, seed=2)
    teacher = problem["teacher_head"](problem["teacher_hidden"]).detach()
    labels = problem["labels"].clone()
    labels[3] = -100
    got = chunked.chunked_distillation_loss(
        problem["hidden"], (problem["weight"], problem["bias"]), teacher, labels, divergence=name, temperature=2.0
    )
    logits = F.linear(problem["hidden"], problem["weight"], problem["bias"]).detach()
    keep = (labels != -100).tolist()
    assert got["response"].item() == pytest.approx(response_reference(name, logits, teacher, 2.0, keep), rel=1e-10)
    assert got["ce"].item() == pytest.approx(reference.cross_entropy(logits, labels), rel=1e-10)
    assert got["loss"].item() == pytest.approx(got["response"].item() + got["ce"].item(), rel=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 4, 10, 64])
def test_chunk_size_changes_nothing_whether_or_not_it_divides_the_rows(chunk_size):
    problem = make_problem(seed=3)
    head = torch.nn.Linear(4, 7).double()
    teacher = (problem["teacher_hidden"], problem["teacher_head"])
    got = chunked.chunked_distillation_loss(
        problem["hidden"], head, teacher, problem["labels"], divergence="jsd", chunk_size=chunk_size
    )
    want = naive_loss(problem["hidden"], head.weight, head.bias, teacher, problem["labels"], divergence="jsd")
    assert got["loss"].item() == pytest.approx(want["loss"].item(), rel=1e-12)
    params = [problem["hidden"], head.weight, head.bias]
    for g, w in zip(torch.autograd.grad(got["loss"], params), torch.autograd.grad(want["loss"], params)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "tvd"])
def test_every_row_ignored_gives_zero_loss_and_zero_gradients(divergence):
    problem = make_problem(seed=4, dtype=torch.float32)
    labels = torch.full((10,), -100)
    head = (problem["weight"], problem["bias"])
    teacher = (problem["teacher_hidden"], problem["teacher_head"].float())
    out = chunked.chunked_distillation_loss(problem["hidden"], head, teacher, labels, divergence=divergence)
    assert [out[k].item() for k in ("loss", "ce", "response")] == [0.0, 0.0, 0.0]
    for gradient in gradients(out, problem):
        assert torch.equal(gradient, torch.zeros_like(gradient))
    masked = chunked.chunked_distillation_loss(problem["hidden"], head, teacher, mask=torch.zeros(10))
    assert masked["loss"].item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in gradients(masked, problem))


def test_tied_embeddings_get_the_head_gradient_added_to_their_own():
    torch.manual_seed(5)
    embedding = torch.nn.Embedding(7, 4).double()
    tokens = torch.tensor([0, 3, 5, 1])
    labels = torch.tensor([3, 5, 1, 6])
    teacher = torch.randn(4, 7, dtype=torch.float64)

    def step(loss_function):
        embedding.zero_grad()
        hidden = torch.tanh(embedding(tokens))
        loss_function(hidden, embedding.weight, None, teacher, labels, divergence="skew_kl")["loss"].backward()
        return embedding.weight.grad.clone()

    got = step(lambda h, w, b, *args, **kw: chunked.chunked_distillation_loss(h, w, *args, **kw))
    want = step(naive_loss)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_no_tensor_of_the_full_rows_by_vocabulary_size_is_ever_created():
    # 512 rows, vocabulary 300, chunks of 32: the naive loss makes (512, 300) tensors, this must not.
    problem = make_problem(rows=512, hidden=8, vocabulary=300, teacher_hidden=6, dtype=torch.float32, seed=6)

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, tensor.numel())
            return out

    head = (problem["weight"], problem["bias"])
    teacher = (problem["teacher_hidden"], problem["teacher_head"].float())
    with LargestTensor():
        out = chunked.chunked_distillation_loss(
            problem["hidden"], head, teacher, problem["labels"], divergence="jsd", chunk_size=32
        )
        out["loss"].backward()
    assert LargestTensor.largest <= 32 * 300
    # ... while the naive computation does make them (the check can fail).
    LargestTensor.largest = 0
    with LargestTensor():
        naive_loss(problem["hidden"], *head, teacher, problem["labels"], divergence="jsd")["loss"].backward()
    assert LargestTensor.largest >= 512 * 300


def relative_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Float32 against float64: equal to ``rtol`` of the reference's largest entry."""
    scale = float(want.abs().max())
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def smollm2_head() -> dict[str, torch.Tensor]:
    """H = 576, V = 49,152 as SmolLM2-135M; 64 tokens keep the float64 reference quick."""
    generator = torch.Generator().manual_seed(7)
    rows, hidden_size, vocabulary = 64, 576, 49_152
    labels = torch.randint(0, vocabulary, (rows,), generator=generator)
    labels[::7] = -100
    return {
        "hidden": torch.randn(rows, hidden_size, generator=generator),
        "weight": torch.randn(vocabulary, hidden_size, generator=generator) * 0.05,
        "teacher_hidden": torch.randn(rows, hidden_size, generator=generator),
        "teacher_weight": torch.randn(vocabulary, hidden_size, generator=generator) * 0.06,
        "labels": labels,
    }


@pytest.mark.parametrize("divergence", [*SECTION_6, "dkd"])
def test_float32_at_smollm2_sizes_is_within_1e_4_of_float64(divergence, smollm2_head):
    hidden, weight, labels = smollm2_head["hidden"], smollm2_head["weight"], smollm2_head["labels"]
    teacher_hidden, teacher_weight = smollm2_head["teacher_hidden"], smollm2_head["teacher_weight"]
    settings = dict(divergence=divergence, temperature=2.0)

    def run(chunked_loss: bool, dtype: torch.dtype):
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        teacher = (teacher_hidden.to(dtype), teacher_weight.to(dtype))
        if chunked_loss:
            out = chunked.chunked_distillation_loss(h, w, teacher, labels, chunk_size=24, **settings)
        else:
            out = naive_loss(h, w, None, teacher, labels, **settings)
        return out, torch.autograd.grad(out["loss"], [h, w])

    want, want_grads = run(False, torch.float64)
    got, got_grads = run(True, torch.float32)
    assert got["loss"].dtype == torch.float32
    for key in ("loss", "ce", "response"):
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-4), key
    for got_grad, want_grad in zip(got_grads, want_grads):
        relative_close(got_grad, want_grad, 1e-4)


def test_only_loss_carries_gradient_and_supports_one_backward():
    problem = make_problem(seed=8)
    out = chunked.chunked_distillation_loss(problem["hidden"], (problem["weight"], None), torch.randn(10, 7).double())
    assert out["loss"].requires_grad
    assert not out["ce"].requires_grad and not out["response"].requires_grad
    out["loss"].backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="first backward"):
        out["loss"].backward()


def test_backward_scales_by_the_incoming_gradient():
    problem = make_problem(seed=9)
    teacher = torch.randn(10, 7, dtype=torch.float64)
    head = (problem["weight"], problem["bias"])
    once = gradients(chunked.chunked_distillation_loss(problem["hidden"], head, teacher, divergence="tvd"), problem)
    out = chunked.chunked_distillation_loss(problem["hidden"], head, teacher, divergence="tvd")
    tripled = torch.autograd.grad(3 * out["loss"], [problem["hidden"], problem["weight"], problem["bias"]])
    for a, b in zip(tripled, once):
        torch.testing.assert_close(a, 3 * b, rtol=1e-12, atol=0)


def test_without_gradients_the_values_are_the_same_and_nothing_is_attached():
    problem = make_problem(seed=10)
    teacher = (problem["teacher_hidden"], problem["teacher_head"])
    head = (problem["weight"], problem["bias"])
    with torch.no_grad():
        quiet = chunked.chunked_distillation_loss(problem["hidden"], head, teacher, problem["labels"], divergence="jsd")
    assert not quiet["loss"].requires_grad
    loud = chunked.chunked_distillation_loss(problem["hidden"], head, teacher, problem["labels"], divergence="jsd")
    assert quiet["loss"].item() == pytest.approx(loud["loss"].item(), rel=1e-14)


def test_zero_alpha_keeps_a_non_finite_response_out_of_the_loss():
    problem = make_problem(seed=11)
    teacher = torch.full((10, 7), float("nan"), dtype=torch.float64)
    head = (problem["weight"], problem["bias"])
    out = chunked.chunked_distillation_loss(problem["hidden"], head, teacher, problem["labels"], alpha=0.0)
    want = naive_loss(problem["hidden"], *head, torch.zeros(10, 7).double(), problem["labels"], alpha=0.0)
    assert out["loss"].item() == pytest.approx(want["ce"].item(), rel=1e-12)
    assert all(torch.isfinite(g).all() for g in gradients(out, problem))


def test_unsupported_combinations_are_refused_with_the_reason():
    problem = make_problem(seed=12)
    head = (problem["weight"], problem["bias"])
    teacher = torch.randn(10, 7, dtype=torch.float64)
    with pytest.raises(ConfigError, match="cannot be computed chunk by chunk"):
        chunked.chunked_distillation_loss(problem["hidden"], head, teacher, divergence="dist")
    top = losses.TopKLogits.from_logits(teacher, 3, 1.0)
    with pytest.raises(ConfigError, match="kl response loss only"):
        chunked.chunked_distillation_loss(problem["hidden"], head, top, divergence="jsd")
    with pytest.raises(ValueError, match=r"\(N, 7\)"):
        chunked.chunked_distillation_loss(problem["hidden"], head, torch.randn(10, 6).double())
    with pytest.raises(ValueError, match="9 rows"):
        chunked.chunked_distillation_loss(problem["hidden"], head, torch.randn(9, 7).double())
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\)"):
        chunked.chunked_distillation_loss(problem["hidden"], head, teacher, torch.full((10,), 7))
    with pytest.raises(ConfigError, match="chunk_size"):
        chunked.chunked_distillation_loss(problem["hidden"], head, teacher, chunk_size=0)


def test_the_losses_module_re_exports_the_chunked_loss():
    from kdistill.core.losses import chunked_distillation_loss

    assert chunked_distillation_loss is chunked.chunked_distillation_loss


def test_cli_refuses_a_new_divergence_with_a_top_k_cache_in_one_line(capsys, tmp_path, monkeypatch):
    from tests.test_cli import test_bad_input_gets_one_line_and_exit_2 as one_line_and_exit_2

    args = ["train", "/dev/null", "--set", "distill.response_loss=tvd", "--set", "distill.cache_storage=topk"]
    one_line_and_exit_2(args, "supports the kl response loss only, not 'tvd'", capsys, tmp_path, monkeypatch)


def test_cli_names_the_new_divergence_closest_to_a_typo(capsys, tmp_path, monkeypatch):
    from tests.test_cli import test_bad_input_gets_one_line_and_exit_2 as one_line_and_exit_2

    args = ["train", "/dev/null", "--set", "distill.response_loss=jds"]
    one_line_and_exit_2(args, "unknown response loss 'jds'; did you mean 'jsd'", capsys, tmp_path, monkeypatch)


def test_the_chunked_loss_keeps_its_precision_under_autocast():
    torch.manual_seed(0)
    hidden = torch.randn(12, 8, requires_grad=True)
    head = torch.nn.Linear(8, 30)
    teacher_hidden, teacher_head = torch.randn(12, 8).bfloat16(), torch.nn.Linear(8, 30)
    labels = torch.randint(0, 30, (12,))
    plain = chunked.chunked_distillation_loss(hidden, head, (teacher_hidden.float(), teacher_head), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = chunked.chunked_distillation_loss(hidden, head, (teacher_hidden, teacher_head), labels)
    torch.testing.assert_close(autocast["loss"], plain["loss"])
