"""Plug-in speed-up methods: one training contract, :class:`Method`, that WUS and every other method implement.

A method is a set of pure functions (the maths, usable in any training loop) plus a thin :class:`Method`
subclass whose instance carries one run's state; :func:`wus_tune.fit` calls its hooks. The trainer has
no method-specific branch: whatever a method does, it does through the hooks below. What a *study* reads
about a method (its search space, default trials, model checks, baseline replay) is a separate class,
a :class:`wus_tune.methods.study.MethodStudy`, named by :attr:`Method.study` and imported only by the
study: training never imports the study side.

A config switches a method on by naming it with its keyword arguments (``methods: {wus: {threshold: 0.02},
approx_ops: {sample_ratio: 0.5}}``); :func:`build_methods` builds them in that order. ``Method(**params)``
round-trips a tuned config, because ``__init__`` only stores keyword arguments (the constructor's
keyword-only arguments, or the fields of a ``params_type`` dataclass: WUS's are ``WUSConfig``'s).
Besides ``name`` and ``params_type``, a class says where its study declaration is (``study``) and whether
its ordinary steps are the plain model's (``plain_full_steps``: they are then priced as the baseline's).

The hooks (each optional), in the order :func:`wus_tune.fit` calls them::

    model = method.setup(model, run)                # once; run is a RunInfo
    opt = method.make_optimizer(model, run)         # once; two methods returning one -> ConfigError
    method.attach(model, optimizer, run)            # once the optimizer exists (WUS builds its controller)
    plan = method.check_plan(run)                   # CheckPlan(every_steps, signal) or None: when it checks
                                                    # and on what; a val_acc check's validation pass is
                                                    # charged to the run (time and FLOPs)
    modes = method.warm_up_modes(model)             # context managers putting the model in each other step
                                                    # kind, so the untimed warm-up covers them (WUS: skip)
    for epoch:
        samples = method.epoch_samples(epoch, run)  # the training positions this epoch draws (None: all); at
                                                    # most one method chooses; its work is charged to the run
        for step:                                   # step: a StepContext (batch, model, optimizer, progress)
            factors = method.lr_factors(optimizer, run)   # per param-group LR factors; several multiply
            kind = method.step_kind()               # "" for an ordinary step, e.g. "skip:last:1"; the
                                                    # ledger keeps steps, time and FLOPs per kind
            if method.owns_step():                  # it runs forward and update itself: two owners ->
                cost = method.train_step(step)      # ConfigError; returns StepCost(loss, logits).
                                                    # Without an owner the trainer runs forward, backward,
                                                    # before_step, optimizer.step(), after_step. With one,
                                                    # the others' before_step/after_step run around it.
                                                    # FLOPs are counted around the real step
                                                    # (torch.utils.flop_counter), once per step kind.
            method.on_check(metrics, progress)      # when its CheckPlan is due: {"val_acc", "val_loss"} or
                                                    # {"train_acc"} (running accuracy since its last check)
        metrics = method.end_epoch(model, run)      # logged with the method's prefix: "lp_sphere/sparsity"
    state = method.state_dict()                     # at a snapshot (fit's recording); load_state_dict(state)
                                                    # when a run resumes from one

Installed packages add methods through the entry-point group ``wus_tune.methods``
(``my_method = my_package.module:MyMethod``): :func:`registry` finds them. The built-in ones are the
modules and packages of this one (``docs/methods/adding_a_method.md``).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, ContextManager

from wus_tune.errors import ConfigError, one_line

if TYPE_CHECKING:
    import torch

__all__ = [
    "Method", "RunInfo", "StepContext", "StepCost", "CheckPlan", "register", "registry", "build_methods",
    "validate_methods", "knob_defaults", "ENTRY_POINT_GROUP",
]


@dataclass(frozen=True)
class RunInfo:
    """What a method may read about the run, fixed before training starts."""

    config: Any  # the run's wus_tune.config.TrainConfig (not imported here: the config imports this module)
    device: torch.device
    steps_per_epoch: int
    total_steps: int
    batch_size: int  # the training batch size actually used (optim.batch_size, capped by the dataset)
    # the training split's loader, for a method that reads the whole set (WUS's frozen-prefix cache uses
    # len(train_loader.y) and train_loader.batches_in_order()); None outside wus_tune.fit
    train_loader: Any = None


@dataclass
class StepContext:
    """One training step as a method sees it. ``step`` and ``epoch`` count from 0. ``loss`` and ``logits``
    are set once the forward has run (before ``before_step``; from the owner's StepCost otherwise). An owner
    that trains on other examples than the batch (WUS on cached features) sets ``targets`` to theirs."""

    run: RunInfo
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    inputs: torch.Tensor
    targets: torch.Tensor
    step: int
    epoch: int
    forward: Callable[[torch.Tensor], torch.Tensor]  # the trainer's forward (compiled model, autocast)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    # each input's position in the training split (int64, on the device): what a method keeps per sample
    # (a recorded loss) is keyed by it; None where no split stands behind the batch
    indices: torch.Tensor | None = None

    @property
    def progress(self) -> float:
        """Fraction of training done before this step."""
        return self.step / max(1, self.run.total_steps)


@dataclass
class StepCost:
    """What an owned step reports: its loss and logits (for the curves and the divergence check)."""

    loss: torch.Tensor
    logits: torch.Tensor


@dataclass(frozen=True)
class CheckPlan:
    """When a method checks (every ``every_steps`` optimizer steps; 0: at each epoch's end) and on what:
    ``"val_acc"`` (a validation pass, charged to the run) or ``"train_acc"`` (the running training accuracy)."""

    every_steps: int
    signal: str


class Method:
    """Base class: override the hooks you need. ``name`` is the config key (``methods.<name>``) and the
    metric prefix (``<name>/...``); an instance carries one run's state."""

    name: ClassVar[str] = ""
    # The dataclass the keyword arguments fill, when the method keeps its knobs in one (WUS: WUSConfig);
    # None: the knobs are the constructor's keyword-only arguments.
    params_type: ClassVar[type | None] = None
    # Where its study-side declaration is, "package.module:Class" (a wus_tune.methods.study.MethodStudy
    # subclass: search space, default trials, baseline replay); imported by the study only. None: the
    # defaults (no searched knob, its trials train from scratch).
    study: ClassVar[str | None] = None
    # Its steps of the ordinary kind ("full") and its evaluations are the plain model's (WUS: only its skip
    # steps differ), so the pricing of a run's work reuses the baseline's own measurement for them.
    plain_full_steps: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params = params

    def setup(self, model: torch.nn.Module, run: RunInfo) -> torch.nn.Module:
        return model

    def make_optimizer(self, model: torch.nn.Module, run: RunInfo) -> torch.optim.Optimizer | None:
        return None

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run: RunInfo) -> None:
        pass

    def check_plan(self, run: RunInfo) -> CheckPlan | None:
        return None

    def on_check(self, metrics: dict[str, float], progress: float) -> None:
        pass

    def warm_up_modes(self, model: torch.nn.Module) -> list[ContextManager[Any]]:
        return []

    def lr_factors(self, optimizer: torch.optim.Optimizer, run: RunInfo) -> list[float] | None:
        return None

    def epoch_samples(self, epoch: int, run: RunInfo) -> torch.Tensor | None:
        """The positions in the training split that epoch ``epoch`` (from 0) draws from, each once in a fresh
        order; None: every sample. Asked before each epoch (again for the epoch a run resumes in: answer the
        same); an epoch with fewer batches makes fewer steps, and the learning-rate schedule follows the
        epochs, so it still ends where planned. At most one method of a run may override it."""
        return None

    def step_kind(self) -> str:
        return ""

    def owns_step(self) -> bool:
        """Whether this run's :meth:`train_step` replaces the trainer's step (default: it is overridden)."""
        return type(self).train_step is not Method.train_step

    def train_step(self, step: StepContext) -> StepCost | None:
        """Override to own the step; the trainer then neither runs the forward nor the backward."""
        return None

    def before_step(self, step: StepContext) -> None:
        pass

    def after_step(self, step: StepContext) -> None:
        pass

    def end_epoch(self, model: torch.nn.Module, run: RunInfo) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        """The method's run state for a snapshot (:class:`wus_tune.run_state.RunState`); None: it keeps none
        beyond the model and the optimizer."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take up :meth:`state_dict` (or a state the study derived, e.g. WUS's controller replayed on a
        plain run's signal) when a run resumes from a snapshot."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to configs under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    """Every method by name, in name order: the built-in ones (the modules of this package) and those of
    installed packages' ``wus_tune.methods`` entry points (each names a :class:`Method` subclass, e.g.
    ``freeze_first = my_pkg:FreezeFirst``)."""
    _load_builtin_methods()
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def knob_defaults(cls: type[Method]) -> dict[str, Any]:
    """A method's keyword arguments and their defaults: the fields of its ``params_type`` dataclass, or
    its constructor's keyword arguments (those without a default map to ``inspect.Parameter.empty``)."""
    if cls.params_type is not None:
        return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(cls.params_type)}  # fmt: skip
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}  # fmt: skip


