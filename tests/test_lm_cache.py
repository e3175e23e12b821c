"""The per-token top-k teacher cache for causal LMs: corpus blocks as data, coarsening, truncation error."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from kdistill.cache import StaleCacheError, TeacherCache, data_digest, fingerprint
from kdistill.core.errors import KDistillError
from kdistill.core.losses import TopKLogits, response_loss
from kdistill.data import Batched
from tests.test_lm_eval import VOCAB, tiny_llama

TAU = 2.0


class StandInBlocks(Batched):
    """Corpus blocks as interfaces §B describes them: ``take`` gives ``{"input_ids", "attention_mask"}``
    and labels = the input ids; a ``digest()``, and no per-sample ``labels`` vector."""

    def __init__(self, ids: Tensor, mask: Tensor | None = None) -> None:
        self.ids, self.block_size = ids, ids.shape[1]
        self.mask = torch.ones_like(ids) if mask is None else mask

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indices: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return {"input_ids": self.ids[indices], "attention_mask": self.mask[indices]}, self.ids[indices].clone()

    def digest(self) -> str:
        return hashlib.sha256(self.ids.numpy().tobytes() + self.mask.numpy().tobytes()).hexdigest()[:20]


def blocks(seed: int = 0, padded: bool = False) -> StandInBlocks:
    """Seven blocks of 10 tokens; ``padded``: some end in attention-mask zeros."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (7, 10), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 6:] = 0
        mask[4, 3:] = 0
    return StandInBlocks(ids, mask)


def build(tmp_path, teacher, data, k, name="cache", **kwargs) -> TeacherCache:
    return TeacherCache.build(
        tmp_path / name, teacher, data, storage="topk", topk=k, temperature=TAU, batch_size=3, progress=False, **kwargs
    )


def live_logits(model: nn.Module, data: Batched) -> Tensor:
    inputs, _ = data.take(torch.arange(len(data)))
    with torch.no_grad():
        return model(**inputs).logits


def test_a_topk_cache_of_corpus_blocks_with_every_token_kept_gives_the_live_response_loss(tmp_path):
    teacher, student, data = tiny_llama(seed=0).float(), tiny_llama(seed=1).float(), blocks(padded=True)
    cache = build(tmp_path, teacher, data, VOCAB)
    assert cache.meta["fingerprint"]["data"] == data.digest() == data_digest(data)
    index = torch.tensor([4, 1, 6])
    cached, _ = cache.lookup(index, tokens=10)
    assert isinstance(cached, TopKLogits) and cached.values.shape == cached.indices.shape == (3, 10, VOCAB)
    assert cached.log_rest.shape == (3, 10)
    inputs, labels = data.take(index)
    student_logits = live_logits(student, data)[index]
    # The cache stores the values in float16: the live teacher's logits rounded the same way.
    teacher_logits = live_logits(teacher, data)[index].half().float()
    live = response_loss(student_logits, teacher_logits, TAU, labels, mask=inputs["attention_mask"])
    got = response_loss(student_logits, cached, TAU, labels, mask=inputs["attention_mask"])
    # float32 logits and KL: a few hundred float32 epsilons of the loss (and of its terms' size)
    torch.testing.assert_close(got, live, rtol=200 * torch.finfo(torch.float32).eps, atol=1e-6)
    assert cache.truncation_kl_mean == 0.0 and cache.truncation_kl_max == 0.0
    # Every id kept: no rest mass, so the top-k response is the full KL (the loss's error bound is 0).
    assert cache.rest_mass_mean == 0.0 and cache.rest_mass_max == 0.0


def test_the_cache_reads_kdistills_corpus_blocks(tmp_path):
    corpus = pytest.importorskip("kdistill.corpus")
    teacher = tiny_llama(seed=0).float()
    data = corpus.CorpusBlocks(blocks().ids.numpy().astype(np.int32))
    cache = build(tmp_path, teacher, data, 5)
    assert cache.meta["fingerprint"]["data"] == data.digest()
    cached, _ = cache.lookup(torch.tensor([2, 0]), tokens=data.block_size)
    want = TopKLogits.from_logits(live_logits(teacher, data)[[2, 0]], 5, TAU)
    assert torch.equal(cached.values, want.values.half().float())  # stored in float16
    assert torch.equal(cached.indices, want.indices)


