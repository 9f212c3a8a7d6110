"""Several workers on one study: the trial loop each worker runs, stale trials, and the local launcher.

One *worker* is one process running :func:`run_worker` on a shared Optuna storage. Workers on other
machines join by running the same command with the same ``--storage``; on one machine ``--devices`` /
``--workers`` start them (:func:`launch`). What makes that safe:

* **Heartbeats.** While a trial runs, a thread records a heartbeat every ``heartbeat_interval`` seconds
  (Optuna's RDB heartbeat; :func:`~wus_tune._study.adapters.heartbeat_journal_storage` for Journal files).
  A RUNNING trial without one for ``grace_period`` seconds is *stale*: its worker died (SIGKILL, power,
  preemption). Before each trial every worker looks for stale trials (:meth:`StaleTrials.check`): it marks
  one FAIL with its ``fail_reason``, closes its MLflow child run KILLED, and re-queues the same parameters
  as a new WAITING trial (Optuna 5's :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`, at most
  ``max_retry`` times), which the next free worker runs. Exactly one worker wins each stale trial: the
  storage's state change is atomic.
* **A study-wide budget.** ``max_trials`` counts the study's *finished* trials (COMPLETE, PRUNED, and FAIL
  except those re-queued) plus the RUNNING ones; a worker starts a trial only while that sum is below it,
  checked and claimed under :func:`~wus_tune._study.storage.study_lock`, so N workers on a budget of M
  run exactly M trials. A worker that finds the budget taken only by running trials waits for them: if
  one of them goes stale, its retry must still run.
* **Clean interrupts.** SIGINT and SIGTERM raise :class:`Interrupted` in the worker's main thread: the
  running trial ends FAIL with the reason ``interrupted by SIGTERM``, its child run KILLED, the trial is
  re-queued (so a baseline cut short is run again when the study resumes), and the CLI exits with 130.
* **Lost servers.** Every storage and MLflow call goes through a
  :class:`~wus_tune._study.storage.RetryPolicy`; when one gives up, the worker re-queues its trial if it
  still can and stops with :class:`~wus_tune.errors.ServiceLost` (exit status 3).
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wus_tune._study import adapters
from wus_tune.errors import ServiceLost, UsageError, check_number

if TYPE_CHECKING:
    import optuna

# User attributes a re-queued trial keeps (what its enqueuer set); everything else is per attempt.
KEEP_ON_RETRY = ("role", "overrides")
HEARTBEAT_ATTR = adapters.HEARTBEAT_KEY


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM in a worker: ends the current trial cleanly, then the worker (exit 130)."""


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def worker_id() -> str:
    """``host:pid``: stored on each trial (user attribute ``worker``) and on its MLflow run."""
    return f"{socket.gethostname()}:{os.getpid()}"


# ---- settings ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The spec keys about workers and faults (defaults in :class:`~wus_tune._study.spec.StudySpec`)."""

    max_trials: int | None = None  # study-wide budget (:func:`budget_used`)
    heartbeat_interval: int | None = 30  # seconds; None: no heartbeats, no stale-trial detection
    grace_period: int | None = 90  # seconds without a heartbeat before a running trial is stale
    max_retry: int | None = 2  # re-queues of one stale or interrupted trial (None: unbounded)
    reconnect_timeout: float = 120.0  # seconds a lost storage or tracking server is retried


def check_settings(spec: Any) -> None:
    """Validate the worker/fault keys of a :class:`~wus_tune._study.spec.StudySpec`; one-line UsageError."""
    for key, low in (("max_trials", 1), ("heartbeat_interval", 1), ("grace_period", 1), ("max_retry", 0)):
        if getattr(spec, key) is not None:
            check_number(key, getattr(spec, key), integer=True, minimum=low)
    if spec.grace_period is not None:
        if spec.heartbeat_interval is None:
            raise UsageError("grace_period: needs heartbeat_interval")
        if spec.grace_period <= spec.heartbeat_interval:
            raise UsageError(f"grace_period: must exceed heartbeat_interval ({spec.heartbeat_interval} s), got {spec.grace_period}")
    check_number("reconnect_timeout", spec.reconnect_timeout, minimum=0, what="seconds")


