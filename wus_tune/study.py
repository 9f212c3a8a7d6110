"""The study: ``python -m wus_tune.study --model vgg11`` searches WUS settings with Optuna, logs every
trial to MLflow, and exports the Pareto-best config for ``python -m wus_tune.train --config``.

What one invocation does:

1. validates everything (spec, options, search space, data, URLs) before writing anything;
2. opens or creates the Optuna study (``load_if_exists``: the same name continues the study) and, for a
   new study, enqueues the full-length baseline (no skipping), a plain WUS default and the baseline
   frontier (plain runs at 50/70/85% of the epochs);
3. runs ``n_trials`` more trials: each samples the search space, trains with :func:`wus_tune.fit`, logs
   to an MLflow child run, and returns (accuracy, time) or (accuracy, cost); a failing trial is FAIL in
   Optuna and FAILED in MLflow, and the study goes on;
4. analyses the study (:mod:`wus_tune.pareto`) and logs the Pareto plots, hypervolume history, trials
   CSV and ``best_config.yaml`` on the study's parent run.

Python API: :func:`run_study`. See ``docs/study.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wus_tune._cli import ArgumentParser, add_set_option, config_overrides, run_main
from wus_tune._study.spec import Study, StudySpec, make_sampler
from wus_tune._study.space import METHOD_KEY
from wus_tune.errors import DataError, UsageError, one_line

if TYPE_CHECKING:
    import optuna

    from wus_tune.config import TrainConfig
    from wus_tune.pareto import Analysis, Candidate
    from wus_tune.trainer import TrainResult

__all__ = ["StudyOutcome", "StudySpec", "main", "run_study"]

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # in the study's user attributes: where late workers log


@dataclass
class StudyOutcome:
    """What :func:`run_study` returns."""

    name: str
    storage: str  # password masked
    tracking_uri: str | None
    experiment_id: str | None
    parent_run_id: str | None
    status: str  # FINISHED, KILLED (Ctrl-C) or FAILED
    trials_run: list[int]  # numbers of the trials this invocation ran
    analysis: Analysis
    selected: Candidate | None
    best_config: TrainConfig | None
    report_dir: Path | None  # where the report was written locally (MLflow off), else None
    timing: dict[str, float] = field(default_factory=dict)  # mean fit / overhead / mlflow seconds per trial
    confirmation: Any = None  # a wus_tune.confirm.Confirmation when the spec asked for one (confirm: K)

    @property
    def best_config_uri(self) -> str | None:
        """``runs:/<parent>/best_config.yaml``: what :func:`wus_tune.production.load_config` reads."""
        return f"runs:/{self.parent_run_id}/best_config.yaml" if self.parent_run_id and self.best_config else None


def run_study(
    spec: StudySpec | str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    fit: Callable[..., TrainResult] | None = None,
    model: Any = None,
    data: Any = None,
    echo: Callable[[str], None] | None = print,
    report_dir: str | Path | None = None,
    devices: str | None = None,
    workers: int | None = None,
    workers_per_device: int | None = None,
    worker: bool = False,
    **options: Any,
) -> StudyOutcome:
    """Run (or continue) a study.

    ``spec``: a :class:`StudySpec`, a YAML path, or None for the defaults. ``options`` override spec
    fields (``n_trials=10, sampler="nsga2", tracking_uri="none"``); ``overrides`` are dotted base-config
    keys (``{"model.name": "vgg11", "epochs": 8}``). ``fit`` replaces :func:`wus_tune.fit` (tests,
    benchmarks); ``model`` and ``data``, when given, are passed to every ``fit(config, model=..., data=...)``
    (a user's own model or dataset; one worker process only). Raises :class:`UsageError` for bad input
    before anything is written.

    ``devices`` (``"0,1,2,3"`` or ``"cpu"``), ``workers``, ``workers_per_device``: run the trials in that
    many worker processes on this machine (see ``wus_tune._study.workers``); ``worker``: this process is
    one of them (no final report). ``ray="auto"`` (``"local"``, ``"HOST:PORT"``; a spec field, with
    ``gpus_per_trial`` / ``cpus_per_trial``): the trials run as Ray tasks (``wus_tune._study.ray_backend``),
    ``workers`` then caps how many at once. Raises :class:`~wus_tune.errors.ServiceLost` if the storage or
    the tracking server (or the Ray cluster) is lost mid-study for longer than ``reconnect_timeout``.

    ``model``: a factory ``f(input_shape, num_classes, **kwargs) -> nn.Module`` (called once per trial);
    ``data``: ``(x, y)`` tensors or a mapping of splits, as a data factory returns. They replace the spec's
    model and data sources; the configs record their import paths (``"<python>:<name>"`` for objects
    defined in a notebook or ``__main__``, which ``python -m wus_tune.train`` cannot rebuild).

    The steps, each a function of this module: :func:`resolve_study`, :func:`open_study`,
    :func:`run_trials`, :func:`analyse_study`, :func:`report_study`. An exception while the trials run
    reaches the caller as itself, after the report of what was recorded (a failure of that report is
    only a note then, never a replacement of the original error).
    """
    from wus_tune._study import workers as w
    from wus_tune._study.storage import redact
    from wus_tune.errors import ServiceLost

    say = (lambda text: echo(redact(text))) if echo else (lambda _: None)
    slots = w.plan_slots(devices, workers, workers_per_device)
    if (model is not None or data is not None) and len(slots) > 1:
        raise UsageError("run_study: model= and data= run in this process only; drop devices/workers")
    fit = _with_inputs(fit, model=model, data=data)
    spec, study_def, device = resolve_study(spec, options=options, overrides=overrides, slots=slots, fit=fit,
                                            report_dir=report_dir, worker=worker, say=say, model=model, data=data)  # fmt: skip
    ray = None
    if spec.ray is not None:  # Ray places the trials (wus_tune._study.ray_backend); an unreachable cluster: exit 2
        from wus_tune._study import ray_backend

        if model is not None or data is not None:
            raise UsageError("run_study: model= and data= run in this process only; drop ray")
        ray = ray_backend.connect(ray_backend.plan(spec, devices=devices, workers=workers, workers_per_device=workers_per_device))
        device = ray.plan.label()  # the trials' devices are Ray's to give
    opened = open_study(study_def=study_def, device=device, say=say)
    ran: list[int] = []
    status, error = "FINISHED", None
    try:
        status = run_trials(opened=opened, spec=spec, study_def=study_def, slots=slots, fit=fit, ran=ran, say=say, ray=ray)
    except KeyboardInterrupt:
        status = "KILLED"
        say("interrupted: the current trial is marked failed and re-queued; run the same command again to continue")
    except ServiceLost:
        raise  # nothing more can be written: no report
    except BaseException as e:
        status, error = "FAILED", e
    if error is None:
        outcome = report_study(opened=opened, study_def=study_def, status=status, ran=ran, say=say,
                               report_dir=report_dir, report=not worker)  # fmt: skip
        if study_def.confirm and not worker and status == "FINISHED" and outcome.selected is not None:
            outcome.confirmation = confirm_pick(opened.study, study_def, outcome, fit=fit, say=say)
        return outcome
    try:
        report_study(opened=opened, study_def=study_def, status=status, ran=ran, say=say, report_dir=report_dir,
                     report=not worker)  # fmt: skip
    except Exception as report_error:  # the trials' error is the one the user must see
        say(f"note: the report could not be written either ({one_line(report_error, with_type=True)})")
    raise error


def confirm_pick(study: optuna.Study, study_def: Study, outcome: StudyOutcome, *,
                 fit: Callable[..., TrainResult] | None, say: Callable[[str], None]) -> Any:
    """The spec's ``confirm: K``: re-run the pick, the baseline and the frontier point K times
    (:mod:`wus_tune.confirm`); logged under the parent run, written into a local report directory."""
    from wus_tune.confirm import confirm_study

    say("")
    try:
        return confirm_study(study, outcome.analysis, rule=study_def.select, repeats=study_def.confirm, fit=fit,
                             say=say, tracking_uri=study_def.tracking_uri, report_dir=outcome.report_dir)  # fmt: skip
    except UsageError as e:
        say(f"note: no confirmation: {e}")
        return None


def _with_inputs(fit: Callable[..., TrainResult] | None, *, model: Any, data: Any) -> Callable[..., TrainResult] | None:
    """``fit`` with the user's ``model``/``data`` bound (only those given), or ``fit`` itself."""
    if model is None and data is None:
        return fit
    if fit is None:
        from wus_tune.trainer import fit
    inputs = {k: v for k, v in (("model", model), ("data", data)) if v is not None}
    return functools.partial(fit, **inputs)


@dataclass
class OpenStudy:
    """What :func:`open_study` opened: the Optuna study, its storage and the MLflow tracker."""

    study: optuna.Study
    storage: Any
    tracker: Any  # MlflowTracker or NullTracker
    trials_before: int  # trials the study had before this invocation


def resolve_study(
    spec: StudySpec | str | Path | None,
    *,
    options: Mapping[str, Any],
    overrides: Mapping[str, Any] | None,
    slots: Sequence[Any],
    fit: Callable[..., TrainResult] | None,
    report_dir: str | Path | None,
    worker: bool,
    say: Callable[[str], None],
    model: Any = None,
    data: Any = None,
) -> tuple[StudySpec, Study, str]:
    """Every check before anything is written: the spec with ``options`` and ``overrides`` applied and
    resolved, the device and data loaded once, the URLs and the report directory. Returns the spec, the
    resolved study and the device it trains on."""
    import copy

    from wus_tune._study.spec import prepare_sections
    from wus_tune._study.storage import check_tracking_uri, default_journal

    if spec is None:
        spec = StudySpec(source="cli")
    elif not isinstance(spec, StudySpec):
        spec = StudySpec.load(spec)
    spec = dataclasses.replace(spec, train=copy.deepcopy(spec.train))
    try:
        spec = spec.replace(**options)
    except UsageError as e:
        raise UsageError(f"run_study: {e}") from None
    for key, value in (overrides or {}).items():
        spec.set_train(key, value)
    if spec.ray is not None:  # Ray places the trials (wus_tune._study.ray_backend); this process only drives
        spec.set_train("device", "cpu")  # the driver only checks the data; each trial gets the device Ray gives it
        slots = []
    if model is not None or data is not None:  # objects handed over: the configs record where they came from
        from wus_tune.plugins import source_entries

        for key, value in source_entries(spec.train, model=model, data=data).items():
            spec.set_train(key, value)
    if len(slots) == 1:  # one worker: this process, on that device
        spec.set_train("device", "cpu" if slots[0].device == "cpu" else f"cuda:{slots[0].device}")
    elif slots:
        spec.set_train("device", slots[0].train_device)  # what each worker gets (its GPU is its cuda:0)
    study_def = spec.resolve()
    if (len(slots) > 1 or spec.ray is not None) and study_def.default_storage:  # several writers: a Journal file, not SQLite
        study_def = dataclasses.replace(study_def, storage=default_journal(study_def.name))
    study_def = dataclasses.replace(study_def, spec=_public_spec(study_def.spec))
    device = _preflight(study_def, model=model, data=data)
    study_def = prepare_sections(spec, study_def, fit=fit, say=say)  # e.g. a growth rate "auto": one short run
    if study_def.tracking_uri is not None:
        check_tracking_uri(study_def.tracking_uri)
    elif not worker:  # the report goes to a local directory: find out now if it cannot
        from wus_tune._study.storage import check_writable, safe_name

        check_writable(Path(report_dir) if report_dir else Path("studies") / safe_name(study_def.name), "report directory")
    return spec, study_def, device


def open_study(*, study_def: Study, device: str, say: Callable[[str], None]) -> OpenStudy:
    """Open or create the Optuna study and its MLflow parent run (the first writes of an invocation).

    Workers starting at once: under the study lock, one creates the study, its parent run and the first
    trials; the others find them."""
    import json

    import optuna

    from wus_tune._study import workers as w
    from wus_tune._study.storage import RetryPolicy, mask_url, open_storage, study_exists, study_lock
    from wus_tune._study.tracking import MlflowTracker, NullTracker

    conf = w.settings(study_def)
    storage = open_storage(
        study_def.storage, create_dirs=study_def.default_storage,
        heartbeat_interval=conf.heartbeat_interval, grace_period=conf.grace_period,
        retry=RetryPolicy(f"Optuna storage {mask_url(study_def.storage)}", conf.reconnect_timeout),
    )  # fmt: skip
    with study_lock(storage, study_def.name):
        existing = None
        if study_exists(storage, study_def.name):
            existing = optuna.load_study(study_name=study_def.name, storage=storage)
            _check_compatible(existing, study_def)
        n_before = len(existing.trials) if existing else 0
        joined = int(existing.user_attrs.get("wus_tune_joins", 0)) if existing else 0  # distinct sampler seeds
        tracker: Any = NullTracker()
        if study_def.tracking_uri is not None:
            tracker = MlflowTracker.open(
                study_def.tracking_uri,
                study_def.name,
                parent_run_id=existing.user_attrs.get(PARENT_RUN_ATTR) if existing else None,
                tags=_parent_tags(study_def, device),
                retry=RetryPolicy(f"MLflow tracking {mask_url(study_def.tracking_uri)}", conf.reconnect_timeout),
            )
        study = optuna.create_study(
            storage=storage,
            sampler=make_sampler(study_def.sampler, study_def.sampler_options, seed=study_def.seed + n_before + joined),
            study_name=study_def.name,
            directions=study_def.directions,
            load_if_exists=True,
        )
        if existing is None:
            _init_study(study, study_def)
        else:
            if existing.user_attrs.get("base_config") != json.loads(json.dumps(study_def.base.to_dict())):
                say("note: the base config differs from the one this study started with; its baseline trials used that one")
            study.set_user_attr("search_space", study_def.space.to_json())  # the space the latest trials use
            study.set_user_attr("spec", study_def.spec)
        study.set_user_attr("wus_tune_joins", joined + 1)
        if tracker.enabled and (existing is None or existing.user_attrs.get(PARENT_RUN_ATTR) != tracker.parent_run_id):
            study.set_user_attr(PARENT_RUN_ATTR, tracker.parent_run_id)
            study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
            study.set_user_attr("mlflow_tracking_uri", mask_url(study_def.tracking_uri))
    if tracker.enabled and existing is not None:  # runs left RUNNING by a worker that stopped unreachable
        tracker.sweep({t.number: t.state.name for t in study.get_trials(deepcopy=False)})
    say(
        f"study {study_def.name}: {'continuing with ' + str(n_before) + ' trials' if existing else 'new'}; "
        f"objectives {','.join(study_def.objectives)}; sampler {study_def.sampler}; storage {mask_url(study_def.storage)}"
        + (f"; MLflow {mask_url(study_def.tracking_uri)} (experiment {tracker.experiment_id})" if tracker.enabled else "")
    )
    return OpenStudy(study=study, storage=storage, tracker=tracker, trials_before=n_before)


def run_trials(
    *,
    opened: OpenStudy,
    spec: StudySpec,
    study_def: Study,
    slots: Sequence[Any],
    fit: Callable[..., TrainResult] | None,
    ran: list[int],
    say: Callable[[str], None],
    ray: Any = None,
) -> str:
    """Run this invocation's trials, in this process, in one worker process per slot, or as Ray tasks
    (``ray``: the :class:`~wus_tune._study.ray_backend.RaySession` of ``--ray``); ``ran`` collects the
    numbers of the trials that finished. Returns the status (FINISHED, KILLED or FAILED)."""
    from wus_tune._study import workers as w
    from wus_tune._study.objective import Objective
    from wus_tune._study.storage import study_lock
    from wus_tune._study.yardstick import TunedPlainBalancer

    conf = w.settings(study_def)
    if ray is not None:
        from wus_tune._study import ray_backend

        return ray_backend.run(opened.study, spec, study_def, conf, opened.tracker, ray, fit=fit,
                               on_trial=_TrialPrinter(study_def, say, ran), say=say)  # fmt: skip
    if len(slots) > 1:
        return _launch(opened.study, spec, study_def, slots, conf, ran, say, opened.tracker)
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
        callbacks=[_TrialPrinter(study_def, say, ran), TunedPlainBalancer(study_def)],
        poll_s=min(2.0, float(conf.heartbeat_interval or 2)),
    )
    return "FINISHED"


