"""Pareto-aware early stopping: hypervolume against compute, with and without the pruner.

    python benchmarks/pruning.py [--trials 25] [--seeds 0,1,2] [--samplers tpe,random] [--pruners none,pareto]
                                 [--width W] [--epochs E] [--rerun 3] [--out benchmarks/results/pruning_digits.json]
    python benchmarks/pruning.py --report A.json [B.json ...]      # the table of one or more runs
    python benchmarks/pruning.py --variants A.json [B.json ...]    # variants of the rule replayed on their curves

On the digits quickstart (``studies/quickstart-digits.yaml``: MLP width 4 depth 3, 40 epochs) with the
objectives accuracy,cost (FLOPs do not depend on the machine's load; training seconds are reported too):

* 4 settings x the sampler seeds: TPE (the quickstart's ``n_startup_trials: 8``) and random sampling (TPE
  with ``n_startup_trials`` above the trial count: Optuna's RandomSampler draws every trial), each with
  ``pruner: none`` and ``pruner: pareto``. The training seed is the same everywhere, so every study's
  baseline is the same run and one reference point (baseline - 5 points, baseline cost x 1.25) serves all.
* compute spent = the training FLOPs (and seconds) of every epoch every trial ran, pruned ones included.
* hypervolume of the COMPLETE trials, after each trial, against the compute spent so far.
* re-runs: up to ``--rerun`` pruned trials of each pruned study, trained to completion from their stored
  config (same seed: the run they would have been); a false prune is one whose completed values would be
  on that study's final front.
* replay: the rule applied, trial by trial in order, to the full per-epoch curves of each *unpruned*
  study (no training): which of those trials it would have stopped, how many of them are on that study's
  final front (a second false-prune rate, on every trial), and the hypervolume and compute left.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = ("accuracy", "cost")
DIRECTIONS = ("maximize", "minimize")


def quickstart(name: str, *, sampler_seed: int, random: bool, pruner: str, trials: int, storage: str,
               train: dict[str, Any], spec: str = str(ROOT / "studies" / "quickstart-digits.yaml")) -> Any:  # fmt: skip
    import yaml

    from wus_tune._study.spec import StudySpec

    raw = yaml.safe_load(Path(spec).read_text())
    data = raw.get("train", {}).get("data", {})
    if data.get("data_dir"):  # the study runs in a scratch directory: resolve a path relative to where we started
        data["data_dir"] = str(Path(data["data_dir"]).resolve())
    for dotted, value in train.items():  # --width / --epochs: the quickstart made cheaper for a shared CPU
        node = raw["train"]
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    raw.update(name=name, objectives=",".join(OBJECTIVES), n_trials=trials, seed=sampler_seed, storage=storage,
               tracking_uri="none", pruner=pruner)  # fmt: skip
    if random:
        raw["sampler_options"] = {"n_startup_trials": 10**6}
    return StudySpec.from_dict(raw, spec)


class Recorder:
    """``fit`` for run_study that also keeps every trial's per-epoch values (pruned trials included)."""

    def __init__(self) -> None:
        self.curves: dict[int, list[dict[str, float]]] = {}

    def __call__(self, config: Any, *, on_epoch: Any = None, **kw: Any) -> Any:
        from wus_tune.trainer import fit

        number = int(config.meta["trial"])
        curve = self.curves.setdefault(number, [])

        def record(r: Any) -> None:
            curve.append({"epoch": r.epoch, "acc": r.val_acc if r.val_acc is not None else r.train_acc,
                          "flops": r.flops, "train_s": r.train_time_s})  # fmt: skip
            if on_epoch is not None:
                on_epoch(r)

        return fit(config, on_epoch=record, **kw)


def hv(points: list[tuple[float, float]], reference: tuple[float, ...]) -> float:
    from wus_tune.pareto import hypervolume

    return hypervolume(points, DIRECTIONS, reference)


def run_one(workdir: Path, label: str, *, seed: int, random: bool, pruner: str, trials: int,
            train: dict[str, Any], spec: str) -> dict[str, Any]:  # fmt: skip
    import optuna

    from wus_tune.study import run_study

    name = f"{label}-s{seed}"
    storage = f"sqlite:///{workdir / (name + '.db')}"
    rec = Recorder()
    spec_ = quickstart(name, sampler_seed=seed, random=random, pruner=pruner, trials=trials, storage=storage,
                       train=train, spec=spec)  # fmt: skip
    start = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(workdir)  # the baseline's fork snapshots go to studies/<name>/ there, not into the repository
    try:
        run_study(spec_, fit=rec, echo=None, worker=True)  # worker: no report files or plots, the trials only
    finally:
        os.chdir(cwd)
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=storage)
    rows = []
    for t in study.get_trials(deepcopy=False):
        curve = rec.curves.get(t.number, [])
        rows.append({
            "number": t.number, "state": t.state.name, "role": t.user_attrs.get("role"),
            "values": list(t.values) if t.values else None, "config": t.user_attrs.get("config"),
            "epochs": (t.user_attrs.get("config") or {}).get("epochs"),
            "pruned_at": (t.user_attrs.get("pruned") or {}).get("epoch"),
            "flops": sum(c["flops"] for c in curve), "train_s": sum(c["train_s"] for c in curve), "curve": curve,
        })  # fmt: skip
    return {"label": label, "seed": seed, "random": random, "pruner": pruner, "wall_s": wall, "trials": rows}


