"""Epoch cost of WUS's fast paths: eager, frozen-prefix cache, compiled (one graph per mode), both.

    python benchmarks/wus_epoch_cost.py                                 # CPU: VGG-11 width 0.25, 8,000 images
    python benchmarks/wus_epoch_cost.py --width 1 --subset 0 --batch-size 512 --device cuda --epochs 10

WUS is forced into two-epoch head-only skip windows (full, full, skip, skip, full, skip, skip, ...), so
each run has full epochs, a window's first skip epoch (which builds the cache when caching) and its
second. Prints per-epoch training times, compile time apart, and the accuracy of each run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wus_tune import TrainConfig, fit  # noqa: E402

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-train-jpeg.tar.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--subset", type=int, default=10000, help="0: the whole archive")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--runs", nargs="+", default=["eager", "eager+cache", "compiled", "compiled+cache"])
    args = parser.parse_args()
    base = TrainConfig.from_dict({
        "model": {"name": "vgg11", "width": args.width},
        "data": {"name": "cifar10", "data_dir": str(args.data), "subset": args.subset or None,
                 "cache_dir": args.cache_dir, "val_fraction": 0.2},
        "optim": {"lr": 0.05, "batch_size": args.batch_size},
        "schedule": {"name": "step"},
        "methods": {"wus": {"signal": "train_acc", "window": 1, "threshold": 1.0, "warmup": 1,
                "skip_length": 2, "bias_scope": "last:1", "schedule_window": [0.0, 1.0]}},
        "epochs": args.epochs, "device": args.device, "eval_every_epoch": False,
    })
    for name in args.runs:
        result = fit(base.replace({"compile": "compiled" in name, "methods.wus.cache_frozen_prefix": "cache" in name}))
        times = [e.train_time_s for e in result.epochs]
        skips = [e.steps - e.steps_by_kind.get("full", 0) > 0 for e in result.epochs]  # an epoch with skip steps
        full = [t for t, s in zip(times, skips) if not s]
        first_skip = [t for i, (t, s) in enumerate(zip(times, skips)) if s and not skips[i - 1]]
        second_skip = [t for i, (t, s) in enumerate(zip(times, skips)) if s and skips[i - 1]]
        print(f"{name}: train {result.train_time_s:.1f}s (compile {result.compile_time_s:.1f}s apart), "
              f"val {result.val_acc:.2%}, skipped {result.changed_step_fraction:.0%}, FLOP ratio {result.flops_fraction:.3f}; "
              f"epoch s: full {statistics.median(full):.2f}, window's 1st skip {statistics.median(first_skip):.2f}, "
              f"2nd skip {statistics.median(second_skip):.2f}; all {[round(t, 2) for t in times]}", flush=True)


if __name__ == "__main__":
    main()
