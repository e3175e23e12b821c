"""Adapters built from shapes, and the hook recorder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill import FeatureRecorder, FeatureShapeError, HookNotFiredError, LayerNotFoundError, build_adapter
from kdistill.core.adapters import Resize
from kdistill.core.hooks import first_tensor, strip_wrapper_prefixes, unwrap


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "kind"),
    [
        ((2, 8, 5, 5), (2, 8, 5, 5), nn.Identity),
        ((2, 7), (2, 12), nn.Linear),
        ((2, 5, 6), (2, 5, 10), nn.Linear),  # tokens: same length, hidden size differs
        ((2, 6, 9), (2, 10, 9), nn.Conv1d),  # (N, C, L): channels differ
        ((2, 8, 7, 7), (2, 16, 7, 7), nn.Conv2d),
        ((2, 8, 14, 14), (2, 8, 7, 7), Resize),
        ((2, 8, 14, 14), (2, 16, 7, 7), nn.Sequential),
        ((2, 8, 7, 7), (2, 16, 14, 14), nn.Sequential),
        ((2, 6, 9), (2, 10, 4), nn.Sequential),
    ],
)
def test_adapter_maps_student_shape_to_teacher_shape(student_shape, teacher_shape, kind):
    adapter = build_adapter(student_shape, teacher_shape)
    assert isinstance(adapter, kind)
    feature = torch.randn(student_shape, requires_grad=True)
    out = adapter(feature)
    assert out.shape == teacher_shape
    out.sum().backward()
    assert feature.grad is not None


def test_shrinking_adapter_resizes_before_the_convolution():
    adapter = build_adapter((1, 8, 14, 14), (1, 16, 7, 7))
    assert isinstance(adapter[0], Resize) and isinstance(adapter[1], nn.Conv2d)
    growing = build_adapter((1, 8, 7, 7), (1, 16, 14, 14))
    assert isinstance(growing[0], nn.Conv2d) and isinstance(growing[1], Resize)


def test_integer_factor_downsizing_is_average_pooling():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(Resize((2, 2))(x), torch.nn.functional.avg_pool2d(x, 2))


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "why"),
    [
        ((2, 10), (2, 8, 4, 4), "different numbers of dimensions"),
        ((2, 8, 4, 4), (3, 8, 4, 4), "batch sizes differ"),
        ((2, 3, 4, 4, 4), (2, 5, 4, 4, 4), "5-dimensional"),
    ],
)
def test_unmappable_shapes_are_explained(student_shape, teacher_shape, why):
    with pytest.raises(FeatureShapeError, match=why):
        build_adapter(student_shape, teacher_shape, "a->b")


def test_recorder_captures_pops_and_closes():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    recorder = FeatureRecorder(model, ["0", "2"])
    x = torch.randn(5, 3)
    out = model(x)
    features = recorder.pop()
    torch.testing.assert_close(features["2"], out)
    torch.testing.assert_close(features["0"], model[0](x))
    with pytest.raises(HookNotFiredError):
        recorder.pop()  # popped: nothing left until the next forward
    recorder.close()
    model(x)
    assert recorder._features == {}
    assert not model[0]._forward_hooks


def test_recorder_accepts_wrapper_prefixes_and_wrapped_models():
    inner = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    # A real wrapper (DataParallel here; DDP and torch.compile alike): a user's model that merely
    # has an attribute called `module` is not one (tests/test_core_fixes.py).
    wrapped = nn.DataParallel(inner)
    assert unwrap(wrapped) is inner
    assert strip_wrapper_prefixes("module._orig_mod.0") == "0"
    with FeatureRecorder(wrapped, ["module.0"]) as recorder:
        wrapped(torch.randn(2, 3))
        assert recorder.pop()["0"].shape == (2, 4)


def test_unknown_path_names_the_closest_layers():
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    with pytest.raises(LayerNotFoundError, match=r"did you mean 'encoder.1'"):
        FeatureRecorder(model, ["encoder.l"], role="student")
    with pytest.raises(LayerNotFoundError):
        FeatureRecorder(model, [""])


def test_first_tensor_rule():
    a, b = torch.zeros(1), torch.ones(1)
    assert first_tensor(a) is a
    assert first_tensor((a, b)) is a
    assert first_tensor((None, [b, a])) is b
    assert first_tensor({"last_hidden_state": b, "other": a}) is b
    with pytest.raises(TypeError):
        first_tensor(("text", 3))