def hand_truncation_kl(logits: Tensor, k: int, mask: Tensor) -> tuple[float, float]:
    """Mean and max over unmasked positions of KL(P ‖ P̂): P̂ keeps P's top k and spreads the rest's
    mass r uniformly over the other V − k ids, so KL = Σ_rest p log p − r log(r / (V − k))."""
    values = []
    for row, t in mask.nonzero().tolist():
        p = torch.softmax(logits[row, t].double() / TAU, -1).tolist()
        order = sorted(range(len(p)), key=lambda j: -p[j])
        rest = [p[j] for j in order[k:]]
        r = sum(rest)
        values.append(sum(q * math.log(q) for q in rest if q > 0) - r * math.log(r / len(rest)))
    return sum(values) / len(values), max(values)


def test_the_truncation_kl_is_the_hand_computed_one_over_unpadded_positions(tmp_path):
    teacher, data = tiny_llama(seed=0), blocks(padded=True)  # float64: the cache's KL is exact
    cache = build(tmp_path, teacher, data, 3)
    mean, largest = hand_truncation_kl(live_logits(teacher, data), 3, data.mask)
    assert mean > 0 and largest > mean
    assert cache.truncation_kl_mean == pytest.approx(mean, rel=1e-9)
    assert cache.truncation_kl_max == pytest.approx(largest, rel=1e-9)
    assert cache.meta["truncation_kl_mean"] == cache.truncation_kl_mean  # recorded in meta.json


def hand_rest_mass(logits: Tensor, k: int, mask: Tensor) -> tuple[float, float]:
    """Mean and max over unmasked positions of the teacher's mass outside its top k at τ,
    ``r = Σ_{j ∉ top-k} softmax(z / τ)_j``, which bounds the top-k loss's error (KL − KL_topk = r·KL(Q_t ‖ Q_s))."""
    values = []
    for row, t in mask.nonzero().tolist():
        p = torch.softmax(logits[row, t].double() / TAU, -1).tolist()
        values.append(sum(sorted(p, reverse=True)[k:]))
    return sum(values) / len(values), max(values)


@pytest.mark.parametrize("k", [1, 3])
def test_the_rest_mass_is_the_hand_computed_one_over_unpadded_positions(tmp_path, k):
    teacher, data = tiny_llama(seed=0), blocks(padded=True)  # float64 teacher
    cache = build(tmp_path, teacher, data, k)
    mean, largest = hand_rest_mass(live_logits(teacher, data), k, data.mask)
    assert 0 < mean < largest < 1
    assert cache.rest_mass_mean == pytest.approx(mean, rel=1e-9)
    assert cache.rest_mass_max == pytest.approx(largest, rel=1e-9)
    assert (cache.meta["rest_mass_mean"], cache.meta["rest_mass_max"]) == (cache.rest_mass_mean, cache.rest_mass_max)


def test_a_float_storage_cache_records_no_rest_mass(tmp_path):
    data = blocks()
    cache = TeacherCache.build(tmp_path / "dense", tiny_llama(seed=0).float(), data, storage="float16", progress=False)
    assert cache.rest_mass_mean is None and cache.rest_mass_max is None


def test_bytes_per_token_is_what_the_files_hold(tmp_path):
    data = blocks()
    cache = build(tmp_path, tiny_llama(seed=0).float(), data, 5)
    values, indices, log_rest = (cache.logits[name] for name in ("topk-values", "topk-indices", "topk-log-rest"))
    assert (values.dtype, indices.dtype, log_rest.dtype) == (np.float16, np.int32, np.float32)
    stored = sum(array.nbytes for array in (values, indices, log_rest))
    assert (
        cache.bytes_per_token == stored / (len(data) * data.block_size) == 5 * (2 + 4) + 4
    )  # float16 values, int32 ids, float32 log-rest


