"""The Distiller's chunked loss (issue #16, ``chunk_tokens``): for causal LMs it takes the final hidden
states and heads instead of logits, and must give the unchunked Distiller's loss and gradients (float64,
1e-10) for every chunkable divergence, plain and pruned-vocabulary students, live and cached teachers,
without ever building the ``(N, T, V)`` student logits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from kdistill import Distiller, FeaturePair, PrunedVocabulary  # noqa: E402
from kdistill.cache import CachedDistillation, TeacherCache  # noqa: E402
from kdistill.core.distiller import AUTO_CHUNK_VOCABULARY, DEFAULT_CHUNK_TOKENS  # noqa: E402
from kdistill.core.errors import ConfigError, NonFiniteLossError  # noqa: E402
from kdistill.core.losses import RESPONSE_LOSSES, TopKLogits  # noqa: E402
from tests import lm_models  # noqa: E402
from tests.lm_models import gpt2  # noqa: E402
from tests.test_lm_cache import StandInBlocks  # noqa: E402
from tests.test_lm_core import full_twin, twin_student  # noqa: E402

VOCAB = 64
KEPT = [1, 2, 3, 5, 8, 13, 21, 34, 40, 41, 50, 63]
CHUNK = 4  # 3 × 6 = 18 scored rows: several chunks, the last one short
# Every registry loss but dist, which correlates classes across the batch and cannot be chunked.
CHUNKABLE = sorted(name for name in RESPONSE_LOSSES if name != "dist")
TOLERANCE = 1e-10  # float64: both sides are the same sums in another order


def llama(seed: int, vocab: int = VOCAB, hidden: int = 16) -> nn.Module:
    """The shared tiny float64 Llama, 2 layers deep."""
    return lm_models.llama(seed, vocab, hidden, layers=2)


def student_of(kind: str) -> nn.Module:
    """A fresh student: ``llama``, ``gpt2`` (its own architecture, untied-from-teacher weights) or
    ``pruned`` (a Llama cut to KEPT, with ``other_bias`` moved off its initial value)."""
    if kind == "gpt2":
        return gpt2(2)
    if kind == "llama":
        return llama(1)
    student = PrunedVocabulary(llama(1), KEPT)
    with torch.no_grad():
        student.other_bias.add_(0.3)
    return student


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


def step(distiller: Distiller, inputs, labels, teacher_outputs=None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One forward + backward; the output and every trainable parameter's gradient (by name)."""
    out = distiller(inputs, labels, teacher_outputs=teacher_outputs)
    out["loss"].backward()
    named = list(distiller.student.named_parameters()) + list(distiller.adapters.named_parameters(prefix="adapter"))
    grads = {name: p.grad.clone() for name, p in named if p.requires_grad and p.grad is not None}
    return out, grads


def twin_steps(kind: str, teacher_outputs=None, labels_on: bool = True, pairs=(), **options):
    """The same step unchunked and chunked, from identical students: ``(plain, chunked)`` results."""
    teacher = llama(0)
    inputs, labels = batch()
    labels = labels if labels_on else None
    student = student_of(kind)
    results = []
    for chunk_tokens in (None, CHUNK):
        torch.manual_seed(5)  # the adapters' initial weights
        distiller = Distiller(
            teacher,
            copy.deepcopy(student),
            [FeaturePair(*pair) for pair in pairs],
            causal_lm=True,
            chunk_tokens=chunk_tokens,
            sample_input=inputs,
            **options,
        )
        results.append(step(distiller, inputs, labels, teacher_outputs))
        distiller.close()
    return results


def assert_same(plain: tuple[dict, dict], chunked: tuple[dict, dict], keys=("loss", "ce", "response")) -> None:
    (out, grads), (chunked_out, chunked_grads) = plain, chunked
    assert [key for key in out if key != "logits"] == list(chunked_out)  # same keys, same order; no logits
    for key in keys:
        assert chunked_out[key].dtype == out[key].dtype, key
        got, want = float(chunked_out[key].detach()), float(out[key].detach())
        assert abs(got - want) <= TOLERANCE * max(1.0, abs(want)), key
    assert set(chunked_grads) == set(grads)
    for name, grad in grads.items():
        scale = max(1.0, float(grad.abs().max()))
        assert float((chunked_grads[name] - grad).abs().max()) <= TOLERANCE * scale, name


