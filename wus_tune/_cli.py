"""What every command-line entry point shares: bad input is one line and exit status 2."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence

from wus_tune.errors import UsageError


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main``; a :class:`UsageError` becomes ``error: <message>`` on stderr and status 2, a
    deprecation (an old spelling read as today's, :mod:`wus_tune.migration`) ``warning: <message>``."""
    shown = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
        if issubclass(category, FutureWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        return main(argv)
    except UsageError as e:
        from wus_tune._study.storage import redact  # no URL password in any message

        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


def parse_value(text: str) -> object:
    """A command-line value as YAML reads it: ``0.5`` -> float, ``true`` -> bool, ``[0.5, 0.75]`` -> list."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (``error: ...``) and exit status 2, without the usage dump."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


# ---- config overrides: one syntax for every CLI ---------------------------------------------------------
#
# ``--set KEY=VALUE`` (repeatable) and ``--KEY VALUE`` / ``--KEY=VALUE`` for any dotted config key
# (``--optim.lr 0.02``, ``--methods.approx_ops.sample_ratio 0.5``), in ``python -m wus_tune.train``
# and ``python -m wus_tune.study`` alike.

# Paths and names stay text even when they look like numbers (a directory called "2024").
TEXT_KEYS = ("device", "compile_mode", "data.data_dir", "data.cache_dir", "model.name", "data.name")


def add_set_option(parser: argparse.ArgumentParser, *, what: str = "config key") -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"any {what}, e.g. --set model.width=0.25 (repeatable; or --model.width 0.25)")  # fmt: skip


def override_value(key: str, text: str) -> object:
    """A command-line value for ``key``: YAML-typed (:func:`parse_value`), text for :data:`TEXT_KEYS`."""
    return text if key in TEXT_KEYS else parse_value(text)


def config_overrides(set_items: Sequence[str], unknown: Sequence[str]) -> dict[str, object]:
    """The overrides of ``--set KEY=VALUE`` items and of the dotted ``--KEY VALUE`` / ``--KEY=VALUE``
    options argparse left over (``parse_known_args``); anything else there is an unrecognised argument."""
    found: dict[str, object] = {}
    for item in set_items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. model.width=0.25")
        found[key.strip()] = override_value(key.strip(), value)
    items = list(unknown)
    while items:
        option = items.pop(0)
        key, eq, value = option[2:].partition("=")
        if not option.startswith("--") or "." not in key:
            raise UsageError(f"unrecognized arguments: {option}")
        if not eq:
            if not items or items[0].startswith("--"):
                raise UsageError(f"{option}: expected a value")
            value = items.pop(0)
        found[key] = override_value(key, value)
    return found
