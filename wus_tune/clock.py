"""The clock relative time is measured on: the work a run makes its machine do, not the hours it waits.

On a CPU it is the CPU time of this process (every thread) plus that of its descendant processes (the
DataLoader workers that decode a streamed dataset; inductor's compile workers), so a run descheduled while other jobs share the cores
is not charged for the wait; on CUDA it is wall time with device synchronisation, since the work is the
device's and a GPU is rarely shared. What the CPU clock cannot see is a process waiting for something other
than a core (a disk, a network file system, a sleep): wus_tune compares the two clocks on every run and says
when a run's wall time is not explained by its work (``TrainResult.coverage``, docs/study.md).

CPU time counts core-seconds: two torch threads that keep two cores busy (or spin waiting for each other)
for one second count two, while a single-threaded hook or a data worker's decoding counts one per second.
A user waits wall seconds, so work that runs on several cores at once must not be charged more than the
wall time it took: an interval's work seconds are ``min(CPU seconds, wall seconds)`` (:meth:`WorkClock.mark`,
:meth:`WorkClock.since`). Descheduled (CPU < wall), the run is charged its CPU time, as before; in parallel
(CPU > wall), its wall time. Without the cap, a trial whose extra work was single-threaded (a compile, a
hook, a worker's decoding) was priced at a half to a third of its wall-time ratio on 2 cores
(docs/benchmarks.md, time_truth).

Reading the workers' time scans ``/proc`` (Linux); elsewhere only reaped children are counted.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import torch

__all__ = ["WorkClock", "children_cpu_seconds"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def children_cpu_seconds() -> float:
    """CPU seconds of this process's descendants: the live ones (``/proc/<pid>/stat``, Linux) and the reaped ones."""
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = reaped.ru_utime + reaped.ru_stime
    for pid in _child_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited between the listing and the read: reaped now, or about to be
        # utime and stime are the 14th and 15th fields; after the ")" that closes the name they are 12th and 13th
        total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def _child_pids(pid: str = "self") -> list[int]:
    """Every live descendant: a pool's workers are its children (inductor's compile workers are the
    grandchildren of the run's process)."""
    pids: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return pids
    for task in tasks:
        try:
            children = [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            pids += [child, *_child_pids(str(child))]
    return pids


class WorkClock:
    """``now()``: seconds of work so far on the device's clock (see the module docstring); ``workers()``:
    the CPU seconds of child processes (0 on CUDA, whose clock is wall time and sees their waits already)."""

    def __init__(self, device: torch.device, *, workers: bool = True) -> None:
        self.cuda = device.type == "cuda"
        self.watch_workers = workers and not self.cuda  # False: the run has no worker processes to read
        self.name = "cuda-wall" if self.cuda else "cpu"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def mark(self, *, helpers: bool = False) -> tuple[float, float, bool]:
        """A reading to measure an interval from: (work seconds, wall seconds, ``helpers``); ``helpers``: the
        work includes every child process's CPU (:meth:`with_helpers`)."""
        return (self.with_helpers() if helpers else self.now()), time.perf_counter(), helpers

    def since(self, mark: tuple[float, float, bool]) -> float:
        """Work seconds since ``mark``, capped at the wall seconds since it (the module docstring)."""
        work, wall, helpers = mark
        return min((self.with_helpers() if helpers else self.now()) - work, time.perf_counter() - wall)

    def with_helpers(self) -> float:
        """``now()`` plus the CPU seconds of every child process, watched or not: what compiling costs on a
        CPU, where torch's inductor compiles in a pool of worker processes."""
        return self.now() + (0.0 if self.cuda else children_cpu_seconds())

    def workers(self) -> float:
        return children_cpu_seconds() if self.watch_workers else 0.0
