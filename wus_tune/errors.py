"""Errors a user can fix. Every command-line entry point turns them into one line and exit status 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input: an unknown name, an out-of-range value, a missing or corrupt file.

    The message is one line that names the offending option, key or path.
    """


class ConfigError(UsageError):
    """A config value or file is invalid; the message names the key path (``wus.threshold``)."""


class DataError(UsageError):
    """A dataset is missing, corrupt or in an unknown format."""


class ServiceLost(RuntimeError):
    """The Optuna storage or the MLflow tracking server stopped answering in the middle of a study and
    did not come back within the retry budget. Everything recorded before stays; the CLI exits with 3."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite. Inside a study this fails the trial, not the study."""


def one_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message, for a one-line error or a ``fail_reason``.

    An empty message gives the exception's type name. ``with_type=True`` prefixes the type
    (``ValueError: bad value``), for reasons read without the traceback that named it.
    """
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    if not line:
        return type(exc).__name__
    return f"{type(exc).__name__}: {line}" if with_type else line


def check_number(key: str, value: object, *, integer: bool = False, minimum: float | None = None,
                 above: float | None = None, what: str | None = None) -> None:  # fmt: skip
    """A :class:`UsageError` naming ``key`` unless ``value`` is a finite number (an ``int`` when
    ``integer``; never a bool) that is ``>= minimum`` and ``> above`` (each when given).

    ``what`` names the expected kind in the message (default "an integer" / "a number")."""
    import math

    kind = what or ("an integer" if integer else "a number")
    bound = f" >= {minimum:g}" if minimum is not None else f" > {above:g}" if above is not None else ""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int if integer else (int, float))
        and math.isfinite(value)  # type: ignore[arg-type]
        and (minimum is None or value >= minimum)  # type: ignore[operator]
        and (above is None or value > above)  # type: ignore[operator]
    )
    if not ok:
        raise UsageError(f"{key}: expected {kind}{bound}, got {value!r}")
