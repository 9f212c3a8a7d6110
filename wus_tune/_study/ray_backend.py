"""A study's trials on a Ray cluster (``--ray ADDRESS``): Ray places the trials, the Optuna storage stays
the study's single source of truth.

Design (see docs/study.md, "Ray"): every trial is one Ray *task* that does what a ``--worker`` process
does for one trial: it opens the shared Optuna storage and the study's MLflow parent run (once per Ray
worker process, then cached), asks the study for a trial under the study lock and the study-wide budget,
trains it with the same :class:`~wus_tune._study.objective.Objective`, and tells the result. The driver
(the ``python -m wus_tune.study`` process) only decides how many tasks to keep in flight, prints each
finished trial and writes the report. So the Optuna study, the MLflow runs and the artifacts are exactly
those of a local study, and a Ray task is never the only place a result lives.

Faults:

* A Ray worker process or node dies mid-trial: its task fails with a Ray error in the driver, which
  finds the trial by the task's token (user attribute ``ray_task``), fails it with the reason, closes its
  MLflow run KILLED and re-queues it (:meth:`~wus_tune._study.workers.StaleTrials.fail_running`, bounded
  by ``max_retry``), then submits another task. Ray's own task retries are off (``max_retries=0``): the
  re-run goes through Optuna's queue, so a trial is never counted twice. The study's parent run ends
  FINISHED when the budget completes, with the number of lost workers in the ``lost_workers`` tag.
* The driver dies: Ray kills its tasks; their trials stop sending heartbeats, so the next invocation's
  tasks find them stale after ``grace_period`` and re-queue them (as for a killed ``--worker``).
* Ctrl-C (or SIGTERM) in the driver: the running tasks are cancelled (their worker processes end), their
  trials failed and re-queued, their runs KILLED; exit status 130; the same command continues.
* A cluster that cannot be reached: one line and exit status 2 before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wus_tune._study.ray_plan import RayPlan
from wus_tune.errors import ServiceLost, UsageError, one_line

if TYPE_CHECKING:
    import optuna

    from wus_tune._study.spec import ResolvedStudy, StudySpec

TOKEN_ATTR = "ray_task"  # the Ray task that ran a trial (how the driver finds the trial of a lost task)
NODE_ATTR = "ray_node"  # the id of the Ray node it ran on
INSTALL_HINT = "pip install 'wus_tune[ray]'"


# ---- connecting --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaySession:
    """A connected cluster: the plan and the number of trials to run at once."""

    plan: RayPlan
    slots: int


def connect(ray_plan: RayPlan) -> RaySession:
    """Connect to (or, for ``local``, start) the cluster and decide how many trials run at once.

    Raises :class:`UsageError` (one line) when Ray is missing, the cluster cannot be reached, or it has
    no room for one trial: before the study's stores are touched."""
    import logging

    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray: Ray is not installed; {INSTALL_HINT}") from None
    address = ray_plan.address
    if address not in ("auto", "local"):
        _check_reachable(address)
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}
    if address == "local":
        kwargs["num_cpus"] = os.cpu_count() or 1
    else:
        kwargs.pop("include_dashboard")  # a setting of the cluster, not of a driver that joins it
    try:
        ray.init(address=address, **kwargs)
    except Exception as e:
        hint = (" (no running cluster found: start one with `ray start --head`, or use --ray local)" if address == "auto" else
                " (a cluster with token authentication also needs RAY_AUTH_MODE=token and its token here)"
                if not os.environ.get("RAY_AUTH_MODE") else "")  # fmt: skip
        raise UsageError(f"--ray {address}: cannot connect to the Ray cluster: {one_line(e)}{hint}") from None
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    fits = [math.floor(cpus / ray_plan.cpus_per_trial + 1e-9)] if ray_plan.cpus_per_trial > 0 else []
    if ray_plan.gpus_per_trial > 0:
        fits.append(math.floor(gpus / ray_plan.gpus_per_trial + 1e-9))
    room = min(fits)
    if ray_plan.slots is not None:
        return RaySession(ray_plan, ray_plan.slots)  # an autoscaling cluster may grow to fit them; Ray queues the rest
    if room < 1:
        ray.shutdown()
        raise UsageError(
            f"--ray {address}: the cluster has {cpus:g} CPUs and {gpus:g} GPUs, no room for one trial of "
            f"{ray_plan.cpus_per_trial:g} CPU and {ray_plan.gpus_per_trial:g} GPU (an autoscaling cluster: pass --workers N)"
        )
    return RaySession(ray_plan, room)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connect to the head's GCS port: ``ray.init`` would otherwise wait for a dead address a minute."""
    host, _, port = address.removeprefix("ray://").rpartition(":")  # the form was checked by check_settings
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"--ray {address}: no Ray cluster answers there ({e.strerror or e}); "
                         "start one with `ray start --head`, or use --ray local") from None  # fmt: skip


