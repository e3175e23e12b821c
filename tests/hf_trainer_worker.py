"""One process of a multi-process ``DistillationTrainer`` run, for tests/test_hf_trainer_ddp.py.

Launched as ``python -m torch.distributed.run --nproc_per_node 2 tests/hf_trainer_worker.py OUT``
(with the repository root on ``PYTHONPATH``): the Trainer reads the distributed environment that
torchrun sets and joins a gloo process group on CPU. For every case of :data:`CASES` each process
trains, then writes ``OUT/<case>/rank<r>.json`` (the logged steps) and ``rank<r>.safetensors`` (its
final student and adapters), and rank 0 saves the model into ``OUT/<case>/model``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tests.test_hf_trainer import MODELS, SETTINGS, InOrder, arguments, examples, logged_steps, transformers

# name: (model kind, with the feature pair, gradient accumulation steps). The global batch is 4
# examples: per process 2 (no accumulation) or 1 (two accumulated micro-batches).
CASES: dict[str, tuple[str, bool, int]] = {
    "bert-response": ("bert", False, 1),
    "llama-response": ("llama", False, 1),
    "bert-pairs": ("bert", True, 2),
    "llama-pairs": ("llama", True, 2),
}
GLOBAL_BATCH = 4


def dataset(kind: str, token_level: bool) -> list[dict[str, torch.Tensor]]:
    """The test data. Token-level losses (any Llama term, BERT's feature terms) are means over the
    unpadded tokens of a batch: without padding every process's batch has as many tokens as every
    other's, and the mean of their means is the global batch's mean, which one process computes."""
    data = examples(kind)
    if token_level:
        data = [{**row, "attention_mask": torch.ones_like(row["attention_mask"])} for row in data]
        if kind == "llama":
            data = [{**row, "labels": row["input_ids"].clone()} for row in data]
    return data


def build(case: str, output_dir: Path, processes: int) -> Any:
    """The trainer of ``case`` for ``processes`` processes sharing each global batch, untrained."""
    kind, pairs, accumulate = CASES[case]
    make_student, make_teacher, pair = MODELS[kind]
    trainer = InOrder(
        model=make_student(),
        teacher=make_teacher(),
        feature_pairs=[pair] if pairs else [],
        args=arguments(
            output_dir,
            per_device_train_batch_size=GLOBAL_BATCH // processes // accumulate,
            gradient_accumulation_steps=accumulate,
            num_train_epochs=2,
        ),
        train_dataset=dataset(kind, token_level=kind == "llama" or pairs),
        data_collator=transformers.default_data_collator,
        **SETTINGS,
    )
    return trainer


def run(case: str, output_dir: Path, processes: int) -> Any:
    """The trainer of ``case`` (see :func:`build`), trained."""
    trainer = build(case, output_dir, processes)
    trainer.train()
    return trainer


def weights(trainer: Any) -> dict[str, torch.Tensor]:
    """The final student (``student.`` prefix) and adapters (``adapters.``), as plain tensors."""
    out = {f"student.{k}": v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()}
    out.update(
        {f"adapters.{k}": v.detach().clone().contiguous() for k, v in trainer.distiller.adapters.state_dict().items()}
    )
    return out


def main(out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    for case in CASES:
        folder = out / case
        folder.mkdir(parents=True, exist_ok=True)
        trainer = run(case, folder / "hf", world)
        assert trainer.args.world_size == world and trainer.accelerator.num_processes == world
        wrapped = trainer.model_wrapped
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel), type(wrapped)
        trainer.save_model(str(folder / "model"))  # rank 0 writes
        save_file(weights(trainer), str(folder / f"rank{rank}.safetensors"))
        (folder / f"rank{rank}.json").write_text(json.dumps(logged_steps(trainer)))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
