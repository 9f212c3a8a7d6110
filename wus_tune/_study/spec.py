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
    confirm: 0                      # after the trials, re-run the pick, the baseline and a frontier point in rounds
                                    # until an interval decides (auto, or K >= 2 rounds to start; wus_tune.confirm); 0: no
    methods: [wus]                  # the methods compared (default: those declaring compared_by_default, i.e. [wus]):
                                    # none, wus, approx_ops, lp_sphere, gauss_newton (2-layer mlp), edge_of_chaos,
                                    # approx_ops+wus, lp_sphere+wus, edge_of_chaos+wus, or a plug-in's
    edge_of_chaos: null             # a method's own section (its SPEC_SECTION): here the effective-ratio space and
                                    # the guideline prior (wus_tune.methods.edge_of_chaos.study)
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
    seeds: 1                        # seeds each trial is evaluated on (seed .. seed+K-1), paired with the baseline's
                                    # run on the same seed; {min: 1, max: 3}: race (docs/study.md, "Several seeds").
                                    # The baseline runs on max(K, baseline_repeats) seeds, one trial per seed, first
    enqueue_defaults: true          # enqueue each compared method's default trials
    enqueue: [{methods.wus.variant: wus, methods.wus.threshold: 0.02}]   # more trials to run first (dotted keys)
    default_search_space: true      # start from the default space (wus_tune._study.space)
    search_space:                   # override (merge), add, or remove (null) parameters
      methods.wus.threshold: {low: 0.002, high: 0.03}
      schedule.name: {choices: [step, cosine, onecycle]}
      methods.wus.lr_decay: null
    select: fastest-within:1.0      # rule for the exported best_config.yaml (wus_tune.pareto)
    pruner: none                    # none | frontier | pareto: stop trials that cannot end above the baseline frontier (docs/study.md, "Early stopping")
    pruner_options: {margin: 0.01}  # frontier: FrontierSettings; pareto: {eta: 3, min_epochs: 2} (wus_tune._study.pruning)
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

Keys of older versions (``enqueue_wus_default``, ``train.wus``, ``wus.*`` search and enqueue keys) are read
through :mod:`wus_tune.migration`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wus_tune._study.catalog import METHOD_KEY, check_method_model, check_methods, declarations, default_methods
from wus_tune._study.catalog import default_trial
from wus_tune._study.front import Rule, objective_direction, objective_names, parse_rule
from wus_tune._study.reuse import ReuseSpec
from wus_tune._study.seeds import Seeds, parse_seeds
from wus_tune._study.space import SearchSpace, apply_values
from wus_tune._study.storage import DEFAULT_TRACKING_URI, default_storage
from wus_tune.errors import ConfigError, UsageError, check_number
from wus_tune.migration import migrate_spec

if TYPE_CHECKING:
    import optuna

    from wus_tune._study.pruning import FrontierSettings, PrunerSettings
    from wus_tune.config import TrainConfig
    from wus_tune.methods.study import SectionPlan

SAMPLERS = ("tpe", "nsga2", "gp")


