"""Tiny CPU models shared by the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyConvNet(nn.Module):
    """``(N, 1, 8, 8)`` → ``(N, classes)``; layers ``conv1``, ``conv2``, ``pool``, ``fc``."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv2(self.conv1(x))).flatten(1))


class TupleOutputNet(TinyConvNet):
    """Returns ``(logits, extra)`` like many research models."""

    def forward(self, x: torch.Tensor):  # type: ignore[override]
        return super().forward(x), torch.zeros(1)


class DictOutputNet(TinyConvNet):
    """Returns ``{"logits": ...}`` like Hugging Face models with ``return_dict``."""

    def forward(self, x: torch.Tensor):  # type: ignore[override]
        return {"hidden": torch.zeros(1), "logits": super().forward(x)}


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture
def teacher(seeded) -> TinyConvNet:
    return TinyConvNet(width=16)


@pytest.fixture
def student(seeded) -> TinyConvNet:
    return TinyConvNet(width=4)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 8, 8, generator=generator), torch.randint(0, 10, (6,), generator=generator)


# The longest tests start first, so that under `pytest -n` (make test) they overlap the rest of the
# suite instead of running alone at its end. The order of the others is unchanged.
LONGEST_FIRST = ("test_demo.py", "test_crash.py", "test_lm_run.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a rank, the collection order


def spawn_or_fail(worker, args: tuple, seconds: float, hang: str) -> None:
    """Run ``worker(rank, *args)`` in 2 spawned processes; any still running after ``seconds`` are
    killed and the test fails with ``hang`` (ranks that disagree wait for each other forever)."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + seconds
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(hang)