class TableLM(nn.Module):
    """Logits that depend only on the current token: row ``i`` of ``table``."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        return {"logits": self.table[input_ids]}


def test_the_log_rest_keeps_float32_precision_for_a_tiny_rest_mass(tmp_path):
    # Two ids hold almost everything; the other 62 share a mass near e^-60: log r ≈ −56.0.
    table = torch.full((VOCAB, VOCAB), -120.0, dtype=torch.float64)
    table[:, :2] = torch.tensor([0.0, -1.0], dtype=torch.float64)
    table += torch.linspace(0, 0.3, VOCAB, dtype=torch.float64)  # not exactly representable sums
    data = blocks()
    cache = build(tmp_path, TableLM(table), data, 2)
    cached, _ = cache.lookup(torch.arange(len(data)), tokens=10)
    exact = TopKLogits.from_logits(table.double(), 2, TAU).log_rest[0].item()  # same for every token
    tolerance = 4 * torch.finfo(torch.float32).eps * abs(exact)
    assert abs(float(np.float16(exact)) - exact) > 100 * tolerance  # float16 would lose it
    assert cache.logits["topk-log-rest"].dtype == np.float32
    assert torch.all((cached.log_rest.double() - exact).abs() <= tolerance)


def coarsen_to(kept: list[int]):
    """A stand-in for ``PrunedVocabulary.coarsen(·, τ)``: the kept columns, then "other" = τ·logsumexp(rest / τ)."""
    kept_ids = torch.tensor(kept)
    dropped = torch.tensor([i for i in range(VOCAB) if i not in kept])

    def coarsen(logits: Tensor) -> Tensor:
        other = TAU * (logits.index_select(-1, dropped) / TAU).logsumexp(-1, keepdim=True)
        return torch.cat([logits.index_select(-1, kept_ids), other], -1)

    return coarsen


def test_a_coarsened_cache_holds_the_coarsened_teacher_and_is_stale_for_another_vocabulary(tmp_path):
    teacher, data, kept = tiny_llama(seed=0).float(), blocks(), list(range(0, VOCAB, 4))
    coarsen = coarsen_to(kept)
    cache = build(tmp_path, teacher, data, len(kept) + 1, coarsen=coarsen, coarsen_id="kept-every-4th")
    cached, _ = cache.lookup(torch.tensor([3, 5]), tokens=10)
    assert cached.values.shape == (2, 10, len(kept) + 1) and int(cached.indices.max()) == len(kept)
    want = TopKLogits.from_logits(coarsen(live_logits(teacher, data)[[3, 5]]), len(kept) + 1, TAU)
    assert torch.equal(cached.values, want.values.half().float())  # stored in float16
    assert cache.truncation_kl_max == 0.0  # every coarse entry kept
    expected = fingerprint(teacher, data, None, [], "topk", len(kept) + 1, TAU, coarsen_id="kept-every-4th")
    TeacherCache.open(cache.directory, expected)
    for other in ("kept-every-2nd", None):  # another vocabulary, or none: stale
        with pytest.raises(StaleCacheError, match="coarsen"):
            TeacherCache.open(cache.directory, fingerprint(teacher, data, None, [], "topk", len(kept) + 1, TAU, other))
    plain = build(tmp_path, teacher, data, len(kept) + 1, name="plain")
    with pytest.raises(StaleCacheError, match="coarsen"):
        TeacherCache.open(plain.directory, expected)


def test_a_coarsened_cache_needs_its_identity(tmp_path):
    with pytest.raises(KDistillError, match="coarsen_id"):
        build(tmp_path, tiny_llama().float(), blocks(), 3, coarsen=coarsen_to([1, 2]))


def test_a_topk_cache_trains_a_pruned_vocabulary_student_through_the_distiller(tmp_path):
    vocabulary = pytest.importorskip("kdistill.core.vocabulary")
    from kdistill import Distiller
    from kdistill.cache import CachedDistillation

    teacher, data = tiny_llama(seed=0).float(), blocks(padded=True)
    student = vocabulary.PrunedVocabulary(tiny_llama(seed=1).float(), list(range(0, VOCAB, 4)))
    coarse = student.other + 1  # every coarse entry kept: the cached loss is the live one
    cache = build(tmp_path, teacher, data, coarse, coarsen=lambda z: student.coarsen(z, TAU), coarsen_id="every-4th")
    distiller = Distiller(teacher, student, temperature=TAU)
    index = torch.tensor([1, 4, 2])
    inputs, labels = data.take(index)
    live = distiller(inputs, labels)
    cached = CachedDistillation(distiller, cache)(inputs, labels, index=index)
    # The cached values are the live ones rounded to float16 (relative error ≤ ε16 / 2 per logit).
    torch.testing.assert_close(cached["response"], live["response"], rtol=2 * torch.finfo(torch.float16).eps, atol=1e-6)
    cached["loss"].backward()
    assert torch.isfinite(cached["loss"]) and cached["response"] > 0
