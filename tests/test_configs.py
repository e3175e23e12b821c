"""The example configs load, and config parsing is strict."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdistill.config import Config, ConfigError, dump_config, from_dict, load_config, read_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
DEMO = Path(__file__).resolve().parents[1] / "src" / "kdistill" / "demo.yaml"


@pytest.mark.parametrize("path", [*CONFIGS, DEMO], ids=lambda p: p.name)
def test_example_config_loads_and_starts_with_its_command(path):
    config = load_config(path)
    assert isinstance(config, Config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# kdistill ") or path == DEMO


def test_resolved_config_round_trips():
    config = load_config(DEMO, ["distill.feature_pairs=[{student: stage2, teacher: stage2, weight: 0.5}]"])
    import yaml

    assert from_dict(yaml.safe_load(dump_config(config))) == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teacher.modle=cnn", "unknown key teacher.modle; did you mean 'model'"),
        ("train.lr=fast", "train.lr must be a number"),
        ("train.lr=0", "train.lr must be > 0"),
        ("train.optimizer=adam", "did you mean 'adamw'"),
        ("distill.alpha=-1", "distill.alpha must be ≥ 0"),
        ("distill.beta=-0.5", "distill.beta must be ≥ 0"),
        ("distill.temperature=0", "distill.temperature must be > 0"),
        ("baseline=maybe", "baseline must be true or false"),
        ("train.epochs=2.5", "train.epochs must be an integer"),
        ("data.image_size=[a, b]", "data.image_size[0] must be an integer"),
        ("distill.feature_pairs=[{student: a, teacher: b, wieght: 2}]", "unknown key distill.feature_pairs[0].wieght"),
        ("train.lr=.nan", "must be a finite number"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        read_yaml(path)


def test_yaml_tags_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        read_yaml(path)


def test_teacher_cache_key_ignores_what_the_teacher_does_not_use():
    from kdistill.pipeline import teacher_cache_key

    pinned = "teacher.epochs=20"  # unpinned, teacher.epochs follows train.epochs
    base = load_config(None, [pinned])
    same = ["train.seed=7", "train.epochs=3", "train.mixup=0.5", "distill.temperature=2", "student.args={}"]
    for override in same:
        assert teacher_cache_key(load_config(None, [pinned, override])) == teacher_cache_key(base), override
    for override in ["teacher.epochs=3", "teacher.seed=1", "teacher.mixup=0", "data.dataset=digits", "train.lr=0.1"]:
        assert teacher_cache_key(load_config(None, [pinned, override])) != teacher_cache_key(base), override
