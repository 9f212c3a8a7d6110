"""Do the edge-of-chaos guideline's configurations land on or near the Pareto front?

A small study per setting (``wus_tune.study.run_study``, Optuna storage in a temporary SQLite file, MLflow
off) compares plain training recipes only (``methods: [edge_of_chaos]``: training is unchanged, J is logged):

* the baseline (the setting's recipe) and the baseline frontier (the same at 25/50/75% of the epochs);
* the guideline's trials: ``guideline_configs`` at the edge (weight decay ``lambda* = c / (2 n)``) for
  effective ratios ``g0/3, g0, 3 g0`` (``g0`` the recipe's), momentum 0.9, batch sizes 32 and 128, at 50%
  and 100% of the epochs (digits) or 100% (cifar10); ``c`` calibrated on the recipe (``growth_rate: auto``,
  the calibration's seconds are not part of the study);
* search trials: TPE (its first trials random) over ``optim.ratio`` (3e-4..3e-2, log), ``optim.momentum``
  (0.5..0.95), ``optim.batch_size`` (32..256), ``optim.weight_decay`` (1e-5..1e-2, log; ``--narrow``
  narrows it to the guideline's range) and ``epochs``; the lr is derived from the ratio.

For every guideline trial it reports whether it is Pareto-optimal and its distance to the front of all
the *other* trials: the accuracy gap at equal cost (``acc_front(cost) - acc`` in points, where
``acc_front(t)`` is the best accuracy reached at cost <= t; negative: it extends the front by that much)
and the cost ratio at equal accuracy (cheapest other trial at least as accurate, divided by its cost;
< 1: another trial is that much cheaper). The same figures for the search trials are the reference.

The default objectives are ``accuracy,cost`` (FLOPs): the machine is shared, and wall time measured
under load is noise. Note that FLOPs do not see batch size (the same samples per epoch), while wall
time does (small batches are slower per sample on CPU and GPU); the script prints both.

    python benchmarks/edge_of_chaos_front.py --setting digits --seeds 0 1 2     # ~1 min per seed on 2 cores
    python benchmarks/edge_of_chaos_front.py --setting digits --narrow          # the narrowed decay range
    python benchmarks/edge_of_chaos_front.py --setting cifar10 --data-dir ../shared/data/cifar10-train-jpeg.tar.gz
                                                                                # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from wus_tune._study.spec import StudySpec  # noqa: E402
from wus_tune.pareto import Analysis, Candidate  # noqa: E402
from wus_tune.study import run_study  # noqa: E402

RECIPE = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "batch_size": 128}
SETTINGS: dict[str, dict[str, Any]] = {
    # The docs card's MLP 64-256-10; digits split 1438 training / 359 validation images.
    "digits": dict(
        train={"model": {"name": "mlp", "width": 1.0, "depth": 2}, "data": {"name": "digits", "val_fraction": 0.2},
               "optim": RECIPE, "schedule": {"name": "cosine"}, "epochs": 20, "device": "cpu"},
        epochs_low=3, batch_sizes=[32, 128], fractions=[0.5, 1.0], search=28, startup=10, calibration_epochs=10,
    ),  # fmt: skip
    # VGG-11 (BatchNorm) at width 0.25 on 4000 CIFAR-10 training images (3600 train / 400 validation).
    "cifar10": dict(
        train={"model": {"name": "vgg11", "width": 0.25},
               "data": {"name": "cifar10", "data_dir": "../shared/data/cifar10-train-jpeg.tar.gz", "subset": 4000},
               "optim": RECIPE, "schedule": {"name": "cosine"}, "epochs": 6, "device": "cpu"},
        epochs_low=1, batch_sizes=[32, 128], fractions=[1.0], search=12, startup=6, calibration_epochs=4,
    ),  # fmt: skip
}


def front_accuracy(cost: float, others: list[Candidate]) -> float | None:
    """Best accuracy among ``others`` at cost <= ``cost`` (the front's staircase), None if none is that cheap."""
    accs = [c.values[0] for c in others if c.values[1] <= cost]
    return max(accs) if accs else None


def distance(c: Candidate, analysis: Analysis, final_j: dict[int, float]) -> dict[str, Any]:
    others = [o for o in analysis.complete if o.number != c.number]
    acc, cost = c.values[0], c.values[1]
    acc_f = front_accuracy(cost, others)
    cheaper = [o.values[1] for o in others if o.values[0] >= acc]
    adv = analysis.advantages.get(c.number)
    cfg = c.config or {}
    res = c.attrs.get("result") or {}
    return {
        "trial": c.number,
        "role": c.role,
        "pareto": c.number in analysis.front,
        "accuracy": acc,
        "cost": cost,
        "time_s": res.get("time_s"),
        "epochs": cfg.get("epochs"),
        "lr": cfg.get("optim", {}).get("lr"),
        "momentum": cfg.get("optim", {}).get("momentum"),
        "batch_size": cfg.get("optim", {}).get("batch_size"),
        "weight_decay": cfg.get("optim", {}).get("weight_decay"),
        "ratio": c.params.get("optim.ratio", (c.attrs.get("overrides") or {}).get("optim.ratio")),
        "gap_pts": None if acc_f is None else 100 * (acc_f - acc),
        "cost_ratio": min(cheaper) / cost if cheaper else None,
        "vs_frontier_pts": None if adv is None or adv.acc_gain is None else 100 * adv.acc_gain,
        "dominated_by": sum(1 for o in others if _dominates(o.values, c.values)),
        "final_j": final_j.get(c.number),  # edge_of_chaos/J_mean after the last epoch
    }


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    gaps = [r["gap_pts"] for r in rows if r["gap_pts"] is not None]
    js = [r["final_j"] for r in rows if r["final_j"] is not None]
    return {
        "median_final_j": statistics.median(js) if js else None,
        "n": len(rows),
        "on_front": sum(r["pareto"] for r in rows),
        "median_gap_pts": statistics.median(gaps) if gaps else None,
        "max_gap_pts": max(gaps) if gaps else None,
        "within_1pt": sum(g <= 1.0 for g in gaps),
    }


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def run(setting_name: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One study; returns its figures (and prints its table)."""
    import optuna

    from wus_tune.methods.edge_of_chaos.study import calibrate_growth_rate
    from wus_tune.config import TrainConfig
    from wus_tune.study import initial_trials

    setting = SETTINGS[setting_name]
    train = json.loads(json.dumps(setting["train"]))
    if args.data_dir:
        train["data"]["data_dir"] = args.data_dir
    if args.epochs:
        train["epochs"] = args.epochs
    if args.subset:
        train["data"]["subset"] = args.subset
    train["seed"] = seed
    epochs = train["epochs"]
    if args.growth_rate == "auto":  # calibrated here, so that the enqueued trials can be counted
        t = time.perf_counter()
        c, info = calibrate_growth_rate(TrainConfig.from_dict(train), epochs=setting["calibration_epochs"])
        print(f"calibration: c = {c:.4g} at ratio {info['ratio']:.3g} ({setting['calibration_epochs']} epochs, "
              f"{time.perf_counter() - t:.0f}s)")  # fmt: skip
    else:
        c = float(args.growth_rate)
    with tempfile.TemporaryDirectory(prefix="eoc_front_") as tmp:
        spec = StudySpec.from_dict({
            "name": f"eoc-front-{setting_name}",
            "train": train,
            "methods": ["edge_of_chaos"],
            "objectives": args.objectives,
            "sampler": "tpe",
            "sampler_options": {"n_startup_trials": setting["startup"]},
            "seed": seed,
            "storage": f"sqlite:///{tmp}/study.db",
            "tracking_uri": "none",
            "baseline_fractions": [0.25, 0.5, 0.75],
            "enqueue_defaults": False,
            "edge_of_chaos": {
                "growth_rate": c, "guideline": True, "momentum": [0.9], "batch_sizes": setting["batch_sizes"],
                "epochs_fractions": setting["fractions"], "narrow_weight_decay": args.narrow,
            },
            "search_space": {"epochs": {"low": min(setting["epochs_low"], epochs), "high": epochs}},
            "select": "knee",
        }, source=f"edge_of_chaos_front:{setting_name}")  # fmt: skip
        n_initial = len(initial_trials(spec.resolve()))
        n_search = args.search if args.search is not None else setting["search"]
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        start = time.perf_counter()
        final_j: dict[int, float] = {}

        def fit_recording_j(config: Any, **kw: Any) -> Any:  # wus_tune.fit, keeping each trial's final J
            from wus_tune import fit

            result = fit(config, **kw)
            final_j[config.meta["trial"]] = result.epochs[-1].extra["edge_of_chaos/J_mean"]
            return result

        outcome = run_study(spec, n_trials=n_initial + n_search, echo=print if args.verbose else None,
                            report_dir=Path(tmp) / "report", fit=fit_recording_j)  # fmt: skip
        wall = time.perf_counter() - start
        analysis = outcome.analysis
        rows = [distance(c, analysis, final_j) for c in analysis.complete]
        front_rows = [r for r in rows if r["pareto"]]
        report_files = {p.name: p.read_bytes() for p in (Path(tmp) / "report").glob("pareto_front.png")}

    guide = [r for r in rows if r["role"] == "guideline"]
    search = [r for r in rows if r["role"] == "search"]
    obj = analysis.objectives[1]
    print(f"\n{setting_name}, seed {seed}: {len(rows)} completed trials ({n_initial} enqueued, {n_search} searched), "
          f"{len(analysis.front)} on the front; c = {c:.4g}; study wall time {wall:.0f}s")  # fmt: skip
    print(f"{'trial':>5} {'role':<17} {'ratio':>9} {'lr':>8} {'B':>4} {'mom':>5} {'wd':>8} {'ep':>3} {'acc':>7} "
          f"{obj:>9} {'time':>6} {'J':>5} {'front':>5} {'gap pts':>8} {'cost x':>7} {'vs frontier':>11}")  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["role"] != "guideline", r["role"] != "baseline", r["cost"])):
        print(f"{r['trial']:>5} {r['role']:<17} {_fmt(r['ratio'], '9.2e'):>9} {_fmt(r['lr'], '8.4f')} {r['batch_size']:>4} "
              f"{_fmt(r['momentum'], '5.3f')} {_fmt(r['weight_decay'], '8.1e')} {r['epochs']:>3} {r['accuracy'] * 100:6.2f}% "
              f"{r['cost']:9.3g} {_fmt(r['time_s'], '6.1f')} {_fmt(r['final_j'], '5.2f')} {'*' if r['pareto'] else '':>5} {_fmt(r['gap_pts'], '+8.2f'):>8} "
              f"{_fmt(r['cost_ratio'], '7.2f'):>7} {_fmt(r['vs_frontier_pts'], '+11.2f'):>11}")  # fmt: skip
    print(f"guideline trials: {summary(guide)}")
    print(f"search trials:    {summary(search)}")
    print(f"the front:        {summary(front_rows)}; best accuracy {max(r['accuracy'] for r in rows):.2%}, "
          f"hypervolume {analysis.hv_history[-1][1]:.4g}")  # fmt: skip
    return {
        "setting": setting_name, "seed": seed, "objectives": list(analysis.objectives), "growth_rate": c,
        "train": train, "n_enqueued": n_initial, "n_search": n_search, "wall_s": wall,
        "guideline": summary(guide), "search": summary(search), "front": summary(front_rows),
        "best_accuracy": max(r["accuracy"] for r in rows), "hypervolume": analysis.hv_history[-1][1],
        "reference": list(analysis.reference or ()), "rows": rows, "_png": report_files,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="digits")
    ap.add_argument("--data-dir", help="cifar10: the CIFAR-10 archive or folder")
    ap.add_argument("--objectives", default="accuracy,cost", help="accuracy,cost (default) or accuracy,time")
    ap.add_argument("--search", type=int, help="search trials after the enqueued ones")
    ap.add_argument("--epochs", type=int, help="full epoch budget (the baseline's)")
    ap.add_argument("--subset", type=int, help="training images used (before the validation split)")
    ap.add_argument("--growth-rate", default="auto", help="c, or auto (calibrate on the recipe)")
    ap.add_argument("--narrow", action="store_true", help="narrow the weight-decay range to the guideline's")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--verbose", action="store_true", help="print the study's own per-trial lines")
    ap.add_argument("--out", help="write the figures as JSON here (and each study's Pareto plot beside it)")
    args = ap.parse_args()

    results = [run(args.setting, args, seed) for seed in args.seeds]
    if len(results) > 1:
        for role in ("guideline", "search", "front"):
            rows = [r for res in results for r in res["rows"] if (r["pareto"] if role == "front" else r["role"] == role)]
            print(f"pooled over seeds {args.seeds}, {role} trials: {summary(rows)}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for res in results:
            for name, data in res.pop("_png").items():
                (out.parent / f"{out.stem}_seed{res['seed']}_{name}").write_bytes(data)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