def _public_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as stored in the study's user attributes: URL passwords masked."""
    from wus_tune._study.storage import mask_url

    out = dict(spec)
    for key in ("storage", "tracking_uri"):
        if isinstance(out.get(key), str):
            out[key] = mask_url(out[key])
    return out


def _launch(study: optuna.Study, spec: StudySpec, study_def: Study, slots: Sequence[Any], conf: Any,
            ran: list[int], say: Callable[[str], None], tracker: Any) -> str:  # fmt: skip
    """Run the trials in one worker process per slot (``--devices`` / ``--workers``); returns the status.

    The workers share this invocation's ``n_trials`` through a study-wide budget (``max_trials``); each
    gets the resolved spec in a private temporary file (the storage URL may hold a password)."""
    import os

    import yaml

    from wus_tune._study import workers as w
    from wus_tune.errors import ServiceLost

    finished, running = w.budget_used(study.get_trials(deepcopy=False))
    budget = None if study_def.n_trials is None else finished + running + study_def.n_trials
    if conf.max_trials is not None:
        budget = conf.max_trials if budget is None else min(budget, conf.max_trials)
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


# ---- steps ---------------------------------------------------------------------------------------------


def _preflight(study_def: Study, *, model: Any = None, data: Any = None) -> str:
    """Check the device, load the data once (decoded and cached for the trials) and build the model once:
    a bad factory, bad data or a compared method that cannot act on the built model (``check_module``) is
    one line before any trial. Returns the device."""
    from wus_tune._study.catalog import check_method_module
    from wus_tune.plugins import prepare
    from wus_tune.trainer import resolve_device

    device = resolve_device(study_def.base.device)
    try:
        _, net = prepare(study_def.base, model=model, data=data)  # the one path fit takes
    except DataError as e:
        hint = "" if ("--dataset digits" in str(e) or study_def.base.data.factory or data is not None) else (
            "; point --data-dir at the data, or use --dataset digits")  # fmt: skip
        raise DataError(f"{e}{hint}") from None
    check_method_module(study_def.methods, study_def.base, net)
    del net
    return str(device)


