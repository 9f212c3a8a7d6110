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
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from wus_tune.errors import ConfigError, one_line

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
    """Base class: override the hooks you need. ``name`` is the registry key and the metric prefix.

    The class carries the method's study data (classmethods, read without building a run); an instance
    carries one run's state and is called by the trainer at the hook points.
    """

    name: ClassVar[str] = ""
    combines_with_wus: ClassVar[bool] = False  # may run beside WUS in one trial ("approx_ops+wus")
    tunes_optimizer: ClassVar[bool] = False  # its search space has optim.* knobs (edge_of_chaos)
    measure_only: ClassVar[bool] = False  # changes nothing in training: a base config's entry stays in every trial
    # The searched knobs, as a spec's ``search_space:`` entries (type/low/high/log/choices/when/doc), keyed by
    # dotted TrainConfig key; the study adds ``when: {method: [choices naming this method]}``.
    SEARCH_SPACE: ClassVar[dict[str, dict[str, Any]]] = {}
    # The default trial's knobs where they differ from the constructor's defaults (the card's suggestions).
    DEFAULT_TRIAL: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        self.params = params

    # ---- study data (classmethods) ---------------------------------------------------------------

    @classmethod
    def enabled(cls, config: Any) -> bool:
        """Is this method on in ``config`` (a TrainConfig)?"""
        return cls.name in config.methods

    @classmethod
    def from_config(cls, config: Any) -> "Method":
        """The method instance for ``config``; bad arguments raise ConfigError naming the key."""
        return _construct(cls, config.methods.get(cls.name) or {})

    @classmethod
    def switch(cls, on: bool) -> dict[str, Any]:
        """Dotted-key config overrides that turn the method on (off: the study removes ``methods.<name>``)."""
        return {f"methods.{cls.name}": {}} if on else {}

    @classmethod
    def search_space(cls) -> dict[str, dict[str, Any]]:
        return {key: dict(value) for key, value in cls.SEARCH_SPACE.items()}

    @classmethod
    def default_trials(cls) -> list[dict[str, Any]]:
        """Dotted-key overrides of each default trial: the searched ``methods.<name>.*`` knobs at the
        constructor's defaults, overlaid by :attr:`DEFAULT_TRIAL`."""
        signature = inspect.signature(cls.__init__).parameters
        prefix = f"methods.{cls.name}."
        knobs = [key[len(prefix):] for key in cls.SEARCH_SPACE if key.startswith(prefix)]
        trial = {f"{prefix}{k}": signature[k].default for k in knobs
                 if k in signature and signature[k].default is not inspect.Parameter.empty}
        trial.update({f"{prefix}{k}": v for k, v in cls.DEFAULT_TRIAL.items()})
        return [trial]

    @classmethod
    def expand_virtual(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Pop this method's virtual keys from ``values``; return the config overrides they imply."""
        return {}

    @classmethod
    def check_model(cls, model: Any, config: Any) -> str | None:
        """None when the method can act on ``model`` (a ModelConfig); else a one-line reason."""
        return None

    # ---- run-time hooks (see the module docstring) -------------------------------------------------

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
    """Every method: the built-in ones (WUS first), then those of installed packages' ``wus_tune.methods``
    entry points (each names a :class:`Method` subclass, e.g. ``freeze_first = my_pkg:FreezeFirst``)."""
    _load_builtin_methods()
    _load_entry_points()
    return dict(_REGISTRY)


def validate_methods(spec: dict[str, dict[str, Any]]) -> None:
    """Check method names and keyword names against the registry (values are checked on construction)."""
    build_methods(spec)


def build_methods(spec: Any) -> list[Method]:
    """The methods a config runs, in order. ``spec`` is a TrainConfig (WUS included when on) or a config's
    ``methods`` mapping; bad names or arguments raise ConfigError."""
    if not isinstance(spec, dict):
        config = spec
        return [cls.from_config(config) for cls in registry().values() if cls.name == "wus" and cls.enabled(config)] + \
            build_methods(config.methods)
    if not spec:
        return []
    known = registry()
    methods = []
    for name, params in spec.items():
        if name == "wus":
            raise ConfigError("methods.wus: WUS is configured in its own section (wus: {enabled: true, ...})")
        if name not in known:
            raise ConfigError(f"methods.{name}: unknown method; choose from {', '.join(sorted(set(known) - {'wus'})) or 'none'}")
        methods.append(_construct(known[name], params or {}))
    return methods


def _construct(cls: type[Method], params: dict[str, Any]) -> Method:
    accepted = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for key in params:
        if key not in accepted and not takes_any:
            names = [p for p in accepted if p != "self"]
            raise ConfigError(f"methods.{cls.name}.{key}: unknown argument (known: {', '.join(names)})")
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"methods.{cls.name}: {e}") from None


def _load_builtin_methods() -> None:
    # Importing a method module registers it.
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


_BUILTIN_MODULES: list[str] = [
    "wus_tune.methods.wus", "wus_tune.methods.approx_ops", "wus_tune.methods.lp_sphere",
    "wus_tune.methods.edge_of_chaos", "wus_tune.methods.gauss_newton",
]
ENTRY_POINT_GROUP = "wus_tune.methods"
_entry_points_seen: set[tuple[str, str]] = set()


def _load_entry_points() -> None:
    """Register the methods that installed packages declare. Looked up on every call (cheap), so a package
    put on ``sys.path`` during the process is found; each entry point is loaded once."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if (ep.name, ep.value) in _entry_points_seen:
            continue
        _entry_points_seen.add((ep.name, ep.value))
        try:
            cls = ep.load()
        except Exception as e:  # a broken plug-in must not break the built-in methods
            warnings.warn(f"entry point {ENTRY_POINT_GROUP}:{ep.name} = {ep.value} failed to load: {one_line(e)}",
                          stacklevel=3)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
            warnings.warn(f"entry point {ENTRY_POINT_GROUP}:{ep.name} = {ep.value} is not a Method subclass "
                          "with a name; ignored", stacklevel=3)
            continue
        _REGISTRY.setdefault(cls.name, cls)
