"""The compared methods' study data, read from the method registry (:func:`wus_tune.methods.registry`).

A spec's ``methods:`` list names what one study compares (``[wus, approx_ops, lp_sphere+wus]``); the
study then samples the virtual key ``method`` among them (:mod:`wus_tune._study.space`) and each
method's knobs only when the chosen ``method`` contains it. Everything about a method comes from its
class (``wus_tune/methods/<name>.py``, or an installed package's ``wus_tune.methods`` entry point):

* its knobs: ``search_space()`` (a spec's ``search_space`` entry of the same key merges into them; a method
  with ``tunes_optimizer`` searches ``optim.*`` keys, ``optim.lr`` or the virtual ``optim.ratio``);
* its default trial (role ``method-default``): ``default_trials()``, with the base config's
  ``train.methods.<name>`` entry taking precedence for the knobs it sets (the user's own choice);
* whether a model suits it: ``check_model(model, config)``;
* whether it may run beside WUS in one trial (``<name>+wus``): ``combines_with_wus``;
* whether it only measures (a base config's entry then stays in every trial): ``measure_only``.

The fixed knobs of a method (``prune_every``, ``exact``, ...) come from the base config's
``train.methods.<name>`` entry when it has one, else from the method's defaults; that entry takes effect
only in trials whose ``method`` names it (baselines run none).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from wus_tune._study.space import METHOD_KEY, RATIO_KEY, Param, method_parts
from wus_tune.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from wus_tune.config import TrainConfig


def methods_registry() -> dict[str, Any]:
    """Every registered method class by name (built-ins and entry points)."""
    from wus_tune.methods import registry

    return registry()


def partner() -> Any | None:
    """The method class declaring ``partner``: the one the others combine with (``<name>+<partner>``, for
    the methods declaring ``combines_with_wus``) and the one a study without a ``methods:`` list tunes."""
    return next((cls for cls in methods_registry().values() if getattr(cls, "partner", False)), None)


def partner_name() -> str:
    cls = partner()
    return cls.name if cls is not None else ""


def partner_virtual(which: int) -> dict[str, Any]:
    """The partner's virtual keys at their first value (``which=0``: the partner off) or their last
    (``which=-1``: on as configured, assumed for a key that is neither searched nor fixed)."""
    cls = partner()
    return {key: values[which] for key, values in getattr(cls, "VIRTUAL_KEYS", {}).items() if values}


def virtual_keys() -> set[str]:
    """Every registered method's virtual keys (popped by its ``expand_virtual``, never a config key)."""
    return {key for cls in methods_registry().values() for key in getattr(cls, "VIRTUAL_KEYS", {})}


def partner_label(config: TrainConfig, values: Mapping[str, Any], chosen: Callable[[str], bool]) -> tuple[str, Any]:
    """(key, value) of the partner's first virtual key that says what a trial ran (``wus.variant``: none,
    wus, wus+lr): its first value when the partner is off, the trial's value when the trial chose it
    (``chosen(key)``: searched or fixed), else the first value whose overrides the config already satisfies."""
    from wus_tune._study.space import get_value

    cls = partner()
    key, options = next(iter(getattr(cls, "VIRTUAL_KEYS", {}).items()), ("", ("none",)))
    if cls is None or not key or not cls.enabled(config):
        return key, options[0]
    if chosen(key):
        return key, values[key]
    data = config.to_dict()
    for option in options:
        implied = cls.expand_virtual({key: option})
        if all(_has_value(data, k, v, get_value) for k, v in implied.items()):
            return key, option
    return key, options[-1]


def _has_value(data: Mapping[str, Any], key: str, value: Any, get_value: Any) -> bool:
    try:
        return get_value(data, key) == value
    except ConfigError:
        return False


def plugin_names() -> tuple[str, ...]:
    """The registered methods other than the partner, in registry order."""
    return tuple(name for name in methods_registry() if name != partner_name())


def combinable() -> tuple[str, ...]:
    """The plug-ins that may run beside the partner (``combines_with_wus``)."""
    return tuple(name for name in plugin_names() if methods_registry()[name].combines_with_wus)


