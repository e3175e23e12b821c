"""Causal-LM evaluation (kdistill.lm_eval) against float64 hand loops on tiny random models."""

from __future__ import annotations

import math
from copy import deepcopy as copy_module

import pytest
import torch
from torch import Tensor, nn

from kdistill import lm_eval
from kdistill.data import Batched
from tests import lm_models

VOCAB = 64


def tiny_llama(seed: int = 0, vocab: int = VOCAB) -> nn.Module:
    """The interfaces' tiny Llama, float64 for exactness checks."""
    # Peaked enough that greedy decoding does not repeat one token.
    return lm_models.llama(seed, vocab, init_range=0.3)


class Blocks(Batched):
    """A stand-in for corpus blocks: ``({"input_ids", "attention_mask"}, labels)``, labels the input ids
    with −100 where ``ignored`` says so; right padding where ``lengths`` is shorter than ``T``."""

    def __init__(self, ids: Tensor, lengths: list[int] | None = None, ignored: Tensor | None = None) -> None:
        self.ids = ids
        self.mask = torch.ones_like(ids)
        for row, length in enumerate(lengths or []):
            self.mask[row, length:] = 0
        self.labels = ids.clone()
        if ignored is not None:
            self.labels[ignored] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indices: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return {"input_ids": self.ids[indices], "attention_mask": self.mask[indices]}, self.labels[indices]