def summarise(run: dict[str, Any], reference: tuple[float, ...]) -> dict[str, Any]:
    done: list[tuple[float, float]] = []
    flops = secs = 0.0
    history = []
    for r in run["trials"]:
        flops += r["flops"]
        secs += r["train_s"]
        if r["state"] == "COMPLETE":
            done.append(tuple(r["values"]))  # type: ignore[arg-type]
        history.append((flops, secs, hv(done, reference)))
    states = [r["state"] for r in run["trials"]]
    return {"hv": history[-1][2] if history else 0.0, "flops": flops, "train_s": secs, "history": history,
            "n_pruned": states.count("PRUNED"), "n_complete": states.count("COMPLETE")}  # fmt: skip


def on_front(values: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    from wus_tune.pareto import dominates

    return not any(dominates(o, values, DIRECTIONS) for o in others)


def decide_splitting_ties(candidate: int, points: list[tuple[float, float]], *, eta: int, tolerance: Any = None) -> Any:
    """The rule without tie groups (for comparison only): fronts, then the epsilon-net on the points
    themselves, so identical points are split by their order (trial number)."""
    from types import SimpleNamespace

    from wus_tune._study.pruning import epsilon_net_order, nondominated_fronts

    fronts = nondominated_fronts(points)
    scale = tuple((max(p[k] for p in points) - min(p[k] for p in points)) or 1.0 for k in range(2))
    order = []
    for level in range(max(fronts) + 1):
        members = [i for i, f in enumerate(fronts) if f == level]
        order += [members[j] for j in epsilon_net_order([points[i] for i in members], scale)]  # type: ignore[arg-type]
    n = len(points)
    return SimpleNamespace(keep=n < eta or order.index(candidate) < math.ceil(n / eta))


def replay(run: dict[str, Any], settings: Any, reference: tuple[float, ...], *, split_ties: bool = False) -> dict[str, Any]:
    """The pruner's rule applied in trial order to the full curves of an unpruned study."""
    from wus_tune._study.pruning import ParetoPruner, decide, rung_epochs, rung_tolerance

    if split_ties:
        decide = decide_splitting_ties  # noqa: F811

    pruner = ParetoPruner(settings, OBJECTIVES)
    reached: dict[tuple[int, int], list[tuple[float, float]]] = {}  # (epochs, rung) -> points
    stopped: dict[int, int] = {}
    flops = 0.0
    for r in run["trials"]:
        curve, epochs = r["curve"], r["epochs"]
        cut = len(curve)
        cost = 0.0
        for c in curve:
            cost += c["flops"]
            if epochs is None or c["epoch"] not in rung_epochs(epochs, eta=settings.eta, min_epochs=settings.min_epochs):
                continue
            point = (-c["acc"], cost)
            cohort = reached.setdefault((epochs, c["epoch"]), [])
            cohort.append(point)
            if pruner.protected(r["role"] or "search"):
                continue
            tol = rung_tolerance([p[1] for p in cohort], pruner.relative_tolerance)
            if not decide(len(cohort) - 1, cohort, eta=settings.eta, tolerance=tol).keep:
                stopped[r["number"]] = c["epoch"]
                cut = c["epoch"]
                break
        flops += sum(c["flops"] for c in curve[:cut])
    complete = [r for r in run["trials"] if r["state"] == "COMPLETE"]
    all_values = [tuple(r["values"]) for r in complete]
    kept = [tuple(r["values"]) for r in complete if r["number"] not in stopped]
    false = [n for n in stopped if on_front(tuple(next(r for r in complete if r["number"] == n)["values"]),
                                            [v for r in complete if r["number"] != n for v in [tuple(r["values"])]])]  # fmt: skip
    return {"stopped": len(stopped), "false_prunes": len(false), "false_numbers": sorted(false),
            "hv_kept": hv(kept, reference), "hv_full": hv(all_values, reference), "flops_kept": flops,
            "flops_full": sum(r["flops"] for r in run["trials"]),
            "search_on_front": sum(1 for r in complete if r["role"] == "search"
                                   and on_front(tuple(r["values"]), [v for v in all_values if v != tuple(r["values"])]))}  # fmt: skip


def rerun(run: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Train up to ``count`` of the study's pruned trials to completion; on the final front or not."""
    from wus_tune.config import TrainConfig
    from wus_tune.pareto import objective_values
    from wus_tune.trainer import fit

    pruned = [r for r in run["trials"] if r["state"] == "PRUNED"]
    if not pruned:
        return []
    step = max(1, len(pruned) // count)
    picked = pruned[::step][:count]
    others = [tuple(r["values"]) for r in run["trials"] if r["state"] == "COMPLETE"]
    out = []
    for r in picked:
        result = fit(TrainConfig.from_dict(r["config"]))
        values = tuple(objective_values(result, OBJECTIVES)[k] for k in OBJECTIVES)
        out.append({"number": r["number"], "pruned_at": r["pruned_at"], "values": list(values),
                    "on_front": on_front(values, others)})  # fmt: skip
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "studies" / "quickstart-digits.yaml"),
                   help="the study (benchmarks/specs/vgg11-cifar10-subset.yaml: the CIFAR-10 subset)")
    p.add_argument("--trials", type=int, default=25, help="trials per study (the 5 enqueued ones included)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--samplers", default="tpe,random")
    p.add_argument("--pruners", default="none,pareto", help="for random sampling, 'pareto' is also derived by replay")
    p.add_argument("--width", type=float, help="model.width (the quickstart's: 4)")
    p.add_argument("--epochs", type=int, help="epochs (the quickstart's: 40)")
    p.add_argument("--rerun", type=int, default=3, help="pruned trials re-run to completion per pruned study")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pruning_digits.json"))
    args = p.parse_args()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    from wus_tune._study.pruning import PrunerSettings
    from wus_tune.pareto import reference_point

    train = {k: v for k, v in (("model.width", args.width), ("epochs", args.epochs)) if v is not None}
    seeds = [int(s) for s in args.seeds.split(",")]
    load = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="wus_tune_pruning_") as tmp:
        work = Path(tmp)
        for seed in seeds:
            for label in args.samplers.split(","):
                for pruner in args.pruners.split(","):
                    run = run_one(work, f"{label}-{pruner}", seed=seed, random=label == "random", pruner=pruner,
                                  trials=args.trials, train=train, spec=args.spec)  # fmt: skip
                    runs.append(run)
                    print(f"{label:>6} {pruner:>6} seed {seed}: {sum(r['state'] == 'PRUNED' for r in run['trials'])} pruned, "
                          f"{run['wall_s']:.0f} s", flush=True)  # fmt: skip
    baseline = next(r for r in runs[0]["trials"] if r["role"] == "baseline")["values"]
    reference = reference_point(baseline, OBJECTIVES)
    settings = PrunerSettings()
    table = []
    for run in runs:
        s = summarise(run, reference)
        entry = {k: run[k] for k in ("label", "seed", "random", "pruner", "wall_s")} | {k: v for k, v in s.items() if k != "history"}
        entry["history"] = s["history"]
        if run["pruner"] == "none":
            entry["replay"] = replay(run, settings, reference)
        else:
            entry["reruns"] = rerun(run, args.rerun)
            entry["pruned_numbers"] = [t["number"] for t in run["trials"] if t["state"] == "PRUNED"]
        table.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "history"}), flush=True)
    out = {"spec": args.spec, "reference": reference, "baseline": baseline, "settings": settings.to_dict(), "trials": args.trials,
           "train": train, "seeds": seeds, "threads": torch.get_num_threads(), "load_before": load,
           "load_after": os.getloadavg(), "runs": table,
           "curves": {f"{r['label']}-s{r['seed']}": [{k: t[k] for k in ("number", "state", "role", "values", "pruned_at", "curve")}
                                                     for t in r["trials"]] for r in runs}}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    report([out])
    return 0


