"""Early stopping: hypervolume against compute, with and without a pruner (``frontier``, ``pareto``).

    python benchmarks/pruning.py [--spec S] [--trials 30] [--seeds 0,1,2] [--samplers tpe[,random]]
                                 [--pruners none,frontier] [--pruner-options '{"margin": 0.01}']
                                 [--width W] [--epochs E] [--rerun all|N] [--out benchmarks/results/pruning.json]
    python benchmarks/pruning.py --quick                           # the smoke run: tiny digits, one seed, 8 trials
    python benchmarks/pruning.py --report A.json [B.json ...]      # the table of one or more runs
    python benchmarks/pruning.py --variants A.json [B.json ...]    # pareto's variants replayed on their curves

Each setting (sampler x pruner) runs one study per sampler seed with the spec's own objectives (the
quickstart's and the CIFAR-10 subset's: accuracy,relative_time) and its reuse settings (replay, fork and
calibration on by default). The training seed is the same everywhere, so every study's baselines are
the same runs and one reference point (the first study's baseline - 5 points, its cost x 1.25) serves all.
Per study:

* compute = what the study executed: the training FLOPs and training seconds of every epoch every trial
  ran, pruned ones included, a fork's prefix (the baseline's, not trained again) and replayed trials (not
  trained) excluded. Reported in full baseline runs: FLOPs over the baseline's training FLOPs, seconds
  over its training seconds (the relative time of the study's compute; seconds: run it on a quiet machine).
* hypervolume of the COMPLETE trials in the study's objectives, after each trial, against compute so far;
  the final one; the one kept (pruner on / off, same sampler seed); the compute at which the study first
  reaches 95% of its own final hypervolume, and of the unpruned study's.
* false prunes: every stopped trial (``--rerun all``, the default; or the first N) trained to the end from
  its stored config (same seed: the run it would have been, priced against the same baseline); a false
  prune is one whose completed values would be on that study's final front.
* with ``pareto`` in ``--pruners``: its rule replayed on the unpruned studies' full curves too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = ("accuracy", "cost")  # pareto's replay judges FLOPs so far, as that rule does
DIRECTIONS = ("maximize", "minimize")
QUICK = {"model.width": 0.25, "epochs": 6}  # --quick: digits made tiny for a smoke run


def quickstart(name: str, *, sampler_seed: int, random: bool, pruner: str, trials: int, storage: str,
               train: dict[str, Any], spec: str = str(ROOT / "studies" / "quickstart-digits.yaml"),
               pruner_options: dict[str, Any] | None = None, objectives: str | None = None) -> Any:  # fmt: skip
    import yaml

    from wus_tune._study.spec import StudySpec

    raw = yaml.safe_load(Path(spec).read_text())
    data = raw.get("train", {}).get("data", {})
    if data.get("data_dir"):  # the study runs in a scratch directory: resolve a path relative to where we started
        data["data_dir"] = str(Path(data["data_dir"]).resolve())
    for dotted, value in train.items():  # --width / --epochs: the study made cheaper for a shared CPU
        node = raw["train"]
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    raw.update(name=name, n_trials=trials, seed=sampler_seed, storage=storage, tracking_uri="none", pruner=pruner,
               pruner_options=dict(pruner_options or {}) if pruner != "none" else {})  # fmt: skip
    if objectives:
        raw["objectives"] = objectives
    if random:
        raw["sampler_options"] = {"n_startup_trials": 10**6}
    return StudySpec.from_dict(raw, spec)


class Recorder:
    """``fit`` for run_study that also keeps every trial's per-epoch values (pruned trials included) and
    marks a fork's prefix epochs (the baseline's records, replayed to the hook, not trained again)."""

    def __init__(self) -> None:
        self.curves: dict[int, list[dict[str, Any]]] = {}
        self.reference: Any = None  # the baseline config every trial is priced against

    def __call__(self, config: Any, *, on_epoch: Any = None, **kw: Any) -> Any:
        from wus_tune.trainer import fit

        number = int(config.meta["trial"])
        curve = self.curves.setdefault(number, [])
        self.reference = kw.get("relative_to", self.reference)
        state = kw.get("resume_from")
        prefix = len(getattr(state, "records", None) or [])

        def record(r: Any) -> None:
            curve.append({"epoch": r.epoch, "acc": r.val_acc if r.val_acc is not None else r.train_acc,
                          "flops": r.flops, "train_s": r.train_time_s, "prefix": len(curve) < prefix})  # fmt: skip
            if on_epoch is not None:
                on_epoch(r)

        return fit(config, on_epoch=record, **kw)


def hv(points: list[tuple[float, float]], reference: tuple[float, ...]) -> float:
    from wus_tune.pareto import hypervolume

    return hypervolume(points, DIRECTIONS, reference)


def run_one(workdir: Path, label: str, *, seed: int, random: bool, pruner: str, trials: int,
            train: dict[str, Any], spec: str, pruner_options: dict[str, Any] | None = None,
            objectives: str | None = None) -> dict[str, Any]:  # fmt: skip
    import optuna

    from wus_tune.study import run_study

    name = f"{label}-s{seed}"
    storage = f"sqlite:///{workdir / (name + '.db')}"
    rec = Recorder()
    spec_ = quickstart(name, sampler_seed=seed, random=random, pruner=pruner, trials=trials, storage=storage,
                       train=train, spec=spec, pruner_options=pruner_options, objectives=objectives)  # fmt: skip
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
        ran = [c for c in curve if not c["prefix"]]
        rows.append({
            "number": t.number, "state": t.state.name, "role": t.user_attrs.get("role"),
            "values": list(t.values) if t.values else None, "config": t.user_attrs.get("config"),
            "epochs": (t.user_attrs.get("config") or {}).get("epochs"),
            "pruned_at": (t.user_attrs.get("pruned") or {}).get("epoch"),
            "projection": t.user_attrs.get("pruner_projection"), "reused": bool(t.user_attrs.get("reused")),
            "forked": bool(t.user_attrs.get("forked")),
            "flops": sum(c["flops"] for c in ran), "train_s": sum(c["train_s"] for c in ran), "curve": curve,
        })  # fmt: skip
    objectives_ = tuple(spec_.resolve().objectives)
    reference = rec.reference.to_dict() if rec.reference is not None else None
    return {"label": label, "seed": seed, "random": random, "pruner": pruner, "pruner_options": pruner_options or {},
            "objectives": objectives_, "wall_s": wall, "trials": rows, "reference_config": reference}  # fmt: skip


def baseline_totals(run: dict[str, Any]) -> tuple[float, float]:
    """(training FLOPs, training seconds) of the study's first full-length baseline run."""
    b = next(r for r in run["trials"] if r["role"] == "baseline" and r["state"] == "COMPLETE")
    return sum(c["flops"] for c in b["curve"]), sum(c["train_s"] for c in b["curve"])


