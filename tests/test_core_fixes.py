"""Core fixes: shrink() makes a trainable student, labels inside input mappings, 1-D conv feature
adapters, wrapper unwrapping, recorder memory, the response term at α = 0, feature-only DDP, the
fused feature MSE."""

from __future__ import annotations

import gc
import json
import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kdistill import Distiller, FeaturePair, build_adapter
from kdistill.core import losses
from kdistill.core.adapters import Resize
from kdistill.core.errors import ConfigError
from kdistill.core.hooks import FeatureRecorder, unwrap
from tests import reference
from tests.conftest import TinyConvNet

# Float32 tolerances are stated in units of its machine epsilon (about 1.2e-7), so they hold
# whatever reduction order a CPU's vector kernels use.
FLOAT32_EPS = torch.finfo(torch.float32).eps


# -- shrink (#12.4) ---------------------------------------------------------------------------


def test_shrink_makes_a_trainable_student_in_train_mode_without_the_teachers_hooks() -> None:
    from kdistill.integrations.hf import shrink

    teacher = nn.Sequential(nn.Linear(4, 8), nn.ModuleList([nn.Linear(8, 8) for _ in range(4)]), nn.Dropout(0.5))
    fired = []
    teacher[0].register_forward_hook(lambda *args: fired.append("hook"))
    teacher[1][3].register_forward_pre_hook(lambda *args: fired.append("pre-hook"))
    # As every Distiller leaves a teacher: frozen and in eval mode (Hugging Face models load in eval).
    teacher.requires_grad_(False).eval()
    student = shrink(teacher, layers=[1, 3]).student
    assert all(p.requires_grad for p in student.parameters())
    assert all(module.training for module in student.modules())
    x = torch.randn(2, 4)
    student[0](x)
    student[1][1](torch.randn(2, 8))
    assert fired == []  # the teacher's hooks stayed with the teacher
    teacher[0](x)
    assert fired == ["hook"]
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training  # teacher untouched


# -- labels inside the input mapping (#12.5) --------------------------------------------------------


class TokenModel(nn.Module):
    """A tiny token classifier that, like Hugging Face models, computes its own loss from ``labels``."""

    def __init__(self, hidden: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(20, hidden)
        self.body = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 7)
        self.received: list[set[str]] = []

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        self.received.append({"labels"} if labels is not None else set())
        logits = self.head(torch.tanh(self.body(self.embed(input_ids))))
        out = {"logits": logits}
        if labels is not None:  # what a Hugging Face model does: its own loss, first in the output
            out = {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), **out}
        return out


def token_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 20, (3, 5), generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    labels = torch.randint(0, 7, (3, 5), generator=generator).masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask}, labels


def test_labels_inside_the_input_mapping_are_the_labels_and_reach_no_model() -> None:
    teacher, student = TokenModel(16, seed=0).double(), TokenModel(6, seed=1).double()
    inputs, labels = token_batch()
    with Distiller(teacher, student, [FeaturePair("body", "body")], temperature=2.0) as distiller:
        out = distiller({**inputs, "labels": labels})
        explicit = distiller(inputs, labels)
        same_tensor = distiller({**inputs, "labels": labels}, labels)
    assert all(received == set() for received in teacher.received + student.received)
    with torch.no_grad():
        z_s, z_t = student(**inputs)["logits"], teacher(**inputs)["logits"]
    # Float64 models: the distiller's float64 losses agree with the float64 reference to ~1e-15.
    assert out["ce"].item() == pytest.approx(reference.cross_entropy(z_s, labels), rel=1e-9)
    assert out["response"].item() == pytest.approx(reference.response(z_s, z_t, 2.0, labels), rel=1e-9)
    for key in ("loss", "ce", "response", "feature"):
        assert out[key].item() == explicit[key].item() == same_tensor[key].item()


def test_labels_given_twice_with_different_values_are_refused() -> None:
    teacher, student = TokenModel(16, seed=0), TokenModel(6, seed=1)
    inputs, labels = token_batch()
    with Distiller(teacher, student) as distiller:
        with pytest.raises(ConfigError, match="labels are given twice"):
            distiller({**inputs, "labels": labels}, labels.clamp(min=0))
        distiller({**inputs, "labels": labels}, labels.clone())  # equal values are one set of labels


