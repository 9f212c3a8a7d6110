"""torch.compile with WUS on CUDA: does it run, how often does it recompile, and what does it buy?

    python benchmarks/compile_check.py --data .data/cifar10-train-jpeg.tar.gz --epochs 10

Trains VGG-11 (full width) with WUS (head-only skipping, forced to skip half the time) eagerly and
compiled, same seed, and prints training time and the accuracy of each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wus_tune import TrainConfig, fit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    base = TrainConfig.from_dict({
        "model": {"name": "vgg11", "width": 1.0},
        "data": {"name": "cifar10", "data_dir": args.data, "cache_dir": args.cache_dir, "val_fraction": 0.2},
        "optim": {"lr": 0.1, "batch_size": 512},
        "schedule": {"name": "step", "warmup": 0.05},
        "methods": {"wus": {"signal": "train_acc", "window": 1, "threshold": 1.0, "warmup": 1,
                "skip_length": 1, "bias_scope": "last:1", "schedule_window": [0.0, 1.0]}},
        "epochs": args.epochs, "device": "cuda", "eval_every_epoch": False,
    })
    for compiled in (False, True):
        result = fit(base.replace({"compile": compiled}))
        print(f"compile={compiled}: train {result.train_time_s:.2f}s, per-epoch "
              f"{[round(e.train_time_s, 2) for e in result.epochs]}, val {result.val_acc:.2%}, "
              f"skipped {result.changed_step_fraction:.0%}", flush=True)


if __name__ == "__main__":
    main()
