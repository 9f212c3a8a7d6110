"""The run's one account of what it did and what that took: :class:`Ledger`.

Two clocks, two purposes:

* **wall seconds** (synchronised with the device): the ``time`` objective and ``TrainResult.time_s``:
  training, the evaluations the run needs (a method's checks on ``val_acc``, the final one), the methods'
  work outside a step (checks, ``end_epoch``) and compilation. Evaluations made only for the learning
  curves, snapshots and the FLOP counting are timed apart and not charged.
* **work seconds** (:class:`wus_tune.clock.WorkClock`: CPU time of the process and its data workers on a
  CPU, synchronised wall time on CUDA): what :mod:`wus_tune.pricing` turns into relative time. Per *step
  kind* (``"full"``, ``"skip:last:1"``, named by the methods) the ledger counts the steps, their FLOPs
  (``torch.utils.flop_counter`` around the real step, the first time a kind occurs) and their work
  seconds, each step timed from the end of the previous step's bookkeeping, so fetching and transforming
  its batch counts; the charged evaluations likewise (per evaluated sample). Work that is not repeated
  step after step -- a step kind named ``...build`` (a cache built for a skip window), the methods'
  ``end_epoch`` and checks, compilation -- is kept apart as *one-off* work, charged at its measured seconds.

Step times on CUDA come from CUDA events read at the end of each epoch, so timing a step costs no
synchronisation. Torch only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from wus_tune.clock import WorkClock

__all__ = ["EVAL", "Ledger", "is_one_off"]

EVAL = "eval"  # the unit of evaluation work: one evaluated sample of a charged evaluation


def is_one_off(kind: str) -> bool:
    """A step kind whose step does one-off work (a part ending in ``build``, e.g. ``skip:all:cache-build``):
    repeating it on a copy would not cost what it cost in the run, so its measured seconds are charged."""
    return any(part.rsplit(":", 1)[-1].endswith("build") for part in kind.split("+"))


class WallTimer:
    """Wall time with device synchronisation, so queued GPU work is counted where it belongs."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


@dataclass
class KindAccount:
    flops_per_step: float  # counted by torch.utils.flop_counter on the kind's first step
    steps: int = 0
    timed_steps: int = 0  # steps timed on the work clock (all but the FLOP-counted first one)
    work_s: float = 0.0  # their work seconds, batch fetching included
    counted_work_s: float = 0.0  # work seconds of the FLOP-counted step (slowed by the counting)


class _StepTimes:
    """Work seconds of each step, from a mark (the end of the previous step's bookkeeping) to its end: the
    work clock on a CPU; CUDA events on a GPU, resolved at the end of the epoch (no synchronisation per step)."""

    def __init__(self, clock: WorkClock) -> None:
        self.clock = clock
        self._mark: Any = None
        self._pending: list[tuple[str, Any, Any, bool]] = []

    def mark(self) -> None:
        if self.clock.cuda:
            self._mark = torch.cuda.Event(enable_timing=True)
            self._mark.record()
        else:
            self._mark = self.clock.mark()

    def stop(self, kind: str, counted: bool) -> float | None:
        """The step's seconds now (CPU), or None when they come at :meth:`flush` (CUDA)."""
        if self.clock.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((kind, self._mark, end, counted))
            return None
        return self.clock.since(self._mark)

    def flush(self) -> list[tuple[str, float, bool]]:
        """(kind, seconds, counted) of the steps timed with events since the last flush."""
        if not self._pending:
            return []
        torch.cuda.synchronize()
        out = [(kind, start.elapsed_time(end) / 1000, counted) for kind, start, end, counted in self._pending]
        self._pending = []
        return out


