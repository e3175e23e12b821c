"""Peak memory and time of a language-model distillation loss: naive, checkpointed chunks, chunked.

One forward + backward of ``loss = τ²·KL(P_t ‖ P_s) + CE`` over ``N`` tokens, from the student's
final hidden states ``(N, 576)`` and its head ``(49,152, 576)`` (SmolLM2-135M's sizes, no bias as
its head is tied), the teacher given as hidden states and a head of the same sizes (or as a
top-k cache), one thread. Three variants, measured in the same run:

* ``naive``: full student and teacher logits ``(N, V)``, the library's response loss and CE, autograd;
* ``checkpointed``: the same loss over 1,024-token chunks, each under ``torch.utils.checkpoint``
  (what anyone can write: the chunk's logits are recomputed in the backward pass);
* ``chunked``: :func:`kdistill.core.chunked.chunked_distillation_loss`, chunks of 1,024 tokens.

Each variant runs in a fresh process, one at a time, so that its peak resident memory is its
own: the high-water mark ``VmHWM`` after the step minus the resident set before it, with the mark
reset (``/proc/self/clear_refs``) once the inputs are built, so that building them (a top-k cache
comes from chunks of teacher logits) does not count; the
processes of a case run in a shuffled order, and time is reported per process and as a ratio
to the naive one. Every variant's loss must agree with the naive one (relative 1e-4).

    .venv/bin/python benchmarks/lm_memory.py           # ~6 minutes; writes benchmarks/results/lm_memory.{json,md}
    .venv/bin/python benchmarks/lm_memory.py --quick   # small N, seconds, writes nothing
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import machine, single_thread, write_tables
from torch.utils.checkpoint import checkpoint

from kdistill.core import losses
from kdistill.core.chunked import chunked_distillation_loss

HIDDEN, VOCABULARY, CHUNK, TEMPERATURE, TOP_K = 576, 49_152, 1024, 1.0, 20
VARIANTS = ("naive", "checkpointed", "chunked")
CASES = {  # name: (tokens, teacher form)
    "N = 8,192, teacher hidden + head": (8192, "head"),
    "N = 2,048, teacher hidden + head": (2048, "head"),
    "N = 8,192, top-20 teacher cache": (8192, "topk"),
}
QUICK_CASES = {"N = 512, teacher hidden + head": (512, "head"), "N = 512, top-20 teacher cache": (512, "topk")}


def inputs(tokens: int, teacher_form: str) -> dict:
    """The step's inputs (seeded): student hidden + head weight with gradients, teacher, labels."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, HIDDEN, generator=generator).requires_grad_()
    weight = (0.05 * torch.randn(VOCABULARY, HIDDEN, generator=generator)).requires_grad_()
    teacher_hidden = torch.randn(tokens, HIDDEN, generator=generator)
    teacher_weight = 0.06 * torch.randn(VOCABULARY, HIDDEN, generator=generator)
    labels = torch.randint(0, VOCABULARY, (tokens,), generator=generator)
    teacher: object = (teacher_hidden, teacher_weight)
    if teacher_form == "topk":  # built chunk by chunk, as a cache would store it
        parts = [
            losses.TopKLogits.from_logits(F.linear(teacher_hidden[i : i + CHUNK], teacher_weight), TOP_K, TEMPERATURE)
            for i in range(0, tokens, CHUNK)
        ]
        teacher = losses.TopKLogits(*(torch.cat(pieces) for pieces in zip(*parts)))
    return {"hidden": hidden, "weight": weight, "teacher": teacher, "labels": labels}


def teacher_rows(teacher: object, start: int, stop: int) -> object:
    if isinstance(teacher, losses.TopKLogits):
        return losses.TopKLogits(*(part[start:stop] for part in teacher))
    with torch.no_grad():
        return F.linear(teacher[0][start:stop], teacher[1])


def naive(data: dict) -> torch.Tensor:
    logits = F.linear(data["hidden"], data["weight"])
    teacher = teacher_rows(data["teacher"], 0, logits.shape[0])
    response = losses.response_loss(logits, teacher, TEMPERATURE, data["labels"])
    loss = response + losses.cross_entropy(logits, data["labels"])
    loss.backward()
    return loss


def checkpointed(data: dict) -> torch.Tensor:
    hidden, weight, labels, tokens = data["hidden"], data["weight"], data["labels"], data["hidden"].shape[0]

    def chunk_sum(start: int, chunk_hidden: torch.Tensor, chunk_weight: torch.Tensor) -> torch.Tensor:
        logits = F.linear(chunk_hidden, chunk_weight)
        teacher = teacher_rows(data["teacher"], start, start + chunk_hidden.shape[0])
        if isinstance(teacher, losses.TopKLogits):
            divergence = losses.topk_kl_rows(logits, teacher, TEMPERATURE)
        else:
            divergence = losses.kl_rows(logits, teacher, TEMPERATURE)
        ce = F.cross_entropy(logits, labels[start : start + chunk_hidden.shape[0]], reduction="sum")
        return TEMPERATURE**2 * divergence.sum() + ce

    total = sum(
        checkpoint(chunk_sum, start, hidden[start : start + CHUNK], weight, use_reentrant=False)
        for start in range(0, tokens, CHUNK)
    )
    loss = total / tokens
    loss.backward()
    return loss


