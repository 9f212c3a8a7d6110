"""Step time of approximate tensor operations (wus_tune.methods.approx_ops) against exact training.

One training step = forward + backward + SGD step of VGG-11 (width 0.25, BatchNorm) on a random batch of
32x32 images. Every configuration (exact, and sample_ratio x sampler) has its own copy of the same
initial model; the configurations are timed side by side, interleaved (one step of each per round, in a
rotating order), after warm-up steps, and each reports the median over rounds. The ratio column is the
median over rounds of (step time / exact step time of the same round), which cancels slow drifts of a
shared machine.

    python benchmarks/approx_ops_step_time.py                       # CPU, the defaults below
    python benchmarks/approx_ops_step_time.py --device cuda --batch-size 512 --width 1

Prints a markdown table and the setup (torch version, threads, device).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wus_tune.methods.approx_ops import SAMPLERS, ApproxConv2d, ApproxLinear, apply_approx_ops  # noqa: E402


def build_vgg11(width: float, num_classes: int = 10) -> torch.nn.Module:
    try:
        from wus_tune.config import ModelConfig
        from wus_tune.models import build_model

        return build_model(ModelConfig(name="vgg11", width=width), (3, 32, 32), num_classes)
    except ImportError:  # wus_tune.models not available: the same layout, defined here
        from torch import nn

        layers: list[nn.Module] = []
        c = 3
        for item in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                c_out = max(1, round(int(item) * width))
                layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c = c_out
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5, 0.3])
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    ap.add_argument("--round-to", type=int, default=8, help="round k up to a multiple of this")
    ap.add_argument("--rounds", type=int, default=15, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    ap.add_argument("--max-seconds", type=float, default=150.0, help="stop adding rounds after this long")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = build_vgg11(args.width).to(device)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    configs: list[tuple[str, float, str | None]] = [("exact", 1.0, None)]
    configs += [(f"{s} r={r:g}", r, s) for r in args.ratios for s in args.samplers]
    models, opts = [], []
    for _, ratio, sampler in configs:
        m = copy.deepcopy(base)
        if sampler is not None:
            apply_approx_ops(m, sample_ratio=ratio, sampler=sampler, round_to=args.round_to)
        m.train()
        models.append(m)
        opts.append(torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(i: int) -> float:
        sync()
        start = time.perf_counter()
        loss = F.cross_entropy(models[i](x), y)
        loss.backward()
        opts[i].step()
        opts[i].zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    for i in range(len(configs)):
        for _ in range(args.warmup):
            step(i)
    times: list[list[float]] = [[] for _ in configs]
    began = time.perf_counter()
    rounds = 0
    for r in range(args.rounds):
        order = list(range(len(configs)))
        order = order[r % len(order):] + order[: r % len(order)]  # rotate: no config always runs first
        for i in order:
            times[i].append(step(i))
        rounds += 1
        if time.perf_counter() - began > args.max_seconds:
            break

    kept = []
    for m in models:
        layers = [mod for mod in m.modules() if isinstance(mod, (ApproxLinear, ApproxConv2d))]
        seen = sum(mod.approx_seen for mod in layers)
        kept.append(sum(mod.approx_kept for mod in layers) / seen if seen else 1.0)

    exact = times[0]
    print(f"VGG-11 width {args.width:g}, batch {args.batch_size}, 32x32, forward+backward+SGD step; "
          f"round_to {args.round_to}; {rounds} interleaved rounds after {args.warmup} warm-up steps each")
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, device {device} ({hardware}), threads {torch.get_num_threads()}\n")
    print("| config | kept pairs (hidden layers) | median step (ms) | IQR (ms) | ratio to exact |")
    print("|---|---|---|---|---|")
    for (name, _, _), t, k in zip(configs, times, kept):
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0], t[0], t[0]]
        ratio = statistics.median(a / b for a, b in zip(t, exact))
        print(f"| {name} | {k:.2f} | {1000 * statistics.median(t):.1f} | {1000 * (q[2] - q[0]):.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
