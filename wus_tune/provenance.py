"""Where a run's model and data came from: the factory's import path and its package version, recorded in
the config so that a later run can tell whether it rebuilds the same thing."""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Mapping
from typing import Any

from wus_tune.factories import OBJECT_PREFIX, import_path_of, is_import_path

__all__ = ["package_version", "record_sources", "source_entries"]


@functools.lru_cache(maxsize=256)
def package_version(path: str) -> str | None:
    """The version of ``path``'s top-level package: the installed distribution of that name, else the
    package's ``__version__``; None for a plain module on ``PYTHONPATH`` without either. (Not
    ``packages_distributions()``: it reads every installed file list, seconds on a large environment.)"""
    if not is_import_path(path):
        return None
    from importlib.metadata import PackageNotFoundError, version

    top = path.split(":")[0].split(".")[0]
    for name in dict.fromkeys((top, top.replace("_", "-"))):
        try:
            return version(name)
        except PackageNotFoundError:
            pass
    try:
        module = importlib.import_module(top)
    except Exception:
        return None
    found = getattr(module, "__version__", None)
    return str(found) if found is not None else None


def record_sources(config: Any, *, model: Any = None, data: Any = None) -> Any:
    """A copy of ``config`` that says where the model and the data handed over as objects came from:
    ``factory`` is the callable's import path (``"<python>:<qualname>"`` when it has none), with its
    package version; unchanged when neither is given."""
    if model is None and data is None:
        return config
    config = dataclasses.replace(config)
    if model is not None:
        config.model = _recorded(config.model, model, "vgg11")
    if data is not None:
        config.data = _recorded(config.data, data, "cifar10")
    return config


def source_entries(train: Mapping[str, Any], *, model: Any = None, data: Any = None) -> dict[str, Any]:
    """The dotted base-config keys that record objects handed to a study (``run_study(model=, data=)``)."""
    out: dict[str, Any] = {}
    for section, obj in (("model", model), ("data", data)):
        if obj is None:
            continue
        path = _path_of(obj)
        out[f"{section}.factory"] = path
        out[f"{section}.factory_version"] = package_version(path)
        if "name" not in (train.get(section) or {}):
            out[f"{section}.name"] = path.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    return out


def _recorded(section: Any, obj: Any, default_name: str) -> Any:
    path = _path_of(obj)
    label = section.name if section.factory == path or section.name != default_name else path.rsplit(":", 1)[-1]
    return dataclasses.replace(section, name=label, factory=path, factory_version=package_version(path))


def _path_of(obj: Any) -> str:
    """A factory's import path; an object that is not one (a module, a tensor pair) is named by its type."""
    import torch

    if callable(obj) and not isinstance(obj, torch.nn.Module):
        return import_path_of(obj)
    return f"{OBJECT_PREFIX}{type(obj).__qualname__}"
