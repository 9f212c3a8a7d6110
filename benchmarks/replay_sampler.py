"""What a replayed trial tells the sampler (issue 24, item 5): the quickstart, 20 trials, sampler seeds
0-2, with ``reuse.replay`` on (trials that would never deviate are COMPLETE with the baseline's values,
not trained) and off (the same trials trained for real). Objectives accuracy and FLOPs: both exact, so the
comparison does not depend on the machine's load.

If the replayed values are what training would have produced, the sampler sees the same numbers either
way, asks the same parameters, and the two arms reach the same hypervolume; replay only saves the compute.

    python benchmarks/replay_sampler.py [--trials 20] [--seeds 0 1 2] [--out benchmarks/results/replay_sampler.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
DIRECTIONS = ("maximize", "minimize")


def run_arm(workdir: Path, *, replay: bool, seed: int, trials: int) -> dict:
    import optuna
    import yaml

    from wus_tune.study import StudySpec, run_study

    raw = yaml.safe_load((ROOT / "studies" / "quickstart-digits.yaml").read_text())
    name = f"replay-{'on' if replay else 'off'}-s{seed}"
    storage = f"sqlite:///{workdir / (name + '.db')}"
    raw.update(name=name, objectives="accuracy,cost", n_trials=trials, seed=seed, storage=storage, tracking_uri="none",
               reuse={"replay": replay})  # fmt: skip
    spec = StudySpec.from_dict(raw)
    cwd = os.getcwd()
    os.chdir(workdir)
    start = time.perf_counter()
    try:
        run_study(spec, echo=None, worker=True)
    finally:
        os.chdir(cwd)
    wall = time.perf_counter() - start
    rows = []
    for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
        result = t.user_attrs.get("result") or {}
        rows.append({"number": t.number, "state": t.state.name, "params": t.params,
                     "values": list(t.values) if t.values else None, "replayed": t.user_attrs.get("reused") == "baseline",
                     "trained_flops": 0.0 if t.user_attrs.get("reused") == "baseline" else float(result.get("cost_flops") or 0.0)})  # fmt: skip
    return {"replay": replay, "seed": seed, "wall_s": wall, "trials": rows}


def main() -> None:
    from wus_tune.pareto import hypervolume

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "replay_sampler.json"))
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for replay in (True, False):
                runs.append(run_arm(Path(tmp), replay=replay, seed=seed, trials=args.trials))
    base_flops = max(r["values"][1] for run in runs for r in run["trials"] if r["values"])
    reference = (0.0, 1.05 * base_flops)
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print("| sampler seed | replay | replayed trials | same params as replay off | hypervolume | FLOPs charged to trained trials | wall s |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        done = [tuple(r["values"]) for r in run["trials"] if r["state"] == "COMPLETE"]
        run["hypervolume"] = hypervolume(done, DIRECTIONS, reference)
        twin = next(o for o in runs if o["seed"] == run["seed"] and o["replay"] != run["replay"])
        same = sum(a["params"] == b["params"] for a, b in zip(run["trials"], twin["trials"]))
        print(f"| {run['seed']} | {'on' if run['replay'] else 'off'} | {sum(r['replayed'] for r in run['trials'])} | "
              f"{same}/{len(run['trials'])} | {run['hypervolume']:.4e} | "
              f"{sum(r['trained_flops'] for r in run['trials']):.3e} | {run['wall_s']:.0f} |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"reference": reference, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
