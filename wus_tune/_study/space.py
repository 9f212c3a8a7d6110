"""The search space: a list of parameter definitions keyed by dotted config keys.

A parameter's key is where its value goes in a :class:`~wus_tune.config.TrainConfig`
(``schedule.name``, ``methods.wus.threshold``, ``methods.approx_ops.sample_ratio``), or an item of a list
(``methods.wus.schedule_window[1]``). Adding a method's knobs is therefore a data change: its study
declaration lists them (:mod:`wus_tune._study.catalog`). A definition samples only when its ``when``
condition holds (``{"methods.wus.variant": ["wus+lr"]}``), so the space is conditional.

Two virtual keys are not config keys:

* ``method``: which speed-up method a trial runs (spec ``methods:``): ``none`` (the plain recipe), a
  method's name (``wus``, ``approx_ops``, ``lp_sphere``, ``gauss_newton``, ``edge_of_chaos``, a
  plug-in's), or a combination of methods that combine (``approx_ops+wus``). It sets ``methods`` in the
  config (the base config's entry for a method supplies its fixed knobs, :func:`~wus_tune._study.catalog.method_entries`);
  measurement-only methods of the base config (``edge_of_chaos``) stay in every trial. A study comparing
  several methods searches it; a study of one method has no ``method`` parameter: every trial runs that
  method unless it fixes another value (a baseline fixes ``none``). Each method's knobs (keys
  ``methods.<name>.*``, and the ones its declaration lists elsewhere) are sampled only when the trial's
  ``method`` runs it, and the knobs of a method a trial does not run leave its config.
* ``optim.ratio``: the effective ratio ``lr / ((1 - momentum) * batch_size)`` of the edge-of-chaos
  parametrisation; the learning rate is derived from it (:func:`apply_values`).

Default ranges: each compared method's ``search_space()`` (WUS's: ``wus_tune/methods/wus/study.py``,
chosen around the settings that worked in the calibration runs of the trainer, wide enough to include
"never skips" and "skips a lot"). The LR schedule (``schedule.name``) and the epoch budget (``epochs``)
are not searched by default; a spec adds them (see ``docs/study.md``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from wus_tune._study.catalog import METHOD_KEY, check_methods, declarations, default_methods
from wus_tune._study.catalog import method_entries, method_parts, with_defaults
from wus_tune.errors import ConfigError, UsageError

if TYPE_CHECKING:
    import optuna

    from wus_tune.config import TrainConfig

RATIO_KEY = "optim.ratio"  # virtual: lr / ((1 - momentum) * batch_size); the lr is derived from it
_VIRTUAL = (METHOD_KEY, RATIO_KEY)
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
    param = replace(base, **fields) if base is not None else Param(key, **fields)
    return param.validate()


def _infer_numeric(fields: Mapping[str, Any], where: str) -> str:
    if "low" not in fields or "high" not in fields:
        raise UsageError(f"{where}: give 'choices', or 'low' and 'high'")
    ints = all(isinstance(fields[k], int) and not isinstance(fields[k], bool) for k in ("low", "high"))
    return "int" if ints and not fields.get("log") else "float"


@dataclass(frozen=True)
class SearchSpace:
    """An ordered list of :class:`Param`; conditions refer to earlier keys (or to ``method``).

    ``only_method``: the method choice of a study of one method, which then has no ``method`` parameter;
    a trial runs it unless its fixed values say otherwise (a baseline: ``none``)."""

    params: tuple[Param, ...]
    only_method: str | None = None

    @classmethod
    def build(
        cls,
        overrides: Mapping[str, Any] | None = None,
        *,
        defaults: bool = True,
        methods: Sequence[str] | None = None,
        sections: Mapping[str, Any] | None = None,
    ) -> SearchSpace:
        """The compared ``methods``' knobs (``defaults``; None: the methods a spec compares by default)
        with a spec's entries applied: a mapping overrides or adds a parameter, ``null`` removes one. With
        several methods the virtual ``method`` parameter comes first; each method's knobs, and any key
        under ``methods.<name>.``, are conditional on the choices that run it. ``sections``: the spec's
        method sections (``edge_of_chaos:``) by method name, for the knobs they change."""
        methods = check_methods(list(methods) if methods is not None else default_methods())
        known = declarations()
        using = {name: tuple(m for m in methods if name in method_parts(m)) for name in known}
        params: dict[str, Param] = {}
        if len(methods) > 1:
            params[METHOD_KEY] = Param(METHOD_KEY, "categorical", choices=tuple(methods), doc="the speed-up method")
        for name in dict.fromkeys(part for m in methods for part in method_parts(m)) if defaults else ():
            for key, raw in known[name].search_space((sections or {}).get(name)).items():
                params[key] = _run_by(param_from_dict(key, raw), using[name])
        for key, raw in (overrides or {}).items():
            key = str(key)
            if key == METHOD_KEY:
                raise UsageError("search_space.method: choose the compared methods with the spec's 'methods:' list")
            if raw is None or raw is False:
                params.pop(key, None)
                continue
            param = param_from_dict(key, raw, params.get(key))
            owner = key.split(".")[1] if key.startswith("methods.") and key.count(".") >= 2 else None
            params[key] = _run_by(param, using[owner]) if owner in using and key not in params else param
        space = cls(tuple(params.values()), only_method=methods[0] if len(methods) == 1 else None)
        for p in space.params:
            for k in p.when:
                if k not in params and k not in _VIRTUAL:
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

    def _context(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` with the method of a study of one method, unless they fix another."""
        if self.only_method is None or METHOD_KEY in values:
            return dict(values)
        return {METHOD_KEY: self.only_method, **values}

    def sample(self, trial: optuna.Trial, fixed: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Values for the active parameters: ``fixed`` ones as given (not suggested), the rest suggested."""
        fixed = dict(fixed or {})
        values = self._context(fixed)
        for p in self.params:
            if p.key in fixed or not p.active(values):
                continue
            values[p.key] = p.suggest(trial)
        return values

    def fixed_at_base(self, base: TrainConfig, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` plus, for every parameter active under them, its value in ``base`` (a method's knob
        the base leaves out: the method's default): the fixed values of an enqueued trial that means "the
        base recipe, with these choices" (a baseline, a method's default trial). ``optim.ratio`` is the
        base recipe's ratio."""
        data = with_defaults(base.to_dict())
        context = self._context(values)
        out: dict[str, Any] = {}
        for p in self.params:
            if p.key == METHOD_KEY or p.key in values or not p.active(context):
                continue
            if p.key == RATIO_KEY:
                o = base.optim
                out[p.key] = o.lr / ((1.0 - o.momentum) * o.batch_size)
                continue
            try:
                out[p.key] = get_value(data, p.key)
            except ConfigError:  # a key the base config does not have
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
                    apply_values(base, self._context({**context, p.key: v}))
                except ConfigError as e:
                    raise UsageError(f"search_space.{p.key}: value {v!r} is not a valid config: {e}") from None

    def to_json(self) -> str:
        return json.dumps({p.key: p.to_dict() for p in self.params}, sort_keys=False)


def _run_by(param: Param, choices: tuple[str, ...]) -> Param:
    """``param`` sampled only when the trial's ``method`` is one of ``choices`` (and its own condition holds)."""
    return replace(param, when={METHOD_KEY: choices, **{k: v for k, v in param.when.items() if k != METHOD_KEY}})


def apply_values(base: TrainConfig, values: Mapping[str, Any]) -> TrainConfig:
    """``base`` with the sampled/fixed values written in (``method`` expanded into the config's
    ``methods``, the knobs of the methods it does not run dropped; ``optim.ratio`` turned into ``optim.lr``;
    ``key[i]`` list items set), validated by :meth:`TrainConfig.replace`."""
    values = dict(values)
    overrides: dict[str, Any] = {}
    method = values.pop(METHOD_KEY, None)
    data = base.to_dict()
    if method is not None:
        data["methods"] = overrides["methods"] = method_entries(method, base.methods)
        values = {k: v for k, v in values.items() if not _knob_of_another(k, data["methods"])}
    ratio = values.pop(RATIO_KEY, None)
    if ratio is not None:
        values["optim.lr"] = lr_from_ratio(ratio, values, base)
    for key, value in values.items():
        m = _INDEX.match(key)
        if m is None:
            overrides[key] = value
            continue
        current = list(overrides.get(m["key"], get_value(with_defaults(data), m["key"])))
        get_value(with_defaults(data), key)  # the item exists
        current[int(m["index"])] = value
        overrides[m["key"]] = current
    return base.replace(overrides)


def _knob_of_another(key: str, entries: Mapping[str, Any]) -> bool:
    """Is ``key`` a knob (``methods.<name>.*``) of a method that is not in ``entries`` (the trial's)?"""
    parts = key.split(".")
    return len(parts) >= 3 and parts[0] == "methods" and parts[1] not in entries


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
