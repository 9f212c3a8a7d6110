"""Typed training configuration: one file fully describes a training run.

A :class:`TrainConfig` is what ``python -m wus_tune.train --config FILE`` reads, what the study exports
for its chosen trial, and what every result and checkpoint carries, so a run can be reproduced from its
files. The file format (YAML or JSON) is the nested dict of :meth:`TrainConfig.to_dict`::

    version: 2
    model: {name: vgg11, width: 0.25}
    data: {name: cifar10, data_dir: ../shared/data/cifar10-train-jpeg.tar.gz, subset: 10000}
    optim: {lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4, batch_size: 128}
    schedule: {name: step, milestones: [0.5, 0.75], gamma: 0.1}
    methods: {wus: {threshold: 0.01, window: 2, skip_length: 2, bias_scope: all}}   # speed-up methods on
    epochs: 15
    seed: 0

A user's own model and data are factories named by import path (see :mod:`wus_tune.factories`)::

    model: {factory: "my_pkg.nets:build", kwargs: {hidden: 64}, factory_version: "1.2.0"}
    data: {factory: "my_pkg.data:load", kwargs: {fold: 0}}

Unknown keys and out-of-range values raise :class:`~wus_tune.errors.ConfigError` naming the key path.
A file of an older version is read through :mod:`wus_tune.migration`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wus_tune.errors import ConfigError
from wus_tune.migration import CONFIG_VERSION, migrate_config, migrate_overrides


@dataclass
class ModelConfig:
    name: str = "vgg11"  # a registered model (`python -m wus_tune.study --list`); with `factory`: a label
    # An import path "package.module:function", called as function(input_shape, num_classes, **kwargs) -> nn.Module.
    # A name holding ":" is taken as a factory (`--model my_pkg.nets:build`).
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory
    factory_version: str | None = None  # the factory's package version, recorded when the config is built
    width: float = 1.0  # channel multiplier; 0.25 makes VGG-11 trainable on a laptop CPU
    hidden: int = 256  # mlp only: hidden units (scaled by width)
    depth: int = 2  # mlp only: number of linear layers (2 = one hidden layer)
    batch_norm: bool = True  # vgg/resnet: BatchNorm after each conv (alexnet has none, as in the paper)

    def __post_init__(self) -> None:
        _factory_from_name(self, "vgg11")

    def validate(self) -> None:
        _check_source("model", self, _model_names)
        check_range("model.width", self.width, low=1 / 64, high=16)
        check_range("model.hidden", self.hidden, low=1, high=1 << 16)
        check_range("model.depth", self.depth, low=1, high=16)


@dataclass
class DataConfig:
    name: str = "cifar10"  # a registered dataset (`python -m wus_tune.study --list`); with `factory`: a label
    # An import path "package.module:function", called as function(**kwargs); it returns (x, y) tensors or a
    # mapping {train, val, test: (x, y) or a torch Dataset} (docs/data.md). A name holding ":" is a factory.
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory
    factory_version: str | None = None  # the factory's package version, recorded when the config is built
    # cifar10/100: torchvision's root (downloaded there if `download`), an ImageFolder directory, or a
    # .tar.gz of one; imagefolder: the directory or archive (required). None: a per-user cache directory.
    data_dir: str | None = None
    cache_dir: str | None = None  # where decoded uint8 tensors are cached; None: ~/.cache/wus_tune
    download: bool = True  # allow torchvision to download cifar10/100 when missing
    val_fraction: float = 0.1  # held out of the training split; drives WUS and the search
    subset: int | None = None  # use only this many training images (before the validation split)
    split_seed: int = 0  # the train/val split and subset depend on this seed only, not on `seed`
    augment: bool = True  # images (N, C, H, W) only: random crop and/or flip below; never for features (N, D)
    crop: bool = True  # random crop with zero padding (4 px, or 1 px for images under 16 px)
    flip: bool = True  # random horizontal flip (also off for datasets that say mirroring changes the label)
    normalize: bool = True  # standardise with the training split's per-channel (per-feature) mean and std
    memory_budget_mb: float = 4096.0  # a torch Dataset up to this size is materialised once onto the device
    num_workers: int = 2  # DataLoader workers for a Dataset streamed because it exceeds the budget

    def __post_init__(self) -> None:
        _factory_from_name(self, "cifar10")

    def validate(self) -> None:
        _check_source("data", self, _dataset_names)
        check_range("data.val_fraction", self.val_fraction, low=0.0, high=0.9)
        if self.subset is not None:
            check_range("data.subset", self.subset, low=20, high=10**9)
        check_range("data.memory_budget_mb", self.memory_budget_mb, low=0.0, high=1e9)
        check_range("data.num_workers", self.num_workers, low=0, high=256)
        if self.factory is None and self.name == "imagefolder" and not self.data_dir:
            raise ConfigError("data.data_dir: dataset 'imagefolder' needs a directory or .tar.gz")


def _factory_from_name(cfg: Any, default_name: str) -> None:
    """``name: "pkg.mod:build"`` means ``factory: "pkg.mod:build"``; with a factory, the name is a label."""
    if isinstance(cfg.name, str) and ":" in cfg.name and cfg.factory is None:
        cfg.factory = cfg.name
    if isinstance(cfg.factory, str) and (cfg.name == default_name or (isinstance(cfg.name, str) and ":" in cfg.name)):
        cfg.name = cfg.factory.rsplit(":", 1)[-1].rsplit(".", 1)[-1] or cfg.factory


def _model_names() -> dict[str, str]:
    from wus_tune.registry import model_registry

    return model_registry()


def _dataset_names() -> dict[str, str]:
    from wus_tune.registry import dataset_registry

    return dataset_registry()


def _check_source(section: str, cfg: Any, registry: Any) -> None:
    """A registered name, or a factory that imports; warns when the installed package is not the version
    the config recorded."""
    from wus_tune.factories import OBJECT_PREFIX, check_path, load_object
    from wus_tune.provenance import package_version

    if cfg.factory is None:
        known = registry()
        if cfg.name not in known:
            raise ConfigError(f"{section}.name: unknown value {cfg.name!r}; choose one of {', '.join(known)} "
                              f"or give an import path as {section}.factory")  # fmt: skip
        return
    key = f"{section}.factory"
    check_path(key, cfg.factory)
    if cfg.factory.startswith(OBJECT_PREFIX):
        return  # handed over as a Python object: nothing to import
    load_object(cfg.factory, key)
    installed = package_version(cfg.factory)
    if cfg.factory_version is not None and installed is not None and installed != cfg.factory_version:
        import warnings

        warnings.warn(f"{key}: {cfg.factory} is version {installed}, the config was made with {cfg.factory_version}",
                      stacklevel=3)  # fmt: skip


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05  # peak learning rate (the schedule scales it)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # applied to weights only; biases and BN parameters get bias_weight_decay
    bias_weight_decay: float = 0.0
    batch_size: int = 128
    label_smoothing: float = 0.0

    def validate(self) -> None:
        check_choice("optim.name", self.name, ("sgd", "adamw"))
        check_range("optim.lr", self.lr, low=0.0, high=100.0, low_open=True)
        check_range("optim.momentum", self.momentum, low=0.0, high=0.999)
        check_range("optim.weight_decay", self.weight_decay, low=0.0, high=1.0)
        check_range("optim.bias_weight_decay", self.bias_weight_decay, low=0.0, high=1.0)
        check_range("optim.batch_size", self.batch_size, low=1, high=1 << 16)
        check_range("optim.label_smoothing", self.label_smoothing, low=0.0, high=0.5)
        if self.nesterov and self.name == "sgd" and self.momentum == 0:
            raise ConfigError("optim.nesterov: Nesterov momentum needs optim.momentum > 0")


@dataclass
class ScheduleConfig:
    name: Literal["constant", "cosine", "step", "onecycle"] = "cosine"
    warmup: float = 0.0  # fraction of training with a linear warm-up from 0 (cosine/step/constant)
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of training
    gamma: float = 0.1  # step: LR factor at each milestone
    pct_start: float = 0.25  # onecycle: fraction of training spent rising to the peak
    final_lr_fraction: float = 0.0  # cosine/onecycle: LR at the end, as a fraction of the peak

    def validate(self) -> None:
        check_choice("schedule.name", self.name, ("constant", "cosine", "step", "onecycle"))
        check_range("schedule.warmup", self.warmup, low=0.0, high=0.9)
        check_range("schedule.gamma", self.gamma, low=0.0, high=1.0, low_open=True)
        check_range("schedule.pct_start", self.pct_start, low=0.0, high=1.0, low_open=True, high_open=True)
        check_range("schedule.final_lr_fraction", self.final_lr_fraction, low=0.0, high=1.0)
        for i, m in enumerate(self.milestones):
            check_range(f"schedule.milestones[{i}]", m, low=0.0, high=1.0, low_open=True, high_open=True)
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"schedule.milestones: must be increasing, got {self.milestones}")


@dataclass
class TrainConfig:
    version: int = CONFIG_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Plug-in speed-up methods: {registered name: keyword arguments}. See wus_tune.methods.
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    epochs: int = 15
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    compile: bool = False  # torch.compile the training step, one graph per training mode (CPU and CUDA)
    compile_mode: str = "default"  # "default", or "reduce-overhead" (CUDA graphs, one per mode; CUDA only)
    eval_every_epoch: bool = True  # evaluate each epoch for the curves; only evaluations a method needs count as its time
    meta: dict[str, Any] = field(default_factory=dict)  # free-form provenance (study, trial), never read by training

    def validate(self) -> "TrainConfig":
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"version: this wus_tune reads config version {CONFIG_VERSION}, got {self.version}")
        for part in (self.model, self.data, self.optim, self.schedule):
            part.validate()
        check_range("epochs", self.epochs, low=1, high=100_000)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        check_choice("compile_mode", self.compile_mode, ("default", "reduce-overhead"))
        from wus_tune.methods import validate_methods  # late: methods import torch

        validate_methods(self.methods)
        return self

    # ---- (de)serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def record_versions(self) -> "TrainConfig":
        """Write the installed version of each factory's package (``model.factory_version``,
        ``data.factory_version``) where the config records none: the provenance every result carries."""
        from wus_tune.factories import OBJECT_PREFIX
        from wus_tune.provenance import package_version

        for part in (self.model, self.data):
            if part.factory is not None and part.factory_version is None and not part.factory.startswith(OBJECT_PREFIX):
                part.factory_version = package_version(part.factory)
        return self

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        """Build and validate a config (an older version migrated first), and record its factories'
        versions (:meth:`record_versions`); unknown keys and wrong types raise ConfigError with the key path."""
        return build_dataclass(cls, migrate_config(raw), "").validate().record_versions()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if path.suffix == ".json":
            path.write_text(json.dumps(data, indent=2) + "\n")
        else:
            import yaml

            path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(load_mapping(path))

    def replace(self, overrides: dict[str, Any]) -> "TrainConfig":
        """A copy with dotted-key overrides applied (``{"optim.lr": 0.02, "methods.wus.threshold": 0.02}``),
        validated; a key an older version spelled otherwise is read through :mod:`wus_tune.migration`."""
        data = self.to_dict()
        for dotted, value in migrate_overrides(overrides, data).items():
            set_dotted(data, dotted, value)
        return TrainConfig.from_dict(data)


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file holding a mapping; a missing or unparsable file is a ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror or e})") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        from wus_tune.errors import one_line

        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data["optim"]["lr"] = value`` for ``dotted == "optim.lr"``.

    Sections must exist; under ``methods`` a method's mapping is created on first use.
    """
    *parents, leaf = dotted.split(".")
    node = data
    for i, key in enumerate(parents):
        if not isinstance(node.get(key), dict):
            if parents[0] != "methods":
                raise ConfigError(f"{dotted}: unknown key {'.'.join(parents[: i + 1])!r}")
            node[key] = {}
        node = node[key]
    node[leaf] = value


# ---- validation helpers ------------------------------------------------------------------------


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: unknown value {value!r}; choose one of {', '.join(choices)}")


def check_range(
    key: str, value: Any, *, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"{key}: {value!r} is out of range {lo}{low:g}, {high:g}{hi}")


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against a type hint; ints are accepted for floats. Returns the (converted) value."""
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: unknown value {value!r}; choose one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint)).replace("typing.", "")
