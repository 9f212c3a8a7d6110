"""Edge of chaos in a study: its knobs (the optimizer's), and its guideline as a study prior (the spec's
``edge_of_chaos:`` section). Imported by the study only (:mod:`wus_tune.methods.study`).

Zhang et al. (2021) read the optimizer's knobs as one trajectory parameter, the effective ratio
``g = lr / ((1 - momentum) * batch_size)``: in the ordered phase the order parameter ``J**2`` grows
about linearly in the epoch at rate ``c * g``, and SGD weight decay ``lambda`` shrinks it by
``2 n g lambda J**2`` per epoch (``n`` training samples), so the decay that parks ``J`` at ``J_t`` is
``lambda* = c / (2 n J_t**2)`` (derivation and measurements: ``docs/methods/edge_of_chaos.md``,
functions: :mod:`wus_tune.methods.edge_of_chaos`). In a study this gives:

* ``effective_ratio: true`` (default): edge of chaos's knobs are searched as (``optim.ratio``,
  ``optim.momentum``, ``optim.batch_size``) and the learning rate is derived,
  ``lr = ratio * (1 - momentum) * batch_size`` (:func:`wus_tune._study.space.lr_from_ratio`); without the
  section its ``optim.lr`` is searched;
* ``guideline: true``: the configurations :func:`~wus_tune.methods.edge_of_chaos.guideline_configs`
  proposes (every ``ratios`` x ``momentum`` x ``batch_sizes``, weight decay ``lambda*``), each at every
  ``epochs_fractions`` of the epoch budget, are enqueued after the baselines (role ``guideline``);
* ``narrow_weight_decay: true``: the ``optim.weight_decay`` range becomes
  :func:`~wus_tune.methods.edge_of_chaos.narrowed_weight_decay_range` (``J`` between ``j_range``);
* ``log_j: true`` (default): every trial, baselines included, runs the ``edge_of_chaos`` method, so
  ``edge_of_chaos/J_mean`` & co. are logged each epoch (it never changes training).

Spec section (every key optional)::

    edge_of_chaos:
      effective_ratio: true
      log_j: true
      growth_rate: 19.6          # c, or "auto": a calibration run before the study (below)
      calibration_epochs: 10
      n_train: null              # training images (default: from the data config)
      guideline: true
      ratios: null               # default: the base recipe's ratio x [1/3, 1, 3]
      momentum: null             # default: [the base momentum]
      batch_sizes: null          # default: [the base batch size]
      epochs_fractions: [1.0]    # each guideline configuration at these fractions of the epochs
      narrow_weight_decay: true
      j_target: 1.0
      j_range: [0.8, 1.25]
      exponent: 1.0              # p of a measured growth law c * g**p (1: the paper's)

``growth_rate: auto`` trains the base recipe for ``calibration_epochs`` epochs with a constant learning
rate, no weight decay and no other method, and fits ``c`` to its ``J**2`` per epoch
(:func:`~wus_tune.methods.edge_of_chaos.fit_growth_rate`); the study does this before it starts
(:meth:`EdgeOfChaosStudy.prepare_section`) and prints ``c`` (write it into the spec to skip the run next time).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wus_tune._study.space import METHOD_KEY, RATIO_KEY
from wus_tune.errors import UsageError
from wus_tune.methods.edge_of_chaos import EdgeOfChaos
from wus_tune.methods.study import MethodStudy, SectionPlan

if TYPE_CHECKING:
    from wus_tune.config import TrainConfig
    from wus_tune.trainer import TrainResult

METHOD = EdgeOfChaos.name
_TRAIN_IMAGES = {"digits": 1797, "cifar10": 50000, "cifar100": 50000}  # training split of each source


@dataclass
class EdgeOfChaosSpec:
    """The spec's ``edge_of_chaos:`` section (see the module docstring)."""

    effective_ratio: bool = True
    log_j: bool = True
    growth_rate: float | str | None = None  # c, or "auto"
    calibration_epochs: int = 10
    n_train: int | None = None
    guideline: bool = False
    ratios: list[float] | None = None
    momentum: list[float] | None = None
    batch_sizes: list[int] | None = None
    epochs_fractions: list[float] = field(default_factory=lambda: [1.0])
    narrow_weight_decay: bool = False
    j_target: float = 1.0
    j_range: list[float] = field(default_factory=lambda: [0.8, 1.25])
    exponent: float = 1.0

    @property
    def needs_growth_rate(self) -> bool:
        return self.guideline or self.narrow_weight_decay


@dataclass(frozen=True, kw_only=True)
class Guideline(SectionPlan):
    """A resolved ``edge_of_chaos`` section: what the study searches and enqueues (``trials``: the
    guideline's, role ``guideline``; ``search_space``: the narrowed weight decay range)."""

    effective_ratio: bool
    growth_rate: float | None
    n_train: int
    weight_decay_range: tuple[float, float] | None


