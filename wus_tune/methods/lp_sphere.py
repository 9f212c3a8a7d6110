"""Sparse training with every neuron's incoming weights on the unit Lp sphere (LpSS).

Li, Yang, Li, Lu, Xie, "Training Sparse Neural Network by Constraining Synaptic Weight on Unit Lp
Sphere", 2021 (https://arxiv.org/abs/2103.16013).

The maths. Each output neuron's incoming weight vector ``w`` (a row of a Linear weight, a flattened
filter of a convolution) is kept on the unit Lp sphere ``||w||_p = 1`` with ``1 < p <= 2``; the smaller
``p``, the more of the sphere's mass sits near the axes, so the trained weights are sparser (larger
Hoyer sparsity). With ``q = p / (p - 1)`` (the dual exponent), one Lp-spherical gradient step is::

    v     = sign(w) |w|^(p-1)              # the dual vector; ||v||_q = 1 exactly when ||w||_p = 1
    g_hat = g / ||g||_q                    # g: the (momentum) gradient of the row
    v     = (1 - eta) v - eta g_hat
    v     = v / ||v||_q                    # back onto the unit Lq sphere
    w     = sign(v) |v|^(1/(p-1))          # ||w||_p^p = ||v||_q^q = 1

For ``p = 2`` this is normalised gradient descent on the unit L2 sphere; ``eta`` is then (about) the angle
each row turns per step.

Topology evolution ("semi-pruning"). Each constrained weight has a mask, applied in the forward: the
parameter holds ``mask * w``, while the dense latent ``w`` (through its dual ``v``) keeps training, also at
pruned positions, because the gradient of the loss at a zero weight is not zero. Every ``prune_every``
steps, per row, active weights with ``|w| < h * mean(|active w|)`` are pruned (the largest weight of a row
always stays), pruned weights whose latent ``|w|`` has grown above that threshold return, and a
``regrow_fraction`` of the remaining pruned weights, those with the largest gradient magnitude, come back
with their latent values. The threshold factor ``h`` adapts after every round,
``h <- h * exp(2 (target_sparsity - sparsity))``, which drives the masked fraction toward
``target_sparsity``. Hoyer sparsity, ``H(w) = (sqrt(d) - ||w||_1 / ||w||_2) / (sqrt(d) - 1)`` (0 for a
constant vector, 1 for a one-hot one), measures how sparse the rows are.

The last Linear/Conv layer, all biases and BatchNorm parameters are not constrained: the trainer's
ordinary optimizer trains them.

Use it in your own loop::

    from wus_tune.methods.lp_sphere import project_to_lp_sphere, lp_sphere_update
    with torch.no_grad():
        layer.weight.copy_(project_to_lp_sphere(layer.weight, p=1.5))
        ...loss.backward()...
        layer.weight.copy_(lp_sphere_update(layer.weight, layer.weight.grad, p=1.5, eta=0.01))

or with the trainer: ``methods: {lp_sphere: {p: 1.5, target_sparsity: 0.5}}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wus_tune.layers import weighted_layers
from wus_tune.methods import Method, RunInfo, StepContext, register
from wus_tune.methods.study import MethodStudy, MetricObjective

__all__ = [
    "lp_norm",
    "project_to_lp_sphere",
    "lp_sphere_update",
    "hoyer_sparsity",
    "prune_and_regrow",
    "adapt_threshold",
    "constrained_layers",
    "LpSphere",
]

_TINY = torch.finfo(torch.float32).tiny
H_GAIN = 2.0  # threshold adaptation: h <- h * exp(H_GAIN * (target - sparsity))
H_RANGE = (1e-4, 100.0)


# ---- pure functions ----------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(out, fan_in)`` view: rows of a Linear weight, flattened filters of a conv; a vector is one row."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def _row_norm(r: torch.Tensor, ord: float) -> torch.Tensor:
    """Row-wise ``ord``-norm of a 2-D tensor, scaled by the row maximum so that |x|^ord cannot underflow.

    (``abs().pow().sum()`` rather than ``linalg.vector_norm(ord=q)``, which is ~15x slower on CPU for a
    fractional ``ord``.)
    """
    a = r.abs()
    m = a.amax(dim=1, keepdim=True).clamp_min(_TINY)
    return m.squeeze(1) * (a / m).pow(ord).sum(dim=1).pow(1.0 / ord)


def lp_norm(w: torch.Tensor, p: float) -> torch.Tensor:
    """Lp norm of each row of ``w`` (float32); a 1-D ``w`` gives a 0-dim tensor."""
    n = _row_norm(_rows(w).float(), p)
    return n if w.dim() >= 2 else n[0]


def project_to_lp_sphere(w: torch.Tensor, p: float) -> torch.Tensor:
    """``w`` with every row scaled to unit Lp norm (same shape and dtype). A zero row becomes constant."""
    r = _rows(w).float()
    norm = _row_norm(r, p).unsqueeze(1)
    const = torch.full_like(r, r.shape[1] ** (-1.0 / p))
    out = torch.where(norm > 0, r / norm.clamp_min(_TINY), const)
    return out.reshape(w.shape).to(w.dtype)


def _to_dual(w: torch.Tensor, p: float) -> torch.Tensor:
    return w.clone() if p == 2 else torch.copysign(w.abs().pow(p - 1), w)


def _from_dual(v: torch.Tensor, p: float) -> torch.Tensor:
    return v.clone() if p == 2 else torch.copysign(v.abs().pow(1.0 / (p - 1)), v)


def _dual_step(v: torch.Tensor, d: torch.Tensor, p: float, eta: float) -> torch.Tensor:
    """One step on the unit Lq sphere for 2-D float32 ``v`` (dual rows) and ``d`` (gradient rows)."""
    q = p / (p - 1)
    g_hat = d / _row_norm(d, q).clamp_min(_TINY).unsqueeze(1)  # a zero row stays zero
    v = (1 - eta) * v - eta * g_hat
    return v / _row_norm(v, q).clamp_min(_TINY).unsqueeze(1)


def lp_sphere_update(w: torch.Tensor, grad: torch.Tensor, *, p: float, eta: float) -> torch.Tensor:
    """One Lp-spherical gradient step of every row of ``w`` (see the module docstring); returns the new ``w``.

    ``w`` should already be on the unit Lp sphere (rows); the result is, whatever ``w`` was. ``grad`` is the
    gradient (or momentum buffer) of the same shape; a zero gradient row only renormalises.
    """
    _check_p(p)
    if not 0 < eta < 1:
        raise ValueError(f"eta: expected a number in (0, 1), got {eta!r}")
    v = _to_dual(_rows(w).float(), p)
    v = _dual_step(v, _rows(grad).float(), p, eta)
    return _from_dual(v, p).reshape(w.shape).to(w.dtype)


def hoyer_sparsity(w: torch.Tensor) -> torch.Tensor:
    """Hoyer sparsity ``(sqrt(d) - ||w||_1 / ||w||_2) / (sqrt(d) - 1)`` of each row of ``w``, in [0, 1].

    0 for a constant row, 1 for a one-hot row. A 1-D ``w`` gives a 0-dim tensor. An all-zero row gives 0;
    a row of length 1 gives 1 (if non-zero).

    >>> hoyer_sparsity(torch.tensor([0.0, 3.0, 0.0, 0.0])).item(), hoyer_sparsity(torch.ones(4)).item()
    (1.0, 0.0)
    """
    r = _rows(w).float()
    d = r.shape[1]
    l2 = torch.linalg.vector_norm(r, dim=1)
    if d == 1:
        h = (l2 > 0).float()
    else:
        ratio = r.abs().sum(dim=1) / l2.clamp_min(_TINY)
        h = torch.where(l2 > 0, (math.sqrt(d) - ratio) / (math.sqrt(d) - 1), torch.zeros_like(l2))
    return h if w.dim() >= 2 else h[0]


def prune_and_regrow(
    w: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, *, h: float, regrow_fraction: float = 0.1
) -> torch.Tensor:
    """One topology round; returns the new boolean mask (same shape as ``w``).

    ``w`` is the dense latent weight: pruned entries keep their values and keep training ("semi-pruning").
    With ``t_row = h * mean(|w| over the row's active entries)``:

    * prune: active entries with ``|w| < t_row`` (the row's largest entry always stays);
    * return: pruned entries whose latent ``|w|`` has grown to ``>= t_row``;
    * regrow: of the entries still pruned, the ``floor(regrow_fraction * count)`` with the largest ``|grad|``
      (over the whole tensor) become active, so connections the loss wants can come back before their
      latent weight has grown.
    """
    a = _rows(w).abs().float()
    m = _rows(mask).bool()
    s = _rows(grad).abs().float()
    mean_active = (a * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
    new = a >= h * mean_active.unsqueeze(1)  # active entries below the threshold go, pruned ones above it return
    new.scatter_(1, a.argmax(dim=1, keepdim=True), True)  # a row never loses its largest weight
    candidates = ~m & ~new
    n_regrow = int(regrow_fraction * int(candidates.sum()))
    if n_regrow > 0:
        score = s.masked_fill(~candidates, -1.0).flatten()
        idx = torch.topk(score, n_regrow, sorted=False).indices
        new.view(-1)[idx] = True
    return new.reshape(mask.shape)


def adapt_threshold(h: float, sparsity: float, target: float, *, gain: float = H_GAIN) -> float:
    """Move the pruning threshold factor toward the target: ``h * exp(gain * (target - sparsity))``, clamped.

    >>> adapt_threshold(0.1, 0.0, 0.5) > 0.1, adapt_threshold(0.1, 0.8, 0.5) < 0.1
    (True, True)
    """
    return float(min(H_RANGE[1], max(H_RANGE[0], h * math.exp(gain * (target - sparsity)))))


def constrained_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear and (non-transposed) convolution layers in registration order, without the last one."""
    return weighted_layers(model, transposed=False)[:-1]


# ---- argument checks ---------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _check_p(p: Any, key: str = "p") -> None:
    if not _is_number(p) or not 1 < p <= 2:
        raise ValueError(f"{key}: expected a number in (1, 2], got {p!r}")


def _check_range(key: str, x: Any, low: float, high: float, low_open: bool, high_open: bool) -> None:
    ok = _is_number(x) and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{key}: expected a number in {lo}{low:g}, {high:g}{hi}, got {x!r}")


# ---- the Method ----------------------------------------------------------------------------------


def _sync_free(device: torch.device) -> bool:
    """Guard non-finite gradients with ``torch.where`` (no host sync, ~2x the work) or with an ``if``.

    On an accelerator a host synchronisation per layer per step costs more than the extra elementwise
    work; on CPU there is nothing to synchronise with.
    """
    return device.type != "cpu"



@dataclass
class _Constrained:
    name: str
    param: nn.Parameter
    p: float
    v: torch.Tensor  # (out, fan_in) float32 dual of the dense latent weight, unit Lq rows
    buf: torch.Tensor | None  # momentum buffer, same shape
    mask: torch.Tensor | None  # bool, the parameter's shape


@register
class LpSphere(Method):
    """Keep hidden layers' neuron weight vectors on the unit Lp sphere, and evolve a sparse mask.

    Args:
        p: 1 < p <= 2, or ``{"conv": p1, "linear": p2}`` (a group left out is not constrained).
        eta: step size on the sphere, in (0, 1); scaled by the trainer's LR schedule if ``follow_schedule``.
        momentum: heavy-ball momentum of the gradient fed to the sphere update, in [0, 1).
        target_sparsity: fraction of constrained weights to mask, in [0, 1).
        prune_every: steps between topology rounds; 0 turns pruning off (pure LpSGD).
        h: initial pruning threshold factor (prune below ``h * mean(|active w|)`` of the row).
        regrow_fraction: fraction of the pruned weights regrown per round, by gradient magnitude.
        evolve_until: fraction of training after which the mask is frozen.
        follow_schedule: multiply ``eta`` by the weight group's current LR / ``optim.lr`` (the schedule and
            WUS's LR decay), so the sphere step anneals like the rest of the network.

    The constrained weights leave the trainer's optimizer: ``before_step`` updates them and sets their
    ``.grad`` to None, which every torch optimizer skips (no SGD momentum, no weight decay on them).

    Metrics: ``lp_sphere/hoyer`` (mean Hoyer sparsity of the constrained rows as used in the forward),
    ``lp_sphere/sparsity`` (masked fraction of the constrained weights), ``lp_sphere/params_active``
    (model parameters minus masked weights), ``lp_sphere/h`` (the current threshold factor).
    """

    name = "lp_sphere"
    study = "wus_tune.methods.lp_sphere:LpSphereStudy"

    def __init__(
        self,
        *,
        p: float | dict[str, float] = 1.5,
        eta: float = 0.01,
        momentum: float = 0.9,
        target_sparsity: float = 0.5,
        prune_every: int = 50,
        h: float = 0.1,
        regrow_fraction: float = 0.1,
        evolve_until: float = 0.75,
        follow_schedule: bool = True,
    ) -> None:
        if isinstance(p, dict):
            unknown = sorted(set(p) - {"conv", "linear"})
            if unknown or not p:
                raise ValueError(f"p: a per-group p takes the keys 'conv' and/or 'linear', got {sorted(p)}")
            for key, value in p.items():
                _check_p(value, f"p.{key}")
        else:
            _check_p(p)
        _check_range("eta", eta, 0, 1, True, True)
        _check_range("momentum", momentum, 0, 1, False, True)
        _check_range("target_sparsity", target_sparsity, 0, 1, False, True)
        if isinstance(prune_every, bool) or not isinstance(prune_every, int) or prune_every < 0:
            raise ValueError(f"prune_every: expected an integer >= 0, got {prune_every!r}")
        _check_range("h", h, H_RANGE[0], H_RANGE[1], False, False)
        _check_range("regrow_fraction", regrow_fraction, 0, 1, False, False)
        _check_range("evolve_until", evolve_until, 0, 1, False, False)
        if not isinstance(follow_schedule, bool):
            raise ValueError(f"follow_schedule: expected true or false, got {follow_schedule!r}")
        super().__init__(
            p=p, eta=eta, momentum=momentum, target_sparsity=target_sparsity, prune_every=prune_every, h=h,
            regrow_fraction=regrow_fraction, evolve_until=evolve_until, follow_schedule=follow_schedule,
        )
        self.h = float(h)
        self.steps = 0
        self.constrained: list[_Constrained] = []
        self._groups: dict[int, dict[str, Any]] = {}
        self._groups_of: int | None = None
        self._max_lr = 0.0

    def _p_for(self, layer: nn.Module) -> float | None:
        p = self.params["p"]
        if not isinstance(p, dict):
            return float(p)
        group = "linear" if isinstance(layer, nn.Linear) else "conv"
        return float(p[group]) if group in p else None

    @torch.no_grad()
    def setup(self, model: nn.Module, run: RunInfo) -> nn.Module:
        """Project the constrained weights onto the unit Lp sphere and set up duals, momentum and masks."""
        self.constrained = []
        seen: set[int] = set()
        for name, layer in constrained_layers(model):
            p = self._p_for(layer)
            weight = layer.weight
            if p is None or id(weight) in seen or not weight.requires_grad:
                continue
            seen.add(id(weight))
            w = project_to_lp_sphere(weight, p)
            weight.copy_(w)
            v = _to_dual(_rows(w).float(), p)
            buf = torch.zeros_like(v) if self.params["momentum"] > 0 else None
            mask = torch.ones_like(weight, dtype=torch.bool) if self.params["prune_every"] > 0 else None
            self.constrained.append(_Constrained(f"{name}.weight" if name else "weight", weight, p, v, buf, mask))
        return model

    def _eta(self, optimizer: torch.optim.Optimizer, param: nn.Parameter, peak: float | None) -> float:
        eta = float(self.params["eta"])
        if not self.params["follow_schedule"] or optimizer is None:
            return eta
        if self._groups_of != id(optimizer):
            self._groups = {id(q): g for g in optimizer.param_groups for q in g["params"]}
            self._groups_of = id(optimizer)
        group = self._groups.get(id(param))
        if group is None:
            return eta
        lr = float(group["lr"])
        if not peak:
            self._max_lr = max(self._max_lr, lr)
            peak = self._max_lr
        return min(0.999, max(0.0, eta * lr / peak)) if peak > 0 else eta

    @torch.no_grad()
    def before_step(self, step: StepContext) -> None:
        self.update(step.optimizer, progress=step.progress, total_steps=step.run.total_steps,
                    peak_lr=step.run.config.optim.lr)

    @torch.no_grad()
    def update(self, optimizer: torch.optim.Optimizer | None, *, progress: float = 0.0, total_steps: int = 0,
               peak_lr: float | None = None) -> None:
        """The sphere step of every constrained weight from its ``.grad`` (then set to None, so the
        optimizer leaves it); usable in any loop between ``backward()`` and ``optimizer.step()``."""
        every = self.params["prune_every"]
        evolve = (
            every > 0 and (self.steps + 1) % every == 0
            and (total_steps <= 0 or progress < self.params["evolve_until"])
        )
        momentum = self.params["momentum"]
        for st in self.constrained:
            grad = st.param.grad
            if grad is None:  # e.g. frozen by weight update skipping: no update
                continue
            if st.v.device != grad.device:
                st.v = st.v.to(grad.device)
                st.buf = st.buf.to(grad.device) if st.buf is not None else None
                st.mask = st.mask.to(grad.device) if st.mask is not None else None
            g = _rows(grad).float()
            finite = torch.isfinite(g).all()
            sync_free = _sync_free(grad.device)
            if sync_free:
                # A non-finite gradient (fp16 loss-scale overflow) leaves the tensor untouched, without a
                # host synchronisation.
                d = st.buf * momentum + g if st.buf is not None else g
                d = torch.where(finite, d, st.buf if st.buf is not None else torch.zeros_like(g))
                st.buf = d if st.buf is not None else None
                v = torch.where(finite, _dual_step(st.v, d, st.p, self._eta(optimizer, st.param, peak_lr)), st.v)
            else:
                if not bool(finite):
                    st.param.grad = None
                    continue
                if st.buf is not None:
                    d = st.buf.mul_(momentum).add_(g)
                else:
                    d = g
                v = _dual_step(st.v, d, st.p, self._eta(optimizer, st.param, peak_lr))
            st.v = v
            w = _from_dual(v, st.p)
            if evolve and st.mask is not None:
                st.mask = prune_and_regrow(w, st.mask, d, h=self.h, regrow_fraction=self.params["regrow_fraction"])
            w = w.reshape(st.param.shape)
            if st.mask is not None:
                w = w * st.mask
            if sync_free:
                w = torch.where(finite, w.to(st.param.dtype), st.param)
            st.param.copy_(w)
            st.param.grad = None  # the trainer's optimizer skips parameters without a gradient
        if evolve:
            self.h = adapt_threshold(self.h, self.sparsity(), self.params["target_sparsity"])
        self.steps += 1

    def sparsity(self) -> float:
        """Fraction of the constrained weights that are masked."""
        total = sum(st.param.numel() for st in self.constrained)
        masked = sum(int((~st.mask).sum()) for st in self.constrained if st.mask is not None)
        return masked / total if total else 0.0

    @torch.no_grad()
    def end_epoch(self, model: nn.Module, run: RunInfo) -> dict[str, float]:
        if not self.constrained:
            return {}
        hoyer = torch.cat([hoyer_sparsity(st.param).float().cpu() for st in self.constrained])
        masked = sum(int((~st.mask).sum()) for st in self.constrained if st.mask is not None)
        total_params = sum(q.numel() for q in model.parameters())
        return {
            "lp_sphere/hoyer": float(hoyer.mean()),
            "lp_sphere/sparsity": self.sparsity(),
            "lp_sphere/params_active": float(total_params - masked),
            "lp_sphere/h": self.h,
        }


class LpSphereStudy(MethodStudy):
    """lp_sphere in a study: its knobs, its default trial, and the objectives its metrics give (``sparsity``,
    ``params``: a study may add one as its last objective)."""

    method = LpSphere
    # A run without the method is dense: sparsity 0, every parameter active.
    OBJECTIVES = {"sparsity": MetricObjective("maximize", "lp_sphere/sparsity", absent=0.0),
                  "params": MetricObjective("minimize", "lp_sphere/params_active", absent="num_params")}
    SEARCH_SPACE = {
        "methods.lp_sphere.p": {"type": "float", "low": 1.2, "high": 2.0, "doc": "Lp exponent: smaller, sparser"},
        "methods.lp_sphere.target_sparsity": {"type": "float", "low": 0.3, "high": 0.9, "doc": "masked fraction aimed at"},
        "methods.lp_sphere.eta": {"type": "float", "low": 0.005, "high": 0.1, "log": True, "doc": "step on the sphere"},
    }
    DEFAULT_TRIAL = {"p": 1.5, "target_sparsity": 0.5, "eta": 0.01}
