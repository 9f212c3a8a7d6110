"""Probe points and run-state snapshots: what lets a run be continued from another run's prefix.

A *probe point* is a moment of training where the trainer records the signals a method might watch
(the validation accuracy, the running training accuracy since the previous point) with their measured
cost, and may save its whole state. Points are the ends of epochs (``every = 0``) or every ``every``
optimizer steps, numbered from 1, so they coincide with the checks of a method that watches a signal
on the same cadence.

A :class:`RunState` is everything :func:`wus_tune.fit` needs to go on from such a point exactly as if
it had trained the prefix itself: model and optimizer state (momentum buffers included), the global
and the data-order RNG states, the step and epoch position (the LR schedule is a function of the step),
the partial-epoch accumulators, the charged and uncharged time so far, the epoch records and the probe
records, and one state per plug-in method (``method_states``, empty for a plain run). On the CPU a run
resumed from a snapshot is bit-identical to the uninterrupted run; on a GPU up to its non-deterministic
kernels.

Torch only, like the trainer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

__all__ = ["RecordingPlan", "ProbeRecord", "RunState", "origin_of", "snapshot_path"]


@dataclass(frozen=True)
class RecordingPlan:
    """Where a run records its signals and which of those points it snapshots."""

    every: int = 0  # 0: at the end of each epoch; N > 0: after every N optimizer steps
    val: bool = True  # evaluate the validation split at each point (timed, never charged to the run)
    save_at: Collection[int] = ()  # point numbers (1-based) whose RunState is written to save_dir
    save_dir: str | None = None
    # Or chosen by the run once it knows its length: called with the training fraction at each point
    # (:meth:`point_progress`), returns the points to save. The study uses it, since the steps per epoch
    # depend on data only the run has (a user's objects, a streamed Dataset).
    choose_saves: Callable[[Sequence[float]], Collection[int]] | None = None

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"RecordingPlan.every: expected >= 0, got {self.every}")
        if (self.save_at or self.choose_saves) and self.save_dir is None:
            raise ValueError("RecordingPlan.save_at needs save_dir")

    def point_progress(self, steps_per_epoch: int, epochs: int) -> list[float]:
        """The training fraction at each point of a run of ``epochs`` x ``steps_per_epoch`` steps, as the
        trainer records it."""
        if self.every == 0:
            return [(e + 1) / epochs for e in range(epochs)]
        total = steps_per_epoch * epochs
        return [k * self.every / total for k in range(1, total // self.every + 1)]

    def resolved(self, steps_per_epoch: int, epochs: int) -> RecordingPlan:
        """These probes with ``save_at`` chosen (:attr:`choose_saves`) for a run of that length."""
        if self.choose_saves is None:
            return self
        chosen = tuple(self.choose_saves(self.point_progress(steps_per_epoch, epochs)))
        return replace(self, save_at=chosen, choose_saves=None)


@dataclass
class ProbeRecord:
    """The signals at one probe point and what the run had cost up to it."""

    index: int  # 1-based point number
    step: int  # optimizer steps done
    progress: float  # step / total steps (``(epoch + 1) / epochs`` at epoch ends)
    val_acc: float | None  # None when the point did not evaluate
    val_loss: float | None
    train_acc: float  # running training accuracy since the previous point
    train_time_s: float  # training time up to this point (cumulative)
    eval_time_s: float  # this point's validation pass
    eval_flops: float  # FLOPs of this point's validation pass
    train_flops: float  # training FLOPs up to this point (cumulative)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ProbeRecord:
        return cls(**raw)


def signal_of(probes: Sequence[Mapping[str, Any]], signal: str) -> list[float] | None:
    """The accuracy ``signal`` ("val_acc", else the running training accuracy) at each probe (ProbeRecord
    dicts); None when some probe lacks it."""
    values = [p.get("val_acc") if signal == "val_acc" else p.get("train_acc") for p in probes]
    return None if any(v is None for v in values) else [float(v) for v in values]


@dataclass
class RunState:
    """A run at a probe point; :meth:`save` / :meth:`load` use ``torch.save`` with plain types only."""

    point: int  # the probe point it was taken at
    step: int  # optimizer steps done
    epoch: int  # the epoch in progress, 0-based (the next one when ``batch == 0``)
    batch: int  # batches of that epoch done
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    loader_rng: torch.Tensor  # the training loader's generator at the start of ``epoch``
    counters: dict[str, Any]  # train_time_s, eval_time_s, required_eval_time_s, required_eval_flops, kinds
    epoch_partial: dict[str, Any]  # loss, correct, seen, steps per kind of the epoch so far
    records: list[dict[str, Any]]  # EpochRecord dicts of the finished epochs
    probes: list[dict[str, Any]]  # ProbeRecord dicts up to this point
    config: dict[str, Any]  # the TrainConfig of the run that took it
    method_states: dict[str, Any] = field(default_factory=dict)
    # Whose snapshot this is: {"study", "trial", "seed"} of the run that took it (``origin_of(config)``), so
    # a fork can check it resumes the very run its decision was made on.
    origin: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write the snapshot atomically: a temporary file in the same folder, then a rename, so a reader
        (another worker) never sees half a file and a writer killed mid-way leaves no snapshot at all."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(asdict(self), tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RunState:
        return cls(**torch.load(Path(path), map_location="cpu", weights_only=True))


def origin_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run a snapshot of ``config`` (a TrainConfig dict) belongs to: its study, trial and seed."""
    meta = config.get("meta") or {}
    return {"study": meta.get("study"), "trial": meta.get("trial"), "seed": config.get("seed")}


def snapshot_path(directory: str | Path, point: int) -> Path:
    """Where the snapshot of probe point ``point`` lives in ``directory``."""
    return Path(directory) / f"point_{point:05d}.pt"