def train_size(base: TrainConfig, given: int | None = None) -> int:
    """Training images after the validation split (``n`` of the decay balance)."""
    if given is not None:
        return given
    d = base.data
    if d.name not in _TRAIN_IMAGES:
        raise UsageError(f"edge_of_chaos.n_train: give the number of training images for dataset {d.name!r}")
    n = d.subset or _TRAIN_IMAGES[d.name]
    n_val = round(n * d.val_fraction)
    if d.val_fraction > 0:
        n_val = min(max(n_val, 1), n - 1)
    return n - n_val


def base_ratio(base: TrainConfig) -> float:
    o = base.optim
    return o.lr / ((1.0 - o.momentum) * o.batch_size)


def resolve(eoc: EdgeOfChaosSpec, base: TrainConfig, methods: Sequence[str]) -> Guideline:
    """Validate the section and compute the narrowed decay range and the guideline configurations.
    With ``growth_rate: auto`` (not yet calibrated) neither is computed. Raises UsageError."""
    from wus_tune.methods.edge_of_chaos import guideline_configs, narrowed_weight_decay_range

    where = METHOD
    if METHOD not in methods:
        raise UsageError(f"{where}: add 'edge_of_chaos' to the spec's methods list to search its knobs")
    _check_positive(f"{where}.j_target", eoc.j_target)
    _check_positive(f"{where}.exponent", eoc.exponent)
    if len(eoc.j_range) != 2 or not 0 < eoc.j_range[0] < eoc.j_range[1]:
        raise UsageError(f"{where}.j_range: expected [low, high] with 0 < low < high, got {eoc.j_range}")
    if isinstance(eoc.calibration_epochs, bool) or eoc.calibration_epochs < 2:
        raise UsageError(f"{where}.calibration_epochs: expected an integer >= 2, got {eoc.calibration_epochs!r}")
    for i, f in enumerate(eoc.epochs_fractions):
        if not 0 < f <= 1:
            raise UsageError(f"{where}.epochs_fractions[{i}]: {f:g} is out of range (0, 1]")
    if eoc.n_train is not None and eoc.n_train < 1:
        raise UsageError(f"{where}.n_train: expected a positive integer, got {eoc.n_train!r}")
    c = eoc.growth_rate
    if isinstance(c, str) and c != "auto":
        raise UsageError(f"{where}.growth_rate: expected a number > 0 or 'auto', got {c!r}")
    if c is None and eoc.needs_growth_rate:
        raise UsageError(f"{where}.growth_rate: the guideline and narrow_weight_decay need c (a number, or 'auto')")
    if isinstance(c, (int, float)):
        _check_positive(f"{where}.growth_rate", c)
    n_train = train_size(base, eoc.n_train)
    g0 = base_ratio(base)
    ratios = eoc.ratios if eoc.ratios is not None else [g0 / 3, g0, g0 * 3]
    moms = eoc.momentum if eoc.momentum is not None else [base.optim.momentum]
    batches = eoc.batch_sizes if eoc.batch_sizes is not None else [base.optim.batch_size]
    for key, xs in (("ratios", ratios), ("momentum", moms), ("batch_sizes", batches)):
        if not xs:
            raise UsageError(f"{where}.{key}: expected a non-empty list")
    base = with_j_logging(base, eoc)
    if not isinstance(c, (int, float)):
        return Guideline(base=base, effective_ratio=eoc.effective_ratio, growth_rate=None, n_train=n_train,
                         weight_decay_range=None)  # fmt: skip
    kw = dict(growth_rate=float(c), n_train=n_train, exponent=eoc.exponent)
    wd_range = None
    configs: list[dict[str, Any]] = []
    try:
        if eoc.narrow_weight_decay:
            wd_range = narrowed_weight_decay_range(g0, j_range=(eoc.j_range[0], eoc.j_range[1]), **kw)
            if wd_range[1] > 1.0:
                raise ValueError(f"the narrowed weight decay range {wd_range} exceeds 1; check c and n_train")
        if eoc.guideline:
            proposed = guideline_configs({}, ratios=ratios, momentum=moms, batch_sizes=batches, j_target=eoc.j_target, **kw)
            if not proposed:
                raise ValueError("no configuration has a learning rate in (1e-5, 10]; check the ratios")
            epochs = sorted({max(1, round(f * base.epochs)) for f in eoc.epochs_fractions}, reverse=True)
            for params in proposed:
                values = {METHOD_KEY: METHOD, **params}
                if eoc.effective_ratio:  # search and enqueue in the same parametrisation
                    lr = values.pop("optim.lr")
                    values[RATIO_KEY] = float(f"{lr / ((1 - values['optim.momentum']) * values['optim.batch_size']):.12g}")
                configs += [values | {"epochs": n} for n in epochs]
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None
    # the guideline's range, where the spec gives none of its own
    space = {"optim.weight_decay": {"low": wd_range[0], "high": wd_range[1], "log": True}} if wd_range else {}
    return Guideline(base=base, search_space=space, trials=tuple(("guideline", values) for values in configs),
                     effective_ratio=eoc.effective_ratio, growth_rate=float(c), n_train=n_train,
                     weight_decay_range=wd_range)  # fmt: skip


