"""Causal language models in the core (spec section 6, issue #15): the Hugging Face next-token
shift in the Distiller, every LM divergence through it, the pruned vocabulary, and shrink's
copied blocks — each against a float64 reference written out position by position."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

from kdistill import Distiller, PrunedVocabulary  # noqa: E402
from kdistill.cache import CachedDistillation  # noqa: E402
from kdistill.core.calls import is_causal_lm  # noqa: E402
from kdistill.core.errors import ClassCountError, ConfigError, VocabularyError  # noqa: E402
from kdistill.core.losses import RESPONSE_LOSSES, TopKLogits  # noqa: E402
from tests.lm_models import gpt2, llama  # noqa: E402

VOCAB = 64
KEPT = [1, 2, 3, 5, 8, 13, 21, 34, 40, 41, 50, 63]
# float32 carries ~1.2e-7 relative error per rounding; the top-k cache stores float32 logits.
FLOAT32_TOLERANCE = 1e-5


def batch(seed: int = 0, n: int = 3, t: int = 7) -> tuple[dict[str, Tensor], Tensor]:
    """Token inputs with right padding in row 1, and labels with −100 at two real positions."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, t), generator=generator)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, -2:] = 0
    labels = ids.clone()
    labels[0, 3] = -100
    labels[2, 5] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def scored(labels: Tensor, mask: Tensor) -> list[tuple[int, int]]:
    """The (n, t) whose logits Hugging Face scores: labels[n, t + 1] real and not −100."""
    n, t = labels.shape
    return [(i, j) for i in range(n) for j in range(t - 1) if labels[i, j + 1] != -100 and mask[i, j + 1] == 1]


def softmax64(row: Tensor, temperature: float = 1.0) -> list[float]:
    values = [float(v) / temperature for v in row.double()]
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def mix(p: list[float], q: list[float], weight: float) -> list[float]:
    return [weight * a + (1 - weight) * b for a, b in zip(p, q)]


# Per-position divergences of spec section 6 on (P_t, P_s), with the registry's default parameters.
DIVERGENCES = {
    "kl": lambda pt, ps: kl(pt, ps),
    "reverse_kl": lambda pt, ps: kl(ps, pt),
    "jsd": lambda pt, ps: 0.5 * kl(pt, mix(pt, ps, 0.5)) + 0.5 * kl(ps, mix(pt, ps, 0.5)),
    "skew_kl": lambda pt, ps: kl(pt, mix(pt, ps, 0.1)),
    "skew_reverse_kl": lambda pt, ps: kl(ps, mix(ps, pt, 0.1)),
    "tvd": lambda pt, ps: 0.5 * sum(abs(a - b) for a, b in zip(pt, ps)),
}


def reference_response(student: Tensor, teacher: Tensor, positions, temperature: float, name: str = "kl") -> float:
    values = [
        DIVERGENCES[name](softmax64(teacher[i, j], temperature), softmax64(student[i, j], temperature))
        for i, j in positions
    ]
    return temperature**2 * sum(values) / len(values)


def reference_ce(student: Tensor, labels: Tensor, positions) -> float:
    values = [-math.log(softmax64(student[i, j])[int(labels[i, j + 1])]) for i, j in positions]
    return sum(values) / len(values)