def report(outs: list[dict[str, Any]]) -> None:
    """The figures for docs/benchmarks.md: per setting, mean over seeds. Random sampling with the pruner
    comes from the replay of the unpruned random studies when it was not run (random sampling draws the
    same parameters whatever happens to earlier trials, and training is seeded: the replay is that study)."""
    import statistics as st

    runs = [e for out in outs for e in out["runs"]]
    by: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for e in runs:
        by.setdefault((e["label"].split("-")[0], e["pruner"]), {})[e["seed"]] = e
    for seed, e in list(by.get(("random", "none"), {}).items()):
        r = e["replay"]
        by.setdefault(("random", "pareto (replay)"), {})[seed] = {
            "hv": r["hv_kept"], "flops": r["flops_kept"], "train_s": float("nan"), "n_pruned": r["stopped"],
            "false": (r["false_prunes"], r["stopped"])}  # fmt: skip
    out0 = outs[0]
    print(f"reference point {out0['reference']}; {out0['trials']} trials per study; train overrides {out0.get('train')}")
    print("sampler pruner            seeds  HV (mean)  HV/unpruned  FLOPs/unpruned  time/unpruned  pruned  false prunes")
    for (sampler, pruner), rows in sorted(by.items()):
        base = by.get((sampler, "none"), {})
        seeds = sorted(s for s in rows if s in base)
        hv_ratio = st.mean(rows[s]["hv"] / base[s]["hv"] for s in seeds if base[s]["hv"])
        flop_ratio = st.mean(rows[s]["flops"] / base[s]["flops"] for s in seeds)
        time_ratio = st.mean(rows[s]["train_s"] / base[s]["train_s"] for s in seeds)
        reruns = [x for s in seeds for x in rows[s].get("reruns", [])]
        if reruns:
            fp = f"{sum(x['on_front'] for x in reruns)}/{len(reruns)} re-run"
        elif any("false" in rows[s] for s in seeds):
            fp = f"{sum(rows[s]['false'][0] for s in seeds)}/{sum(rows[s]['false'][1] for s in seeds)} (all)"
        else:
            fp = "-"
        print(f"{sampler:>7} {pruner:<17} {len(seeds):>5}  {st.mean(rows[s]['hv'] for s in seeds):9.4g}  {hv_ratio:11.3f}  "
              f"{flop_ratio:14.3f}  {time_ratio:13.3f}  {st.mean(rows[s]['n_pruned'] for s in seeds):6.1f}  {fp}")  # fmt: skip
    reps = [e["replay"] for e in runs if "replay" in e]
    if reps:
        stopped = sum(r["stopped"] for r in reps)
        false = sum(r["false_prunes"] for r in reps)
        print(f"replay on every unpruned study: {stopped} trials stopped, {false} of them on their study's final front; "
              f"HV kept {st.mean(r['hv_kept'] / r['hv_full'] for r in reps if r['hv_full']):.3f}, "
              f"FLOPs {st.mean(r['flops_kept'] / r['flops_full'] for r in reps):.3f} of the full study")  # fmt: skip


