"""Every private part of Optuna and MLflow that wus_tune touches, and nothing else.

Each function or class here names the private attribute it relies on; ``tests/test_adapters.py`` checks
each one against the installed versions, so an upgrade that renames or removes one fails a test that
names it, not a study in the middle of the night. Everything outside this module uses the libraries'
public API (``study.get_trials``, ``trial.number``, ``trial.storage``, ``storage.get_study_id_from_name``).

Optuna (5.x):

* ``optuna.study.Study._storage``: the storage a study reads and writes through (no public accessor).
* ``optuna.storages._heartbeat.BaseHeartbeat`` and its abstract ``_get_stale_trial_ids``: the heartbeat
  protocol, which the Journal storage lacks in Optuna 5 (:func:`heartbeat_journal_storage`), which the
  retrying wrapper must forward (:func:`resilient_storage`), and which the stale-trial sweep reads.
* ``optuna.storages._heartbeat.is_heartbeat_enabled``.
* ``optuna.storages._CachedStorage``: what ``optuna.create_study`` wraps an RDB storage in; wrapped here
  before our retrying wrapper so the cache sits under the retries, as Optuna would place it.
* ``_CachedStorage._backend``, the wrapper's own ``_inner`` and ``JournalFileBackend._file_path``: the
  storage and the file under the wrappers (the study lock locks that file).

MLflow (3.x):

* ``MlflowClient._tracking_client.store.engine``: the SQLAlchemy engine of a database tracking store
  (MLflow has no hook for connection pragmas).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

__all__ = [
    "HEARTBEAT_KEY",
    "cache_rdb",
    "heartbeat_enabled",
    "heartbeat_journal_storage",
    "journal_file",
    "mlflow_store_engine",
    "resilient_storage",
    "stale_trial_ids",
    "study_storage",
    "unwrap",
]

HEARTBEAT_KEY = "wus_tune:heartbeat"  # the Journal heartbeat: a trial system attribute holding the writer's clock


# ---- Optuna: a study's storage and the heartbeat protocol ---------------------------------------------


def study_storage(study: optuna.Study) -> Any:
    """The storage of ``study`` (``Study._storage``)."""
    return study._storage


def heartbeat_enabled(storage: Any) -> bool:
    """Whether ``storage`` records heartbeats (``optuna.storages._heartbeat.is_heartbeat_enabled``)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


def stale_trial_ids(storage: Any, study_name: str) -> list[int]:
    """The ids of the study's RUNNING trials whose heartbeat is older than the grace period
    (``BaseHeartbeat._get_stale_trial_ids``)."""
    return list(storage._get_stale_trial_ids(storage.get_study_id_from_name(study_name)))


def heartbeat_journal_storage(backend: Any, heartbeat_interval: int | None, grace_period: int | None) -> Any:
    """Optuna's Journal storage with the heartbeat protocol of its RDB storage."""
    global _HEARTBEAT_JOURNAL
    if _HEARTBEAT_JOURNAL is None:
        _HEARTBEAT_JOURNAL = _heartbeat_journal_class()
    return _HEARTBEAT_JOURNAL(backend, heartbeat_interval, grace_period)


