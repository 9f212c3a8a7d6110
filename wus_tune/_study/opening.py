"""Opening a study: the Optuna study and its MLflow parent run, the first writes of an invocation.

A new study gets its objectives, base config, search space and spec as user attributes and its first
trials enqueued (:func:`wus_tune._study.spec.initial_trials`); a continued one is checked against them.
Workers starting at once: under the study lock, one creates the study, its parent run and the first
trials; the others find them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wus_tune.errors import UsageError

if TYPE_CHECKING:
    import optuna

    from wus_tune._study.spec import ResolvedStudy
    from wus_tune._study.workers import Settings

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # in the study's user attributes: where late workers log
JOINS_ATTR = "wus_tune_joins"  # in the study's user attributes: invocations so far (distinct sampler seeds)


@dataclass
class OpenStudy:
    """What :func:`open_study` opened: the Optuna study, its storage and the MLflow tracker."""

    study: optuna.Study
    storage: Any
    tracker: Any  # MlflowTracker or NullTracker
    trials_before: int  # trials the study had before this invocation


def open_study(*, study_def: ResolvedStudy, device: str, say: Callable[[str], None]) -> OpenStudy:
    """Open or create the Optuna study and its MLflow parent run (the first writes of an invocation)."""
    import optuna

    from wus_tune._study import workers as w
    from wus_tune._study.spec import make_sampler
    from wus_tune._study.storage import RetryPolicy, mask_url, open_storage, study_exists, study_lock

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
        joined = int(existing.user_attrs.get(JOINS_ATTR, 0)) if existing else 0  # distinct sampler seeds
        tracker = _open_tracker(study_def, existing, device, conf)
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
            _update_study(study, existing, study_def, say)
        _record_join(study, existing, study_def, tracker, joined)
    if tracker.enabled and existing is not None:  # runs left RUNNING by a worker that stopped unreachable
        tracker.sweep({t.number: t.state.name for t in study.get_trials(deepcopy=False)})
    say(
        f"study {study_def.name}: {'continuing with ' + str(n_before) + ' trials' if existing else 'new'}; "
        f"objectives {','.join(study_def.objectives)}; sampler {study_def.sampler}; storage {mask_url(study_def.storage)}"
        + (f"; MLflow {mask_url(study_def.tracking_uri)} (experiment {tracker.experiment_id})" if tracker.enabled else "")
    )
    return OpenStudy(study=study, storage=storage, tracker=tracker, trials_before=n_before)


def _open_tracker(study_def: ResolvedStudy, existing: optuna.Study | None, device: str, conf: Settings) -> Any:
    """The MLflow parent run (the one the study records, if any), or a tracker that records nothing."""
    from wus_tune._study.storage import RetryPolicy, mask_url
    from wus_tune._study.tracking import MlflowTracker, NullTracker

    if study_def.tracking_uri is None:
        return NullTracker()
    return MlflowTracker.open(
        study_def.tracking_uri,
        study_def.name,
        parent_run_id=existing.user_attrs.get(PARENT_RUN_ATTR) if existing else None,
        tags=_parent_tags(study_def, device),
        retry=RetryPolicy(f"MLflow tracking {mask_url(study_def.tracking_uri)}", conf.reconnect_timeout),
    )


def _update_study(study: optuna.Study, existing: optuna.Study, study_def: ResolvedStudy, say: Callable[[str], None]) -> None:
    """A continued study: the search space and spec its next trials use; a note if the base config moved."""
    import json

    if existing.user_attrs.get("base_config") != json.loads(json.dumps(study_def.base.to_dict())):
        say("note: the base config differs from the one this study started with; its baseline trials used that one")
    study.set_user_attr("search_space", study_def.space.to_json())  # the space the latest trials use
    study.set_user_attr("spec", study_def.spec)


def _record_join(study: optuna.Study, existing: optuna.Study | None, study_def: ResolvedStudy, tracker: Any,
                 joined: int) -> None:  # fmt: skip
    """Count this invocation; point the study at its MLflow parent run when that is new."""
    from wus_tune._study.storage import mask_url

    study.set_user_attr(JOINS_ATTR, joined + 1)
    if tracker.enabled and (existing is None or existing.user_attrs.get(PARENT_RUN_ATTR) != tracker.parent_run_id):
        study.set_user_attr(PARENT_RUN_ATTR, tracker.parent_run_id)
        study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
        study.set_user_attr("mlflow_tracking_uri", mask_url(study_def.tracking_uri))


def _check_compatible(study: optuna.Study, study_def: ResolvedStudy) -> None:
    stored = tuple(study.user_attrs.get("objectives") or ())
    if not stored:
        raise UsageError(f"study {study_def.name!r} exists but was not created by wus_tune.study; choose another --study-name")
    if stored != study_def.objectives:
        raise UsageError(
            f"study {study_def.name!r} was created with objectives {','.join(stored)}, not "
            f"{','.join(study_def.objectives)}; use the same --objectives or another --study-name"
        )
    from wus_tune._study.seeds import parse_seeds

    # means over another number of seeds, and baselines of seeds it never ran, would not compare
    seeds = parse_seeds((study.user_attrs.get("spec") or {}).get("seeds", 1))
    if seeds != study_def.seeds:
        raise UsageError(f"study {study_def.name!r} was created with seeds {seeds}, not {study_def.seeds}; use the same "
                         "seeds or another --study-name")  # fmt: skip


def _parent_tags(study_def: ResolvedStudy, device: str) -> dict[str, Any]:
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


def _init_study(study: optuna.Study, study_def: ResolvedStudy) -> None:
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
    from wus_tune._study.spec import initial_trials

    for role, fixed in initial_trials(study_def):
        params, overrides = study_def.space.split_fixed(fixed)
        study.enqueue_trial(params, user_attrs={"role": role, "overrides": overrides})