@torch.no_grad()
def logits_of(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    return model(**inputs).logits


# -- the shift ---------------------------------------------------------------------------------


def test_causal_distiller_scores_next_tokens_as_hugging_face_does():
    teacher, student = llama(0), llama(1)
    inputs, labels = batch()
    distiller = Distiller(teacher, student, temperature=2.0)
    assert distiller.causal_lm
    with torch.no_grad():
        out = distiller(inputs, labels)
        # Hugging Face's own loss ignores the attention mask: padding must be −100 in its labels.
        own = student(**inputs, labels=labels.masked_fill(inputs["attention_mask"] == 0, -100)).loss
    positions = scored(labels, inputs["attention_mask"])
    student_logits, teacher_logits = logits_of(student, inputs), logits_of(teacher, inputs)
    # Hugging Face computes its loss in float32 (it upcasts the logits): a float32 tolerance.
    assert float(out["ce"]) == pytest.approx(float(own), abs=FLOAT32_TOLERANCE)
    assert float(out["ce"]) == pytest.approx(reference_ce(student_logits, labels, positions), abs=1e-12)
    expected = reference_response(student_logits, teacher_logits, positions, 2.0)
    assert float(out["response"]) == pytest.approx(expected, abs=1e-12)
    assert out["logits"].shape == (3, 7, VOCAB)  # the output keeps the unshifted logits


def test_response_uses_exactly_the_positions_ce_scores():
    teacher, student = llama(0), llama(1)
    inputs, labels = batch()
    distiller = Distiller(teacher, student, temperature=2.0)
    teacher_logits = logits_of(teacher, inputs)
    positions = set(scored(labels, inputs["attention_mask"]))
    # Any change to the teacher at a position CE does not score (the last one, a −100 or padded
    # next token) leaves the response unchanged; a change at a scored one does not.
    unscored = [(i, j) for i in range(3) for j in range(7) if (i, j) not in positions]
    assert (0, 2) in unscored and (2, 4) in unscored and (1, 4) in unscored and (0, 6) in unscored
    changed = teacher_logits.clone()
    for i, j in unscored:
        changed[i, j] = torch.randn(VOCAB, dtype=torch.float64) * 5
    with torch.no_grad():
        base = distiller(inputs, labels, teacher_outputs=(teacher_logits, {}))["response"]
        same = distiller(inputs, labels, teacher_outputs=(changed, {}))["response"]
        changed[0, 0] += torch.randn(VOCAB, dtype=torch.float64)
        other = distiller(inputs, labels, teacher_outputs=(changed, {}))["response"]
    assert float(same) == float(base)
    assert float(other) != pytest.approx(float(base), abs=1e-9)


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
def test_every_lm_divergence_through_the_causal_distiller(name):
    assert name in RESPONSE_LOSSES
    teacher, student = gpt2(2), gpt2(3)
    inputs, labels = batch(seed=1)
    distiller = Distiller(teacher, student, temperature=1.5, response_loss=name)
    with torch.no_grad():
        out = distiller(inputs, labels)
    positions = scored(labels, inputs["attention_mask"])
    expected = reference_response(logits_of(student, inputs), logits_of(teacher, inputs), positions, 1.5, name)
    assert float(out["response"]) == pytest.approx(expected, abs=1e-12)


def test_causal_response_without_labels_drops_the_last_position_and_padding():
    teacher, student = llama(0), llama(1)
    inputs, _ = batch()
    with torch.no_grad():
        out = Distiller(teacher, student, temperature=2.0)(inputs)
    mask = inputs["attention_mask"]
    positions = [(i, j) for i in range(3) for j in range(6) if mask[i, j + 1] == 1]
    expected = reference_response(logits_of(student, inputs), logits_of(teacher, inputs), positions, 2.0)
    assert float(out["response"]) == pytest.approx(expected, abs=1e-12)
    assert float(out["ce"]) == 0.0


def test_token_classification_is_not_shifted():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=5
    )
    torch.manual_seed(0)
    teacher = transformers.BertForTokenClassification(config).double().eval()
    student = transformers.BertForTokenClassification(config).double().eval()
    assert not is_causal_lm(student) and is_causal_lm(llama(0)) and is_causal_lm(gpt2(0))
    inputs, _ = batch()
    labels = torch.randint(0, 5, (3, 7))
    labels[0, 3] = -100
    with torch.no_grad():
        out = Distiller(teacher, student, temperature=2.0)(inputs, labels)
    s, t = logits_of(student, inputs), logits_of(teacher, inputs)
    # Every position with a real label: not shifted, and (as before) padding is left to the labels.
    kept = [(i, j) for i in range(3) for j in range(7) if labels[i, j] != -100 and inputs["attention_mask"][i, j]]
    ce = sum(-math.log(softmax64(s[i, j])[int(labels[i, j])]) for i in range(3) for j in range(7) if labels[i, j] >= 0)
    assert float(out["ce"]) == pytest.approx(ce / int((labels >= 0).sum()), abs=1e-12)
    assert float(out["response"]) == pytest.approx(reference_response(s, t, kept, 2.0), abs=1e-12)


