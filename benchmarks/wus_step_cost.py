"""What a skip step costs: a full step against skip steps for each bias scope, timed side by side.

    python benchmarks/wus_step_cost.py                          # VGG-11 width 0.5 + BN, batch 128, CPU
    python benchmarks/wus_step_cost.py --width 1 --batch-size 512 --device cuda

Steps of each kind are interleaved round-robin (so machine noise hits them alike); the median of the
timed repeats is reported, with the FLOP count of each kind of step beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wus_tune.config import ModelConfig, WUSConfig  # noqa: E402
from wus_tune.models import build_model  # noqa: E402
from wus_tune.wus import layer_groups, param_groups, skip_frozen_parameters  # noqa: E402


def _step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, frozen: list) -> float:
    """FLOPs of one forward + backward with ``frozen`` not requiring grad (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    saved = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x.float()), y).backward()
    finally:
        for p, flag in zip(frozen, saved):
            p.requires_grad_(flag)
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vgg11")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=args.model, width=args.width), (3, 32, 32), 10).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.SGD(param_groups(model, weight_decay=5e-4), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    if cuda:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    n_layers = len(layer_groups(model))
    scopes = {"full step": None, "skip, all biases": "all", f"skip, top half (last:{n_layers // 2})": f"last:{n_layers // 2}",
              "skip, head only (last:1)": "last:1"}
    frozen = {name: skip_frozen_parameters(model, WUSConfig(bias_scope=scope)) if scope else [] for name, scope in scopes.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(params: list[torch.nn.Parameter]) -> float:
        for p in params:
            p.requires_grad_(False)
        sync()
        start = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        elapsed = time.perf_counter() - start
        for p in params:
            p.requires_grad_(True)
        return elapsed

    times: dict[str, list[float]] = {name: [] for name in scopes}
    for _ in range(3):  # warm-up: allocator, cudnn autotuning, oneDNN primitives
        for name in scopes:
            step(frozen[name])
    for _ in range(args.repeats):
        for name in scopes:
            times[name].append(step(frozen[name]))

    full = statistics.median(times["full step"])
    full_flops = _step_flops(model, x, y, frozen=[])
    print(f"{args.model} width {args.width}, batch {args.batch_size}, {device}, torch {torch.__version__}, "
          f"median of {args.repeats} interleaved repeats\n")
    print("| step | ms | time vs full | FLOPs vs full |")
    print("|---|---|---|---|")
    for name in scopes:
        t = statistics.median(times[name])
        flops = _step_flops(model, x, y, frozen=frozen[name])
        print(f"| {name} | {t * 1000:.1f} | {t / full:.2f}x | {flops / full_flops:.2f}x |")


if __name__ == "__main__":
    main()
