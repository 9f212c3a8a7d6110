"""The public face for plug-in authors: where models and datasets come from, in one import.

A model or dataset enters the trainer one way: a *factory*, named by an import path ``"pkg.mod:attr"``
(a registered name, built-ins included, or ``model.factory`` / ``data.factory``). The work lives in:

- :mod:`wus_tune.registry`: names -> import paths (the built-ins and the ``wus_tune.models`` /
  ``wus_tune.datasets`` entry points);
- :mod:`wus_tune.factories`: importing an import path and calling the factory, one ConfigError line per failure;
- :mod:`wus_tune.provenance`: the factory's package version and the config's record of objects handed over;
- :mod:`wus_tune.prepare`: the dataset and the model of a config, checked against each other;
- :mod:`wus_tune.listing`: what ``--list`` prints.

The package imports those modules directly; this one only gathers their names for users.
"""

from __future__ import annotations

from wus_tune.factories import OBJECT_PREFIX, call_factory, check_path, import_path_of, is_import_path, load_object
from wus_tune.listing import describe
from wus_tune.prepare import prepare
from wus_tune.provenance import package_version, record_sources, source_entries
from wus_tune.registry import (
    BUILTIN_DATASETS,
    BUILTIN_MODELS,
    DATASET_GROUP,
    MODEL_GROUP,
    dataset_registry,
    model_registry,
)

__all__ = [
    "MODEL_GROUP",
    "DATASET_GROUP",
    "OBJECT_PREFIX",
    "BUILTIN_MODELS",
    "BUILTIN_DATASETS",
    "model_registry",
    "dataset_registry",
    "is_import_path",
    "check_path",
    "load_object",
    "import_path_of",
    "package_version",
    "call_factory",
    "record_sources",
    "source_entries",
    "prepare",
    "describe",
]
