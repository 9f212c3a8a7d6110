"""What each method buys, in one table: the WUS paper's eight settings (AlexNet, VGG-11, VGG-16, ResNet-18 x
CIFAR-10, CIFAR-100), scaled to this machine, against the baseline frontier; InfoBatch and Selective Backprop
as positive controls (speed-ups with a published record).

Per setting and seed (the same seeds for every row, so time and accuracy are paired): the full baseline, the
frontier (the baseline trained for a fraction of the epochs), WUS and WUS+LR at their defaults, the best WUS
and WUS+LR configuration of a small study on that setting (study on its own seed, confirmed on the table's
seeds), and info_batch and selective_backprop at their papers' defaults. Every run is priced against the
full baseline of its seed (relative time, wus_tune.pricing).

Columns: accuracy (mean, sd over seeds), time saved (1 - relative time; 1 - wall time / the same seed's
baseline wall time), FLOPs saved (1 - train FLOPs / the baseline's), points against the frontier at equal
relative time (linear between the frontier's points; below its shortest run, towards chance accuracy at
time 0), and the paper's claim for the dataset.

    python benchmarks/paper_table.py --settings vgg11-cifar10 --quick          # a few minutes, smoke
    python benchmarks/paper_table.py                                           # every setting, CPU scale
    python benchmarks/paper_table.py --gpu --cifar100-dir /data/cifar100       # full width and data, 30 epochs

CIFAR-10 comes from ``--data`` (default ../shared/data/cifar10-train-jpeg.tar.gz, the training split as
JPEGs; validation is held out of it). CIFAR-100 needs ``--cifar100-dir`` (torchvision's pickle files);
without it, or when its files are missing, the setting's row says so. Raw results: benchmarks/results/
paper_table*.json; the table is printed as markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wus_tune import TrainConfig, fit  # noqa: E402
from wus_tune.errors import UsageError  # noqa: E402
from wus_tune.timing import TimingOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = ROOT.parent / "shared/data/cifar10-train-jpeg.tar.gz"
MODELS = ("alexnet", "vgg11", "vgg16", "resnet18")
DATASETS = ("cifar10", "cifar100")
SETTINGS = [f"{m}-{d}" for m in MODELS for d in DATASETS]

# Scale: (model width, training subset (None: all), epochs, batch size, study trials).
SCALES = {
    # a row (3 seeds) in a few minutes on a 2-core CPU: VGG-11 about 10 s a run
    "cpu": {"width": 0.125, "subset": 2000, "epochs": 10, "batch_size": 64, "study_trials": 6},
    "quick": {"width": 0.125, "subset": 1000, "epochs": 4, "batch_size": 64, "study_trials": 4},
    "gpu": {"width": 1.0, "subset": None, "epochs": 30, "batch_size": 128, "study_trials": 16},
}
FRONTIER = (0.5, 0.75)  # fractions of the epochs the frontier's shorter baselines train

# The rows at fixed settings (dotted overrides of the base config).
NAMED = {
    "wus default": {"methods.wus": {"variant": "wus"}},
    # WUS+LR's own defaults (bias_lr_factor 1, lr_decay 1) are plain WUS; its default row takes the middle of the
    # study's ranges for the two LR knobs (bias LR factor: geometric middle of 0.1..10; decay: middle of 0.3..1)
    "wus+lr default": {"methods.wus": {"variant": "wus+lr", "bias_lr_factor": 1.0, "lr_decay": 0.65}},
    "info_batch (paper)": {"methods.info_batch": {"prune_ratio": 0.5, "anneal": 0.875}},
    "selective_backprop (paper)": {"methods.selective_backprop": {"keep": 0.33}},
}

# What each paper claims for the dataset (the WUS figures are the paper's averages over its four models, as
# the issue quotes them; per-setting figures are not restated here).
CLAIMS = {
    ("wus", "cifar10"): "54% less time (WUS, paper's CIFAR-10 average)",
    ("wus", "cifar100"): "43% less time (WUS, paper's CIFAR-100 average)",
    ("wus+lr", "cifar10"): "50% less time (WUS+LR, CIFAR-10 average)",
    ("wus+lr", "cifar100"): "35% less time (WUS+LR, CIFAR-100 average)",
    ("info_batch", "cifar10"): "~40% less overall cost, lossless (Qin et al. 2024)",
    ("info_batch", "cifar100"): "~40% less overall cost, lossless; a rerun: 25% less wall, -0.2 points",
    ("selective_backprop", "cifar10"): "up to 3.5x faster to a target error (Jiang et al. 2019)",
    ("selective_backprop", "cifar100"): "no CIFAR-100 claim",
}


def claim(row: str, dataset: str) -> str:
    for method in ("wus+lr", "wus", "info_batch", "selective_backprop"):
        if row.startswith(method) or row.startswith(f"best {method}"):
            return CLAIMS[(method, dataset)]
    return ""


def base_config(model: str, dataset: str, scale: dict[str, Any], args: argparse.Namespace) -> TrainConfig:
    data: dict[str, Any] = {"name": dataset, "subset": scale["subset"], "val_fraction": 0.1, "download": False}
    if dataset == "cifar10":
        data["data_dir"] = str(args.data)
    elif args.cifar100_dir:
        data["data_dir"] = str(args.cifar100_dir)
    if args.cache_dir:
        data["cache_dir"] = args.cache_dir
    return TrainConfig.from_dict({
        "model": {"name": model, "width": scale["width"]}, "data": data,
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                  "batch_size": scale["batch_size"]},
        "schedule": {"name": "cosine"}, "epochs": scale["epochs"], "device": args.device, "eval_every_epoch": False,
    })  # fmt: skip


def data_problem(config: TrainConfig) -> str | None:
    """None when the setting's data loads; else why not, in one line."""
    from wus_tune.data import load_dataset

    if config.data.name == "cifar100" and not config.data.data_dir:
        return "files not available (pass --cifar100-dir with torchvision's CIFAR-100 files)"
    try:
        load_dataset(config.data)
    except UsageError as e:
        return f"files not available ({str(e).splitlines()[0]})"
    return None


