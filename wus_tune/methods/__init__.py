"""Plug-in speed-up methods: one contract, :class:`Method`, that WUS and every other method implement.

A method is a set of pure functions (the maths, usable in any training loop) plus a thin :class:`Method`
subclass. The class carries the method's *study data* (classmethods: read without building a run); an
instance carries one run's state, and :func:`wus_tune.fit` calls its *run-time hooks*. The trainer has
no method-specific branch: whatever a method does, it does through the hooks below.

Study data (classmethods and class attributes)::

    name                      registry key and metric prefix ("wus/skip_windows")
    combines_with_wus         may run beside WUS in one trial ("approx_ops+wus")
    partner                   the method others combine with, tuned by a study without `methods:` (WUS)
    VIRTUAL_KEYS              {virtual key: values}, first = off, last = on as configured (WUS: wus.variant)
    tunes_optimizer           its search space has optim.* knobs (edge_of_chaos)
    measure_only              changes nothing in training (a base config's entry stays in every trial)
    enabled(config)           is it on in this TrainConfig? (default: name in config.methods; WUS: wus.enabled)
    from_config(config)       the instance (default: cls(**config.methods[name]); WUS: from config.wus)
    switch(on)                dotted-key overrides turning it on ({"methods.<name>": {}}; WUS: {"wus.enabled": on})
    search_space()            {dotted key: spec search_space entry (type/low/high/log/choices/when/doc)}
    default_trials()          [dotted-key overrides of each default trial]
    expand_virtual(values)    pops its virtual keys (WUS: wus.variant) and returns the overrides they imply
    check_model(model, cfg)   None, or a one-line reason why it cannot act on this ModelConfig
    check_module(net, cfg)    the same for the built nn.Module (asked once before a study's first trial)

Run-time hooks (each optional), in the order :func:`wus_tune.fit` calls them::

    model = method.setup(model, run)                # once; run is a RunInfo
    opt = method.make_optimizer(model, run)         # once; two methods returning one -> ConfigError
    method.attach(model, optimizer, run)            # once the optimizer exists (WUS builds its controller)
    plan = method.check_plan(run)                   # CheckPlan(every_steps, signal) or None: when it checks
                                                    # and on what; a val_acc check's validation pass is
                                                    # charged to the run (time and FLOPs)
    modes = method.warm_up_modes(model)             # context managers putting the model in each other step
                                                    # kind, so the untimed warm-up covers them (WUS: skip)
    for epoch:
        for step:                                   # step: a StepContext (batch, model, optimizer, progress)
            factors = method.lr_factors(optimizer, run)   # per param-group LR factors; several multiply
            kind = method.step_kind()               # "" for an ordinary step, e.g. "skip:last:1"; the
                                                    # ledger keeps steps, time and FLOPs per kind
            cost = method.train_step(step)          # optional: OWNS the step (forward, update) and returns
                                                    # StepCost(loss, logits); two owners -> ConfigError.
                                                    # Without an owner the trainer runs forward, backward,
                                                    # before_step, optimizer.step(), after_step. With one,
                                                    # the others' before_step/after_step run around it.
                                                    # FLOPs are counted around the real step
                                                    # (torch.utils.flop_counter), once per step kind.
            method.on_check(metrics, progress)      # when its CheckPlan is due: {"val_acc", "val_loss"} or
                                                    # {"train_acc"} (running accuracy since its last check)
        metrics = method.end_epoch(model, run)      # logged with the method's prefix: "lp_sphere/sparsity"
    state = method.state_dict()                     # at a snapshot (fit's probes); load_state_dict(state) on resume

Baseline reuse (classmethods; a study asks them in :mod:`wus_tune._study.reuse`). A method whose trial
*is* plain training up to a point it can compute from a plain run's probes opts in by overriding
``baseline_recording``; with the defaults its trials train from scratch::

    config_section()                 dotted key of its settings ("methods.<name>"; WUS: "wus")
    RECORDED_KNOBS                   its knobs that change what the baseline records; a trial must share the
                                     baseline's values (WUS: signal, check_every)
    baseline_recording(config)       BaselineRecording(every_steps, val_acc): the probes a baseline of this
                                     config must record; None (default): not predictable from a baseline
    deviation_checks(space, base, progress)
                                     the probes after which some trial of the space could first deviate
                                     (the baseline snapshots only these); default none
    replay_baseline(config, probes)  Deviation(check, states, metrics, charges_probes): the probe after
                                     which the trial first trains differently (None: never, it is the
                                     baseline) and what a fork from an earlier probe loads; default: it
                                     deviates from the first step
    calibrate_space(space, base, probes, explicit)
                                     (space with its own knobs' ranges fitted to the baseline's probes,
                                     note lines); default unchanged

A trial is predicted only when exactly one of its methods opts in and its config equals the baseline's
outside that method's section (``RECORDED_KNOBS`` included). The answer must be exact, not an estimate:
a trial reused on a wrong ``Deviation`` is recorded with the baseline's values, a wrong result.

A config names methods and their keyword arguments (``methods: {approx_ops: {sample_ratio: 0.5}}``);
``Method(**params)`` round-trips a tuned config, because ``__init__`` only stores keyword arguments.
Installed packages add methods through the entry-point group ``wus_tune.methods``
(``my_method = my_package.module:MyMethod``): :func:`registry` finds them.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, ContextManager

from wus_tune.errors import ConfigError, one_line

if TYPE_CHECKING:
    import torch

    from wus_tune._study.space import SearchSpace
    from wus_tune.config import TrainConfig

__all__ = [
    "Method", "RunInfo", "StepContext", "StepCost", "CheckPlan", "BaselineRecording", "Deviation", "register",
    "registry", "build_methods", "validate_methods", "ENTRY_POINT_GROUP",
]


@dataclass(frozen=True)
class RunInfo:
    """What a method may read about the run, fixed before training starts."""

    config: TrainConfig
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


@dataclass(frozen=True)
class BaselineRecording:
    """What a plain baseline run must record for a method's trials to be predicted from it: a probe
    (:class:`wus_tune.run_state.Probes`) every ``every_steps`` optimizer steps (0: at each epoch's end),
    with a validation pass at each probe when ``val_acc``."""

    every_steps: int
    val_acc: bool


@dataclass
class Deviation:
    """Where a trial first trains differently from the baseline, found on the baseline's probes, and what
    a run forked from the baseline's snapshot at probe ``j <= check`` takes over.

    ``check`` is the 1-based probe after which the trial leaves plain training (0: from its first step;
    None: never, the trial *is* the baseline). ``states[j - 1]`` is the method's ``state_dict()`` after
    probe ``j`` as the trial would have it (loaded on a fork; empty: the method keeps no state);
    ``metrics[j - 1]`` its ``end_epoch`` metrics then (shown on the fork's prefix epochs; empty: none).
    ``charges_probes``: the trial's own run pays a validation pass at each probe (a ``val_acc`` CheckPlan),
    so a fork is charged the prefix's passes, which the baseline measured but did not pay."""

    check: int | None
    states: Sequence[dict[str, Any] | None] = ()
    metrics: Sequence[dict[str, float]] = ()
    charges_probes: bool = False


class Method:
    """Base class: override the hooks you need. ``name`` is the registry key and the metric prefix.

    The class carries the method's study data (classmethods, read without building a run); an instance
    carries one run's state and is called by the trainer at the hook points.
    """

    name: ClassVar[str] = ""
    combines_with_wus: ClassVar[bool] = False  # may run beside WUS in one trial ("approx_ops+wus")
    # its search space has optim.* knobs (edge_of_chaos): a study then also runs tuned-plain trials searching
    # the same knobs with the same budget, its fair yardstick (wus_tune._study.tuned_plain)
    tunes_optimizer: ClassVar[bool] = False
    measure_only: ClassVar[bool] = False  # changes nothing in training: a base config's entry stays in every trial
    # The method the others combine with ("approx_ops+wus") and the one a study without a ``methods:`` list
    # tunes (on in its trials unless a virtual key turns it off): WUS.
    partner: ClassVar[bool] = False
    # Its virtual keys (popped by ``expand_virtual``) and their values: the first turns it off, the last
    # turns it on as configured (the value a study assumes when the key is neither searched nor fixed).
    VIRTUAL_KEYS: ClassVar[dict[str, tuple[Any, ...]]] = {}
    # The searched knobs, as a spec's ``search_space:`` entries (type/low/high/log/choices/when/doc), keyed by
    # dotted TrainConfig key; the study adds ``when: {method: [choices naming this method]}``.
    SEARCH_SPACE: ClassVar[dict[str, dict[str, Any]]] = {}
    # The default trial's knobs where they differ from the constructor's defaults (the card's suggestions).
    DEFAULT_TRIAL: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        self.params = params

    # ---- study data (classmethods) ---------------------------------------------------------------

    @classmethod
    def enabled(cls, config: Any) -> bool:
        """Is this method on in ``config`` (a TrainConfig)?"""
        return cls.name in config.methods

    @classmethod
    def from_config(cls, config: Any) -> "Method":
        """The method instance for ``config``; bad arguments raise ConfigError naming the key."""
        return _construct(cls, config.methods.get(cls.name) or {})

    @classmethod
    def switch(cls, on: bool) -> dict[str, Any]:
        """Dotted-key config overrides that turn the method on (off: the study removes ``methods.<name>``)."""
        return {f"methods.{cls.name}": {}} if on else {}

    @classmethod
    def search_space(cls) -> dict[str, dict[str, Any]]:
        return {key: dict(value) for key, value in cls.SEARCH_SPACE.items()}

    @classmethod
    def default_trials(cls) -> list[dict[str, Any]]:
        """Dotted-key overrides of each default trial: the searched ``methods.<name>.*`` knobs at the
        constructor's defaults, overlaid by :attr:`DEFAULT_TRIAL`."""
        signature = inspect.signature(cls.__init__).parameters
        prefix = f"{cls.config_section()}."
        knobs = [key[len(prefix):] for key in cls.SEARCH_SPACE if key.startswith(prefix)]
        trial = {f"{prefix}{k}": signature[k].default for k in knobs
                 if k in signature and signature[k].default is not inspect.Parameter.empty}
        trial.update({f"{prefix}{k}": v for k, v in cls.DEFAULT_TRIAL.items()})
        return [trial]

    @classmethod
    def expand_virtual(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Pop this method's virtual keys from ``values``; return the config overrides they imply."""
        return {}

    @classmethod
    def check_model(cls, model: Any, config: Any) -> str | None:
        """None when the method can act on ``model`` (a ModelConfig); else a one-line reason.

        Called when a spec is resolved, before anything is built, so it can judge only what the config
        says (a built-in model's name and depth); the built network is :meth:`check_module`'s."""
        return None

    @classmethod
    def check_module(cls, module: torch.nn.Module, config: Any) -> str | None:
        """None when the method can act on the built network ``module`` (a user's factory or object
        included); else a one-line reason. A study asks it once before any trial, on the model its
        trials will build; ``setup`` should raise a ConfigError for the same reason."""
        return None

    # ---- baseline reuse (classmethods; see the module docstring) --------------------------------------

    # Its own knobs (under config_section()) that change what the baseline records: a trial whose value
    # differs from the baseline's cannot be predicted from it.
    RECORDED_KNOBS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def config_section(cls) -> str:
        """The dotted TrainConfig key holding this method's settings."""
        return f"methods.{cls.name}"

    @classmethod
    def baseline_recording(cls, config: TrainConfig) -> BaselineRecording | None:
        """The probes a plain run of ``config`` must record to predict this method's trials from it; None:
        they cannot be predicted (they train from scratch)."""
        return None

    @classmethod
    def deviation_checks(cls, space: SearchSpace, base: TrainConfig, progress: Sequence[float]) -> list[int]:
        """The probes (1-based; ``progress[k - 1]`` is the training fraction at probe ``k``) after which
        some trial of ``space`` on ``base`` could first deviate from plain training: the baseline keeps a
        snapshot only there."""
        return []

    @classmethod
    def replay_baseline(cls, config: TrainConfig, probes: Sequence[Mapping[str, Any]]) -> Deviation:
        """Where a trial of ``config`` first deviates from the baseline whose probes (ProbeRecord dicts,
        as :meth:`baseline_recording` asked) are given. Called only when :meth:`baseline_recording` is
        not None and the trial equals the baseline outside this method's section."""
        return Deviation(check=0)

    @classmethod
    def calibrate_space(cls, space: SearchSpace, base: TrainConfig, probes: Sequence[Mapping[str, Any]], *,
                        explicit: Sequence[str] = ()) -> tuple[SearchSpace, list[str]]:  # fmt: skip
        """``space`` with this method's knob ranges fitted to the baseline's probes, and the one-line notes
        to print; a key in ``explicit`` (the spec's own ``search_space:`` entries) keeps its range."""
        return space, []

    # ---- run-time hooks (see the module docstring) -------------------------------------------------

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

    def step_kind(self) -> str:
        return ""

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

    @classmethod
    def owns_step(cls) -> bool:
        return cls.train_step is not Method.train_step

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
    """Every method: the built-in ones (WUS first), then those of installed packages' ``wus_tune.methods``
    entry points (each names a :class:`Method` subclass, e.g. ``freeze_first = my_pkg:FreezeFirst``)."""
    _load_builtin_methods()
    _load_entry_points()
    return dict(_REGISTRY)


def validate_methods(spec: dict[str, dict[str, Any]]) -> None:
    """Check method names and keyword names against the registry (values are checked on construction)."""
    build_methods(spec)


def build_methods(spec: Any) -> list[Method]:
    """The methods a config runs, in order. ``spec`` is a TrainConfig (WUS included when on) or a config's
    ``methods`` mapping; bad names or arguments raise ConfigError."""
    known = registry()
    # a method with a section of its own (WUS: "wus") is switched on there, not under methods:
    own_section = {name: cls for name, cls in known.items() if cls.config_section() != f"methods.{name}"}
    if not isinstance(spec, dict):
        config = spec
        return [cls.from_config(config) for cls in own_section.values() if cls.enabled(config)] + build_methods(config.methods)
    if not spec:
        return []
    methods = []
    for name, params in spec.items():
        if name in own_section:
            section = own_section[name].config_section()
            raise ConfigError(f"methods.{name}: {name} is configured in its own section ({section}: {{enabled: true, ...}})")
        if name not in known:
            listed = ", ".join(sorted(set(known) - set(own_section))) or "none"
            raise ConfigError(f"methods.{name}: unknown method; choose from {listed}")
        methods.append(_construct(known[name], params or {}))
    return methods


def _construct(cls: type[Method], params: dict[str, Any]) -> Method:
    accepted = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for key in params:
        if key not in accepted and not takes_any:
            names = [p for p in accepted if p != "self"]
            raise ConfigError(f"methods.{cls.name}.{key}: unknown argument (known: {', '.join(names)})")
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"methods.{cls.name}: {e}") from None


def _load_builtin_methods() -> None:
    # Importing a method module registers it.
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


_BUILTIN_MODULES: list[str] = [
    "wus_tune.methods.wus", "wus_tune.methods.approx_ops", "wus_tune.methods.lp_sphere",
    "wus_tune.methods.edge_of_chaos", "wus_tune.methods.gauss_newton",
]
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