def _check_compatible(study: optuna.Study, study_def: Study) -> None:
    stored = tuple(study.user_attrs.get("objectives") or ())
    if not stored:
        raise UsageError(f"study {study_def.name!r} exists but was not created by wus_tune.study; choose another --study-name")
    if stored != study_def.objectives:
        raise UsageError(
            f"study {study_def.name!r} was created with objectives {','.join(stored)}, not "
            f"{','.join(study_def.objectives)}; use the same --objectives or another --study-name"
        )


def _parent_tags(study_def: Study, device: str) -> dict[str, Any]:
    import json

    import torch

    from wus_tune import __version__
    from wus_tune._study.storage import mask_url

    return {
        "optuna.study_name": study_def.name,
        "optuna.storage": mask_url(study_def.storage),
        "objectives": ",".join(study_def.objectives),
        "directions": ",".join(study_def.directions),
        "sampler": study_def.sampler,
        "sampler_options": json.dumps(study_def.sampler_options, sort_keys=True),
        "seed": study_def.seed,
        "search_space": study_def.space.to_json(),
        "constraint": "none" if study_def.constraint_delta is None else f"accuracy >= baseline - {study_def.constraint_delta:g} points",
        "model": study_def.base.model.name,
        "dataset": study_def.base.data.name,
        "epochs": study_def.base.epochs,
        "device": device,
        "torch_version": torch.__version__,
        "wus_tune.version": __version__,
    }