def measure(config: TrainConfig, reference: TrainConfig, timing: TimingOptions | None = None) -> dict[str, Any]:
    result = fit(config, relative_to=reference, timing=timing)
    return {"val_acc": result.val_acc, "time_s": result.time_s, "relative_time": result.relative_time,
            "train_flops": result.train_flops, "flops_fraction": result.flops_fraction, "epochs": config.epochs,
            "steps": sum(e.steps for e in result.epochs), "coverage": result.coverage,
            "config": config.to_dict()}  # fmt: skip


def best_from_study(base: TrainConfig, trials: int, seed: int, baseline_acc: float) -> dict[str, dict[str, Any]]:
    """The best configuration of each WUS variant in a small study of ``trials`` on ``base`` (seed ``seed``; the
    baseline, WUS's default trial and the WUS+LR default row enqueued, then random samples): the fastest
    (relative time) within one point of the baseline's accuracy, else the most accurate."""
    from wus_tune.study import run_study

    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):  # its storage, report and checkpoints
        outcome = run_study(
            train=base.replace({"seed": seed}).to_dict(), methods=["wus"], n_trials=trials, baseline_fractions=[],
            tracking_uri="none", storage="sqlite:///study.db", name="paper-table", objectives="accuracy,relative_time",
            sampler_options={"n_startup_trials": trials}, seed=seed, echo=None,
            enqueue=[{f"methods.wus.{k}": v for k, v in NAMED["wus+lr default"]["methods.wus"].items()}],
        )  # fmt: skip
    best: dict[str, dict[str, Any]] = {}
    for variant in ("wus", "wus+lr"):
        done = [c for c in outcome.analysis.candidates if c.state == "COMPLETE" and c.config
                and "wus" in c.config.get("methods", {})
                and c.config["methods"]["wus"].get("variant", "wus+lr") == variant]  # fmt: skip
        if not done:
            continue
        result = lambda c: c.attrs.get("result", {})  # noqa: E731
        close = [c for c in done if result(c).get("val_acc", 0.0) >= baseline_acc - 0.01]
        pick = min(close, key=lambda c: result(c)["relative_time"]) if close else max(done, key=lambda c: result(c)["val_acc"])
        best[f"best {variant} (study)"] = {"methods.wus": pick.config["methods"]["wus"]}
    return best