@dataclass
class StudySpec:
    """The raw spec, as written; :meth:`resolve` validates it into a :class:`ResolvedStudy`."""

    name: str | None = None
    description: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    objectives: Any = "accuracy,relative_time"  # "accuracy,relative_time" or a list
    methods: list[str] = field(default_factory=default_methods)  # the compared methods
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
    seeds: Any = 1  # K or {min: m, max: M} (wus_tune._study.seeds)
    enqueue_defaults: bool = True  # each compared method's default trials
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    default_search_space: bool = True
    search_space: dict[str, Any] = field(default_factory=dict)
    select: str = "fastest-within:1.0"
    pruner: str = "none"  # none | frontier | pareto (wus_tune._study.pruning, frontier_pruning)
    pruner_options: dict[str, Any] = field(default_factory=dict)
    confirm: int | str = 0  # confirm the pick at the end of the study: auto, or K >= 2 rounds to start with; 0: no
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
    # the methods' own sections ({"edge_of_chaos": EdgeOfChaosSpec(...)}): top-level keys named after a
    # method whose study declaration has a SPEC_SECTION
    sections: dict[str, Any] = field(default_factory=dict, metadata={"internal": True})
    source: str = field(default="", metadata={"internal": True})  # where it came from, for messages

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "spec") -> StudySpec:
        if not isinstance(raw, Mapping):
            raise UsageError(f"{source}: expected a mapping at the top level")
        try:
            return StudySpec(source=source).replace(**raw)
        except UsageError as e:
            raise UsageError(f"{source}: {e}") from None

    def replace(self, **changes: Any) -> StudySpec:
        """A copy with these fields changed: spec keys (``n_trials=10``, ``search_space={...}``), a method's
        section by the method's name (``edge_of_chaos={...}``), or a key of an older version (read through
        :mod:`wus_tune.migration`). An unknown key is a UsageError naming it."""
        from wus_tune.config import build_dataclass

        changes = migrate_spec(changes)
        fields = {f.name for f in dataclasses.fields(StudySpec) if not f.metadata.get("internal")}
        section_types = {name: d.SPEC_SECTION for name, d in declarations().items() if d.SPEC_SECTION is not None}
        unknown = sorted(set(changes) - fields - set(section_types))
        if unknown:
            raise UsageError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(fields | set(section_types)))})")
        sections = dict(self.sections)
        try:
            for name in set(changes) & set(section_types):
                value = changes.pop(name)
                sections[name] = value if value is None or isinstance(value, section_types[name]) else \
                    build_dataclass(section_types[name], value, name)  # fmt: skip
            typed = build_dataclass(StudySpec, changes, "")  # the config's typed parser checks each value's type
        except ConfigError as e:
            raise UsageError(str(e)) from None
        return dataclasses.replace(self, **{k: getattr(typed, k) for k in changes}, sections=sections)

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
        sections = d.pop("sections")
        return {**d, **sections}

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
        me = self.replace(train=self.train, search_space=self.search_space, enqueue=self.enqueue)  # older keys read as today's
        base = TrainConfig.from_dict(me.train)
        methods = check_methods(me.methods)
        check_method_model(methods, base)
        base, space, plans = me._search_space(base, methods)
        lead, method_trials = me._first_trials(base, space, methods, plans)
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
            seeds=parse_seeds(self.seeds),
            enqueue=tuple(dict(e) for e in me.enqueue),
            select=rule,
            confirm=self.confirm,
            accuracy_margin=self.accuracy_margin,
            cost_factor=self.cost_factor,
            spec=me.to_dict(),
            methods=methods,
            lead_trials=tuple(lead),
            method_trials=tuple(method_trials),
            sections=plans,
            pruner=pruner,
            reuse=reuse,
        )

    def _check_settings(self) -> None:
        """The scalar keys: sampler, counts, numbers, the workers' and Ray's keys, the baseline fractions."""
        if self.sampler not in SAMPLERS:
            raise UsageError(f"sampler: unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        _check_int("seed", self.seed, 0)
        if self.confirm != 0:
            from wus_tune.confirm import parse_rounds

            try:
                parse_rounds(self.confirm)
            except UsageError as e:
                raise UsageError(str(e).replace("--confirm", "confirm", 1)) from None
        _check_int("baseline_repeats", self.baseline_repeats, 1)
        parse_seeds(self.seeds)
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

    def _search_space(self, base: TrainConfig, methods: tuple[str, ...]) -> tuple[TrainConfig, SearchSpace, dict[str, SectionPlan]]:
        """The search space over ``methods``, checked against the base config, with what each method's spec
        section adds (its plan: a base config, search-space entries and trials of its own)."""
        known = declarations()
        plans: dict[str, SectionPlan] = {}
        overrides = dict(self.search_space)
        for name, section in self.sections.items():
            if section is not None:
                plans[name] = plan = known[name].plan_section(section, base, methods)
                base = plan.base
                overrides = dict(plan.search_space) | overrides  # a spec entry wins over the section's
        space = SearchSpace.build(overrides, defaults=self.default_search_space, methods=methods, sections=self.sections)
        space.check(base)
        return base, space, plans

    def _first_trials(self, base: TrainConfig, space: SearchSpace, methods: tuple[str, ...],
                      plans: Mapping[str, SectionPlan]) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]]]:  # fmt: skip
        """(lead, method trials): the methods' default trials and the sections' trials, each checked to make
        a valid config; the spec's ``enqueue`` entries checked too."""
        lead, method_trials = default_trials(space, base, methods, plans) if self.enqueue_defaults else ([], [])
        method_trials += [(role, space.fixed_at_base(base, values)) for plan in plans.values() for role, values in plan.trials]
        for _, values in (*lead, *method_trials):
            try:
                apply_values(base, values)
            except ConfigError as e:
                raise UsageError(f"methods: the default trial {values.get(METHOD_KEY)!r} is not a valid config: {e}") from None
        for i, entry in enumerate(self.enqueue):
            try:
                apply_values(base, entry)
            except ConfigError as e:
                raise UsageError(f"enqueue[{i}]: {e}") from None
        return lead, method_trials


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
    enqueue: tuple[dict[str, Any], ...]
    select: Rule
    accuracy_margin: float
    cost_factor: float
    spec: dict[str, Any]
    confirm: int | str = 0
    baseline_repeats: int = 1
    seeds: Seeds = field(default_factory=Seeds)  # seeds per trial (wus_tune._study.seeds)
    methods: tuple[str, ...] = ()  # resolve() always sets it
    # (role, fixed values) enqueued right after the full-length baseline: the first compared method's default trials
    lead_trials: tuple[tuple[str, dict[str, Any]], ...] = ()
    # (role, fixed values) enqueued after the baseline frontier: the other methods' defaults, the sections' trials
    method_trials: tuple[tuple[str, dict[str, Any]], ...] = ()
    sections: dict[str, SectionPlan] = field(default_factory=dict)  # what the methods' spec sections added
    pruner: PrunerSettings | FrontierSettings | None = None  # None: every trial runs to its last epoch
    reuse: ReuseSpec = field(default_factory=ReuseSpec)

    @property
    def directions(self) -> list[str]:
        return [objective_direction(o) for o in self.objectives]