def initial_trials(study_def: Study) -> list[tuple[str, dict[str, Any]]]:
    """(role, fixed values) of the trials a new study runs first: the full-length baseline (method
    ``none``), the first compared method's default trial (role ``<method>-default``, e.g. ``wus-default``),
    the baseline frontier (``baseline_fractions`` of the epochs; crossed with every ``schedule.name``
    choice when the schedule is searched), the other compared methods' default trials and those a
    method's spec section adds (the edge-of-chaos guideline's, ``study_def.method_trials``), more
    baselines (``baseline_repeats``), then the spec's ``enqueue`` entries.

    Every searched knob of these trials is fixed at the base config's value, so "baseline" and the
    methods' defaults mean the spec's own recipe, not a sampled one.
    """
    base, space = study_def.base, study_def.space
    epochs = base.epochs
    plain = space.fixed_at_base(base, {METHOD_KEY: "none"})
    out: list[tuple[str, dict[str, Any]]] = [("baseline", plain | {"epochs": epochs})]
    out += [(role, dict(values)) for role, values in study_def.lead_trials]
    budgets = sorted({max(1, round(f * epochs)) for f in study_def.baseline_fractions} - {epochs}, reverse=True)
    schedules = [base.schedule.name]
    if "schedule.name" in space and space["schedule.name"].type == "categorical":
        schedules += [s for s in space["schedule.name"].choices if s != base.schedule.name]
    for schedule in schedules:
        for n in ([] if schedule == base.schedule.name else [epochs]) + budgets:
            out.append(("baseline-frontier", plain | {"epochs": n, "schedule.name": schedule}))
    out += [(role, dict(values)) for role, values in study_def.method_trials]
    # More baselines, with other seeds, measured later in the study: its accuracy and time are medians.
    out += [("baseline", plain | {"epochs": epochs, "seed": base.seed + k})
            for k in range(1, getattr(study_def, "baseline_repeats", 1))]  # fmt: skip
    out += [("enqueued", dict(e)) for e in study_def.enqueue]
    return out


