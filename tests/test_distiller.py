"""The Distiller's contract (spec section 2) on tiny CPU models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill import (
    ClassCountError,
    ConfigError,
    Distiller,
    FeaturePair,
    FeatureShapeError,
    HookNotFiredError,
    LayerNotFoundError,
    NonFiniteLossError,
)
from kdistill.core.losses import FEATURE_LOSSES, RESPONSE_LOSSES
from tests import reference
from tests.conftest import DictOutputNet, TinyConvNet, TupleOutputNet

PAIR = FeaturePair(student="conv2", teacher="conv2")  # (N, 8, 4, 4) → (N, 32, 4, 4): 1×1 conv adapter


@pytest.mark.parametrize(
    ("alpha", "beta", "temperature", "weights", "with_labels"),
    [
        (1.0, 1.0, 4.0, [1.0, 1.0], True),
        (0.5, 2.0, 1.0, [0.3, 2.0], True),
        (2.0, 0.7, 8.0, [0.0, 1.5], False),
        (0.0, 1.0, 2.0, [1.0, 0.5], True),
    ],
)
def test_total_loss_matches_hand_computation(teacher, student, batch, alpha, beta, temperature, weights, with_labels):
    # Float64 models and inputs: the distiller's losses are then float64 and match the float64
    # reference to ~1e-13 on any CPU (float32 KL loses digits to cancellation, CPU by CPU).
    teacher, student = teacher.double(), student.double()
    inputs, labels = batch[0].double(), batch[1]
    pairs = [
        FeaturePair("conv2", "conv2", weight=weights[0]),
        FeaturePair("conv1", "conv1.0", weight=weights[1]),
    ]
    distiller = Distiller(teacher, student, pairs, alpha=alpha, beta=beta, temperature=temperature)
    out = distiller(inputs, labels if with_labels else None)

    with torch.no_grad():
        teacher_logits = teacher(inputs)
        student_logits = student(inputs)
        t_conv1 = teacher.conv1[0](inputs)
        t_conv2 = teacher.conv2(teacher.conv1(inputs))
        s_conv1 = student.conv1(inputs)
        s_conv2 = student.conv2(s_conv1)
        adapted = [distiller.adapters["0"](s_conv2), distiller.adapters["1"](s_conv1)]
    features = [reference.mse(adapted[0], t_conv2), reference.mse(adapted[1], t_conv1)]
    response = reference.response(student_logits, teacher_logits, temperature)
    ce = reference.cross_entropy(student_logits, labels) if with_labels else 0.0
    want = reference.total(alpha, beta, response, features, weights, ce)

    # float64 log-space KL: absolute error ~ τ² · 1e-15 per term, far inside these bounds.
    tolerance = {"rel": 1e-9, "abs": 1e-12}
    assert out["loss"].item() == pytest.approx(want, **tolerance)
    if alpha:
        assert out["response"].item() == pytest.approx(response, **tolerance)
    else:  # α = 0 stops the teacher after its deepest paired layer: no logits, no response reported
        assert "response" not in out
    assert out["ce"].item() == pytest.approx(ce, **tolerance)
    assert out["feature/conv2->conv2"].item() == pytest.approx(features[0], **tolerance)
    assert out["feature/conv1->conv1.0"].item() == pytest.approx(features[1], **tolerance)
    assert out["feature"].item() == pytest.approx(weights[0] * features[0] + weights[1] * features[1], **tolerance)
    torch.testing.assert_close(out["logits"].detach(), student_logits)


def test_output_has_the_spec_keys(teacher, student, batch):
    out = Distiller(teacher, student, [PAIR])(*batch)
    assert set(out) == {"loss", "ce", "response", "feature", "feature/conv2->conv2", "logits"}


def test_tau_squared_switch(teacher, student, batch):
    inputs, _ = batch
    on = Distiller(teacher, student, temperature=3.0)(inputs)["response"]
    off = Distiller(teacher, student, temperature=3.0, temperature_squared=False)(inputs)["response"]
    assert on.item() == pytest.approx(9.0 * off.item(), rel=1e-6)


def test_teacher_gets_no_gradient_and_adapters_and_student_do(teacher, student, batch):
    distiller = Distiller(teacher, student, [PAIR], sample_input=batch[0])
    distiller(*batch)["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    adapter_params = list(distiller.adapters.parameters())
    assert adapter_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params)


def test_teacher_forward_builds_no_autograd_graph(teacher, student, batch):
    distiller = Distiller(teacher, student, [PAIR])
    seen = {}
    teacher.fc.register_forward_hook(lambda m, i, o: seen.setdefault("grad_fn", o.grad_fn))
    distiller(*batch)
    assert seen["grad_fn"] is None


def test_teacher_stays_in_eval_after_train_call(teacher, student):
    distiller = Distiller(teacher, student)
    teacher.train()
    distiller.train()
    assert not teacher.training
    assert student.training
    distiller.eval()
    assert not student.training


def test_teacher_batchnorm_statistics_do_not_move(teacher, student, batch):
    before = teacher.conv1[1].running_mean.clone()
    distiller = Distiller(teacher, student).train()
    distiller(*batch)
    assert torch.equal(teacher.conv1[1].running_mean, before)


def test_teacher_is_never_in_the_state_dict(teacher, student, batch):
    distiller = Distiller(teacher, student, [PAIR], sample_input=batch[0])
    keys = list(distiller.state_dict())
    assert keys and all(k.startswith(("student.", "adapters.")) for k in keys)
    assert any(k.startswith("adapters.") for k in keys)
    assert set(student.state_dict()) == {k.removeprefix("student.") for k in keys if k.startswith("student.")}


def test_trainable_parameters_are_student_then_adapters_in_stable_order(teacher, student, batch):
    pairs = [FeaturePair("conv2", "conv2"), FeaturePair("conv1", "conv1")]
    distiller = Distiller(teacher, student, pairs, sample_input=batch[0])
    params = list(distiller.trainable_parameters())
    want = list(student.parameters()) + list(distiller.adapters["0"].parameters())
    want += list(distiller.adapters["1"].parameters())
    assert [id(p) for p in params] == [id(p) for p in want]
    assert not any(p is q for p in params for q in teacher.parameters())


def test_trainable_parameters_before_adapters_exist_says_what_to_do(teacher, student):
    with pytest.raises(RuntimeError, match="sample_input"):
        list(Distiller(teacher, student, [PAIR]).trainable_parameters())
    assert len(list(Distiller(teacher, student).trainable_parameters())) == len(list(student.parameters()))


def test_adapters_are_built_lazily_at_first_forward(teacher, student, batch):
    distiller = Distiller(teacher, student, [PAIR])
    assert len(distiller.adapters) == 0
    distiller(*batch)
    assert isinstance(distiller.adapters["0"], nn.Conv2d)


def test_build_leaves_student_batchnorm_statistics_alone(teacher, student, batch):
    before = student.conv1[1].running_mean.clone()
    Distiller(teacher, student, [PAIR], sample_input=batch[0])
    assert torch.equal(student.conv1[1].running_mean, before)
    assert student.training


def test_hooked_tensor_equals_the_modules_real_output(teacher, student, batch):
    captured = {}

    def capture(name):
        return lambda module, inputs, output: captured.__setitem__(name, output.detach().clone())

    teacher.conv2.register_forward_hook(capture("teacher"))
    student.conv2.register_forward_hook(capture("student"))
    distiller = Distiller(teacher, student, [FeaturePair("conv2", "conv2")], sample_input=batch[0])
    distiller._teacher_recorder.clear()
    distiller._student_recorder.clear()
    with torch.no_grad():
        teacher(batch[0])
        student(batch[0])
    t_features, s_features = distiller._teacher_recorder.pop(), distiller._student_recorder.pop()
    assert torch.equal(t_features["conv2"], captured["teacher"])
    assert torch.equal(s_features["conv2"], captured["student"])
    assert distiller._teacher_recorder.pop.__self__._features == {}  # popped: nothing stays behind


def test_hooks_are_gone_after_close(teacher, student, batch):
    before = (len(teacher.conv2._forward_hooks), len(student.conv2._forward_hooks))
    with Distiller(teacher, student, [PAIR]) as distiller:
        distiller(*batch)
        assert len(teacher.conv2._forward_hooks) == before[0] + 1
    assert (len(teacher.conv2._forward_hooks), len(student.conv2._forward_hooks)) == before


def test_student_type_is_unchanged(teacher, student):
    distiller = Distiller(teacher, student, [PAIR])
    assert distiller.student is student and type(distiller.student) is TinyConvNet


def test_tuple_and_dict_outputs_work(seeded, batch):
    teacher, student = DictOutputNet(16), TupleOutputNet(4)
    out = Distiller(teacher, student, [PAIR])(*batch)
    assert out["logits"].shape == (6, 10)
    assert torch.isfinite(out["loss"])


def test_custom_logits_and_feature_functions(seeded, batch):
    class Weird(TinyConvNet):
        def forward(self, x):
            return {"scores": super().forward(x)}

    teacher, student = Weird(16), Weird(4)
    distiller = Distiller(
        teacher,
        student,
        [FeaturePair("conv2", "conv2")],
        logits_fn=lambda output: output["scores"],
        feature_fn=lambda output: output * 2,
    )
    out = distiller(*batch)
    assert out["logits"].shape == (6, 10)


def test_unknown_layer_lists_closest_names(teacher, student):
    with pytest.raises(LayerNotFoundError, match=r"no layer 'conv3'.*did you mean 'conv2'"):
        Distiller(teacher, student, [FeaturePair("conv3", "conv2")])
    with pytest.raises(LayerNotFoundError, match="teacher has no layer 'conv_2'"):
        Distiller(teacher, student, [FeaturePair("conv2", "conv_2")])


def test_hook_that_never_fires_is_an_error(seeded, batch):
    class WithUnused(TinyConvNet):
        def __init__(self, width):
            super().__init__(width)
            self.unused = nn.Linear(2, 2)

    teacher, student = WithUnused(16), TinyConvNet(4)
    distiller = Distiller(teacher, student, [FeaturePair("fc", "unused")])
    with pytest.raises(HookNotFiredError, match="teacher layer 'unused' did not run"):
        distiller(*batch)


def test_feature_pair_no_adapter_can_map_is_an_error(teacher, student, batch):
    distiller = Distiller(teacher, student, [FeaturePair("fc", "conv2")])
    with pytest.raises(FeatureShapeError, match=r"fc->conv2.*\(6, 10\).*\(6, 32, 4, 4\)"):
        distiller(*batch)


def test_class_count_mismatch_is_an_error(seeded, batch):
    with pytest.raises(ClassCountError, match="teacher predicts 10 classes but the student predicts 7"):
        Distiller(TinyConvNet(16, classes=10), TinyConvNet(4, classes=7))(*batch)


def test_non_finite_loss_names_the_term(teacher, student, batch):
    inputs, labels = batch
    inputs = inputs.clone()
    inputs[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="response"):
        Distiller(teacher, student, [PAIR])(inputs, labels)


def test_non_finite_feature_term_is_named(seeded, batch):
    def exploding(student_feature, teacher_feature, mask=None):
        return (student_feature - teacher_feature).sum() * float("inf")

    distiller = Distiller(TinyConvNet(16), TinyConvNet(4), [FeaturePair("conv2", "conv2", loss=exploding)])
    with pytest.raises(NonFiniteLossError, match=r"feature/conv2->conv2") as info:
        distiller(*batch)
    assert info.value.term == "feature"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"temperature": -1.0}, "temperature"),
        ({"alpha": -0.1}, "alpha must be"),
        ({"beta": float("nan")}, "beta must be"),
    ],
)
def test_out_of_range_hyperparameters_are_rejected(teacher, student, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Distiller(teacher, student, **kwargs)


def test_losses_from_the_registry_or_as_functions(teacher, student, batch, monkeypatch):
    calls = []

    def doubled_kl(student_rows, teacher_rows, temperature):
        calls.append(student_rows.shape)
        return 2 * RESPONSE_LOSSES["kl"](student_rows, teacher_rows, temperature)

    monkeypatch.setitem(RESPONSE_LOSSES, "doubled", doubled_kl)
    plain = Distiller(teacher, student)(*batch)["response"]
    named = Distiller(teacher, student, response_loss="doubled")(*batch)["response"]
    assert named.item() == pytest.approx(2 * plain.item(), rel=1e-6)
    cosine = Distiller(teacher, student, [FeaturePair("conv2", "conv2", loss="cosine")])(*batch)
    assert 0 <= cosine["feature"].item() <= 2
    assert FEATURE_LOSSES["cosine"] is not None and calls


def test_token_logits_with_ignore_index_and_attention_mask():
    class TokenModel(nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.embed = nn.Embedding(20, hidden)
            self.body = nn.Linear(hidden, hidden)
            self.head = nn.Linear(hidden, 11)

        def forward(self, input_ids, attention_mask=None):
            return {"logits": self.head(torch.tanh(self.body(self.embed(input_ids))))}

    torch.manual_seed(0)
    # Float64 models: the response (a KL with cancellation) matches the reference on any CPU.
    teacher, student = TokenModel(16).double(), TokenModel(6).double()
    ids = torch.randint(0, 20, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    labels = torch.randint(0, 11, (3, 5)).masked_fill(mask == 0, -100)
    inputs = {"input_ids": ids, "attention_mask": mask}
    distiller = Distiller(teacher, student, [FeaturePair("body", "body")], temperature=2.0)
    out = distiller(inputs, labels)
    with torch.no_grad():
        want_response = reference.response(student(ids)["logits"], teacher(ids)["logits"], 2.0, labels)
        want_ce = reference.cross_entropy(student(ids)["logits"], labels)
        s_body = distiller.adapters["0"](student.body(student.embed(ids)))
        t_body = teacher.body(teacher.embed(ids))
    real = mask.bool()
    assert out["response"].item() == pytest.approx(want_response, rel=1e-9)
    assert out["ce"].item() == pytest.approx(want_ce, rel=1e-9)
    assert out["feature"].item() == pytest.approx(reference.mse(s_body[real], t_body[real]), rel=1e-9)
    # Unlabelled: the attention mask alone decides which token rows count.
    unlabelled = distiller(inputs)
    assert unlabelled["response"].item() == pytest.approx(want_response, rel=1e-9)


def test_distiller_to_moves_the_teacher(teacher, student):
    Distiller(teacher, student).to(torch.float64)
    assert next(teacher.parameters()).dtype == torch.float64
    assert next(student.parameters()).dtype == torch.float64


def test_alpha_zero_stops_the_teacher_after_its_deepest_paired_layer(teacher, student, batch):
    ran = []
    teacher.fc.register_forward_hook(lambda *args: ran.append("fc"))
    out = Distiller(teacher, student, [PAIR], alpha=0.0)(*batch)
    assert ran == [] and torch.isfinite(out["loss"])
    Distiller(teacher, student, [PAIR], alpha=0.5)(*batch)
    assert ran == ["fc"]


def test_lower_precision_teacher_keeps_float32_losses(teacher, student, batch):
    full = Distiller(teacher, student)(*batch)
    half = Distiller(teacher, student, teacher_dtype=torch.bfloat16)(*batch)
    assert half["response"].dtype == torch.float32
    assert half["response"].item() == pytest.approx(full["response"].item(), rel=0.1, abs=1e-3)
