"""The private Optuna and MLflow parts wus_tune relies on (``wus_tune._study.adapters``), checked against
the installed versions: each test names the attribute it needs, so an upgrade that breaks one fails here."""

from __future__ import annotations

import inspect
import time

import optuna
import pytest

from wus_tune._study import adapters

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _sqlite(tmp_path, **kwargs):
    return optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/a.db", **kwargs)


def test_optuna_study_keeps_its_storage_in_study_storage(tmp_path):
    storage = _sqlite(tmp_path)
    study = optuna.create_study(storage=storage, study_name="s")
    assert adapters.study_storage(study) is not None
    assert adapters.unwrap(adapters.study_storage(study)) is storage  # under Optuna's _CachedStorage


def test_optuna_heartbeat_protocol_BaseHeartbeat__get_stale_trial_ids(tmp_path):
    from optuna.storages._heartbeat import BaseHeartbeat

    assert "_get_stale_trial_ids" in BaseHeartbeat.__abstractmethods__
    storage = _sqlite(tmp_path, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage, study_name="s")
    assert adapters.heartbeat_enabled(storage)
    assert not adapters.heartbeat_enabled(_sqlite(tmp_path / ".."))
    trial = study.ask()
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), trial.number))
    time.sleep(2.2)
    assert len(adapters.stale_trial_ids(storage, "s")) == 1


def test_heartbeat_journal_storage_subclasses_JournalStorage_and_BaseHeartbeat(tmp_path):
    from optuna.storages.journal import JournalFileBackend

    storage = adapters.heartbeat_journal_storage(JournalFileBackend(str(tmp_path / "j.journal")), 1, 2)
    assert adapters.heartbeat_enabled(storage)
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), trial.number)
    storage.record_heartbeat(trial_id)
    assert adapters.stale_trial_ids(storage, "s") == []
    storage.set_trial_system_attr(trial_id, adapters.HEARTBEAT_KEY, time.time() - 10)
    assert adapters.stale_trial_ids(storage, "s") == [trial_id]
    assert adapters.journal_file(storage) == str(tmp_path / "j.journal")  # JournalStorage._backend._file_path


def test_optuna_storages__CachedStorage_wraps_rdb_and_unwrap_reads__backend(tmp_path):
    storage = _sqlite(tmp_path)
    cached = adapters.cache_rdb(storage)
    assert type(cached).__name__ == "_CachedStorage"
    assert adapters.unwrap(cached) is storage
    assert adapters.cache_rdb(optuna.storages.InMemoryStorage()).__class__ is optuna.storages.InMemoryStorage


def test_resilient_storage_delegates_every_abstract_method_of_BaseStorage(tmp_path):
    from optuna.storages import BaseStorage
    from optuna.storages._heartbeat import BaseHeartbeat

    calls = []

    class Policy:
        def call(self, fn):
            calls.append(fn)
            return fn()

    wrapped = adapters.resilient_storage(adapters.cache_rdb(_sqlite(tmp_path)), Policy())
    abstract = set(BaseStorage.__abstractmethods__) | set(BaseHeartbeat.__abstractmethods__)
    for name in abstract - {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}:
        assert name in vars(type(wrapped)), f"{name} is not delegated"
    study = optuna.create_study(storage=wrapped, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2 and calls  # every call went through the policy


def test_optuna_frozen_trial_system_attrs_has_a_public_setter():
    # workers' re-queue callback rewrites a frozen trial's system attributes through it
    trial = optuna.trial.create_trial(value=1.0, system_attrs={"a": 1})
    trial.system_attrs = {"b": 2}
    assert trial.system_attrs == {"b": 2}


def test_mlflow_client__tracking_client_store_engine(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    engine = adapters.mlflow_store_engine(client)
    assert engine is not None and engine.dialect.name == "sqlite"
    assert adapters.mlflow_store_engine(object()) is None


def test_no_other_module_touches_a_private_part_of_optuna_or_mlflow():
    import pathlib
    import re

    import wus_tune

    root = pathlib.Path(inspect.getfile(wus_tune)).parent
    pattern = re.compile(r"\b(?:_storage|_study_id|_trial_id|_get_stale_trial_ids|_system_attrs|_tracking_client|"
                         r"_CachedStorage|__abstractmethods__)\b|optuna\._|optuna\.storages\._|mlflow\.\w+\._")  # fmt: skip
    offenders = [
        f"{path.relative_to(root)}:{i}"
        for path in root.rglob("*.py") if path.name != "adapters.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]  # fmt: skip
    assert offenders == []


def test_the_public_trial_id_lookup_matches_the_private_one(tmp_path):
    # workers.run_worker finds a running trial's storage id by study name and trial number (public API)
    storage = _sqlite(tmp_path)
    study = optuna.create_study(storage=storage, study_name="s")
    for _ in range(3):
        trial = study.ask()
        public = trial.storage.get_trial_id_from_study_id_trial_number(
            trial.storage.get_study_id_from_name("s"), trial.number
        )
        assert public == trial._trial_id
