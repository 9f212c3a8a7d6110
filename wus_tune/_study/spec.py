"""A study spec: everything a study needs, from a YAML file (``studies/*.yaml``) and/or the CLI.

Format (every key optional; unknown keys are errors)::

    name: vgg11-cifar10             # study name = MLflow experiment name (default: <model>-<dataset>)
    description: ...
    train:                          # the base TrainConfig (the format of `python -m wus_tune.train --config`)
      model: {name: vgg11, width: 0.25}
      data: {name: cifar10, subset: 10000}
      schedule: {name: step, milestones: [0.5, 0.75]}
      epochs: 16
    objectives: [accuracy, relative_time]  # time in full-length baseline runs (the default; wus_tune.timing), or
                                    # "accuracy,time" (wall seconds), "accuracy,cost" (FLOPs), "accuracy,relative_time,cost";
                                    # a last "sparsity" or "params" adds Lp-sphere sparsity
    confirm: 0                      # after the trials, re-run the pick, the baseline and a frontier point this
                                    # many times each (wus_tune.confirm); 0: no confirmation
    methods: [wus]                  # the methods compared (default [wus]): none, wus, approx_ops, lp_sphere,
                                    # gauss_newton (2-layer mlp), edge_of_chaos, approx_ops+wus, lp_sphere+wus, edge_of_chaos+wus
    edge_of_chaos: null             # the effective-ratio space and the guideline prior (wus_tune._study.guideline)
    sampler: tpe                    # tpe | nsga2 | gp
    sampler_options: {n_startup_trials: 8}   # keyword arguments of the Optuna sampler
    seed: 0
    n_trials: 30                    # trials per invocation (a re-run adds this many more)
    timeout: null                   # seconds per invocation
    storage: null                   # Optuna storage URL (default sqlite:///studies/<name>.db)
    tracking_uri: null              # MLflow (default $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db; "none": off)
    constraint_delta: null          # points: feasible iff accuracy >= baseline - delta
    baseline_fractions: [0.5, 0.7, 0.85]   # plain runs at these fractions of the epochs: the baseline frontier
    baseline_repeats: 1             # full-length baselines (seeds seed, seed+1, ...; the last ones after the
                                    # other first trials); comparisons use their median
    enqueue_wus_default: true       # enqueue WUS with its default knobs
    enqueue: [{wus.variant: wus, wus.threshold: 0.02}]   # more trials to run first (dotted keys)
    default_search_space: true      # start from the default space (wus_tune._study.space)
    search_space:                   # override (merge), add, or remove (null) parameters
      wus.threshold: {low: 0.002, high: 0.03}
      schedule.name: {choices: [step, cosine, onecycle]}
      wus.lr_decay: null
    select: fastest-within:1.0      # rule for the exported best_config.yaml (wus_tune.pareto)
    pruner: none                    # none | pareto: stop trials off the front at rungs (docs/study.md, "Early stopping")
    pruner_options: {eta: 3, min_epochs: 2}   # wus_tune._study.pruning.PrunerSettings
    accuracy_margin: 0.05           # hypervolume reference: baseline accuracy - margin ...
    cost_factor: 1.25               # ... and baseline time (or cost) * factor
    max_trials: null                # study-wide budget shared by all workers (docs/study.md, "Scale out")
    heartbeat_interval: 30          # seconds between a running trial's heartbeats (null: off)
    grace_period: null              # seconds without one before a trial is stale and re-queued (default 3 x interval)
    max_retry: 2                    # times a stale or interrupted trial is re-queued
    reconnect_timeout: 120          # seconds a lost storage or MLflow server is retried before the worker stops
    ray: null                       # run the trials on a Ray cluster: auto | local | HOST:PORT (docs/study.md, "Ray")
    gpus_per_trial: null            # with ray: GPUs per trial, fractions share a GPU (default 0)
    cpus_per_trial: null            # with ray: CPUs per trial (default 1)
    reuse: {replay: true, fork: true, calibrate: true, max_checkpoints: 8}   # learn from the baseline (wus_tune._study.reuse)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wus_tune._study.catalog import check_method_model, check_methods, method_default_trials
from wus_tune._study.front import OBJECTIVES, Rule, parse_rule
from wus_tune._study.guideline import EdgeOfChaosSpec, Guideline, with_j_logging
from wus_tune._study.guideline import resolve as resolve_guideline
from wus_tune._study.reuse import ReuseSpec
from wus_tune._study.space import METHOD_KEY, SearchSpace, apply_values
from wus_tune._study.storage import DEFAULT_TRACKING_URI, default_storage
from wus_tune.errors import ConfigError, UsageError, check_number

if TYPE_CHECKING:
    import optuna

    from wus_tune._study.pruning import PrunerSettings
    from wus_tune.config import TrainConfig
    from wus_tune.trainer import TrainResult

SAMPLERS = ("tpe", "nsga2", "gp")


@dataclass
class StudySpec:
    """The raw spec, as written; :meth:`resolve` validates it into a :class:`ResolvedStudy`."""

    name: str | None = None
    description: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    objectives: Any = "accuracy,relative_time"  # "accuracy,relative_time" or a list
    methods: list[str] = field(default_factory=lambda: [_partner_name()])  # the compared methods (default: the partner)
    edge_of_chaos: EdgeOfChaosSpec | None = None  # the effective-ratio space and the guideline prior
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    n_trials: int | None = 20
    timeout: float | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    constraint_delta: float | None = None
    baseline_fractions: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.85])
    baseline_repeats: int = 1
    enqueue_wus_default: bool = True
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    default_search_space: bool = True
    search_space: dict[str, Any] = field(default_factory=dict)
    select: str = "fastest-within:1.0"
    pruner: str = "none"  # none | pareto (wus_tune._study.pruning)
    pruner_options: dict[str, Any] = field(default_factory=dict)
    confirm: int = 0  # confirmation repeats of the pick at the end of the study (wus_tune.confirm)
    accuracy_margin: float = 0.05
    cost_factor: float = 1.25
    max_trials: int | None = None  # workers and faults: read through wus_tune._study.workers.settings
    heartbeat_interval: int | None = 30
    grace_period: int | None = None
    max_retry: int | None = 2
    reconnect_timeout: float = 120.0
    ray: str | None = None  # a Ray cluster runs the trials: auto | local | HOST:PORT (wus_tune._study.ray_backend)
    gpus_per_trial: float | None = None  # with ray: GPUs each trial asks for (0.25: four trials share a GPU); default 0
    cpus_per_trial: float | None = None  # with ray: CPUs each trial asks for; default 1
    reuse: ReuseSpec = field(default_factory=ReuseSpec)  # replay / fork / calibrate on the baseline's run
    source: str = field(default="", metadata={"internal": True})  # where it came from, for messages

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "spec") -> StudySpec:
        from wus_tune.config import _build  # the config's typed mapping parser, reused for one behaviour

        if not isinstance(raw, Mapping):
            raise UsageError(f"{source}: expected a mapping at the top level")
        if "source" in raw:
            raise UsageError(f"{source}: source: unknown key")
        try:
            spec = _build(cls, dict(raw), "")
        except ConfigError as e:
            raise UsageError(f"{source}: {e}") from None
        spec.source = source
        return spec

    @classmethod
    def load(cls, path: str | Path) -> StudySpec:
        from wus_tune.config import load_mapping

        raw = load_mapping(path)  # ConfigError (a UsageError) names the file
        spec = cls.from_dict(raw, str(path))
        if spec.name is None:
            spec.name = Path(path).stem
        return spec

    def set_train(self, dotted: str, value: Any) -> None:
        """Set a base-config key (``"model.name"``) in the nested ``train`` mapping."""
        node = self.train
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        node[leaf] = value

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def resolve(self) -> ResolvedStudy:
        """Validate everything (names, ranges, the base config, every corner of the search space) without
        touching any store. Raises :class:`UsageError` with one line."""
        where = f"{self.source}: " if self.source and self.source != "cli" else ""
        try:
            return self._resolve()
        except UsageError as e:
            raise UsageError(f"{where}{e}") from None

    def _resolve(self) -> ResolvedStudy:
        """The steps of :meth:`resolve`, in the order their errors are reported."""
        from wus_tune._study.pruning import parse_settings
        from wus_tune.config import TrainConfig

        objectives = parse_objectives(self.objectives)
        self._check_settings()
        rule = parse_rule(self.select)
        pruner = parse_settings(self.pruner, self.pruner_options)
        reuse = self.reuse.validate()
        base = TrainConfig.from_dict(self.train)
        methods = check_methods(self.methods)
        check_method_model(methods, base)
        base, space, guide = self._search_space(base, methods)
        method_trials = self._method_trials(base, space, methods, guide)
        self._check_enqueue(base)
        make_sampler(self.sampler, self.sampler_options, seed=self.seed)  # bad options fail here
        name = self.name or f"{base.model.name}-{base.data.name}"
        tracking = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        return ResolvedStudy(
            name=name,
            base=base,
            space=space,
            objectives=objectives,
            sampler=self.sampler,
            sampler_options=dict(self.sampler_options),
            seed=self.seed,
            n_trials=self.n_trials,
            timeout=self.timeout,
            storage=self.storage or default_storage(name),
            default_storage=self.storage is None,
            tracking_uri=None if tracking.lower() == "none" else tracking,
            constraint_delta=self.constraint_delta,
            baseline_fractions=tuple(self.baseline_fractions),
            baseline_repeats=self.baseline_repeats,
            enqueue_wus_default=self.enqueue_wus_default,
            enqueue=tuple(dict(e) for e in self.enqueue),
            select=rule,
            confirm=self.confirm,
            accuracy_margin=self.accuracy_margin,
            cost_factor=self.cost_factor,
            spec=self.to_dict(),
            methods=methods,
            method_trials=tuple(method_trials),
            guideline=guide,
            pruner=pruner,
            reuse=reuse,
        )

    def _check_settings(self) -> None:
        """The scalar keys: sampler, counts, numbers, the workers' and Ray's keys, the baseline fractions."""
        if self.sampler not in SAMPLERS:
            raise UsageError(f"sampler: unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        _check_int("seed", self.seed, 0)
        _check_int("confirm", self.confirm, 0)
        _check_int("baseline_repeats", self.baseline_repeats, 1)
        if self.n_trials is not None:
            _check_int("n_trials", self.n_trials, 1)
        for key in ("timeout", "constraint_delta", "accuracy_margin", "cost_factor"):
            if getattr(self, key) is not None:
                check_number(key, getattr(self, key), what="a finite number")
        if self.timeout is not None and self.timeout <= 0:
            raise UsageError(f"timeout: must be positive seconds, got {self.timeout:g}")
        if self.accuracy_margin < 0 or self.cost_factor < 1:
            raise UsageError("accuracy_margin must be >= 0 and cost_factor >= 1")
        from wus_tune._study.ray_plan import check_settings as check_ray_settings
        from wus_tune._study.workers import check_settings

        check_settings(self)
        check_ray_settings(self)
        for i, f in enumerate(self.baseline_fractions):
            if not 0 < f <= 1:
                raise UsageError(f"baseline_fractions[{i}]: {f:g} is out of range (0, 1]")

    def _search_space(self, base: TrainConfig, methods: tuple[str, ...]) -> tuple[TrainConfig, SearchSpace, Guideline | None]:
        """The search space over ``methods``, checked against the base config; with an ``edge_of_chaos``
        section, its guideline too (and the base config that logs J)."""
        guide: Guideline | None = None
        overrides = dict(self.search_space)
        if self.edge_of_chaos is not None:
            guide = resolve_guideline(self.edge_of_chaos, base, methods)
            base = with_j_logging(base, self.edge_of_chaos)
            if guide.weight_decay_range is not None:  # the guideline's range; a spec entry still wins
                low, high = guide.weight_decay_range
                overrides = {"optim.weight_decay": {"low": low, "high": high, "log": True}} | overrides
        space = SearchSpace.build(
            overrides, defaults=self.default_search_space, methods=methods,
            effective_ratio=guide is not None and guide.effective_ratio,
        )  # fmt: skip
        space.check(base)
        return base, space, guide

    @staticmethod
    def _method_trials(base: TrainConfig, space: SearchSpace, methods: tuple[str, ...],
                       guide: Guideline | None) -> list[tuple[str, dict[str, Any]]]:  # fmt: skip
        """One default trial per compared method (the guideline's trials replace edge of chaos's), each
        checked to make a valid config."""
        method_trials = method_default_trials(space, base, methods)
        if guide is not None and guide.configs:  # the guideline's trials replace edge of chaos's default
            method_trials = [t for t in method_trials if t[1].get("method") != "edge_of_chaos"]
            method_trials += [("guideline", space.fixed_at_base(base, values)) for values in guide.configs]
        for _, values in method_trials:
            try:
                apply_values(base, values)
            except ConfigError as e:
                raise UsageError(f"methods: the default trial {values.get('method')!r} is not a valid config: {e}") from None
        return method_trials

    def _check_enqueue(self, base: TrainConfig) -> None:
        for i, entry in enumerate(self.enqueue):
            try:
                apply_values(base, entry)
            except ConfigError as e:
                raise UsageError(f"enqueue[{i}]: {e}") from None


@dataclass(frozen=True)
class ResolvedStudy:
    """A validated spec: what :func:`wus_tune.study.run_study` runs (not an ``optuna.Study``: the Optuna
    study it runs in is opened from ``name`` and ``storage``)."""

    name: str
    base: TrainConfig
    space: SearchSpace
    objectives: tuple[str, ...]
    sampler: str
    sampler_options: dict[str, Any]
    seed: int
    n_trials: int | None
    timeout: float | None
    storage: str
    default_storage: bool
    tracking_uri: str | None  # None: MLflow off
    constraint_delta: float | None
    baseline_fractions: tuple[float, ...]
    enqueue_wus_default: bool
    enqueue: tuple[dict[str, Any], ...]
    select: Rule
    accuracy_margin: float
    cost_factor: float
    spec: dict[str, Any]
    confirm: int = 0
    baseline_repeats: int = 1
    methods: tuple[str, ...] = ()  # resolve() always sets it; a spec's default is the partner method alone
    # (role, fixed values) enqueued after the baseline frontier: one default per method, guideline trials
    method_trials: tuple[tuple[str, dict[str, Any]], ...] = ()
    guideline: Guideline | None = None
    pruner: PrunerSettings | None = None  # None: every trial runs to its last epoch
    reuse: ReuseSpec = field(default_factory=ReuseSpec)

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o][0] for o in self.objectives]


def initial_trials(study_def: ResolvedStudy) -> list[tuple[str, dict[str, Any]]]:
    """(role, fixed values) of the trials a new study runs first: the full-length baseline (the partner
    method off: its virtual keys at their first value), the partner's default trial (role
    ``<partner>-default``, e.g. ``wus-default``), the baseline frontier (``baseline_fractions`` of the
    epochs; crossed with every ``schedule.name`` choice when the schedule is searched), one default
    trial per compared method and
    the edge-of-chaos guideline's trials (``study_def.method_trials``), then the spec's ``enqueue`` entries.

    Every searched knob of these trials is fixed at the base config's value, so "baseline" and the
    partner's default mean the spec's own recipe, not a sampled one.
    """
    from wus_tune._study.catalog import partner, partner_virtual

    base, space = study_def.base, study_def.space
    epochs = base.epochs
    methods = METHOD_KEY in space  # a study comparing methods: the baselines are method "none"
    plain = space.fixed_at_base(base, partner_virtual(0) | ({METHOD_KEY: "none"} if methods else {}))
    out: list[tuple[str, dict[str, Any]]] = [("baseline", plain | {"epochs": epochs})]
    own = partner()
    if study_def.enqueue_wus_default and own is not None and (not methods or own.name in space[METHOD_KEY].choices):
        trial = own.default_trials()[0] | ({METHOD_KEY: own.name} if methods else {})
        out.append((f"{own.name}-default", space.fixed_at_base(base, trial) | {"epochs": epochs}))
    budgets = sorted({max(1, round(f * epochs)) for f in study_def.baseline_fractions} - {epochs}, reverse=True)
    schedules = [base.schedule.name]
    if "schedule.name" in space and space["schedule.name"].type == "categorical":
        schedules += [s for s in space["schedule.name"].choices if s != base.schedule.name]
    for schedule in schedules:
        for n in ([] if schedule == base.schedule.name else [epochs]) + budgets:
            out.append(("baseline-frontier", plain | {"epochs": n, "schedule.name": schedule}))
    out += [(role, dict(values)) for role, values in study_def.method_trials]
    # More baselines, with other seeds, measured later in the study: its accuracy and time are medians.
    out += [("baseline", plain | {"epochs": epochs, "seed": base.seed + k})
            for k in range(1, getattr(study_def, "baseline_repeats", 1))]  # fmt: skip
    out += [("enqueued", dict(e)) for e in study_def.enqueue]
    return out


def calibrated(
    spec: StudySpec, study: ResolvedStudy, *, fit: Callable[..., TrainResult] | None, say: Callable[[str], None]
) -> ResolvedStudy:
    """``study`` resolved again with ``edge_of_chaos.growth_rate: auto`` replaced by a calibrated number;
    unchanged without ``auto``. ``study`` is ``spec.resolve()``, so the rest is already validated."""
    eoc = spec.edge_of_chaos
    if eoc is None or eoc.growth_rate != "auto":
        return study
    say(f"edge_of_chaos: calibrating the growth rate c ({eoc.calibration_epochs} epochs, no weight decay) ...")
    from wus_tune._study.guideline import calibrate_growth_rate

    c, info = calibrate_growth_rate(study.base, epochs=eoc.calibration_epochs, fit=fit)
    say(f"edge_of_chaos: c = {c:.4g} (ratio {info['ratio']:.3g}, J^2 {info['j2_per_epoch'][0]:.3f} -> "
        f"{info['j2_per_epoch'][-1]:.3f}); put 'growth_rate: {c:.4g}' in the spec to skip this run")  # fmt: skip
    return dataclasses.replace(spec, edge_of_chaos=dataclasses.replace(eoc, growth_rate=c)).resolve()


def parse_objectives(value: Any) -> tuple[str, ...]:
    """``"accuracy,relative_time"`` or ``["accuracy", "cost"]`` -> a tuple; accuracy first, then one or two
    of relative_time, time and cost,
    then optionally one of sparsity (maximised) or params (active parameters, minimised)."""
    names = [s.strip() for s in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"objectives: expected e.g. 'accuracy,time', got {value!r}")
    for n in names:
        if n not in OBJECTIVES:
            raise UsageError(f"objectives: unknown objective {n!r}; choose from {', '.join(OBJECTIVES)}")
    kinds = ["a" if n == "accuracy" else "c" if n in ("time", "relative_time", "cost") else "s" for n in names]
    shape = "".join(kinds)
    if shape not in ("ac", "acc", "acs", "accs") or len(set(names)) != len(names):
        raise UsageError(
            f"objectives: expected accuracy then one or two of relative_time, time, cost, then optionally sparsity "
            f"or params; got {','.join(names)}"
        )
    return tuple(names)


def make_sampler(name: str, options: Mapping[str, Any], *, seed: int | None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler; ``options`` are its keyword arguments (a wrong one is a UsageError)."""
    import warnings

    import optuna

    cls: Any = {
        "tpe": optuna.samplers.TPESampler,
        "nsga2": optuna.samplers.NSGAIISampler,
        "gp": optuna.samplers.GPSampler,
    }[name]
    kwargs = dict(options)
    if name == "gp":
        # WUS knobs are conditional; GP samples those outside the intersection space randomly by design.
        kwargs.setdefault("warn_independent_sampling", False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(seed=seed, **kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"sampler_options: {e}") from None


def _check_int(key: str, value: Any, low: int) -> None:
    check_number(key, value, integer=True, minimum=low)


def _partner_name() -> str:
    from wus_tune._study.catalog import partner_name

    return partner_name()
