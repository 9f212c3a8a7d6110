"""Where a study's trials run (the launch policy): in this process, in local worker processes (``--devices``
/ ``--workers``, one per slot: :mod:`wus_tune._study.workers`), or as tasks on a Ray cluster (``--ray``:
:mod:`wus_tune._study.ray_backend`). Local workers and Ray tasks share one study-wide trial budget
(:func:`~wus_tune._study.workers.trial_budget`); every trial, wherever it runs, is the same
:class:`~wus_tune._study.objective.Objective`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from wus_tune.errors import UsageError

if TYPE_CHECKING:
    import optuna

    from wus_tune._study.opening import OpenStudy
    from wus_tune._study.ray_backend import RaySession
    from wus_tune._study.spec import ResolvedStudy, StudySpec
    from wus_tune._study.workers import Settings, Slot
    from wus_tune.trainer import TrainResult


def connect_ray(spec: StudySpec, *, devices: str | None, workers: int | None, workers_per_device: int | None,
                own_inputs: bool) -> RaySession | None:  # fmt: skip
    """The Ray cluster of a spec with ``ray`` set (None without): checked and connected before anything is
    written (an unreachable cluster is one line, exit 2). ``own_inputs``: ``model=``/``data=`` were given,
    which only this process has."""
    if spec.ray is None:
        return None
    from wus_tune._study import ray_backend
    from wus_tune._study.ray_plan import plan

    if own_inputs:
        raise UsageError("run_study: model= and data= run in this process only; drop ray")
    return ray_backend.connect(plan(spec, devices=devices, workers=workers, workers_per_device=workers_per_device))


def run_trials(
    *,
    opened: OpenStudy,
    spec: StudySpec,
    study_def: ResolvedStudy,
    slots: Sequence[Slot],
    fit: Callable[..., TrainResult] | None,
    ran: list[int],
    say: Callable[[str], None],
    ray: RaySession | None = None,
) -> str:
    """Run this invocation's trials, in this process, in one worker process per slot, or as Ray tasks
    (``ray``: the session :func:`connect_ray` opened); ``ran`` collects the numbers of the trials that
    finished. Returns the status (FINISHED, KILLED or FAILED)."""
    from wus_tune._study import workers as w
    from wus_tune._study.summary import TrialPrinter

    conf = w.settings(study_def)
    if ray is not None:
        from wus_tune._study import ray_backend

        return ray_backend.run(opened.study, spec, study_def, conf, opened.tracker, ray, fit=fit,
                               on_trial=TrialPrinter(study_def, say, ran), say=say)  # fmt: skip
    if len(slots) > 1:
        return launch_workers(opened.study, spec, study_def, slots, conf, ran, say, opened.tracker)
    run_here(opened, study_def, conf, fit=fit, ran=ran, say=say)
    return "FINISHED"


def run_here(opened: OpenStudy, study_def: ResolvedStudy, conf: Settings, *, fit: Callable[..., TrainResult] | None,
             ran: list[int], say: Callable[[str], None]) -> None:  # fmt: skip
    """The trials in this process (also what each ``--worker`` process runs)."""
    from wus_tune._study import workers as w
    from wus_tune._study.objective import Objective
    from wus_tune._study.storage import study_lock
    from wus_tune._study.summary import TrialPrinter
    from wus_tune._study.tuned_plain import TunedPlainBalancer

    stale = w.StaleTrials(opened.tracker, grace_period=conf.grace_period, max_retry=conf.max_retry)
    w.run_worker(
        opened.study,
        # while a forkable trial waits for a baseline another worker trains, the stale sweep runs
        Objective(study_def, opened.tracker, fit=fit, say=say, while_waiting=stale.check),
        n_trials=study_def.n_trials,
        max_trials=conf.max_trials,
        timeout=study_def.timeout,
        stale=stale,
        lock=lambda: study_lock(opened.storage, study_def.name),
        callbacks=[TrialPrinter(study_def, say, ran), TunedPlainBalancer(study_def)],
        poll_s=min(2.0, float(conf.heartbeat_interval or 2)),
    )


def launch_workers(study: optuna.Study, spec: StudySpec, study_def: ResolvedStudy, slots: Sequence[Slot],
                   conf: Settings, ran: list[int], say: Callable[[str], None], tracker: Any) -> str:  # fmt: skip
    """Run the trials in one worker process per slot (``--devices`` / ``--workers``); returns the status.

    The workers share this invocation's ``n_trials`` through a study-wide budget (``max_trials``); each
    gets the resolved spec in a private temporary file (the storage URL may hold a password)."""
    import os

    import yaml

    from wus_tune._study import workers as w
    from wus_tune.errors import ServiceLost

    budget, _ = w.trial_budget(study.get_trials(deepcopy=False), study_def.n_trials, conf.max_trials)
    child = dataclasses.replace(spec, name=study_def.name, storage=study_def.storage,
                                tracking_uri=study_def.tracking_uri or "none", n_trials=None, max_trials=budget)  # fmt: skip
    fd, path = tempfile.mkstemp(prefix="wus_tune_worker_", suffix=".yaml")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(child.to_dict(), f, sort_keys=False)
        codes, ids, interrupted = w.launch(slots, path, say=say)
    finally:
        os.unlink(path)
    mine = set(ids)
    ran += [t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker") in mine and t.state.is_finished()]
    if 3 in codes:
        raise ServiceLost("a worker lost the Optuna storage or the MLflow server (see its lines above); "
                          "everything recorded so far is kept: run the same command again to continue")  # fmt: skip
    for slot, code in zip(slots, codes):
        if code not in (0, 1, 130):
            say(f"worker {slot.label} " + (f"was killed by {w.signal_name(-code)}" if code < 0 else f"exited with status {code}"))
    done, _ = w.budget_used(study.get_trials(deepcopy=False))
    status, lost = w.launch_status(codes, interrupted=interrupted, budget_complete=budget is not None and done >= budget)
    if lost:
        tracker.log_parent(tags={"lost_workers": lost})
    return status
