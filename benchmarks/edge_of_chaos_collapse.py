"""Do J**2(epoch) curves collapse on the effective ratio g = lr / ((1 - momentum) * batch)?

On sklearn's ``digits`` (8x8, 10 classes), an MLP 64-256-10 (PyTorch's default init, the same init for
every run) is trained with plain cross-entropy and SGD at several (lr, momentum, batch) combinations:
three share one ratio, the others differ by factors of 2 and 4. The mean J**2 over the two layers is
recorded per epoch. The script prints

1. the relative difference between the J**2 increments of same-ratio runs, of different-ratio runs, and of
   the same run under another data-order seed (the noise floor);
2. the ordered-phase slope of each run, the fitted constant ``c`` of ``dJ^2/d(epoch) = c g`` and the
   log-log exponent ``p`` of ``slope = c g**p`` (the paper's law is p = 1);
3. a check of the weight-decay model: runs with ``lambda* = c / (2 n)`` (balancing at J = 1) and with
   lambda*/4 and 4 lambda* (predicted to settle at J = 2 and J = 0.5), and their final J and accuracy.

    python benchmarks/edge_of_chaos_collapse.py            # ~1 minute on 2 CPU cores
    python benchmarks/edge_of_chaos_collapse.py --epochs 40 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from wus_tune.methods.edge_of_chaos import (
    balancing_weight_decay,
    effective_ratio,
    fit_growth_law,
    fit_growth_rate,
    j2_slope,
    model_order_parameters,
    order_summary,
)

# (lr, momentum, batch); the first three share g = 3.125e-3
RUNS = [
    (0.01, 0.9, 32),
    (0.04, 0.9, 128),
    (0.02, 0.8, 32),
    (0.01, 0.9, 128),  # g / 4
    (0.02, 0.9, 64),  # g (a fourth same-ratio run, other batch)
    (0.02, 0.9, 32),  # 2 g
    (0.04, 0.9, 32),  # 4 g
]


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = len(x) // 10  # the config's default val_fraction
    val, train = perm[:n_val], perm[n_val:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return x[train], y[train], x[val], y[val]


def make_mlp(init_seed: int) -> nn.Module:
    torch.manual_seed(init_seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def train_curve(
    data, lr: float, momentum: float, batch: int, epochs: int, seed: int, weight_decay: float = 0.0
) -> tuple[list[float], list[float], float]:
    """J**2 (mean over layers) and J_mean at epochs 0..epochs, and the final validation accuracy."""
    xtr, ytr, xva, yva = data
    model = make_mlp(init_seed=0)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    other = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=lr,
        momentum=momentum,
    )
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    s = order_summary(model_order_parameters(model))
    j2, jm = [s["J2_mean"]], [s["J_mean"]]
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        s = order_summary(model_order_parameters(model))
        j2.append(s["J2_mean"])
        jm.append(s["J_mean"])
    with torch.no_grad():
        acc = (model(xva).argmax(1) == yva).float().mean().item()
    return j2, jm, acc


def epochs_to_j2(j2: list[float], target: float = 1.0) -> float:
    """First epoch (linearly interpolated) where J**2 reaches ``target``; inf if never."""
    for t in range(1, len(j2)):
        if j2[t] >= target > j2[t - 1]:
            return t - 1 + (target - j2[t - 1]) / (j2[t] - j2[t - 1])
    return math.inf


def rel_diff(a: list[float], b: list[float]) -> float:
    """||dJ2_a - dJ2_b|| / ||dJ2_b|| over epochs, increments from the (shared) initial value."""
    da = [v - a[0] for v in a]
    db = [v - b[0] for v in b]
    num = math.sqrt(sum((x - y) ** 2 for x, y in zip(da, db)))
    den = math.sqrt(sum(y * y for y in db))
    return num / den


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--fit-epochs", type=int, default=10, help="ordered-phase epochs used for the slopes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--decay-epochs", type=int, default=80)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    data = load_digits_tensors()
    n_train = len(data[0])
    print(f"digits: n_train={n_train}, MLP 64-256-10, SGD (no weight decay), {args.epochs} epochs, seeds {args.seeds}")

    curves: dict[tuple, dict[int, list[float]]] = {}
    print("\n| lr | momentum | batch | ratio g | rms J(0) | rms J(end) | epochs to J2=1 | g x epochs to J2=1 | J2 slope/epoch (first %d) | slope/g | val acc |" % args.fit_epochs)
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    slopes, ratios, g_times = [], [], []
    for lr, mu, bs in RUNS:
        g = effective_ratio(lr, mu, bs)
        per_seed = {}
        accs = []
        for seed in args.seeds:
            j2, jm, acc = train_curve(data, lr, mu, bs, args.epochs, seed)
            per_seed[seed] = j2
            accs.append(acc)
        curves[(lr, mu, bs)] = per_seed
        j2_0 = per_seed[args.seeds[0]]
        slope = sum(j2_slope(c[: args.fit_epochs + 1]) for c in per_seed.values()) / len(per_seed)
        slopes.append(slope)
        ratios.append(g)
        t_edge = sum(epochs_to_j2(c) for c in per_seed.values()) / len(per_seed)
        g_times.append(g * t_edge)
        print(
            f"| {lr:g} | {mu:g} | {bs} | {g:.3g} | {math.sqrt(j2_0[0]):.3f} | {math.sqrt(j2_0[-1]):.3f} | "
            f"{t_edge:.2f} | {g * t_edge:.4f} | {slope:.4g} | {slope / g:.4g} | {sum(accs) / len(accs):.3f} |"
        )

    # 1. collapse
    seed = args.seeds[0]
    keys = list(curves)
    same, diff = [], []
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            gi, gj = effective_ratio(*keys[i]), effective_ratio(*keys[j])
            d = 0.5 * (rel_diff(curves[keys[i]][seed], curves[keys[j]][seed]) + rel_diff(curves[keys[j]][seed], curves[keys[i]][seed]))
            (same if math.isclose(gi, gj) else diff).append((d, keys[i], keys[j], gj / gi))
    noise = []
    if len(args.seeds) > 1:
        for k in keys:
            noise.append(rel_diff(curves[k][args.seeds[1]], curves[k][args.seeds[0]]))
    print("\nrelative difference of J2 increments, ||dJ2_a - dJ2_b|| / ||dJ2_b|| over all epochs (seed %d):" % seed)
    for d, a, b, _ in same:
        print(f"  same ratio      {a} vs {b}: {d:.3f}")
    print(f"  same ratio      mean {sum(d for d, *_ in same) / len(same):.3f}, max {max(d for d, *_ in same):.3f}")
    by_factor: dict[float, list[float]] = {}
    for d, _, _, f in diff:
        by_factor.setdefault(round(max(f, 1 / f), 2), []).append(d)
    for f in sorted(by_factor):
        v = by_factor[f]
        print(f"  ratio x{f:<5g}     mean {sum(v) / len(v):.3f} over {len(v)} pairs")
    if noise:
        print(f"  seed-to-seed    mean {sum(noise) / len(noise):.3f}, max {max(noise):.3f} (the noise floor)")

    # 2. growth law
    c = fit_growth_rate([curves[k][seed][: args.fit_epochs + 1] for k in keys], [effective_ratio(*k) for k in keys])
    c_law, p = fit_growth_law(slopes, ratios)
    print(f"\ngrowth law over the first {args.fit_epochs} epochs: c = {c:.4g} (linear fit through 0); "
          f"log-log fit slope = {c_law:.4g} * g^{p:.3f}")
    finite = [v for v in g_times if math.isfinite(v)]
    if finite:
        j2_0 = curves[keys[0]][seed][0]
        print(f"ordered phase (init to J2 = 1): g x epochs = {min(finite):.4f}..{max(finite):.4f}, "
              f"so c = (1 - J2(0)) / (g x epochs) = {(1 - j2_0) / (sum(finite) / len(finite)):.4g}")

    # 3. the weight-decay model
    lam = balancing_weight_decay(effective_ratio(0.02, 0.9, 32), growth_rate=c, n_train=n_train)
    print(f"\nbalancing weight decay lambda* = c / (2 n) = {lam:.4g}; lr 0.02, momentum 0.9, batch 32, {args.decay_epochs} epochs")
    print("| weight decay | predicted J (sqrt(c / (2 n lambda))) | J at end | J at 3/4 | val acc |")
    print("|---:|---:|---:|---:|---:|")
    for factor in (0.25, 1.0, 4.0):
        wd = lam * factor
        _, jm, acc = train_curve(data, 0.02, 0.9, 32, args.decay_epochs, seed, weight_decay=wd)
        pred = math.sqrt(c / (2 * n_train * wd))
        # J_mean: mean over layers of J (J2_mean is the mean of J**2)
        print(f"| {wd:.4g} ({factor:g} lambda*) | {pred:.3f} | {jm[-1]:.3f} | {jm[3 * len(jm) // 4]:.3f} | {acc:.3f} |")
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
