"""Older configs, specs and command-line spellings, read as today's: every rename in one place.

Config version 1 (wus_tune 0.1) configured weight update skipping in a section of its own,
``wus: {enabled: true, <knobs>}``. Version 2 configures it like every other method,
``methods: {wus: {<knobs>}}`` (no entry: off), and a study searches its variant as the knob
``methods.wus.variant`` (``wus`` or ``wus+lr``) where version 1 had the virtual key ``wus.variant``
(whose ``none`` is now the method choice ``none``). What reads which:

* :func:`migrate_config`: a config mapping (a file, :meth:`TrainConfig.from_dict <wus_tune.config.TrainConfig.from_dict>`)
  of version 1 -> version 2 (``wus:`` on -> ``methods.wus``; off -> no entry);
* :func:`migrate_overrides`: dotted config keys (``--wus``, ``--wus.threshold 0.02``, ``--set wus.x=...``,
  ``TrainConfig.replace({"wus.threshold": ...})``) -> ``methods.wus.*``;
* :func:`migrate_spec`: a study spec's old keys (``enqueue_wus_default`` -> ``enqueue_defaults``; ``train.wus``
  -> ``train.methods.wus``, WUS's fixed knobs for the trials that run it; ``wus.*`` in ``search_space:``
  and ``enqueue:``, ``wus.variant`` included);
* :func:`add_old_train_options`: the ``--wus`` flag of ``python -m wus_tune.train``.

Each old spelling still works and says so in one line (a ``FutureWarning``: ``warning: ...`` on the
command line).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping
from typing import Any

from wus_tune.errors import ConfigError, UsageError

__all__ = ["CONFIG_VERSION", "migrate_config", "migrate_overrides", "migrate_spec", "add_old_train_options"]

CONFIG_VERSION = 2
_SECTION = "wus"  # version 1's section, and the method's name since version 2
_NEW = f"methods.{_SECTION}"
_VARIANT = f"{_SECTION}.variant"  # version 1's virtual key of a study


def deprecated(old: str, new: str) -> None:
    """One line saying that ``old`` is read as ``new``."""
    warnings.warn(f"{old} is deprecated; read as {new}", FutureWarning, stacklevel=4)


# ---- configs -------------------------------------------------------------------------------------------


def migrate_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` (a config mapping) in the current version. Version 1, or no version and a ``wus:``
    section: the section becomes the ``methods.wus`` entry when it was enabled and goes otherwise."""
    data = dict(raw)
    version = data.get("version", 1 if _SECTION in data else CONFIG_VERSION)
    if isinstance(version, bool) or version != 1:  # a bool is no version: the config's own check says so
        return data
    deprecated("config version 1 (a `wus:` section)", f"version {CONFIG_VERSION} (`methods: {{wus: ...}}`); save it again to update the file")
    section = _section(data.pop(_SECTION, None), _SECTION)
    knobs = {k: v for k, v in section.items() if k != "enabled"}
    data["version"] = CONFIG_VERSION
    if section.get("enabled"):
        data["methods"] = _with_entry(data.get("methods"), knobs)
    elif knobs:  # off: its knobs go, but a bad one is still the error it was
        from wus_tune.methods import build_methods

        build_methods({_SECTION: knobs})
    return data


