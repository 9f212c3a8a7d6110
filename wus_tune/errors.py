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