class _Cache:
    """A stand-in for a TeacherCache: the stored teacher logits of every sample, full length."""

    def __init__(self, logits: Tensor | TopKLogits) -> None:
        self.logits = logits

    def lookup(self, indices: Tensor, epoch: int = 0, tokens: int | None = None):
        if isinstance(self.logits, TopKLogits):
            return TopKLogits(*(part[indices, :tokens] for part in self.logits)), {}
        return self.logits[indices, :tokens], {}


def test_cached_distillation_shifts_exactly_once():
    teacher, student = llama(0), llama(1)
    inputs, labels = batch()
    distiller = Distiller(teacher, student, temperature=2.0)
    cached = CachedDistillation(distiller, _Cache(logits_of(teacher, inputs)))
    with torch.no_grad():
        live = distiller(inputs, labels)
        from_cache = cached(inputs, labels, index=torch.arange(3))
    assert float(from_cache["response"]) == pytest.approx(float(live["response"]), abs=1e-12)
    assert float(from_cache["ce"]) == pytest.approx(float(live["ce"]), abs=1e-12)


def test_causal_lm_needs_token_logits():
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    with pytest.raises(ConfigError, match="causal_lm=False"):
        Distiller(teacher, student, causal_lm=True)(torch.randn(2, 4), torch.tensor([0, 1]))


# -- the pruned vocabulary ---------------------------------------------------------------------


def pruned(seed: int = 1, kept=KEPT, factory=llama) -> tuple[nn.Module, PrunedVocabulary]:
    full = factory(seed)
    return full, PrunedVocabulary(copy.deepcopy(full), kept)


@pytest.mark.parametrize("factory", [llama, gpt2])
def test_pruned_model_before_training_is_the_full_model_at_the_kept_ids(factory):
    full, student = pruned(factory=factory)
    kept = torch.tensor(KEPT)
    ids = kept[torch.randint(0, len(KEPT), (2, 6), generator=torch.Generator().manual_seed(0))]
    inner = student.model.get_submodule("model" if factory is llama else "transformer")
    full_inner = full.get_submodule("model" if factory is llama else "transformer")
    with torch.no_grad():
        hidden = inner(input_ids=student.compact(ids)).last_hidden_state
        full_hidden = full_inner(input_ids=ids).last_hidden_state
        logits, full_logits = student(ids).logits, full(ids).logits
    assert torch.equal(hidden, full_hidden)
    assert logits.shape == (2, 6, len(KEPT) + 1)
    torch.testing.assert_close(logits[..., : len(KEPT)], full_logits[..., kept], rtol=0, atol=1e-12)
    # Tied as the full model was; "other" is the mean of the dropped rows; p(other) starts with log(rest).
    head, embedding = student.model.get_output_embeddings(), student.model.get_input_embeddings()
    assert head.weight is embedding.weight
    dropped = [v for v in range(VOCAB) if v not in KEPT]
    full_weight = full.get_input_embeddings().weight
    torch.testing.assert_close(embedding.weight[-1], full_weight[dropped].mean(0), rtol=0, atol=1e-15)
    assert student.other_bias.item() == pytest.approx(math.log(VOCAB - len(KEPT)), abs=1e-15)
    assert (student.vocab_size, student.other, student.rest) == (VOCAB, len(KEPT), VOCAB - len(KEPT))


def test_untied_head_is_cut_separately():
    full = llama(4, tie=False)
    student = PrunedVocabulary(copy.deepcopy(full), KEPT)
    head, embedding = student.model.get_output_embeddings(), student.model.get_input_embeddings()
    assert head.weight is not embedding.weight
    assert torch.equal(head.weight[: len(KEPT)], full.get_output_embeddings().weight[KEPT])
    assert torch.equal(embedding.weight[: len(KEPT)], full.get_input_embeddings().weight[KEPT])


