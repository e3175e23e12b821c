"""Tied weights (one tensor under several state-dict keys: a causal LM's input embedding and output
head): written once by ``save_weights``, restored by ``read_state_dict`` / ``load_weights``, counted
once by ``report.size_mb``, and a ``Trainer`` with a run directory saves and resumes a tied student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from kdistill.checkpoint import (  # noqa: E402
    ALIASES_KEY,
    DIGEST_KEY,
    read_state_dict,
    save_weights,
    tensors_sha256,
)
from kdistill.config import TrainConfig  # noqa: E402
from kdistill.core.distiller import Distiller  # noqa: E402
from kdistill.core.errors import CheckpointError  # noqa: E402
from kdistill.corpus import CorpusBlocks  # noqa: E402
from kdistill.models import load_weights  # noqa: E402
from kdistill.report import size_mb  # noqa: E402
from kdistill.trainer import Trainer  # noqa: E402
from tests.lm_models import llama  # noqa: E402

VOCAB, HIDDEN = 64, 16


def tied_llama(seed: int = 0) -> torch.nn.Module:
    """A tiny float32 LlamaForCausalLM whose head is its input embedding (``tie_word_embeddings``)."""
    model = llama(seed, VOCAB, HIDDEN, layers=2, exact=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the premise of every test here
    return model


def test_save_weights_writes_a_tied_tensor_once_and_reading_restores_both_keys(tmp_path: Path) -> None:
    model = tied_llama()
    path = tmp_path / "tied.safetensors"
    save_weights(model.state_dict(), path)
    with safe_open(str(path), framework="pt") as handle:
        stored = set(handle.keys())
        metadata = handle.metadata()
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    assert json.loads(metadata[ALIASES_KEY]) == {"lm_head.weight": "model.embed_tokens.weight"}
    state = read_state_dict(path)
    assert set(state) == set(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(state[key], tensor), key
    # The digest is over every key, tied ones included: what the model's own state dict gives.
    assert metadata[DIGEST_KEY] == tensors_sha256(model.state_dict())


def test_round_trip_keeps_the_tie(tmp_path: Path) -> None:
    """After loading, embedding and head are still one Parameter (load_state_dict copies into the
    model's existing parameters, so the tie the model was built with survives), holding the saved values."""
    source, target = tied_llama(seed=0), tied_llama(seed=1)
    path = tmp_path / "tied.safetensors"
    save_weights(source.state_dict(), path)
    load_weights(target, path, "student")
    assert target.lm_head.weight is target.model.embed_tokens.weight
    assert torch.equal(target.lm_head.weight, source.model.embed_tokens.weight)
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor), key
    with torch.no_grad():  # still tied in use: a change to the embedding is a change to the head
        target.model.embed_tokens.weight[0, 0] += 1
    assert target.lm_head.weight[0, 0] == target.model.embed_tokens.weight[0, 0]


def test_a_file_with_the_tied_key_left_out_still_loads(tmp_path: Path) -> None:
    """Files written before ties were recorded (an LM run's student.safetensors without lm_head.weight)."""
    source, target = tied_llama(seed=0), tied_llama(seed=1)
    state = {k: v.contiguous() for k, v in source.state_dict().items() if k != "lm_head.weight"}
    path = tmp_path / "old.safetensors"
    save_file(state, str(path), metadata={DIGEST_KEY: tensors_sha256(state)})
    load_weights(target, path, "student")
    assert target.lm_head.weight is target.model.embed_tokens.weight
    assert torch.equal(target.lm_head.weight, source.lm_head.weight)


def test_a_damaged_alias_record_is_a_checkpoint_error(tmp_path: Path) -> None:
    model = tied_llama()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    path = tmp_path / "damaged.safetensors"
    save_file(state, str(path), metadata={ALIASES_KEY: json.dumps({"lm_head.weight": "no.such.key"})})
    with pytest.raises(CheckpointError, match="tied tensors"):
        read_state_dict(path)


def test_views_of_part_of_a_tensor_are_saved_as_copies(tmp_path: Path) -> None:
    """Sharing memory without being the same tensor (not a tie): each is written in full."""
    base = torch.arange(12, dtype=torch.float32)
    state = {"whole": base, "half": base[:6], "rest": base[6:]}
    path = tmp_path / "views.safetensors"
    save_weights(state, path)
    loaded = read_state_dict(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_size_mb_counts_a_tied_tensor_once() -> None:
    model = tied_llama()
    once = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() yields each once
    keys = model.state_dict().keys()  # persistent buffers only (rotary inv_freq is not saved)
    buffers = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name in keys)
    assert size_mb(model) == pytest.approx((once + buffers) / 1e6, rel=1e-12)
    untied = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size_mb(model) < untied / 1e6  # the embedding (VOCAB × HIDDEN floats) is not counted twice


def test_trainer_with_a_run_dir_saves_and_resumes_a_tied_language_model(tmp_path: Path) -> None:
    blocks = CorpusBlocks(np.random.default_rng(0).integers(0, VOCAB, size=(8, 12)), "train")

    def fit(run_dir: Path, epochs: int, resume: bool) -> torch.nn.Module:
        student, teacher = tied_llama(), tied_llama(seed=1)
        distiller = Distiller(teacher, student, causal_lm=True)
        # A constant rate: a cosine schedule over 2 epochs differs from one over 1 in its first epoch too.
        config = TrainConfig(epochs=epochs, lr=1e-2, schedule="constant", device="cpu", amp="off", seed=0)
        trainer = Trainer(
            distiller, distiller.trainable_parameters(), blocks, config, batch_size=4, eval_model=student,
            select_on=None, run_dir=run_dir,
        )  # fmt: skip
        trainer.fit(resume=resume)
        return student

    fit(tmp_path / "run", epochs=1, resume=False)
    assert (tmp_path / "run" / "student.safetensors").exists() and (tmp_path / "run" / "checkpoint.pt").exists()
    resumed = fit(tmp_path / "run", epochs=2, resume=True)
    straight = fit(tmp_path / "straight", epochs=2, resume=False)
    assert resumed.lm_head.weight is resumed.model.embed_tokens.weight
    for key, tensor in straight.state_dict().items():  # resumed from the checkpoint, not from scratch
        assert torch.equal(resumed.state_dict()[key], tensor), key
    loaded = tied_llama(seed=2)
    load_weights(loaded, tmp_path / "run" / "student.safetensors", "student")
    for key, tensor in resumed.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