def _init_study(study: optuna.Study, study_def: Study) -> None:
    import optuna

    from wus_tune import __version__

    study.set_user_attr("objectives", list(study_def.objectives))
    import warnings

    with warnings.catch_warnings():  # experimental since Optuna 3.2, unchanged since
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(study_def.objectives))  # optuna-dashboard shows "accuracy", "relative_time"
    study.set_user_attr("base_config", study_def.base.to_dict())
    study.set_user_attr("search_space", study_def.space.to_json())
    study.set_user_attr("spec", study_def.spec)
    study.set_user_attr("wus_tune_version", __version__)
    for role, fixed in initial_trials(study_def):
        params, overrides = study_def.space.split_fixed(fixed)
        study.enqueue_trial(params, user_attrs={"role": role, "overrides": overrides})


class _TrialPrinter:
    """Optuna callback: one line per finished trial."""

    def __init__(self, study_def: Study, say: Callable[[str], None], ran: list[int]) -> None:
        from wus_tune._study.report import step_mix

        self.study_def, self.say, self.ran, self.step_mix = study_def, say, ran, step_mix
        self.baseline: tuple[float, ...] | None = None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.ran.append(trial.number)
        a = trial.user_attrs
        label = a.get("variant", "?")  # what the trial ran: none, wus+lr, approx_ops+wus
        head = f"trial {trial.number:>3} {trial.state.name:<8} {a.get('role', 'search'):<17} {label:<6}"
        if trial.values is None:
            self.say(f"{head} {a.get('fail_reason') or (a.get('pruned') or {}).get('reason', '')}")
            return
        if a.get("role") == "baseline" or self.baseline is None:  # the pooled median, as the report's table
            from wus_tune._study.objective import baseline_values

            self.baseline = baseline_values(study)
        acc, cost = trial.values[0], trial.values[1]
        name = self.study_def.objectives[1]
        text = f"{head} acc {acc:.2%}  {name} {cost:.2f}{'s' if name == 'time' else ''}"
        if self.baseline is not None and cost > 0:
            text += f"  {self.baseline[1] / cost:.2f}x {100 * (acc - self.baseline[0]):+.2f} pts vs baseline"
        res = a.get("result") or {}
        if mix := self.step_mix(res):
            text += f"  steps {mix}"
        for name, value in zip(self.study_def.objectives[2:], trial.values[2:]):
            if name in ("sparsity", "params"):
                text += f"  {name} {value:.1%}" if name == "sparsity" else f"  {name} {value:,.0f}"
        if any(v > 0 for v in trial.constraints.values()):
            text += "  (infeasible)"
        if a.get("reused"):
            text += f"  (reused: {a['reused']}, not trained)"
        elif a.get("forked"):
            text += f"  (forked from trial {a['forked']['trial']} at check {a['forked']['point']})"
        text += f"  [overhead {res.get('overhead_s', 0.0):.2f}s]"
        self.say(text)


def analyse_study(*, study: optuna.Study, study_def: Study, say: Callable[[str], None]) -> tuple[Analysis, Candidate | None, Any]:
    """The study's analysis from its stored trials (feasibility recomputed against the baseline), the
    trial the spec's ``select`` rule picks (None while nothing completed) and the rule used (the knee when
    the spec's rule matches no trial)."""
    from wus_tune.pareto import analyse, load_candidates

    analysis = analyse(
        load_candidates(study), study_def.objectives,
        accuracy_margin=study_def.accuracy_margin, cost_factor=study_def.cost_factor,
        constraint_delta=study_def.constraint_delta,
    )  # fmt: skip
    selected, rule = None, study_def.select
    if analysis.complete:
        try:
            selected = analysis.select(rule)
        except UsageError as e:
            say(f"note: {e}; exporting the knee instead")
            rule = "knee"
            selected = analysis.select(rule)
    return analysis, selected, rule


