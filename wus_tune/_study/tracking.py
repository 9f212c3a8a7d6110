"""MLflow logging of a study through :class:`mlflow.MlflowClient` only.

No fluent API and no global active run, so several trials (threads, processes, machines) can log at
once. Layout: one experiment per study (tagged ``mlflow.experimentKind = custom_model_development`` so
MLflow 3's UI opens the runs table, not the GenAI view); one parent run for the study; one child run per
trial, nested by the ``mlflow.parentRunId`` tag. Per-epoch metrics go in one ``log_batch`` per epoch
(or per second, when epochs are shorter; see :class:`TrialRun`).

A child run always ends in a true state: FINISHED when the trial completed, FAILED (reason in the
``fail_reason`` tag and ``error.txt``) when it raised, KILLED on Ctrl-C, and KILLED with a
``pruned_at_epoch`` metric and a ``pruned_reason`` tag when the pruner stopped it (Optuna: PRUNED).

:class:`NullTracker` has the same interface and logs nothing (``--tracking-uri none``).
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wus_tune._study import adapters
from wus_tune._study.storage import RetryPolicy, mask_url, safe_name, sqlite_path, tracking_url
from wus_tune.errors import ServiceLost, UsageError, one_line

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from wus_tune.trainer import EpochRecord, TrainResult

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
ROLE_TAG = "wus_tune.role"  # "study" on the parent run, the trial's role on a child run
_MAX_TAG = 5000  # MLflow's tag value limit is 8000 characters; keep well below


def _now_ms() -> int:
    return int(time.time() * 1000)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def epoch_metrics(record: EpochRecord) -> dict[str, float]:
    """The metrics of one epoch, named as in the MLflow UI: the epoch's steps per step kind (``steps/full``,
    ``steps/skip:all``) and the methods' metrics, which keep their prefix (``wus/skipping``)."""
    m = {
        "train_loss": record.train_loss,
        "train_acc": record.train_acc,
        "val_loss": record.val_loss,
        "val_acc": record.val_acc,
        "lr": record.lr,
        **{f"steps/{kind}": n for kind, n in record.steps_by_kind.items()},
        "epoch_train_time_s": record.train_time_s,
        "epoch_eval_time_s": record.eval_time_s,
        "epoch_time_s": record.train_time_s + record.eval_time_s,
        "flops": record.flops,
    }
    m.update(record.extra or {})
    return {k: float(v) for k, v in m.items() if _finite(v)}


FINAL_METRICS = (
    "val_acc", "best_val_acc", "test_acc", "time_s", "train_time_s", "eval_time_s", "required_eval_time_s",
    "cost_flops", "train_flops", "flops_fraction", "changed_step_fraction", "total_steps", "num_params",
)  # fmt: skip


