"""Opening Optuna storages and MLflow stores by URL, with errors a user can act on; what lets several
workers share them.

Storage URLs: any Optuna RDB URL (``sqlite:///studies/x.db``, ``postgresql://user@host/db``,
``mysql+pymysql://user@host/db``), or ``journal:///studies/x.journal`` (relative) /
``journal:////abs/x.journal``: Optuna's Journal file storage, which several processes on one machine
(or on a file system with working locks) share without a database server.

* :func:`open_storage` connects, with heartbeats (:func:`~wus_tune._study.adapters.heartbeat_journal_storage`
  adds them to the Journal storage, which Optuna 5 lacks) and a :class:`RetryPolicy` around every call
  (:func:`~wus_tune._study.adapters.resilient_storage`): a server that stops answering mid-study is retried with bounded
  exponential backoff, then :class:`~wus_tune.errors.ServiceLost` is raised.
* :func:`study_lock` serialises workers across processes and machines (a PostgreSQL advisory lock,
  MySQL ``GET_LOCK``, a :class:`filelock.FileLock` on a side file for SQLite and Journal files), so a study's first
  trials are enqueued exactly once and a study-wide trial budget is exact.
* :func:`mask_url` and :func:`redact` keep passwords out of every message.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wus_tune._study import adapters
from wus_tune.errors import ServiceLost, UsageError, one_line

if TYPE_CHECKING:
    import optuna

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
JOURNAL_SCHEME = "journal:///"


def default_storage(study_name: str) -> str:
    """``sqlite:///studies/<study_name>.db``, relative to the working directory."""
    return f"sqlite:///studies/{safe_name(study_name)}.db"


def default_journal(study_name: str) -> str:
    """``journal:///studies/<study_name>.journal``: the default when several local workers share a study
    (SQLite serialises every writer on one file lock; Optuna's Journal file storage appends instead)."""
    return f"{JOURNAL_SCHEME}studies/{safe_name(study_name)}.journal"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "study"


# ---- secrets -----------------------------------------------------------------------------------------

_SECRETS: set[str] = set()
_PASSWORD = re.compile(r"(?<=://)([^:/@\s]*):([^@/\s]*)@")
_QUERY_PASSWORD = re.compile(r"(?i)((?:password|passwd|pwd)=)[^&\s]*")


def mask_url(url: str | None) -> str | None:
    """The URL with any password replaced by ``***`` (``postgresql://u:***@host/db``); remembers the
    password so :func:`redact` removes it from any later message too."""
    if url is None:
        return None
    for m in _PASSWORD.finditer(url):
        if m.group(2):
            _SECRETS.add(m.group(2))
    for m in _QUERY_PASSWORD.finditer(url):
        value = m.group(0).split("=", 1)[1]
        if value:
            _SECRETS.add(value)
    return _QUERY_PASSWORD.sub(r"\1***", _PASSWORD.sub(r"\1:***@", url))


def redact(text: str) -> str:
    """``text`` with every URL password masked and every password seen by :func:`mask_url` replaced
    (a driver's error message may quote the connection string)."""
    text = _QUERY_PASSWORD.sub(r"\1***", _PASSWORD.sub(r"\1:***@", text))
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if len(secret) >= 3:  # a 1-2 character password would mask unrelated text; the URL pattern covers it
            text = text.replace(secret, "***")
    return text


