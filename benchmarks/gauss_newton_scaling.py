"""Sketched vs exact Gauss-Newton vs SGD on an over-parametrised two-layer ReLU regression, as n grows.

Synthetic data: ``n`` points on the unit sphere in ``d`` dims with N(0, 1) targets; the network
``f(x) = relu(x W^T) a / sqrt(m)`` with ``m = m_factor * n`` hidden units, ``W ~ N(0, I)`` (the paper's init)
and fixed random output signs ``a``. Target: squared loss below ``target`` times its initial value.

* exact:    :func:`exact_ggn_step` (the structured Gram ``(X X^T) * (P P^T) / m``, one matrix product,
            then Cholesky), step size 1.
* sketched: :func:`sketched_ggn_step` (tensor SRHT with ``s = sketch_factor * n`` rows, Cholesky of the
            sketched Gram as preconditioner, CG to ``cg_tol``), step size 1.
* SGD:      minibatch SGD on the same network and loss (batch 128, momentum 0.9), learning rate
            ``lr_mult / lambda_max`` of the mean-loss Gauss-Newton matrix (found by power iteration, untimed),
            with ``lr_mult`` picked from a small grid at the smallest n; stopped at the target or after
            ``max(sgd_seconds, the exact step's total time)`` of training.

Only the optimisation is timed (loss checks are not). Prints a markdown table and where the sketch pays.

    python benchmarks/gauss_newton_scaling.py                     # ~3.5 minutes on 2 CPU cores
    python benchmarks/gauss_newton_scaling.py --ns 1024 2048 --m-factor 16   # wider: m >> n
    python benchmarks/gauss_newton_scaling.py --ns 256 1024 --sgd-seconds 5
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from wus_tune.methods.gauss_newton import (  # noqa: E402
    exact_ggn_step,
    sketched_ggn_step,
    two_layer_forward,
    two_layer_jvp,
    two_layer_vjp,
)


def make_problem(n: int, m: int, d: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    X = X / X.norm(dim=1, keepdim=True)
    y = torch.randn(n, 1, generator=g)
    W = torch.randn(m, d, generator=g)
    a = (2 * torch.randint(0, 2, (m, 1), generator=g) - 1).float()
    return [t.to(device) for t in (W, a, X, y)]


def sq_loss(W, a, X, y) -> float:
    return 0.5 * float(((two_layer_forward(W, a, X) - y) ** 2).sum())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_gn(W, a, X, y, *, exact: bool, target: float, max_steps: int, sketch_factor: float, damping: float,
           cg_tol: float, device: str) -> dict:
    loss0 = sq_loss(W, a, X, y)
    gen = torch.Generator(device=device).manual_seed(0)
    seconds, steps, iters = 0.0, 0, []
    loss = loss0
    while loss > target * loss0 and steps < max_steps:
        sync(device)
        t = time.perf_counter()
        if exact:
            out = exact_ggn_step(W, a, X, y, damping=damping)
        else:
            out = sketched_ggn_step(W, a, X, y, sketch_size=int(sketch_factor * len(X)), cg_tol=cg_tol,
                                    cg_max_iter=200, damping=damping, generator=gen)
        W = W - out.direction
        sync(device)
        seconds += time.perf_counter() - t
        steps += 1
        iters.append(out.cg_iters)
        loss = sq_loss(W, a, X, y)
    return {"steps": steps, "seconds": seconds, "ratio": loss / loss0, "reached": loss <= target * loss0,
            "cg_iters": sum(iters) / max(1, len(iters))}


def gn_lambda_max(W, a, X, iters: int = 30) -> float:
    """Largest eigenvalue of J^T J / n (the mean-loss Gauss-Newton matrix), by power iteration."""
    v = torch.randn(W.shape, generator=torch.Generator().manual_seed(1)).to(W.device)
    lam = 0.0
    for _ in range(iters):
        v = v / v.norm()
        w = two_layer_vjp(W, a, X, two_layer_jvp(W, a, X, v)) / len(X)
        lam = float((v * w).sum())
        v = w
    return lam


def run_sgd(W, a, X, y, *, lr: float, target: float, seconds_budget: float, batch: int, device: str,
            max_epochs: int = 100_000) -> dict:
    W = W.clone().requires_grad_(True)
    opt = torch.optim.SGD([W], lr=lr, momentum=0.9)
    loss0 = sq_loss(W.detach(), a, X, y)
    gen = torch.Generator(device=device).manual_seed(0)
    seconds, epochs, loss = 0.0, 0, loss0
    while loss > target * loss0 and seconds < seconds_budget and epochs < max_epochs:
        sync(device)
        t = time.perf_counter()
        perm = torch.randperm(len(X), generator=gen, device=device)
        for i in range(0, len(X), batch):
            idx = perm[i : i + batch]
            opt.zero_grad(set_to_none=True)
            (0.5 * ((two_layer_forward(W, a, X[idx]) - y[idx]) ** 2).sum(1).mean()).backward()
            opt.step()
        sync(device)
        seconds += time.perf_counter() - t
        epochs += 1
        loss = sq_loss(W.detach(), a, X, y)
        if not math.isfinite(loss):
            break
    return {"epochs": epochs, "seconds": seconds, "ratio": loss / loss0, "reached": loss <= target * loss0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--m-factor", type=float, default=4.0, help="hidden units m = m_factor * n")
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--target", type=float, default=1e-3, help="stop when loss <= target * initial loss")
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--sketch-factor", type=float, default=2.0, help="sketch rows s = sketch_factor * n")
    ap.add_argument("--damping", type=float, default=1e-4, help="relative damping (see exact_ggn_step)")
    ap.add_argument("--cg-tol", type=float, default=1e-3)
    ap.add_argument("--sgd-seconds", type=float, default=8.0, help="SGD budget (at least the exact step's time)")
    ap.add_argument("--sgd-batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    dev = args.device
    print(f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads; d={args.d}, m={args.m_factor:g}n, "
          f"target loss {args.target:g} x initial, damping {args.damping:g} (relative), sketch s={args.sketch_factor:g}n, "
          f"CG tol {args.cg_tol:g}")

    # warm-up (allocator, BLAS threads, CUDA context), untimed
    W, a, X, y = make_problem(128, 512, args.d, device=dev)
    exact_ggn_step(W, a, X, y, damping=args.damping)
    sketched_ggn_step(W, a, X, y, sketch_size=256, damping=args.damping)

    # SGD's learning-rate multiplier from a short grid at the smallest n
    n0 = min(args.ns)
    W, a, X, y = make_problem(n0, int(args.m_factor * n0), args.d, device=dev)
    lam = gn_lambda_max(W, a, X)
    grid = {}  # lr = mult / lambda_max; momentum 0.9 multiplies the step by ~10, so heavy-ball is stable below ~0.38
    for mult in (0.05, 0.1, 0.2, 0.4):
        r = run_sgd(W, a, X, y, lr=mult / lam, target=args.target, seconds_budget=2.0, batch=args.sgd_batch, device=dev)
        grid[mult] = (not r["reached"], r["seconds"] if r["reached"] else r["ratio"])
    lr_mult = min(grid, key=lambda k: grid[k])
    print(f"SGD lr multiplier grid at n={n0} (2 s each): "
          + ", ".join(f"{k:g}: {'reached in %.2fs' % v[1] if not v[0] else 'loss ratio %.2g' % v[1]}" for k, v in grid.items())
          + f" -> lr = {lr_mult:g} / lambda_max")

    rows = []
    for n in args.ns:
        m = int(args.m_factor * n)
        W, a, X, y = make_problem(n, m, args.d, device=dev)
        ex = run_gn(W, a, X, y, exact=True, target=args.target, max_steps=args.max_steps,
                    sketch_factor=args.sketch_factor, damping=args.damping, cg_tol=args.cg_tol, device=dev)
        sk = run_gn(W, a, X, y, exact=False, target=args.target, max_steps=args.max_steps,
                    sketch_factor=args.sketch_factor, damping=args.damping, cg_tol=args.cg_tol, device=dev)
        lam = gn_lambda_max(W, a, X)
        budget = max(args.sgd_seconds, ex["seconds"])  # at least as long as the exact step needed
        sgd = run_sgd(W, a, X, y, lr=lr_mult / lam, target=args.target, seconds_budget=budget,
                      batch=args.sgd_batch, device=dev)
        rows.append((n, m, ex, sk, sgd))
        print(f"  n={n}: exact {ex['steps']} steps {ex['seconds']:.2f}s | sketched {sk['steps']} steps "
              f"{sk['seconds']:.2f}s ({sk['cg_iters']:.0f} CG it/step) | SGD {sgd['epochs']} epochs {sgd['seconds']:.2f}s "
              f"(loss ratio {sgd['ratio']:.2g})", flush=True)

    def fmt_gn(r: dict) -> str:
        mark = "" if r["reached"] else f" (not reached: {r['ratio']:.2g})"
        return f"{r['steps']} | {r['seconds'] / max(1, r['steps']):.3f} | {r['seconds']:.2f}{mark}"

    print("\n| n | m | exact: steps | exact: s/step | exact: total s | sketched: steps | sketched: s/step | "
          "sketched: total s | CG it/step | SGD: epochs | SGD: total s | SGD: loss ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, m, ex, sk, sgd in rows:
        sgd_s = f"{sgd['seconds']:.2f}" + ("" if sgd["reached"] else " (budget, not reached)")
        print(f"| {n} | {m} | {fmt_gn(ex)} | {fmt_gn(sk)} | {sk['cg_iters']:.1f} | {sgd['epochs']} | {sgd_s} | {sgd['ratio']:.2g} |")

    print("\nflop model per step (K = 1): exact 2 n^2 m (Gram, one GEMM) + n^3/3 (Cholesky); sketched "
          "~ n m log m (transform) + 2 s n^2 (sketched Gram) + iters * 4 n m d (CG products).")
    print("The sketch beats the exact step only if m > s (its Gram is smaller) AND n > ~2 * iters * d "
          "(CG products cost less than the exact Gram); the measured ratio sketched/exact per step:")
    for n, m, ex, sk, _ in rows:
        per_ex = ex["seconds"] / max(1, ex["steps"])
        per_sk = sk["seconds"] / max(1, sk["steps"])
        print(f"  n={n}: {per_sk / per_ex:.2f}  (2*iters*d = {2 * sk['cg_iters'] * args.d:.0f})")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
