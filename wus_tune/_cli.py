"""What every command-line entry point shares: bad input is one line and exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from wus_tune.errors import UsageError


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main``; a :class:`UsageError` becomes ``error: <message>`` on stderr and status 2."""
    try:
        return main(argv)
    except UsageError as e:
        from wus_tune._study.storage import redact  # no URL password in any message

        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


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
