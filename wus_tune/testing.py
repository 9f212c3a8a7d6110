"""Slowdowns to check that time is charged honestly: slow data, slow method hooks, slow steps.

Used by ``tests/test_time_truth.py`` and ``benchmarks/time_truth.py``: each injects work into one run only
(the trial, never its baseline), so the run's relative time must move with its wall-time ratio. The work is
real CPU work (a busy loop on the process clock), as decoding an image or a hook's arithmetic is; a sleep
would be a wait, which the CPU work clock deliberately does not charge (``wus_tune.clock``).

Importing this module registers two test methods, ``slow_epoch_end`` and ``slow_step``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from wus_tune.methods import Method, StepContext, register

__all__ = ["SlowDataset", "SlowEpochEnd", "SlowStep", "burn", "random_images", "slow_digits"]


def burn(seconds: float) -> None:
    """Busy-work for ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class SlowDataset(torch.utils.data.Dataset):
    """``(x[i], y[i])`` after ``ms_per_item`` milliseconds of CPU work, like a decoder."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, ms_per_item: float) -> None:
        self.x, self.y, self.ms = x, y, ms_per_item

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        burn(self.ms / 1000)
        return self.x[i], int(self.y[i])


def slow_digits(*, train_ms: float = 0.0, val_ms: float = 0.0, val_fraction: float = 0.2) -> dict[str, Any]:
    """scikit-learn's digits split into train and validation; a split with ``*_ms > 0`` is a :class:`SlowDataset`
    (streamed when the config's ``data.memory_budget_mb`` is 0, else read once into memory)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = int(len(y) * val_fraction)
    val, train = order[:n_val], order[n_val:]

    def split(index: torch.Tensor, ms: float) -> Any:
        return SlowDataset(x[index], y[index], ms) if ms > 0 else (x[index], y[index])

    return {"train": split(train, train_ms), "val": split(val, val_ms)}


def random_images(*, n: int = 600, size: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random uint8 RGB images of ``size`` x ``size`` with random labels: a device-resident image set whose
    crop-and-flip augmentation costs more than a tiny model's step."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


@register
class SlowEpochEnd(Method):
    """Does ``seconds`` of CPU work at the end of every epoch (as a method's pruning or re-projection would)."""

    name = "slow_epoch_end"

    def __init__(self, *, seconds: float = 0.05) -> None:
        super().__init__(seconds=seconds)
        self.seconds = seconds

    def end_epoch(self, model: torch.nn.Module, run: Any) -> dict[str, float]:
        burn(self.seconds)
        return {}


@register
class SlowStep(Method):
    """Adds ``seconds`` of CPU work to every step (work its FLOP count does not show)."""

    name = "slow_step"

    def __init__(self, *, seconds: float = 0.002) -> None:
        super().__init__(seconds=seconds)
        self.seconds = seconds

    def step_kind(self) -> str:
        return "slow"

    def before_step(self, step: StepContext) -> None:
        burn(self.seconds)
