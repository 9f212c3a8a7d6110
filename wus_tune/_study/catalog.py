"""The compared methods, read from their study declarations (:class:`wus_tune.methods.study.MethodStudy`).

A spec's ``methods:`` list names what one study compares (``[wus, approx_ops, approx_ops+wus]``; default:
the methods whose declaration says ``compared_by_default``). With more than one, the study samples the
virtual key ``method`` among them (:mod:`wus_tune._study.space`) and each method's knobs only when the
chosen ``method`` runs it; with one, every trial but the baselines runs it. Everything about a method
comes from its declaration, which its :class:`~wus_tune.methods.Method` names (``Method.study``), be it
built in (``wus_tune/methods/``) or an installed package's ``wus_tune.methods`` entry point:

* its knobs: ``search_space()`` (a spec's ``search_space`` entry of the same key merges into them);
* its default trial: ``default_trials()``, with the base config's ``train.methods.<name>`` entry taking
  precedence for the knobs it sets (the user's own choice);
* whether a model suits it: ``check_model`` / ``check_module``;
* which methods it may share a trial with (``approx_ops+wus``): ``combines_with``, declared by either side;
* whether it only measures (a base config's entry then stays in every trial): ``measure_only``;
* what a trial running it is called: ``label(params)``; objectives from its metrics: ``OBJECTIVES``.

The fixed knobs of a method come from the base config's ``train.methods.<name>`` entry when it has one,
else from the method's defaults; that entry takes effect only in trials whose ``method`` runs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from wus_tune.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from wus_tune.config import TrainConfig
    from wus_tune.methods import Method
    from wus_tune.methods.study import MethodStudy, MetricObjective

METHOD_KEY = "method"  # virtual: the speed-up method of a trial, e.g. "approx_ops+wus"; "none" for plain training

_DECLARATIONS: dict[type, type] = {}


def declarations() -> dict[str, type[MethodStudy]]:
    """Every registered method's study declaration, by method name (built-ins and entry points)."""
    from wus_tune.methods import registry

    return {name: declaration_of(cls) for name, cls in registry().items()}


def declaration_of(cls: type[Method]) -> type[MethodStudy]:
    """The study declaration ``cls.study`` names (imported here, once), or the defaults when it names none."""
    if cls not in _DECLARATIONS:
        from wus_tune.methods.study import MethodStudy

        if cls.study is None:
            found: Any = type(f"{cls.__name__}Study", (MethodStudy,), {"method": cls})
        else:
            from wus_tune.plugins import load_object

            found = load_object(cls.study, f"methods.{cls.name} (study)")
            if not (isinstance(found, type) and issubclass(found, MethodStudy)) or found.method is not cls:
                raise UsageError(f"methods.{cls.name}: {cls.study} is not a MethodStudy subclass whose `method` is "
                                 f"{cls.__name__}")  # fmt: skip
        _DECLARATIONS[cls] = found
    return _DECLARATIONS[cls]


def default_methods() -> list[str]:
    """What a spec without a ``methods:`` list compares: the methods declaring ``compared_by_default``."""
    return [name for name, d in declarations().items() if d.compared_by_default]


def combinable(a: str, b: str) -> bool:
    """May methods ``a`` and ``b`` share a trial? Either one declares the other in ``combines_with``."""
    known = declarations()
    return b in known[a].combines_with or a in known[b].combines_with


def measure_only() -> tuple[str, ...]:
    """The methods that change nothing in training (a base config's entry stays in every trial)."""
    return tuple(name for name, d in declarations().items() if d.measure_only)


def method_parts(choice: Any) -> tuple[str, ...]:
    """``"approx_ops+wus"`` -> ``("approx_ops", "wus")``; ``"none"`` -> ``()``. Raises ConfigError for a
    name that is not a registered method, a name twice, or two methods that do not combine (neither
    declares the other in ``combines_with``)."""
    known = declarations()
    if not isinstance(choice, str) or not choice:
        raise ConfigError(f"{METHOD_KEY}: expected a method name such as 'approx_ops' or 'none', got {choice!r}")
    if choice == "none":
        return ()
    parts = tuple(choice.split("+"))
    for part in parts:
        if part not in known:
            raise ConfigError(f"{METHOD_KEY}: unknown method {part!r} in {choice!r}; choose from {_forms(known)}")
    pairs = [(a, b) for i, a in enumerate(parts) for b in parts[i + 1:]]
    if len(set(parts)) != len(parts) or not all(combinable(a, b) for a, b in pairs):
        raise ConfigError(f"{METHOD_KEY}: unsupported combination {choice!r}; choose from {_forms(known)}")
    return parts


