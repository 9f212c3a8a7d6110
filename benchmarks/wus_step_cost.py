"""What a skip step costs: a full step against skip steps for each bias scope, timed side by side.

    python benchmarks/wus_step_cost.py                          # VGG-11 width 0.25 + BN, batch 128, CPU
    python benchmarks/wus_step_cost.py --compile                # also compiled, one graph per mode
    python benchmarks/wus_step_cost.py --width 1 --batch-size 512 --device cuda [--compile [--cuda-graphs]]

Steps of each kind are interleaved round-robin (so machine noise hits them alike); the median of the
timed repeats is reported, with the FLOP count of each kind of step beside it. A step is forward,
backward and the optimizer step. "cached prefix" is a head-only skip step trained on cached features of
the frozen layers (``methods.wus.cache_frozen_prefix``; building the cache is not in it). With ``--compile`` each
mode is compiled by :class:`wus_tune.compile_step.ModeCompiled`; its compile time (first call of the
mode, forward and backward) is printed apart. The last line is ``compiled last:1 skip/full ratio R``:
the median over repeats of (head-only skip step time / full step time), both compiled, same round.
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

from wus_tune.compile_step import ModeCompiled  # noqa: E402
from wus_tune.config import ModelConfig  # noqa: E402
from wus_tune.methods.wus import WUSConfig  # noqa: E402
from wus_tune.methods.wus.frozen_prefix import split_frozen_prefix  # noqa: E402
from wus_tune.models import build_model  # noqa: E402
from wus_tune.methods.wus.rule import layer_groups, param_groups, skip_frozen_parameters  # noqa: E402


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
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time compiled steps (one graph per mode)")
    parser.add_argument("--cuda-graphs", action="store_true", help="compile with mode=reduce-overhead (CUDA)")
    parser.add_argument("--full-only", action="store_true", help="time the full step only (the trainer's speed)")
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
    if args.full_only:
        scopes = {"full step": None}
    frozen = {name: skip_frozen_parameters(model, WUSConfig(bias_scope=scope)) if scope else [] for name, scope in scopes.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def eager_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            return F.cross_entropy(model(x).float(), y)

    compiled = ModeCompiled(model, cuda_graphs=args.cuda_graphs)

    def compiled_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            return F.cross_entropy(compiled(x).float(), y)

    # the cached-prefix head step: features of the frozen prefix computed once, untimed
    head_frozen = skip_frozen_parameters(model, WUSConfig(bias_scope="last:1"))
    for p in head_frozen:
        p.requires_grad_(False)
    split = split_frozen_prefix(model)  # None for a model that is not a chain of modules (ResNet)
    if split is not None:
        prefix, top = split
        with torch.no_grad(), autocast:
            features = prefix.eval()(x)
        prefix.train()
    for p in head_frozen:
        p.requires_grad_(True)

    def cached_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            return F.cross_entropy(top(features).float(), y)

    def step(params: list[torch.nn.Parameter], loss_of) -> float:
        for p in params:
            p.requires_grad_(False)
        sync()
        start = time.perf_counter()
        loss = loss_of(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        elapsed = time.perf_counter() - start
        for p in params:
            p.requires_grad_(True)
        return elapsed

    kinds: dict[str, tuple[list[torch.nn.Parameter], object]] = {f"eager {n}": (frozen[n], eager_loss) for n in scopes}
    if split is not None and not args.full_only:
        kinds["eager skip, head only, cached prefix"] = (head_frozen, cached_loss)
    compile_times: dict[str, float] = {}
    if args.compile:
        for name in scopes:  # each mode's first step compiles its forward and backward graphs
            compile_times[name] = step(frozen[name], compiled_loss)
            kinds[f"compiled {name}"] = (frozen[name], compiled_loss)
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(3):  # warm-up: allocator, cudnn autotuning, oneDNN primitives
        for params, loss_of in kinds.values():
            step(params, loss_of)
    for _ in range(args.repeats):
        for name, (params, loss_of) in kinds.items():
            times[name].append(step(params, loss_of))

    full_flops = _step_flops(model, x, y, frozen=[])
    flops = {name: _step_flops(model, x, y, frozen=frozen[name]) / full_flops for name in scopes}
    if split is not None:
        flops["cached"] = _step_flops(top, features, y, frozen=head_frozen) / full_flops
    print(f"{args.model} width {args.width}, batch {args.batch_size}, {device}, torch {torch.__version__}, "
          f"median of {args.repeats} interleaved repeats\n")
    print("| step | ms | time vs full (same mode) | FLOPs vs full |")
    print("|---|---|---|---|")
    for mode in ("eager", "compiled") if args.compile else ("eager",):
        full = statistics.median(times[f"{mode} full step"])
        for name in [k for k in kinds if k.startswith(mode)]:
            t = statistics.median(times[name])
            share = flops["cached"] if "cached" in name else flops[name.split(" ", 1)[1]]
            print(f"| {name} | {t * 1000:.1f} | {t / full:.2f}x | {share:.3f}x |")
        print(f"| {mode} full step, images/s | {args.batch_size / full:.0f} | | |")
    if args.compile:
        eager_full = statistics.median(times["eager full step"])
        compiled_full = statistics.median(times["compiled full step"])
        print(f"\ncompiled full step vs eager full step: {compiled_full / eager_full:.2f}x")
        print("compile time per mode (first step, not in the table): "
              + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in compile_times.items())
              + f"; {sum(compile_times.values()):.1f}s in all, {compiled.compilations} graphs")
        if not args.full_only:
            ratios = [s / f for s, f in zip(times["compiled skip, head only (last:1)"], times["compiled full step"])]
            print(f"compiled last:1 skip/full ratio {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