# ---- the task: one trial in a Ray worker process -------------------------------------------------------


class _Runner:
    """What one Ray worker process keeps between its trials: the study, the MLflow tracker, the objective."""

    def __init__(self, payload: Mapping[str, Any]) -> None:
        import optuna

        from wus_tune._study import workers as w
        from wus_tune._study.objective import Objective
        from wus_tune._study.spec import StudySpec, make_sampler, prepare_sections
        from wus_tune._study.storage import RetryPolicy, mask_url, open_storage, study_lock
        from wus_tune._study.tracking import MlflowTracker, NullTracker

        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        if os.path.isdir(payload["cwd"]):  # relative paths in the spec mean what they mean on the driver
            os.chdir(payload["cwd"])
        import torch

        torch.set_num_threads(payload["threads"])
        spec = StudySpec.from_dict(payload["spec"], "ray task")
        study_def = prepare_sections(spec, spec.resolve(), fit=payload["fit"], say=lambda _: None)
        conf = w.settings(study_def)
        storage = open_storage(
            study_def.storage, heartbeat_interval=conf.heartbeat_interval, grace_period=conf.grace_period,
            retry=RetryPolicy(f"Optuna storage {mask_url(study_def.storage)}", conf.reconnect_timeout),
        )  # fmt: skip
        from wus_tune._study.trial_seed import TrialSeededSampler

        # each trial's draws from (study seed, trial number): the same in every run, whichever process asks
        sampler = TrialSeededSampler(lambda seed: make_sampler(study_def.sampler, study_def.sampler_options, seed=seed),
                                     study_def.seed)  # fmt: skip
        self.study = optuna.load_study(study_name=study_def.name, storage=storage, sampler=sampler)
        tracker: Any = NullTracker()
        if study_def.tracking_uri is not None:
            tracker = MlflowTracker.open(
                study_def.tracking_uri, study_def.name, parent_run_id=payload["parent_run_id"],
                retry=RetryPolicy(f"MLflow tracking {mask_url(study_def.tracking_uri)}", conf.reconnect_timeout),
            )  # fmt: skip
        self.objective = Objective(study_def, tracker, fit=payload["fit"])
        self.stale = w.StaleTrials(tracker, grace_period=conf.grace_period, max_retry=conf.max_retry)
        self.lock = lambda: study_lock(storage, study_def.name)
        self.poll_s = min(2.0, float(conf.heartbeat_interval or 2))
        import ray

        self.node = ray.get_runtime_context().get_node_id()

    def run_one(self, budget: int | None, token: str) -> int | None:
        """Run one trial if the study's budget allows; its number, or None when the budget was complete."""
        from wus_tune._study import workers as w

        done: list[int] = []

        def tagged(trial: optuna.Trial) -> Any:
            trial.set_user_attr(TOKEN_ATTR, token)
            trial.set_user_attr(NODE_ATTR, self.node)
            return self.objective(trial)

        w.run_worker(
            self.study, tagged, n_trials=1, max_trials=budget, timeout=None, stale=self.stale, lock=self.lock,
            callbacks=[lambda _study, frozen: done.append(frozen.number)], poll_s=self.poll_s,
        )  # fmt: skip
        return done[0] if done else None


_RUNNER: dict[str, _Runner] = {}  # one per Ray worker process, keyed by the study it serves


def run_trial_task(payload: Mapping[str, Any], budget: int | None, token: str) -> tuple[int | None, float]:
    """The body of the Ray task (module-level so Ray pickles it by reference): (the trial's number or
    None, seconds spent opening the study in this process: nonzero for a worker process's first task)."""
    t = time.perf_counter()
    runner = _RUNNER.get(payload["key"])
    if runner is None:
        _RUNNER.clear()
        runner = _RUNNER[payload["key"]] = _Runner(payload)
    setup_s = time.perf_counter() - t
    return runner.run_one(budget, token), setup_s