def report_study(
    *,
    opened: OpenStudy,
    study_def: Study,
    status: str,
    ran: list[int],
    say: Callable[[str], None],
    report_dir: str | Path | None,
    report: bool = True,
) -> StudyOutcome:
    """Analyse, write the report (to MLflow, or locally), tag the Pareto-optimal child runs, print the
    summary.

    ``report=False`` (a worker started by ``--devices``/``--workers``): the analysis only; the launcher
    writes the report. The parent run is ended only when no other worker is running a trial."""
    from wus_tune._study.storage import safe_name

    tracker = opened.tracker
    analysis, selected, rule = analyse_study(study=opened.study, study_def=study_def, say=say)
    best = None
    local = Path(report_dir) if report_dir else (None if tracker.enabled else Path("studies") / safe_name(study_def.name))
    if not report:
        local = None
    else:
        best = _write_report(analysis=analysis, selected=selected, rule=rule, study_def=study_def, tracker=tracker, local=local)
    if report and not any(c.state == "RUNNING" for c in analysis.candidates):
        tracker.end(status)  # else another worker is still logging under the parent run; the last one ends it
    mine = [analysis.by_number(n) for n in ran if any(c.number == n for c in analysis.candidates)]
    timing = _timing(mine)
    _print_summary(analysis=analysis, selected=selected, rule=rule, best=best, study_def=study_def, tracker=tracker,
                   ran=ran, timing=timing, local=local, table=report, say=say)  # fmt: skip
    if report and not study_def.reuse.keep_checkpoints:
        from wus_tune._study.reuse import remove_checkpoints

        freed = remove_checkpoints(study_def.reuse, study_def.name)
        if freed:
            say(f"reuse: removed the baseline's snapshots ({freed / 1e6:.1f} MB)")
    from wus_tune._study.storage import mask_url

    return StudyOutcome(
        name=study_def.name,
        storage=mask_url(study_def.storage),
        tracking_uri=mask_url(study_def.tracking_uri),
        experiment_id=tracker.experiment_id,
        parent_run_id=tracker.parent_run_id,
        status=status,
        trials_run=ran,
        analysis=analysis,
        selected=selected,
        best_config=best,
        report_dir=local,
        timing=timing,
    )


def _write_report(*, analysis: Analysis, selected: Candidate | None, rule: Any, study_def: Study, tracker: Any,
                  local: Path | None) -> TrainConfig | None:  # fmt: skip
    """Plots, tables, ``best_config.yaml``, the search space and base config: into ``local``, or into a
    temporary directory logged on the MLflow parent run. Returns the exported config (None if none)."""
    from wus_tune._study.report import write_report
    from wus_tune.pareto import export_config

    best = None
    with tempfile.TemporaryDirectory(prefix="wus_tune_report_") as tmp:
        out = local or Path(tmp)
        write_report(analysis, out, study_name=study_def.name, selected=selected.number if selected else None)
        if selected is not None:
            best = export_config(selected, str(out / "best_config.yaml"), study_name=study_def.name, rule=rule)
        (out / "search_space.json").write_text(study_def.space.to_json() + "\n")
        study_def.base.save(out / "base_config.yaml")
        if tracker.enabled:
            _log_summary(tracker, analysis, selected, rule, out)
    return best


def _print_summary(*, analysis: Analysis, selected: Candidate | None, rule: Any, best: TrainConfig | None,
                   study_def: Study, tracker: Any, ran: list[int], timing: dict[str, float], local: Path | None,
                   table: bool, say: Callable[[str], None]) -> None:  # fmt: skip
    from wus_tune._study.storage import mask_url
    from wus_tune.pareto import format_table

    shown = [c.number for c in analysis.complete]
    if len(shown) > 25:
        shown = sorted(set(analysis.front) | {c.number for c in analysis.complete if not c.uses_method})
    if table:
        say("")
        say(format_table(analysis, shown, mark=selected.number if selected else None))
    failed = sum(1 for c in analysis.candidates if c.state == "FAIL")
    pruned = sum(1 for c in analysis.candidates if c.state == "PRUNED")
    done = f"{len(analysis.complete)} completed ({len(ran)} this run), {failed} failed" + (f", {pruned} pruned" if pruned else "")
    say(
        f"{done}, {len(analysis.front)} on the Pareto front (*); hypervolume {analysis.hv_history[-1][1]:.4g}"
        if analysis.hv_history else done
    )  # fmt: skip
    from wus_tune._study.reuse import summary_lines

    for line in summary_lines(analysis.candidates):
        say(line)
    if timing:
        say(f"per trial: training {timing['fit_s']:.2f}s, study machinery {timing['overhead_s']:.3f}s "
            f"(of which MLflow {timing['mlflow_s']:.3f}s)")  # fmt: skip
    if selected is not None:
        test = (selected.attrs.get("result") or {}).get("test_acc")
        say(f"selected by {rule}: trial {selected.number} (<)"
            + (f"; validation {selected.values[0]:.2%}, held-out test {test:.2%} (reported only, never used to select)"
               if test is not None else ""))  # fmt: skip
    from wus_tune._study.yardstick import compare, summary_lines

    for line in summary_lines(compare(analysis), analysis.objectives[1]):
        say(line)
    refs = [r for c in analysis.complete if (r := (c.attrs.get("result") or {}).get("reference_time_s"))]
    if len(refs) > 1:
        import statistics

        say(f"one full-length baseline run, priced in each of {len(refs)} trials: median {statistics.median(refs):.2f}s "
            f"(min {min(refs):.2f}s, max {max(refs):.2f}s): the unit of relative_time")  # fmt: skip
    if tracker.enabled:
        say(f"MLflow: {mask_url(study_def.tracking_uri)}, experiment {study_def.name!r}, parent run {tracker.parent_run_id}"
            + (f"; best config: runs:/{tracker.parent_run_id}/best_config.yaml" if best else ""))  # fmt: skip
        say(f"browse: {ui_hint(study_def.tracking_uri, tracker.experiment_id)}")
    if local is not None:
        say(f"report: {local}/")