def summarise(run: dict[str, Any], reference: tuple[float, ...]) -> dict[str, Any]:
    """Compute (in baseline runs) and hypervolume after each trial; the final figures."""
    base_flops, base_s = baseline_totals(run)
    done: list[tuple[float, float]] = []
    flops = secs = 0.0
    history = []
    for r in run["trials"]:
        flops += r["flops"]
        secs += r["train_s"]
        if r["state"] == "COMPLETE":
            done.append(tuple(r["values"][:2]))  # type: ignore[arg-type]
        history.append((flops / base_flops, secs / base_s if base_s else math.nan, hv(done, reference)))
    states = [r["state"] for r in run["trials"]]
    return {"hv": history[-1][2] if history else 0.0, "flops": flops, "train_s": secs,
            "compute_runs_flops": flops / base_flops, "compute_runs_time": secs / base_s if base_s else math.nan,
            "history": history, "n_pruned": states.count("PRUNED"), "n_complete": states.count("COMPLETE"),
            "n_reused": sum(r["reused"] for r in run["trials"]), "n_forked": sum(r["forked"] for r in run["trials"])}  # fmt: skip


def compute_to_reach(history: list[tuple[float, float, float]], target: float) -> tuple[float, float] | None:
    """(compute in baseline runs by FLOPs, by seconds) when the hypervolume first reaches ``target``."""
    for flops, secs, h in history:
        if h >= target - 1e-15 and target > 0:
            return flops, secs
    return None


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