def frontier_at(points: list[tuple[float, float]], t: float, chance: float) -> float:
    """The frontier's accuracy at relative time ``t``: linear between its (time, accuracy) points, towards
    (0, chance) below the first, flat beyond the last."""
    pts = sorted([(0.0, chance)] + points)
    if t >= pts[-1][0]:
        return pts[-1][1]
    for (t0, a0), (t1, a1) in zip(pts, pts[1:]):
        if t0 <= t <= t1:
            return a0 + (a1 - a0) * (t - t0) / (t1 - t0) if t1 > t0 else a1
    return pts[0][1]


def summarise(rows: dict[str, list[dict[str, Any]]], chance: float) -> list[dict[str, Any]]:
    base = rows["baseline"]
    frontier = [(statistics.mean(r["relative_time"] for r in runs), statistics.mean(r["val_acc"] for r in runs))
                for name, runs in rows.items() if name == "baseline" or name.startswith("frontier")]  # fmt: skip
    out = []
    for name, runs in rows.items():
        acc = [r["val_acc"] * 100 for r in runs]
        rel = statistics.mean(r["relative_time"] for r in runs)
        wall = statistics.mean(1 - r["time_s"] / b["time_s"] for r, b in zip(runs, base))
        flops = statistics.mean(1 - r["train_flops"] / b["train_flops"] for r, b in zip(runs, base))
        # without the frontier's shorter runs (--rows) there is no frontier to stand against
        points = statistics.mean(acc) - 100 * frontier_at(frontier, rel, chance) if len(frontier) > 1 else None
        out.append({"row": name, "acc_mean": statistics.mean(acc), "acc_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "time_saved_relative": 1 - rel, "time_saved_wall": wall, "flops_saved": flops,
                    "points_vs_frontier": points, "seeds": len(runs)})  # fmt: skip
    return out


