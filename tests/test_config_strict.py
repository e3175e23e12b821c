"""Strict config reading: duplicate keys, number spellings, value ranges, nesting depth, device
syntax, per-family default args, the teacher's default budget, and naming changed keys."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from kdistill.cli import main
from kdistill.config import (
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    TeacherConfig,
    TrainConfig,
    dump_config,
    from_dict,
    load_config,
    read_yaml,
)
from tests.test_bad_input import DIGITS

DEMO = Path(__file__).resolve().parents[1] / "src" / "kdistill" / "demo.yaml"


def escaped(message: str) -> str:
    """``message`` as a literal regular expression for ``pytest.raises(match=...)``."""
    import re

    return re.escape(message)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# -- #13.7 duplicate keys ------------------------------------------------------------------


def test_duplicate_section_is_refused_with_both_lines(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\ndata:\n  batch_size: 8\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=escaped("duplicate key 'train' at lines 1 and 5")):
        read_yaml(path)


def test_duplicate_nested_key_is_refused_with_both_lines(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n  lr: 0.1\n  epochs: 60\n")
    with pytest.raises(ConfigError, match=escaped("duplicate key 'epochs' at lines 2 and 4")):
        load_config(path)


def test_duplicate_key_deep_inside_args_and_lists_is_refused(tmp_path):
    text = "distill:\n  feature_pairs:\n    - {student: a, teacher: b,\n       student: c}\n"
    with pytest.raises(ConfigError, match=escaped("duplicate key 'student' at lines 3 and 4")):
        read_yaml(write(tmp_path, text))
    with pytest.raises(ConfigError, match="duplicate key 'channels'"):
        load_config(None, ["teacher.args={channels: [1], channels: [2]}"])


def test_merge_keys_still_override_without_a_duplicate_error(tmp_path):
    text = "teacher:\n  args: &base {channels: [4, 8]}\nstudent:\n  args:\n    <<: *base\n    channels: [2]\n"
    assert read_yaml(write(tmp_path, text))["student"]["args"] == {"channels": [2]}


# -- #13.8 numbers in every common spelling --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 1e-3), ("1E-3", 1e-3), ("+1e-3", 1e-3), ("3e-4", 3e-4), ("1.5e-3", 1.5e-3), (".5e-2", 0.005)],
)
def test_float_keys_accept_scientific_notation_in_set_and_yaml(text, value, tmp_path):
    assert load_config(None, [f"train.lr={text}"]).train.lr == value
    assert load_config(write(tmp_path, f"train:\n  lr: {text}\n")).train.lr == value


def test_other_float_spellings_and_exponents_without_a_sign():
    config = load_config(None, ["train.warmup_epochs=.5", "train.weight_decay=5e-4", "distill.alpha=1e0"])
    assert (config.train.warmup_epochs, config.train.weight_decay, config.distill.alpha) == (0.5, 5e-4, 1.0)
    assert load_config(None, ["distill.temperature=4"]).distill.temperature == 4.0


def test_integer_keys_stay_integers_and_accept_integral_scientific_values():
    config = load_config(None, ["train.epochs=3", "data.batch_size=1_024", "data.eval_batch_size=1e3"])
    assert (config.train.epochs, config.data.batch_size, config.data.eval_batch_size) == (3, 1024, 1000)
    assert all(type(v) is int for v in (config.train.epochs, config.data.batch_size, config.data.eval_batch_size))
    with pytest.raises(ConfigError, match=escaped("train.epochs must be an integer")):
        load_config(None, ["train.epochs=2.5e0"])


def test_factory_args_get_numbers_not_strings():
    assert load_config(None, ["teacher.args={dropout: 1e-1}"]).teacher.args == {"dropout": 0.1}


# -- #13.9 ranges ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.step_gamma=-1", "train.step_gamma must be > 0 and ≤ 1"),
        ("train.step_gamma=1.5", "train.step_gamma must be > 0 and ≤ 1"),
        ("train.seed=1180591620717411303424", "train.seed must be ≥ 0 and < 2^32"),
        ("train.seed=-1", "train.seed must be ≥ 0 and < 2^32"),
        ("teacher.seed=4294967296", "teacher.seed must be ≥ 0 and < 2^32"),
        ("train.epochs=1e9", "train.epochs must be ≥ 1 and ≤ 10,000"),
        ("teacher.epochs=0", "teacher.epochs must be ≥ 1 and ≤ 10,000"),
        ("data.batch_size=1e9", "data.batch_size must be ≥ 1 and ≤ 1,048,576"),
        ("data.eval_batch_size=1e9", "data.eval_batch_size must be ≥ 1 and ≤ 1,048,576"),
        ("data.augment_views=1e8", "data.augment_views must be ≥ 1 and ≤ 1,000"),
        ("data.max_length=1e12", "data.max_length must be ≥ 2 and ≤ 1,048,576"),
        ("data.train_samples=1180591620717411303424", "data.train_samples must be ≥ 1 and < 2^63"),
        ("data.image_size=[5000, 32]", "data.image_size must be [height, width], each from 1 to 4,096"),
        ("data.image_size=[0, 32]", "data.image_size must be [height, width], each from 1 to 4,096"),
        ("distill.cache_topk=1e9", "distill.cache_topk must be ≥ 1 and ≤ 1,048,576"),
        ("distill.temperature=1e6", "distill.temperature must be > 0 and ≤ 100"),
        ("distill.alpha=1e9", "distill.alpha must be ≥ 0 and ≤ 1,000,000"),
        ("distill.feature_pairs=[{student: a, teacher: b, weight: 1e9}]", "distill.feature_pairs[0].weight must be"),
        ("train.lr=1e6", "train.lr must be > 0 and ≤ 100"),
        ("train.lr=.inf", "train.lr must be a finite number"),
        ("train.weight_decay=100", "train.weight_decay must be ≥ 0 and ≤ 10"),
        ("train.mixup=1e9", "train.mixup must be ≥ 0 and ≤ 100"),
        ("teacher.mixup=1e9", "teacher.mixup must be ≥ 0 and ≤ 100"),
        ("train.accumulate=1e9", "train.accumulate must be ≥ 1 and ≤ 1,048,576"),
        ("train.early_stopping=0", "train.early_stopping must be ≥ 1 and ≤ 10,000"),
        ("train.step_epochs=1e9", "train.step_epochs must be ≥ 1 and ≤ 10,000"),
        ("train.grad_clip=0", "train.grad_clip must be > 0 and ≤ 1,000,000"),
        ("train.warmup_epochs=61", "train.warmup_epochs must be ≤ train.epochs (60)"),
    ],
)
def test_absurd_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=escaped(message)):
        load_config(None, [override])


def test_augment_views_message_says_why():
    with pytest.raises(ConfigError, match="teacher cache"):
        load_config(None, ["data.augment_views=1e8"])


def test_warmup_cannot_outlast_the_teachers_own_training():
    with pytest.raises(ConfigError, match=escaped("train.warmup_epochs must be ≤ teacher.epochs (2)")):
        load_config(None, ["teacher.epochs=2", "train.warmup_epochs=5"])
    given = load_config(None, ["teacher.epochs=2", "train.warmup_epochs=5", "teacher.weights=t.safetensors"])
    assert given.train.warmup_epochs == 5  # a teacher with weights is not trained: no constraint


@pytest.mark.parametrize(
    "override",
    [
        "train.step_gamma=1",
        "train.seed=4294967295",
        "data.augment_views=1000",
        "data.image_size=[4096, 4096]",
        "distill.temperature=100",
        "train.warmup_epochs=60",
        "train.epochs=10000",
    ],
)
def test_values_at_the_bounds_are_accepted(override):
    load_config(None, [override])


def _numeric_keys() -> list[tuple[str, type]]:
    """Every int or float field of the config, as (dotted key, type)."""
    keys = []
    sections = {"teacher": TeacherConfig, "data": DataConfig, "distill": DistillConfig, "train": TrainConfig}
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            options = set(typing.get_args(hints[f.name])) or {hints[f.name]}
            for kind in (int, float):
                if kind in options:
                    keys.append((f"{section}.{f.name}", kind))
    return keys


def test_every_numeric_key_is_checked_by_this_test():
    keys = {key for key, _ in _numeric_keys()}
    assert {"teacher.epochs", "train.step_gamma", "data.augment_views", "train.seed", "data.max_length"} <= keys


@pytest.mark.parametrize(("key", "kind"), _numeric_keys(), ids=lambda k: str(k))
@pytest.mark.parametrize("sign", [1, -1])
def test_every_numeric_key_has_a_range(key, kind, sign):
    value = sign * (10**30 if kind is int else 1e30)
    with pytest.raises(ConfigError, match=f"^{escaped(key)} "):
        load_config(None, [f"{key}={value}"])


def test_huge_integers_for_float_keys_are_not_finite_numbers():
    with pytest.raises(ConfigError, match=escaped("train.lr must be a finite number")):
        load_config(None, ["train.lr=1" + "0" * 400])


@pytest.mark.parametrize("value", ["1" + "0" * 5000, "2024-13-01"])
def test_values_python_cannot_build_are_config_errors(value, tmp_path):
    # a 5,000-digit integer exceeds Python's int parsing limit; month 13 is not a date
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(None, [f"train.lr={value}"])
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(write(tmp_path, f"train:\n  lr: {value}\n"))


def test_pair_weight_has_a_range():
    with pytest.raises(ConfigError, match=escaped("distill.feature_pairs[0].weight must be ≥ 0 and ≤ 1,000,000")):
        load_config(None, ["distill.feature_pairs=[{student: a, teacher: b, weight: 1e30}]"])


# -- #13.10 nesting depth and device syntax --------------------------------------------------


@pytest.mark.parametrize("opening", ["[", "{a: "])
def test_deeply_nested_yaml_is_one_config_error(opening, tmp_path):
    closing = "]" if opening == "[" else "}"
    path = write(tmp_path, "teacher:\n  args: {x: " + opening * 5000 + "1" + closing * 5000 + "}\n")
    with pytest.raises(ConfigError, match="nested more than 100 levels deep") as raised:
        load_config(path)
    assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match="nested more than 100 levels deep"):
        load_config(None, ["teacher.args={x: " + opening * 5000 + "1" + closing * 5000 + "}"])


def test_moderate_nesting_still_loads():
    assert load_config(None, ["teacher.args={x: " + "[" * 50 + "1" + "]" * 50 + "}"]).teacher.args["x"]


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_known_devices_are_accepted(device):
    assert load_config(None, [f"train.device={device}"]).train.device == device


@pytest.mark.parametrize("device", ["banana", "cuda:", "cuda:-1", "cuda:x", "CPU", "cpu:0", " cpu", "tpu"])
def test_unknown_devices_are_refused_listing_the_accepted_ones(device):
    with pytest.raises(ConfigError, match=escaped("train.device must be auto, cpu, cuda, cuda:N or mps")):
        load_config(None, [f"train.device={device!r}"])


# -- #12.9 built-in default args apply only to their family ----------------------------------


def test_default_args_belong_to_the_cnn_family_only():
    defaults = load_config(None)
    assert defaults.teacher.args == {"channels": [32, 64, 128]}
    assert defaults.student.args == {"channels": [8, 16, 32]}
    factory = load_config(None, ["teacher.model=mypackage.models:teacher", "student.model=resnet8x4"])
    assert factory.teacher.args == {} and factory.student.args == {}
    assert load_config(None, ["teacher.model=cnn"]).teacher.args == {"channels": [32, 64, 128]}
    assert load_config(None, ["student.model=mypackage.models:s", "student.args={w: 2}"]).student.args == {"w": 2}


def test_default_args_are_not_shared_between_configs():
    first = load_config(None)
    first.teacher.args["channels"].append(256)
    assert load_config(None).teacher.args == {"channels": [32, 64, 128]}


@pytest.mark.parametrize(
    "overrides",
    [[], ["teacher.model=mypackage.models:teacher", "student.model=resnet8x4"], ["train.epochs=7"]],
)
def test_resolved_config_round_trips(overrides):
    config = load_config(None, overrides)
    assert from_dict(yaml.safe_load(dump_config(config))) == config


# -- #12.11 the teacher's budget defaults to the student's ------------------------------------


def test_teacher_epochs_default_to_the_students_budget():
    assert load_config(None).teacher.epochs == load_config(None).train.epochs == 60
    assert load_config(None, ["train.epochs=7"]).teacher.epochs == 7
    assert load_config(None, ["train.epochs=7", "teacher.epochs=3"]).teacher.epochs == 3
    assert load_config(None, ["train.epochs=7", "teacher.epochs=null"]).teacher.epochs == 7
    assert load_config(DEMO).teacher.epochs == load_config(DEMO).train.epochs
    assert isinstance(Config().teacher.epochs, int)


def test_teacher_cache_key_follows_the_resolved_teacher_budget():
    from kdistill.pipeline import teacher_cache_key

    base = load_config(None)
    assert teacher_cache_key(load_config(None, ["train.epochs=3"])) != teacher_cache_key(base)
    assert teacher_cache_key(load_config(None, ["teacher.epochs=60"])) == teacher_cache_key(base)
    pinned = load_config(None, ["teacher.epochs=20"])
    assert teacher_cache_key(load_config(None, ["teacher.epochs=20", "train.epochs=3"])) == teacher_cache_key(pinned)


# -- #13.12 naming the keys that differ -------------------------------------------------------


def test_differences_names_the_dotted_keys_in_config_order():
    from kdistill.config import differences

    base = load_config(None)
    assert differences(base, load_config(None)) == []
    changed = load_config(None, ["train.lr=0.1", "distill.alpha=0.5", "out=elsewhere"])
    assert differences(base, changed) == ["distill.alpha", "train.lr", "out"]
    assert differences(changed, base) == ["distill.alpha", "train.lr", "out"]


def test_differences_reach_into_args_and_compare_lists_whole():
    from kdistill.config import differences

    base = load_config(None)
    other = load_config(None, ["teacher.args={channels: [8], extra: 1}", "distill.feature_pairs=auto"])
    assert differences(base, other) == ["teacher.args.channels", "teacher.args.extra", "distill.feature_pairs"]


# -- the CLI: one line, exit 2, before any training ------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.device=banana"], "train.device must be auto, cpu, cuda, cuda:N or mps, got 'banana'"),
        (["--set", "data.augment_views=1e8"], "data.augment_views must be ≥ 1 and ≤ 1,000"),
        (["--set", "train.seed=1180591620717411303424"], "train.seed must be ≥ 0 and < 2^32"),
        (["--set", "train.step_gamma=-1"], "train.step_gamma must be > 0 and ≤ 1"),
        (["--set", "teacher.args=" + "[" * 5000 + "]" * 5000], "nested more than 100 levels deep"),
    ],
)
def test_bad_values_fail_on_the_command_line_before_any_run(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    # DIGITS keeps the run tiny where the code before this check let the bad value through.
    assert main(["train", "/dev/null", "--out", str(tmp_path / "run"), "--quiet", *DIGITS, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdistill: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "internal error" not in err
    assert not (tmp_path / "run").exists(), "the run started before the config was checked"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  epochs: 3\ntrain:\n  lr: 0.1\n", "duplicate key 'train' at lines 1 and 3"),
        ("teacher:\n  args: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 100 levels deep"),
    ],
)
def test_bad_files_fail_on_the_command_line_before_any_run(text, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    assert main(["train", str(write(tmp_path, text)), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdistill: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "internal error" not in err
    assert not (tmp_path / "run").exists()