def rerun(run: dict[str, Any], count: int | None) -> list[dict[str, Any]]:
    """Train the study's stopped trials to the end (all, or the first ``count``), priced against the same
    baseline; each on that study's final front or not."""
    from wus_tune.config import TrainConfig
    from wus_tune.pareto import objective_values
    from wus_tune.trainer import fit

    pruned = [r for r in run["trials"] if r["state"] == "PRUNED"]
    picked = pruned if count is None else pruned[:count]
    names = tuple(run["objectives"])
    reference = TrainConfig.from_dict(run["reference_config"]) if run.get("reference_config") else None
    others = [tuple(r["values"][:2]) for r in run["trials"] if r["state"] == "COMPLETE"]
    out = []
    for r in picked:
        result = fit(TrainConfig.from_dict(r["config"]), relative_to=reference)
        values = tuple(objective_values(result, names)[k] for k in names[:2])
        out.append({"number": r["number"], "pruned_at": r["pruned_at"], "values": list(values),
                    "projection": r.get("projection"), "on_front": on_front(values, others)})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "studies" / "quickstart-digits.yaml"),
                   help="the study (benchmarks/specs/vgg11-cifar10-subset.yaml: the CIFAR-10 subset)")
    p.add_argument("--trials", type=int, default=30, help="trials per study (the enqueued ones included)")
    p.add_argument("--seeds", default="0,1,2", help="sampler seeds")
    p.add_argument("--samplers", default="tpe", help="tpe, random (TPE drawing every trial at random)")
    p.add_argument("--pruners", default="none,frontier", help="none, frontier, pareto")
    p.add_argument("--pruner-options", default="{}", help="JSON, for every pruner but none (e.g. '{\"margin\": 0.02}')")
    p.add_argument("--objectives", help="override the spec's objectives (e.g. accuracy,cost)")
    p.add_argument("--width", type=float, help="model.width")
    p.add_argument("--epochs", type=int, help="epochs")
    p.add_argument("--rerun", default="all", help="stopped trials trained to the end per study: all or a number")
    p.add_argument("--quick", action="store_true", help="smoke run: digits at width 0.25, 6 epochs, 8 trials, seed 0")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pruning.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    from wus_tune._study.pruning import PrunerSettings
    from wus_tune.pareto import reference_point

    train = {k: v for k, v in (("model.width", args.width), ("epochs", args.epochs)) if v is not None}
    if args.quick:
        train = QUICK | train
        args.trials, args.seeds = min(args.trials, 8), "0"
    try:
        options = json.loads(args.pruner_options)
        rerun_count = None if args.rerun == "all" else int(args.rerun)
    except ValueError as e:
        print(f"pruning.py: bad --pruner-options or --rerun: {e}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    pruners = args.pruners.split(",")
    load = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="wus_tune_pruning_") as tmp:
        work = Path(tmp)
        for seed in seeds:
            for label in args.samplers.split(","):
                for pruner in pruners:
                    run = run_one(work, f"{label}-{pruner}", seed=seed, random=label == "random", pruner=pruner,
                                  trials=args.trials, train=train, spec=args.spec, objectives=args.objectives,
                                  pruner_options=options if pruner == "frontier" else {})  # fmt: skip
                    runs.append(run)
                    print(f"{label:>6} {pruner:>8} seed {seed}: {sum(r['state'] == 'PRUNED' for r in run['trials'])} pruned, "
                          f"{run['wall_s']:.0f} s", flush=True)  # fmt: skip
    first = [r for r in runs[0]["trials"] if r["role"] == "baseline" and r["state"] == "COMPLETE"]
    baseline = [statistics.median(r["values"][k] for r in first) for k in range(2)]
    reference = reference_point(baseline, runs[0]["objectives"][:2])
    table = []
    for run in runs:
        s = summarise(run, reference)
        entry = {k: run[k] for k in ("label", "seed", "random", "pruner", "pruner_options", "objectives", "wall_s")}
        entry |= s
        if run["pruner"] == "none" and "pareto" in pruners:
            entry["replay"] = replay(run, PrunerSettings(), reference)
        if run["pruner"] != "none":
            entry["reruns"] = rerun(run, rerun_count)
            entry["pruned_numbers"] = [t["number"] for t in run["trials"] if t["state"] == "PRUNED"]
        table.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "history"}), flush=True)
    out = {"spec": args.spec, "reference": reference, "baseline": baseline, "options": options, "trials": args.trials,
           "train": train, "seeds": seeds, "threads": torch.get_num_threads(), "load_before": load,
           "load_after": os.getloadavg(), "runs": table,
           "curves": {f"{r['label']}-s{r['seed']}": [{k: t[k] for k in ("number", "state", "role", "values", "pruned_at", "projection", "curve")}
                                                     for t in r["trials"]] for r in runs}}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    report([out])
    return 0


