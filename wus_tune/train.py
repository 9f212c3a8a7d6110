"""Production training: ``python -m wus_tune.train --config best.yaml`` (or options), weights + config saved.

Every config field is an option with its dotted name (``--optim.momentum 0.95``,
``--methods.approx_ops.sample_ratio 0.5``), also written ``--set KEY=VALUE`` as in ``python -m
wus_tune.study``; the common ones have short forms (``--model``, ``--epochs``), and ``--method NAME``
switches a method on at its defaults. Options override the ``--config`` file. Values are read as YAML
(``true``, ``0.5``, ``[0.5, 0.75]``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from wus_tune._cli import ArgumentParser, add_set_option, config_overrides, override_value, run_main
from wus_tune.config import TrainConfig
from wus_tune.errors import UsageError
from wus_tune.migration import add_old_train_options

SHORT_OPTIONS = {
    "model": "model.name",
    "width": "model.width",
    "dataset": "data.name",
    "data_dir": "data.data_dir",
    "subset": "data.subset",
    "epochs": "epochs",
    "seed": "seed",
    "device": "device",
    "batch_size": "optim.batch_size",
    "lr": "optim.lr",
    "schedule": "schedule.name",
}


_TOP_LEVEL_FIELDS = ("epochs", "seed", "device", "compile", "compile_mode", "eval_every_epoch")


def add_config_options(parser: ArgumentParser) -> None:
    """Short options plus one ``--section.field`` option per config field."""
    for name, dotted in SHORT_OPTIONS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=dotted, metavar=name.upper(), help=f"= --{dotted}")
    parser.add_argument("--method", dest="switched_on", action="append", default=[], metavar="NAME",
                        help="switch a method on at its defaults (repeatable); its knobs: --methods.NAME.KNOB V")
    add_old_train_options(parser)
    defaults = TrainConfig()
    for section in dataclasses.fields(TrainConfig):
        value = getattr(defaults, section.name)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                dotted = f"{section.name}.{f.name}"
                parser.add_argument(f"--{dotted}", dest=dotted, metavar="V",
                                    help=f"default {getattr(value, f.name)!r}")
        elif section.name not in ("version", "methods", "meta") and section.name not in SHORT_OPTIONS:
            parser.add_argument(f"--{section.name}", dest=section.name, metavar="V", help=f"default {value!r}")


def config_from_args(args: object, unknown: Sequence[str]) -> TrainConfig:
    """The config file (if any) with every option given on the command line applied over it."""
    base = TrainConfig.load(args.config) if getattr(args, "config", None) else TrainConfig()
    overrides: dict[str, object] = {f"methods.{name}": base.methods.get(name, {}) for name in getattr(args, "switched_on", [])}
    overrides |= {
        key: override_value(key, value)
        for key, value in vars(args).items()
        if value is not None and ("." in key or key in _TOP_LEVEL_FIELDS)
    }
    # --set KEY=VALUE and the dotted options argparse cannot know in advance (--methods.NAME.ARG VALUE)
    overrides.update(config_overrides(getattr(args, "set", None) or [], unknown))
    return base.replace(overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m wus_tune.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a config file (YAML or JSON), e.g. exported by python -m wus_tune.pareto")
    parser.add_argument("--out", help="output directory (default runs/<model>-<dataset>-<time>)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    add_set_option(parser)
    add_config_options(parser)
    args, unknown = parser.parse_known_args(argv)
    config = config_from_args(args, unknown)
    from wus_tune.trainer import fit, resolve_device

    resolve_device(config.device)  # bad input writes nothing: a device this machine lacks is refused first

    out = Path(args.out or f"runs/{config.model.name}-{config.data.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    created = [p for p in (out, *out.parents) if not p.exists()]  # the folders mkdir makes, deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.yaml")
    except OSError as e:
        _remove_empty(created)
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None

    try:
        result = fit(config, progress=not args.quiet)
    except UsageError:  # bad model or data, found when building them: leave nothing behind
        (out / "config.yaml").unlink(missing_ok=True)
        _remove_empty(created)
        raise
    save_checkpoint(out / "model.pt", result.model, config)
    result.save_json(out / "result.json")
    test = f", test {result.test_acc:.2%}" if result.test_acc is not None else ""
    print(f"done: val {result.val_acc:.2%}{test} in {result.time_s:.1f}s "
          f"(train {result.train_time_s:.1f}s, {result.changed_step_fraction:.0%} of the steps changed by a method, "
          f"{result.flops_fraction:.0%} of the FLOPs) -> {out}/")
    return 0


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this run created, deepest first, up to the first that is not empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def save_checkpoint(path: Path, model: object, config: TrainConfig) -> Path:
    """The weights with the config that made them: ``torch.load(path)["config"]`` rebuilds the model."""
    import torch

    torch.save({"state_dict": model.state_dict(), "config": config.to_dict()}, path)
    return path


if __name__ == "__main__":
    raise SystemExit(run_main(main))