@pytest.mark.parametrize("kind", ["llama", "pruned", "gpt2"])
@pytest.mark.parametrize("divergence", CHUNKABLE)
def test_live_teacher_matches_the_unchunked_distiller(kind, divergence):
    plain, chunked = twin_steps(kind, response_loss=divergence, temperature=2.0, alpha=0.7, beta=1.3)
    assert_same(plain, chunked)
    if kind == "pruned":  # the "other" logit's bias is trained through the chunked head
        assert float(chunked[1]["other_bias"].abs()) > 0


@pytest.mark.parametrize("k", [5, len(KEPT) + 1])
def test_cached_topk_teacher_matches_the_unchunked_distiller(k):
    """Top-k teacher rows over the pruned student's compact ids (k = |K| + 1 keeps them all)."""
    inputs, _ = batch()
    teacher, probe = llama(0), PrunedVocabulary(llama(1), KEPT)
    with torch.no_grad():
        coarse = probe.coarsen(teacher(**inputs).logits, 2.0)
    topk = TopKLogits.from_logits(coarse, k, 2.0)
    plain, chunked = twin_steps("pruned", teacher_outputs=(topk, {}), temperature=2.0)
    assert_same(plain, chunked)


def test_cached_dense_teacher_matches_the_unchunked_distiller():
    """Cached full-vocabulary logits are coarsened for the pruned student on both paths."""
    inputs, _ = batch()
    with torch.no_grad():
        logits = llama(0)(**inputs).logits
    plain, chunked = twin_steps("pruned", teacher_outputs=(logits, {}), response_loss="jsd", temperature=1.5)
    assert_same(plain, chunked)


