"""Language-model runs (``data.dataset: corpus``) end to end: config, ``kdistill train``, the report,
``--resume``, ``kdistill generate`` and ``kdistill inspect`` — on a tiny random Llama teacher saved
with ``save_pretrained``, a word-level tokenizer built offline, and a small text file (seconds)."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from kdistill import lm_run  # noqa: E402
from kdistill.cli import main  # noqa: E402
from kdistill.config import ConfigError, dump_config, from_dict, load_config, read_yaml  # noqa: E402
from tests.lm_models import llama  # noqa: E402
from tests.test_corpus import word_tokenizer  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]
LM_FIELDS = ("perplexity", "validation_perplexity", "params", "size_mb", "tokens_per_s", "latency_ms_per_token")


def tiny_llama() -> torch.nn.Module:
    """The shared tiny Llama, float32 in training mode."""
    return llama(0, 64, exact=False)


def trained_llama(tokenizer, documents: list[str]) -> torch.nn.Module:
    """The tiny teacher after 150 Adam steps on the documents: far better than its students start."""
    model = tiny_llama()
    stream = torch.tensor([i for d in documents for i in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]])
    blocks = stream[: len(stream) // 16 * 16].view(-1, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = blocks[torch.randint(len(blocks), (8,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny teacher directory (model + tokenizer), a text file and a config file using them."""
    root = tmp_path_factory.mktemp("lm")
    rng = random.Random(0)
    # Text with structure a model can learn: each word is mostly followed by the next one.
    documents = [" ".join(WORDS[(start + i) % len(WORDS)] for i in range(rng.randint(5, 30))) for start in range(60)]
    documents = [" ".join(w if rng.random() < 0.9 else rng.choice(WORDS) for w in d.split()) for d in documents]
    text = root / "text.txt"
    text.write_text("\n\n".join(documents))
    tokenizer = word_tokenizer(WORDS)
    teacher = root / "teacher"
    trained_llama(tokenizer, documents).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    # Not a causal LM: DistilBERT has no causal-LM head in transformers.
    classifier = root / "classifier"
    bert = transformers.DistilBertConfig(vocab_size=64, dim=16, hidden_dim=32, n_layers=2, n_heads=2)
    transformers.DistilBertForSequenceClassification(bert).save_pretrained(classifier)
    tokenizer.save_pretrained(classifier)
    config = {
        "teacher": {"model": "hf", "args": {"path": str(teacher), "task": "causal-lm"}},
        "student": {"model": "shrink", "args": {"every": 2}, "vocabulary": "corpus"},
        "data": {
            "dataset": "corpus",
            "path": str(text),
            "block_size": 16,
            "validation_fraction": 0.2,
            "test_fraction": 0.2,
            "batch_size": 4,
        },
        "distill": {"cache_topk": 8},
        "train": {"epochs": 1, "lr": 5e-3, "device": "cpu", "amp": "off"},
    }
    path = root / "lm.yaml"
    path.write_text("# kdistill train lm.yaml\n" + yaml.safe_dump(config))
    return {"root": root, "teacher": teacher, "classifier": classifier, "text": text, "config": path}