# ---- the driver ----------------------------------------------------------------------------------------


@dataclass
class RayResult:
    status: str  # FINISHED, KILLED or FAILED
    lost_workers: int = 0
    tasks: int = 0
    slots: int = 0
    dispatch_s: list[float] = dataclasses.field(default_factory=list)  # per trial: task round trip minus the trial
    setup_s: list[float] = dataclasses.field(default_factory=list)  # per worker process: opening the study


def absolute_url(url: str | None) -> str | None:
    """A SQLite or Journal URL made absolute (a Ray worker may start in another directory)."""
    from wus_tune._study.storage import JOURNAL_SCHEME, journal_path, sqlite_path

    if url is None:
        return None
    path = sqlite_path(url) if url.startswith("sqlite:") else journal_path(url) if url.startswith(JOURNAL_SCHEME) else None
    if path is None or path.is_absolute():
        return url
    scheme = "sqlite:///" if url.startswith("sqlite:") else JOURNAL_SCHEME
    query = url.partition("?")[1] + url.partition("?")[2] if url.startswith("sqlite:") else ""
    return f"{scheme}{path.resolve()}{query}"


def run(
    study: optuna.Study,
    spec: StudySpec,
    study_def: ResolvedStudy,
    conf: Any,
    tracker: Any,
    session: RaySession,
    *,
    fit: Callable[..., Any] | None,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None],
    say: Callable[[str], None],
) -> str:
    """Run this invocation's trials as Ray tasks, at most ``session.slots`` at once; returns the study's status
    (FINISHED, KILLED or FAILED) and tags the parent run with ``lost_workers`` when there were any.

    Raises :class:`ServiceLost` when a task lost the storage or the tracking server, or the cluster
    itself is gone (everything recorded is kept; the same command continues)."""
    import ray

    from wus_tune._study import workers as w

    budget, finished = w.trial_budget(study.get_trials(deepcopy=False), study_def.n_trials, conf.max_trials)
    slots = session.slots if budget is None else max(1, min(session.slots, budget - finished))
    payload = task_payload(study_def, spec, session.plan, budget=budget, parent_run_id=tracker.parent_run_id, fit=fit)
    say(f"{session.plan.label()}; {slots} trial(s) at once" + (f", {budget - finished} to run" if budget is not None else ""))
    driver = _Driver(ray, study, study_def, conf, tracker, session.plan, payload, budget=budget, slots=slots,
                     on_trial=on_trial, say=say)  # fmt: skip
    driver.drive()
    driver.summarise()
    return driver.result.status


def task_payload(study_def: ResolvedStudy, spec: StudySpec, ray_plan: RayPlan, *, budget: int | None,
                 parent_run_id: str | None, fit: Callable[..., Any] | None) -> dict[str, Any]:  # fmt: skip
    """What every task gets: the spec a ``--worker`` would read (absolute storage paths, the study-wide
    budget, the device Ray gives), the driver's directory, the parent run and ``fit``."""
    import copy

    child = dataclasses.replace(
        spec, name=study_def.name, storage=absolute_url(study_def.storage), tracking_uri=absolute_url(study_def.tracking_uri) or "none",
        n_trials=None, max_trials=budget, ray=None, gpus_per_trial=None, cpus_per_trial=None, train=copy.deepcopy(spec.train),
    )  # fmt: skip
    child.set_train("device", ray_plan.train_device)
    return {"spec": child.to_dict(), "cwd": os.getcwd(), "fit": fit, "threads": ray_plan.threads,
            "parent_run_id": parent_run_id, "key": f"{study_def.name}:{uuid.uuid4().hex}"}  # fmt: skip