def sqlite_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` URL, or None for other URLs and in-memory databases."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def journal_path(url: str) -> Path | None:
    """The file behind a ``journal:///`` URL (``journal:///rel/x.journal``, ``journal:////abs/x.journal``)."""
    if not url.startswith(JOURNAL_SCHEME):
        return None
    path = url[len(JOURNAL_SCHEME) :]
    if not path:
        raise UsageError(f"--storage {url}: expected journal:///path/to/file.journal")
    return Path(path)


def database_url(url: str) -> str:
    """The SQLAlchemy URL to connect with. SQLAlchemy 2.1 reads ``postgresql://`` as psycopg 3 and
    ``mysql://`` as mysqlclient; where only psycopg2 / PyMySQL are installed (the ``distributed`` extra),
    the plain URL is rewritten to use them, so ``postgresql://user@host/db`` works either way."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if scheme == "postgresql" and not _has("psycopg") and _has("psycopg2"):
        return f"postgresql+psycopg2://{rest}"
    if scheme == "mysql" and not _has("MySQLdb") and _has("pymysql"):
        return f"mysql+pymysql://{rest}"
    return url


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def first_line(e: BaseException) -> str:
    """One line about a driver error, password masked (SQLAlchemy's ``orig`` holds the driver's own)."""
    return redact(one_line(getattr(e, "orig", None) or e))


# ---- retries -----------------------------------------------------------------------------------------


def is_transient(e: BaseException) -> bool:
    """True for errors that say "the server is not answering" (worth retrying), not "the request is
    wrong": dropped or refused connections, timeouts, a locked SQLite file, HTTP 5xx/429."""
    seen: set[int] = set()
    err: BaseException | None = e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name = type(err).__name__
        module = type(err).__module__ or ""
        if isinstance(err, (ConnectionError, TimeoutError)):
            return True
        if name in ("OperationalError", "InterfaceError", "DisconnectionError") and module.split(".")[0] in (
            "sqlalchemy", "psycopg2", "psycopg", "pymysql", "MySQLdb", "sqlite3",
        ):  # fmt: skip
            return True
        if module.startswith(("requests", "urllib3")) and name in (
            "ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "ChunkedEncodingError",
            "MaxRetryError", "NewConnectionError", "ProtocolError", "RetryError",
        ):  # fmt: skip
            return True
        if name == "MlflowException":
            code = str(getattr(err, "error_code", ""))
            text = str(err)
            if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED") or any(
                s in text for s in ("Max retries exceeded", "Connection refused", "Connection aborted",
                                    "Failed to establish", "Read timed out", "too many 5", "status code 5",
                                    "response code 5", "OperationalError")
            ):  # fmt: skip
                return True
        err = err.__cause__ or err.__context__
    return False


def outage_reason(e: BaseException) -> str:
    """What a transient error says about the server, short: the innermost driver or socket error
    (not Optuna's generic "exception during the commit" wrapper), ``[Errno 111] Connection refused``
    rather than urllib3's paragraph."""
    best, err, seen = e, e, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ in ("OperationalError", "InterfaceError", "DisconnectionError", "MlflowException") or isinstance(
            err, OSError
        ):
            best = err
        err = err.__cause__ or err.__context__
    text = first_line(best)
    m = re.search(r"(\[Errno -?\d+\][^)\"']*)", text)
    return m.group(1).strip() if m else text[:300]


@dataclass
class RetryPolicy:
    """Bounded exponential backoff for a remote store: the first failure starts a budget of ``timeout``
    seconds; waits go ``initial``, 2x, 4x ... capped at ``max_delay``. When the budget is spent the
    policy is *lost*: this call and every later one raise :class:`ServiceLost` at once (so a dead
    server costs one budget, not one per call)."""

    what: str  # "Optuna storage postgresql://u:***@h/db": named in every message
    timeout: float = 120.0
    initial: float = 0.5
    max_delay: float = 15.0
    echo: Callable[[str], None] | None = None
    lost: ServiceLost | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def call(self, fn: Callable[[], Any]) -> Any:
        if self.lost is not None:
            raise self.lost
        deadline, delay, attempt = None, self.initial, 0
        while True:
            try:
                return fn()
            except Exception as e:
                if not is_transient(e):
                    raise
                now = time.monotonic()
                attempt += 1
                if deadline is None:
                    deadline = now + self.timeout
                    self._say(f"warning: {self.what} is not answering ({outage_reason(e)}); "
                              f"retrying for up to {self.timeout:g} s")  # fmt: skip
                if now + delay > deadline or self.timeout <= 0:
                    with self._lock:
                        if self.lost is None:
                            self.lost = ServiceLost(
                                f"{self.what} unreachable for {self.timeout:g} s ({outage_reason(e)}); stopping. "
                                "Everything recorded so far is kept: run the same command again to continue"
                            )
                    raise self.lost from None
                time.sleep(delay)
                delay = min(delay * 2, self.max_delay)

    def _say(self, text: str) -> None:
        (self.echo or (lambda t: print(t, file=sys.stderr, flush=True)))(redact(text))


# ---- storages ----------------------------------------------------------------------------------------


def open_storage(
    url: str,
    *,
    create_dirs: bool = False,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    retry: RetryPolicy | None = None,
) -> optuna.storages.BaseStorage:
    """Connect to an Optuna storage; an unreachable URL is one clear :class:`UsageError`.

    ``create_dirs`` makes the parent directory of a SQLite or Journal file (done for the default
    ``studies/`` location only, so a mistyped path is reported rather than created).
    ``heartbeat_interval`` / ``grace_period`` (seconds) turn on Optuna's heartbeats: a running trial
    whose worker has not written one for ``grace_period`` is *stale* (see ``wus_tune._study.workers``).
    ``retry`` wraps the storage so that every call goes through it.
    """
    import warnings

    import optuna

    path = sqlite_path(url) or journal_path(url)
    if path is not None:
        if create_dirs:
            check_writable(path.parent, f"--storage {mask_url(url)}: directory")
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.parent.is_dir():
            raise UsageError(f"--storage {mask_url(url)}: directory {str(path.parent)!r} does not exist")
    storage: Any
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if url.startswith(JOURNAL_SCHEME):
                from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

                assert path is not None
                backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
                storage = adapters.heartbeat_journal_storage(backend, heartbeat_interval, grace_period)
            else:
                engine_kwargs: dict[str, Any] = {}
                if sqlite_path(url) is not None:
                    set_wal(sqlite_path(url))  # type: ignore[arg-type]
                elif not url.startswith("sqlite:"):
                    # A dropped connection is replaced, not reported; a black-holed host fails in 10 s.
                    engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
                for attempt in range(6):
                    try:
                        storage = optuna.storages.RDBStorage(
                            database_url(url),
                            engine_kwargs=engine_kwargs,
                            heartbeat_interval=heartbeat_interval,
                            grace_period=grace_period,
                        )
                        break
                    except Exception as e:
                        # Workers started at once on an empty database race to create Optuna's tables
                        # (MySQL's DDL is not transactional): the losers try again and find them.
                        if attempt == 5 or not _schema_race(e):
                            raise
                        time.sleep(0.2 * (attempt + 1))
    except UsageError:
        raise
    except Exception as e:  # sqlalchemy errors, missing drivers, bad URLs, unreadable journal files
        detail = first_line(e)
        if isinstance(e, ImportError) or isinstance(e.__cause__, ImportError):
            cause = e.__cause__ if isinstance(e.__cause__, ImportError) else e
            detail = f"database driver not installed: {first_line(cause)}; pip install 'wus_tune[distributed]'"
        raise UsageError(f"--storage {mask_url(url)}: cannot open the Optuna storage ({detail})") from None
    if sqlite_path(url) is not None:
        sync_normal(storage.engine)
    if retry is not None:
        storage = adapters.resilient_storage(adapters.cache_rdb(storage), retry)
    return storage


def _schema_race(e: BaseException) -> bool:
    text = " ".join(str(x) for x in (e, e.__cause__, getattr(e, "orig", None)) if x is not None).lower()
    return any(s in text for s in ("already exists", "duplicate entry", "duplicate key", "(1050,"))


@contextlib.contextmanager
def study_lock(storage: Any, name: str, *, timeout: float = 600.0) -> Iterator[None]:
    """Hold a lock named after the study, across processes and machines, for the ``with`` block.

    PostgreSQL: a transaction-level advisory lock; MySQL/MariaDB: ``GET_LOCK``; both are released by the
    server if the holder dies. SQLite and Journal files: a :class:`filelock.FileLock` on ``<file>.wus_tune-lock``
    (an OS lock: released by the kernel if the holder dies, on Windows too). In-memory storages: nothing to share, no lock.
    """
    from optuna.storages import RDBStorage

    base = adapters.unwrap(storage)
    key = f"wus_tune:{name}"
    if isinstance(base, RDBStorage):
        engine = base.engine
        dialect = engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy import text

            number = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big", signed=True)
            with engine.begin() as conn:
                conn.execute(text(f"SET LOCAL lock_timeout = '{int(timeout * 1000)}ms'"))
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": number})
                yield
            return
        if dialect in ("mysql", "mariadb"):
            from sqlalchemy import text

            lock_name = "wus_tune:" + hashlib.sha1(key.encode()).hexdigest()[:40]
            with engine.connect() as conn:
                got = conn.execute(text("SELECT GET_LOCK(:n, :t)"), {"n": lock_name, "t": int(timeout)}).scalar()
                if got != 1:
                    raise ServiceLost(f"could not take the study lock {lock_name} within {timeout:g} s")
                try:
                    yield
                finally:
                    with contextlib.suppress(Exception):
                        conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": lock_name})
            return
        path = sqlite_path(str(engine.url))
    else:
        file = adapters.journal_file(base)
        path = Path(file) if file else None
    if path is None:
        yield
        return
    with _file_lock(path.with_name(path.name + ".wus_tune-lock"), timeout):
        yield


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    import filelock

    try:
        with filelock.FileLock(path, timeout=timeout):
            yield
    except filelock.Timeout:
        raise ServiceLost(f"could not take the study lock {path} within {timeout:g} s") from None


def check_writable(directory: Path, what: str) -> None:
    """A :class:`UsageError` unless ``directory`` exists as a writable directory or can be made (checked
    on its nearest existing ancestor; nothing is created)."""
    import os

    node = directory
    while not node.exists():
        if node.parent == node:
            break
        node = node.parent
    if not node.is_dir():
        raise UsageError(f"{what} {str(directory)!r}: {str(node)!r} is not a directory")
    if not os.access(node, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {str(directory)!r}: {str(node)!r} is not writable")


def set_wal(path: Path) -> None:
    """Switch a SQLite file to write-ahead logging (a persistent property of the file).

    Why: every Optuna/MLflow write is a transaction; with the default rollback journal each commit
    costs several fsyncs (18 ms measured on this project's CI disk), with WAL one (3 ms). Readers such
    as ``mlflow ui`` and ``optuna-dashboard`` keep working; only network file systems cannot use WAL.
    """
    import sqlite3

    con = sqlite3.connect(path, timeout=30)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def sync_normal(engine: Any) -> None:
    """``PRAGMA synchronous=NORMAL`` on every connection of a SQLAlchemy SQLite engine.

    In WAL mode this drops the fsync at each commit (3 ms -> 0.01 ms) and stays consistent after a
    process crash; only a power loss can lose the last transactions, never corrupt the file.
    """
    from sqlalchemy import event

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    event.listen(engine, "connect", on_connect)
    engine.dispose()  # pooled connections made before the listener reopen with it


def study_exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    import optuna

    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    except optuna.exceptions.OptunaError:
        return False
    return True


def load_study(name: str, url: str) -> optuna.Study:
    import optuna

    path = sqlite_path(url) or journal_path(url)
    if path is not None and not path.exists():
        raise UsageError(f"--storage {mask_url(url)}: no such file (is the study name or --storage right?)")
    storage = open_storage(url)
    if not study_exists(storage, name):
        names = ", ".join(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
        raise UsageError(f"study {name!r} not found in {mask_url(url)} (studies there: {names or 'none'})")
    return optuna.load_study(study_name=name, storage=storage)


def check_tracking_uri(uri: str) -> None:
    """Fail early with one line if an MLflow tracking URI cannot work. Writes nothing (MLflow itself
    creates a SQLite store's file and directory on first use; a database server is only connected to)."""
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:  # MLflow's own client retries for minutes; one short probe gives a prompt answer
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except Exception as e:
            raise UsageError(f"--tracking-uri {mask_url(uri)}: MLflow server not reachable ({first_line(e)})") from None
        return
    if sqlite_path(uri) is not None:
        check_writable(sqlite_path(uri).parent, f"--tracking-uri {mask_url(uri)}: directory")  # type: ignore[union-attr]
        return
    if "://" not in uri or uri.startswith("file:"):
        raise UsageError(
            f"--tracking-uri {uri}: MLflow >= 3.13 no longer accepts the plain file store; "
            f"use a database such as {DEFAULT_TRACKING_URI}"
        )
    if uri.startswith(("postgresql", "mysql", "mssql")):
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(database_url(uri), connect_args={"connect_timeout": 10})
            try:
                with engine.connect():
                    pass
            finally:
                engine.dispose()
        except Exception as e:
            raise UsageError(f"--tracking-uri {mask_url(uri)}: database not reachable ({first_line(e)})") from None


def tracking_url(uri: str) -> str:
    """The tracking URI MLflow is given: database URIs get the installed driver (:func:`database_url`)."""
    return database_url(uri) if uri.startswith(("postgresql://", "mysql://")) else uri
