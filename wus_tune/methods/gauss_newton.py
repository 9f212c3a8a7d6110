"""Sketched Gauss-Newton for two-layer ReLU networks (van den Brand, Peng, Song & Weinstein, 2020).

The network is ``f(x) = (1/sqrt(m)) * sum_r a_r relu(w_r . x)`` with hidden weights ``W`` (m, d) and *fixed*
output signs ``a`` (m, K); only ``W`` trains, on the squared loss ``1/2 ||f(X) - Y||^2``. With ``J`` the
Jacobian of the ``n*K`` outputs with respect to ``W`` and ``r = f(X) - Y``, the Gram-Gauss-Newton step
(Cai et al., 2019) is::

    W <- W - eta * J^T z,      (J J^T + lambda I) z = r                       # exact_ggn_step

For this network the products with ``J`` are closed-form (``M = 1[X W^T > 0]``, shape (n, m))::

    (J V)_ik = (1/sqrt(m)) sum_r a_rk M_ir (v_r . x_i)       # V in parameter space (m, d)   two_layer_jvp
    (J^T U)_r = (1/sqrt(m)) sum_ik U_ik a_rk M_ir x_i         # U in output space (n, K)      two_layer_vjp

each one matrix product with the signed mask ``P_(k,i),r = M_ir a_rk``, ``O(n m d K)``. Column ``(k, i)`` of
``J^T`` is the Kronecker product ``(M_i * a_k / sqrt(m)) (x) x_i``. The sketched step
(:func:`sketched_ggn_step`) never forms ``J J^T``: a subsampled randomized Hadamard transform of ``J^T``
along the parameter dimension, computed factor by factor as a *tensor* SRHT (``H_{MD} = H_M (x) H_D``,
signs ``sigma (x) tau``), gives ``S J^T`` (s, nK) in ``O(nK m log m + n d log d + s nK)``; the R factor of
``[S J^T; sqrt(lambda) I]`` (QR, ``O(s (nK)^2)``) preconditions conjugate gradient on the system above.

``damping`` is *relative*: ``lambda = damping * trace(J J^T) / (n K)`` (the mean diagonal of the Gram
matrix), so one value works at any width and input scale.

:class:`GaussNewton` plugs this into the trainer for ``model: {name: mlp, depth: 2}``: it freezes the output
layer at random signs / sqrt(m) (so it trains a *different* network from ordinary training, where the
output layer learns) and its optimizer takes one GN step per batch on the one-hot squared loss, ignoring
the cross-entropy gradients the trainer computes.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from wus_tune.errors import ConfigError
from wus_tune.methods import Method, RunInfo, StepContext, StepCost, register
from wus_tune.methods.study import MethodStudy

__all__ = [
    "GaussNewton",
    "SketchedGaussNewton",
    "GNStep",
    "two_layer_forward",
    "two_layer_jvp",
    "two_layer_vjp",
    "two_layer_gram",
    "exact_ggn_step",
    "sketched_ggn_step",
    "sketch_two_layer_jacobian",
    "fwht",
    "srht_sketch",
    "two_layer_parts",
    "UnsupportedModelError",
]


class GNStep(NamedTuple):
    """One Gauss-Newton step: ``W_new = W - step_size * direction``."""

    direction: torch.Tensor  # (m, d), J^T z
    cg_iters: int  # conjugate-gradient iterations (0 for the exact step)
    rel_residual: float  # ||(J J^T + lambda I) z - r|| / ||r|| of the inner solve
    loss: float  # 1/2 ||f(X) - Y||^2 before the step


# ---- the two-layer network ---------------------------------------------------------------------


def _as_2d(a: torch.Tensor) -> torch.Tensor:
    return a.unsqueeze(1) if a.dim() == 1 else a


def _signed_mask(W: torch.Tensor, a: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``P`` (K*n, m), row ``k*n + i`` = ``1[X W^T > 0]_i * a_k``: everything J needs besides ``X``.

    With it both products are single matrix products (no pass over an (n, m) array per product)::

        (J V)_(k,i) = x_i . (P V)_(k,i) / sqrt(m)        J^T U = P^T (U_(k,i) x_i) / sqrt(m)
    """
    mask = (X @ W.T > 0).to(X.dtype)  # (n, m)
    k = a.shape[1]
    if k == 1:
        return mask * a[:, 0]
    return (mask.unsqueeze(0) * a.T.unsqueeze(1)).reshape(k * X.shape[0], W.shape[0])


