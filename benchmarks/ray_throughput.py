"""Ray against local workers: trials per minute for tiny trials with 4 trial slots, and what Ray adds per trial.

    python benchmarks/ray_throughput.py [--trials 40] [--slots 4] [--epochs 1]

Runs exactly what a user runs, one after the other, on the same tiny spec (MLP on ``digits``, ``--epochs``
epochs, local stores: the Journal file and a SQLite MLflow store, one torch thread per trial):

    python -m wus_tune.study --spec spec.yaml --devices cpu --workers 4 --n-trials 40
    python -m wus_tune.study --spec spec.yaml --ray local --workers 4 --cpus-per-trial <cores/4> --n-trials 40

(``--ray local`` starts a Ray cluster in the driver with this machine's cores; ``cores/4`` CPUs per trial
gives 4 slots.) Read back from the Optuna storage, for each:

* throughput: trials per minute from the first trial's start to the last one's completion, and the whole
  command's wall time (start-up, Ray's included, and the report);
* start-up: from the command's start to the first trial's start;
* per trial, means: training (``fit`` minus its MLflow logging), the machinery inside the trial, and the
  time between two consecutive trials of one worker process (for Ray: the task's return to the driver, the
  next task's dispatch, and the same ask / stale check / tell the local workers do).

What Ray adds per trial = its between-trial time minus the local workers'. The machine's load (``uptime``)
is printed before and after: on a shared 2-core machine every figure is inflated by contention.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(name: str, cmd: list[str], work: Path, env: dict[str, str]) -> dict[str, float] | None:
    import optuna

    from wus_tune._study.storage import open_storage

    work.mkdir(parents=True)
    (work / "spec.yaml").write_text((work.parent / "spec.yaml").read_text())
    t0 = time.time()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    total = time.time() - t0
    if done.returncode != 0:
        print(f"{name}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return None
    trials = optuna.load_study(study_name="ray-bench", storage=open_storage(f"journal:///{work}/studies/ray-bench.journal")).trials
    ok = [t for t in trials if t.state.name == "COMPLETE"]
    first = min(t.datetime_start for t in trials).timestamp()
    last = max(t.datetime_complete for t in trials).timestamp()
    res = [t.user_attrs["result"] for t in ok]
    by_worker = defaultdict(list)
    for t in trials:
        by_worker[t.user_attrs.get("worker")].append(t)
    gaps = []
    for ts in by_worker.values():
        ts.sort(key=lambda t: t.datetime_start)
        gaps += [(b.datetime_start - a.datetime_complete).total_seconds() for a, b in zip(ts, ts[1:])]
    inside = [(t.datetime_complete - t.datetime_start).total_seconds() for t in ok]
    warm = [i - r["fit_s"] for t, i, r in zip(ok, inside, res) if r["fit_s"] < 5]  # a process's first fit imports and loads
    ray_line = re.search(r"per trial Ray added (\d+) ms", done.stdout)
    return {
        "complete": len(ok), "trials": len(trials), "processes": len(by_worker),
        "per_min": 60 * len(trials) / (last - first), "span_s": last - first, "total_s": total, "startup_s": first - t0,
        "fit_s": statistics.median(r["fit_s"] for r in res), "inside_s": statistics.median(warm) if warm else float("nan"),
        "between_s": statistics.median(gaps) if gaps else float("nan"),
        "between_mean_s": statistics.fmean(gaps) if gaps else float("nan"),
        "ray_round_trip_ms": float(ray_line.group(1)) if ray_line else float("nan"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    import yaml

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="wus_tune_ray_bench_"))
    spec = {"name": "ray-bench", "train": {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"},
                                           "epochs": args.epochs, "device": "cpu"},
            "baseline_fractions": [], "sampler_options": {"n_startup_trials": 10}}  # fmt: skip
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), MLFLOW_DISABLE_TELEMETRY="true",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # fmt: skip
    base = [sys.executable, "-m", "wus_tune.study", "--spec", "spec.yaml", "--n-trials", str(args.trials)]
    runs = {
        "local": base + ["--devices", "cpu", "--workers", str(args.slots)],
        "ray": base + ["--ray", "local", "--workers", str(args.slots), "--cpus-per-trial", f"{cores / args.slots:g}"],
    }
    print(f"load before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    figures = {}
    for name, cmd in runs.items():
        figures[name] = measure(name, cmd, work / name, env)
        if figures[name] is None:
            return 1
        print(f"load after {name}: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"\n{args.trials} tiny trials (MLP on digits, {args.epochs} epoch(s)), {args.slots} slots, {cores} CPU cores")
    rows = [
        ("trials COMPLETE / worker processes", lambda f: f"{f['complete']} / {f['processes']}"),
        ("throughput (first start to last completion)", lambda f: f"{f['per_min']:.1f} trials/min"),
        ("whole command", lambda f: f"{f['total_s']:.1f} s"),
        ("start-up (command start to first trial)", lambda f: f"{f['startup_s']:.1f} s"),
        ("training per trial (median)", lambda f: f"{f['fit_s']:.3f} s"),
        ("machinery inside a warm trial (median)", lambda f: f"{f['inside_s']:.3f} s"),
        ("between two trials of one process (median / mean)", lambda f: f"{f['between_s']:.3f} / {f['between_mean_s']:.3f} s"),
        ("Ray task round trip minus the trial (median, driver)", lambda f: "-" if f["ray_round_trip_ms"] != f["ray_round_trip_ms"] else f"{f['ray_round_trip_ms']:.0f} ms"),
    ]  # fmt: skip
    print(f"| | `--devices cpu --workers {args.slots}` | `--ray local --workers {args.slots}` |")
    print("|---|---|---|")
    for label, fmt in rows:
        print(f"| {label} | {fmt(figures['local'])} | {fmt(figures['ray'])} |")
    added = figures["ray"]["between_s"] - figures["local"]["between_s"]
    print(f"\nRay adds {added:+.3f} s per trial between trials (median); start-up {figures['ray']['startup_s']:.1f} s "
          f"with Ray against {figures['local']['startup_s']:.1f} s")
    for name, cmd in runs.items():
        print(f"  {name}: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
