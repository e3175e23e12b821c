"""Does the Distiller cost more than the same math written by hand?

One training step (response + one adapted feature pair + CE, AdamW) of a 2-conv
student distilled from a 4-conv teacher, batch 128 of 28×28 inputs, one thread:
through ``Distiller`` versus a hand-written step with the same modules and math.
Two pairs: a small 64×7×7 map after the bodies, and a large 32×28×28 map after the
teacher's second convolution (where an unfused feature loss showed, issue 12.13).
The goal (issues 2 and 12.13) is a ratio ≤ 1.05 for both.

    .venv/bin/python benchmarks/overhead.py            # ~2 minutes; writes benchmarks/results/overhead.{json,md}
"""

from __future__ import annotations

import argparse
import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from timing import interleave, machine, single_thread, summary, write_tables
from torch import nn

from kdistill import Distiller, FeaturePair

ALPHA, BETA, TEMPERATURE = 1.0, 1.0, 4.0


def conv(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def models() -> tuple[nn.Module, nn.Module]:
    """A 4-conv teacher and a 2-conv student, each split into ``body`` (the paired feature) and ``head``."""
    teacher = nn.Sequential(
        OrderedDict(
            body=nn.Sequential(conv(1, 32), conv(32, 32), nn.MaxPool2d(2), conv(32, 64), conv(64, 64), nn.MaxPool2d(2)),
            head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)),
        )
    )
    student = nn.Sequential(
        OrderedDict(
            body=nn.Sequential(conv(1, 8), nn.MaxPool2d(2), conv(8, 16), nn.MaxPool2d(2)),
            head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)),
        )
    )
    return teacher.eval().requires_grad_(False), student


# The paired layers: (student path, teacher path, the feature map the pair compares).
SCENARIOS = {
    "small map": ("body", "body", "64×7×7 after the bodies; 1×1 conv adapter 16 → 64"),
    "large map": ("body.0", "body.1", "32×28×28 after the teacher's 2nd conv; 1×1 conv adapter 8 → 32"),
}


def run_through(model: nn.Module, path: str, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(feature at path, logits)``: the model's own layers called by hand, no hooks."""
    body_index = int(path.split(".")[1]) if "." in path else None
    x = inputs
    for index, layer in enumerate(model.body):
        x = layer(x)
        if index == body_index:
            feature = x
    if body_index is None:
        feature = x
    return feature, model.head(x)


def measure(name: str, student_path: str, teacher_path: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    teacher, student = models()
    inputs = torch.randn(args.batch_size, 1, 28, 28)
    labels = torch.randint(0, 10, (args.batch_size,))

    distiller = Distiller(
        teacher,
        copy.deepcopy(student),
        [FeaturePair(student_path, teacher_path)],
        alpha=ALPHA,
        beta=BETA,
        temperature=TEMPERATURE,
        sample_input=inputs,
    )
    distiller_optimizer = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-3)

    hand_student = copy.deepcopy(student)
    hand_adapter = copy.deepcopy(distiller.adapters["0"])
    hand_optimizer = torch.optim.AdamW([*hand_student.parameters(), *hand_adapter.parameters()], lr=1e-3)

    def distiller_step() -> None:
        loss = distiller(inputs, labels)["loss"]
        distiller_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distiller_optimizer.step()

    def hand_step() -> None:
        with torch.no_grad():
            teacher_feature, teacher_logits = run_through(teacher, teacher_path, inputs)
        student_feature, student_logits = run_through(hand_student, student_path, inputs)
        response = F.kl_div(
            F.log_softmax(student_logits / TEMPERATURE, -1),
            F.log_softmax(teacher_logits / TEMPERATURE, -1),
            log_target=True,
            reduction="batchmean",
        ) * (TEMPERATURE**2)
        feature = F.mse_loss(hand_adapter(student_feature), teacher_feature)
        loss = BETA * (ALPHA * response + feature) + F.cross_entropy(student_logits, labels)
        hand_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        hand_optimizer.step()

    times = interleave({"hand-written": hand_step, "Distiller": distiller_step}, rounds=args.rounds)
    distiller.close()
    rows = {step: summary(seconds, args.batch_size) for step, seconds in times.items()}
    return {"steps": rows, "ratio": rows["Distiller"]["median_ms"] / rows["hand-written"]["median_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    single_thread()
    scenarios = {name: measure(name, s, t, args) for name, (s, t, _) in SCENARIOS.items()}
    result = {"machine": machine(), "batch_size": args.batch_size, "rounds": args.rounds, "scenarios": scenarios}
    lines = [
        "| paired feature | step | median ms | p10 ms | p90 ms | samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, scenario in scenarios.items():
        lines += [
            f"| {name} | {step} | {r['median_ms']:.1f} | {r['p10_ms']:.1f} | {r['p90_ms']:.1f} | "
            f"{r['samples_per_s']:.0f} |"
            for step, r in scenario["steps"].items()
        ]
    lines += ["", "| paired feature | what is compared | Distiller ÷ hand-written (medians) |", "|---|---|---|"]
    lines += [f"| {name} | {SCENARIOS[name][2]} | **{s['ratio']:.3f}×** |" for name, s in scenarios.items()]
    lines += [
        "",
        f"Batch {args.batch_size}, {args.rounds} interleaved rounds per scenario, "
        f"{result['machine']['threads']} thread, load average {result['machine']['load_average'][0]}.",
        "",
    ]
    path = write_tables("overhead", result, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
