"""``run_study``: a study as five steps, each a function with keyword arguments: :func:`resolve_study`
(every check, nothing written), :func:`~wus_tune._study.opening.open_study` (the Optuna study and the
MLflow parent run), :func:`~wus_tune._study.launch.run_trials` (here, in worker processes or on Ray),
:func:`analyse_study` (front, hypervolume, feasibility from the stored values) and :func:`report_study`
(plots, tables, ``best_config.yaml``, the summary). Public as :func:`wus_tune.study.run_study`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wus_tune._study.launch import connect_ray, run_trials
from wus_tune._study.opening import OpenStudy, open_study
from wus_tune._study.spec import ResolvedStudy, StudySpec
from wus_tune._study.summary import mean_timing, print_summary, write_study_report
from wus_tune.errors import DataError, UsageError, one_line

if TYPE_CHECKING:
    import optuna

    from wus_tune._study.front import Analysis, Candidate
    from wus_tune._study.workers import Slot
    from wus_tune.config import TrainConfig
    from wus_tune.trainer import TrainResult

__all__ = ["StudyOutcome", "analyse_study", "open_study", "report_study", "resolve_study", "run_study", "run_trials"]


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

    The steps: :func:`resolve_study`, :func:`~wus_tune._study.opening.open_study`,
    :func:`~wus_tune._study.launch.run_trials`, :func:`analyse_study`, :func:`report_study`. An exception
    while the trials run reaches the caller as itself, after the report of what was recorded (a failure of
    that report is only a note then, never a replacement of the original error).
    """
    from wus_tune._study import workers as w
    from wus_tune._study.storage import redact

    say = (lambda text: echo(redact(text))) if echo else (lambda _: None)
    own_inputs = model is not None or data is not None
    slots = w.plan_slots(devices, workers, workers_per_device)
    if own_inputs and len(slots) > 1:
        raise UsageError("run_study: model= and data= run in this process only; drop devices/workers")
    fit = _with_inputs(fit, model=model, data=data)
    spec, study_def, device = resolve_study(spec, options=options, overrides=overrides, slots=slots, fit=fit,
                                            report_dir=report_dir, worker=worker, say=say, model=model, data=data)  # fmt: skip
    ray = connect_ray(spec, devices=devices, workers=workers, workers_per_device=workers_per_device, own_inputs=own_inputs)
    if ray is not None:
        device = ray.plan.label()  # the trials' devices are Ray's to give
    opened = open_study(study_def=study_def, device=device, say=say)
    ran: list[int] = []
    status, error = _trials_status(lambda: run_trials(opened=opened, spec=spec, study_def=study_def, slots=slots, fit=fit,
                                                      ran=ran, say=say, ray=ray), say=say)  # fmt: skip
    report = functools.partial(report_study, opened=opened, study_def=study_def, status=status, ran=ran, say=say,
                               report_dir=report_dir, report=not worker)  # fmt: skip
    if error is not None:
        _report_then_raise(report, error, say=say)
    outcome = report()
    if study_def.confirm and not worker and status == "FINISHED" and outcome.selected is not None:
        outcome.confirmation = confirm_pick(opened.study, study_def, outcome, fit=fit, say=say)
    return outcome


def _trials_status(run: Callable[[], str], *, say: Callable[[str], None]) -> tuple[str, BaseException | None]:
    """Run the trials: (the status, the error to raise once what was recorded is reported). A lost storage
    or tracking server is raised at once: nothing more can be written, so no report."""
    from wus_tune.errors import ServiceLost

    try:
        return run(), None
    except KeyboardInterrupt:
        say("interrupted: the current trial is marked failed and re-queued; run the same command again to continue")
        return "KILLED", None
    except ServiceLost:
        raise
    except BaseException as e:
        return "FAILED", e


def _report_then_raise(report: Callable[[], StudyOutcome], error: BaseException, *, say: Callable[[str], None]) -> None:
    """Report what was recorded, then raise the trials' error as itself (a failing report is only a note)."""
    try:
        report()
    except Exception as report_error:  # the trials' error is the one the user must see
        say(f"note: the report could not be written either ({one_line(report_error, with_type=True)})")
    raise error


def confirm_pick(study: optuna.Study, study_def: ResolvedStudy, outcome: StudyOutcome, *,
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


def resolve_study(
    spec: StudySpec | str | Path | None,
    *,
    options: Mapping[str, Any],
    overrides: Mapping[str, Any] | None,
    slots: Sequence[Slot],
    fit: Callable[..., TrainResult] | None,
    report_dir: str | Path | None,
    worker: bool,
    say: Callable[[str], None],
    model: Any = None,
    data: Any = None,
) -> tuple[StudySpec, ResolvedStudy, str]:
    """Every check before anything is written: the spec with ``options`` and ``overrides`` applied and
    resolved, the device and data loaded once, the URLs and the report directory. Returns the spec, the
    resolved study and the device it trains on."""
    from wus_tune._study.spec import prepare_sections
    from wus_tune._study.storage import check_tracking_uri, default_journal

    spec = _applied(spec, options=options, overrides=overrides, slots=slots, model=model, data=data)
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


def _applied(spec: StudySpec | str | Path | None, *, options: Mapping[str, Any], overrides: Mapping[str, Any] | None,
             slots: Sequence[Slot], model: Any, data: Any) -> StudySpec:  # fmt: skip
    """A copy of the spec (loaded if a path; the defaults if None) with ``options``, ``overrides``, where
    ``model``/``data`` came from, and the device the slots (or Ray) give each trial."""
    import copy

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
    return spec


def _public_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as stored in the study's user attributes: URL passwords masked."""
    from wus_tune._study.storage import mask_url

    out = dict(spec)
    for key in ("storage", "tracking_uri"):
        if isinstance(out.get(key), str):
            out[key] = mask_url(out[key])
    return out


def _preflight(study_def: ResolvedStudy, *, model: Any = None, data: Any = None) -> str:
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


def analyse_study(*, study: optuna.Study, study_def: ResolvedStudy, say: Callable[[str], None]) -> tuple[Analysis, Candidate | None, Any]:
    """The study's analysis from its stored trials (feasibility recomputed against the baseline), the
    trial the spec's ``select`` rule picks (None while nothing completed) and the rule used (the knee when
    the spec's rule matches no trial)."""
    from wus_tune._study.candidates import load_candidates
    from wus_tune._study.front import analyse

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
    study_def: ResolvedStudy,
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
        best = write_study_report(analysis=analysis, selected=selected, rule=rule, study_def=study_def, tracker=tracker, local=local)
    if report and not any(c.state == "RUNNING" for c in analysis.candidates):
        tracker.end(status)  # else another worker is still logging under the parent run; the last one ends it
    mine = [analysis.by_number(n) for n in ran if any(c.number == n for c in analysis.candidates)]
    timing = mean_timing(mine)
    print_summary(analysis=analysis, selected=selected, rule=rule, best=best, study_def=study_def, tracker=tracker,
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
