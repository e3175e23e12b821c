"""Per-rank memory of distillation with ``train.strategy: ddp`` vs ``fsdp``, 2 CPU processes (gloo).

The same job under both strategies: a Llama student (13.6 M parameters, tied embedding) distilled
from a Llama teacher (38 M) with one feature pair, AdamW, a few steps of 8 sequences × 64 tokens
(4 per rank). Each rank reports, after its last step:

* the bytes it holds of the student's parameters, of the optimizer state (AdamW's two moments and
  step counters) and of the teacher's parameters (a DTensor counts its local shard);
* its peak resident memory during the steps: the high-water mark ``VmHWM`` after them minus the
  resident set before them, with the mark reset (``/proc/self/clear_refs``) once the models are
  built and sharded, so that building the full models on every rank (the pipeline does that on
  CPU before sharding) does not count.

    .venv/bin/python benchmarks/fsdp_memory.py           # ~3 minutes; writes benchmarks/results/fsdp_memory.{json,md}
    .venv/bin/python benchmarks/fsdp_memory.py --quick   # small models, seconds, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from timing import machine, single_thread, write_tables

from kdistill import Distiller, FeaturePair, fsdp
from kdistill.config import TrainConfig
from kdistill.data import TensorData
from kdistill.trainer import Trainer

SIZES = {  # name: (vocabulary, hidden, layers)
    "student": (8192, 512, 4),
    "teacher": (8192, 768, 6),
}
QUICK_SIZES = {"student": (512, 64, 2), "teacher": (512, 96, 3)}
TOKENS, SEQUENCES, STEPS = 64, 8, 3


def llama(vocabulary: int, hidden: int, layers: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocabulary,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``), in KB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def worker(rank: int, strategy: str, sizes: dict, init_file: str, out: str) -> None:
    single_thread()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        teacher, student = llama(*sizes["teacher"], seed=1).eval(), llama(*sizes["student"], seed=2)
        if strategy == "fsdp":
            fsdp.shard(teacher, torch.device("cpu"), None)
        ids = torch.randint(0, sizes["student"][0], (SEQUENCES * STEPS, TOKENS), generator=torch.Generator())
        pairs = [FeaturePair(f"model.layers.{sizes['student'][2] - 1}", f"model.layers.{sizes['teacher'][2] - 1}")]
        distiller = Distiller(teacher, student, pairs, sample_input=ids[:2])
        config = TrainConfig(max_steps=STEPS, lr=1e-4, schedule="constant", device="cpu", strategy=strategy)
        trainer = Trainer(distiller, distiller.trainable_parameters(), TensorData(ids, ids), config, batch_size=8)
        Path("/proc/self/clear_refs").write_text("5")
        before_kb = status_kb("VmRSS")
        started = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - started
        result = {
            "student_parameters": sum(p.numel() for p in distiller.student.parameters()),
            "student_parameter_bytes": fsdp.local_bytes(distiller.student.parameters()),
            "optimizer_state_bytes": fsdp.optimizer_state_bytes(trainer.optimizer),
            "teacher_parameter_bytes": fsdp.local_bytes(teacher.parameters()),
            "peak_during_steps_bytes": (status_kb("VmHWM") - before_kb) * 1024,
            "seconds_per_step": seconds / STEPS,
        }
        Path(out, f"{strategy}-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def measure(sizes: dict) -> dict[str, list[dict]]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("ddp", "fsdp"):
            init = os.path.join(tmp, f"init-{strategy}")
            mp.spawn(worker, args=(strategy, sizes, init, tmp), nprocs=2, join=True)
            results[strategy] = [json.loads(Path(tmp, f"{strategy}-{rank}.json").read_text()) for rank in (0, 1)]
    return results


def markdown(results: dict[str, list[dict]], sizes: dict, command: str) -> str:
    mb = 1e6
    ddp, sharded = (max(results[s], key=lambda r: r["student_parameter_bytes"]) for s in ("ddp", "fsdp"))
    held = {s: r["student_parameter_bytes"] + r["optimizer_state_bytes"] for s, r in (("ddp", ddp), ("fsdp", sharded))}
    rows = [
        "| per rank (the larger rank) | ddp | fsdp | fsdp / ddp |",
        "|---|---:|---:|---:|",
    ]
    for label, key in (
        ("student parameters", "student_parameter_bytes"),
        ("optimizer state (student and adapter)", "optimizer_state_bytes"),
        ("teacher parameters", "teacher_parameter_bytes"),
        ("peak resident memory during the steps", "peak_during_steps_bytes"),
    ):
        rows.append(
            f"| {label} | {ddp[key] / mb:.1f} MB | {sharded[key] / mb:.1f} MB | {sharded[key] / ddp[key]:.2f} |"
        )
    rows.append(
        f"| **student parameters + optimizer state** | {held['ddp'] / mb:.1f} MB | {held['fsdp'] / mb:.1f} MB "
        f"| **{held['fsdp'] / held['ddp']:.2f}** |"
    )
    rows.append(
        f"| seconds per step | {ddp['seconds_per_step']:.2f} | {sharded['seconds_per_step']:.2f} "
        f"| {sharded['seconds_per_step'] / ddp['seconds_per_step']:.2f} |"
    )
    return (
        "# Per-rank memory: ddp vs fsdp, 2 processes\n\n"
        f"Student {ddp['student_parameters'] / 1e6:.1f} M parameters, teacher Llama "
        f"{sizes['teacher'][1]} wide × {sizes['teacher'][2]} layers; {SEQUENCES} sequences × {TOKENS} tokens "
        f"per step, {STEPS} steps, AdamW, float32, CPU (gloo), one thread per rank.\n\n"
        + "\n".join(rows)
        + f"\n\n`{command}`\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models; print, write nothing")
    args = parser.parse_args()
    single_thread()
    sizes = QUICK_SIZES if args.quick else SIZES
    results = measure(sizes)
    command = ".venv/bin/python benchmarks/fsdp_memory.py"
    text = markdown(results, sizes, command)
    print(text)
    if not args.quick:
        write_tables("fsdp_memory", {"machine": machine(), "results": results, "command": command}, text)


if __name__ == "__main__":
    main()
