"""Bad values of the language-model distillation keys (``distill.chunk_tokens``, ``distill.on_policy``
and the sampling keys) through ``kdistill train``: one ``kdistill: error:`` line, exit status 2, no
traceback, nothing written — on the tiny LM config of ``tests/test_lm_run.py`` and the tiny image
config of ``tests/test_cli.py``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from kdistill.cli import main
from kdistill.core.errors import ConfigError
from tests.test_cli import TINY
from tests.test_lm_run import lm_files  # noqa: F401 (the fixture, by name)


def lm(*overrides: str) -> Callable[[dict[str, Path]], list[str]]:
    """``kdistill train`` arguments: the tiny LM config with ``overrides``."""
    return lambda files: ["train", str(files["config"]), *(a for o in overrides for a in ("--set", o))]


def image(*overrides: str) -> Callable[[dict[str, Path]], list[str]]:
    """``kdistill train`` arguments: the tiny digits config with ``overrides``."""
    return lambda files: ["train", "/dev/null", *TINY, *(a for o in overrides for a in ("--set", o))]


def with_prompt_file(text: str | None, *overrides: str) -> Callable[[dict[str, Path]], list[str]]:
    """The tiny LM config, on-policy, with a prompt file holding ``text`` (None: a file that does not exist)."""

    def build(files: dict[str, Path]) -> list[str]:
        # Written just before its case runs: the cases share the fixture's directory.
        path = files["config"].parent / ("no-such-prompts.txt" if text is None else "prompts.txt")
        if text is not None:
            path.write_text(text)
        settings = ("distill.on_policy=0.5", "distill.prompt_tokens=4", f"distill.prompt_file={path}")
        return lm(*settings, *overrides)(files)

    return build


CASES = {
    "chunk_tokens 0": (lm("distill.chunk_tokens=0"), "distill.chunk_tokens must be ≥ 1"),
    "chunk_tokens 'yes'": (lm('distill.chunk_tokens="yes"'), "distill.chunk_tokens must be an integer or 'auto'"),
    "chunk_tokens yes (a YAML bool)": (lm("distill.chunk_tokens=yes"), "distill.chunk_tokens must be an integer"),
    "chunk_tokens on an image run": (
        image("distill.chunk_tokens=64"),
        "distill.chunk_tokens applies to causal language models only",
    ),
    "chunk_tokens with the dist loss": (
        lm("distill.chunk_tokens=64", "distill.response_loss=dist", "distill.cache_storage=float16"),
        "the dist response loss correlates each class across the whole batch",
    ),
    "on_policy above 1": (lm("distill.on_policy=1.5"), "distill.on_policy must be ≥ 0 and ≤ 1, got 1.5"),
    "on_policy on an image run": (
        image("distill.on_policy=0.5"),
        "distill.on_policy applies to language-model runs (data.dataset: corpus) only",
    ),
    "prompt as long as a block": (
        lm("distill.on_policy=0.5", "distill.prompt_tokens=16"),  # the fixture's block_size is 16
        "distill.prompt_tokens must be < data.block_size (16)",
    ),
    "top_p 0": (lm("distill.top_p=0"), "distill.top_p must be > 0 and ≤ 1, got 0"),
    "sampling temperature 0": (lm("distill.sampling_temperature=0"), "distill.sampling_temperature must be > 0"),
    "no new tokens": (lm("distill.max_new_tokens=0"), "distill.max_new_tokens must be ≥ 1"),
    "on-policy without a response term": (
        lm("distill.on_policy=0.5", "distill.prompt_tokens=4", "distill.alpha=0"),
        "distill.alpha must be > 0 with on_policy > 0",
    ),
    "on-policy with jsd on the top-k cache": (
        lm("distill.on_policy=0.5", "distill.prompt_tokens=4", "distill.response_loss=jsd"),
        "supports the kl response loss only",
    ),
    "prompt file missing": (with_prompt_file(None), "distill.prompt_file: cannot read"),
    "prompt file empty": (with_prompt_file("\n  \n"), "distill.prompt_file: no prompts"),
    "prompt longer than prompt_tokens": (
        with_prompt_file("w1 w2\nw1 w2 w3 w4 w5 w6\n"),
        "distill.prompt_file: prompt 2 has 6 tokens, more than distill.prompt_tokens (4)",
    ),
    "prompt file on an image run": (
        lambda files: image(f"distill.prompt_file={files['config']}")(files),
        "distill.prompt_file applies to language-model runs",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_lm_keys_get_one_line(case, lm_files, tmp_path, monkeypatch, capsys) -> None:  # noqa: F811
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    build, message = CASES[case]
    capsys.readouterr()
    assert main([*build(lm_files), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdistill: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "internal error" not in err
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_a_language_model_run_under_several_processes_is_refused_on_every_rank(tmp_path, monkeypatch):
    from kdistill import lm_run
    from kdistill.config import from_dict
    from kdistill.distributed import World

    settings = {
        "data": {"dataset": "corpus", "path": "rotten-tomatoes"},
        "teacher": {"model": "smollm2-135m"},
        "student": {"model": "shrink", "args": {"every": 2}},
    }
    config = from_dict(settings)
    for rank in (0, 1):
        monkeypatch.setattr(lm_run, "world", lambda rank=rank: World(rank, 2))
        with pytest.raises(ConfigError, match=r"train in one process, not 2: run `kdistill train` without torchrun"):
            lm_run.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written
    with pytest.raises(ConfigError, match="train in one process, so they cannot shard"):
        from_dict({**settings, "train": {"strategy": "fsdp"}})