@pytest.fixture(scope="module")
def finished(lm_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One whole run through ``kdistill train``, shared by the tests that read its results."""
    out = tmp_path_factory.mktemp("run") / "out"
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDISTILL_CACHE", str(cache))
        assert main(["train", str(lm_files["config"]), "--out", str(out), "--quiet"]) == 0
    return out


def test_a_whole_run_writes_the_language_model_report(finished: Path) -> None:
    report = json.loads((finished / "report.json").read_text())
    assert report["kind"] == "language-model"
    for name in ("teacher", "baseline", "student"):
        row = report[name]
        for field in LM_FIELDS:
            assert math.isfinite(row[field]) and row[field] > 0, (name, field, row[field])
        assert row["perplexity"] >= 1
        if name == "teacher":
            assert "agreement" not in row
        else:
            assert 0 <= row["agreement"] <= 1
    assert report["student"]["params"] < report["teacher"]["params"]  # 2 of 4 blocks, 41 + 1 of 64 ids
    assert report["baseline"]["params"] == report["student"]["params"]
    ratios = report["ratios"]
    # The trained teacher beats the baseline, so the gap is defined (its value depends on the run).
    assert report["teacher"]["perplexity"] < report["baseline"]["perplexity"]
    assert math.isfinite(ratios["gap_closed"])
    assert ratios["gap_closed"] == pytest.approx(
        math.log(report["baseline"]["perplexity"] / report["student"]["perplexity"])
        / math.log(report["baseline"]["perplexity"] / report["teacher"]["perplexity"])
    )
    assert ratios["params"] == pytest.approx(report["teacher"]["params"] / report["student"]["params"])
    assert ratios["latency"] == pytest.approx(
        report["teacher"]["latency_ms_per_token"] / report["student"]["latency_ms_per_token"]
    )
    assert report["corpus"]["kept_ids"] < report["corpus"]["vocabulary"]
    assert report["cache"]["storage"] == "topk"  # the LM default
    assert set(report["continuations"]) == set(lm_run.PROMPTS)
    text = (finished / "report.md").read_text()
    assert "| student |" in text and "Greedy continuations" in text
    for phase in ("baseline", "distill"):
        assert (finished / phase / "done.json").exists()
        assert (finished / phase / "student.safetensors").exists()


def test_the_report_perplexity_is_the_saved_students(finished: Path) -> None:
    """The student rebuilt from the run directory (shrink + kept ids + safetensors) is the one measured."""
    from kdistill.corpus import TokenCorpus
    from kdistill.lm_eval import perplexity

    config = from_dict(read_yaml(finished / "config.yaml"))
    student, tokenizer = lm_run.load_run_model(finished, "student")
    corpus = TokenCorpus.build(
        config.data.path,
        tokenizer,
        finished.parent / "corpus-check",
        block_size=config.data.block_size,
        validation_fraction=config.data.validation_fraction,
        test_fraction=config.data.test_fraction,
    )
    report = json.loads((finished / "report.json").read_text())
    value = perplexity(student, corpus.split("test"), batch_size=8)
    # float32 forward passes on the same blocks: equal to float32 rounding.
    assert value == pytest.approx(report["student"]["perplexity"], rel=1e-5)


def test_the_report_has_the_teachers_nll_of_each_models_own_samples(finished: Path) -> None:
    """On-policy evaluation reaches the report: the teacher's NLL of what each model samples after
    held-out prompts (the teacher's own samples as the reference), the same numbers a fresh
    measurement of the saved models gives."""
    from kdistill.corpus import TokenCorpus

    report = json.loads((finished / "report.json").read_text())
    for name in ("teacher", "baseline", "student"):
        value = report[name]["teacher_nll_of_samples"]
        assert math.isfinite(value) and value > 0, (name, value)
    setting = report["on_policy_eval"]
    config = from_dict(read_yaml(finished / "config.yaml"))
    # The default prompt_tokens (32) does not fit a 16-token block: the prompts are the block's first 15.
    assert setting["prompt_tokens"] == config.data.block_size - 1
    assert setting["max_new_tokens"] == config.distill.max_new_tokens
    assert 1 <= setting["prompts"] <= lm_run.ON_POLICY_PROMPTS
    text = (finished / "report.md").read_text()
    assert "NLL of its own samples" in text and f"{report['student']['teacher_nll_of_samples']:.3f}" in text

    models = {name: lm_run.load_run_model(finished, name)[0] for name in ("teacher", "baseline", "student")}
    tokenizer = lm_run.load_run_model(finished, "teacher")[1]
    corpus = TokenCorpus.build(
        config.data.path,
        tokenizer,
        finished.parent / "corpus-nll-check",
        block_size=config.data.block_size,
        validation_fraction=config.data.validation_fraction,
        test_fraction=config.data.test_fraction,
    )
    again = lm_run.teacher_nll_of_own_samples(models, models["teacher"], corpus.split("test"), config, corpus.eos_id)
    for name, model_value in again.items():
        # float32 forward passes of the same weights, the same seeded samples: equal to float32 rounding.
        assert model_value == pytest.approx(report[name]["teacher_nll_of_samples"], rel=1e-5), name


def test_config_yaml_round_trips(finished: Path, lm_files: dict[str, Path]) -> None:
    saved = read_yaml(finished / "config.yaml")
    config = from_dict(saved)
    assert from_dict(yaml.safe_load(dump_config(config))) == config
    given = load_config(lm_files["config"])
    assert config.teacher == given.teacher and config.student == given.student and config.data == given.data
    assert config.distill.cache_storage == "topk" and config.distill.temperature == 1.0  # LM defaults, resolved


def test_resume_of_a_finished_run_returns_the_stored_report(finished: Path, lm_files: dict[str, Path]) -> None:
    def files() -> dict[Path, int]:  # the lock file aside: taking the lock is not writing a result
        return {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file() and p.name != ".kdistill.lock"}

    before = files()
    stored = json.loads((finished / "report.json").read_text())
    config = load_config(lm_files["config"])
    lines: list[str] = []
    assert lm_run.run(config, finished, resume=True, log=lines.append) == stored
    assert any("finished" in line for line in lines)
    assert main(["train", str(lm_files["config"]), "--out", str(finished), "--resume", "--quiet"]) == 0
    assert files() == before


def test_a_run_refuses_to_clobber_a_finished_one(
    finished: Path, lm_files: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    assert main(["train", str(lm_files["config"]), "--out", str(finished), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already holds results" in err and len(err.strip().splitlines()) == 1


def test_generate_prints_the_students_continuation(
    finished: Path, lm_files: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    from kdistill.lm_eval import greedy_generate

    prompt = "w1 w2 w3"
    for which in ("student", "baseline", "teacher"):
        capsys.readouterr()
        assert main(["generate", str(finished), "--prompt", prompt, "--max-new-tokens", "6", "--model", which]) == 0
        printed = capsys.readouterr().out.strip()
        model, tokenizer = lm_run.load_run_model(finished, which)
        assert printed == greedy_generate(model, tokenizer, prompt, 6)[0].strip()
    # The trained student generates words of the corpus (its tokenizer's words), not nothing.
    capsys.readouterr()
    assert main(["generate", str(finished), "--prompt", prompt, "--max-new-tokens", "6"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (lambda f, run: ["generate", str(f["root"]), "--prompt", "w1"], "is not a kdistill run directory"),
        (lambda f, run: ["generate", str(run), "--prompt", "w1", "--max-new-tokens", "0"], "--max-new-tokens"),
        (lambda f, run: ["generate", str(run), "--prompt", "w1", "--model", "nope"], "invalid choice"),
    ],
    ids=["not a run", "no tokens", "unknown model"],
)
def test_generate_bad_input_gets_one_line(args, message, lm_files, finished, capsys) -> None:
    capsys.readouterr()
    assert main(args(lm_files, finished)) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("kdistill: error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "internal error" not in err


def test_generate_refuses_an_unfinished_run(lm_files, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(dump_config(load_config(lm_files["config"])))
    assert main(["generate", str(out), "--prompt", "w1"]) == 2
    err = capsys.readouterr().err
    assert "not trained yet" in err and len(err.strip().splitlines()) == 1, err


BAD_CONFIGS = {
    "unknown shrink argument": (["student.args={every: 2, evry: 1}"], "unknown key student.args.evry"),
    "unknown vocabulary": (["student.vocabulary=nonsense"], "student.vocabulary must be one of 'corpus', 'full'"),
    "block of one token": (["data.block_size=1"], "data.block_size must be ≥ 2"),
    "corpus without path": (["data.path=null"], "data.path: dataset 'corpus' needs a path"),
    "teacher that is no LM": (["teacher.model=cnn", "teacher.args={}"], "teacher.model must be a pretrained causal LM"),
    "student that is not shrink": (["student.model=mlp"], "student.model must be shrink"),
    "feature pairs": (["distill.feature_pairs=auto"], "distill.feature_pairs must be empty"),
    "top-k cache with reverse KL": (["distill.response_loss=reverse_kl"], "supports the kl response loss only"),
    "unknown teacher argument": (["teacher.args.dtype=bf16"], "unknown key teacher.args.dtype"),
    "vocabulary on an image run": (["data.dataset=digits", "student.model=cnn"], "applies to language-model runs"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_language_model_configs_get_one_config_error_line(case, lm_files, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    overrides, message = BAD_CONFIGS[case]
    sets = [item for override in overrides for item in ("--set", override)]
    assert main(["train", str(lm_files["config"]), *sets, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("kdistill: error:") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_a_teacher_directory_without_a_causal_lm_is_refused(lm_files, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    path = lm_files["classifier"]
    args = ["--set", f"teacher.args={{path: {path}, task: causal-lm}}", "--out", str(tmp_path / "out"), "--quiet"]
    assert main(["train", str(lm_files["config"]), *args]) == 2
    err = capsys.readouterr().err
    assert "is not a causal language model" in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "internal error" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_language_model_keys_do_not_change_a_classification_teachers_cache_key() -> None:
    from kdistill.pipeline import teacher_cache_key

    plain = load_config(None, ["data.dataset=digits"])
    other = load_config(None, ["data.dataset=digits", "data.block_size=64", "data.eval_tokens=512"])
    assert teacher_cache_key(plain) == teacher_cache_key(other)


def test_lm_defaults_fill_only_what_a_corpus_config_leaves_out(lm_files) -> None:
    config = load_config(lm_files["config"], ["distill.cache_storage=float16", "data.batch_size=2"])
    assert config.distill.cache_storage == "float16" and config.data.batch_size == 2  # given: kept
    assert config.data.eval_batch_size == 8 and config.data.augment == "none"  # left out: LM defaults
    image = load_config(None, ["data.dataset=digits"])
    assert image.distill.cache_storage == "float16" and image.data.augment == "shift"  # not a corpus run
    with pytest.raises(ConfigError, match=r"data\.tokenizer must be null for corpus"):
        load_config(lm_files["config"], ["data.tokenizer=x"])


def test_inspect_lists_a_causal_lm_and_proposes_pairs(lm_files, capsys) -> None:
    capsys.readouterr()
    assert main(["inspect", "--config", str(lm_files["config"])]) == 0
    out = capsys.readouterr().out
    assert "teacher: hf" in out and "student: shrink" in out
    assert "model.layers.1" in out and "model.layers.3" in out
    assert "- {student: model.layers.0, teacher: model.layers.1}" in out
    assert "- {student: model.layers.1, teacher: model.layers.3}" in out


def kdistill_process(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess, with this process's thread count (same numbers)."""
    environment = {
        "KDISTILL_CACHE": str(cache),
        "PATH": "/usr/bin:/bin",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        **env,
    }
    command = [sys.executable, "-m", "kdistill", *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_student(finished: Path, lm_files, tmp_path) -> None:
    """Ctrl-C in the distillation phase, then --resume: the baseline is loaded (tied weights written
    once, restored on load), the distillation continues from its checkpoint, and the student is the
    one an uninterrupted run trains."""
    out = tmp_path / "out"
    train = ["train", str(lm_files["config"]), "--out", str(out), "--quiet"]
    steps = len(list((finished / "baseline" / "metrics.jsonl").read_text().splitlines()))
    first = kdistill_process(*train, cache=tmp_path / "cache", KDISTILL_KILL_AT=f"step:{steps + 3}:INT")
    assert first.returncode == 130, first.stderr
    assert (out / "baseline" / "done.json").exists() and not (out / "distill" / "done.json").exists()
    second = kdistill_process(*train, "--resume", cache=tmp_path / "cache")
    assert second.returncode == 0, second.stderr
    resumed = json.loads((out / "report.json").read_text())
    reference = json.loads((finished / "report.json").read_text())
    for name in ("baseline", "student"):
        assert resumed[name]["perplexity"] == pytest.approx(reference[name]["perplexity"], rel=1e-6)


def test_force_replaces_a_finished_run(finished: Path, lm_files, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "report.json").write_text("{}")  # marks the old results
    assert main(["train", str(lm_files["config"]), "--out", str(out), "--force", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "language-model"
    assert not list(out.glob(".replaced-*"))


def test_generate_refuses_a_classification_run(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(dump_config(load_config(None, ["data.dataset=digits"])))
    assert main(["generate", str(out), "--prompt", "w1"]) == 2
    err = capsys.readouterr().err
    assert "is not a language-model run" in err and len(err.strip().splitlines()) == 1, err


def lm_train(lm_files: dict[str, Path], out: Path, *overrides: str) -> dict:
    """``kdistill train`` of the tiny LM config with ``overrides``; the report."""
    sets = [item for override in overrides for item in ("--set", override)]
    assert main(["train", str(lm_files["config"]), *sets, "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "report.json").read_text())


def test_the_report_has_sampled_continuations_side_by_side(finished: Path) -> None:
    """Each model's sampled continuation (the run's sampling settings and seed) of 3 held-out prompts,
    in report.json and report.md."""
    report = json.loads((finished / "report.json").read_text())
    sampled = report["sampled_continuations"]
    assert len(sampled) == lm_run.SAMPLED_PROMPTS
    text = (finished / "report.md").read_text()
    assert "Sampled continuations" in text
    for entry in sampled:
        assert isinstance(entry["prompt"], str) and entry["prompt"].strip()
        assert set(entry["continuations"]) == {"teacher", "baseline", "student"}
        assert all(isinstance(value, str) for value in entry["continuations"].values())
        assert entry["prompt"].replace("|", "\\|") in text
    # Sampled, not empty: the tiny models write words of the corpus.
    assert any(value.strip() for entry in sampled for value in entry["continuations"].values())


def test_an_on_policy_run_with_a_prompt_file_samples_after_its_prompts(lm_files, tmp_path, monkeypatch) -> None:
    """distill.prompt_file: every on-policy batch trains on continuations of the file's prompts; the
    prompt tokens never count (generated_tokens stays within max_new_tokens)."""
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3\n\nw7 w8\n")
    out = tmp_path / "out"
    settings = ("distill.on_policy=1.0", "distill.prompt_tokens=3", "distill.max_new_tokens=4")
    report = lm_train(lm_files, out, *settings, f"distill.prompt_file={prompts}")
    assert math.isfinite(report["student"]["perplexity"])
    records = [json.loads(line) for line in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    on_policy = [r for r in records if "generated_tokens" in r]
    assert on_policy and all(1 <= r["generated_tokens"] <= 4 for r in on_policy)
    assert from_dict(read_yaml(out / "config.yaml")).distill.prompt_file == str(prompts)


def test_a_finished_prompt_file_run_needs_its_file_no_more(lm_files, tmp_path, monkeypatch, capsys) -> None:
    """The prompt file is read when a run prepares, not when its config is loaded: given relative, it is
    stored absolute in config.yaml, and ``kdistill generate`` works once the file is gone, from anywhere."""
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "prompts.txt").write_text("w1 w2 w3\nw7 w8\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    settings = ("distill.on_policy=1.0", "distill.prompt_tokens=3", "distill.max_new_tokens=4")
    lm_train(lm_files, out, *settings, "distill.prompt_file=prompts.txt")
    assert from_dict(read_yaml(out / "config.yaml")).distill.prompt_file == str(tmp_path / "prompts.txt")
    (tmp_path / "prompts.txt").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "w1 w2", "--max-new-tokens", "3"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip()


def test_a_resume_after_the_prompt_file_changed_is_refused(finished: Path, lm_files, tmp_path) -> None:
    """An on-policy run interrupted, its prompt file edited: --resume refuses with one line (the
    remaining on-policy batches would sample other prompts than the first ones did)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3\nw7 w8\n")
    out = tmp_path / "out"
    settings = ("distill.on_policy=1.0", "distill.prompt_tokens=3", "distill.max_new_tokens=4")
    sets = [item for s in (*settings, f"distill.prompt_file={prompts}") for item in ("--set", s)]
    train = ["train", str(lm_files["config"]), *sets, "--out", str(out), "--quiet"]
    steps = len(list((finished / "baseline" / "metrics.jsonl").read_text().splitlines()))
    first = kdistill_process(*train, cache=tmp_path / "cache", KDISTILL_KILL_AT=f"step:{steps + 1}:INT")
    assert first.returncode == 130, first.stderr
    assert not (out / "distill" / "done.json").exists()
    prompts.write_text("w1 w2 w3\nw9 w10\n")
    second = kdistill_process(*train, "--resume", cache=tmp_path / "cache")
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdistill: error: "), second.stderr
    assert "the prompt file changed since the run started" in lines[0]


def test_an_on_policy_run_finishes_and_writes_its_report(lm_files, tmp_path, monkeypatch) -> None:
    """λ = 0.5: about half the distillation batches train on the student's own samples; the baseline never."""
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    report = lm_train(lm_files, out, "distill.on_policy=0.5", "distill.prompt_tokens=4", "distill.max_new_tokens=4")
    assert all(math.isfinite(report[name]["perplexity"]) for name in ("teacher", "baseline", "student"))
    assert (out / "report.md").exists()
    records = {
        phase: [json.loads(line) for line in (out / phase / "metrics.jsonl").read_text().splitlines()]
        for phase in ("baseline", "distill")
    }
    on_policy = [r for r in records["distill"] if "generated_tokens" in r]
    assert 0 < len(on_policy) < len(records["distill"])  # some batches on-policy, some not
    assert all(1 <= r["generated_tokens"] <= 4 for r in on_policy)  # up to max_new_tokens each
    assert not any("generated_tokens" in r for r in records["baseline"])
    assert from_dict(read_yaml(out / "config.yaml")).distill.on_policy == 0.5
    # The report's on-policy measure samples as training did: 4-token prompts, up to 4 new tokens.
    assert report["on_policy_eval"]["prompt_tokens"] == 4 and report["on_policy_eval"]["max_new_tokens"] == 4
    assert all(math.isfinite(report[name]["teacher_nll_of_samples"]) for name in ("baseline", "student"))


def test_a_chunked_on_policy_run_finishes(lm_files, tmp_path, monkeypatch) -> None:
    """λ = 0.5 with chunk_tokens 4: on-policy batches train through the chunked loss (CE left out)."""
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    overrides = ("distill.on_policy=0.5", "distill.prompt_tokens=4", "distill.max_new_tokens=4")
    report = lm_train(lm_files, out, *overrides, "distill.chunk_tokens=4", "baseline=false")
    assert math.isfinite(report["student"]["perplexity"])
    lines = (out / "distill" / "metrics.jsonl").read_text().splitlines()
    records = [record for record in map(json.loads, lines) if record["kind"] == "step"]
    on_policy = [r for r in records if "generated_tokens" in r]
    assert 0 < len(on_policy) < len(records)  # some batches on-policy, some not
    assert all(math.isfinite(r["loss"]) for r in records)
    # α = β = 1, no feature pairs: an on-policy loss is the response term alone, CE (reported) left out.
    assert all(r["loss"] == pytest.approx(r["response"], rel=1e-6) and r["ce"] > 0 for r in on_policy)
    assert from_dict(read_yaml(out / "config.yaml")).distill.chunk_tokens == 4


def test_chunked_loss_trains_the_same_student(lm_files, tmp_path, monkeypatch) -> None:
    """chunk_tokens 4 (blocks of 16 tokens in 4 chunks) computes the same loss and gradients as the full
    logits, in another order of float32 sums: the trained student's perplexity agrees to float32
    rounding accumulated over the run's Adam steps (measured: 2e-8 relative; 1e-4 leaves room for Adam
    amplifying rounding in near-zero gradients on other CPUs, and is far below any real difference)."""
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    chunked = lm_train(lm_files, tmp_path / "chunked", "distill.chunk_tokens=4", "baseline=false")
    full = lm_train(lm_files, tmp_path / "full", "distill.chunk_tokens=null", "baseline=false")
    assert chunked["student"]["perplexity"] == pytest.approx(full["student"]["perplexity"], rel=1e-4)


def test_distillation_keys_do_not_change_teacher_cache_keys() -> None:
    """The new distill keys leave a classification teacher's cache key as it was (earlier caches stay valid)."""
    from kdistill.pipeline import teacher_cache_key

    plain = load_config(None, ["data.dataset=digits"])
    other = load_config(None, ["data.dataset=digits", "distill.chunk_tokens=null", "distill.top_p=0.5"])
    assert teacher_cache_key(plain) == teacher_cache_key(other)


@pytest.mark.parametrize("on_policy", [0.0, 0.5])
def test_auto_chunking_applies_to_an_on_policy_student_too(lm_files, on_policy) -> None:
    """chunk_tokens auto chunks a ≥ 32,768-id vocabulary for the baseline and the distilled student alike,
    on-policy or not (on-policy batches leave CE out with ``ce_weight=0``, which the chunked loss supports)."""
    distilled = baseline = 1024
    config = load_config(lm_files["config"], [f"distill.on_policy={on_policy}", "distill.prompt_tokens=4"])
    assert config.distill.chunk_tokens == "auto"
    large = transformers.LlamaConfig(
        vocab_size=32_768, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1
    )
    teacher, student = transformers.LlamaForCausalLM(large), transformers.LlamaForCausalLM(large)
    with lm_run.make_distiller(config, teacher, student) as distiller:
        assert distiller.chunk_size == distilled
    with lm_run.make_distiller(config, teacher, student, alpha=0.0) as distiller:
        assert distiller.chunk_size == baseline