# Internally output-space vectors are (K, n) ("output-major", row k*n + i of J); the public API is (n, K).


def _jvp(P: torch.Tensor, X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    n = X.shape[0]
    pv = (P @ V).reshape(-1, n, X.shape[1])  # (K, n, d)
    return (pv * X).sum(-1) / math.sqrt(P.shape[1])  # (K, n)


def _vjp(P: torch.Tensor, X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    ux = (U.unsqueeze(-1) * X).reshape(-1, X.shape[1])  # (K*n, d): U_(k,i) x_i
    return P.T @ ux / math.sqrt(P.shape[1])  # (m, d)


def two_layer_forward(W: torch.Tensor, a: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``relu(X W^T) a / sqrt(m)``: (n, K) for ``a`` (m, K); ``a`` of shape (m,) is K = 1."""
    return torch.relu(X @ W.T) @ _as_2d(a) / math.sqrt(W.shape[0])


def two_layer_jvp(W: torch.Tensor, a: torch.Tensor, X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``J V``: the change of the (n, K) outputs along the weight direction ``V`` (m, d)."""
    return _jvp(_signed_mask(W, _as_2d(a), X), X, V).T


def two_layer_vjp(W: torch.Tensor, a: torch.Tensor, X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``J^T U``: the (m, d) weight-space image of output-space ``U`` (n, K); for ``U = f - Y`` the gradient."""
    a = _as_2d(a)
    return _vjp(_signed_mask(W, a, X), X, U.reshape(X.shape[0], a.shape[1]).T)


def _gram(P: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    k = P.shape[0] // X.shape[0]
    xx = X @ X.T
    if k > 1:
        xx = xx.repeat(k, k)
    return (P @ P.T) * xx / P.shape[1]


def two_layer_gram(W: torch.Tensor, a: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``J J^T`` (nK, nK) in ``O(n^2 m K^2 + n^2 d)`` via its structure, rows output-major (``k*n + i``)::

    G[(k,i),(l,j)] = (x_i . x_j) * sum_r M_ir M_jr a_rk a_rl / m
    """
    return _gram(_signed_mask(W, _as_2d(a), X), X)


def _targets(y: torch.Tensor, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    if not y.is_floating_point():
        if y.dim() != 1:
            raise ValueError(f"y: integer class labels must have shape (n,), got {tuple(y.shape)}")
        return torch.nn.functional.one_hot(y, k).to(dtype)
    if y.numel() != n * k:
        raise ValueError(f"y: expected {n}x{k} targets, got shape {tuple(y.shape)}")
    return y.reshape(n, k).to(dtype)


def _residual(W: torch.Tensor, a: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, r)`` with ``r = f(X) - Y`` output-major (K, n)."""
    P = _signed_mask(W, a, X)
    f = two_layer_forward(W, a, X)
    return P, (f - _targets(y, X.shape[0], a.shape[1], X.dtype)).T.contiguous()


def _check(W: torch.Tensor, a: torch.Tensor, X: torch.Tensor, damping: float) -> None:
    if W.dim() != 2 or X.dim() != 2 or W.shape[1] != X.shape[1]:
        raise ValueError(f"W (m, d) and X (n, d) must share d, got {tuple(W.shape)} and {tuple(X.shape)}")
    if a.shape[0] != W.shape[0]:
        raise ValueError(f"a: expected {W.shape[0]} rows (one per hidden unit), got shape {tuple(a.shape)}")
    if not damping >= 0:
        raise ValueError(f"damping: expected >= 0, got {damping!r}")


def _abs_damping(P: torch.Tensor, X: torch.Tensor, damping: float) -> float:
    # diag(J J^T)_(k,i) = |x_i|^2 * sum_r P_(k,i),r^2 / m
    if damping == 0:
        return 0.0
    k = P.shape[0] // X.shape[0]
    diag = (P * P).sum(1) * (X * X).sum(1).repeat(k) / P.shape[1]
    return damping * float(diag.mean())


def exact_ggn_step(
    W: torch.Tensor, a: torch.Tensor, X: torch.Tensor, y: torch.Tensor, damping: float = 1e-3
) -> GNStep:
    """The reference step: form ``J J^T`` (:func:`two_layer_gram`) and solve ``(J J^T + lambda I) z = r``.

    ``y``: (n, K) float targets or (n,) integer labels (one-hot). ``damping`` is relative (see the module).
    Cost ``O(n^2 m K^2 + (nK)^3)``.
    """
    a = _as_2d(a)
    _check(W, a, X, damping)
    P, r = _residual(W, a, X, y)
    gram = _gram(P, X)
    lam = damping * float(torch.diagonal(gram).mean())
    rhs = r.reshape(-1, 1)
    system = gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        z = torch.cholesky_solve(rhs, chol)
    else:  # singular (damping 0 and nK > rank): least squares
        z = torch.linalg.lstsq(system, rhs).solution
    res = float(torch.linalg.vector_norm(system @ z - rhs) / torch.linalg.vector_norm(rhs).clamp_min(1e-30))
    return GNStep(_vjp(P, X, z.reshape(r.shape)), 0, res, 0.5 * float((r * r).sum()))


# ---- sketching ---------------------------------------------------------------------------------


_FWHT_BLOCK_BITS = 8  # the blocked transform's dense Hadamard blocks have at most 2**8 = 256 points


@functools.lru_cache(maxsize=32)
def _hadamard(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform along the last dim (a power of two), Sylvester order.

    ``fwht(x) == x @ H`` with ``H = scipy.linalg.hadamard(n)`` (symmetric, ``H @ H = n I``). Blocked:
    ``H_{n1 n2} = H_{n1} (x) H_{n2}``, so the transform is a dense product with a Hadamard block of at most
    256 points along each "digit" of the index: ``ceil(log2(n) / 8)`` matrix products (``O(n * 256)`` flops
    each) instead of ``log2(n)`` memory-bound butterfly passes, several times faster on CPU.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht: the last dim must be a power of two, got {n}")
    return _fwht_rows(x.reshape(-1, n)).reshape(x.shape)


def _fwht_rows(y: torch.Tensor) -> torch.Tensor:
    b, n = y.shape
    bits = n.bit_length() - 1
    if bits <= _FWHT_BLOCK_BITS:
        return y @ _hadamard(n, y.dtype, str(y.device))
    levels = -(-bits // _FWHT_BLOCK_BITS)
    n2 = 1 << -(-bits // levels)  # balanced blocks: 2**15 = 256 * 128, not 128 * 128 * 2
    n1 = n // n2
    # index i = i1 * n2 + i2: H_n2 along i2, then H_n1 along i1
    z = (y.reshape(b * n1, n2) @ _hadamard(n2, y.dtype, str(y.device))).reshape(b, n1, n2)
    z = _fwht_rows(z.transpose(1, 2).reshape(b * n2, n1))
    return z.reshape(b, n2, n1).transpose(1, 2).reshape(b, n)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _signs(n: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    bits = torch.randint(0, 2, (n,), generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


def _sample(total: int, s: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if total <= 1 << 24:  # without replacement (the classical SRHT)
        return torch.randperm(total, generator=generator, device=device)[:s]
    return torch.randint(0, total, (s,), generator=generator, device=device)


def srht_sketch(A: torch.Tensor, sketch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``S A`` for a subsampled randomized Hadamard transform ``S`` (s, p) of the rows of ``A`` (p, q).

    ``S = sqrt(1/s) * P H D``: ``D`` random signs, ``H`` the unnormalised Hadamard matrix of the rows
    zero-padded to a power of two ``P``, ``P`` picks ``s`` of its rows without replacement. ``E[(SA)^T SA] =
    A^T A``, and at ``s = P`` it is exact.
    """
    p = A.shape[0]
    big = _next_pow2(p)
    if not 1 <= sketch_size <= big:
        raise ValueError(f"sketch_size: expected 1..{big} (rows padded to a power of two), got {sketch_size}")
    padded = torch.zeros((big,) + tuple(A.shape[1:]), dtype=A.dtype, device=A.device)
    padded[:p] = A * _signs(p, generator, A).reshape((p,) + (1,) * (A.dim() - 1))
    h = fwht(padded.movedim(0, -1)).movedim(-1, 0)
    rows = _sample(big, sketch_size, generator, A.device)
    return h[rows] / math.sqrt(sketch_size)


def sketch_two_layer_jacobian(
    W: torch.Tensor, a: torch.Tensor, X: torch.Tensor, sketch_size: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``S J^T`` (s, nK; columns output-major) for a tensor SRHT over the ``m*d`` parameters, without ``J``.

    Column ``(k, i)`` of ``J^T`` is ``u (x) x_i`` with ``u = M_i * a_k / sqrt(m)``. With ``H_{MD} = H_M (x) H_D``
    (m, d padded to powers of two) and signs ``sigma (x) tau``, row ``(p, q)`` of ``H D (u (x) x)`` is
    ``(H_M sigma u)[p] * (H_D tau x)[q]``: two small transforms and a product per sampled row.
    """
    return _sketch(_signed_mask(W, _as_2d(a), X), X, sketch_size, generator)


def _sketch(P: torch.Tensor, X: torch.Tensor, sketch_size: int, generator: torch.Generator | None) -> torch.Tensor:
    (kn, m), (n, d) = P.shape, X.shape
    big_m, big_d = _next_pow2(m), _next_pow2(d)
    if not 1 <= sketch_size <= big_m * big_d:
        raise ValueError(f"sketch_size: expected 1..{big_m * big_d}, got {sketch_size}")
    sigma, tau = _signs(big_m, generator, X), _signs(big_d, generator, X)
    u = torch.zeros(kn, big_m, dtype=X.dtype, device=X.device)
    u[:, :m] = P * (sigma[:m] / math.sqrt(m))
    hu = fwht(u)  # (K*n, M)
    xp = torch.zeros(n, big_d, dtype=X.dtype, device=X.device)
    xp[:, :d] = X * tau[:d]
    hx = fwht(xp)  # (n, D)
    idx = _sample(big_m * big_d, sketch_size, generator, X.device)
    rows_m, rows_d = idx // big_d, idx % big_d
    cols = hu[:, rows_m] * hx[:, rows_d].repeat(kn // n, 1)  # (K*n, s)
    return cols.T / math.sqrt(sketch_size)


def _preconditioner(sk: torch.Tensor, lam: float, factorization: str) -> torch.Tensor:
    """Upper-triangular ``R`` with ``R^T R ~= sk^T sk + lam I``."""
    nk = sk.shape[1]
    if factorization == "cholesky":
        gram = (sk.T @ sk).to(torch.float64)
        gram.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            return chol.T.to(sk.dtype)
    if lam > 0:
        sk = torch.cat([sk, math.sqrt(lam) * torch.eye(nk, dtype=sk.dtype, device=sk.device)])
    R = torch.linalg.qr(sk, mode="r")[1]
    # a zero pivot (s < nK and no damping): nudge it so the triangular solves stay finite
    diag = torch.diagonal(R)
    tiny = 1e-6 * float(diag.abs().max().clamp_min(1e-30))
    return R + torch.diag(torch.where(diag.abs() < tiny, torch.full_like(diag, tiny), torch.zeros_like(diag)))


def _pcg(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    precond: Callable[[torch.Tensor], torch.Tensor],
    tol: float,
    max_iter: int,
) -> tuple[torch.Tensor, int, float]:
    x = torch.zeros_like(b)
    r = b.clone()
    b_norm = float(torch.linalg.vector_norm(b))
    if b_norm == 0:
        return x, 0, 0.0
    z = precond(r)
    p = z.clone()
    rz = float((r * z).sum())
    it = 0
    res = 1.0
    for it in range(1, max_iter + 1):
        ap = matvec(p)
        alpha = rz / float((p * ap).sum())
        x += alpha * p
        r -= alpha * ap
        res = float(torch.linalg.vector_norm(r)) / b_norm
        if res <= tol:
            break
        z = precond(r)
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, it, res


def sketched_ggn_step(
    W: torch.Tensor,
    a: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    sketch_size: int | None = None,
    cg_tol: float = 1e-4,
    cg_max_iter: int = 50,
    damping: float = 1e-3,
    generator: torch.Generator | None = None,
    factorization: str = "cholesky",
) -> GNStep:
    """The step of :func:`exact_ggn_step`, solved by sketch-preconditioned CG without forming ``J J^T``.

    ``sketch_size`` (default ``4 n K``, capped at the padded parameter count) rows of the tensor SRHT of
    ``J^T``; ``R`` from the QR of ``[S J^T; sqrt(lambda) I]`` gives ``R^T R ~= J J^T + lambda I``; CG on
    ``(J J^T + lambda I) z = r`` with preconditioner ``(R^T R)^-1`` and matrix-free products stops at relative
    residual ``cg_tol`` or ``cg_max_iter`` iterations. The sketch needs ``s >= nK`` to precondition well.

    ``factorization``: ``"qr"`` is the paper's Householder QR of ``[S J^T; sqrt(lambda) I]``; ``"cholesky"``
    (default) gets the same ``R`` (up to signs) as the Cholesky factor of ``(S J^T)^T S J^T + lambda I`` in
    float64, about 8x faster on CPU (Householder QR runs far below matrix-multiply speed). It squares the
    sketch's condition number, which only a preconditioner can afford: CG still converges to the exact
    solution. A failed Cholesky falls back to QR.
    """
    a = _as_2d(a)
    _check(W, a, X, damping)
    if not cg_tol > 0 or cg_max_iter < 1:
        raise ValueError(f"cg_tol must be > 0 and cg_max_iter >= 1, got {cg_tol!r} and {cg_max_iter!r}")
    if factorization not in ("cholesky", "qr"):
        raise ValueError(f"factorization: expected 'cholesky' or 'qr', got {factorization!r}")
    P, r = _residual(W, a, X, y)
    nk = r.numel()
    cap = _next_pow2(W.shape[0]) * _next_pow2(X.shape[1])
    s = min(cap, sketch_size if sketch_size is not None else 4 * nk)
    lam = _abs_damping(P, X, damping)
    sk = _sketch(P, X, s, generator)
    R = _preconditioner(sk, lam, factorization)

    def precond(v: torch.Tensor) -> torch.Tensor:
        t = torch.linalg.solve_triangular(R.T, v.reshape(-1, 1), upper=False)
        return torch.linalg.solve_triangular(R, t, upper=True).reshape(v.shape)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return _jvp(P, X, _vjp(P, X, v)) + lam * v

    z, iters, res = _pcg(matvec, r, precond, cg_tol, cg_max_iter)
    return GNStep(_vjp(P, X, z), iters, res, 0.5 * float((r * r).sum()))


# ---- the optimizer and the method --------------------------------------------------------------


class UnsupportedModelError(ConfigError, ValueError):
    """The model is not ``Linear -> ReLU -> Linear``. A ValueError, and a ConfigError so the CLI prints one line."""


def two_layer_parts(model: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The two Linear layers of a ``Linear -> ReLU -> Linear`` model (``Flatten``/``Identity`` allowed).

    Anything else (another layer type, another activation, dropout, a third Linear) raises
    :class:`UnsupportedModelError` (a ValueError and a ConfigError): the closed-form Jacobian holds only for
    this network.
    """
    allowed = (nn.Sequential, nn.Flatten, nn.Identity, nn.ReLU, nn.Linear)
    linears = [mod for mod in model.modules() if isinstance(mod, nn.Linear)]
    others = sorted({type(mod).__name__ for mod in model.modules() if not isinstance(mod, allowed)})
    relus = [mod for mod in model.modules() if isinstance(mod, nn.ReLU)]
    hint = "use model: {name: mlp, depth: 2}"
    where = "methods.gauss_newton: needs a two-layer ReLU MLP"
    if len(linears) != 2:
        raise UnsupportedModelError(f"{where} ({hint}), got {len(linears)} Linear layers")
    if others:
        raise UnsupportedModelError(f"{where} ({hint}), got modules {', '.join(others)}")
    if len(relus) != 1:
        raise UnsupportedModelError(f"{where}: one ReLU between the two Linear layers ({hint}), got {len(relus)}")
    order = [type(mod).__name__ for mod in model.modules() if isinstance(mod, (nn.Linear, nn.ReLU))]
    if order != ["Linear", "ReLU", "Linear"]:
        raise UnsupportedModelError(f"{where}: expected Linear -> ReLU -> Linear ({hint}), got {' -> '.join(order)}")
    first, second = linears
    if first.out_features != second.in_features:
        raise UnsupportedModelError(f"{where}: layer sizes do not chain ({first.out_features} -> {second.in_features})")
    return first, second


class SketchedGaussNewton(torch.optim.Optimizer):
    """Gauss-Newton on the hidden layer of ``f(x) = relu(x W^T + b) a / sqrt(m)`` with fixed signs ``a``.

    Call :meth:`set_batch` with the batch's inputs (flattened to (n, d)) and targets (integer labels, made
    one-hot, or (n, K) floats) before each :meth:`step`; the gradients in ``.grad`` are ignored. With ``bias``
    the hidden bias trains in the same step (the input gets a constant-1 feature). The group's ``lr`` is the
    step size, so an LR schedule scales it. ``exact=True`` takes :func:`exact_ggn_step` instead of the
    sketched one. ``last`` holds the last step's ``cg_iters``, ``rel_residual`` and ``loss``.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        output_signs: torch.Tensor,
        bias: nn.Parameter | None = None,
        *,
        lr: float = 1.0,
        damping: float = 1e-3,
        sketch_size: int | None = None,
        sketch_factor: float = 4.0,
        exact: bool = False,
        cg_tol: float = 1e-4,
        cg_max_iter: int = 50,
        seed: int = 0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr: expected > 0, got {lr!r}")
        params = [weight] + ([bias] if bias is not None else [])
        defaults = dict(lr=lr, damping=damping, sketch_size=sketch_size, sketch_factor=sketch_factor, exact=exact,
                        cg_tol=cg_tol, cg_max_iter=cg_max_iter)
        super().__init__([{"params": params}], defaults)
        self.weight, self.bias = weight, bias
        self.state[weight]["output_signs"] = _as_2d(output_signs).detach().to(weight.device, weight.dtype)
        self._generator = torch.Generator(device=weight.device).manual_seed(seed)
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last: dict[str, float] = {}

    def set_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self._batch = (inputs, targets)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self._batch is None:
            raise RuntimeError(
                "SketchedGaussNewton.step: no batch; call set_batch(inputs, targets) first "
                "(in the trainer the gauss_newton method's before_step does)"
            )
        inputs, targets = self._batch
        self._batch = None
        group = self.param_groups[0]
        a = self.state[self.weight]["output_signs"]
        x = inputs.reshape(len(inputs), -1).to(self.weight.dtype)
        w = self.weight.detach()
        if self.bias is not None:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
            w = torch.cat([w, self.bias.detach().unsqueeze(1)], 1)
        if group["exact"]:
            out = exact_ggn_step(w, a, x, targets, damping=group["damping"])
        else:
            size = group["sketch_size"] or max(1, int(group["sketch_factor"] * len(x) * a.shape[1]))
            out = sketched_ggn_step(w, a, x, targets, sketch_size=size, cg_tol=group["cg_tol"],
                                    cg_max_iter=group["cg_max_iter"], damping=group["damping"],
                                    generator=self._generator)
        d = self.weight.shape[1]
        self.weight.sub_(group["lr"] * out.direction[:, :d])
        if self.bias is not None:
            self.bias.sub_(group["lr"] * out.direction[:, d])
        self.last = {"cg_iters": float(out.cg_iters), "rel_residual": out.rel_residual, "loss": out.loss / len(x)}


@register
class GaussNewton(Method):
    """Train a two-layer MLP's hidden layer by (sketched) Gauss-Newton steps; the output layer is frozen.

    ``step_size`` (eta), ``damping`` (relative), ``sketch_size`` (rows; default ``sketch_factor * batch * K``),
    ``exact`` (the dense reference solve), ``cg_tol``, ``cg_max_iter``, ``bias`` (``"gn"``: the hidden bias
    trains in the GN step; ``"zero"``: frozen at 0, the paper's network), ``seed`` (output signs and sketches;
    default the run's seed). Metrics: ``gauss_newton/cg_iters``, ``rel_residual``, ``sq_loss`` (epoch means).
    """

    name = "gauss_newton"
    study = "wus_tune.methods.gauss_newton:GaussNewtonStudy"

    def __init__(
        self,
        *,
        step_size: float = 1.0,
        damping: float = 1e-3,
        sketch_size: int | None = None,
        sketch_factor: float = 4.0,
        exact: bool = False,
        cg_tol: float = 1e-4,
        cg_max_iter: int = 50,
        bias: str = "gn",
        seed: int | None = None,
    ) -> None:
        _positive("step_size", step_size)
        _positive("damping", damping, allow_zero=True)
        _positive("sketch_factor", sketch_factor)
        _positive("cg_tol", cg_tol)
        bad_size = isinstance(sketch_size, bool) or not isinstance(sketch_size, int) or sketch_size < 1
        if sketch_size is not None and bad_size:
            raise ValueError(f"sketch_size: expected a positive integer or null, got {sketch_size!r}")
        if isinstance(cg_max_iter, bool) or not isinstance(cg_max_iter, int) or cg_max_iter < 1:
            raise ValueError(f"cg_max_iter: expected a positive integer, got {cg_max_iter!r}")
        if not isinstance(exact, bool):
            raise ValueError(f"exact: expected true or false, got {exact!r}")
        if bias not in ("gn", "zero"):
            raise ValueError(f"bias: expected 'gn' or 'zero', got {bias!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed: expected an integer or null, got {seed!r}")
        super().__init__(step_size=step_size, damping=damping, sketch_size=sketch_size, sketch_factor=sketch_factor,
                         exact=exact, cg_tol=cg_tol, cg_max_iter=cg_max_iter, bias=bias, seed=seed)
        self._first: nn.Linear | None = None
        self._signs: torch.Tensor | None = None
        self._optimizer: SketchedGaussNewton | None = None
        self._sums: dict[str, float] = {}
        self._count = 0

    def _seed(self, run: RunInfo) -> int:
        if self.params["seed"] is not None:
            return int(self.params["seed"])
        return int(run.config.seed)

    def setup(self, model: nn.Module, run: RunInfo) -> nn.Module:
        first, second = two_layer_parts(model)
        m, k = second.in_features, second.out_features
        gen = torch.Generator().manual_seed(self._seed(run))
        signs = (2 * torch.randint(0, 2, (m, k), generator=gen) - 1).to(second.weight.dtype)
        with torch.no_grad():
            second.weight.copy_(signs.T.to(second.weight.device) / math.sqrt(m))
            if second.bias is not None:
                second.bias.zero_()
            if self.params["bias"] == "zero" and first.bias is not None:
                first.bias.zero_()
        for p in second.parameters():
            p.requires_grad_(False)
        if self.params["bias"] == "zero" and first.bias is not None:
            first.bias.requires_grad_(False)
        self._first, self._signs = first, signs
        return model

    def make_optimizer(self, model: nn.Module, run: RunInfo) -> torch.optim.Optimizer:
        if self._first is None or self._signs is None:
            raise RuntimeError("gauss_newton: setup must run before make_optimizer")
        p = self.params
        if not p["exact"]:
            rows = p["sketch_size"] or int(p["sketch_factor"] * run.batch_size * self._signs.shape[1])
            if rows >= self._signs.shape[0]:
                warnings.warn(
                    f"gauss_newton: the sketch has {rows} rows, not fewer than the "
                    f"{self._signs.shape[0]} hidden units; "
                    "preconditioning then costs more than forming J J^T exactly, so exact: true is faster here "
                    "(the sketch pays when hidden width >> batch * classes)",
                    stacklevel=2,
                )
        self._optimizer = SketchedGaussNewton(
            self._first.weight, self._signs, bias=self._first.bias if p["bias"] == "gn" else None,
            lr=p["step_size"], damping=p["damping"], sketch_size=p["sketch_size"], sketch_factor=p["sketch_factor"],
            exact=p["exact"], cg_tol=p["cg_tol"], cg_max_iter=p["cg_max_iter"], seed=self._seed(run),
        )
        return self._optimizer

    def train_step(self, step: StepContext) -> StepCost:
        """The whole step: a forward for the loss and accuracy (no backward: the GN solve needs no
        gradient), then the Gauss-Newton update on this batch."""
        optimizer = step.optimizer
        if not isinstance(optimizer, SketchedGaussNewton):
            raise RuntimeError("gauss_newton: the optimizer is not SketchedGaussNewton")
        with torch.no_grad():
            logits = step.forward(step.inputs)
            loss = step.loss_fn(logits.float(), step.targets)
        optimizer.set_batch(step.inputs, step.targets)
        optimizer.step()
        for key, value in optimizer.last.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += bool(optimizer.last)
        return StepCost(loss=loss, logits=logits)

    def end_epoch(self, model: nn.Module, run: RunInfo) -> dict[str, float]:
        names = {"cg_iters": "cg_iters", "rel_residual": "rel_residual", "loss": "sq_loss"}
        out = {f"{self.name}/{names[k]}": v / max(1, self._count) for k, v in self._sums.items()}
        self._sums, self._count = {}, 0
        return out


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name}: expected a number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


class GaussNewtonStudy(MethodStudy):
    """gauss_newton in a study: its knobs, its default trial, and the models it can train (two-layer MLPs)."""

    method = GaussNewton
    SEARCH_SPACE = {
        "methods.gauss_newton.step_size": {"type": "float", "low": 0.1, "high": 1.0, "log": True, "doc": "GN step length"},
        "methods.gauss_newton.damping": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True, "doc": "relative damping"},
    }
    DEFAULT_TRIAL = {"step_size": 0.3, "damping": 1e-3}

    @classmethod
    def check_model(cls, model: Any, config: Any) -> str | None:
        from wus_tune.registry import BUILTIN_MODELS

        # Only a built-in model is known from its config; a user's own network (a factory or a plug-in) may
        # well be Linear -> ReLU -> Linear: check_module judges the built one.
        builtin = model.factory is None and model.name in BUILTIN_MODELS
        if builtin and (model.name != "mlp" or model.depth != 2):
            return (f"gauss_newton needs a two-layer mlp (model.name: mlp, model.depth: 2), "
                    f"not {model.name} with depth {model.depth}")
        return None

    @classmethod
    def check_module(cls, module: nn.Module, config: Any) -> str | None:
        try:
            two_layer_parts(module)
        except UnsupportedModelError as e:
            return str(e)
        return None
