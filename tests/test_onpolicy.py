"""On-policy distillation (issue #17): the student samples, the teacher scores, only generated tokens count."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.callbacks import Callback
from kdistill.config import TrainConfig
from kdistill.core.distiller import Distiller
from kdistill.core.errors import ConfigError
from kdistill.core.vocabulary import PrunedVocabulary
from kdistill.onpolicy import (
    LIVE_TEACHER_NOTE,
    OnPolicyDistillation,
    is_on_policy,
    sample_continuations,
    sample_next_ids,
    teacher_nll_of_samples,
)
from kdistill.trainer import Trainer
from tests.test_lm_eval import VOCAB, Blocks, tiny_llama

PROMPT, NEW = 4, 6
TAU = 2.0
NO_EOS = VOCAB + 1  # an id no model can sample: rows never stop early


def blocks(rows: int = 6, length: int = 10, seed: int = 0) -> Blocks:
    generator = torch.Generator().manual_seed(seed)
    return Blocks(torch.randint(0, VOCAB, (rows, length), generator=generator))


def batch(data: Blocks, index: list[int]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    indices = torch.tensor(index)
    inputs, labels = data.take(indices)
    return inputs, labels, indices


def task_for(distiller: Distiller, fraction: float = 1.0, **kwargs) -> OnPolicyDistillation:
    settings = {"prompt_tokens": PROMPT, "max_new_tokens": NEW, "eos_token_id": NO_EOS, "seed": 3, **kwargs}
    return OnPolicyDistillation(distiller, fraction=fraction, **settings)


class ShiftedTeacher(nn.Module):
    """The teacher with noise added to its logits at ``positions`` of ``rows`` (default: every row)."""

    def __init__(self, teacher: nn.Module, positions: slice, rows: list[int] | None = None) -> None:
        super().__init__()
        self.teacher, self.positions, self.rows = teacher, positions, rows
        self.config = teacher.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits.clone()
        rows = self.rows if self.rows is not None else list(range(len(logits)))
        part = logits[rows, self.positions]
        noise = torch.randn(part.shape, generator=torch.Generator().manual_seed(7), dtype=part.dtype)
        logits[rows, self.positions] = part + 5.0 * noise
        return logits


def on_policy_loss(teacher: nn.Module, student: nn.Module, data: Blocks, **kwargs) -> Tensor:
    distiller = Distiller(teacher, student, temperature=TAU, response_loss="jsd", causal_lm=True, **kwargs)
    inputs, labels, index = batch(data, [0, 3, 5])
    return task_for(distiller)(inputs, labels, index=index, epoch=1)["loss"]


def test_prompt_tokens_never_count_in_the_loss():
    teacher, student, data = tiny_llama(0), tiny_llama(1), blocks()
    plain = on_policy_loss(teacher, student, data)
    # The logits at t < P − 1 predict prompt tokens: perturbing them changes nothing.
    assert torch.equal(on_policy_loss(ShiftedTeacher(teacher, slice(0, PROMPT - 1)), student, data), plain)
    # The logits at P − 1 predict the first generated token: they count (the check above can fail).
    assert not torch.equal(on_policy_loss(ShiftedTeacher(teacher, slice(PROMPT - 1, PROMPT)), student, data), plain)


def test_the_generated_token_loss_equals_a_float64_reference():
    teacher, student, data = tiny_llama(0), tiny_llama(1), blocks()
    alpha, beta = 0.7, 1.3
    distiller = Distiller(
        teacher, student, alpha=alpha, beta=beta, temperature=TAU, response_loss="jsd", causal_lm=True
    )
    task = task_for(distiller, sampling_temperature=1.5, top_p=0.9)
    inputs, labels, index = batch(data, [1, 2, 4])
    sequence, _ = task.on_policy_batch(inputs, index=index, epoch=0)
    got = task(inputs, labels, index=index, epoch=0)["loss"]

    ids = sequence["input_ids"]
    assert ids.shape == (3, PROMPT + NEW) and torch.equal(ids[:, :PROMPT], inputs["input_ids"][:, :PROMPT])
    with torch.no_grad():
        z_t = teacher(input_ids=ids).logits
        z_s = student(input_ids=ids).logits
    rows = []
    for row in range(ids.shape[0]):
        for t in range(PROMPT - 1, ids.shape[1] - 1):  # the logits at t predict generated token t + 1
            p = F.softmax(z_t[row, t] / TAU, -1)
            q = F.softmax(z_s[row, t] / TAU, -1)
            m = 0.5 * p + 0.5 * q
            rows.append(0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum())
    want = beta * alpha * TAU**2 * torch.stack(rows).mean()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


def test_no_gradient_flows_through_sampling():
    teacher, student, data = tiny_llama(0), tiny_llama(1), blocks()
    distiller = Distiller(teacher, student, temperature=TAU, response_loss="reverse_kl", causal_lm=True)
    task = task_for(distiller)
    inputs, labels, index = batch(data, [0, 1, 2])
    sequence, sampled_labels = task.on_policy_batch(inputs, index=index, epoch=2)
    assert sequence["input_ids"].dtype == torch.long and not sequence["input_ids"].requires_grad
    assert not sampled_labels.requires_grad
    task(inputs, labels, index=index, epoch=2)["loss"].backward()
    got = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)
    # The same sequence given directly, as fixed data: the same gradient.
    out = distiller(sequence, sampled_labels)
    (distiller.beta * distiller.alpha * out["response"]).backward()
    for mine, fixed in zip(got, (p.grad for p in student.parameters())):
        assert torch.equal(mine, fixed)


def test_sampling_is_reproducible_for_a_seed_and_differs_between_seeds():
    teacher, student, data = tiny_llama(0), tiny_llama(1), blocks()
    distiller = Distiller(teacher, student, temperature=TAU, causal_lm=True)
    inputs, _, index = batch(data, [0, 1, 2, 3])
    first = task_for(distiller, seed=5).on_policy_batch(inputs, index=index, epoch=0)[0]["input_ids"]
    again = task_for(distiller, seed=5).on_policy_batch(inputs, index=index, epoch=0)[0]["input_ids"]
    other = task_for(distiller, seed=6).on_policy_batch(inputs, index=index, epoch=0)[0]["input_ids"]
    later = task_for(distiller, seed=5).on_policy_batch(inputs, index=index, epoch=1)[0]["input_ids"]
    assert torch.equal(first, again)
    assert not torch.equal(first, other) and not torch.equal(first, later)
    # The global RNG is left alone (a resumed run's dropout and shuffling depend on it).
    state = torch.get_rng_state()
    task_for(distiller, seed=5).on_policy_batch(inputs, index=index, epoch=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_row_stops_after_its_eos_and_nothing_after_it_counts():
    teacher, student, data = tiny_llama(0), tiny_llama(1), blocks()
    inputs, labels, index = batch(data, [0, 1, 2, 3])
    free = task_for(Distiller(teacher, student, causal_lm=True)).on_policy_batch(inputs, index=index, epoch=0)[0]
    free_ids = free["input_ids"]
    # An EOS that row 0 samples second and that some other row (``runs_on``) never samples.
    eos = int(free_ids[0, PROMPT + 1])
    assert eos not in free_ids[0, PROMPT : PROMPT + 1].tolist()
    runs_on = next(row for row in range(1, 4) if eos not in free_ids[row, PROMPT:].tolist())

    def task(model: nn.Module) -> OnPolicyDistillation:
        distiller = Distiller(model, student, temperature=TAU, causal_lm=True)
        return task_for(distiller, eos_token_id=eos, pad_token_id=63)

    sequence, sampled_labels = task(teacher).on_policy_batch(inputs, index=index, epoch=0)
    ids, mask = sequence["input_ids"], sequence["attention_mask"]
    assert ids.shape == free_ids.shape  # row ``runs_on`` keeps the batch going to the end
    for row in range(4):
        generated = free_ids[row, PROMPT:].tolist()
        stop = generated.index(eos) + 1 if eos in generated else NEW
        assert mask[row].tolist() == [1] * (PROMPT + stop) + [0] * (NEW - stop)
        assert ids[row, : PROMPT + stop].tolist() == free_ids[row, : PROMPT + stop].tolist()  # the same draws
        assert ids[row, PROMPT + stop :].tolist() == [63] * (NEW - stop)
        assert sampled_labels[row].tolist() == [-100] * PROMPT + generated[:stop] + [-100] * (NEW - stop)
    assert mask[0].tolist() == [1] * (PROMPT + 2) + [0] * (NEW - 2)

    def loss(model: nn.Module) -> Tensor:
        return task(model)(inputs, labels, index=index, epoch=0)["loss"]

    plain = loss(teacher)
    # Row 0's logits at P + 1 (its EOS) and later predict tokens after its EOS: they never count …
    assert torch.equal(loss(ShiftedTeacher(teacher, slice(PROMPT + 1, None), rows=[0])), plain)
    # … while the same positions of the row that runs on do (the check above can fail).
    assert not torch.equal(loss(ShiftedTeacher(teacher, slice(PROMPT + 1, None), rows=[runs_on])), plain)


def test_a_pruned_student_samples_full_ids_and_other_spreads_over_the_dropped_ids():
    kept = list(range(0, VOCAB, 2))
    student = PrunedVocabulary(tiny_llama(1), kept)
    prompts = blocks().ids[:, :PROMPT]
    with torch.no_grad():
        student.other_bias.fill_(100.0)  # "other" takes all the mass
    ids, _ = sample_continuations(student, prompts, max_new_tokens=NEW, generator=torch.Generator().manual_seed(0))
    generated = ids[:, PROMPT:]
    assert not torch.isin(generated, torch.tensor(kept)).any()  # all outside K …
    assert generated.unique().numel() > 5  # … spread over the dropped ids, not one stand-in
    with torch.no_grad():
        student.other_bias.fill_(-100.0)
    ids, _ = sample_continuations(student, prompts, max_new_tokens=NEW, generator=torch.Generator().manual_seed(0))
    assert torch.isin(ids[:, PROMPT:], torch.tensor(kept)).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_pruned_student_samples_from_its_full_vocabulary_distribution_tempered(monkeypatch, temperature):
    # The draw must be over softmax(z_full / T) coarsened to K ∪ {other}: tempering the compact softmax
    # instead leaves (T − 1)·log(rest) out of the "other" entry.
    student = PrunedVocabulary(tiny_llama(1).double(), list(range(0, VOCAB, 2)))
    logits = torch.randn(3, student.other + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = []
    draw = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, n, **kw: seen.append(p) or draw(p, n, **kw))
    sample_next_ids(student, logits, temperature=temperature, top_p=1.0, generator=torch.Generator().manual_seed(0))
    full = student.full_log_probs(logits) / temperature  # the full-vocabulary logits, up to a constant
    tempered = full.softmax(-1)
    want = torch.cat([tempered[:, student.kept], tempered[:, student.dropped].sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(seen[0], want, rtol=1e-12, atol=1e-15)


def test_a_pruned_student_trains_on_policy_like_on_the_fixed_sequence():
    kept = list(range(0, VOCAB, 3))
    student = PrunedVocabulary(tiny_llama(1), kept)
    distiller = Distiller(tiny_llama(0), student, temperature=TAU, response_loss="jsd", causal_lm=True)
    task = task_for(distiller)
    inputs, labels, index = batch(blocks(), [0, 5])
    sequence, sampled_labels = task.on_policy_batch(inputs, index=index, epoch=0)
    assert not torch.isin(sequence["input_ids"][:, PROMPT:], torch.tensor(kept)).all()  # "other" was drawn
    got = task(inputs, labels, index=index, epoch=0)["loss"]
    out = distiller(sequence, sampled_labels)
    assert torch.equal(got, distiller.beta * distiller.alpha * out["response"])


def test_top_p_keeps_only_the_nucleus():
    student = tiny_llama(1)
    prompts = blocks().ids[:, :PROMPT]
    with torch.no_grad():
        top = student(input_ids=prompts).logits[:, -1].argmax(-1)
    ids, _ = sample_continuations(
        student, prompts, max_new_tokens=1, top_p=1e-6, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(ids[:, PROMPT], top)  # a tiny nucleus is the argmax alone


def test_the_on_policy_decision_is_stateless_and_about_lambda():
    decisions = [is_on_policy(0.5, 0, epoch, torch.tensor([i, i + 1])) for epoch in range(4) for i in range(100)]
    assert 150 < sum(decisions) < 250
    assert not any(is_on_policy(0.0, 0, 0, torch.tensor([i])) for i in range(200))
    assert all(is_on_policy(1.0, 0, 0, torch.tensor([i])) for i in range(200))


class StopAt(Callback):
    """Requests a stop (as Ctrl-C does) after the ``at``-th step."""

    def __init__(self, at: int) -> None:
        self.at, self.steps = at, 0

    def on_step_end(self, trainer, state, record) -> None:
        self.steps += 1
        if self.steps == self.at:
            trainer.stop_requested = True


def train(
    task_factory, data: Blocks, run_dir=None, resume: bool = False, stop_at: int | None = None, accumulate: int = 1
):
    student, teacher = tiny_llama(1), tiny_llama(0)
    # Untied (same values): the run directory's safetensors refuse tensors that share memory.
    student.lm_head.weight = nn.Parameter(student.lm_head.weight.detach().clone())
    distiller = Distiller(teacher, student, temperature=TAU, response_loss="jsd", causal_lm=True)
    task = task_factory(distiller)
    config = TrainConfig(
        epochs=2, lr=1e-2, weight_decay=0.0, schedule="cosine", amp="off", device="cpu", accumulate=accumulate
    )
    callbacks = [StopAt(stop_at)] if stop_at else []
    trainer = Trainer(
        task,
        list(distiller.trainable_parameters()),
        data,
        config,
        batch_size=2,
        eval_model=student,
        select_on=None,
        run_dir=run_dir,
        callbacks=callbacks,
    )
    result = trainer.fit(resume=resume)
    return student, task, result


def test_lambda_zero_is_bit_identical_to_training_without_the_wrapper():
    data = blocks()
    plain, _, _ = train(lambda distiller: distiller, data)
    wrapped, task, _ = train(lambda distiller: task_for(distiller, fraction=0.0), data)
    assert task.on_policy_batches == 0 and task.off_policy_batches == 6
    for (name, want), got in zip(plain.state_dict().items(), wrapped.state_dict().values()):
        assert torch.equal(want, got), name
    assert not torch.equal(plain.state_dict()["lm_head.weight"], tiny_llama(1).state_dict()["lm_head.weight"])


def test_lambda_zero_sends_off_policy_batches_with_their_facts():
    seen = []

    class Recorder(nn.Module):
        batch_facts = ("index", "epoch")

        def forward(self, inputs, labels=None, *, index, epoch):
            seen.append((index.tolist(), epoch))
            return {"loss": torch.zeros(())}

    teacher, student, data = tiny_llama(0), tiny_llama(1), blocks()
    distiller = Distiller(teacher, student, temperature=TAU, causal_lm=True)
    task = task_for(distiller, fraction=0.0, off_policy=Recorder())
    inputs, labels, index = batch(data, [4, 2])
    task(inputs, labels, index=index, epoch=3)
    assert seen == [([4, 2], 3)]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_mid_run_with_lambda_one_half_is_bit_identical(tmp_path, accumulate):
    data = blocks(rows=8)

    def factory(distiller):
        return task_for(distiller, fraction=0.5, seed=2)

    reference, task, _ = train(factory, data, tmp_path / "reference", accumulate=accumulate)
    assert task.on_policy_batches > 0 and task.off_policy_batches > 0  # both kinds ran
    # A stop waits for the end of an accumulation group: after batch 2 of the 4 of epoch 1, either way.
    _, _, first = train(factory, data, tmp_path / "run", stop_at=2, accumulate=accumulate)
    assert first.interrupted
    resumed, task, _ = train(factory, data, tmp_path / "run", resume=True, accumulate=accumulate)
    assert task.on_policy_batches > 0  # sampling after the resume, too
    for (name, want), got in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(want, got), name


def test_the_live_teacher_is_noted_once():
    lines = []
    teacher, student, data = tiny_llama(0), tiny_llama(1), blocks()
    distiller = Distiller(teacher, student, temperature=TAU, causal_lm=True)
    task = task_for(distiller, log=lines.append)
    for index in ([0, 1], [2, 3]):
        inputs, labels, indices = batch(data, index)
        task(inputs, labels, index=indices, epoch=0)
    assert lines == [LIVE_TEACHER_NOTE]


def test_teacher_nll_of_samples_is_the_teachers_mean_nll_of_the_generated_tokens():
    teacher, student, data = tiny_llama(0), tiny_llama(1), blocks(rows=3)
    got = teacher_nll_of_samples(
        student, teacher, data, prompt_tokens=PROMPT, max_new_tokens=NEW, seed=2, batch_size=3, eos_token_id=NO_EOS
    )
    assert got == teacher_nll_of_samples(
        student, teacher, data, prompt_tokens=PROMPT, max_new_tokens=NEW, seed=2, batch_size=3, eos_token_id=NO_EOS
    )
    # By hand: the same draws (the batch's generator is seeded from seed and its indices).
    from kdistill.onpolicy import batch_seed

    generator = torch.Generator().manual_seed(batch_seed(2, 0, torch.arange(3), "evaluate"))
    ids, _ = sample_continuations(
        student, data.ids[:, :PROMPT], max_new_tokens=NEW, generator=generator, eos_token_id=NO_EOS
    )
    with torch.no_grad():
        log_p = F.log_softmax(teacher(input_ids=ids).logits.double(), -1)
    nll = [-log_p[row, t, ids[row, t + 1]] for row in range(3) for t in range(PROMPT - 1, PROMPT + NEW - 1)]
    assert math.isclose(got, float(torch.stack(nll).mean()), rel_tol=1e-12)
    # The teacher scoring its own samples agrees with itself more than with a random student's.
    assert (
        teacher_nll_of_samples(
            teacher, teacher, data, prompt_tokens=PROMPT, max_new_tokens=NEW, seed=2, eos_token_id=NO_EOS
        )
        < got
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"fraction": 1.5}, "on_policy"),
        ({"fraction": float("nan")}, "on_policy"),
        ({"prompt_tokens": 0}, "prompt_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"sampling_temperature": 0.0}, "sampling_temperature"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_settings_are_config_errors(settings, message):
    distiller = Distiller(tiny_llama(0), tiny_llama(1), causal_lm=True)
    with pytest.raises(ConfigError, match=message):
        task_for(distiller, **settings)


def test_prompts_longer_than_the_blocks_or_padded_are_config_errors():
    distiller = Distiller(tiny_llama(0), tiny_llama(1), causal_lm=True)
    inputs, labels, index = batch(blocks(length=3), [0])
    with pytest.raises(ConfigError, match="prompt_tokens"):
        task_for(distiller)(inputs, labels, index=index, epoch=0)
    padded = Blocks(blocks().ids, lengths=[2, 10, 10, 10, 10, 10])
    inputs, labels, index = batch(padded, [0])
    with pytest.raises(ConfigError, match="padding"):
        task_for(distiller)(inputs, labels, index=index, epoch=0)


def test_lambda_above_zero_needs_a_response_term():
    distiller = Distiller(tiny_llama(0), tiny_llama(1), alpha=0.0, causal_lm=True)
    with pytest.raises(ConfigError, match="alpha"):
        task_for(distiller)


# -- ce_weight and the chunked loss (on-policy batches with chunk_tokens) --------------------------


def student_grads(student: nn.Module) -> dict[str, Tensor]:
    """Every student parameter's gradient by name (cloned), then cleared."""
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return grads