class TrialRun:
    """The child run of one trial. ``overhead_s`` accumulates the time spent in MLflow calls.

    Per-epoch metrics go out in one ``log_batch`` per epoch, or, when epochs are shorter than
    ``flush_every_s``, once that much time has passed (each call costs milliseconds on a SQLite store,
    more on a remote server; a trial of 40 tenth-of-a-second epochs would otherwise spend more time
    logging than training). Whatever is pending is sent before the run ends.
    """

    flush_every_s = 1.0

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.overhead_s = 0.0
        self.epoch_overhead_s = 0.0  # the part spent inside fit() (per-epoch logging)
        self.closed = False
        self._pending: list[Any] = []
        self._last_flush = time.perf_counter()

    def _timed(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.overhead_s += time.perf_counter() - t

    def log_epoch(self, record: EpochRecord) -> None:
        from mlflow.entities import Metric

        t = time.perf_counter()
        ts = _now_ms()
        self._pending += [Metric(k, v, ts, record.epoch) for k, v in epoch_metrics(record).items()]
        if t - self._last_flush >= self.flush_every_s or len(self._pending) > 900:  # 1000 per batch at most
            self.flush()
        self.epoch_overhead_s += time.perf_counter() - t

    def flush(self, tags: Sequence[Any] = ()) -> None:
        if self._pending or tags:
            self._timed(self.client.log_batch, self.run_id, metrics=self._pending, tags=list(tags))
        self._pending = []
        self._last_flush = time.perf_counter()

    def finish(self, result: TrainResult, objectives: Mapping[str, float], extra: Mapping[str, float] = {}) -> None:
        from mlflow.entities import Metric, RunTag

        ts, step = _now_ms(), len(result.epochs)
        last = epoch_metrics(result.epochs[-1]) if result.epochs else {}
        # Totals; a key also logged per epoch (val_acc) is logged again only if the total differs.
        values = {k: getattr(result, k, None) for k in FINAL_METRICS if last.get(k) != getattr(result, k, None)}
        values.update({f"objective/{k}": v for k, v in objectives.items()})
        values.update(extra)
        self._pending += [Metric(k, float(v), ts, step) for k, v in values.items() if _finite(v)]
        self.flush(tags=[RunTag("optuna.trial_state", "COMPLETE")])
        self._timed(self.client.set_terminated, self.run_id, "FINISHED")
        self.closed = True

    def prune(self, epoch: int, reason: str) -> None:
        """End the run KILLED by the pruner: the epochs so far, ``pruned_at_epoch`` and the reason as a tag
        (``pruned_reason``); ``optuna.trial_state = PRUNED``."""
        from mlflow.entities import Metric, RunTag

        if self.closed:
            return
        self._pending.append(Metric("pruned_at_epoch", float(epoch), _now_ms(), int(epoch)))
        self.flush(tags=[RunTag("optuna.trial_state", "PRUNED"), RunTag("pruned_reason", reason[:_MAX_TAG])])
        self._timed(self.client.set_terminated, self.run_id, "KILLED")
        self.closed = True

    def fail(self, error: BaseException) -> None:
        """End the run FAILED (KILLED for Ctrl-C) with the reason; never raises, so the trial's own
        error is what Optuna records."""
        from mlflow.entities import RunTag

        if self.closed:
            return
        killed = isinstance(error, (KeyboardInterrupt, SystemExit))
        reason = one_line(error, with_type=True)[:_MAX_TAG]
        client = self.client
        try:
            self.flush(tags=[RunTag("optuna.trial_state", "FAIL"), RunTag("fail_reason", reason)])
            tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            self._timed(client.log_text, self.run_id, tb, "error.txt")
        except Exception:
            pass  # the status below matters more than the details
        finally:
            try:
                self._timed(client.set_terminated, self.run_id, "KILLED" if killed else "FAILED")
                self.closed = True
            except Exception:
                pass


class MlflowTracker:
    """The study's experiment and parent run. Create with :meth:`open`."""

    def __init__(self, client: MlflowClient, tracking_uri: str, experiment_id: str, parent_run_id: str) -> None:
        self.client, self.tracking_uri = client, tracking_uri
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id

    @property
    def enabled(self) -> bool:
        return True

    @classmethod
    def open(
        cls,
        tracking_uri: str,
        study_name: str,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] = {},
        retry: RetryPolicy | None = None,
    ) -> MlflowTracker:
        """Get or create the experiment and the parent run; re-open the parent if it had ended.

        ``parent_run_id`` is the id kept in the study's user attributes: a worker that joins later
        (or a second invocation) logs under the same parent. ``retry``: every later MLflow call goes
        through it (:class:`ResilientClient`); opening itself fails at once with a :class:`UsageError`.
        """
        import os

        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        if tracking_uri.startswith(("http://", "https://")):
            # Not a "View run" line (and a get_run round trip) per trial on stdout.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            if retry is not None:  # MLflow's client retries a dead server for minutes per call; ours is the bound
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        client: Any = MlflowClient(tracking_uri=tracking_url(tracking_uri))
        try:
            experiment_id = get_or_create_experiment(client, tracking_uri, study_name)
            parent = _find_parent(client, experiment_id, parent_run_id)
            str_tags = {k: str(v)[:_MAX_TAG] for k, v in tags.items()}
            if parent is None:
                run = client.create_run(
                    experiment_id, run_name=study_name, tags={ROLE_TAG: "study", **str_tags}
                )
                parent_id = run.info.run_id
            else:
                parent_id = parent.info.run_id
                if parent.info.status != "RUNNING":
                    client.update_run(parent_id, status="RUNNING")
                from mlflow.entities import RunTag

                client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in str_tags.items()])
        except MlflowException as e:
            raise UsageError(f"--tracking-uri {mask_url(tracking_uri)}: {one_line(e, with_type=True)}") from None
        if retry is not None:
            client = ResilientClient(client, retry)
        return cls(client, tracking_uri, experiment_id, parent_id)

    def start_trial(self, number: int, *, params: Mapping[str, Any], tags: Mapping[str, Any]) -> TrialRun:
        tags = {"mlflow.parentRunId": self.parent_run_id, "optuna.trial_number": str(number),
                "optuna.trial_state": "RUNNING", **tags}  # fmt: skip
        return start_run(self.client, self.experiment_id, run_name=f"trial-{number:04d}", params=params, tags=tags)

    def log_parent(
        self,
        *,
        metrics: Mapping[str, float] = {},
        history: Mapping[str, Sequence[tuple[int, float]]] = {},
        tags: Mapping[str, Any] = {},
    ) -> None:
        from mlflow.entities import Metric, RunTag

        ts = _now_ms()
        items = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if _finite(v)]
        for key, points in history.items():
            items += [Metric(key, float(v), ts, int(step)) for step, v in points if _finite(v)]
        tag_items = [RunTag(k, str(v)[:_MAX_TAG]) for k, v in tags.items()]
        for i in range(0, max(len(items), 1), 1000):  # at most 1000 metrics per batch
            self.client.log_batch(self.parent_run_id, metrics=items[i : i + 1000], tags=tag_items if i == 0 else [])

    def log_artifacts(self, directory: str | Path) -> None:
        self.client.log_artifacts(self.parent_run_id, str(directory))

    def tag_children(self, tags_by_run: Mapping[str, Mapping[str, Any]], metrics_by_run: Mapping[str, Mapping[str, float]] = {}) -> None:
        """Tags (e.g. ``pareto_optimal``) and metrics (advantage over the frontier) on child runs."""
        from mlflow.entities import Metric, RunTag

        ts = _now_ms()
        for run_id in set(tags_by_run) | set(metrics_by_run):
            tags = [RunTag(k, str(v)) for k, v in tags_by_run.get(run_id, {}).items()]
            metrics = [Metric(k, float(v), ts, 0) for k, v in metrics_by_run.get(run_id, {}).items() if _finite(v)]
            try:
                self.client.log_batch(run_id, metrics=metrics, tags=tags)
            except Exception:
                pass  # a child run deleted in the UI must not break the study's summary

    def close_trial(self, number: int, run_id: str | None, reason: str) -> None:
        """Close the child run(s) of a trial whose worker died: KILLED, ``optuna.trial_state = FAIL`` and
        the reason. Found by the id in the trial's user attributes and, should the worker have died
        before storing it, by the run's ``optuna.trial_number`` tag. A run that had FINISHED is closed
        too: its trial never reached Optuna and is re-run."""
        from mlflow.entities import RunTag

        try:
            ids = {run_id} if run_id else set()
            ids |= {r.info.run_id for r in self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`optuna.trial_number` = '{number}'", max_results=50)}  # fmt: skip
            for rid in ids:
                run = self.client.get_run(rid)
                if run.data.tags.get("mlflow.parentRunId") != self.parent_run_id or run.info.status not in ("RUNNING", "FINISHED"):
                    continue
                self.client.log_batch(rid, tags=[RunTag("optuna.trial_state", "FAIL"), RunTag("fail_reason", reason[:_MAX_TAG])])
                self.client.set_terminated(rid, "KILLED")
        except ServiceLost:
            raise
        except Exception:
            pass  # a run deleted in the UI must not stop the study

    def sweep(self, trial_states: Mapping[int, str]) -> int:
        """Close the child runs still RUNNING whose trial is not (``trial_states``: number -> Optuna state):
        left by a worker that stopped while MLflow was unreachable. Returns how many were closed."""
        closed = 0
        try:
            runs = self.client.search_runs(
                [self.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)  # fmt: skip
        except Exception:
            return 0
        for run in runs:
            tag = run.data.tags.get("optuna.trial_number")
            if tag is None or run.data.tags.get("mlflow.parentRunId") != self.parent_run_id:
                continue
            state = trial_states.get(int(tag))
            if state is not None and state not in ("RUNNING", "WAITING"):
                self.close_trial(int(tag), run.info.run_id, f"worker stopped before the trial ended (Optuna: {state})")
                closed += 1
        return closed

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_run_id, status)


class NullTrialRun:
    run_id = None
    closed = True
    overhead_s = 0.0
    epoch_overhead_s = 0.0

    def log_epoch(self, record: EpochRecord) -> None:
        pass

    def finish(self, result: Any, objectives: Mapping[str, float], extra: Mapping[str, float] = {}) -> None:
        pass

    def prune(self, epoch: int, reason: str) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        pass


class NullTracker:
    """MLflow off: the same calls, no effect."""

    tracking_uri = experiment_id = parent_run_id = None
    enabled = False

    def start_trial(self, number: int, *, params: Mapping[str, Any], tags: Mapping[str, Any]) -> NullTrialRun:
        return NullTrialRun()

    def log_parent(self, **kwargs: Any) -> None:
        pass

    def log_artifacts(self, directory: str | Path) -> None:
        pass

    def tag_children(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close_trial(self, number: int, run_id: str | None, reason: str) -> None:
        pass

    def sweep(self, trial_states: Mapping[int, str]) -> int:
        return 0

    def end(self, status: str = "FINISHED") -> None:
        pass


class ResilientClient:
    """An :class:`mlflow.MlflowClient` whose every method call goes through a :class:`RetryPolicy`."""

    def __init__(self, client: MlflowClient, policy: RetryPolicy) -> None:
        self._client, self.policy = client, policy

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.policy.call(lambda: attr(*args, **kwargs))

        return call


def start_run(
    client: MlflowClient, experiment_id: str, *, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any]
) -> TrialRun:
    """Create a run with its tags and params; ``mlflow.parentRunId`` in ``tags`` nests it."""
    from mlflow.entities import Param

    t = time.perf_counter()
    run = client.create_run(experiment_id, run_name=run_name, tags={k: str(v)[:_MAX_TAG] for k, v in tags.items()})
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    trial_run = TrialRun(client, run.info.run_id)
    trial_run.overhead_s += time.perf_counter() - t
    return trial_run


def get_or_create_experiment(client: MlflowClient, tracking_uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)  # the first call creates a SQLite store's schema
    _fast_sqlite(client, tracking_uri)
    if exp is None:
        # With a SQLite store, keep artifacts beside the database (mlruns/<study>/), wherever the
        # command runs from; a server or other database decides its own artifact root.
        db = sqlite_path(tracking_uri)
        location = str((db.parent.resolve() / safe_name(name))) if db is not None else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # another worker created it first
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND["mlflow.experimentKind"])
    return exp.experiment_id


def _fast_sqlite(client: MlflowClient, tracking_uri: str) -> None:
    """WAL and ``synchronous=NORMAL`` for a SQLite tracking store (see ``storage.set_wal``): the store's
    commits drop from about 18 ms to well under 1 ms, which is most of MLflow's per-trial overhead."""
    from wus_tune._study.storage import set_wal, sync_normal

    path = sqlite_path(tracking_uri)
    if path is None or not path.exists():
        return
    try:
        set_wal(path)
        # MLflow exposes no hook for connection pragmas; its store's engine is reachable, if private.
        engine = adapters.mlflow_store_engine(client)
        if engine is not None and not getattr(engine, "_wus_tune_sync", False):
            sync_normal(engine)
            engine._wus_tune_sync = True
    except Exception:
        pass  # an optimisation only


def _find_parent(client: MlflowClient, experiment_id: str, run_id: str | None) -> Any:
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            run = client.get_run(run_id)
            if run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active":
                return run
        except MlflowException:
            pass
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'study'", order_by=["attributes.start_time ASC"], max_results=1
    )
    return runs[0] if runs else None
