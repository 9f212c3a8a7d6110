"""Does relative time move with the wall-time ratio, whatever work a trial adds? The matrix of issue 19.

    python benchmarks/time_truth.py [--cases all] [--rounds 3] [--modes quiet,loaded]
        [--out benchmarks/results/time_truth.json]

Each case injects real CPU work into the trial only, never its baseline (wus_tune.testing): slow training
data (streamed in the trainer's process; streamed through a DataLoader worker), costly augmentation of
device-resident images, slow validation data under WUS's val_acc checks, a method whose end_epoch works, a
method whose step does work its FLOPs do not show, WUS with the frozen-prefix cache, and compilation on the
CPU. For each case the baseline and the trial are trained alternately, ``--rounds`` pairs, in this one
process, each trial priced against the baseline config (``fit(..., relative_to=baseline)``). Per case:

* wall: the trial's charged wall seconds (``time_s``) over the baseline's, summed over the rounds;
* relative: the trial's ``relative_time`` over the baseline's (which is 1.0 by construction);
* error: relative / wall - 1. Aim (issue 19): within 10% on a quiet machine.

``loaded`` mode reruns the matrix with a busy-loop process pinned to the other core for the first half of
every trial (bounded: it exits by itself, and is killed at the end); the aim is a relative-time ratio within
10% of the quiet one. Run it alone on the machine: ``uptime`` is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIGITS = {"model": {"name": "mlp", "width": 1.0}, "device": "cpu", "epochs": 12, "schedule": {"name": "step"},
          "data": {"factory": "wus_tune.testing:slow_digits", "val_fraction": 0.0}}  # fmt: skip
IMAGES = {"model": {"name": "mlp", "width": 0.05, "depth": 1}, "device": "cpu", "epochs": 6,
          "data": {"factory": "wus_tune.testing:random_images", "kwargs": {"n": 2000}, "val_fraction": 0.0,
                   "augment": False}}  # fmt: skip
CACHE = {"methods.wus": {"threshold": 1.0, "window": 1, "warmup": 1, "skip_length": 2, "bias_scope": "last:1",
                         "signal": "train_acc", "schedule_window": [0.0, 1.0], "cache_frozen_prefix": True}}  # fmt: skip


def cases() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """name -> (baseline config dict, the trial's dotted overrides)."""
    streamed = DIGITS | {"data": DIGITS["data"] | {"memory_budget_mb": 0, "num_workers": 0}}
    workers = DIGITS | {"data": DIGITS["data"] | {"memory_budget_mb": 0, "num_workers": 1}}
    wide = DIGITS | {"model": {"name": "mlp", "width": 2.0, "depth": 3}}
    return {
        "streamed-data": (streamed, {"data.kwargs": {"train_ms": 0.02}}),
        "streamed-data-worker": (workers, {"data.kwargs": {"train_ms": 0.02}}),
        "augmentation": (IMAGES, {"data.augment": True}),
        "slow-val-checks": (streamed, {"data.kwargs": {"val_ms": 0.05}, "methods.wus": {"threshold": 0.0, "signal": "val_acc"}}),
        "end-epoch-work": (DIGITS, {"methods.slow_epoch_end": {"seconds": 0.02}}),
        "slow-step": (DIGITS, {"methods.slow_step": {"seconds": 0.001}}),
        "frozen-prefix-cache": (wide, CACHE),
        "compile-cpu": (DIGITS | {"epochs": 4}, {"compile": True}),
    }  # fmt: skip


class BusyHalf:
    """A busy-loop process on the last core for ``seconds`` (then it exits by itself)."""

    def __init__(self, seconds: float) -> None:
        core = (os.cpu_count() or 1) - 1
        code = (f"import os, time\nos.sched_setaffinity(0, {{{core}}})\nend = time.time() + {seconds}\n"
                "while time.time() < end: pass\n")  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-c", code])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_case(name: str, rounds: int, load_s: dict[str, float] | None) -> dict[str, Any]:
    """Alternate baseline and trial ``rounds`` times; with ``load_s`` (seconds per config, from the quiet run), a
    busy loop on the other core for the first half of each trial."""
    from wus_tune.config import TrainConfig
    from wus_tune.trainer import fit

    raw, changes = cases()[name]
    baseline = TrainConfig.from_dict(raw)
    trial = baseline.replace(changes)
    fit(baseline.replace({"epochs": 1}))  # import and first-call costs out of the first pair
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "trial": []}
    for _ in range(rounds):
        for role, config in (("baseline", baseline), ("trial", trial)):
            load = BusyHalf(load_s[role] / 2) if load_s else None
            start = time.perf_counter()
            try:
                r = fit(config, relative_to=baseline)
            finally:
                if load:
                    load.stop()
            runs[role].append({"time_s": r.time_s, "relative_time": r.relative_time, "fit_wall_s": time.perf_counter() - start,
                               "coverage": r.coverage, "changed_steps": r.changed_steps})  # fmt: skip
    total = {role: {k: sum(run[k] for run in rs) for k in ("time_s", "relative_time", "fit_wall_s")} for role, rs in runs.items()}
    wall = total["trial"]["time_s"] / total["baseline"]["time_s"]
    relative = total["trial"]["relative_time"] / total["baseline"]["relative_time"]
    return {"case": name, "rounds": rounds, "wall_ratio": wall, "relative_ratio": relative, "error": relative / wall - 1,
            "coverage": min(r["coverage"] for r in runs["trial"]), "runs": runs,
            "seconds": {role: total[role]["fit_wall_s"] / rounds for role in total}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="all", help=f"comma-separated, of: {', '.join(cases())}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default="quiet,loaded")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "time_truth.json"))
    args = p.parse_args(argv)
    import torch

    import wus_tune.testing  # noqa: F401  (registers the slow methods)

    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(cases()) if args.cases == "all" else args.cases.split(",")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    results: dict[str, list[dict[str, Any]]] = {}
    quiet: dict[str, dict[str, Any]] = {}
    for mode in args.modes.split(","):
        results[mode] = []
        for name in names:
            load_s = quiet[name]["seconds"] if mode == "loaded" else None
            if mode == "loaded" and name not in quiet:
                raise SystemExit("loaded mode needs the quiet mode first (--modes quiet,loaded)")
            row = run_case(name, args.rounds, load_s)
            if mode == "quiet":
                quiet[name] = row
            else:
                row["vs_quiet"] = row["relative_ratio"] / quiet[name]["relative_ratio"] - 1
            results[mode].append(row)
            extra = f"  vs quiet {row['vs_quiet']:+.1%}" if "vs_quiet" in row else ""
            print(f"{mode:<7} {name:<22} wall {row['wall_ratio']:6.2f}x  relative {row['relative_ratio']:6.2f}x  "
                  f"error {row['error']:+.1%}  coverage {row['coverage']:.2f}{extra}", flush=True)  # fmt: skip
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
