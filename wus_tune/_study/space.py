"""The search space: a list of parameter definitions keyed by dotted config keys.

A parameter's key is where its value goes in a :class:`~wus_tune.config.TrainConfig`
(``wus.threshold``, ``schedule.name``, ``methods.approx_ops.sample_ratio``), or an item of a list
(``wus.schedule_window[1]``). Adding a plug-in method's knobs is therefore a data change: append
definitions. A method may also declare *virtual* keys (``Method.VIRTUAL_KEYS``), which its
``expand_virtual`` turns into config overrides; the study knows them only through that contract (their
first value turns the method off, their last turns it on as configured, the value assumed when the key is
neither searched nor fixed). WUS, the *partner* method (``Method.partner``: the one others combine with,
tuned by a study without a ``methods:`` list), declares ``wus.variant``:

===========  ==========================================================================
``none``     ``wus.enabled = false`` (a plain recipe; no ``wus.*`` knob is sampled)
``wus``      ``wus.enabled = true``, ``wus.bias_lr_factor = wus.lr_decay = 1`` (no LR coupling)
``wus+lr``   ``wus.enabled = true``; the two LR-coupling knobs are sampled
===========  ==========================================================================

A definition samples only when its ``when`` condition holds (``{"wus.variant": ["wus+lr"]}``), so the
space is conditional; a key added under a method's config section (``wus.*``) inherits that method's
condition, and when the partner is off its knobs leave the trial's config.

Two more virtual keys exist when a spec asks for them (:mod:`wus_tune._study.catalog`):

* ``method``: which speed-up method a trial uses when a study compares several (spec ``methods:``):
  ``none`` (the plain recipe), ``wus``, ``approx_ops``, ``lp_sphere``, ``gauss_newton``,
  ``edge_of_chaos``, or a combination with WUS written ``approx_ops+wus``. It sets ``methods`` in the
  config (the base config's entry for a method supplies its fixed knobs) and, without the partner,
  sets the partner's virtual keys to "off" (``wus.variant = none``). Measurement-only methods of the
  base config (``edge_of_chaos``) stay in every trial. Each method's knobs are sampled only when the chosen ``method`` contains it.
* ``optim.ratio``: the effective ratio ``lr / ((1 - momentum) * batch_size)`` of the edge-of-chaos
  parametrisation; the learning rate is derived from it (:func:`apply_values`).

Default ranges (:func:`default_space`: the partner's ``search_space()``, ``wus_tune/methods/wus.py``),
chosen around the settings that worked in the calibration runs of the trainer and wide enough to include "never skips" and "skips a lot":

=============================  ===================================  =================================
key                            range                                why
=============================  ===================================  =================================
``wus.variant``                wus, wus+lr                          the paper's two variants
``wus.threshold``              0.001 .. 0.05, log                   plateau test tau (fraction; 0.01 = 1 point)
``wus.window``                 1 .. 4                               accuracy changes looked at
``wus.warmup``                 0 .. 4                               checks before skipping may start
``wus.skip_length``            1 .. 4                               checks a skip window lasts
``wus.bias_scope``             all, last:1, last:2, last:4          which biases keep training
``wus.bias_lr_factor``         0.1 .. 10, log (wus+lr)              bias LR factor inside skip windows
``wus.lr_decay``               0.3 .. 1.0 (wus+lr)                  base LR factor at each plateau
``wus.schedule_window[1]``     0.5 .. 0.95                          no skipping in the final annealing
=============================  ===================================  =================================

The LR schedule (``schedule.name``: step, cosine, onecycle) and the epoch budget (``epochs``) are not
searched by default; a spec adds them (see ``docs/study.md``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from wus_tune.errors import ConfigError, UsageError

if TYPE_CHECKING:
    import optuna

    from wus_tune.config import TrainConfig

METHOD_KEY = "method"  # virtual: the speed-up method of a trial, e.g. "approx_ops+wus"
RATIO_KEY = "optim.ratio"  # virtual: lr / ((1 - momentum) * batch_size); the lr is derived from it
# The methods a ``method`` choice may name, which combine with the partner and which only measure come from the
# method registry (:mod:`wus_tune._study.catalog`).
_INDEX = re.compile(r"^(?P<key>.+)\[(?P<index>\d+)\]$")
_FIELDS = ("type", "low", "high", "log", "step", "choices", "when", "doc")


@dataclass(frozen=True)
class Param:
    """One searched knob. ``type`` is float, int or categorical; ``when`` maps keys to allowed values."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    doc: str = ""

    def validate(self) -> Param:
        where = f"search_space.{self.key}"
        if self.type == "categorical":
            if not self.choices:
                raise UsageError(f"{where}: categorical needs a non-empty 'choices' list")
            for c in self.choices:
                if c is not None and not isinstance(c, (bool, int, float, str)):
                    raise UsageError(f"{where}: choice {c!r} must be a number, string, boolean or null")
            if self.key == METHOD_KEY:
                for c in self.choices:
                    try:
                        method_parts(c)
                    except ConfigError as e:
                        raise UsageError(f"{where}: {e}") from None
            return self
        if self.type not in ("float", "int"):
            raise UsageError(f"{where}: type must be float, int or categorical, got {self.type!r}")
        for name in ("low", "high"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UsageError(f"{where}: '{name}' must be a finite number, got {v!r}")
        if self.low > self.high:
            raise UsageError(f"{where}: inverted range, low {self.low:g} > high {self.high:g}")
        if self.log and self.low <= 0:
            raise UsageError(f"{where}: a log range needs low > 0, got {self.low:g}")
        if self.log and self.step is not None:
            raise UsageError(f"{where}: 'step' and 'log' cannot be combined")
        if self.step is not None and not (isinstance(self.step, (int, float)) and self.step > 0):
            raise UsageError(f"{where}: 'step' must be a positive number, got {self.step!r}")
        if self.type == "int":
            for name in ("low", "high", "step"):
                v = getattr(self, name)
                if v is not None and float(v) != int(v):
                    raise UsageError(f"{where}: int parameter needs an integer '{name}', got {v!r}")
        return self

    def corners(self) -> list[Any]:
        """The values whose validity implies that of the whole range (checked before a study starts)."""
        if self.type == "categorical":
            return list(self.choices or ())
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return any(value == c and type(value) is type(c) for c in self.choices or ())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and float(value) != int(value):
            return False
        return self.low <= value <= self.high

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(values.get(k) in allowed for k, allowed in self.when.items())

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            d["choices"] = list(self.choices or ())
        else:
            d.update(low=self.low, high=self.high)
            if self.log:
                d["log"] = True
            if self.step is not None:
                d["step"] = self.step
        if self.when:
            d["when"] = {k: list(v) for k, v in self.when.items()}
        return d


def default_space() -> tuple[Param, ...]:
    """The default space of a study without a ``methods:`` list: the partner method's own search space
    (the method declaring ``partner``: WUS, ``wus_tune/methods/wus.py``)."""
    from wus_tune._study.catalog import method_knobs, partner_name

    return method_knobs(partner_name()) if partner_name() else ()


def _knob_condition(key: str) -> dict[str, tuple[Any, ...]]:
    """The condition a new spec key inherits from the method whose config section it is in (``wus.*``:
    WUS's knobs' condition, "WUS is on"); none for other keys."""
    from wus_tune._study.catalog import methods_registry

    for name, cls in methods_registry().items():
        if key.startswith(f"{name}."):
            for raw in cls.search_space().values():
                if raw.get("when"):
                    return {str(k): tuple(v) for k, v in raw["when"].items()}
    return {}


def param_from_dict(key: str, raw: Any, base: Param | None = None) -> Param:
    """A definition from a spec entry; with ``base`` (a default of the same key) the entry overrides it."""
    where = f"search_space.{key}"
    if not isinstance(raw, Mapping):
        raise UsageError(f"{where}: expected a mapping such as {{low: 0.001, high: 0.05}}, got {raw!r}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise UsageError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(_FIELDS)})")
    fields: dict[str, Any] = {}
    if "choices" in raw:
        if not isinstance(raw["choices"], (list, tuple)):
            raise UsageError(f"{where}.choices: expected a list, got {raw['choices']!r}")
        fields["choices"] = tuple(raw["choices"])
    for name in ("low", "high", "log", "step", "doc"):
        if name in raw:
            fields[name] = raw[name]
    if "log" in fields and not isinstance(fields["log"], bool):
        raise UsageError(f"{where}.log: expected true or false, got {fields['log']!r}")
    if "when" in raw:
        when = raw["when"]
        if not isinstance(when, Mapping) or not all(isinstance(v, (list, tuple)) for v in when.values()):
            raise UsageError(f"{where}.when: expected a mapping of keys to lists of values, got {when!r}")
        fields["when"] = {str(k): tuple(v) for k, v in when.items()}
    if "type" in raw:
        fields["type"] = raw["type"]
    elif base is not None:
        fields["type"] = "categorical" if "choices" in fields else base.type
        if "choices" in fields:
            fields.update(low=None, high=None)
        elif base.type == "categorical" and ("low" in fields or "high" in fields):
            fields["type"] = _infer_numeric(fields, where)
    elif "choices" in fields:
        fields["type"] = "categorical"
    else:
        fields["type"] = _infer_numeric(fields, where)
    if base is not None:
        param = replace(base, **fields)
    else:
        if key not in _virtual_keys() and _knob_condition(key):
            fields.setdefault("when", _knob_condition(key))
        param = Param(key, **fields)
    return param.validate()


def _infer_numeric(fields: Mapping[str, Any], where: str) -> str:
    if "low" not in fields or "high" not in fields:
        raise UsageError(f"{where}: give 'choices', or 'low' and 'high'")
    ints = all(isinstance(fields[k], int) and not isinstance(fields[k], bool) for k in ("low", "high"))
    return "int" if ints and not fields.get("log") else "float"


@dataclass(frozen=True)
class SearchSpace:
    """An ordered list of :class:`Param`; conditions refer to earlier keys."""

    params: tuple[Param, ...]

    @classmethod
    def build(
        cls,
        overrides: Mapping[str, Any] | None = None,
        *,
        defaults: bool = True,
        methods: Sequence[str] | None = None,
        effective_ratio: bool = False,
    ) -> SearchSpace:
        """The default space (or none) with a spec's entries applied: a mapping overrides or adds a
        parameter, ``null`` removes one. ``methods`` other than the partner alone (None: the partner) put the virtual ``method`` key
        first and add each method's default knobs (:mod:`wus_tune._study.catalog`); ``effective_ratio``
        searches edge of chaos's ``optim.ratio`` instead of ``optim.lr``."""
        params = {p.key: p for p in default_space()} if defaults else {}
        if methods is not None and tuple(methods) != (_partner_name(),):
            from wus_tune._study.catalog import method_space

            params = method_space(methods, params, defaults=defaults, effective_ratio=effective_ratio)
        for key, raw in (overrides or {}).items():
            key = str(key)
            if key == METHOD_KEY:
                raise UsageError("search_space.method: choose the compared methods with the spec's 'methods:' list")
            if raw is None or raw is False:
                params.pop(key, None)
            else:
                params[key] = param_from_dict(key, raw, params.get(key))
        space = cls(tuple(params.values()))
        for p in space.params:
            for k in p.when:
                if k not in params and k not in _virtual_keys():
                    raise UsageError(f"search_space.{p.key}.when: {k!r} is not a searched parameter")
        return space

    def __contains__(self, key: str) -> bool:
        return any(p.key == key for p in self.params)

    def __getitem__(self, key: str) -> Param:
        for p in self.params:
            if p.key == key:
                return p
        raise KeyError(key)

    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def sample(self, trial: optuna.Trial, fixed: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Values for the active parameters: ``fixed`` ones as given (not suggested), the rest suggested."""
        fixed = dict(fixed or {})
        values: dict[str, Any] = {**_partner_on(), **fixed}  # the partner's virtual keys, replaced if searched
        if METHOD_KEY in values:
            values.update(method_implies(values[METHOD_KEY]))
        for p in self.params:
            if p.key in fixed or not p.active(values):
                continue
            values[p.key] = p.suggest(trial)
            if p.key == METHOD_KEY:  # without the partner, none of its knobs is active
                values.update(method_implies(values[METHOD_KEY]))
        return values

    def fixed_at_base(self, base: TrainConfig, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` plus, for every parameter active under them, its value in ``base``: the fixed
        values of an enqueued trial that means "the base recipe, with these choices" (a baseline, a
        method's default trial). A key the base config lacks (a knob of a method it does not enable) is
        left out; ``optim.ratio`` is the base recipe's ratio."""
        data = base.to_dict()
        context: dict[str, Any] = {**_partner_on(), **values}
        if METHOD_KEY in context:
            context.update(method_implies(context[METHOD_KEY]))
        out: dict[str, Any] = {}
        for p in self.params:
            if p.key == METHOD_KEY or p.key in _virtual_keys() or p.key in values or not p.active(context):
                continue
            if p.key == RATIO_KEY:
                o = base.optim
                out[p.key] = o.lr / ((1.0 - o.momentum) * o.batch_size)
                continue
            try:
                out[p.key] = get_value(data, p.key)
            except ConfigError:  # e.g. a knob of a method the base config does not enable
                pass
        return out | dict(values)

    def split_fixed(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split fixed values into Optuna params (searched keys whose value lies in the distribution, so
        the sampler learns from them) and plain overrides (everything else)."""
        params, overrides = {}, {}
        for k, v in values.items():
            (params if k in self and self[k].contains(v) else overrides)[k] = v
        return params, overrides

    def check(self, base: TrainConfig) -> None:
        """Apply every corner of every parameter to ``base``: a value the config rejects is a spec error."""
        for p in self.params:
            context = {k: allowed[0] for k, allowed in p.when.items() if allowed}  # e.g. the method it needs
            for v in p.corners():
                try:
                    apply_values(base, {**context, p.key: v})
                except ConfigError as e:
                    raise UsageError(f"search_space.{p.key}: value {v!r} is not a valid config: {e}") from None

    def to_json(self) -> str:
        return json.dumps({p.key: p.to_dict() for p in self.params}, sort_keys=False)


def _partner_name() -> str:
    from wus_tune._study.catalog import partner_name

    return partner_name()


def _partner_on() -> dict[str, Any]:
    from wus_tune._study.catalog import partner_virtual

    return partner_virtual(-1)


def _virtual_keys() -> set[str]:
    from wus_tune._study.catalog import virtual_keys

    return virtual_keys()


def method_parts(choice: Any) -> tuple[str, ...]:
    """``"approx_ops+wus"`` -> ``("approx_ops", "wus")``; ``"none"`` -> ``()``. Raises ConfigError for a
    name that is not a registered method, or a combination that is not supported (only ``<method>+wus``
    for the methods that declare ``combines_with_wus``)."""
    from wus_tune._study.catalog import combinable, partner_name, plugin_names

    partner, names, with_partner = partner_name(), plugin_names(), combinable()
    forms = ", ".join(("none", partner, *names, *(f"{m}+{partner}" for m in with_partner)))
    if not isinstance(choice, str) or not choice:
        raise ConfigError(f"{METHOD_KEY}: expected a method name such as 'approx_ops+wus', got {choice!r}")
    if choice == "none":
        return ()
    parts = tuple(choice.split("+"))
    for part in parts:
        if part != partner and part not in names:
            raise ConfigError(f"{METHOD_KEY}: unknown method {part!r} in {choice!r}; choose from {forms}")
    others = [x for x in parts if x != partner]
    if len(set(parts)) != len(parts) or len(others) > 1 or (len(parts) == 2 and others[0] not in with_partner):
        raise ConfigError(f"{METHOD_KEY}: unsupported combination {choice!r}; choose from {forms}")
    return parts


def method_implies(choice: Any) -> dict[str, Any]:
    """What a ``method`` choice fixes among the other virtual keys: without the partner, the partner's
    virtual keys at their "off" value (``wus.variant = none``)."""
    from wus_tune._study.catalog import partner_virtual

    return {} if _partner_name() in method_parts(choice) else partner_virtual(0)


def _method_overrides(choice: Any, base_methods: Mapping[str, Any], has_virtual: bool) -> dict[str, Any]:
    from wus_tune._study.catalog import measure_only, partner, plugin_names

    parts = method_parts(choice)
    names, measuring = plugin_names(), measure_only()
    methods = {
        name: dict(params or {}) for name, params in base_methods.items()
        if name not in names or name in parts or name in measuring
    }  # fmt: skip
    for name in parts:
        if name != _partner_name():
            methods.setdefault(name, dict(base_methods.get(name) or {}))
    out: dict[str, Any] = {"methods": methods}
    if _partner_name() in parts and not has_virtual:
        out.update(partner().switch(True))
    return out


def apply_values(base: TrainConfig, values: Mapping[str, Any]) -> TrainConfig:
    """``base`` with the sampled/fixed values written in (``method`` and the methods' virtual keys expanded,
    ``optim.ratio`` turned into ``optim.lr``, ``key[i]`` list items set), validated by
    :meth:`TrainConfig.replace`."""
    from wus_tune._study.catalog import methods_registry, partner

    values = dict(values)
    overrides: dict[str, Any] = {}
    method = values.pop(METHOD_KEY, None)
    if method is not None:
        values.update(method_implies(method))
        overrides.update(_method_overrides(method, base.methods, bool(_virtual_keys() & set(values))))
    ratio = values.pop(RATIO_KEY, None)
    if ratio is not None:
        values["optim.lr"] = lr_from_ratio(ratio, values, base)
    for cls in methods_registry().values():  # each method pops its virtual keys (wus.variant)
        overrides.update(cls.expand_virtual(values))
    own = partner()
    switch_off = own.switch(False) if own is not None else {}
    if switch_off and all(k in overrides and overrides[k] == v for k, v in switch_off.items()):
        # A plain recipe: drop the partner's knobs, so a baseline's config carries no misleading values.
        values = {k: v for k, v in values.items() if not k.startswith(f"{own.name}.")}
    else:
        switch_keys = set(own.switch(True)) if own is not None else set()
        overrides = {k: v for k, v in overrides.items() if k not in values or k in switch_keys}
    data = base.to_dict()
    if "methods" in overrides:
        data["methods"] = overrides["methods"]  # list items below index into the chosen methods
    for key, value in values.items():
        m = _INDEX.match(key)
        if m is None:
            overrides[key] = value
            continue
        get_value(data, key)  # the item exists
        current = list(overrides.get(m["key"], get_value(data, m["key"])))
        current[int(m["index"])] = value
        overrides[m["key"]] = current
    return base.replace(overrides)


def lr_from_ratio(ratio: Any, values: Mapping[str, Any], base: TrainConfig) -> float:
    """``lr = ratio * (1 - momentum) * batch_size`` with the trial's momentum and batch size (or the base
    config's), rounded to 12 significant digits so that the base recipe's ratio gives back its lr exactly."""
    momentum = values.get("optim.momentum", base.optim.momentum)
    batch = values.get("optim.batch_size", base.optim.batch_size)
    for key, v in ((RATIO_KEY, ratio), ("optim.momentum", momentum), ("optim.batch_size", batch)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{key}: expected a number, got {v!r}")
    if not ratio > 0:
        raise ConfigError(f"{RATIO_KEY}: expected > 0, got {ratio!r}")
    if not 0 <= momentum < 1 or batch < 1:
        raise ConfigError(f"{RATIO_KEY}: needs 0 <= momentum < 1 and batch_size >= 1, got {momentum!r}, {batch!r}")
    return float(f"{ratio * (1.0 - momentum) * batch:.12g}")


def get_value(data: Mapping[str, Any], key: str) -> Any:
    """The value at a parameter key (``wus.threshold``, ``wus.schedule_window[1]``) in a config dict."""
    m = _INDEX.match(key)
    if m is not None:
        items = get_value(data, m["key"])
        if not isinstance(items, list) or int(m["index"]) >= len(items):
            raise ConfigError(f"{key}: {m['key']!r} has no item {m['index']}")
        return items[int(m["index"])]
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"{key}: unknown key")
        node = node[part]
    return node


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"wus": {"threshold": 0.01}}`` -> ``{"wus.threshold": 0.01}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v
    return out
