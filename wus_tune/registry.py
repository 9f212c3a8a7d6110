"""The model and dataset registries: registered names -> import paths, built-ins registered like any plugin.

A registry is the table of built-ins below plus the entry points of the groups ``wus_tune.models`` and
``wus_tune.datasets`` (a package declares, in its ``pyproject.toml``,
``[project.entry-points."wus_tune.models"] mynet = "my_pkg.nets:build"``). Each name maps to an import path,
the built-ins' as well as the plugins'; :mod:`wus_tune.factories` imports and calls it.
"""

from __future__ import annotations

import functools
import sys

__all__ = ["MODEL_GROUP", "DATASET_GROUP", "BUILTIN_MODELS", "BUILTIN_DATASETS", "model_registry", "dataset_registry"]

MODEL_GROUP = "wus_tune.models"
DATASET_GROUP = "wus_tune.datasets"

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


def model_registry() -> dict[str, str]:
    """Registered model names -> import paths: the built-ins, then the ``wus_tune.models`` entry points."""
    return {**BUILTIN_MODELS, **_entry_points(MODEL_GROUP)}


def dataset_registry() -> dict[str, str]:
    """Registered dataset names -> import paths: the built-ins, then the ``wus_tune.datasets`` entry points."""
    return {**BUILTIN_DATASETS, **_entry_points(DATASET_GROUP)}


def _entry_points(group: str) -> dict[str, str]:
    # A scan of the installed distributions costs tens of milliseconds and configs validate often: scan
    # again only when sys.path changed (as wus_tune.methods does), so a package put on it is found.
    return _scan(group, tuple(sys.path))


@functools.lru_cache(maxsize=8)
def _scan(group: str, _path: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=group)}