def test_build_takes_labels_out_of_the_sample_input() -> None:
    teacher, student = TokenModel(16, seed=0), TokenModel(6, seed=1)
    inputs, labels = token_batch()
    Distiller(teacher, student, [FeaturePair("body", "body")], sample_input={**inputs, "labels": labels}).close()
    assert all(received == set() for received in teacher.received + student.received)


# -- adapters for (N, C, L) features (#12.12 a) ----------------------------------------------------


class Conv1dNet(nn.Module):
    """``(N, 2, L)`` signals → ``(N, 5)``; ``features`` is an ``(N, 6, L // stride)`` 1-D conv map."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(2, 6, 3, padding=1, stride=stride), nn.ReLU())
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(-1))


def test_equal_channels_different_lengths_resize_the_length_of_conv1d_features() -> None:
    # (N, 6, 32) → (N, 6, 16): same channels, the teacher's map is half as long.
    assert isinstance(build_adapter((2, 6, 32), (2, 6, 16), layout="channels"), Resize)
    grow = build_adapter((2, 6, 10), (2, 6, 16), layout="channels")
    assert isinstance(grow, Resize) and grow(torch.randn(2, 6, 10)).shape == (2, 6, 16)
    # Tokens: the same shapes mean "hidden size 32 → 16" and get a linear map per token.
    assert isinstance(build_adapter((2, 6, 32), (2, 6, 16), layout="tokens"), nn.Linear)
    with pytest.raises(Exception, match="token counts differ"):
        build_adapter((2, 6, 32), (2, 7, 32), layout="tokens")
    with pytest.raises(ValueError, match="layout"):
        build_adapter((2, 6, 32), (2, 6, 16), layout="time")
    # The distiller sees that the paired layers are 1-D convolutions.
    torch.manual_seed(0)
    teacher, student = Conv1dNet(stride=2), Conv1dNet(stride=1)
    distiller = Distiller(teacher, student, [FeaturePair("features", "features")], sample_input=torch.randn(2, 2, 32))
    assert isinstance(distiller.adapters["0"], Resize)
    # An explicit layout on the pair wins.
    tokens = Distiller(
        teacher,
        student,
        [FeaturePair("features", "features", layout="tokens")],
        sample_input=torch.randn(2, 2, 32),
    )
    assert isinstance(tokens.adapters["0"], nn.Linear)


# -- unwrap only real wrappers (#12.12 b) ---------------------------------------------------------


class Backbone(nn.Module):
    """A model whose backbone attribute happens to be called ``module``."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.module(x))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's imports warn about torch.jit
def test_a_backbone_named_module_is_not_mistaken_for_a_wrapper() -> None:
    model = Backbone()
    assert unwrap(model) is model
    with FeatureRecorder(model, ["head", "module.0"]) as recorder:
        model(torch.randn(2, 3))
        features = recorder.pop()
    assert features["head"].shape == (2, 2) and features["module.0"].shape == (2, 4)
    # Real wrappers are still looked through, with or without their prefixes.
    wrapped = nn.DataParallel(model)
    assert unwrap(wrapped) is model
    with FeatureRecorder(wrapped, ["module.head", "module.module.0"]) as recorder:
        model(torch.randn(2, 3))
        assert set(recorder.pop()) == {"head", "module.0"}
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until it is called
    assert unwrap(compiled) is model and unwrap(nn.DataParallel(compiled)) is model


# -- the recorders keep nothing alive between steps (#12.12 c) -------------------------------------


def test_teacher_forwards_outside_a_step_leave_nothing_in_the_recorders(teacher, student, batch) -> None:
    distiller = Distiller(teacher, student, [FeaturePair("conv2", "conv2")], sample_input=batch[0])
    seen = []
    teacher.conv2.register_forward_hook(lambda module, inputs, output: seen.append(weakref.ref(output)))
    student.conv2.register_forward_hook(lambda module, inputs, output: seen.append(weakref.ref(output)))
    with torch.no_grad():  # what the teacher-cache builder or an evaluation does
        teacher(batch[0])
        student(batch[0])
    gc.collect()
    assert len(seen) == 2 and all(ref() is None for ref in seen)
    distiller(*batch)  # steps still record
    assert isinstance(distiller(*batch)["feature"], torch.Tensor)