def variants(paths: list[str]) -> None:
    """Replay variants of the rule on the unpruned studies' curves (no training): eta, min_epochs, and
    the tie groups switched off (identical runs split by trial number, as a plain equal-epoch rule does)."""
    from wus_tune._study.pruning import PrunerSettings

    outs = [json.loads(Path(p).read_text()) for p in paths]
    cases = [("eta 3, min_epochs 2 (default)", PrunerSettings(), False), ("eta 2", PrunerSettings(eta=2), False),
             ("eta 4, min_epochs 1", PrunerSettings(eta=4, min_epochs=1), False),
             ("eta 3, ties split", PrunerSettings(), True), ("eta 4, min_epochs 1, ties split", PrunerSettings(eta=4, min_epochs=1), True)]  # fmt: skip
    print("variant                          studies  stopped  of them on the final front  search trials on the fronts  "
          "of them stopped  HV kept  FLOPs kept")  # fmt: skip
    for name, settings, split in cases:
        rows = []
        for out in outs:
            reference = tuple(out["reference"])
            for label, trials in out["curves"].items():
                if "-none-" not in label:
                    continue
                full = [dict(t, epochs=len(t["curve"]), flops=sum(c["flops"] for c in t["curve"])) for t in trials]
                r = replay({"trials": full}, settings, reference, split_ties=split)
                front_search = {t["number"] for t in full if t["state"] == "COMPLETE" and t["role"] == "search"
                                and on_front(tuple(t["values"]), [tuple(o["values"]) for o in full
                                                                  if o["state"] == "COMPLETE" and o is not t])}  # fmt: skip
                rows.append((r, front_search))
        stopped = sum(r["stopped"] for r, _ in rows)
        false = sum(r["false_prunes"] for r, _ in rows)
        fs = sum(len(f) for _, f in rows)
        lost = sum(len(f & set(r["false_numbers"])) for r, f in rows)
        hv_kept = sum(r["hv_kept"] / r["hv_full"] for r, _ in rows) / len(rows)
        fl_kept = sum(r["flops_kept"] / r["flops_full"] for r, _ in rows) / len(rows)
        print(f"{name:<33} {len(rows):>7}  {stopped:>7}  {false:>26}  {fs:>27}  {lost:>15}  {hv_kept:7.3f}  {fl_kept:10.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--variants":  # --variants A.json ...: the rule's variants replayed
        variants(sys.argv[2:])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--report":  # --report A.json [B.json ...]: the table of several runs
        report([json.loads(Path(a).read_text()) for a in sys.argv[2:]])
        sys.exit(0)
    sys.exit(main())