def test_ce_weight_zero_leaves_ce_out_of_the_total_and_still_reports_it():
    teacher, student, data = tiny_llama(0), tiny_llama(1), blocks()
    alpha, beta = 0.7, 1.3
    distiller = Distiller(teacher, student, alpha=alpha, beta=beta, temperature=TAU, causal_lm=True)
    inputs, labels, _ = batch(data, [0, 2, 4])
    full = distiller(inputs, labels)
    (distiller.beta * (distiller.alpha * full["response"] + full["feature"])).backward()
    want = student_grads(student)

    out = distiller(inputs, labels, ce_weight=0.0)
    # Exactly the divergence alone, in the distiller's order of operations; CE reported, without gradient.
    assert torch.equal(out["loss"], beta * (alpha * out["response"] + out["feature"]))
    assert torch.equal(out["ce"], full["ce"].detach()) and not out["ce"].requires_grad
    assert float(out["ce"]) > 0 and not torch.equal(out["loss"], full["loss"])
    out["loss"].backward()
    got = student_grads(student)
    assert set(got) == set(want)
    for name, grad in want.items():
        assert torch.equal(got[name], grad), name

    half = distiller(inputs, labels, ce_weight=0.5)
    assert torch.equal(half["loss"], beta * (alpha * half["response"] + half["feature"]) + 0.5 * half["ce"])
    # The default weight 1 is the plain total, bit for bit.
    assert torch.equal(distiller(inputs, labels, ce_weight=1.0)["loss"], full["loss"])