def run_setting(setting: str, scale: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    model, dataset = setting.split("-")
    base = base_config(model, dataset, scale, args)
    problem = data_problem(base)
    if problem:
        print(f"{setting}: {problem}", flush=True)
        return {"setting": setting, "unavailable": problem}
    rows: dict[str, list[dict[str, Any]]] = {}
    started = time.time()

    def add(name: str, config: TrainConfig, reference: TrainConfig) -> None:
        r = measure(config, reference, TimingOptions(rounds=args.timing_rounds))
        rows.setdefault(name, []).append(r)
        print(f"  {setting} seed {config.seed} {name:<28} acc {r['val_acc']:.2%} rel {r['relative_time']:.3f} "
              f"wall {r['time_s']:.1f}s", flush=True)

    for seed in args.seeds:
        reference = base.replace({"seed": seed})
        add("baseline", reference, reference)
        for f in FRONTIER if not args.rows else ():
            epochs = max(1, round(f * base.epochs))
            add(f"frontier {epochs}/{base.epochs} epochs", reference.replace({"epochs": epochs}), reference)
        for name, change in NAMED.items():
            if not args.rows or name in args.rows:
                add(name, reference.replace(change), reference)
    baseline_acc = statistics.mean(r["val_acc"] for r in rows["baseline"])
    best = {} if args.rows else best_from_study(base, scale["study_trials"], seed=1000 + args.seeds[0], baseline_acc=baseline_acc)
    for seed in args.seeds:  # confirmed on the table's seeds, fresh for the study
        reference = base.replace({"seed": seed})
        for name, change in best.items():
            add(name, reference.replace(change), reference)
    chance = 1 / (10 if dataset == "cifar10" else 100)
    table = summarise(rows, chance)
    for line in table:
        line["claim"] = claim(line["row"], dataset)
    return {"setting": setting, "scale": {k: scale[k] for k in ("width", "subset", "epochs", "batch_size")},
            "study_trials": 0 if args.rows else scale["study_trials"], "seeds": args.seeds, "best_configs": best, "rows": rows,
            "table": table, "seconds": time.time() - started}  # fmt: skip


def markdown(results: list[dict[str, Any]], device: str) -> str:
    lines = []
    for res in results:
        if "unavailable" in res:
            lines += [f"### {res['setting']}", "", f"{res['unavailable']}.", ""]
            continue
        s = res["scale"]
        lines += [f"### {res['setting']}: width {s['width']}, {s['subset'] or 'all'} training images (10% held out "
                  f"for validation), {s['epochs']} epochs, batch {s['batch_size']}, seeds {res['seeds']}, {device}; "
                  f"study: {res['study_trials']} trials", "",
                  "| run | acc % (mean ± sd) | time saved (relative) | time saved (wall, paired) | FLOPs saved | "
                  "points vs frontier at equal time | paper's claim |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for t in res["table"]:
            lines.append(f"| {t['row']} | {t['acc_mean']:.2f} ± {t['acc_sd']:.2f} | {t['time_saved_relative']:+.1%} | "
                         f"{t['time_saved_wall']:+.1%} | {t['flops_saved']:+.1%} | {_points(t['points_vs_frontier'])} | "
                         f"{t['claim']} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from wus_tune._cli import ArgumentParser  # a bad option is one line and exit status 2

    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS, metavar="MODEL-DATASET",
                        help=f"any of {', '.join(SETTINGS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny scale, 2 seeds, 4 study trials: a smoke run")
    parser.add_argument("--gpu", action="store_true", help="drop the scaling: full width and data, 30 epochs")
    parser.add_argument("--epochs", type=int, default=None, help="override the scale's epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0 1)")
    parser.add_argument("--rows", nargs="+", default=None, choices=list(NAMED), metavar="ROW",
                        help="re-measure only these fixed rows beside the baseline, seed by seed (no frontier, no "
                             f"study): any of {', '.join(map(repr, NAMED))}")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10: a folder or the JPEG tarball")
    parser.add_argument("--cifar100-dir", type=Path, default=None, help="CIFAR-100: torchvision's files")
    parser.add_argument("--cache-dir", default=None)
    # A method whose steps are not the baseline's (info_batch, selective_backprop) is priced by probes of single
    # steps interleaved with the baseline's; on a loaded machine 5 rounds (the library's default) leave them
    # off by tens of percent, so the table takes the median of more.
    parser.add_argument("--timing-rounds", type=int, default=15, help="interleaved pricing rounds per run")
    parser.add_argument("--device", default=None, help="default: cpu (cuda with --gpu)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/paper_table[_quick|_gpu].json")
    args = parser.parse_args(argv)
    if args.quick and args.gpu:
        print("paper_table: --quick and --gpu exclude each other", file=sys.stderr)
        return 2
    if not args.data.exists():
        print(f"paper_table: --data {args.data} does not exist", file=sys.stderr)
        return 2
    args.data = args.data.resolve()  # the study runs in a folder of its own
    args.cifar100_dir = args.cifar100_dir.resolve() if args.cifar100_dir else None
    args.cache_dir = str(Path(args.cache_dir).resolve()) if args.cache_dir else None
    kind = "gpu" if args.gpu else "quick" if args.quick else "cpu"
    scale = dict(SCALES[kind])
    if args.epochs is not None:
        if args.epochs < 2:
            print(f"paper_table: --epochs: expected >= 2, got {args.epochs}", file=sys.stderr)
            return 2
        scale["epochs"] = args.epochs
    args.seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    out = args.out or ROOT / "benchmarks" / "results" / f"paper_table{'' if kind == 'cpu' else '_' + kind}.json"

    import torch

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    results = [run_setting(setting, scale, args) for setting in args.settings]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": device,
                               "torch": torch.__version__, "results": results}, indent=2, default=_json) + "\n")  # fmt: skip
    print()
    print(markdown(results, device))
    print(f"raw results: {out}")
    return 0


def _points(value: float | None) -> str:
    return "n/a (no frontier runs)" if value is None else f"{value:+.2f}"


def _json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
