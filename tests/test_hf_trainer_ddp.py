"""``DistillationTrainer`` under multi-process launch (issue #19): two CPU processes (torchrun, gloo)
take the steps one process takes on the same global batches, for response distillation and for
feature pairs, whose adapters (outside the DDP-wrapped student) must stay equal on every process.

One torchrun launch runs every case of tests/hf_trainer_worker.py; the one-process references run
here. Float64 models: the two sides differ only by the order of float64 sums (DDP averages two
half-batch gradients, one process takes the whole batch's) and by HF's float32 loss accumulator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from kdistill.integrations.transformers import ADAPTERS_NAME  # noqa: E402
from tests import hf_trainer_worker as worker  # noqa: E402
from tests.test_hf_trainer import MODELS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
# HF accumulates the logged loss in float32 (and averages the processes' in float32): a few
# float32 roundings, 2^-23 ≈ 1.2e-7 each.
LOSS_RTOL = 2e-6
# Float64 weights after eight identical-up-to-summation-order Adam updates with lr 1e-2.
WEIGHT_TOL = {"rtol": 1e-7, "atol": 1e-9}


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of one two-process torchrun launch of every worker case."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: other runs on the machine may hold the default one
        f"--nproc_per_node={WORLD}",
        str(ROOT / "tests" / "hf_trainer_worker.py"),
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def reference(case: str, tmp_path: Path) -> Any:
    """The same case trained by one process on the whole global batches."""
    return worker.run(case, tmp_path / "single", processes=1)


def check_against_reference(folder: Path, single: Any) -> dict[str, torch.Tensor]:
    """The two-process run's logged losses and final weights against the one-process run's; the
    weights (equal on both ranks)."""
    # Both ranks log the same (process-averaged) losses; they equal the one-process losses.
    want = torch.tensor([e["loss"] for e in single.state.log_history if "loss" in e], dtype=torch.float64)
    assert len(want) == 4  # 8 examples, global batch 4, two epochs
    assert not torch.allclose(want[0], want[-1])  # the steps trained the student
    for rank in range(WORLD):
        steps = json.loads((folder / f"rank{rank}.json").read_text())
        got = torch.tensor([entry["loss"] for entry in steps], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=LOSS_RTOL, atol=0.0)
        for entry in steps:  # the terms, averaged over the processes, still add up to the loss
            expected = worker.SETTINGS["beta"] * (
                worker.SETTINGS["alpha"] * entry["response"] + entry.get("feature", 0.0)
            )
            assert entry["loss"] == pytest.approx(expected + entry["ce"], rel=LOSS_RTOL)

    # Every rank ends with the very same weights (DDP and the adapters' averaging give each the
    # same update), and they are the one-process run's.
    ranks = [load_file(str(folder / f"rank{rank}.safetensors")) for rank in range(WORLD)]
    assert ranks[0].keys() == ranks[1].keys()
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    single_weights = worker.weights(single)
    assert single_weights.keys() == ranks[0].keys()
    for name, value in single_weights.items():
        torch.testing.assert_close(ranks[0][name], value, **WEIGHT_TOL, msg=name)
    return ranks[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_response_distillation_in_two_processes_takes_the_one_process_steps(
    launched: Path, tmp_path: Path, kind: str
) -> None:
    folder = launched / f"{kind}-response"
    final = check_against_reference(folder, reference(f"{kind}-response", tmp_path))
    # Rank 0 saved the student as a plain model (no DDP "module." prefix, no adapters file) that
    # from_pretrained loads with the trained weights.
    saved = folder / "model"
    assert not (saved / ADAPTERS_NAME).exists()
    assert not any(key.startswith("module.") for key in load_file(str(saved / "model.safetensors")))
    loaded = type(MODELS[kind][0]()).from_pretrained(saved, dtype=torch.float64)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, final[f"student.{name}"]), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_feature_pairs_in_two_processes_take_the_one_process_steps(launched: Path, tmp_path: Path, kind: str) -> None:
    folder = launched / f"{kind}-pairs"
    final = check_against_reference(folder, reference(f"{kind}-pairs", tmp_path))
    pair = MODELS[kind][2].name
    for rank in range(WORLD):
        for entry in json.loads((folder / f"rank{rank}.json").read_text()):
            assert entry[f"feature/{pair}"] > 0
    # The adapters trained (they moved from their start) and rank 0 saved them beside the student.
    saved = load_file(str(folder / "model" / ADAPTERS_NAME))
    assert saved.keys() == {name.removeprefix("adapters.") for name in final if name.startswith("adapters.")}
    for name, value in saved.items():
        assert torch.equal(value, final[f"adapters.{name}"]), name
    start = worker.build(f"{kind}-pairs", tmp_path / "start", processes=1).distiller.adapters.state_dict()
    assert any(not torch.equal(start[name], value) for name, value in saved.items())