def validate_methods(spec: Mapping[str, Mapping[str, Any]]) -> None:
    """Check method names and keyword names against the registry (values are checked on construction)."""
    build_methods(spec)


def build_methods(spec: Any) -> list[Method]:
    """The methods a config runs, in its order. ``spec`` is a TrainConfig or a config's ``methods``
    mapping; bad names or arguments raise ConfigError naming the key."""
    methods = spec if isinstance(spec, Mapping) else spec.methods
    if not methods:
        return []
    known = registry()
    out = []
    for name, params in methods.items():
        if name not in known:
            raise ConfigError(f"methods.{name}: unknown method; choose from {', '.join(sorted(known)) or 'none'}")
        out.append(_construct(known[name], params or {}))
    return out


def _construct(cls: type[Method], params: Mapping[str, Any]) -> Method:
    accepted = knob_defaults(cls)
    takes_any = cls.params_type is None and any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    for key in params:
        if key not in accepted and not takes_any:
            raise ConfigError(f"methods.{cls.name}.{key}: unknown argument (known: {', '.join(accepted)})")
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"methods.{cls.name}: {e}") from None


_builtins_loaded = False


def _load_builtin_methods() -> None:
    # Importing a method module registers it; every module and package of this one is a method, or a
    # part of the contract (`study`: what the study reads) that registers none.
    global _builtins_loaded
    import importlib
    import pkgutil

    if _builtins_loaded:
        return
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    _builtins_loaded = True


ENTRY_POINT_GROUP = "wus_tune.methods"
_entry_points_seen: set[tuple[str, str]] = set()
_scanned_path: tuple[str, ...] | None = None


def _load_entry_points() -> None:
    """Register the methods that installed packages declare; each entry point is loaded once.

    Scanning the installed distributions takes tens of milliseconds and configs are validated often, so
    the scan is repeated only when ``sys.path`` changed (a package put on it during the process is found).
    """
    global _scanned_path
    from importlib.metadata import entry_points

    if _scanned_path == tuple(sys.path):
        return
    _scanned_path = tuple(sys.path)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if (ep.name, ep.value) in _entry_points_seen:
            continue
        _entry_points_seen.add((ep.name, ep.value))
        try:
            cls = ep.load()
        except Exception as e:  # a broken plug-in must not break the built-in methods
            warnings.warn(f"entry point {ENTRY_POINT_GROUP}:{ep.name} = {ep.value} failed to load: {one_line(e)}",
                          stacklevel=3)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
            warnings.warn(f"entry point {ENTRY_POINT_GROUP}:{ep.name} = {ep.value} is not a Method subclass "
                          "with a name; ignored", stacklevel=3)
            continue
        _REGISTRY.setdefault(cls.name, cls)