def with_j_logging(base: TrainConfig, eoc: EdgeOfChaosSpec) -> TrainConfig:
    """The base config with the edge_of_chaos method on (``log_j``): every trial logs J each epoch."""
    if not eoc.log_j or METHOD in base.methods:
        return base
    return base.replace({f"methods.{METHOD}": {}})


def calibrate_growth_rate(
    base: TrainConfig, *, epochs: int = 10, fit: Callable[..., TrainResult] | None = None
) -> tuple[float, dict[str, Any]]:
    """Fit ``c`` of ``dJ^2/d(epoch) = c * g`` on the base recipe: ``epochs`` epochs at a constant learning
    rate, no weight decay, no other method. Returns ``(c, details)``."""
    from wus_tune.methods.edge_of_chaos import effective_ratio, fit_growth_rate

    if fit is None:
        from wus_tune.trainer import fit
    config = base.replace({
        "epochs": epochs, "optim.weight_decay": 0.0, "schedule.name": "constant", "schedule.warmup": 0.0,
        "methods": {METHOD: {}},
    })  # fmt: skip
    result = fit(config)
    j2 = [float(e.extra[f"{METHOD}/J2_mean"]) for e in result.epochs]
    g = effective_ratio(config.optim.lr, config.optim.momentum, config.optim.batch_size)
    c = fit_growth_rate(j2, g)
    if not (math.isfinite(c) and c > 0):
        raise UsageError(f"edge_of_chaos.growth_rate: calibration gave c = {c:g} (J**2 did not grow); give a number")
    return c, {"ratio": g, "j2_per_epoch": j2, "val_acc": result.val_acc, "time_s": result.time_s}


def _check_positive(key: str, v: Any) -> None:
    from wus_tune.errors import check_number

    check_number(key, v, above=0)


class EdgeOfChaosStudy(MethodStudy):
    """Edge of chaos in a study: it only measures (its entry stays in every trial that has it), its knobs
    are the optimizer's (so the study also runs tuned-plain trials), and its spec section is the guideline."""

    method = EdgeOfChaos
    tunes_optimizer = True
    measure_only = True
    SPEC_SECTION = EdgeOfChaosSpec
    # Its "knobs" are the optimizer's; a study searches either optim.lr or the virtual optim.ratio.
    SEARCH_SPACE = {
        "optim.lr": {"type": "float", "low": 0.005, "high": 0.5, "log": True, "doc": "peak learning rate"},
        RATIO_KEY: {"type": "float", "low": 3e-4, "high": 3e-2, "log": True,
                    "doc": "effective ratio lr / ((1 - momentum) * batch_size)"},
        "optim.momentum": {"type": "float", "low": 0.5, "high": 0.95, "doc": "SGD momentum"},
        "optim.batch_size": {"type": "categorical", "choices": [32, 64, 128, 256], "doc": "batch size"},
        "optim.weight_decay": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True, "doc": "SGD (coupled) weight decay"},
    }

    @classmethod
    def search_space(cls, section: EdgeOfChaosSpec | None = None) -> dict[str, dict[str, Any]]:
        """``optim.ratio`` instead of ``optim.lr`` with the section's ``effective_ratio``; ``optim.lr`` otherwise."""
        space = super().search_space()
        space.pop("optim.lr" if section is not None and section.effective_ratio else RATIO_KEY)
        return space

    @classmethod
    def plan_section(cls, section: EdgeOfChaosSpec, base: TrainConfig, methods: Sequence[str]) -> Guideline:
        return resolve(section, base, methods)

    @classmethod
    def prepare_section(cls, section: EdgeOfChaosSpec, base: TrainConfig, *, fit: Callable[..., TrainResult] | None,
                        say: Callable[[str], None]) -> EdgeOfChaosSpec:  # fmt: skip
        """``growth_rate: auto`` replaced by a number calibrated on ``base`` (one short run); the section
        itself otherwise."""
        if section.growth_rate != "auto":
            return section
        say(f"{METHOD}: calibrating the growth rate c ({section.calibration_epochs} epochs, no weight decay) ...")
        c, info = calibrate_growth_rate(base, epochs=section.calibration_epochs, fit=fit)
        say(f"{METHOD}: c = {c:.4g} (ratio {info['ratio']:.3g}, J^2 {info['j2_per_epoch'][0]:.3f} -> "
            f"{info['j2_per_epoch'][-1]:.3f}); put 'growth_rate: {c:.4g}' in the spec to skip this run")  # fmt: skip
        return dataclasses.replace(section, growth_rate=c)
