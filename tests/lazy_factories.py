"""Dataset factories for the lazy-data tests (named in configs as ``tests.lazy_factories:NAME``)."""

from __future__ import annotations

import numpy as np
import torch

READS = {"items": 0}


def arrays(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int64) + 2 * (x[:, 0, 0, 0] > 0)
    return x, y


class Items(torch.utils.data.Dataset):
    """``(input, label)`` items from arrays, counting every read."""

    def __init__(self, x: np.ndarray, y: np.ndarray, with_targets: bool = False) -> None:
        self.x, self.y = x, y
        if with_targets:
            self.targets = y.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        READS["items"] += 1
        return torch.from_numpy(self.x[index]), int(self.y[index])


def same_as_npz():
    x, y = arrays()
    return Items(x[:160], y[:160]), Items(x[160:], y[160:])


def with_targets():
    x, y = arrays()
    return Items(x[:160], y[:160], with_targets=True), Items(x[160:], y[160:], with_targets=True)


def not_a_dataset():
    return 3, 4