def ui_hint(tracking_uri: str, experiment_id: str) -> str:
    """How to open the study's runs table. MLflow 3.17's UI picks its view from a global GenAI/ML
    switch (remembered per browser, or the ``workflowType`` URL parameter), not from the experiment's
    ``mlflow.experimentKind`` tag, so the link carries the parameter."""
    from wus_tune._study.storage import mask_url

    page = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{mask_url(tracking_uri).rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {mask_url(tracking_uri)}  then  http://127.0.0.1:5000/{page}"


def _log_summary(tracker: Any, analysis: Analysis, selected: Candidate | None, rule: Any, out: Path) -> None:
    from wus_tune._study.report import relative

    tracker.log_artifacts(out)
    metrics = {"n_complete": len(analysis.complete), "pareto_size": len(analysis.front),
               "n_failed": sum(1 for c in analysis.candidates if c.state == "FAIL")}  # fmt: skip
    if analysis.baseline is not None:
        metrics["baseline_accuracy"] = analysis.baseline.values[0]
        metrics[f"baseline_{analysis.objectives[1]}"] = analysis.baseline.values[1]
    tags: dict[str, Any] = {"select_rule": str(rule)}
    if selected is not None:
        metrics["selected_trial"] = selected.number
        metrics["selected_accuracy"] = selected.values[0]
        metrics[f"selected_{analysis.objectives[1]}"] = selected.values[1]
        tags["selected_trial"] = selected.number
        tags["best_config_uri"] = f"runs:/{tracker.parent_run_id}/best_config.yaml"
    tracker.log_parent(metrics=metrics, history={"hypervolume": analysis.hv_history}, tags=tags)
    front = set(analysis.front)
    child_tags, child_metrics = {}, {}
    for c in analysis.candidates:
        run_id = c.attrs.get("mlflow_run_id")
        if not run_id or not c.ok:
            continue
        child_tags[run_id] = {"pareto_optimal": "true" if c.number in front else "false"}
        r = relative(analysis, c)
        child_metrics[run_id] = {f"vs_baseline/{k}" if k in ("acc_delta_pts", "speedup") else f"vs_frontier/{k.removeprefix('frontier_')}": v
                                 for k, v in r.items() if v is not None}  # fmt: skip
    tracker.tag_children(child_tags, child_metrics)


def _timing(cands: Sequence[Candidate]) -> dict[str, float]:
    rows = [t for c in cands if "overhead_s" in (t := c.attrs.get("result") or c.attrs.get("timing") or {})]
    if not rows:
        return {}
    return {k: sum(float(r.get(k, 0.0)) for r in rows) / len(rows) for k in ("fit_s", "overhead_s", "mlflow_s")}


# ---- CLI -----------------------------------------------------------------------------------------------

_TRAIN_OPTIONS = {"model": "model.name", "dataset": "data.name", "data_dir": "data.data_dir", "epochs": "epochs", "device": "device"}
_SPEC_OPTIONS = ("n_trials", "timeout", "storage", "tracking_uri", "sampler", "objectives", "constraint_delta", "select", "pruner",
                 "max_trials", "heartbeat_interval", "grace_period", "max_retry", "reconnect_timeout",
                 "ray", "gpus_per_trial", "cpus_per_trial")  # fmt: skip
_WORKER_OPTIONS = ("devices", "workers", "workers_per_device", "worker")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m wus_tune.study",
        description="Search weight-update-skipping settings with Optuna; every trial in MLflow; export the Pareto-best config.",
    )
    p.add_argument("--list", action="store_true", help="list the registered models, datasets and methods, then exit")
    p.add_argument("--spec", help="a study spec (YAML), e.g. studies/vgg11-cifar10.yaml; options below override it")
    p.add_argument("--model", help="alexnet | vgg11 | vgg16 | resnet18 | mlp | a plugin (--list) | an import path pkg.mod:build")
    p.add_argument("--dataset", help="cifar10 (default) | cifar100 | digits | imagefolder | a plugin | pkg.mod:load")
    p.add_argument("--data-dir", help="local dataset: torchvision's CIFAR folder, an ImageFolder directory or .tar.gz")
    p.add_argument("--epochs", type=int, help="full-length epoch budget (the baseline's)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    add_set_option(p, what="base-config key")
    p.add_argument("--n-trials", type=int, help="trials to run in this invocation (default 20)")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--study-name", help="study name = MLflow experiment (default <model>-<dataset>); reuse it to continue")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///studies/<study>.db)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlruns/mlflow.db; 'none' turns MLflow off)")
    p.add_argument("--sampler", help="tpe (default) | nsga2 | gp")
    p.add_argument("--objectives", help="accuracy,relative_time (default: time in baseline runs, priced per trial) | accuracy,time (wall s) | "
                   "accuracy,cost (FLOPs) | two of them; a last sparsity or params adds that")
    p.add_argument("--methods", help="the methods compared, comma-separated; a+b runs two in one trial; 'none' the plain "
                   "recipe (default: those a spec compares by default; --list names them; docs/study.md)")
    p.add_argument("--seed", type=int, help="sampler seed and training seed (default 0)")
    p.add_argument("--constraint-delta", type=float, help="feasible only if accuracy >= baseline - DELTA points")
    p.add_argument("--select", help="rule for best_config.yaml: knee | fastest-within:D | most-accurate-under:S")
    p.add_argument("--pruner", help="none (default) | pareto: stop trials that cannot reach the front (docs/study.md)")
    scale = p.add_argument_group("scale out (docs/study.md, 'Scale out')")
    scale.add_argument("--devices", help="one worker process per GPU (0,1,2,3; own CUDA_VISIBLE_DEVICES), or cpu")
    scale.add_argument("--workers-per-device", type=int, help="worker processes per GPU (small trials on a large GPU)")
    scale.add_argument("--workers", type=int, help="worker processes in all (with --devices cpu: torch threads = cores / N)")
    scale.add_argument("--max-trials", type=int, help="study-wide budget shared by every worker on every machine")
    scale.add_argument("--heartbeat-interval", type=int, help="seconds between a running trial's heartbeats (default 30)")
    scale.add_argument("--grace-period", type=int, help="seconds without one before a trial is re-queued (default 3 x interval)")
    scale.add_argument("--max-retry", type=int, help="times a stale or interrupted trial is re-queued (default 2)")
    scale.add_argument("--reconnect-timeout", type=float,
                       help="seconds a lost storage or MLflow server is retried before the worker stops (default 120)")  # fmt: skip
    scale.add_argument("--worker", action="store_true", help="run as one of several workers: no final report")
    scale.add_argument("--ray", metavar="ADDRESS", help="run the trials on a Ray cluster: auto | local | HOST:PORT (--workers N: at most N at once)")
    scale.add_argument("--gpus-per-trial", type=float, help="with --ray: GPUs per trial; 0.25 puts four trials on one GPU (default 0)")
    scale.add_argument("--cpus-per-trial", type=float, help="with --ray: CPUs per trial (default 1)")
    return p