def _forms(known: Mapping[str, type[MethodStudy]]) -> str:
    pairs = [f"{other}+{name}" for name, d in known.items() for other in d.combines_with if other in known]
    return ", ".join(("none", *known, *pairs))


def check_methods(methods: Sequence[str] | str) -> tuple[str, ...]:
    """Validate a spec's ``methods:`` list (UsageError naming the entry)."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",")]
    if not isinstance(methods, (list, tuple)) or not methods:
        raise UsageError(f"methods: expected a non-empty list of method names (--list shows them), got {methods!r}")
    for i, m in enumerate(methods):
        try:
            method_parts(m)
        except ConfigError as e:
            raise UsageError(f"methods[{i}]: {str(e).removeprefix(METHOD_KEY + ': ')}") from None
    if len(set(methods)) != len(methods):
        raise UsageError(f"methods: {list(methods)} names a method twice")
    return tuple(methods)


def compared(methods: Sequence[str]) -> list[type[MethodStudy]]:
    """The declarations of the methods that ``methods`` (choices like ``"approx_ops+wus"``) name, each
    once, in the order they first appear."""
    known = declarations()
    names = dict.fromkeys(part for m in methods for part in method_parts(m))
    return [known[name] for name in names]


def check_method_model(methods: Sequence[str], base: TrainConfig) -> None:
    """Each compared method's own check that the base model suits it (``check_model``)."""
    for d in compared(methods):
        reason = d.check_model(base.model, base)
        if reason:
            raise UsageError(f"methods: {reason}")


def check_method_module(methods: Sequence[str], base: TrainConfig, module: Any) -> None:
    """Each compared method's check of the built network (``check_module``): a user's model that a
    method cannot act on is one line before any trial."""
    for d in compared(methods):
        reason = d.check_module(module, base)
        if reason:
            raise UsageError(f"methods: {reason}")


def method_entries(choice: Any, base_methods: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``methods`` of a trial that chose ``choice``: the base config's entries of the methods it runs
    (their fixed knobs) and of the methods that only measure, in the base's order, then an empty entry
    for each method it runs that the base lacks; every other method of the base is off."""
    parts = method_parts(choice)
    measuring = measure_only()
    out = {name: dict(params or {}) for name, params in base_methods.items() if name in parts or name in measuring}
    return out | {name: {} for name in parts if name not in out}


def with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict whose ``methods`` entries hold every knob, the missing ones at the method's defaults,
    and with an entry (of defaults) for every registered method: what a dotted key reads
    (``methods.wus.schedule_window[1]``) when the config leaves a knob out."""
    import inspect

    from wus_tune.methods import knob_defaults, registry

    out = dict(config)
    given = config.get("methods") or {}
    out["methods"] = {name: {**{k: v for k, v in knob_defaults(cls).items() if v is not inspect.Parameter.empty},
                             **(given.get(name) or {})} for name, cls in registry().items()}  # fmt: skip
    return out


def default_knobs(name: str, base: TrainConfig) -> dict[str, Any]:
    """Method ``name``'s default trial (``default_trials()[0]``, dotted keys), with the base config's
    ``methods.<name>`` entry taking precedence for the knobs that trial sets (it is the user's own choice)."""
    trial = dict(declarations()[name].default_trials()[0])
    prefix = f"methods.{name}."
    own = base.methods.get(name) or {}
    return {k: own.get(k[len(prefix):], v) if k.startswith(prefix) else v for k, v in trial.items()}


def default_trial(choice: str, base: TrainConfig) -> dict[str, Any]:
    """The values of ``choice``'s default trial: each method it runs at its default knobs."""
    values: dict[str, Any] = {METHOD_KEY: choice}
    for name in method_parts(choice):
        values |= default_knobs(name, base)
    return values


def trial_label(choice: str, config: TrainConfig) -> str:
    """What a trial that chose ``choice`` is called in tables and tags: ``none``, the label its one
    method gives its knobs (WUS: ``wus`` or ``wus+lr``), or the combination (``approx_ops+wus``)."""
    parts = method_parts(choice)
    if len(parts) != 1:
        return choice if parts else "none"
    return declarations()[parts[0]].label(config.methods.get(parts[0]) or {})


def method_objectives() -> dict[str, MetricObjective]:
    """The objectives the methods' metrics give (``sparsity``: lp_sphere's), by name."""
    return {name: o for d in declarations().values() for name, o in d.OBJECTIVES.items()}


def tunes_optimizer(choice: str) -> bool:
    """Does a method of ``choice`` retune the optimizer (``tunes_optimizer``)?"""
    known = declarations()
    return any(known[part].tunes_optimizer for part in method_parts(choice))