def _heartbeat_journal_class() -> type:
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages.journal import JournalStorage
    from optuna.trial import TrialState

    class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
        """Optuna's Journal storage with the heartbeat protocol of its RDB storage (Optuna 5 has none
        for Journal): a running trial's heartbeat is a system attribute holding the writer's clock, so
        the workers must share a clock, as the processes of one machine do."""

        KEY = HEARTBEAT_KEY

        def __init__(self, backend: Any, heartbeat_interval: int | None, grace_period: int | None) -> None:
            super().__init__(backend)
            self.heartbeat_interval = heartbeat_interval
            self.grace_period = grace_period

        def record_heartbeat(self, trial_id: int) -> None:
            try:
                self.set_trial_system_attr(trial_id, self.KEY, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # the trial ended (or another worker declared it stale) meanwhile

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            assert self.heartbeat_interval is not None
            grace = self.grace_period or 2 * self.heartbeat_interval
            now = time.time()
            running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
            return [
                self.get_trial_id_from_study_id_trial_number(study_id, t.number)
                for t in running
                if self.KEY in t.system_attrs and now - float(t.system_attrs[self.KEY]) > grace
            ]

        def get_heartbeat_interval(self) -> int | None:
            return self.heartbeat_interval

        def get_heartbeat_stale_trial_callback(self) -> Any:
            return None

    return HeartbeatJournalStorage


_HEARTBEAT_JOURNAL: type | None = None
_RESILIENT: type | None = None


# ---- Optuna: wrapping a storage -----------------------------------------------------------------------


def cache_rdb(storage: Any) -> Any:
    """An RDB storage wrapped in Optuna's ``_CachedStorage``, as ``optuna.create_study`` would wrap it
    (done here because our retrying wrapper goes around it); any other storage unchanged."""
    from optuna.storages import RDBStorage, _CachedStorage

    return _CachedStorage(storage) if isinstance(storage, RDBStorage) else storage


def resilient_storage(inner: Any, policy: Any) -> Any:
    """``inner`` with every storage call (heartbeats included) made through ``policy.call``."""
    global _RESILIENT
    if _RESILIENT is None:
        _RESILIENT = _resilient_storage_class()
    return _RESILIENT(inner, policy)


def _resilient_storage_class() -> type:
    from optuna.storages import BaseStorage
    from optuna.storages._heartbeat import BaseHeartbeat

    class ResilientStorage(BaseStorage, BaseHeartbeat):
        """Every call of the wrapped storage through a retry policy (heartbeats included)."""

        def __init__(self, inner: Any, policy: Any) -> None:
            self._inner, self.policy = inner, policy

        def get_heartbeat_interval(self) -> int | None:
            fn = getattr(self._inner, "get_heartbeat_interval", None)
            return fn() if fn is not None else None

        def get_heartbeat_stale_trial_callback(self) -> Any:
            fn = getattr(self._inner, "get_heartbeat_stale_trial_callback", None)
            return fn() if fn is not None else None

        def __getattr__(self, name: str) -> Any:  # anything else (engine, ...) straight through
            return getattr(self._inner, name)

    def delegate(name: str) -> Callable[..., Any]:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            fn = getattr(self._inner, name)
            return self.policy.call(lambda: fn(*args, **kwargs))

        method.__name__ = name
        return method

    names = {n for cls in (BaseStorage, BaseHeartbeat) for n, v in vars(cls).items() if callable(v) and not n.startswith("__")}
    for name in sorted(names - {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "get_failed_trial_callback"}):
        setattr(ResilientStorage, name, delegate(name))
    # Every abstract method now has a delegate, set after the class was made, which ABCMeta does not see.
    ResilientStorage.__abstractmethods__ = frozenset()
    return ResilientStorage


def unwrap(storage: Any) -> Any:
    """The storage under our retrying wrapper (``_inner``) and Optuna's cache (``_backend``): an
    RDBStorage or a JournalStorage."""
    while True:
        inner = getattr(storage, "_inner", None) or getattr(storage, "_backend", None)
        if inner is None or not hasattr(inner, "get_all_trials"):
            return storage
        storage = inner


def journal_file(storage: Any) -> str | None:
    """The file of a Journal file storage (``JournalStorage._backend._file_path``), else None."""
    backend = getattr(unwrap(storage), "_backend", None)
    return getattr(backend, "_file_path", None)


# ---- MLflow -------------------------------------------------------------------------------------------


def mlflow_store_engine(client: Any) -> Any:
    """The SQLAlchemy engine of a database tracking store (``MlflowClient._tracking_client.store.engine``),
    or None (a REST store, or an MLflow that moved it)."""
    return getattr(getattr(getattr(client, "_tracking_client", None), "store", None), "engine", None)