def report(outs: list[dict[str, Any]]) -> None:
    """The figures for docs/benchmarks.md: one line per study, then per setting the mean over sampler seeds
    of each figure against the unpruned study of the same sampler and seed."""
    runs = [e for out in outs for e in out["runs"]]
    by: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for e in runs:
        by.setdefault((e["label"].split("-")[0], e["pruner"]), {})[e["seed"]] = e
    out0 = outs[0]
    print(f"reference point {out0['reference']}; {out0['trials']} trials per study; train overrides {out0.get('train')}")
    print("compute in full baseline runs (FLOPs | training seconds); at95 = compute when the study first reaches 95% of "
          "its own final hypervolume (| of the unpruned study's)")  # fmt: skip
    print("sampler pruner    seed  pruned  forked reused  compute F  compute s  HV          HV kept  at95 F  at95(unpr) F  false prunes")
    for (sampler, pruner), rows in sorted(by.items()):
        base = by.get((sampler, "none"), {})
        for seed, e in sorted(rows.items()):
            own = compute_to_reach(e["history"], 0.95 * e["hv"])
            ref = base.get(seed)
            unpr = compute_to_reach(e["history"], 0.95 * ref["hv"]) if ref else None
            kept = e["hv"] / ref["hv"] if ref and ref["hv"] else math.nan
            reruns = e.get("reruns")
            fp = f"{sum(x['on_front'] for x in reruns)}/{len(reruns)} re-run of {e['n_pruned']}" if reruns is not None else "-"
            print(f"{sampler:>7} {pruner:<9} {seed:>4}  {e['n_pruned']:>6}  {e.get('n_forked', 0):>6} {e.get('n_reused', 0):>6}  "
                  f"{e.get('compute_runs_flops', math.nan):9.2f}  {e.get('compute_runs_time', math.nan):9.2f}  {e['hv']:<10.4g}  "
                  f"{kept:7.3f}  {own[0] if own else math.nan:6.2f}  {unpr[0] if unpr else math.nan:12.2f}  {fp}")  # fmt: skip
    print("sampler pruner    seeds  FLOPs/unpruned  time/unpruned  HV kept  pruned  false prunes (re-run)")
    for (sampler, pruner), rows in sorted(by.items()):
        base = by.get((sampler, "none"), {})
        seeds = sorted(s for s in rows if s in base)
        if not seeds:
            continue
        mean = statistics.mean
        flops = mean(rows[s]["flops"] / base[s]["flops"] for s in seeds)
        secs = mean(rows[s]["train_s"] / base[s]["train_s"] for s in seeds)
        kept = mean(rows[s]["hv"] / base[s]["hv"] for s in seeds if base[s]["hv"]) if any(base[s]["hv"] for s in seeds) else math.nan
        reruns = [x for s in seeds for x in rows[s].get("reruns", [])]
        fp = f"{sum(x['on_front'] for x in reruns)}/{len(reruns)}" if reruns else "-"
        print(f"{sampler:>7} {pruner:<9} {len(seeds):>5}  {flops:14.3f}  {secs:13.3f}  {kept:7.3f}  "
              f"{mean(rows[s]['n_pruned'] for s in seeds):6.1f}  {fp}")  # fmt: skip
    reps = [e["replay"] for e in runs if "replay" in e]
    if reps:
        stopped = sum(r["stopped"] for r in reps)
        false = sum(r["false_prunes"] for r in reps)
        print(f"pareto replayed on every unpruned study: {stopped} trials stopped, {false} of them on their study's final "
              f"front; HV kept {statistics.mean(r['hv_kept'] / r['hv_full'] for r in reps if r['hv_full']):.3f}, "
              f"FLOPs {statistics.mean(r['flops_kept'] / r['flops_full'] for r in reps):.3f} of the full study")  # fmt: skip


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
