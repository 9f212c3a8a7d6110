"""What ``--list`` prints: every registered model, dataset and method, with where it comes from."""

from __future__ import annotations

import wus_tune.registry as registry

__all__ = ["describe"]


def describe() -> list[str]:
    """Lines for ``--list``: every registered model, dataset and method, with where it comes from."""
    lines = []
    for title, section, table, builtin, group in (
        ("models", "model", registry.model_registry(), registry.BUILTIN_MODELS, registry.MODEL_GROUP),
        ("datasets", "data", registry.dataset_registry(), registry.BUILTIN_DATASETS, registry.DATASET_GROUP),
    ):
        lines.append(f"{title} ({section}.name; or any import path as {section}.factory):")
        for name, path in table.items():
            origin = "built-in" if builtin.get(name) == path else f"entry point {group}"
            lines.append(f"  {name:<14} {path}  ({origin})")
    from wus_tune.methods import registry as method_registry

    lines.append("methods (methods: / --methods):")
    for name, cls in sorted(method_registry().items()):
        lines.append(f"  {name:<14} {cls.__module__}:{cls.__qualname__}")
    return lines