def test_teacher_cache_with_cached_distillation(tmp_path):
    """The LM benchmark's path: TeacherCache.build(storage="topk", coarsen=...) read by CachedDistillation."""
    inputs, _ = batch(n=4)
    data = StandInBlocks(inputs["input_ids"], inputs["attention_mask"])
    teacher, student = llama(0), student_of("pruned")
    cache = TeacherCache.build(
        tmp_path / "cache",
        teacher,
        data,
        storage="topk",
        topk=len(KEPT) + 1,
        temperature=1.0,
        batch_size=3,
        coarsen=lambda z: student.coarsen(z, 1.0),
        coarsen_id="kept",
        progress=False,
    )
    index = torch.tensor([3, 0, 2])
    block_inputs, labels = data.take(index)
    results = []
    for chunk_tokens in (None, CHUNK):
        distiller = Distiller(
            teacher, copy.deepcopy(student), temperature=1.0, causal_lm=True, chunk_tokens=chunk_tokens
        )
        out = CachedDistillation(distiller, cache)(block_inputs, labels, index=index)
        out["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in distiller.student.named_parameters()}))
    assert_same(*results)


@pytest.mark.parametrize("temperature", [2.0, 4.0])
@pytest.mark.parametrize("teacher_kind", ["live", "topk"])
def test_a_teacher_equal_to_the_pruned_student_gives_zero_response_and_gradient(temperature, teacher_kind):
    """The chunked loss tempers a pruned student as its full-vocabulary logits are: a teacher whose full
    distribution is the student's gives response 0 and zero gradients at τ ≠ 1 (live teacher hidden
    states + head, and a float64 top-k teacher keeping all |K| + 1 compact ids)."""
    student = twin_student()
    teacher = full_twin(student)
    inputs, _ = batch()
    teacher_outputs = None
    if teacher_kind == "topk":
        with torch.no_grad():
            coarse = student.coarsen(teacher(**inputs).logits, temperature)
        ids = torch.arange(len(KEPT) + 1).expand_as(coarse)
        teacher_outputs = (TopKLogits(coarse, ids, torch.full(coarse.shape[:-1], -float("inf"))), {})
    distiller = Distiller(teacher, student, temperature=temperature, causal_lm=True, chunk_tokens=CHUNK)
    out, grads = step(distiller, inputs, None, teacher_outputs)  # no labels: the loss is the response alone
    assert out["response"].dtype == torch.float64
    assert abs(float(out["response"])) <= 1e-12
    assert grads and all(float(g.abs().max()) <= 1e-12 for g in grads.values())


@pytest.mark.parametrize("kind", ["llama", "pruned"])
def test_alpha_zero_and_no_labels(kind):
    for alpha, labels_on in ((0.0, True), (1.0, False), (0.0, False)):
        plain, chunked = twin_steps(kind, labels_on=labels_on, alpha=alpha, response_loss="reverse_kl")
        assert_same(plain, chunked)
        if alpha == 0 and not labels_on:  # nothing weighted: zero gradients, but every parameter has one
            assert all(float(g.abs().max()) == 0 for g in chunked[1].values())


def test_feature_pairs_still_work():
    pairs = [("model.layers.0", "model.layers.1", 0.5)]
    plain, chunked = twin_steps("llama", pairs=pairs, temperature=2.0)
    assert_same(plain, chunked, keys=("loss", "ce", "response", "feature", "feature/model.layers.0->model.layers.1"))


def test_alpha_zero_with_pairs_stops_the_teacher_and_reports_no_response():
    pairs = [("model.model.layers.0", "model.layers.0", 1.0)]
    plain, chunked = twin_steps("pruned", pairs=pairs, alpha=0.0)
    assert "response" not in chunked[0]
    assert_same(plain, chunked, keys=("loss", "ce", "feature"))


class LargestLogits(TorchDispatchMode):
    """Records the most rows (elements ÷ last dimension) of any tensor produced whose last dimension
    is one of ``widths``: a logits tensor's row count."""

    def __init__(self, widths: set[int]) -> None:
        super().__init__()
        self.widths, self.rows = widths, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, Tensor) and tensor.dim() >= 2 and tensor.shape[-1] in self.widths:
                self.rows = max(self.rows, tensor.numel() // tensor.shape[-1])
        return out


@pytest.mark.parametrize("kind", ["llama", "pruned"])
def test_no_full_logits_are_built(kind):
    """Chunked, no tensor over the vocabulary has more rows than a chunk (or than the hidden size:
    the head's transposed weight ``(H, V)``); unchunked, the full ``(N, T, C)`` logits exist."""
    teacher, (inputs, labels) = llama(0), batch(n=6, t=9)
    hidden = teacher.config.hidden_size
    scored_rows = 6 * 8
    assert scored_rows > 2 * hidden  # so that the bound below would catch full logits
    rows = {}
    for chunk_tokens in (None, CHUNK):
        distiller = Distiller(teacher, student_of(kind), causal_lm=True, chunk_tokens=chunk_tokens)
        with LargestLogits({VOCAB, len(KEPT) + 1}) as seen:
            distiller(inputs, labels)["loss"].backward()
        rows[chunk_tokens] = seen.rows
    assert rows[None] >= scored_rows
    assert 0 < rows[CHUNK] <= max(CHUNK, hidden)


def test_output_head_is_restored_and_plain_forward_still_works():
    teacher, student = llama(0), student_of("pruned")
    inputs, labels = batch()
    distiller = Distiller(teacher, student, causal_lm=True, chunk_tokens=CHUNK)
    distiller(inputs, labels)
    assert student(**inputs).logits.shape == (*inputs["input_ids"].shape, len(KEPT) + 1)
    assert teacher(**inputs).logits.shape[-1] == VOCAB


def test_non_finite_loss_is_reported_without_logits():
    student = student_of("pruned")
    with torch.no_grad():
        student.other_bias.fill_(float("nan"))
    distiller = Distiller(llama(0), student, causal_lm=True, chunk_tokens=CHUNK)
    with pytest.raises(NonFiniteLossError):
        distiller(*batch())


def test_auto_chunks_big_vocabularies_only():
    small = Distiller(llama(0), llama(1), causal_lm=True, chunk_tokens="auto")
    assert small.chunk_size is None
    big_teacher = llama(0, vocab=AUTO_CHUNK_VOCABULARY, hidden=4)
    big = Distiller(
        big_teacher, PrunedVocabulary(llama(1, vocab=AUTO_CHUNK_VOCABULARY, hidden=4), KEPT), chunk_tokens="auto"
    )
    assert big.chunk_size == DEFAULT_CHUNK_TOKENS
    # What cannot be chunked stays unchunked under auto.
    assert (
        Distiller(big_teacher, llama(1, AUTO_CHUNK_VOCABULARY, 4), response_loss="dist", chunk_tokens="auto").chunk_size
        is None
    )
    assert Distiller(llama(0), llama(1), causal_lm=True).chunk_size is None  # the library default: off


@pytest.mark.parametrize(
    ("chunk_tokens", "options", "message"),
    [
        (0, {}, "positive number"),
        (-3, {}, "positive number"),
        (True, {}, "positive number"),
        (2.5, {}, "positive number"),
        ("yes", {}, "positive number"),
        (8, {"causal_lm": False}, "causal language models"),
        (8, {"response_loss": "dist"}, "dist"),
    ],
)
def test_bad_chunk_tokens_are_config_errors(chunk_tokens, options, message):
    with pytest.raises(ConfigError, match=message):
        Distiller(llama(0), llama(1), chunk_tokens=chunk_tokens, **{"causal_lm": True, **options})


def test_without_autograd_the_values_are_the_same():
    """As the LM run's check_batch calls it: eval mode, torch.no_grad()."""
    teacher, student, (inputs, labels) = llama(0), student_of("pruned"), batch()
    outs = []
    for chunk_tokens in (None, CHUNK):
        distiller = Distiller(teacher, copy.deepcopy(student), causal_lm=True, chunk_tokens=chunk_tokens).eval()
        with torch.no_grad():
            outs.append(distiller(inputs, labels))
    for key in ("loss", "ce", "response"):
        assert not outs[1][key].requires_grad
        assert abs(float(outs[1][key]) - float(outs[0][key])) <= TOLERANCE * max(1.0, abs(float(outs[0][key])))


@pytest.mark.parametrize("kind", ["llama", "pruned"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_ce_weight_matches_the_unchunked_distiller(kind, ce_weight):
    """``forward(..., ce_weight=w)``: ``β·(α·L_resp + L_feat) + w·L_CE`` chunked as unchunked (CE reported)."""
    teacher, (inputs, labels), student = llama(0), batch(), student_of(kind)
    results = []
    for chunk_tokens in (None, CHUNK):
        options = dict(alpha=0.7, beta=1.3, temperature=2.0, response_loss="jsd", causal_lm=True)
        distiller = Distiller(teacher, copy.deepcopy(student), chunk_tokens=chunk_tokens, **options)
        out = distiller(inputs, labels, ce_weight=ce_weight)
        assert out["ce"].requires_grad == (ce_weight > 0 and chunk_tokens is None)
        out["loss"].backward()
        grads = {name: p.grad.clone() for name, p in distiller.student.named_parameters() if p.grad is not None}
        results.append((out, grads))
        distiller.close()
    assert_same(*results)
    out = results[0][0]
    want = 1.3 * (0.7 * out["response"] + out["feature"]) + (ce_weight * out["ce"] if ce_weight else 0.0)
    assert torch.equal(out["loss"], want)


@pytest.mark.parametrize("kind", ["llama", "pruned"])
def test_ce_weight_zero_with_alpha_zero_still_reaches_every_parameter(kind):
    """Nothing weighted is left (α = 0, CE weight 0): the loss is 0 with a zero gradient for every student
    parameter (for DDP), chunked and unchunked alike."""
    teacher, (inputs, labels), student = llama(0), batch(), student_of(kind)
    for chunk_tokens in (None, CHUNK):
        distiller = Distiller(teacher, copy.deepcopy(student), alpha=0.0, causal_lm=True, chunk_tokens=chunk_tokens)
        out = distiller(inputs, labels, ce_weight=0.0)
        assert float(out["loss"].detach()) == 0.0 and float(out["ce"]) > 0
        out["loss"].backward()
        for name, parameter in distiller.student.named_parameters():
            assert parameter.grad is not None and not parameter.grad.any(), name
        distiller.close()