def initial_trials(study_def: ResolvedStudy) -> list[tuple[str, dict[str, Any]]]:
    """(role, fixed values) of the trials a new study runs first: the full-length baseline (method
    ``none``), the first compared method's default trial (role ``<method>-default``, e.g. ``wus-default``),
    the baseline frontier (``baseline_fractions`` of the epochs; crossed with every ``schedule.name``
    choice when the schedule is searched), the other compared methods' default trials and those a
    method's spec section adds (the edge-of-chaos guideline's, ``study_def.method_trials``), more
    baselines (``baseline_repeats``), then the spec's ``enqueue`` entries. With ``seeds`` of max K > 1 the
    baselines of seeds ``seed+1 .. seed+K-1`` come right after the first (every trial pairs with them), and
    ``baseline_repeats`` adds only the seeds beyond K.

    Every searched knob of these trials is fixed at the base config's value, so "baseline" and the
    methods' defaults mean the spec's own recipe, not a sampled one.
    """
    base, space = study_def.base, study_def.space
    epochs = base.epochs
    plain = space.fixed_at_base(base, {METHOD_KEY: "none"})
    out: list[tuple[str, dict[str, Any]]] = [("baseline", plain | {"epochs": epochs})]
    # With several seeds per trial, every seed's baseline first: each trial pairs (and forks) with them.
    paired = getattr(study_def, "seeds", Seeds()).max
    out += [("baseline", plain | {"epochs": epochs, "seed": base.seed + k}) for k in range(1, paired)]
    out += [(role, dict(values)) for role, values in study_def.lead_trials]
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
            for k in range(max(1, paired), getattr(study_def, "baseline_repeats", 1))]  # fmt: skip
    out += [("enqueued", dict(e)) for e in study_def.enqueue]
    return out


def parse_objectives(value: Any) -> tuple[str, ...]:
    """``"accuracy,relative_time"`` or ``["accuracy", "cost"]`` -> a tuple; accuracy first, then one or two
    of relative_time, time and cost,
    then optionally one of sparsity (maximised) or params (active parameters, minimised)."""
    names = [s.strip() for s in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"objectives: expected e.g. 'accuracy,time', got {value!r}")
    known = objective_names()
    for n in names:
        if n not in known:
            raise UsageError(f"objectives: unknown objective {n!r}; choose from {', '.join(known)}")
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


def default_trials(space: SearchSpace, base: TrainConfig, methods: Sequence[str],
                   plans: Mapping[str, SectionPlan]) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]]]:  # fmt: skip
    """(role, fixed values) of the compared methods' default trials, each method at its default knobs: the
    first compared choice's right after the full-length baseline (role ``<choice>-default``, e.g.
    ``wus-default``: the headline of the study gets a measured point before the baseline frontier), then
    the others' (role ``method-default``). A method whose spec section brings trials of its own (the
    edge-of-chaos guideline) runs those instead of its default."""
    replaced = {name for name, plan in plans.items() if plan.trials}
    chosen = [m for m in methods if m != "none" and m not in replaced]
    trials = [space.fixed_at_base(base, default_trial(choice, base)) for choice in chosen]
    if not chosen or chosen[0] != methods[0]:
        return [], [("method-default", values) for values in trials]
    return [(f"{chosen[0]}-default", trials[0] | {"epochs": base.epochs})], [("method-default", v) for v in trials[1:]]


def prepare_sections(spec: StudySpec, study: ResolvedStudy, *, fit: Callable[..., Any] | None,
                     say: Callable[[str], None]) -> ResolvedStudy:
    """``study`` resolved again once each method's spec section is complete (e.g. edge of chaos's growth
    rate ``auto`` calibrated by a short run on the base recipe); ``study`` itself when nothing was missing.
    ``study`` is ``spec.resolve()``, so the rest is already validated."""
    known = declarations()
    sections = {name: known[name].prepare_section(section, study.base, fit=fit, say=say) if section is not None else None
                for name, section in spec.sections.items()}  # fmt: skip
    if all(sections[name] is spec.sections[name] for name in sections):
        return study
    return dataclasses.replace(spec, sections=sections).resolve()