class _Driver:
    """The driver's loop: keeps ``slots`` tasks in flight while the budget allows, and turns what each
    returns (a trial, a failure in our code, a lost worker) into the study's record and status."""

    def __init__(self, ray: Any, study: optuna.Study, study_def: ResolvedStudy, conf: Any, tracker: Any,
                 ray_plan: RayPlan, payload: Mapping[str, Any], *, budget: int | None, slots: int,
                 on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None], say: Callable[[str], None]) -> None:  # fmt: skip
        self.ray, self.study, self.study_def, self.conf, self.tracker = ray, study, study_def, conf, tracker
        self.budget, self.slots, self.on_trial, self.say = budget, slots, on_trial, say
        self.payload_ref = ray.put(payload)  # once, not with every task (it holds the spec and maybe a fit function)
        self.task = ray.remote(run_trial_task).options(
            num_cpus=ray_plan.cpus_per_trial, num_gpus=ray_plan.gpus_per_trial, max_retries=0, name="wus_tune-trial"
        )  # fmt: skip
        self.gcs = None if ray_plan.address == "local" else _gcs_address(ray)  # probed when a node dies: is it the head?
        self.result = RayResult(status="FINISHED", slots=slots)
        self.in_flight: dict[Any, tuple[str, float]] = {}  # ObjectRef -> (token, submitted at)
        self.start = time.monotonic()
        self.stop_reason: str | None = None
        self.lost_in_a_row = 0
        self.head_checked = time.monotonic()

    def drive(self) -> None:
        """Run tasks until the budget, the timeout or a stop; on Ctrl-C or an error, cancel those in flight
        and re-queue their trials."""
        from wus_tune._study import workers as w

        signals: list[int] = []
        with w.interrupts(signals, plain=True):  # a second Ctrl-C while the tasks are cancelled is ignored
            try:
                self._loop()
            except KeyboardInterrupt:
                self.result.status = "KILLED"
                name = w.signal_name(signals[0]) if signals else "SIGINT"
                reason = f"interrupted by {name}" + (" (Ctrl-C)" if name == "SIGINT" else "")
                self.say(f"{reason}: cancelling {len(self.in_flight)} running task(s); their trials are re-queued; "
                         "run the same command again to continue")  # fmt: skip
                _cancel(self.ray, self.in_flight, lambda token: self.fail_trial_of(token, f"Interrupted: {reason}; re-queued"))
            except BaseException:
                _cancel(self.ray, self.in_flight, lambda token: self.fail_trial_of(token, "the driver stopped; re-queued"))
                raise
            finally:
                _shutdown(self.ray)  # a driver that joined leaves the cluster running; "local" stops its own

    def _loop(self) -> None:
        while True:
            while len(self.in_flight) < self.slots and self._room():
                self._submit()
            if not self.in_flight:
                return
            ready, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                self._collect(ref)
            if not ready:
                self._check_head()

    def _check_head(self) -> None:
        """Probe the head between waits: with the head gone the tasks never return an error, and Ray's
        core worker ends this process (exit 1, no word of why) after a minute without the GCS."""
        now = time.monotonic()
        if self.gcs is None or now - self.head_checked < HEAD_PROBE_S:
            return
        self.head_checked = now
        if _answers(self.gcs, timeout=2.0):
            return
        for token, _ in list(self.in_flight.values()):  # nothing to cancel on a dead cluster: fail and re-queue
            with contextlib.suppress(Exception):
                self.fail_trial_of(token, "Ray worker lost: the cluster's head is gone; re-queued")
        self.in_flight.clear()
        raise _head_lost(self.gcs) from None

    def _room(self) -> bool:
        if self.stop_reason is not None:
            return False
        if self.study_def.timeout is not None and time.monotonic() - self.start >= self.study_def.timeout:
            return False
        if self.budget is None:
            return True
        from wus_tune._study import workers as w

        done, _ = w.budget_used(self.study.get_trials(deepcopy=False))
        return done + len(self.in_flight) < self.budget

    def _submit(self) -> None:
        token = uuid.uuid4().hex
        self.in_flight[self.task.remote(self.payload_ref, self.budget, token)] = (token, time.monotonic())
        self.result.tasks += 1

    def _collect(self, ref: Any) -> None:
        """What one finished task returned: its trial, or why it has none."""
        from ray.exceptions import RayError, RayTaskError

        token, submitted = self.in_flight.pop(ref)
        try:
            number, setup_s = self.ray.get(ref)
        except RayTaskError as e:  # raised by our code inside the task
            self._task_failed(token, e)
            return
        except RayError as e:  # the worker process or its node died
            self._worker_lost(token, e)
            return
        self.lost_in_a_row = 0
        if number is None:  # the budget was complete when the task asked
            self.stop_reason = self.stop_reason or "budget complete"
            return
        frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
        if frozen.datetime_start and frozen.datetime_complete:
            trial_s = (frozen.datetime_complete - frozen.datetime_start).total_seconds()
            self.result.dispatch_s.append(max(0.0, time.monotonic() - submitted - trial_s - setup_s))
        if setup_s > 0.05:
            self.result.setup_s.append(setup_s)
        self.on_trial(self.study, frozen)

    def _task_failed(self, token: str, e: BaseException) -> None:
        """Our code raised inside the task: a lost service stops the study, a stopped worker re-queued its
        own trial, anything else fails the trial and stops starting new ones."""
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
        if isinstance(cause, ServiceLost):
            raise ServiceLost(str(cause)) from None
        if isinstance(cause, KeyboardInterrupt):  # SIGTERM to the task (a node drained): it
            self.result.lost_workers += 1  # failed and re-queued its own trial
            self.say(f"a Ray worker was stopped ({one_line(cause, with_type=True)}); its trial is re-queued")
            return
        self.fail_trial_of(token, f"ray task failed: {one_line(cause or e, with_type=True)}")
        self.stop_reason = self.stop_reason or one_line(cause or e, with_type=True)
        self.say(f"error: a Ray task failed: {self.stop_reason}; stopping")
        self.result.status = "FAILED"

    def _worker_lost(self, token: str, e: BaseException) -> None:
        """The task's worker process or node died: re-queue its trial; stop if the head is gone or the
        cluster keeps losing workers."""
        self.result.lost_workers += 1
        had_trial = self.fail_trial_of(token, f"Ray worker lost: {type(e).__name__}; re-queued")
        self.say(f"a Ray worker was lost ({one_line(e, with_type=True)[:200]})" + ("; its trial is re-queued" if had_trial else ""))
        if self.gcs is not None and not _answers(self.gcs):
            raise _head_lost(self.gcs) from None
        self.lost_in_a_row += 1
        if self.lost_in_a_row > 3 * self.slots:
            raise ServiceLost(f"the Ray cluster keeps losing workers ({self.lost_in_a_row} in a row, the "
                              f"last: {type(e).__name__}); run the same command again to continue") from None  # fmt: skip

    def fail_trial_of(self, token: str, reason: str) -> bool:
        """Fail, close and re-queue the trial a lost task was running; False if it had none running."""
        from wus_tune._study import workers as w

        for t in self.study.get_trials(deepcopy=False):
            if t.user_attrs.get(TOKEN_ATTR) == token and t.state.name == "RUNNING":
                stale = w.StaleTrials(self.tracker, grace_period=self.conf.grace_period, max_retry=self.conf.max_retry)
                return stale.fail_running(self.study, t, reason)
        return False

    def summarise(self) -> None:
        """Tag the parent run with the lost workers; print what Ray added per trial."""
        result = self.result
        if result.lost_workers:
            self.tracker.log_parent(tags={"lost_workers": result.lost_workers})
        if result.dispatch_s:
            ordered = sorted(result.dispatch_s)
            setup = (f"; {len(result.setup_s)} worker processes opened the study in "
                     f"{sum(result.setup_s) / len(result.setup_s):.1f} s each" if result.setup_s else "")  # fmt: skip
            self.say(f"ray: {result.tasks} tasks, {result.lost_workers} lost workers; per trial Ray added "
                     f"{1000 * ordered[len(ordered) // 2]:.0f} ms (median task round trip minus the trial){setup}")  # fmt: skip


def _head_lost(gcs: str) -> ServiceLost:
    return ServiceLost(f"the Ray cluster's head {gcs} is gone; the trials it was running are re-queued: "
                       "start the cluster again and run the same command to continue")


HEAD_PROBE_S = 5.0  # how often an idle driver checks the head answers (a TCP connect)


def _gcs_address(ray: Any) -> str | None:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:
        return None


def _answers(address: str, timeout: float = 3.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def _shutdown(ray: Any, timeout: float = 10.0) -> None:
    """``ray.shutdown()``, bounded: with the head gone it can wait for the cluster a minute."""
    import threading

    def stop() -> None:
        with contextlib.suppress(Exception):
            ray.shutdown()

    t = threading.Thread(target=stop, daemon=True)
    t.start()
    t.join(timeout)


def _cancel(ray: Any, in_flight: Mapping[Any, tuple[str, float]], fail: Callable[[str], Any]) -> None:
    """End the running tasks (their worker processes are killed) and fail + re-queue their trials."""
    refs = list(in_flight)
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
    with contextlib.suppress(Exception):
        ray.wait(refs, num_returns=len(refs), timeout=10)
    for token, _ in in_flight.values():
        with contextlib.suppress(Exception):
            fail(token)
