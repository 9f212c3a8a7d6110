"""WUS against the baseline frontier, in one process, same data and seeds.

For each seed: the full baseline, each WUS setting, and a shorter baseline whose epoch budget is chosen
to take about as long as the WUS run (the honest yardstick: WUS must beat simply training for less).
Prints wall-time ratio, FLOP ratio and validation-accuracy difference, mean and spread over seeds.

    python benchmarks/wus_vs_baseline.py                       # CPU calibration setting (about 15 min)
    python benchmarks/wus_vs_baseline.py --width 1 --subset 0 --epochs 30 --batch-size 256   # GPU

The per-step microbenchmark (a full step against skip steps for each bias scope) is
``benchmarks/wus_step_cost.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wus_tune import TrainConfig, fit  # noqa: E402

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-train-jpeg.tar.gz"

# Named WUS settings (dotted overrides). The running training accuracy costs no evaluation.
WUS_SETTINGS: dict[str, dict[str, object]] = {
    "wus-head": {"methods.wus": {"signal": "train_acc", "window": 1, "threshold": 0.01, "warmup": 4, "skip_length": 3,
                                 "bias_scope": "last:1", "schedule_window": [0.0, 1.0]}},
    "wus-top3": {"methods.wus": {"signal": "train_acc", "window": 1, "threshold": 0.01, "warmup": 4, "skip_length": 3,
                                 "bias_scope": "last:3", "schedule_window": [0.0, 1.0]}},
    "wus-late-head": {"methods.wus": {"signal": "train_acc", "window": 1, "threshold": 0.01, "warmup": 4, "skip_length": 3,
                                      "bias_scope": "last:1", "schedule_window": [0.5, 1.0]}},
    "wus-long-head": {"methods.wus": {"signal": "train_acc", "window": 1, "threshold": 0.02, "warmup": 3, "skip_length": 5,
                                      "bias_scope": "last:1", "schedule_window": [0.0, 1.0]}},
    # the same two head-only settings with the frozen prefix cached in each skip window (cache_frozen_prefix)
    "wus-head-cached": {"methods.wus": {"signal": "train_acc", "window": 1, "threshold": 0.01, "warmup": 4, "skip_length": 3,
                                        "bias_scope": "last:1", "schedule_window": [0.0, 1.0], "cache_frozen_prefix": True}},
    "wus-long-head-cached": {"methods.wus": {"signal": "train_acc", "window": 1, "threshold": 0.02, "warmup": 3,
                                             "skip_length": 5, "bias_scope": "last:1", "schedule_window": [0.0, 1.0],
                                             "cache_frozen_prefix": True}},
    "wus-all-val": {"methods.wus": {"signal": "val_acc", "window": 2, "threshold": 0.01, "warmup": 3, "skip_length": 2,
                                    "bias_scope": "all", "schedule_window": [0.0, 1.0]}},
}


def base_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"name": args.model, "width": args.width},
        "data": {"name": "cifar10", "data_dir": str(args.data), "subset": args.subset or None, "val_fraction": 0.2,
                 "cache_dir": args.cache_dir},
        "optim": {"lr": args.lr, "batch_size": args.batch_size, "weight_decay": 5e-4},
        "schedule": {"name": args.schedule, "milestones": [0.5, 0.75], "gamma": 0.1, "warmup": args.warmup},
        "epochs": args.epochs,
        "device": args.device,
        "eval_every_epoch": False,
    })


def run(config: TrainConfig) -> dict[str, float]:
    result = fit(config)
    return {"time_s": result.time_s, "val_acc": result.val_acc, "flops": result.train_flops,
            "skip_fraction": result.changed_step_fraction, "epochs": config.epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vgg11")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--subset", type=int, default=10000, help="0: the whole archive")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--schedule", default="step")
    parser.add_argument("--warmup", type=float, default=0.0, help="fraction of training with linear LR warm-up")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(WUS_SETTINGS), choices=list(WUS_SETTINGS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/wus_vs_baseline.json"))
    args = parser.parse_args()

    base = base_config(args)
    rows: dict[str, list[dict[str, float]]] = {}
    started = time.time()
    for seed in args.seeds:
        full = run(base.replace({"seed": seed}))
        rows.setdefault("baseline", []).append(full)
        print(f"seed {seed} baseline      {full['val_acc']:.2%} {full['time_s']:.1f}s", flush=True)
        for name in args.settings:
            wus = run(base.replace({"seed": seed, **WUS_SETTINGS[name]}))
            rows.setdefault(name, []).append(wus)
            # the equal-time baseline: as many epochs as fit in the WUS run's time
            short_epochs = max(1, round(args.epochs * wus["time_s"] / full["time_s"]))
            short = run(base.replace({"seed": seed, "epochs": short_epochs}))
            rows.setdefault(f"{name}:equal-time-baseline", []).append(short)
            print(f"seed {seed} {name:<12}  {wus['val_acc']:.2%} {wus['time_s']:.1f}s skip {wus['skip_fraction']:.0%}"
                  f" | {short_epochs}-epoch baseline {short['val_acc']:.2%} {short['time_s']:.1f}s", flush=True)

    print(f"\n{args.model} width {args.width}, {args.subset or 'all'} images, {args.epochs} epochs, "
          f"{args.schedule} schedule, seeds {args.seeds}, {time.time() - started:.0f}s in all\n")
    print("| run | val acc (mean ± sd) | Δacc vs full (points) | time s | time ratio | FLOP ratio | steps skipped |")
    print("|---|---|---|---|---|---|---|")
    base_rows = rows["baseline"]
    for name, runs in rows.items():
        acc = [r["val_acc"] * 100 for r in runs]
        delta = [r["val_acc"] * 100 - b["val_acc"] * 100 for r, b in zip(runs, base_rows)]
        ratio = [r["time_s"] / b["time_s"] for r, b in zip(runs, base_rows)]
        flops = [r["flops"] / b["flops"] for r, b in zip(runs, base_rows)]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        epochs = "/".join(str(r["epochs"]) for r in runs) if "equal-time" in name else ""
        print(f"| {name}{' (' + epochs + ' epochs)' if epochs else ''} | {statistics.mean(acc):.2f} ± {sd:.2f} | "
              f"{statistics.mean(delta):+.2f} | {statistics.mean(r['time_s'] for r in runs):.1f} | "
              f"{statistics.mean(ratio):.3f} | {statistics.mean(flops):.3f} | "
              f"{statistics.mean(r['skip_fraction'] for r in runs):.0%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
