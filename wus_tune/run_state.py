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

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["RecordingPlan", "ProbeRecord", "RunState", "snapshot_path"]


@dataclass(frozen=True)
class RecordingPlan:
    """Where a run records its signals and which of those points it snapshots."""

    every: int = 0  # 0: at the end of each epoch; N > 0: after every N optimizer steps
    val: bool = True  # evaluate the validation split at each point (timed, never charged to the run)
    save_at: Collection[int] = ()  # point numbers (1-based) whose RunState is written to save_dir
    save_dir: str | None = None

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"RecordingPlan.every: expected >= 0, got {self.every}")
        if self.save_at and self.save_dir is None:
            raise ValueError("RecordingPlan.save_at needs save_dir")


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

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(asdict(self), tmp)
        tmp.replace(path)  # atomic: a reader never sees half a snapshot
        return path

    @classmethod
    def load(cls, path: str | Path) -> RunState:
        return cls(**torch.load(Path(path), map_location="cpu", weights_only=True))


def snapshot_path(directory: str | Path, point: int) -> Path:
    """Where the snapshot of probe point ``point`` lives in ``directory``."""
    return Path(directory) / f"point_{point:05d}.pt"