def settings(study_def: Any) -> Settings:
    """The worker/fault settings of a resolved study (kept in its ``spec`` mapping)."""
    raw = study_def.spec
    interval = raw.get("heartbeat_interval", 30)
    grace = raw.get("grace_period") or (3 * interval if interval else None)
    return Settings(
        max_trials=raw.get("max_trials"),
        heartbeat_interval=interval,
        grace_period=grace,
        max_retry=raw.get("max_retry", 2),
        reconnect_timeout=float(raw.get("reconnect_timeout", 120.0)),
    )


# ---- stale trials --------------------------------------------------------------------------------------


def _requeue_class() -> type:
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    class Requeue(RetryHeartbeatStaleTrialCallback):
        """Optuna's retry callback, keeping only the enqueue-time user attributes (a retry must not
        inherit the dead attempt's ``mlflow_run_id`` or ``fail_reason``) and no heartbeat."""

        def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            trial = copy.copy(trial)
            attrs = {k: v for k, v in trial.user_attrs.items() if k in KEEP_ON_RETRY}
            attrs["retry_of"] = trial.system_attrs.get("failed_trial", trial.number)
            trial.user_attrs = attrs
            trial.system_attrs = {k: copy.deepcopy(v) for k, v in trial.system_attrs.items() if k != HEARTBEAT_ATTR}
            super().__call__(study, trial)

    return Requeue


class StaleTrials:
    """Finds stale trials, fails them with a reason, closes their MLflow runs, re-queues them."""

    def __init__(self, tracker: Any, *, grace_period: float | None, max_retry: int | None) -> None:
        import warnings

        import optuna

        self.tracker, self.grace_period = tracker, grace_period
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.requeue = _requeue_class()(max_retry=max_retry)

    def check(self, study: optuna.Study) -> list[int]:
        """Fail and re-queue the study's stale trials; returns their numbers (those this worker won)."""
        import optuna
        from optuna.trial import TrialState

        storage = adapters.study_storage(study)
        if not adapters.heartbeat_enabled(storage):
            return []
        won = []
        for trial_id in adapters.stale_trial_ids(storage, study.study_name):
            reason = f"worker lost: no heartbeat for more than {self.grace_period:g} s; re-queued"
            try:
                storage.set_trial_user_attr(trial_id, "fail_reason", reason)
                if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
                continue  # another worker got there first
            frozen = storage.get_trial(trial_id)
            self.tracker.close_trial(frozen.number, frozen.user_attrs.get("mlflow_run_id"), reason)
            self.retry(study, frozen)
            won.append(frozen.number)
        return won

    def retry(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        self.requeue(study, frozen)

    def fail_running(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> bool:
        """Fail a RUNNING trial whose worker is known to be gone (a lost Ray task: no need to wait for its
        heartbeat to stop), close its MLflow run KILLED and re-queue it. False if it had already ended
        (another worker's stale check, or its own ``tell``, got there first)."""
        import optuna
        from optuna.trial import TrialState

        storage = adapters.study_storage(study)
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), trial.number)
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                return False
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            return False
        frozen = storage.get_trial(trial_id)
        self.tracker.close_trial(frozen.number, frozen.user_attrs.get("mlflow_run_id"), reason)
        self.retry(study, frozen)
        return True