def test_input_ids_outside_the_kept_set_read_the_other_row():
    _, student = pruned()
    ids = torch.tensor([[0, 1, 4, 63, 62, -100]])
    assert student.compact(ids).tolist() == [[12, 0, 12, 11, 12, -100]]
    with pytest.raises(VocabularyError):
        student.compact(torch.tensor([VOCAB]))


def random_compact_logits(seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 5, len(KEPT) + 1, generator=generator, dtype=torch.float64) * 3
    logits[0, :, -1] += 20  # rows where "other" wins
    return logits


def test_full_log_probs_sum_to_one_and_agree_with_log_probs_and_predict():
    _, student = pruned()
    logits = random_compact_logits()
    full = student.full_log_probs(logits)
    assert full.shape == (4, 5, VOCAB)
    torch.testing.assert_close(full.logsumexp(-1), torch.zeros(4, 5, dtype=torch.float64), rtol=0, atol=1e-12)
    # Each dropped id carries p(other) / rest.
    log_p = torch.log_softmax(logits, -1)
    torch.testing.assert_close(full[..., 0], log_p[..., -1] - math.log(VOCAB - len(KEPT)), rtol=0, atol=1e-12)
    ids = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(1))
    ids[1, 1] = -100
    picked = student.log_probs(logits, ids)
    expected = full.gather(-1, ids.clamp_min(0).unsqueeze(-1)).squeeze(-1).masked_fill(ids < 0, 0.0)
    torch.testing.assert_close(picked, expected, rtol=0, atol=1e-12)
    predicted = student.predict(logits)
    assert torch.equal(predicted, full.argmax(-1))
    assert set(predicted[0].tolist()) == {0}  # "other" won: the smallest id outside K
    assert any(int(v) in KEPT for v in predicted[1:].reshape(-1))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_coarsen_gives_the_teachers_distribution_over_kept_and_other(temperature):
    _, student = pruned()
    teacher = torch.randn(3, 4, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 4
    coarse = student.coarsen(teacher, temperature)
    dropped = [v for v in range(VOCAB) if v not in KEPT]
    for i in range(3):
        for j in range(4):
            p = softmax64(teacher[i, j], temperature)
            by_hand = [p[v] for v in KEPT] + [sum(p[v] for v in dropped)]
            got = softmax64(coarse[i, j], temperature)
            assert got == pytest.approx(by_hand, abs=1e-13)


def test_distiller_with_pruned_student_matches_the_coarsened_kl_and_compact_ce():
    teacher, student = llama(0), pruned()[1]
    inputs, labels = batch(seed=3)
    distiller = Distiller(teacher, student, temperature=2.0)
    assert distiller.causal_lm
    with torch.no_grad():
        out = distiller(inputs, labels)
    positions = scored(labels, inputs["attention_mask"])
    s, t = logits_of(student, inputs), logits_of(teacher, inputs)
    full_s = student.full_log_probs(s)  # the student's full-vocabulary distribution, tempered like the teacher's
    dropped = [v for v in range(VOCAB) if v not in KEPT]
    values = []
    for i, j in positions:
        p = softmax64(t[i, j], 2.0)
        q = softmax64(full_s[i, j], 2.0)
        coarse = [p[v] for v in KEPT] + [sum(p[v] for v in dropped)]
        coarse_s = [q[v] for v in KEPT] + [sum(q[v] for v in dropped)]
        values.append(kl(coarse, coarse_s))
    assert float(out["response"]) == pytest.approx(4.0 * sum(values) / len(values), abs=1e-12)
    # CE on compact labels = the full-vocabulary NLL, less log(rest) for each label outside K.
    nll = -student.log_probs(s[:, :-1], labels[:, 1:])
    others = [(i, j) for i, j in positions if int(labels[i, j + 1]) not in KEPT]
    assert others  # the batch has labels outside K
    expected = (sum(float(nll[i, j]) for i, j in positions) - len(others) * math.log(VOCAB - len(KEPT))) / len(
        positions
    )
    assert float(out["ce"]) == pytest.approx(expected, abs=1e-12)


def full_twin(student: PrunedVocabulary) -> nn.Module:
    """A full-vocabulary teacher whose logits are the pruned student's full-vocabulary logits: every
    id reads (embedding and head row) the compact row ``student.compact`` maps it to, and each dropped
    id's logit is ``z_other − log(rest)``, so its softmax is ``student.full_log_probs`` exactly."""
    twin = copy.deepcopy(student.model)
    embedding, head = twin.get_input_embeddings(), twin.get_output_embeddings()
    table, dropped = student.table, torch.isin(torch.arange(VOCAB), student.kept, invert=True)
    with torch.no_grad():
        full_embedding = nn.Embedding(VOCAB, embedding.embedding_dim, dtype=embedding.weight.dtype)
        full_embedding.weight.copy_(embedding.weight[table])
        full_head = nn.Linear(head.in_features, VOCAB, bias=True, dtype=head.weight.dtype)
        full_head.weight.copy_(head.weight[table])
        bias = head.bias[table] if head.bias is not None else torch.zeros(VOCAB, dtype=head.weight.dtype)
        other = student.other_bias - math.log(student.rest)
        full_head.bias.copy_(torch.where(dropped, bias + other, bias))
    twin.set_input_embeddings(full_embedding)
    twin.set_output_embeddings(full_head)
    return twin.eval()


def twin_student(seed: int = 1) -> PrunedVocabulary:
    """A pruned student with ``other_bias`` moved off its initial ``log(rest)``."""
    student = pruned(seed)[1]
    with torch.no_grad():
        student.other_bias.add_(0.4)
    return student


def test_the_full_twin_teacher_has_the_pruned_students_full_distribution():
    student = twin_student()
    inputs, _ = batch(seed=3)
    teacher = full_twin(student)
    got = torch.log_softmax(logits_of(teacher, inputs), -1)
    torch.testing.assert_close(got, student.full_log_probs(logits_of(student, inputs)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("teacher_kind", ["live", "topk"])
def test_a_teacher_equal_to_the_pruned_student_gives_zero_response_at_every_temperature(temperature, teacher_kind):
    """The student is tempered as its full-vocabulary logits are (spec section 6): a teacher whose full
    distribution is the student's scores 0 at any τ, live or from a top-k cache keeping all |K| + 1 ids."""
    student = twin_student()
    teacher = full_twin(student)
    inputs, labels = batch(seed=3)
    distiller = Distiller(teacher, student, temperature=temperature, temperature_squared=False)
    with torch.no_grad():
        if teacher_kind == "live":
            out = distiller(inputs, labels)
        else:
            # k = |K| + 1 keeps every compact id, so the rest's mass is 0; built in float64 (from_logits
            # stores float32 values, as a cache does, which would bound the check at float32 rounding).
            coarse = student.coarsen(logits_of(teacher, inputs), temperature)
            ids = torch.arange(len(KEPT) + 1).expand_as(coarse)
            topk = TopKLogits(coarse, ids, torch.full(coarse.shape[:-1], -math.inf, dtype=torch.float64))
            out = CachedDistillation(distiller, _Cache(topk))(inputs, labels, index=torch.arange(3))
        plain = Distiller(teacher, student, temperature=1.0)(inputs, labels)
    assert out["response"].dtype == torch.float64
    assert abs(float(out["response"])) <= 1e-12
    assert float(out["ce"]) == pytest.approx(float(plain["ce"]), abs=1e-12)  # CE stays at τ = 1


def test_tempered_adds_tau_minus_one_log_rest_to_other_only():
    _, student = pruned()
    assert student.tempered_offset(1.0) is None
    logits = random_compact_logits()
    assert student.tempered(logits, 1.0) is logits
    full = student.full_log_probs(logits)
    dropped = [v for v in range(VOCAB) if v not in KEPT]
    for temperature in (0.5, 3.0):
        offset = student.tempered_offset(temperature)
        assert offset[:-1].abs().max() == 0
        assert float(offset[-1]) == pytest.approx((temperature - 1) * math.log(VOCAB - len(KEPT)), abs=1e-15)
        tempered = student.tempered(logits, temperature)
        for i, j in [(0, 0), (2, 3)]:
            p = softmax64(full[i, j], temperature)
            by_hand = [p[v] for v in KEPT] + [sum(p[v] for v in dropped)]
            assert softmax64(tempered[i, j], temperature) == pytest.approx(by_hand, abs=1e-13)


def test_a_top_k_cache_of_coarsened_logits_gives_the_live_response():
    teacher, student = llama(0), pruned()[1]
    inputs, labels = batch(seed=3)
    distiller = Distiller(teacher, student, temperature=2.0)
    coarse = student.coarsen(logits_of(teacher, inputs), 2.0)
    topk = TopKLogits.from_logits(coarse, len(KEPT) + 1, 2.0)
    with torch.no_grad():
        live = distiller(inputs, labels)
        cached = CachedDistillation(distiller, _Cache(topk))(inputs, labels, index=torch.arange(3))
        dense = CachedDistillation(distiller, _Cache(logits_of(teacher, inputs)))(inputs, labels, index=torch.arange(3))
    assert float(cached["response"]) == pytest.approx(float(live["response"]), abs=FLOAT32_TOLERANCE)
    assert float(dense["response"]) == pytest.approx(float(live["response"]), abs=1e-12)  # coarsened once
    full_topk = TopKLogits.from_logits(logits_of(teacher, inputs), 5, 2.0)  # full ids: refused
    with pytest.raises(ClassCountError, match="compact ids"), torch.no_grad():
        distiller(inputs, labels, teacher_outputs=(full_topk, {}))


def test_a_pruned_student_trains_its_other_bias_and_cut_rows():
    teacher, student = llama(0), pruned()[1]
    student.train()
    inputs, labels = batch(seed=3)
    distiller = Distiller(teacher, student, temperature=2.0)
    assert any(parameter is student.other_bias for parameter in distiller.trainable_parameters())
    distiller(inputs, labels)["loss"].backward()
    embedding = student.model.get_input_embeddings().weight
    assert student.other_bias.grad is not None and float(student.other_bias.grad) != 0.0
    assert embedding.grad is not None and bool(embedding.grad[-1].abs().sum() > 0)  # the "other" row learns


@pytest.mark.parametrize("kept", [[], [0, VOCAB], [-1, 3], list(range(VOCAB)), [[1, 2]], [1.5]])
def test_bad_kept_ids_are_refused(kept):
    with pytest.raises(ConfigError):
        PrunedVocabulary(llama(0), kept)


def test_repeated_kept_ids_are_sorted_and_unique():
    student = PrunedVocabulary(llama(0), [5, 3, 5, 1])
    assert student.kept.tolist() == [1, 3, 5] and student.other == 3


def test_a_pruned_student_of_another_vocabulary_is_refused():
    other = llama(0)
    other.config.vocab_size = 100
    with pytest.raises(VocabularyError):
        Distiller(other, pruned()[1])


# -- shrink ------------------------------------------------------------------------------------


def test_shrink_copies_the_kept_blocks_exactly():
    from kdistill.integrations.hf import shrink

    teacher = llama(5)
    kept = [0, 2]
    student = shrink(teacher, layers=kept).student.eval()
    for position, index in enumerate(kept):
        ours, theirs = student.model.layers[position].state_dict(), teacher.model.layers[index].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    # The reference: the teacher itself, run with only those blocks.
    reference = copy.deepcopy(teacher)
    reference.model.layers = nn.ModuleList([reference.model.layers[i] for i in kept])
    reference.config.num_hidden_layers = len(kept)
    inputs, _ = batch()
    with torch.no_grad():
        expected = reference(**inputs, use_cache=False).logits
        got = student(**inputs, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
