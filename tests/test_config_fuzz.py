"""Property-based tests: any config or override either loads or raises ConfigError, nothing else."""

from __future__ import annotations

import contextlib

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdistill.config import ConfigError, apply_override, from_dict, load_config

KEYS = [
    "teacher",
    "student",
    "data",
    "distill",
    "train",
    "baseline",
    "out",
    "cache_dir",
    "model",
    "args",
    "weights",
    "epochs",
    "mixup",
    "dataset",
    "path",
    "batch_size",
    "augment",
    "alpha",
    "beta",
    "temperature",
    "feature_pairs",
    "student",
    "teacher",
    "weight",
    "loss",
    "lr",
    "optimizer",
    "seed",
    "image_size",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 500),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "cnn", "shift", "adamw", "mnist5k", "kl"]),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children, max_size=5),
    ),
    max_leaves=20,
)
configs = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=configs)
def test_any_mapping_loads_or_raises_config_error(raw):
    with contextlib.suppress(ConfigError):
        from_dict(raw)


@settings(max_examples=300, deadline=None)
@given(override=st.text(max_size=40))
def test_any_override_text_loads_or_raises_config_error(override):
    with contextlib.suppress(ConfigError):
        load_config(None, [override])


@settings(max_examples=200, deadline=None)
@given(key=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3), value=values)
def test_structured_overrides_load_or_raise_config_error(key, value):
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    override = ".".join(key) + "=" + text.replace("\n", " ")
    with contextlib.suppress(ConfigError):
        load_config(None, [override])


@settings(max_examples=200, deadline=None)
@given(document=st.text(max_size=200))
def test_any_yaml_text_loads_or_raises_config_error(document, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_text(document)
    with contextlib.suppress(ConfigError):
        load_config(path)


def test_apply_override_nests_sections():
    raw = {}
    apply_override(raw, "train.epochs=3")
    apply_override(raw, "distill.feature_pairs=[{student: a, teacher: b}]")
    assert raw == {"train": {"epochs": 3}, "distill": {"feature_pairs": [{"student": "a", "teacher": "b"}]}}