def retried_numbers(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of the trials that were re-queued (their retries carry them in ``retry_history``)."""
    out: set[int] = set()
    for t in trials:
        out.update(t.system_attrs.get("retry_history", ()))
    return out


def budget_used(trials: Sequence[optuna.trial.FrozenTrial]) -> tuple[int, int]:
    """(finished, running) as counted against ``max_trials`` (see the module docstring)."""
    from optuna.trial import TrialState

    retried = retried_numbers(trials)
    finished = sum(
        1 for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and t.number not in retried)
    )  # fmt: skip
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return finished, running


def trial_budget(trials: Sequence[optuna.trial.FrozenTrial], n_trials: int | None,
                 max_trials: int | None) -> tuple[int | None, int]:  # fmt: skip
    """(budget, finished) for an invocation that starts trials in other processes (local workers, Ray
    tasks): the study-wide count (:func:`budget_used`) to stop at, ``n_trials`` beyond the trials finished
    or running now, capped by ``max_trials``; None when neither is set. ``finished`` is counted now."""
    finished, running = budget_used(trials)
    budget = None if n_trials is None else finished + running + n_trials
    if max_trials is not None:
        budget = max_trials if budget is None else min(budget, max_trials)
    return budget, finished


class Heartbeat:
    """Records the trial's heartbeat every ``interval`` seconds in a daemon thread (a storage error is
    retried by the storage's policy; a lost storage ends the thread, the trial then goes stale)."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self.interval = storage.get_heartbeat_interval() if adapters.heartbeat_enabled(storage) else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)  # at once: a trial is never RUNNING without one
            self._thread = threading.Thread(target=self._run, name="wus_tune-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:
                return

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


@contextlib.contextmanager
def interrupts(fired: list[int] | None = None, *, plain: bool = False) -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` once, the signal appended to ``fired``; a second signal
    during the cleanup is ignored. ``plain``: raise a bare KeyboardInterrupt instead (under Ray, whose
    ``wait`` turns any exception raised in a signal handler into one; ``fired`` then tells which signal)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = [] if fired is None else fired

    def handler(signum: int, _frame: Any) -> None:
        if fired:
            return
        fired.append(signum)
        if plain:
            raise KeyboardInterrupt
        raise Interrupted(f"interrupted by {signal_name(signum)}" + (" (Ctrl-C)" if signum == signal.SIGINT else ""))

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---- the trial loop ------------------------------------------------------------------------------------


def run_worker(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Sequence[float]],
    *,
    n_trials: int | None,
    max_trials: int | None,
    timeout: float | None,
    stale: StaleTrials,
    lock: Callable[[], contextlib.AbstractContextManager[Any]],
    callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
    poll_s: float = 2.0,
) -> None:
    """Run trials until ``n_trials`` (this worker's), ``max_trials`` (the study's) or ``timeout`` is
    reached. What ``study.optimize`` does, plus the budget, the stale-trial sweep and the clean interrupt.

    Raises :class:`Interrupted` (after failing and re-queueing the current trial) or :class:`ServiceLost`.
    """
    import optuna
    from optuna.trial import TrialState

    me = worker_id()
    start = time.monotonic()
    ran = 0
    with interrupts():
        while n_trials is None or ran < n_trials:
            if timeout is not None and time.monotonic() - start >= timeout:
                return
            stale.check(study)
            trial = None
            if max_trials is None:
                trial = _ask(study)
            else:
                with lock():
                    finished, running = budget_used(study.get_trials(deepcopy=False))
                    if finished >= max_trials:
                        return
                    if finished + running < max_trials:
                        trial = _ask(study)
            if trial is None:  # the budget is held by running trials: wait for them (or for them to go stale)
                time.sleep(poll_s)
                continue
            ran += 1
            values, state, stop = None, TrialState.FAIL, None
            try:
                trial.set_user_attr("worker", me)
                storage = trial.storage
                trial_id = storage.get_trial_id_from_study_id_trial_number(
                    storage.get_study_id_from_name(study.study_name), trial.number
                )
                with Heartbeat(storage, trial_id):
                    values = objective(trial)
                    state = TrialState.COMPLETE
            except (Interrupted, KeyboardInterrupt, ServiceLost) as e:
                stop = e
            except optuna.TrialPruned:
                state = TrialState.PRUNED  # stopped at a rung by the pruner (wus_tune._study.pruning)
            except Exception:
                pass  # the objective recorded the reason; the study goes on
            try:
                frozen = study.tell(trial, values, state=state, skip_if_finished=True)
            except ServiceLost as lost:
                raise (stop if isinstance(stop, ServiceLost) else lost) from None
            if stop is not None:
                if frozen.state == TrialState.FAIL:
                    with contextlib.suppress(ServiceLost):
                        stale.retry(study, frozen)  # run it again when the study resumes
                raise stop
            for callback in callbacks:
                callback(study, frozen)


def _ask(study: optuna.Study) -> optuna.Trial:
    import warnings

    with warnings.catch_warnings():  # "Heartbeat of storage is supposed to be used with Study.optimize": we do
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return study.ask()


# ---- several workers on one machine --------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One local worker: its label, the device it trains on, and the environment it starts with."""

    index: int
    device: str  # "cpu", or a CUDA index as seen by the parent ("0")
    threads: int

    @property
    def label(self) -> str:
        return f"w{self.index} {'cpu' if self.device == 'cpu' else 'gpu' + self.device}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        env["PYTHONUNBUFFERED"] = "1"
        if self.device != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = self.device
        return env

    @property
    def train_device(self) -> str:
        return "cpu" if self.device == "cpu" else "cuda"


def plan_slots(devices: str | None, workers: int | None, workers_per_device: int | None) -> list[Slot]:
    """The local workers that ``--devices`` / ``--workers`` / ``--workers-per-device`` ask for ([] = run in
    this process). ``--devices 0,1`` is one worker per GPU (times ``--workers-per-device``);
    ``--devices cpu --workers 4`` four CPU workers with ``cores // 4`` torch threads each; ``--workers N``
    with GPUs spreads N workers over them in turn."""
    for name, value in (("--workers", workers), ("--workers-per-device", workers_per_device)):
        if value is not None:
            check_number(name, value, integer=True, minimum=1)
    if devices is None:
        if workers_per_device is not None:
            raise UsageError("--workers-per-device needs --devices (e.g. --devices 0,1)")
        if not workers or workers == 1:
            return []
        names = ["cpu"]
    else:
        names = [d.strip() for d in str(devices).split(",") if d.strip()]
        if not names:
            raise UsageError(f"--devices {devices!r}: expected GPU indices such as 0,1,2,3, or cpu")
        if "cpu" in names:
            if names != ["cpu"]:
                raise UsageError(f"--devices {devices}: either cpu or GPU indices, not both")
            if workers is None:
                workers = workers_per_device or 1
        else:
            bad = [d for d in names if not d.isdigit()]
            if bad:
                raise UsageError(f"--devices {devices}: {bad[0]!r} is not a GPU index (expected e.g. 0,1,2,3, or cpu)")
            if len(set(names)) != len(names):
                raise UsageError(f"--devices {devices}: a device is listed twice; use --workers-per-device to share one")
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            missing = [d for d in names if int(d) >= count]
            if missing:
                have = f"GPUs 0..{count - 1}" if count else "no CUDA GPU"
                raise UsageError(f"--devices {devices}: GPU {missing[0]} does not exist (this machine has {have}); "
                                 "on CPU use --devices cpu --workers N")  # fmt: skip
    total = workers if workers is not None else len(names) * (workers_per_device or 1)
    cores = os.cpu_count() or 1
    threads = max(1, cores // total)
    return [Slot(i, names[i % len(names)], threads) for i in range(total)]


def launch(
    slots: Sequence[Slot],
    spec_path: str,
    *,
    say: Callable[[str], None],
    extra_args: Sequence[str] = (),
) -> tuple[list[int], list[str], bool]:
    """Start one ``python -m wus_tune.study --spec SPEC --worker`` per slot, prefix their output, wait.

    SIGINT/SIGTERM received here are passed on as SIGTERM (each worker then ends its trial cleanly).
    Returns (exit codes, worker ids ``host:pid``, interrupted).
    """
    from wus_tune._study.storage import redact

    procs: list[subprocess.Popen[str]] = []
    interrupted = []

    def forward(signum: int, _frame: Any) -> None:
        interrupted.append(signum)
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)

    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    threads = []
    try:
        for slot in slots:
            args = [sys.executable, "-m", "wus_tune.study", "--spec", spec_path, "--worker",
                    "--device", slot.train_device, *extra_args]  # fmt: skip
            p = subprocess.Popen(args, env=slot.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p, f"[{slot.label}] ", say, redact), daemon=True)
            t.start()
            threads.append(t)
        say(f"started {len(procs)} workers: " + ", ".join(f"{s.label} (pid {p.pid}, {s.threads} threads)" for s, p in zip(slots, procs)))
        codes = []
        for p in procs:
            while True:
                try:
                    codes.append(p.wait())
                    break
                except KeyboardInterrupt:  # only if a handler could not be installed
                    forward(signal.SIGINT, None)
        for t in threads:
            t.join(timeout=10)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    host = socket.gethostname()
    return codes, [f"{host}:{p.pid}" for p in procs], bool(interrupted)


def launch_status(codes: Sequence[int], *, interrupted: bool, budget_complete: bool) -> tuple[str, int]:
    """The study's status after its local workers exited, and how many were lost (exited other than 0, 1
    or 130: a signal such as SIGKILL, or an error). The status is the study's, not one worker's: lost
    workers whose trials the others re-ran still leave a study that completed its budget FINISHED."""
    lost = sum(1 for c in codes if c not in (0, 1, 130))
    if interrupted or 130 in codes:
        return "KILLED", lost
    return ("FINISHED" if budget_complete or not lost else "FAILED"), lost


def _pump(p: subprocess.Popen[str], prefix: str, say: Callable[[str], None], redact: Callable[[str], str]) -> None:
    assert p.stdout is not None
    for line in p.stdout:
        say(prefix + redact(line.rstrip("\n")))