def spec_from_args(args: Any) -> StudySpec:
    spec = StudySpec.load(args.spec) if args.spec else StudySpec(source="cli")
    changes = {k: getattr(args, k) for k in _SPEC_OPTIONS if getattr(args, k) is not None}
    if args.study_name is not None:
        if not args.study_name.strip():
            raise UsageError("--study-name: expected a name, got an empty string")
        changes["name"] = args.study_name
    if args.seed is not None:
        changes["seed"] = args.seed
        spec.set_train("seed", args.seed)
    if args.methods is not None:
        changes["methods"] = [m.strip() for m in args.methods.split(",")]
    spec = dataclasses.replace(spec, **changes)
    for opt, key in _TRAIN_OPTIONS.items():
        if getattr(args, opt) is not None:
            spec.set_train(key, getattr(args, opt))
    for key, value in config_overrides(args.set, getattr(args, "dotted", ())).items():
        spec.set_train(key, value)
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit status (0 ok, 1 no trial completed, 2 bad input, 3 storage or tracking
    server lost mid-study, 130 interrupted)."""
    import os

    args, dotted = build_parser().parse_known_args(argv)
    args.dotted = dotted  # --KEY VALUE: a base-config key, as in python -m wus_tune.train
    if args.list:
        from wus_tune.plugins import describe

        print("\n".join(describe()))
        return 0
    spec = spec_from_args(args)
    # Our per-trial lines replace Optuna's (its failed-trial warning carries a full traceback; the
    # reason is in our line and the traceback in the run's error.txt). MLflow's INFO lines are noise.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    from wus_tune._study.storage import redact
    from wus_tune.errors import ServiceLost

    try:
        outcome = run_study(spec, **{k: getattr(args, k) for k in _WORKER_OPTIONS})
    except ServiceLost as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 3
    if outcome.status == "KILLED":
        return 130
    if outcome.trials_run and not any(outcome.analysis.by_number(n).ok or outcome.analysis.by_number(n).state == "PRUNED"
                                      for n in outcome.trials_run):  # fmt: skip
        print("error: no trial of this run completed (see the failure reasons above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