def measure_only() -> tuple[str, ...]:
    """The plug-ins that change nothing in training (a base config's entry stays in every trial)."""
    return tuple(name for name, cls in methods_registry().items() if getattr(cls, "measure_only", False))


def method_knobs(name: str) -> tuple[Param, ...]:
    """Method ``name``'s searched knobs as :class:`Param` (their ``when`` on ``method`` is set per study)."""
    from wus_tune._study.space import param_from_dict

    return tuple(param_from_dict(key, raw) for key, raw in methods_registry()[name].search_space().items())


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


def method_classes(methods: Sequence[str]) -> list[Any]:
    """The registered classes of the methods that ``methods`` (choices like ``"approx_ops+wus"``) name,
    each once, in order; names the registry does not know are left out (check_methods refuses them)."""
    known = methods_registry()
    names = dict.fromkeys(part for m in methods for part in method_parts(m))
    return [known[name] for name in names if name in known]


def check_method_model(methods: Sequence[str], base: TrainConfig) -> None:
    """Each compared method's own check that the base model suits it (``check_model``)."""
    for cls in method_classes(methods):
        reason = cls.check_model(base.model, base)
        if reason:
            raise UsageError(f"methods: {reason}")


def check_method_module(methods: Sequence[str], base: TrainConfig, module: Any) -> None:
    """Each compared method's check of the built network (``check_module``): a user's model that a
    method cannot act on is one line before any trial."""
    for cls in method_classes(methods):
        reason = cls.check_module(module, base)
        if reason:
            raise UsageError(f"methods: {reason}")


def method_space(
    methods: Sequence[str], params: Mapping[str, Param], *, defaults: bool, effective_ratio: bool
) -> dict[str, Param]:
    """The ``method`` parameter first, then ``params`` (the partner's knobs only where some choice has the
    partner; its virtual keys conditional on those choices), then the default knobs of every compared
    method, each conditional on the choices that contain it."""
    methods = check_methods(methods)
    name = partner_name()
    with_partner = tuple(m for m in methods if name in method_parts(m))
    own_virtual = partner_virtual(0)
    out: dict[str, Param] = {METHOD_KEY: Param(METHOD_KEY, "categorical", choices=methods, doc="the speed-up method")}
    for key, p in params.items():
        if key in own_virtual:
            if with_partner:
                out[key] = replace(p, when={METHOD_KEY: with_partner})
        elif not (name and key.startswith(f"{name}.") and not with_partner):
            out[key] = p
    if not defaults:
        return out
    for name in plugin_names():
        using = tuple(m for m in methods if name in method_parts(m))
        if not using:
            continue
        for p in method_knobs(name):
            if p.key == ("optim.lr" if effective_ratio else RATIO_KEY):
                continue
            out[p.key] = replace(p, when={METHOD_KEY: using})
    return out


def method_default_trials(space: Any, base: TrainConfig, methods: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """(role, fixed values) of one default trial per compared method other than ``none`` and the partner
    (the study's own baseline and partner default cover those)."""
    out = []
    for choice in methods:
        parts = method_parts(choice)
        if choice in ("none", partner_name()):
            continue
        values: dict[str, Any] = {METHOD_KEY: choice}
        for name in parts:
            if name == partner_name():
                values |= methods_registry()[name].default_trials()[0]  # at the base config's settings
            else:
                values |= default_knobs(name, base)
        out.append(("method-default", space.fixed_at_base(base, values)))
    return out


def default_knobs(name: str, base: TrainConfig) -> dict[str, Any]:
    """Method ``name``'s default trial (``default_trials()[0]``, dotted keys), with the base config's
    ``methods.<name>`` entry taking precedence for the knobs that trial sets (it is the user's own choice)."""
    trial = dict(methods_registry()[name].default_trials()[0])
    prefix = f"methods.{name}."
    own = base.methods.get(name) or {}
    return {k: own.get(k[len(prefix):], v) if k.startswith(prefix) else v for k, v in trial.items()}
