"""Edge of chaos as a guide for hyperparameters (Zhang, Feng, Chen & Lai, 2021).

A layer with weight matrix ``W`` (``N`` inputs; a convolution's weight is reshaped to
``(out_channels, in_channels/groups * kh * kw)``) is summarised by the mean-field order parameters::

    J  = std(W) * sqrt(N)        # J < 1 ordered, J > 1 chaotic, J = 1 the edge of chaos
    J0 = mean(W) * N

The paper finds generalisation is best at the edge, ``J = 1``. In the ordered phase ``J**2`` grows about
linearly with the epoch, at a rate proportional to the *effective ratio*::

    g = lr / ((1 - momentum) * batch_size)          # effective_ratio()
    dJ^2/d(epoch) = c * g                           # the linear-growth law; c from fit_growth_rate()

so runs with the same ``g`` follow one curve and the time to reach the edge scales as ``1/g``.
SGD's (coupled) weight decay ``lambda`` shrinks ``J**2`` by ``2 * n * g * lambda * J**2`` per epoch
(``n`` training samples, derivation in ``docs/methods/edge_of_chaos.md``), so::

    dJ^2/d(epoch) = g * (c - 2 * n * lambda * J^2)   ->   J^2 -> c / (2 * n * lambda)

and the decay that parks the model at the edge is ``lambda* = c / (2 n)`` (:func:`balancing_weight_decay`).

Everything here is a *measurement and a guideline*: :class:`EdgeOfChaos` never changes a weight, a
gradient or a hyperparameter. It logs ``edge_of_chaos/J_mean`` & co. each epoch and, with SGD, the epoch's
local estimate of ``c`` and of the balancing weight decay. Measured on digits (docs card): same-ratio curves
do collapse and the time to the edge scales as ``1/g``, but the growth slows after ``J ~ 1``, so ``c`` is
not a constant and the decay balance is a rough guide. :func:`guideline_configs` turns ``c`` into
dotted-key parameter dicts (``{"optim.lr": ..., "optim.weight_decay": ...}``) to enqueue in a study;
:mod:`wus_tune.methods.edge_of_chaos.study` does that for a study (the spec's ``edge_of_chaos:`` section).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from wus_tune.layers import weighted_layers
from wus_tune.methods import Method, RunInfo, StepContext, register

__all__ = [
    "EdgeOfChaos",
    "order_parameters",
    "model_order_parameters",
    "order_summary",
    "effective_ratio",
    "lr_for_ratio",
    "j2_slope",
    "fit_growth_rate",
    "fit_growth_law",
    "balancing_weight_decay",
    "narrowed_weight_decay_range",
    "epochs_to_edge",
    "guideline_configs",
]

# ---- order parameters --------------------------------------------------------------------------


def order_parameters(weight: torch.Tensor) -> tuple[float, float]:
    """``(J, J0) = (std(W) * sqrt(N), mean(W) * N)`` with ``N = prod(weight.shape[1:])`` the fan-in.

    ``std`` is the population standard deviation over all entries. For ``W ~ N(0, s**2 / N)``, ``J ~= s``.
    """
    if weight.dim() < 2:
        raise ValueError(
            f"order_parameters: need a weight with >= 2 dims (out, fan_in...), got shape {tuple(weight.shape)}"
        )
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    n_in = w.shape[1]
    if w.numel() < 2:
        raise ValueError(f"order_parameters: need at least 2 entries, got shape {tuple(weight.shape)}")
    return float(w.std(correction=0) * math.sqrt(n_in)), float(w.mean() * n_in)


def _order_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # Linear and (non-transposed) convolutions: their weight is (out, fan_in...). A transposed
    # convolution stores (in, out, ...), so its fan-in is not shape[1:]; it is left out.
    return [(name or type(module).__name__, module) for name, module in weighted_layers(model, transposed=False)]


def model_order_parameters(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{layer name: (J, J0)}`` for every ``nn.Linear`` and ``nn.Conv{1,2,3}d`` of ``model``, in order."""
    return {name: order_parameters(module.weight) for name, module in _order_layers(model)}


