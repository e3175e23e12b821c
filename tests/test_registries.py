"""The loss registries' front door: names and signatures are checked when a loss is added."""

from __future__ import annotations

import pytest
import torch

from kdistill import FEATURE_LOSSES, RESPONSE_LOSSES, Distiller, register_feature_loss, register_response_loss
from kdistill.core.errors import ConfigError
from kdistill.core.losses import kl_divergence


@pytest.fixture(autouse=True)
def _clean_registries():
    response, feature = dict(RESPONSE_LOSSES), dict(FEATURE_LOSSES)
    yield
    RESPONSE_LOSSES.clear(), RESPONSE_LOSSES.update(response)
    FEATURE_LOSSES.clear(), FEATURE_LOSSES.update(feature)


def test_a_registered_response_loss_is_used_by_name(teacher, student, batch):
    def doubled_kl(student_rows, teacher_rows, temperature):
        return 2 * kl_divergence(student_rows, teacher_rows, temperature)

    register_response_loss("doubled_kl", doubled_kl)
    inputs, labels = batch
    plain = Distiller(teacher, student, response_loss="kl")(inputs, labels)["response"]
    doubled = Distiller(teacher, student, response_loss="doubled_kl")(inputs, labels)["response"]
    torch.testing.assert_close(doubled, 2 * plain)


def test_a_registered_feature_loss_is_used_by_name():
    def l1(student_feature, teacher_feature, mask=None):
        return (student_feature - teacher_feature).abs().mean()

    register_feature_loss("l1", l1)
    assert FEATURE_LOSSES["l1"] is l1


@pytest.mark.parametrize("name", ["kl", "jsd", "dkd"])
def test_a_taken_name_is_refused(name):
    with pytest.raises(ConfigError, match="is taken"):
        register_response_loss(name, kl_divergence)


def test_a_function_of_the_wrong_shape_is_refused():
    with pytest.raises(ConfigError, match=r"must take \(student_rows, teacher_rows, temperature\)"):
        register_response_loss("two_arguments", lambda student, teacher: student.sum())
    with pytest.raises(ConfigError, match="must take"):
        register_feature_loss("four", lambda a, b, c, d: a.sum())
    with pytest.raises(ConfigError, match="must be a function"):
        register_feature_loss("not_callable", 3)
    with pytest.raises(ConfigError, match="must be a word"):
        register_response_loss("has space", kl_divergence)
    assert "two_arguments" not in RESPONSE_LOSSES and "four" not in FEATURE_LOSSES