# -- the response term at α = 0 (#12.12 d) ---------------------------------------------------------


def test_alpha_zero_reports_the_real_response_when_teacher_logits_exist(teacher, student, batch) -> None:
    teacher, student = teacher.double(), student.double()
    inputs, labels = batch[0].double(), batch[1]
    distiller = Distiller(teacher, student, alpha=0.0, temperature=2.0)  # no pairs: the teacher runs to the end
    out = distiller(inputs, labels)
    with torch.no_grad():
        want = reference.response(student(inputs), teacher(inputs), 2.0)
    assert out["response"].item() == pytest.approx(want, rel=1e-9)
    assert out["response"].grad_fn is None  # reported, not trained on
    assert out["loss"].item() == pytest.approx(reference.cross_entropy(student(inputs), labels), rel=1e-9)
    # Cached teacher outputs carry logits too: the response is reported from them.
    with torch.no_grad():
        cached = (teacher(inputs), {})
    assert distiller(inputs, labels, teacher_outputs=cached)["response"].item() == pytest.approx(want, rel=1e-9)


def test_alpha_zero_early_stop_omits_the_response_instead_of_reporting_zero(teacher, student, batch) -> None:
    out = Distiller(teacher, student, [FeaturePair("conv2", "conv2")], alpha=0.0)(*batch)
    assert "response" not in out
    assert {"loss", "ce", "feature", "feature/conv2->conv2", "logits"} <= set(out)


# -- feature-only distillation under DDP (#12.6) ---------------------------------------------------


def feature_only_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        teacher, student = TinyConvNet(8).eval(), TinyConvNet(4)
        generator = torch.Generator().manual_seed(rank)
        inputs = torch.randn(4, 1, 8, 8, generator=generator)
        distiller = Distiller(teacher, student, [FeaturePair("conv2", "conv2")], alpha=0.0, sample_input=inputs)
        model = nn.parallel.DistributedDataParallel(distiller)  # find_unused_parameters=False, the default
        optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
        losses_seen = []
        for _ in range(3):
            out = model(inputs)  # labels=None: the student's head is not in any weighted term
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            losses_seen.append(out["loss"].item())
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(losses_seen, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_feature_only_distillation_trains_under_ddp(tmp_path) -> None:
    mp.spawn(feature_only_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(seen) == 3 and all(0 < value < float("inf") for value in seen)


def test_feature_only_step_gives_the_head_a_zero_gradient(teacher, student, batch) -> None:
    distiller = Distiller(teacher, student, [FeaturePair("conv2", "conv2")], alpha=0.0)
    out = distiller(batch[0])
    out["loss"].backward()
    gradient = student.fc.weight.grad  # the head is in the graph, with weight 0
    assert gradient is not None and torch.equal(gradient, torch.zeros_like(gradient))
    assert out["ce"].item() == 0.0


# -- the fused feature MSE (#12.13) ----------------------------------------------------------------


def test_feature_mse_is_the_fused_kernel_and_keeps_float64() -> None:
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 4, 8, 7, 7, generator=generator, dtype=torch.float64).unbind(0)
    got = losses.feature_mse(a, b)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(reference.mse(a, b), rel=1e-12)
    single = losses.feature_mse(a.float(), b.float())
    assert single.dtype == torch.float32
    # A float32 mean of n = 1568 non-negative terms: relative error below log2(n)·eps with pairwise sums.
    assert single.item() == pytest.approx(reference.mse(a.float(), b.float()), rel=16 * FLOAT32_EPS)
    assert torch.equal(single, nn.functional.mse_loss(a.float(), b.float()))
    half = losses.feature_mse(a.half(), b.half())
    assert half.dtype == torch.float32
