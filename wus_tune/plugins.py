"""Where models and datasets come from: one registry each, built-ins registered like any plugin.

A model or dataset enters the trainer one way: a *factory*, named by an import path ``"pkg.mod:attr"``.

- ``model.name`` / ``data.name`` is a registered name. The registry is the table of built-ins below plus
  the entry points of the groups ``wus_tune.models`` and ``wus_tune.datasets`` (a package declares, in its
  ``pyproject.toml``, ``[project.entry-points."wus_tune.models"] mynet = "my_pkg.nets:build"``). Each
  name maps to an import path, the built-ins' as well as the plugins'.
- ``model.factory`` / ``data.factory`` is an import path given directly (no registration needed).

A model factory is called ``factory(input_shape, num_classes, **kwargs)`` and returns an ``nn.Module``;
a data factory ``factory(**kwargs)`` returns ``(x, y)`` or a mapping of splits (:mod:`wus_tune.data`).
``kwargs`` are ``model.kwargs`` / ``data.kwargs``, plus the config fields the factory's signature names
and the config sets to other than their defaults (``width``, ``hidden``, ``depth``, ``batch_norm`` for a
model; ``data_dir``, ``cache_dir``, ``download`` for data): that is how the built-ins get their settings,
through the same call as a user's factory (their own defaults are the config's).

Everything that can go wrong here (an import that fails, an attribute that is missing, a keyword the
factory does not take, a factory that raises) is a :class:`~wus_tune.errors.ConfigError` of one line.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

from wus_tune.errors import ConfigError, one_line

__all__ = [
    "MODEL_GROUP",
    "DATASET_GROUP",
    "OBJECT_PREFIX",
    "model_registry",
    "dataset_registry",
    "load_object",
    "import_path_of",
    "package_version",
    "call_factory",
    "describe",
]

MODEL_GROUP = "wus_tune.models"
DATASET_GROUP = "wus_tune.datasets"
# A factory given as a Python object that cannot be imported back by path (a notebook function, a lambda):
# the config records "<python>:<qualname>", which tells a later run that it must be handed the object again.
OBJECT_PREFIX = "<python>:"

BUILTIN_MODELS: dict[str, str] = {
    "mlp": "wus_tune.models:mlp",
    "alexnet": "wus_tune.models:alexnet",
    "vgg11": "wus_tune.models:vgg11",
    "vgg16": "wus_tune.models:vgg16",
    "resnet18": "wus_tune.models:resnet18",
}
BUILTIN_DATASETS: dict[str, str] = {
    "digits": "wus_tune.data:digits",
    "cifar10": "wus_tune.data:cifar10",
    "cifar100": "wus_tune.data:cifar100",
    "imagefolder": "wus_tune.data:imagefolder",
}

_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _entry_points(group: str) -> dict[str, str]:
    # A scan of the installed distributions costs tens of milliseconds and configs validate often: scan
    # again only when sys.path changed (as wus_tune.methods does), so a package put on it is found.
    return _scan(group, tuple(sys.path))


@functools.lru_cache(maxsize=8)
def _scan(group: str, _path: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=group)}


def refresh() -> None:
    """Forget the entry points and versions read so far (a plugin installed into a running process)."""
    _scan.cache_clear()
    package_version.cache_clear()


def model_registry() -> dict[str, str]:
    """Registered model names -> import paths: the built-ins, then the ``wus_tune.models`` entry points."""
    return {**BUILTIN_MODELS, **_entry_points(MODEL_GROUP)}


def dataset_registry() -> dict[str, str]:
    """Registered dataset names -> import paths: the built-ins, then the ``wus_tune.datasets`` entry points."""
    return {**BUILTIN_DATASETS, **_entry_points(DATASET_GROUP)}


def is_import_path(text: Any) -> bool:
    return isinstance(text, str) and bool(_PATH.match(text))


def check_path(key: str, path: Any) -> None:
    """The syntax of an import path (``pkg.mod:attr``), without importing anything."""
    if isinstance(path, str) and path.startswith(OBJECT_PREFIX):
        return
    if not is_import_path(path):
        raise ConfigError(f"{key}: expected an import path 'package.module:function', got {path!r}")


def load_object(path: str, key: str) -> Any:
    """Import ``"pkg.mod:attr.sub"`` and return the attribute; any failure is one ConfigError line."""
    if path.startswith(OBJECT_PREFIX):
        raise ConfigError(
            f"{key}: {path[len(OBJECT_PREFIX):]} was given as a Python object, which a config cannot import; "
            f"pass it again (fit(config, model=..., data=...)) or make it importable as 'package.module:function'"
        )
    check_path(key, path)
    module_name, _, attrs = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises at import time
        raise ConfigError(f"{key}: cannot import {module_name!r} ({one_line(e, with_type=True)})") from None
    for attr in attrs.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(f"{key}: module {module_name!r} has no attribute {attrs!r}") from None
    if not callable(obj):
        raise ConfigError(f"{key}: {path} is a {type(obj).__name__}, not a callable factory")
    return obj


def import_path_of(obj: Any) -> str:
    """The import path that gives ``obj`` back, or ``"<python>:<qualname>"`` when there is none
    (defined in ``__main__``, a notebook, a function's body, a lambda)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    if module and module != "__main__" and "<" not in qualname:
        path = f"{module}:{qualname}"
        try:
            if load_object(path, "factory") is obj:
                return path
        except ConfigError:
            pass
    return f"{OBJECT_PREFIX}{qualname}"


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


def call_factory(
    factory: Callable[..., Any],
    key: str,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    config_fields: Mapping[str, Any] = {},
) -> Any:
    """Call a factory with ``kwargs`` plus those ``config_fields`` its signature names explicitly.

    A keyword the factory does not accept is a ConfigError naming ``<key>.kwargs``; an exception inside
    the factory is a ConfigError naming the factory, with the exception's first line."""
    name = getattr(factory, "__qualname__", repr(factory))
    call_kwargs = dict(kwargs)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        named = {
            p.name for p in signature.parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }  # fmt: skip
        for field_name, value in config_fields.items():
            if field_name in named and field_name not in call_kwargs:
                call_kwargs[field_name] = value
        try:
            signature.bind(*args, **call_kwargs)
        except TypeError as e:
            raise ConfigError(f"{key.split('.')[0]}.kwargs: {name}() does not take these arguments ({e})") from None
    try:
        return factory(*args, **call_kwargs)
    except ConfigError:
        raise
    except Exception as e:
        from wus_tune.errors import UsageError

        if isinstance(e, UsageError):
            raise
        raise ConfigError(f"{key}: {name}() raised {one_line(e, with_type=True)}") from None


def record_sources(config: Any, *, model: Any = None, data: Any = None) -> Any:
    """A copy of ``config`` that says where the model and the data handed over as objects came from:
    ``factory`` is the callable's import path (``"<python>:<qualname>"`` when it has none), with its
    package version; unchanged when neither is given."""
    import dataclasses

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
        path = import_path_of(obj) if callable(obj) and not _is_module(obj) else f"{OBJECT_PREFIX}{type(obj).__qualname__}"
        out[f"{section}.factory"] = path
        out[f"{section}.factory_version"] = package_version(path)
        if "name" not in (train.get(section) or {}):
            out[f"{section}.name"] = path.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    return out


def _recorded(section: Any, obj: Any, default_name: str) -> Any:
    import dataclasses

    if callable(obj) and not _is_module(obj):
        path = import_path_of(obj)
    else:
        path = f"{OBJECT_PREFIX}{type(obj).__qualname__}"
    label = section.name if section.factory == path or section.name != default_name else path.rsplit(":", 1)[-1]
    return dataclasses.replace(section, name=label, factory=path, factory_version=package_version(path))


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def prepare(config: Any, *, model: Any = None, data: Any = None, device: Any = "cpu") -> tuple[Any, Any]:
    """The dataset and the model of ``config`` (or the objects given), checked against each other: the
    model's logits for two training inputs must be ``(2, num_classes)``. Everything the trainer and the
    study's pre-flight need; every failure is one UsageError line."""
    from wus_tune.data import load_dataset
    from wus_tune.models import build_model, check_output

    dataset = load_dataset(config.data, data=data)
    net = build_model(config.model, dataset.input_shape, dataset.num_classes, model=model)
    at = next(net.parameters()).device  # a model handed over on its device is checked there
    sample = dataset.loader("train", batch_size=2, drop_last=False).batches(dataset.sample(2)).to(at)
    check_output(net, sample, dataset.num_classes, "model.factory" if (model is not None or config.model.factory) else "model")
    return dataset, net.to(device)


def describe() -> list[str]:
    """Lines for ``--list``: every registered model, dataset and method, with where it comes from."""
    lines = []
    for title, section, table, builtin, group in (
        ("models", "model", model_registry(), BUILTIN_MODELS, MODEL_GROUP),
        ("datasets", "data", dataset_registry(), BUILTIN_DATASETS, DATASET_GROUP),
    ):
        lines.append(f"{title} ({section}.name; or any import path as {section}.factory):")
        for name, path in table.items():
            origin = "built-in" if builtin.get(name) == path else f"entry point {group}"
            lines.append(f"  {name:<14} {path}  ({origin})")
    from wus_tune.methods import registry

    lines.append("methods (methods: / --methods):")
    for name, cls in sorted(registry().items()):
        lines.append(f"  {name:<14} {cls.__module__}:{cls.__qualname__}")
    return lines