def chunked(data: dict) -> torch.Tensor:
    out = chunked_distillation_loss(
        data["hidden"], data["weight"], data["teacher"], data["labels"], temperature=TEMPERATURE, chunk_size=CHUNK
    )
    out["loss"].backward()
    return out["loss"]


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``), in KB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def child(variant: str, tokens: int, teacher_form: str) -> dict:
    """One variant's step in this (fresh) process: its peak memory above the inputs, and its time."""
    single_thread()
    data = inputs(tokens, teacher_form)
    gc.collect()
    # Building the inputs (a top-k cache from chunks of teacher logits) has its own transient peak:
    # reset the high-water mark to the current resident set so that the peak is the step's own.
    Path("/proc/self/clear_refs").write_text("5")
    before_kb = status_kb("VmRSS")
    start = time.perf_counter()
    loss = {"naive": naive, "checkpointed": checkpointed, "chunked": chunked}[variant](data)
    seconds = time.perf_counter() - start
    peak_kb = status_kb("VmHWM")
    return {
        "variant": variant,
        "seconds": seconds,
        "peak_above_inputs_gb": (peak_kb - before_kb) * 1024 / 1e9,
        "resident_before_gb": before_kb * 1024 / 1e9,
        "loss": loss.item(),
        "grad_norms": [data["hidden"].grad.norm().item(), data["weight"].grad.norm().item()],
    }


def run_case(tokens: int, teacher_form: str, seed: int) -> dict[str, dict]:
    """Every variant once, each in its own process, one after the other in a shuffled order."""
    order = list(VARIANTS)
    random.Random(seed).shuffle(order)
    results = {}
    for variant in order:
        command = [sys.executable, __file__, "--child", variant, str(tokens), teacher_form]
        done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=900)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        row = results[variant]
        print(f"  {variant:13s} {row['seconds']:7.1f} s  {row['peak_above_inputs_gb']:6.2f} GB", flush=True)
    naive_result = results["naive"]
    for variant, result in results.items():
        agree = abs(result["loss"] - naive_result["loss"]) <= 1e-4 * abs(naive_result["loss"])
        if not agree:
            raise SystemExit(f"{variant} loss {result['loss']} differs from naive {naive_result['loss']}")
        result["memory_share_of_naive"] = result["peak_above_inputs_gb"] / naive_result["peak_above_inputs_gb"]
        result["time_ratio_to_naive"] = result["seconds"] / naive_result["seconds"]
    return {variant: results[variant] for variant in VARIANTS}


def markdown(result: dict) -> str:
    lines = [
        "| case | variant | peak above inputs (GB) | share of naive | time (s) | time ÷ naive |",
        "|---|---|---|---|---|---|",
    ]
    for case, variants in result["cases"].items():
        for variant, row in variants.items():
            share = 100 * row["memory_share_of_naive"]
            lines.append(
                f"| {case} | {variant} | {row['peak_above_inputs_gb']:.2f} | {share:.1f} % "
                f"| {row['seconds']:.1f} | {row['time_ratio_to_naive']:.2f}× |"
            )
    info = result["machine"]
    lines += [
        "",
        f"Forward + backward of τ²·KL + CE (τ = {TEMPERATURE:g}; with the top-{TOP_K} cache, the coarse KL "
        f"of `losses.topk_kl_rows`), H = {HIDDEN}, V = {VOCABULARY:,}, chunks of "
        f"{CHUNK:,} tokens, 1 thread, each variant in a fresh process (peak = VmHWM after − VmRSS before, "
        f"the inputs already built and the high-water mark reset), one process at a time; "
        f"{info['platform']}, {info['cpus']} CPUs, torch {info['torch']}, load average "
        f"{info['load_average']} at the start and {result['load_average_end']} at the end "
        "(a shared machine: times are one run each and move with the load).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small N, a smoke run; writes nothing")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "TOKENS", "TEACHER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, tokens, teacher_form = args.child
        print(json.dumps(child(variant, int(tokens), teacher_form)))
        return
    single_thread()
    result = {"machine": machine(), "cases": {}}
    for index, (case, (tokens, teacher_form)) in enumerate((QUICK_CASES if args.quick else CASES).items()):
        print(case, flush=True)
        result["cases"][case] = run_case(tokens, teacher_form, seed=index)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    table = markdown(result)
    print(table)
    if not args.quick:
        print(write_tables("lm_memory", result, table))


if __name__ == "__main__":
    main()