@pytest.mark.parametrize("ce_weight", [-1.0, math.nan, math.inf, True])
def test_bad_ce_weights_are_config_errors(ce_weight):
    distiller = Distiller(tiny_llama(0), tiny_llama(1), causal_lm=True)
    inputs, labels, _ = batch(blocks(), [0])
    with pytest.raises(ConfigError, match="ce_weight"):
        distiller(inputs, labels, ce_weight=ce_weight)


def pruned_student(seed: int = 1) -> nn.Module:
    student = PrunedVocabulary(tiny_llama(seed), list(range(0, VOCAB, 3)))
    with torch.no_grad():
        student.other_bias.add_(0.3)  # off its initial value, so that its gradient is not special
    return student


@pytest.mark.parametrize("kind", ["llama", "pruned"])
@pytest.mark.parametrize("response_loss", ["jsd", "reverse_kl"])
def test_on_policy_with_a_chunked_distiller_equals_the_unchunked_one(kind, response_loss):
    """chunk_tokens 4: the on-policy loss (no CE) and its gradients are the unchunked ones to 1e-10 (float64)."""
    teacher, data = tiny_llama(0), blocks()
    student = pruned_student() if kind == "pruned" else tiny_llama(1)
    inputs, labels, index = batch(data, [0, 3, 5])
    results = []
    for chunk_tokens in (None, 4):
        twin = copy.deepcopy(student)
        distiller = Distiller(
            teacher,
            twin,
            alpha=0.7,
            beta=1.3,
            temperature=TAU,
            response_loss=response_loss,
            causal_lm=True,
            chunk_tokens=chunk_tokens,
        )
        out = task_for(distiller)(inputs, labels, index=index, epoch=1)
        assert out["loss"].requires_grad and not out["ce"].requires_grad
        out["loss"].backward()
        results.append((out, student_grads(twin)))
        distiller.close()
    (plain, plain_grads), (chunked, chunked_grads) = results
    for key in ("loss", "ce", "response", "generated_tokens"):
        want = float(plain[key].detach())
        assert abs(float(chunked[key].detach()) - want) <= 1e-10 * max(1.0, abs(want)), key
    want_loss = plain["loss"].detach()
    assert torch.equal(want_loss, 1.3 * (0.7 * plain["response"] + plain["feature"]))  # no CE in it
    assert set(chunked_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        scale = max(1.0, float(grad.abs().max()))
        assert float((chunked_grads[name] - grad).abs().max()) <= 1e-10 * scale, name


# -- prompts from a prompt file (distill.prompt_file) -----------------------------------------------


def file_prompts(lengths: tuple[int, ...] = (4, 4, 4, 4, 4), seed: int = 11) -> list[Tensor]:
    """Prompts as a prompt file gives them: 1-D token ids, each at most ``PROMPT`` long."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=generator) for length in lengths]


def test_on_policy_prompts_come_from_the_prompts_not_from_the_blocks():
    prompts = file_prompts()
    distiller = Distiller(tiny_llama(0), tiny_llama(1), temperature=TAU, response_loss="jsd", causal_lm=True)
    inputs, _, index = batch(blocks(), [0, 3, 5])
    sequence, labels = task_for(distiller, prompts=prompts).on_policy_batch(inputs, index=index, epoch=1)
    ids = sequence["input_ids"]
    assert ids.shape == (3, PROMPT + NEW)
    for row in ids:
        assert any(torch.equal(row[:PROMPT], prompt) for prompt in prompts), row
    assert not torch.equal(ids[:, :PROMPT], inputs["input_ids"][:, :PROMPT])
    assert bool((labels[:, :PROMPT] == -100).all()) and bool((labels[:, PROMPT:] == ids[:, PROMPT:]).all())
    # Stateless: the same batch picks the same prompts and samples the same tokens.
    again, _ = task_for(distiller, prompts=prompts).on_policy_batch(inputs, index=index, epoch=1)
    assert torch.equal(again["input_ids"], ids)


def test_the_prompt_choice_depends_on_the_batch_and_covers_the_prompts():
    prompts = file_prompts(lengths=(4,) * 8)
    distiller = Distiller(tiny_llama(0), tiny_llama(1), causal_lm=True)
    task = task_for(distiller, prompts=prompts, max_new_tokens=1)
    inputs, _, _ = batch(blocks(rows=2), [0, 1])
    seen = set()
    for first in range(40):
        sequence, _ = task.on_policy_batch(inputs, index=torch.tensor([first, first + 1]), epoch=0)
        for row in sequence["input_ids"]:
            seen.add(next(i for i, prompt in enumerate(prompts) if torch.equal(row[:PROMPT], prompt)))
    assert len(seen) > 4


def test_prompts_of_different_lengths_are_cut_to_the_batchs_shortest_and_never_count():
    prompts = file_prompts(lengths=(4, 2, 3))
    teacher, student = tiny_llama(0), tiny_llama(1)
    distiller = Distiller(teacher, student, temperature=TAU, response_loss="jsd", causal_lm=True)
    task = task_for(distiller, prompts=prompts)
    inputs, labels, index = batch(blocks(rows=8), list(range(8)))
    sequence, sampled = task.on_policy_batch(inputs, index=index, epoch=0)
    ids = sequence["input_ids"]
    shortest = ids.shape[1] - NEW
    assert 2 <= shortest <= 4
    for row in ids:
        assert any(torch.equal(row[:shortest], prompt[:shortest]) for prompt in prompts if len(prompt) >= shortest)
    assert bool((sampled[:, :shortest] == -100).all()) and bool((sampled[:, shortest:] != -100).all())
    assert bool((sequence["attention_mask"] == 1).all())

    def loss(model: nn.Module) -> Tensor:
        d = Distiller(model, student, temperature=TAU, response_loss="jsd", causal_lm=True)
        return task_for(d, prompts=prompts)(inputs, labels, index=index, epoch=0)["loss"]

    plain = loss(teacher)
    assert torch.equal(loss(ShiftedTeacher(teacher, slice(0, shortest - 1))), plain)
    assert not torch.equal(loss(ShiftedTeacher(teacher, slice(shortest - 1, shortest))), plain)


def test_resume_mid_run_with_prompts_is_bit_identical(tmp_path):
    data, prompts = blocks(rows=8), file_prompts(lengths=(4, 3, 4, 2))

    def factory(distiller):
        return task_for(distiller, fraction=0.5, seed=2, prompts=prompts)

    reference, reference_task, _ = train(factory, data, tmp_path / "reference")
    assert reference_task.on_policy_batches > 0 and reference_task.off_policy_batches > 0
    _, _, first = train(factory, data, tmp_path / "run", stop_at=2)
    assert first.interrupted
    resumed, resumed_task, _ = train(factory, data, tmp_path / "run", resume=True)
    assert resumed_task.on_policy_batches > 0  # sampling from the file after the resume, too
    for (name, want), got in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(want, got), name
    # The λ decisions do not depend on the prompts (same on-policy count), but what is sampled does.
    without, plain_task, _ = train(lambda d: task_for(d, fraction=0.5, seed=2), data)
    assert plain_task.on_policy_batches == reference_task.on_policy_batches
    assert not torch.equal(without.state_dict()["lm_head.weight"], reference.state_dict()["lm_head.weight"])


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([], "no prompts"),
        ([torch.tensor([1, 2, 3, 4, 5])], "5 tokens, more than distill.prompt_tokens"),
        ([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], "empty"),
    ],
)
def test_bad_prompts_are_config_errors(prompts, message):
    distiller = Distiller(tiny_llama(0), tiny_llama(1), causal_lm=True)
    with pytest.raises(ConfigError, match=message):
        task_for(distiller, prompts=prompts)
