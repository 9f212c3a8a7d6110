"""Factories named by import path ``"pkg.mod:attr"``: the one way a model or a dataset enters the trainer.

``model.name`` / ``data.name`` is looked up in :mod:`wus_tune.registry`; ``model.factory`` /
``data.factory`` is an import path given directly (no registration needed). A model factory is called
``factory(input_shape, num_classes, **kwargs)`` and returns an ``nn.Module``; a data factory
``factory(**kwargs)`` returns ``(x, y)`` or a mapping of splits (:mod:`wus_tune.data`). ``kwargs`` are
``model.kwargs`` / ``data.kwargs``, plus the config fields the factory's signature names and the config sets
to other than their defaults (``width``, ``hidden``, ``depth``, ``batch_norm`` for a model; ``data_dir``,
``cache_dir``, ``download`` for data): that is how the built-ins get their settings, through the same call
as a user's factory (their own defaults are the config's).

Everything that can go wrong here (an import that fails, an attribute that is missing, a keyword the
factory does not take, a factory that raises) is a :class:`~wus_tune.errors.ConfigError` of one line.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from wus_tune.errors import ConfigError, UsageError, one_line

__all__ = ["OBJECT_PREFIX", "is_import_path", "check_path", "load_object", "import_path_of", "call_factory"]

# A factory given as a Python object that cannot be imported back by path (a notebook function, a lambda):
# the config records "<python>:<qualname>", which tells a later run that it must be handed the object again.
OBJECT_PREFIX = "<python>:"

_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


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
    except UsageError:  # a ConfigError or DataError of the factory's own says what is wrong already
        raise
    except Exception as e:
        raise ConfigError(f"{key}: {name}() raised {one_line(e, with_type=True)}") from None