def order_summary(layers: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Mean and max ``J``, mean ``J**2`` and ``J0``, and the fraction of layers in the chaotic phase (J > 1)."""
    if not layers:
        raise ValueError("order_summary: no layers (the model has no Linear or Conv layer)")
    js = [j for j, _ in layers.values()]
    j0s = [j0 for _, j0 in layers.values()]
    return {
        "J_mean": sum(js) / len(js),
        "J_max": max(js),
        "J2_mean": sum(j * j for j in js) / len(js),
        "J0_mean": sum(j0s) / len(j0s),
        "chaotic_fraction": sum(j > 1.0 for j in js) / len(js),
    }


# ---- the effective ratio -----------------------------------------------------------------------


def _check_optim(momentum: float, batch_size: float) -> None:
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum: expected 0 <= momentum < 1, got {momentum!r}")
    if not batch_size >= 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size!r}")


def effective_ratio(lr: float, momentum: float, batch_size: float) -> float:
    """``g = lr / ((1 - momentum) * batch_size)``: runs with equal ``g`` follow one ``J**2(epoch)`` curve."""
    _check_optim(momentum, batch_size)
    if not lr > 0:
        raise ValueError(f"lr: expected > 0, got {lr!r}")
    return lr / ((1.0 - momentum) * batch_size)


def lr_for_ratio(ratio: float, momentum: float, batch_size: float) -> float:
    """The learning rate that gives effective ratio ``ratio``: the inverse of :func:`effective_ratio`."""
    _check_optim(momentum, batch_size)
    if not ratio > 0:
        raise ValueError(f"ratio: expected > 0, got {ratio!r}")
    return ratio * (1.0 - momentum) * batch_size


# ---- the growth law ----------------------------------------------------------------------------


def j2_slope(j2_per_epoch: Sequence[float], epochs: Sequence[float] | None = None) -> float:
    """Least-squares slope of ``J**2`` against the epoch (``epochs`` default ``0, 1, 2, ...``)."""
    ys = [float(v) for v in j2_per_epoch]
    xs = [float(v) for v in epochs] if epochs is not None else [float(i) for i in range(len(ys))]
    if len(ys) < 2 or len(xs) != len(ys):
        raise ValueError(f"j2_slope: need >= 2 points and as many epochs as values, got {len(ys)} and {len(xs)}")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("j2_slope: all epochs are equal")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def fit_growth_rate(j2_per_epoch: Sequence[float] | Sequence[Sequence[float]], ratio: float | Sequence[float]) -> float:
    """The constant ``c`` of the law ``dJ^2/d(epoch) = c * g`` (no weight decay, ordered phase).

    One run: ``j2_per_epoch`` is its ``J**2`` at epochs ``0, 1, ...`` and ``ratio`` its ``g``; ``c`` is the
    least-squares slope divided by ``g``. Several runs: a list of curves and a list of ratios; ``c`` is the
    least-squares line through the origin of the slopes against the ratios. Use runs without weight decay;
    the fitted ``c`` depends on the window, since the growth slows once ``J`` passes about 1.
    """
    if isinstance(ratio, (int, float)):
        if not ratio > 0:
            raise ValueError(f"ratio: expected > 0, got {ratio!r}")
        return j2_slope(j2_per_epoch) / ratio  # type: ignore[arg-type]
    ratios = [float(r) for r in ratio]
    curves = list(j2_per_epoch)
    if len(curves) != len(ratios) or not ratios:
        raise ValueError(f"fit_growth_rate: {len(curves)} curves for {len(ratios)} ratios")
    if any(not r > 0 for r in ratios):
        raise ValueError(f"ratio: every ratio must be > 0, got {ratios}")
    slopes = [j2_slope(c) for c in curves]  # type: ignore[arg-type]
    return sum(s * r for s, r in zip(slopes, ratios)) / sum(r * r for r in ratios)


def fit_growth_law(slopes: Sequence[float], ratios: Sequence[float]) -> tuple[float, float]:
    """Fit ``slope = c * g**p`` in log-log space; returns ``(c, p)``. The paper's law is ``p = 1``."""
    pts = [(math.log(r), math.log(s)) for s, r in zip(slopes, ratios) if s > 0 and r > 0]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        raise ValueError("fit_growth_law: need positive slopes at >= 2 distinct ratios")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    p = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return math.exp(my - p * mx), p


def balancing_weight_decay(
    ratio: float, *, growth_rate: float, n_train: int, j_target: float = 1.0, exponent: float = 1.0
) -> float:
    """SGD weight decay (coupled, as ``torch.optim.SGD(weight_decay=...)``) that holds ``J`` at ``j_target``.

    Growth per epoch ``c * g**p`` balances decay per epoch ``2 * n * g * lambda * J**2`` at
    ``lambda = c * g**(p - 1) / (2 * n * j_target**2)``. Under the paper's linear law (``p = 1``) the ratio
    cancels: every ratio needs the same decay, and the ratio only sets how fast ``J`` gets there.
    """
    if not ratio > 0:
        raise ValueError(f"ratio: expected > 0, got {ratio!r}")
    if not growth_rate > 0:
        raise ValueError(f"growth_rate: expected > 0 (J**2 must grow without decay), got {growth_rate!r}")
    if not n_train >= 1:
        raise ValueError(f"n_train: expected >= 1, got {n_train!r}")
    if not j_target > 0:
        raise ValueError(f"j_target: expected > 0, got {j_target!r}")
    return growth_rate * ratio ** (exponent - 1.0) / (2.0 * n_train * j_target**2)


def narrowed_weight_decay_range(
    ratio: float,
    *,
    growth_rate: float,
    n_train: int,
    j_range: tuple[float, float] = (0.8, 1.25),
    exponent: float = 1.0,
) -> tuple[float, float]:
    """``(low, high)`` weight decay that parks ``J`` between ``j_range[1]`` and ``j_range[0]`` (a search range).

    The decay falls as ``1/J**2``: the low end of the range belongs to the high ``J``.
    """
    j_low, j_high = j_range
    if not 0 < j_low < j_high:
        raise ValueError(f"j_range: expected 0 < low < high, got {j_range!r}")
    kw = dict(growth_rate=growth_rate, n_train=n_train, exponent=exponent)
    return (
        balancing_weight_decay(ratio, j_target=j_high, **kw),  # type: ignore[arg-type]
        balancing_weight_decay(ratio, j_target=j_low, **kw),  # type: ignore[arg-type]
    )


def epochs_to_edge(
    ratio: float, *, growth_rate: float, j_init: float, j_target: float = 1.0, exponent: float = 1.0
) -> float:
    """Epochs of undecayed linear growth from ``j_init`` to ``j_target``: ``(J_t**2 - J_i**2) / (c * g**p)``."""
    if not ratio > 0 or not growth_rate > 0:
        raise ValueError(f"ratio and growth_rate must be > 0, got {ratio!r} and {growth_rate!r}")
    return max(0.0, j_target**2 - j_init**2) / (growth_rate * ratio**exponent)


def guideline_configs(
    base: Mapping[str, Any],
    *,
    ratios: Sequence[float],
    momentum: float | Sequence[float],
    batch_sizes: Sequence[int],
    growth_rate: float,
    n_train: int,
    j_target: float = 1.0,
    exponent: float = 1.0,
    lr_range: tuple[float, float] = (1e-5, 10.0),
) -> list[dict[str, Any]]:
    """Dotted-key parameter dicts at the edge of chaos, one per (ratio, momentum, batch size).

    Each is ``{**base, "optim.lr": lr_for_ratio(...), "optim.momentum": mu, "optim.batch_size": B,
    "optim.weight_decay": balancing_weight_decay(...)}``, ready for ``TrainConfig.replace`` or
    ``optuna.Study.enqueue_trial`` (when the study names its parameters by these dotted keys; a value
    must lie inside the study's distribution). Combinations whose ``lr`` falls outside ``lr_range`` are
    left out; a balancing decay above 1 (the config's limit) raises ValueError, as ``c`` is then implausible.
    """
    moms = [float(momentum)] if isinstance(momentum, (int, float)) else [float(m) for m in momentum]
    if not ratios or not batch_sizes or not moms:
        raise ValueError("guideline_configs: ratios, momentum and batch_sizes must be non-empty")
    out = []
    for g in ratios:
        wd = balancing_weight_decay(g, growth_rate=growth_rate, n_train=n_train, j_target=j_target, exponent=exponent)
        if wd > 1.0:
            raise ValueError(f"growth_rate: balancing weight decay {wd:.3g} > 1 at ratio {g:g}; check c and n_train")
        for mu in moms:
            for bs in batch_sizes:
                lr = lr_for_ratio(g, mu, bs)
                if not lr_range[0] <= lr <= lr_range[1]:
                    continue
                out.append(
                    {
                        **base,
                        "optim.lr": lr,
                        "optim.momentum": mu,
                        "optim.batch_size": int(bs),
                        "optim.weight_decay": wd,
                    }
                )
    return out


# ---- the method --------------------------------------------------------------------------------


@register
class EdgeOfChaos(Method):
    """Logs the order parameters each epoch; changes nothing in training.

    Metrics: ``edge_of_chaos/J_mean``, ``J_max``, ``J0_mean``, ``J2_mean``, ``chaotic_fraction`` and, with
    ``log_layers``, ``edge_of_chaos/J/<layer>`` and ``edge_of_chaos/J0/<layer>``. With SGD (momentum read
    from the optimizer; any LR schedule is followed step by step) it also reports ``ratio`` (the epoch's mean
    effective ratio), ``growth_rate`` (this epoch's local ``c``: the growth of the mean ``J**2`` per unit of
    ratio-time, with the known weight-decay shrinkage added back) and ``balancing_weight_decay`` (the decay
    that would have held ``J`` at ``j_target`` this epoch, ``c / (2 n j_target**2)``). ``c`` is not constant
    in practice (it falls as training proceeds; see the docs card), so read it at the stage you care about.
    """

    name = "edge_of_chaos"
    study = "wus_tune.methods.edge_of_chaos.study:EdgeOfChaosStudy"  # its knobs, and its guideline as a study prior

    def __init__(self, *, log_layers: bool = False, j_target: float = 1.0) -> None:
        if not isinstance(log_layers, bool):
            raise ValueError(f"log_layers: expected true or false, got {log_layers!r}")
        if isinstance(j_target, bool) or not isinstance(j_target, (int, float)) or not j_target > 0:
            raise ValueError(f"j_target: expected a number > 0, got {j_target!r}")
        super().__init__(log_layers=log_layers, j_target=j_target)
        self.log_layers = log_layers
        self.j_target = float(j_target)
        self._reset()

    def _reset(self) -> None:
        self._j2_prev: float | None = None  # mean J**2 at the end of the previous epoch (or at the start)
        self._time = 0.0  # this epoch's integral of the effective ratio (= g for a constant-LR epoch)
        self._decay = 0.0  # this epoch's integral of g * lambda (weight decay shrinkage, per unit 2 n J**2)
        self._ratio_known = True
        self._wd: tuple[torch.optim.Optimizer, float] | None = None  # (optimizer, mean weight decay of weights)
        self._batch: int | None = None  # the last step's batch size

    def setup(self, model: nn.Module, run: RunInfo) -> nn.Module:
        self._reset()
        self._j2_prev = order_summary(model_order_parameters(model))["J2_mean"]
        return model

    def after_step(self, step: StepContext) -> None:
        model, optimizer = step.model, step.optimizer
        self._batch = batch = len(step.inputs)
        group = optimizer.param_groups[0]
        if "momentum" not in group or not self._ratio_known:
            self._ratio_known = False  # Adam & co.: the law is for SGD with momentum
            return
        lr, mu = float(group["lr"]), float(group["momentum"])
        dt = lr / ((1.0 - mu) * batch) / max(1, step.run.steps_per_epoch)
        self._time += dt
        if self._wd is None or self._wd[0] is not optimizer:
            self._wd = (optimizer, _weight_decay_of_weights(model, optimizer))
        self._decay += dt * self._wd[1]

    def end_epoch(self, model: nn.Module, run: RunInfo) -> dict[str, float]:
        layers = model_order_parameters(model)
        summary = order_summary(layers)
        metrics = {f"{self.name}/{k}": v for k, v in summary.items()}
        if self.log_layers:
            for layer, (j, j0) in layers.items():
                metrics[f"{self.name}/J/{layer}"] = j
                metrics[f"{self.name}/J0/{layer}"] = j0
        j2 = summary["J2_mean"]
        batch = self._batch or run.batch_size
        if self._ratio_known and self._time > 0 and self._j2_prev is not None and batch is not None:
            n_train = max(1, run.steps_per_epoch) * batch
            # this epoch: dJ^2 = c * T - 2 n J^2 * integral(g * lambda), with T = integral(g) over the epoch
            c = ((j2 - self._j2_prev) + 2 * n_train * self._j2_prev * self._decay) / self._time
            metrics[f"{self.name}/ratio"] = self._time
            metrics[f"{self.name}/growth_rate"] = c
            if c > 0:
                metrics[f"{self.name}/balancing_weight_decay"] = c / (2 * n_train * self.j_target**2)
        self._j2_prev = j2
        self._time = 0.0
        self._decay = 0.0
        return metrics


def _weight_decay_of_weights(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Mean coupled weight decay over the order-parameter layers' weights (0 for weights not in the optimizer)."""
    by_param = {id(p): float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups for p in g["params"]}
    layers = _order_layers(model)
    return sum(by_param.get(id(m.weight), 0.0) for _, m in layers) / max(1, len(layers))
