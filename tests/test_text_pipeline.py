"""The whole job on text: a local tiny BERT teacher, a `shrink` student, a CSV of labelled text."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdistill.config import load_config
from kdistill.core.errors import ConfigError
from kdistill.data import load_data, trim_padding
from kdistill.pipeline import run

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

POSITIVE, NEGATIVE = ["good", "great", "fine", "fun"], ["bad", "dull", "awful", "boring"]
NEUTRAL = ["movie", "film", "plot", "actor", "the", "a", "was", "is", "very"]
WORDS = POSITIVE + NEGATIVE + NEUTRAL


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = transformers.BertTokenizerFast(vocab={word: index for index, word in enumerate(words)})
    model_dir = root / "tiny-bert"
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    transformers.BertModel(config).save_pretrained(model_dir)
    rng = random.Random(0)
    rows = []
    for _ in range(160):
        positive = rng.random() < 0.5
        words = rng.sample(POSITIVE if positive else NEGATIVE, 2) + rng.sample(NEUTRAL, rng.randint(1, 6))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if positive else "neg"})
    data = root / "reviews.csv"
    with data.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    run_config = {
        "teacher": {"model": "hf", "args": {"path": str(model_dir)}, "epochs": 12, "mixup": 0},
        "student": {"model": "shrink", "args": {"every": 2}},
        "data": {
            "dataset": "text",
            "path": str(data),
            "tokenizer": str(model_dir),
            "max_length": 16,
            "augment": "none",
            "batch_size": 16,
            "eval_batch_size": 64,
        },
        "distill": {"temperature": 2.0, "feature_pairs": "auto"},
        "train": {"epochs": 2, "lr": 3e-3},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(run_config))
    return {"root": root, "config": path, "model": model_dir, "data": data}


def test_text_data_is_tokenized_and_batches_are_trimmed(text_setup) -> None:
    config = load_config(text_setup["config"])
    splits = load_data(config.data)
    assert splits.train.is_text and splits.num_classes == 2
    assert set(splits.train.inputs) >= {"input_ids", "attention_mask"}
    inputs, labels = splits.train.take(torch.arange(4))
    longest = int(inputs["attention_mask"].sum(1).max())
    assert inputs["input_ids"].shape == (4, longest) and labels.shape == (4,)
    assert bool(inputs["attention_mask"][:, -1].any())  # trimmed to the last real token, no further
    assert int((inputs["input_ids"] == 1).sum()) == 0  # every word is in the vocabulary: no [UNK]
    assert trim_padding(torch.ones(2, 3)).shape == (2, 3)  # tensors pass unchanged


def test_text_run_end_to_end_with_a_shrunk_student(text_setup, tmp_path) -> None:
    config = load_config(text_setup["config"], [f"cache_dir={tmp_path / 'cache'}"])
    lines: list[str] = []
    report = run(config, tmp_path / "run", log=lines.append)
    assert report["student"]["params"] < report["teacher"]["params"]
    assert report["teacher"]["accuracy"] > 0.8  # the toy task is easy: the tiny teacher learns it
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["distill"]["feature_pairs"] == [
        {"student": "bert.encoder.layer.0", "teacher": "bert.encoder.layer.1", "weight": 1.0, "loss": "mse"},
        {"student": "bert.encoder.layer.1", "teacher": "bert.encoder.layer.3", "weight": 1.0, "loss": "mse"},
    ]
    assert any(line.startswith("teacher cache: built") for line in lines)  # token outputs cached too
    records = [json.loads(x) for x in (tmp_path / "run" / "distill" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert all(r["feature"] > 0 and r["response"] >= 0 for r in steps)


def test_cached_and_live_teacher_train_the_same_text_student(text_setup, tmp_path) -> None:
    """The cache runs the teacher at the full padded length and cuts its token outputs to each
    trimmed batch: the losses, and so the trained student, match a live teacher's."""
    from safetensors.torch import load_file

    base = [f"cache_dir={tmp_path / 'cache'}", "distill.cache_storage=float32", "baseline=false"]
    weights = {}
    for setting in ("auto", "off"):
        config = load_config(text_setup["config"], [*base, f"distill.teacher_cache={setting}"])
        run(config, tmp_path / setting, log=lambda line: None)
        weights[setting] = load_file(tmp_path / setting / "distill" / "student.safetensors")
        losses = [json.loads(x) for x in (tmp_path / setting / "distill" / "metrics.jsonl").read_text().splitlines()]
        weights[setting + "-loss"] = [r["loss"] for r in losses if r["kind"] == "step"]
    assert weights["auto-loss"] == pytest.approx(weights["off-loss"], rel=1e-4, abs=1e-6)
    for key, value in weights["off"].items():
        assert torch.allclose(weights["auto"][key], value, atol=1e-4), key


def test_shrunk_student_starts_from_the_trained_teacher(text_setup, tmp_path) -> None:
    from kdistill.integrations.hf import shrink
    from kdistill.models import load_weights
    from kdistill.pipeline import build_pair, cached_teacher_path, shrunk_student_weights

    config = load_config(
        text_setup["config"], [f"cache_dir={tmp_path / 'cache'}", "train.epochs=1", "teacher.epochs=1"]
    )
    run(config, tmp_path / "run", log=lambda line: None)
    splits = load_data(config.data)
    teacher, student = build_pair(config, splits)
    load_weights(teacher, cached_teacher_path(config), "teacher")
    shrunk_student_weights(config, teacher, student)
    expected = shrink(teacher, every=2).student.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in student.state_dict().items())


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.augment=shift", "must be none for text"),
        ("teacher.mixup=1.0", "token ids cannot be mixed"),
        ("data.tokenizer=null", "needs a tokenizer"),
        ("student.args={every: 9}", "every must be an integer from 1 to 4"),
        ("student.args={depth: 2}", "shrink takes every, layers or path"),
        ("teacher.model=shrink", "cannot be shrink"),
    ],
)
def test_bad_text_configs_are_one_line_errors(text_setup, tmp_path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config = load_config(text_setup["config"], [override, f"cache_dir={tmp_path}"])
        run(config, tmp_path / "run", log=lambda line: None)


def test_inspect_lists_transformer_layers_for_a_sequence_length(text_setup) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdistill",
            "inspect",
            "hf",
            "--args",
            f"{{path: {text_setup['model']}, task: sequence-classification}}",
            "--classes",
            "2",
            "--student",
            "shrink",
            "--student-args",
            "{layers: [0, 3]}",
            "--seq-len",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "bert.encoder.layer.3 " in result.stdout
    assert "2×12×16" in result.stdout  # (batch, tokens, hidden)
    assert "{student: bert.encoder.layer.1, teacher: bert.encoder.layer.3}" in result.stdout


def test_inspect_config_with_text_data(text_setup) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kdistill", "inspect", "--config", str(text_setup["config"]), "--depth", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "student: shrink {every: 2}" in result.stdout
    assert "{student: bert.encoder.layer.0, teacher: bert.encoder.layer.1}" in result.stdout