class Ledger:
    """Charged and uncharged wall time, FLOPs, and the work each kind of step and evaluation took (see the
    module docstring)."""

    def __init__(self, device: torch.device, flops_per_validation: float, samples_per_validation: int = 0, *,
                 workers: bool = False) -> None:  # fmt: skip
        self.timer = WallTimer(device)
        self.clock = WorkClock(device, workers=workers)
        self._steps = _StepTimes(self.clock)
        self.flops_per_validation = flops_per_validation
        self.samples_per_validation = samples_per_validation
        self.kinds: dict[str, KindAccount] = {}
        # wall seconds
        self.train_time = self.eval_time = self.required_eval_time = self.uncharged_time = 0.0
        self.hook_time = 0.0  # charged work outside steps and evaluations: checks, end_epoch
        self.compile_time = 0.0
        self.required_eval_flops = 0.0
        self.charged_eval_samples = 0
        # work seconds
        self.eval_work_s = 0.0  # charged evaluations
        self.one_off_s: dict[str, float] = {}  # "hooks", "compile", ...
        self.workers_s = 0.0  # data worker processes while training (a streamed dataset's decoding)
        self.last_eval_work_s = 0.0  # the latest evaluation pass's work seconds (a probe point records it)
        self._check_start: float | None = None

    # ---- epochs and steps ------------------------------------------------------------------------------

    def start_epoch(self) -> None:
        self.epoch_flops = 0.0
        self._eval_before = self.eval_time
        self._checks = self._counting = 0.0
        self._counted_steps = self._epoch_steps = 0
        self._workers_start = self.clock.workers()
        self._start = self.timer.now()
        self._steps.mark()

    @contextlib.contextmanager
    def step(self, kind: str) -> Iterator[bool]:
        """Around one training step; yields whether its FLOPs are being counted (the first of its kind)."""
        from torch.utils.flop_counter import FlopCounterMode

        counted = kind not in self.kinds
        if counted:
            start = self.timer.now()
            with FlopCounterMode(display=False) as counter:
                yield True
            self.kinds[kind] = KindAccount(float(counter.get_total_flops()))
            self._counting += self.timer.now() - start
            self._counted_steps += 1
        else:
            yield False
        account = self.kinds[kind]
        account.steps += 1
        self.epoch_flops += account.flops_per_step
        self._epoch_steps += 1
        seconds = self._steps.stop(kind, counted)
        if seconds is not None:
            self._add_step_work(kind, seconds, counted)

    def _add_step_work(self, kind: str, seconds: float, counted: bool) -> None:
        account = self.kinds[kind]
        if counted:
            account.counted_work_s += seconds
        else:
            account.timed_steps += 1
            account.work_s += seconds

    @contextlib.contextmanager
    def check_time(self) -> Iterator[None]:
        """Around the bookkeeping after a step (checks, probe points, snapshots): not training time; the
        next step's work is timed from its end."""
        start = self._check_start = self.timer.now()
        try:
            yield
        finally:
            self._checks += self.timer.now() - start
            self._check_start = None
            self._steps.mark()

    @contextlib.contextmanager
    def charged_work(self, name: str) -> Iterator[None]:
        """Around work a method needs outside its steps (``end_epoch``, a check's own work): charged, one-off."""
        wall, mark = self.timer.now(), self.clock.mark()
        try:
            yield
        finally:
            self.one_off_s[name] = self.one_off_s.get(name, 0.0) + self.clock.since(mark)
            self.hook_time += self.timer.now() - wall

    def add_compile(self, wall_s: float, work_s: float) -> None:
        """``work_s``: the compile's work seconds (``clock.since(clock.mark(helpers=True))``: with its compile
        workers' CPU, capped at its wall time)."""
        self.compile_time += wall_s
        self.one_off_s["compile"] = self.one_off_s.get("compile", 0.0) + work_s

    def epoch_elapsed(self) -> float:
        """Training time of the epoch so far (checks, including one in progress, left out)."""
        now = self._check_start if self._check_start is not None else self.timer.now()
        return now - self._start - self._checks

    def end_epoch(self) -> float:
        """Close the epoch's training time; a step slowed by FLOP counting is charged as an average step."""
        elapsed = self.timer.now() - self._start - self._checks
        for kind, seconds, counted in self._steps.flush():
            self._add_step_work(kind, seconds, counted)
        self.workers_s += self.clock.workers() - self._workers_start
        plain_steps = self._epoch_steps - self._counted_steps
        charged = elapsed
        if self._counted_steps and plain_steps:
            per_step = (elapsed - self._counting) / plain_steps
            charged = elapsed - self._counting + self._counted_steps * per_step
        self.uncharged_time += elapsed - charged
        self.train_time += charged
        return charged

    # ---- evaluations -----------------------------------------------------------------------------------

    def evaluate(self, run_eval: Callable[[], tuple[float, float]], *, charged: bool) -> tuple[float, float]:
        """Run and time one evaluation pass; ``charged``: the run needs it (its time, FLOPs and samples count)."""
        workers = self.clock.workers()
        start, work = self.timer.now(), self.clock.now()
        result = run_eval()
        end, seconds = self.clock.now(), self.timer.now() - start
        # capped at the wall time, as every interval's work (wus_tune.clock)
        self.last_eval_work_s = min(end - work + self.clock.workers() - workers, seconds)
        self.eval_time += seconds
        if charged:
            self.required_eval_time += seconds
            self.required_eval_flops += self.flops_per_validation
            self.charged_eval_samples += self.samples_per_validation
            self.eval_work_s += self.last_eval_work_s
        return result

    @property
    def epoch_eval_time(self) -> float:
        return self.eval_time - self._eval_before

    # ---- what pricing reads ------------------------------------------------------------------------------

    def work_counts(self) -> dict[str, float]:
        """Units of work per kind, as :mod:`wus_tune.pricing` prices them: steps per step kind, charged
        evaluation samples."""
        counts: dict[str, float] = {f"step:{name}": float(k.steps) for name, k in self.kinds.items()}
        if self.charged_eval_samples:
            counts[EVAL] = float(self.charged_eval_samples)
        return counts

    def work_seconds(self) -> dict[str, dict[str, float]]:
        """Measured work per kind: {kind: {"units", "seconds"}} for the steps of each kind (timed steps only)
        and the charged evaluations; the one-off work (builds: every step of a ``...build`` kind) as
        {"one-off:<name>": {"units": 1, "seconds"}}; the data workers as ``"workers"``."""
        out: dict[str, dict[str, float]] = {}
        for name, k in self.kinds.items():
            if is_one_off(name):
                seconds = k.work_s / k.timed_steps * k.steps if k.timed_steps else k.counted_work_s
                out[f"one-off:build:{name}"] = {"units": 1.0, "seconds": seconds}
            elif k.timed_steps:
                out[f"step:{name}"] = {"units": float(k.timed_steps), "seconds": k.work_s}
        if self.charged_eval_samples:
            out[EVAL] = {"units": float(self.charged_eval_samples), "seconds": self.eval_work_s}
        for name, seconds in self.one_off_s.items():
            out[f"one-off:{name}"] = {"units": 1.0, "seconds": seconds}
        if self.workers_s > 0:
            out["workers"] = {"units": 1.0, "seconds": self.workers_s}
        return out

    # ---- snapshots -----------------------------------------------------------------------------------

    def snapshot(self, *, mid_epoch: bool) -> dict[str, Any]:
        """The account so far, for a RunState; ``mid_epoch``: with the epoch in progress."""
        for kind, seconds, counted in self._steps.flush():
            self._add_step_work(kind, seconds, counted)
        out: dict[str, Any] = {
            "train_time_s": self.train_time, "eval_time_s": self.eval_time, "required_eval_time_s": self.required_eval_time,
            "required_eval_flops": self.required_eval_flops, "uncharged_time_s": self.uncharged_time,
            "hook_time_s": self.hook_time,
            "charged_eval_samples": self.charged_eval_samples, "eval_work_s": self.eval_work_s,
            "one_off_s": dict(self.one_off_s), "workers_s": self.workers_s,
            "kinds": {name: vars(k).copy() for name, k in self.kinds.items()},
        }  # fmt: skip
        if mid_epoch:
            out["epoch"] = {"elapsed_s": self.epoch_elapsed(), "flops": self.epoch_flops,
                            "eval_s": self.epoch_eval_time, "counting_s": self._counting,
                            "counted_steps": self._counted_steps, "steps": self._epoch_steps,
                            "workers_s": self.clock.workers() - self._workers_start}  # fmt: skip
        return out

    def restore(self, state: dict[str, Any]) -> None:
        """Take up a snapshot's account (a fork goes on with the prefix's time and work as measured)."""
        self.train_time, self.eval_time = float(state["train_time_s"]), float(state["eval_time_s"])
        self.required_eval_time = float(state["required_eval_time_s"])
        self.required_eval_flops = float(state["required_eval_flops"])
        self.uncharged_time = float(state["uncharged_time_s"])
        self.hook_time = float(state.get("hook_time_s", 0.0))
        self.charged_eval_samples = int(state.get("charged_eval_samples", 0))
        self.eval_work_s = float(state.get("eval_work_s", 0.0))
        # the prefix's one-off work, but this run's own compilation (its modes, not the snapshot's run's)
        compiled = {k: v for k, v in self.one_off_s.items() if k == "compile"}
        self.one_off_s = {k: float(v) for k, v in state.get("one_off_s", {}).items() if k != "compile"} | compiled
        self.workers_s = float(state.get("workers_s", 0.0))
        self.kinds = {name: KindAccount(**{f: k[f] for f in ("flops_per_step", "steps", "timed_steps", "work_s",
                                                              "counted_work_s") if f in k})
                      for name, k in state["kinds"].items()}  # fmt: skip

    def resume_epoch(self, epoch: dict[str, Any]) -> None:
        """After :meth:`start_epoch`: the epoch in progress when the snapshot was taken."""
        self._start -= float(epoch["elapsed_s"])
        self._eval_before -= float(epoch["eval_s"])
        self.epoch_flops = float(epoch["flops"])
        self._counting, self._counted_steps = float(epoch["counting_s"]), int(epoch["counted_steps"])
        self._epoch_steps = int(epoch["steps"])
        self.workers_s += float(epoch.get("workers_s", 0.0))