def migrate_overrides(overrides: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted config overrides with version 1's keys spelled as today's, for a config whose dict is
    ``current``: ``wus.enabled`` (``--wus``) switches the ``methods.wus`` entry on (keeping its knobs) or
    off, ``wus.variant`` picks the variant (``none``: off), ``wus.<knob>`` is ``methods.wus.<knob>``."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, knob = key.partition(".")
        if head != _SECTION or not knob:
            out[key] = value
        elif (knob == "enabled" and value is False) or (knob == "variant" and value == "none"):
            deprecated(f"{key}={value}", f"no {_NEW} entry (off)")
            methods = out.get("methods", current.get("methods") or {})
            out = {k: v for k, v in out.items() if not k.startswith(_NEW)}
            out["methods"] = {k: v for k, v in methods.items() if k != _SECTION}
        elif knob == "enabled":
            deprecated(key, f"a {_NEW} entry (--method {_SECTION})")
            if _NEW not in out:  # first, so that the knobs set beside it stay
                out = {_NEW: (current.get("methods") or {}).get(_SECTION) or {}, **out}
        else:
            deprecated(key, f"{_NEW}.{knob}")
            out[f"{_NEW}.{knob}"] = value
    return out


# ---- study specs ------------------------------------------------------------------------------------------


def migrate_spec(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A study spec mapping (or some of its fields) with version 1's keys spelled as today's."""
    data = dict(raw)
    if "enqueue_wus_default" in data:
        deprecated("enqueue_wus_default", "enqueue_defaults (every compared method's default trials)")
        data["enqueue_defaults"] = data.pop("enqueue_wus_default")
    if isinstance(data.get("train"), Mapping) and _SECTION in data["train"]:
        data["train"] = _spec_train(data["train"])
    if isinstance(data.get("search_space"), Mapping):
        data["search_space"] = {_space_key(k): _space_entry(k, v) for k, v in data["search_space"].items()}
    if isinstance(data.get("enqueue"), (list, tuple)):
        data["enqueue"] = [_values(e, f"enqueue[{i}]") if isinstance(e, Mapping) else e
                           for i, e in enumerate(data["enqueue"])]  # fmt: skip
    return data


def _spec_train(train: Mapping[str, Any]) -> dict[str, Any]:
    """A spec's base config: its ``wus:`` section, on or off, holds WUS's fixed knobs for the trials that
    run it (the study decides where WUS is on), so it becomes the ``methods.wus`` entry either way."""
    deprecated("a spec's train.wus", f"train.{_NEW} (WUS's fixed knobs in the trials that run it)")
    out = dict(train)
    section = {k: v for k, v in _section(out.pop(_SECTION), f"train.{_SECTION}").items() if k != "enabled"}
    methods = out.get("methods") if isinstance(out.get("methods"), Mapping) else {}
    out["methods"] = _with_entry(methods, {**section, **(methods.get(_SECTION) or {})})
    if out.get("version") == 1:
        out["version"] = CONFIG_VERSION
    return out


def _space_key(key: Any) -> Any:
    if isinstance(key, str) and key.startswith(f"{_SECTION}."):
        deprecated(f"search_space.{key}", f"search_space.{_NEW}.{key[len(_SECTION) + 1:]}")
        return f"methods.{key}"
    return key


def _space_entry(key: Any, entry: Any) -> Any:
    """A search_space entry: version 1's ``wus.variant`` lost its ``none`` (the method choice ``none``
    now), and a ``when`` on ``wus.*`` keys reads ``methods.wus.*``."""
    if not isinstance(entry, Mapping):
        return entry
    out = dict(entry)
    if key == _VARIANT and isinstance(out.get("choices"), (list, tuple)) and "none" in out["choices"]:
        raise UsageError(f"search_space.{_VARIANT}: 'none' is the method choice 'none' now: add it to the spec's "
                         f"methods list, and give {_NEW}.variant the choices wus, wus+lr")  # fmt: skip
    when = out.get("when")
    if isinstance(when, Mapping):
        out["when"] = {(f"methods.{k}" if isinstance(k, str) and k.startswith(f"{_SECTION}.") else k): v
                       for k, v in when.items()}  # fmt: skip
    return out


def _values(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    """An enqueued trial's dotted values: ``wus.variant: none`` is ``method: none``, ``wus.*`` is ``methods.wus.*``."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if not (isinstance(key, str) and key.startswith(f"{_SECTION}.")):
            out[key] = value
        elif key == _VARIANT and value == "none":
            deprecated(f"{where}.{key}: none", "method: none")
            out["method"] = "none"
        else:
            deprecated(f"{where}.{key}", f"{where}.methods.{key}")
            out[f"methods.{key}"] = value
    return out


# ---- the command line -------------------------------------------------------------------------------------


def add_old_train_options(parser: argparse.ArgumentParser) -> None:
    """``--wus`` (version 1: turn WUS on), read as a ``methods.wus`` entry (``--method wus``)."""
    parser.add_argument(f"--{_SECTION}", dest=f"{_SECTION}.enabled", action="store_const", const="true",
                        help=f"deprecated: = --method {_SECTION}")  # fmt: skip


# ---- helpers ----------------------------------------------------------------------------------------------


def _section(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def _with_entry(methods: Any, knobs: dict[str, Any]) -> Any:
    """``methods`` with the WUS entry first (version 1 built WUS before the other methods)."""
    if methods is not None and not isinstance(methods, Mapping):
        return methods  # not a mapping: the config's own check names it
    return {_SECTION: knobs, **{k: v for k, v in (methods or {}).items() if k != _SECTION}}
