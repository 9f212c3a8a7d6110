"""What a study costs with and without learning from its own baseline (replay, fork, calibration).

    python benchmarks/study_cost.py [--spec studies/quickstart-digits.yaml] [--trials 24] [--seeds 0,1,2]
                                    [--modes off,replay+fork,all] [--objectives accuracy,cost] [--out FILE.json]

Runs the same study once per mode and sampler seed, each in a fresh directory (SQLite Optuna storage,
MLflow off), and reports per study:

* compute: the summed wall time of the ``fit`` calls that ran (a reused trial runs none, a forked one
  only its suffix) and the summed FLOPs they executed (training plus the evaluations each run needed;
  a fork's prefix is not counted, it was the baseline's);
* the share of WUS trials that never skip (reused, or trained without a single skip step), and of
  those that were *trained* all the same;
* the final hypervolume (``accuracy,cost`` by default: FLOPs do not depend on the machine's load, and
  on the CPU training is deterministic, so the modes' fronts are comparable point for point).

Modes: ``off`` (``reuse: {replay: false, fork: false, calibrate: false}``), ``replay+fork`` (the same
search space: the same trials, so the same front, at less compute), ``all`` (calibration too: another
search space, so other trials).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = {
    "off": {"replay": False, "fork": False, "calibrate": False},
    "replay+fork": {"replay": True, "fork": True, "calibrate": False},
    "all": {"replay": True, "fork": True, "calibrate": True},
    "all+pareto": {"replay": True, "fork": True, "calibrate": True},  # with the Pareto-aware pruner (issue 11)
}
PRUNER = {"all+pareto": "pareto"}


def run_one(spec_path: str, mode: str, seed: int, trials: int, objectives: str, workdir: Path) -> dict:
    import yaml

    from wus_tune._study.spec import StudySpec
    from wus_tune.study import run_study

    raw = yaml.safe_load(Path(spec_path).read_text())
    name = f"{raw.get('name', 'study')}-{mode}-{seed}"
    raw |= {"name": name, "n_trials": trials, "seed": seed, "objectives": objectives, "tracking_uri": "none",
            "storage": f"sqlite:///{workdir}/{name}.db", "reuse": MODES[mode], "pruner": PRUNER.get(mode, "none")}  # fmt: skip
    data = raw.get("train", {}).get("data", {})
    if data.get("data_dir"):  # the study runs in workdir: a data path relative to where we started must not break
        data["data_dir"] = str(Path(data["data_dir"]).resolve())
    spec = StudySpec.from_dict(raw, spec_path)
    start = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(workdir)  # the baseline's snapshots go to studies/<name>/ here
    try:
        outcome = run_study(spec, echo=None, report_dir=workdir / "report" / name)
    finally:
        os.chdir(cwd)
    wall = time.perf_counter() - start
    cands = [c for c in outcome.analysis.candidates if c.state == "COMPLETE"]
    pruned = [c for c in outcome.analysis.candidates if c.state == "PRUNED"]
    wus = [c for c in cands if c.uses_method and "wus" in ((c.config or {}).get("methods") or {})]
    res = lambda c: c.attrs.get("result") or {}  # noqa: E731
    never = [c for c in wus if c.attrs.get("reused") or not res(c).get("changed_step_fraction")]
    trained_never = [c for c in never if not c.attrs.get("reused")]
    ck = next((c.attrs.get("reuse_checkpoints") for c in cands if c.role == "baseline"), None) or {}
    return {
        "mode": mode, "seed": seed, "trials": len(cands), "wall_s": wall,
        "fit_s": sum(float(res(c).get("fit_s", 0.0)) for c in cands),
        # a pruned trial has no result: its FLOPs up to the rung that stopped it (a fork's prefix included,
        # so an upper bound) are the last point of its stored curve
        "compute_flops": sum(float(res(c).get("compute_flops", res(c).get("cost_flops", 0.0))) for c in cands)
        + sum(float((c.attrs.get("epoch_values") or [[0, 0, 0]])[-1][2]) for c in pruned),
        "pruned": len(pruned),
        "wus_trials": len(wus), "never_skip": len(never), "trained_never_skip": len(trained_never),
        "reused": sum(1 for c in cands if c.attrs.get("reused")),
        "forked": sum(1 for c in cands if c.attrs.get("forked")),
        "hypervolume": outcome.analysis.hv_history[-1][1] if outcome.analysis.hv_history else None,
        "front": sorted(outcome.analysis.front),
        "checkpoint_bytes": ck.get("bytes", 0), "checkpoints": len(ck.get("points", [])),
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(Path(__file__).resolve().parent.parent / "studies" / "quickstart-digits.yaml"))
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--modes", default="off,replay+fork,all")
    p.add_argument("--objectives", default="accuracy,cost")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory(prefix="wus_tune_cost_") as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for mode in args.modes.split(","):
                row = run_one(args.spec, mode, seed, args.trials, args.objectives, Path(tmp))
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print("| mode | studies | trials | fit time (s) | FLOPs | vs off | WUS trials never skipping | trained, never skipping | reused | forked | pruned | hypervolume |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    off = [r for r in rows if r["mode"] == "off"]
    for mode in args.modes.split(","):
        rs = [r for r in rows if r["mode"] == mode]
        flops = statistics.fmean(r["compute_flops"] for r in rs)
        rel = f"{flops / statistics.fmean(r['compute_flops'] for r in off) - 1:+.0%}" if off else ""
        print(f"| {mode} | {len(rs)} | {rs[0]['trials']} | {statistics.fmean(r['fit_s'] for r in rs):.1f} | {flops:.3g} | {rel} | "
              f"{sum(r['never_skip'] for r in rs)}/{sum(r['wus_trials'] for r in rs)} | "
              f"{sum(r['trained_never_skip'] for r in rs)} | {sum(r['reused'] for r in rs)} | {sum(r['forked'] for r in rs)} | "
              f"{sum(r.get('pruned', 0) for r in rs)} | "
              f"{statistics.fmean(r['hypervolume'] for r in rs):.4g} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
