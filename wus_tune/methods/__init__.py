"""Plug-in speed-up methods.

A method is a set of pure functions (the maths, usable in any training loop) plus a thin
:class:`Method` subclass that the trainer calls at a handful of hook points. A config names methods
and their keyword arguments (``methods: {approx_ops: {sample_ratio: 0.5}}``); ``Method(**params)``
round-trips a tuned config, because ``__init__`` only stores keyword arguments.

Hook order inside :func:`wus_tune.train` (each hook is optional)::

    model = method.apply_model(model, ctx)          # once, before the optimizer is built
    opt = method.make_optimizer(model, ctx)         # once; the first method returning one wins
    for epoch:
        for step:
            loss.backward()
            method.before_step(model, optimizer, ctx)   # e.g. rewrite gradients
            optimizer.step()
            method.after_step(model, optimizer, ctx)    # e.g. project weights back to a constraint
        metrics = method.end_epoch(model, ctx)      # logged with the method's prefix: "lp_sphere/sparsity"
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from wus_tune.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["Method", "MethodContext", "register", "registry", "build_methods", "validate_methods"]


@dataclass
class MethodContext:
    """What a method may read about the run. ``step`` and ``epoch`` count from 0."""

    config: Any  # the TrainConfig
    device: "torch.device"
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def progress(self) -> float:
        return self.step / max(1, self.total_steps)


class Method:
    """Base class: override the hooks you need. ``name`` is the registry key and the metric prefix."""

    name: ClassVar[str] = ""
    # True when a study's trials of this method search the optimizer's own knobs (lr, momentum, ...): the
    # study then also runs plain trials searching the same knobs with the same budget, its fair yardstick.
    tunes_optimizer: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params = params

    def apply_model(self, model: "torch.nn.Module", ctx: MethodContext) -> "torch.nn.Module":
        return model

    def make_optimizer(self, model: "torch.nn.Module", ctx: MethodContext) -> "torch.optim.Optimizer | None":
        return None

    def before_step(self, model: "torch.nn.Module", optimizer: "torch.optim.Optimizer", ctx: MethodContext) -> None:
        pass

    def after_step(self, model: "torch.nn.Module", optimizer: "torch.optim.Optimizer", ctx: MethodContext) -> None:
        pass

    def end_epoch(self, model: "torch.nn.Module", ctx: MethodContext) -> dict[str, float]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to configs under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    _load_builtin_methods()
    return dict(_REGISTRY)


def validate_methods(spec: dict[str, dict[str, Any]]) -> None:
    """Check method names and keyword names against the registry (values are checked on construction)."""
    build_methods(spec)


def build_methods(spec: dict[str, dict[str, Any]]) -> list[Method]:
    """Instantiate the methods of a config, in order; bad names or arguments raise ConfigError."""
    if not spec:
        return []
    known = registry()
    methods = []
    for name, params in spec.items():
        if name not in known:
            raise ConfigError(f"methods.{name}: unknown method; choose from {', '.join(sorted(known)) or 'none'}")
        cls = known[name]
        accepted = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        for key in params or {}:
            if key not in accepted and not takes_any:
                names = [p for p in accepted if p != "self"]
                raise ConfigError(f"methods.{name}.{key}: unknown argument (known: {', '.join(names)})")
        try:
            methods.append(cls(**(params or {})))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"methods.{name}: {e}") from None
    return methods


def _load_builtin_methods() -> None:
    # Importing a method module registers it. Modules are added here as they land.
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


_BUILTIN_MODULES: list[str] = ["wus_tune.methods.approx_ops", "wus_tune.methods.lp_sphere", "wus_tune.methods.edge_of_chaos", "wus_tune.methods.gauss_newton"]
