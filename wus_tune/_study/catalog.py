"""The plug-in methods' knobs as search-space data, and one default trial per compared method.

A spec's ``methods:`` list names what one study compares (``[wus, approx_ops, lp_sphere+wus]``); the
study then samples the virtual key ``method`` among them (:mod:`wus_tune._study.space`) and each
method's knobs below only when the chosen ``method`` contains it. Default ranges, from the method cards
(``docs/methods/*.md``; a spec's ``search_space`` entry of the same key merges into them):

==================================  =========================================  ===========================
key                                 range                                      why
==================================  =========================================  ===========================
``methods.approx_ops.sample_ratio`` 0.25 .. 0.9                                fraction of column-row pairs kept
``methods.approx_ops.sampler``      topk, crs, bernoulli                       the paper's three samplers
``methods.approx_ops.minimal_k``    1 .. 16, log                               pairs kept at least
``methods.approx_ops.until``        0.5 .. 1.0                                 exact products after this fraction
``methods.lp_sphere.p``             1.2 .. 2.0                                 smaller p, sparser rows
``methods.lp_sphere.target_sparsity``  0.3 .. 0.9                              masked fraction aimed at
``methods.lp_sphere.eta``           0.005 .. 0.1, log                          step on the sphere
``methods.gauss_newton.step_size``  0.1 .. 1.0, log                            GN step length (minibatch)
``methods.gauss_newton.damping``    1e-5 .. 1e-2, log                          relative damping
``optim.lr`` (edge_of_chaos)        0.005 .. 0.5, log                          or ``optim.ratio``:
``optim.ratio`` (edge_of_chaos)     3e-4 .. 3e-2, log                          lr / ((1 - m) B) (spec switch)
``optim.momentum`` (edge_of_chaos)  0.5 .. 0.95                                m
``optim.batch_size`` (edge_of_chaos)  32, 64, 128, 256                         B: hardware throughput
``optim.weight_decay`` (edge_of_chaos)  1e-5 .. 1e-2, log                      narrowed by the guideline
==================================  =========================================  ===========================

Edge of chaos changes nothing in training; its "knobs" are the optimizer's, which the other methods
keep at the base recipe's values. The fixed knobs of a method (``prune_every``, ``exact``, ...) come
from the base config's ``train.methods.<name>`` entry when it has one, else from the method's
defaults; that entry takes effect only in trials whose ``method`` names it (baselines run none).

The default trial of a method (role ``method-default``) is the base recipe with the method at
:data:`DEFAULT_KNOBS` (the cards' suggested settings; every other knob at the base config's or the
method's default), plus WUS at the base config's settings for a ``+wus`` combination.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from wus_tune._study.space import METHOD_KEY, METHOD_NAMES, RATIO_KEY, VARIANT_KEY, Param, method_parts
from wus_tune.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from wus_tune.config import TrainConfig

# Each method's searched knobs; their ``when`` (the choices containing the method) is set per study.
_P = Param
METHOD_KNOBS: dict[str, tuple[Param, ...]] = {
    "approx_ops": (
        _P("methods.approx_ops.sample_ratio", "float", 0.25, 0.9, doc="fraction of column-row pairs kept"),
        _P("methods.approx_ops.sampler", "categorical", choices=("topk", "crs", "bernoulli"), doc="pair sampler"),
        _P("methods.approx_ops.minimal_k", "int", 1, 16, log=True, doc="pairs kept at least"),
        _P("methods.approx_ops.until", "float", 0.5, 1.0, doc="exact products after this fraction of training"),
    ),
    "lp_sphere": (
        _P("methods.lp_sphere.p", "float", 1.2, 2.0, doc="Lp exponent: smaller, sparser"),
        _P("methods.lp_sphere.target_sparsity", "float", 0.3, 0.9, doc="masked fraction aimed at"),
        _P("methods.lp_sphere.eta", "float", 0.005, 0.1, log=True, doc="step on the sphere"),
    ),
    "gauss_newton": (
        _P("methods.gauss_newton.step_size", "float", 0.1, 1.0, log=True, doc="GN step length"),
        _P("methods.gauss_newton.damping", "float", 1e-5, 1e-2, log=True, doc="relative damping"),
    ),
    "edge_of_chaos": (
        _P("optim.lr", "float", 0.005, 0.5, log=True, doc="peak learning rate"),
        _P(RATIO_KEY, "float", 3e-4, 3e-2, log=True, doc="effective ratio lr / ((1 - momentum) * batch_size)"),
        _P("optim.momentum", "float", 0.5, 0.95, doc="SGD momentum"),
        _P("optim.batch_size", "categorical", choices=(32, 64, 128, 256), doc="batch size"),
        _P("optim.weight_decay", "float", 1e-5, 1e-2, log=True, doc="SGD (coupled) weight decay"),
    ),
}

# The default trial's knobs, where they differ from the method's own defaults (the cards' suggestions).
DEFAULT_KNOBS: dict[str, dict[str, Any]] = {
    "approx_ops": {"sample_ratio": 0.5, "sampler": "topk", "until": 0.75},
    "lp_sphere": {"p": 1.5, "target_sparsity": 0.5, "eta": 0.01},
    "gauss_newton": {"step_size": 0.3, "damping": 1e-3},
    "edge_of_chaos": {},
}


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Validate a spec's ``methods:`` list (UsageError naming the entry)."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",")]
    if not isinstance(methods, (list, tuple)) or not methods:
        raise UsageError(f"methods: expected a non-empty list such as [wus, approx_ops], got {methods!r}")
    for i, m in enumerate(methods):
        try:
            method_parts(m)
        except ConfigError as e:
            raise UsageError(f"methods[{i}]: {str(e).removeprefix(METHOD_KEY + ': ')}") from None
    if len(set(methods)) != len(methods):
        raise UsageError(f"methods: {list(methods)} names a method twice")
    return tuple(methods)


def check_method_model(methods: Sequence[str], base: TrainConfig) -> None:
    """Gauss-Newton trains only the two-layer ``mlp`` (``model.depth: 2``); approximate products keep the
    first and last layers exact, so an ``mlp`` needs ``depth >= 3`` for them to change anything."""
    parts = {p for m in methods for p in method_parts(m)}
    if "gauss_newton" in parts and (base.model.name != "mlp" or base.model.depth != 2):
        raise UsageError(
            f"methods: gauss_newton needs a two-layer mlp (model.name: mlp, model.depth: 2), "
            f"not {base.model.name} with depth {base.model.depth}"
        )
    if "approx_ops" in parts and base.model.name == "mlp" and base.model.depth < 3:
        raise UsageError(
            f"methods: approx_ops keeps the first and last layers exact, so an mlp of depth {base.model.depth} "
            "has nothing to approximate; use model.depth >= 3 (gauss_newton needs depth 2: compare it in its own study)"
        )


def method_space(
    methods: Sequence[str], params: Mapping[str, Param], *, defaults: bool, effective_ratio: bool
) -> dict[str, Param]:
    """The ``method`` parameter first, then ``params`` (the WUS knobs only where some choice has WUS),
    then the default knobs of every compared method, each conditional on the choices that contain it."""
    methods = check_methods(methods)
    with_wus = tuple(m for m in methods if "wus" in method_parts(m))
    out: dict[str, Param] = {METHOD_KEY: Param(METHOD_KEY, "categorical", choices=methods, doc="the speed-up method")}
    for key, p in params.items():
        if key == VARIANT_KEY:
            if with_wus:
                out[key] = replace(p, when={METHOD_KEY: with_wus})
        elif not (key.startswith("wus.") and not with_wus):
            out[key] = p
    if not defaults:
        return out
    for name in METHOD_NAMES:
        using = tuple(m for m in methods if name in method_parts(m))
        if not using:
            continue
        for p in METHOD_KNOBS[name]:
            if p.key == ("optim.lr" if effective_ratio else RATIO_KEY):
                continue
            out[p.key] = replace(p, when={METHOD_KEY: using})
    return out


def method_default_trials(space: Any, base: TrainConfig, methods: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """(role, fixed values) of one default trial per compared method other than ``none`` and ``wus``
    (the study's own baseline and WUS default cover those)."""
    out = []
    for choice in methods:
        parts = method_parts(choice)
        if choice in ("none", "wus"):
            continue
        values: dict[str, Any] = {METHOD_KEY: choice}
        if "wus" in parts:
            values[VARIANT_KEY] = "wus"
        for name in parts:
            if name != "wus":
                values |= {f"methods.{name}.{k}": v for k, v in default_knobs(name, base).items()}
        out.append(("method-default", space.fixed_at_base(base, values)))
    return out


def default_knobs(name: str, base: TrainConfig) -> dict[str, Any]:
    """The searched knobs of method ``name`` at their default-trial values: :data:`DEFAULT_KNOBS`, with the
    base config's ``methods.<name>`` entry taking precedence (it is the user's own choice)."""
    from wus_tune.methods import registry

    signature = inspect.signature(registry()[name].__init__).parameters
    knobs = {p.key.rsplit(".", 1)[1] for p in METHOD_KNOBS[name] if p.key.startswith("methods.")}
    out = {k: signature[k].default for k in knobs if k in signature}
    out.update({k: v for k, v in DEFAULT_KNOBS.get(name, {}).items() if k in knobs})
    out.update({k: v for k, v in (base.methods.get(name) or {}).items() if k in knobs})
    return out