def random_blocks(seed: int = 0, padded: bool = True) -> Blocks:
    """Five sequences of 12 tokens; ``padded``: right-padded to 12, 8, 12, 5, 12 tokens, a few labels −100."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (5, 12), generator=generator)
    if not padded:
        return Blocks(ids)
    ignored = torch.zeros_like(ids, dtype=torch.bool)
    ignored[0, 3:6] = True  # an ignored span inside a sequence
    ignored[2, 1] = True
    return Blocks(ids, lengths=[12, 8, 12, 5, 12], ignored=ignored)


def counted_positions(data: Blocks) -> list[tuple[int, int]]:
    """``(row, t)``: the logits at ``t`` predict token ``t + 1``, which must be real and not ignored."""
    return [
        (row, t)
        for row in range(len(data))
        for t in range(data.ids.shape[1] - 1)
        if data.mask[row, t + 1] == 1 and data.labels[row, t + 1] != -100
    ]


def unpadded_logits(model: nn.Module, data: Blocks, row: int) -> Tensor:
    """The logits of one sequence run alone without its padding: ``(length, C)``."""
    length = int(data.mask[row].sum())
    with torch.no_grad():
        return model(input_ids=data.ids[row : row + 1, :length]).logits[0]


def test_perplexity_equals_a_float64_hand_loop_without_ignored_and_padded_positions():
    model, data = tiny_llama(), random_blocks()
    model.train()
    nll = []
    for row, t in counted_positions(data):
        logits = unpadded_logits(model, data, row)[t].tolist()
        log_z = math.log(sum(math.exp(value) for value in logits))
        nll.append(log_z - logits[int(data.ids[row, t + 1])])
    want = math.exp(sum(nll) / len(nll))
    got = lm_eval.perplexity(model, data, batch_size=2)
    assert got == pytest.approx(want, rel=1e-10)
    assert model.training  # restored


def test_perplexity_counts_nothing_twice_across_batch_sizes():
    model, data = tiny_llama(), random_blocks()
    assert lm_eval.perplexity(model, data, batch_size=1) == pytest.approx(
        lm_eval.perplexity(model, data, batch_size=5), rel=1e-10
    )


class PrunedStandIn(nn.Module):
    """A hand-written pruned vocabulary (interfaces §A): an LM over the kept ids ``K`` plus "other",
    which stands uniformly for the ``V − |K|`` other ids."""

    def __init__(self, kept: list[int], vocab: int = VOCAB) -> None:
        super().__init__()
        self.model = tiny_llama(seed=3, vocab=len(kept) + 1)
        self.kept = torch.tensor(sorted(kept))
        self.vocab_size, self.other, self.rest = vocab, len(kept), vocab - len(kept)
        self.position = {int(full): index for index, full in enumerate(self.kept)}

    def compact(self, ids: Tensor) -> Tensor:
        return ids.clone().apply_(lambda full: self.position.get(full, self.other) if full >= 0 else full)

    def forward(self, input_ids: Tensor, **kwargs):
        return self.model(input_ids=self.compact(input_ids), **kwargs)

    def full_log_probs(self, logits: Tensor) -> Tensor:
        compact = torch.log_softmax(logits, -1)
        full = (compact[..., self.other] - math.log(self.rest))[..., None].expand(*logits.shape[:-1], self.vocab_size)
        return full.clone().index_copy_(-1, self.kept, compact[..., : self.other])

    def log_probs(self, logits: Tensor, ids: Tensor) -> Tensor:
        return self.full_log_probs(logits).gather(-1, ids[..., None])[..., 0]

    def predict(self, logits: Tensor) -> Tensor:
        return self.full_log_probs(logits).argmax(-1)


def pruned(kind: str, kept: list[int]) -> nn.Module:
    """The stand-in above, or kdistill's PrunedVocabulary (helper A's, when present) on a tiny Llama."""
    if kind == "stand-in":
        return PrunedStandIn(kept)
    vocabulary = pytest.importorskip("kdistill.core.vocabulary")
    return vocabulary.PrunedVocabulary(tiny_llama(seed=3), kept).double().eval()


@pytest.mark.parametrize("kind", ["stand-in", "kdistill"])
def test_perplexity_of_a_pruned_vocabulary_uses_its_full_vocabulary_log_probs(kind):
    # Half the ids are outside K: a log-softmax over the |K| + 1 compact logits would be wrong
    # (and indexing it with full ids ≥ |K| + 1 impossible).
    model, data = pruned(kind, list(range(0, VOCAB, 2))), random_blocks(seed=4)
    nll = []
    for row, t in counted_positions(data):
        length = int(data.mask[row].sum())
        with torch.no_grad():
            logits = model(data.ids[row : row + 1, :length]).logits[0, t]
        nll.append(-float(model.full_log_probs(logits)[int(data.ids[row, t + 1])]))
    assert lm_eval.perplexity(model, data, batch_size=2) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-10)


def test_perplexity_reads_corpus_blocks():
    corpus = pytest.importorskip("kdistill.corpus")
    model, data = tiny_llama(), random_blocks(padded=False)
    blocks = corpus.CorpusBlocks(data.ids.numpy().astype("int32"))
    assert lm_eval.perplexity(model, blocks, batch_size=2) == pytest.approx(lm_eval.perplexity(model, data), rel=1e-12)
    nll = []
    for row, t in counted_positions(data):
        logits = unpadded_logits(model, data, row)[t]
        nll.append(-float(torch.log_softmax(logits, -1)[int(data.ids[row, t + 1])]))
    assert lm_eval.perplexity(model, blocks) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-10)


def perturbed(model: nn.Module, scale: float) -> nn.Module:
    copy = copy_module(model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in copy.parameters():
            parameter += scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
    return copy


def test_agreement_is_the_share_of_equal_next_token_argmaxes():
    teacher, data = tiny_llama(seed=2), random_blocks()
    student = perturbed(teacher, 0.1)  # agrees with its teacher at some positions, not all
    equal = [
        int(unpadded_logits(student, data, row)[t].argmax() == unpadded_logits(teacher, data, row)[t].argmax())
        for row, t in counted_positions(data)
    ]
    assert 0 < sum(equal) < len(equal)  # the check can tell a wrong position apart
    assert lm_eval.agreement(student, teacher, data, batch_size=2) == pytest.approx(sum(equal) / len(equal))
    assert lm_eval.agreement(teacher, teacher, data) == 1.0


@pytest.mark.parametrize("kind", ["stand-in", "kdistill"])
def test_agreement_uses_a_pruned_vocabularys_full_vocabulary_prediction(kind):
    student, teacher, data = pruned(kind, list(range(0, VOCAB, 2))), tiny_llama(seed=2), random_blocks()
    equal = []
    for row, t in counted_positions(data):
        length = int(data.mask[row].sum())
        with torch.no_grad():
            logits = student(data.ids[row : row + 1, :length]).logits[0, t]
        equal.append(int(student.full_log_probs(logits).argmax() == unpadded_logits(teacher, data, row)[t].argmax()))
    assert lm_eval.agreement(student, teacher, data) == pytest.approx(sum(equal) / len(equal))


class CharTokenizer:
    """Token ``i`` is the character ``chr(48 + i)``; ``eos_token_id`` is special (dropped on decoding)."""

    def __init__(self, eos_token_id: int) -> None:
        self.eos_token_id = eos_token_id

    def __call__(self, text: str, return_tensors: str = "pt") -> dict[str, Tensor]:
        return {"input_ids": torch.tensor([[ord(char) - 48 for char in text]])}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(48 + i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))


def hf_greedy(model: nn.Module, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = tokenizer(prompt)["input_ids"]
    eos = tokenizer.eos_token_id
    output = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return output[0, ids.shape[1] :].tolist()


def test_greedy_generate_equals_hugging_face_generate_token_for_token():
    model, prompt = tiny_llama(seed=1), "0a3F<"
    model.train()
    # An EOS that never comes: all 12 tokens.
    tokens = hf_greedy(model, CharTokenizer(VOCAB), prompt, 12)
    assert len(tokens) == 12 and len(set(tokens)) > 3
    text, ms_per_token = lm_eval.greedy_generate(model, CharTokenizer(VOCAB), prompt, 12)
    assert text == CharTokenizer(VOCAB).decode(tokens)
    assert ms_per_token > 0 and math.isfinite(ms_per_token)
    assert model.training
    # EOS = a token generated after a few others: decoding stops right after it, as Hugging Face's does.
    eos = tokens[4]
    tokenizer = CharTokenizer(eos)
    expected = hf_greedy(model, tokenizer, prompt, 12)
    assert expected[-1] == eos and len(expected) < 12
    text, _ = lm_eval.greedy_generate(model, tokenizer, prompt, 12)
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert lm_eval.greedy_generate(model, tokenizer, prompt, 0)[0] == ""


@pytest.mark.parametrize("kind", ["stand-in", "kdistill"])
def test_greedy_generate_with_a_pruned_vocabulary_follows_its_full_vocabulary_argmax(kind):
    model, prompt = pruned(kind, list(range(0, VOCAB, 3))), "0a3F<"
    ids = CharTokenizer(VOCAB)(prompt)["input_ids"]
    for _ in range(8):  # the reference: no KV cache, the whole sequence every step
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        ids = torch.cat([ids, model.full_log_probs(logits).argmax()[None, None]], 1)
    text, _ = lm_eval.greedy_generate(model, CharTokenizer(VOCAB), prompt, 8)
    assert text == CharTokenizer(VOCAB).decode(ids[0, len(prompt) :].tolist())


class Clock:
    """A fake ``time.perf_counter`` that advances one second per forward pass."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Counted(nn.Module):
    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock, self.linear = clock, nn.Linear(1, 1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        assert not self.training and not torch.is_grad_enabled()
        self.clock.now += 1.0
        return torch.zeros(*input_ids.shape, 3)


def test_tokens_per_second_counts_real_tokens_and_leaves_the_warm_up_untimed(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(lm_eval.time, "perf_counter", clock)
    data, model = random_blocks(), Counted(clock)  # real tokens per row: 12, 8, 12, 5, 12
    model.train()
    # batch_size 2, 1 timed batch after the warm-up batch (rows 0, 1): rows 2, 3 = 17 tokens in 1 s.
    assert lm_eval.tokens_per_second(model, data, batch_size=2, batches=1) == 17.0
    # Every batch after the warm-up: rows 2–4 = 29 tokens in 2 s.
    assert lm_eval.tokens_per_second(model, data, batch_size=2, batches=10) == 14.5
    assert model.training
