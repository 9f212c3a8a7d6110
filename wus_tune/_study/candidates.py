"""A study's stored trials as :class:`~wus_tune._study.front.Candidate` records, their analysis, and the
export of one trial's config: the step between the Optuna storage and the front maths.

What each trial stores is written by :mod:`wus_tune._study.objective`; the maths that reads it is in
:mod:`wus_tune._study.front`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wus_tune._study.front import Analysis, Candidate, Rule, analyse
from wus_tune.errors import UsageError

if TYPE_CHECKING:
    import optuna

__all__ = ["candidate_from_trial", "export_config", "load_analysis", "load_candidates", "study_objectives"]


def candidate_from_trial(trial: optuna.trial.FrozenTrial) -> Candidate:
    """Read the attributes :mod:`wus_tune._study.objective` stores on each trial."""
    attrs = dict(trial.user_attrs)
    config = attrs.get("config")
    if "method" in attrs:  # a study comparing methods: "none" is the plain recipe
        uses_method = attrs["method"] != "none"
    elif "variant" in attrs:  # the study's record of what ran: "none" is the plain recipe
        uses_method = attrs["variant"] != "none"
    else:
        uses_method = attrs.get("role") not in ("baseline", "baseline-frontier")
    return Candidate(
        number=trial.number,
        state=trial.state.name,
        values=tuple(trial.values) if trial.values is not None else None,
        role=str(attrs.get("role", "search")),
        uses_method=uses_method,
        feasible=all(v <= 0.0 for v in trial.constraints.values()),
        params=dict(trial.params),
        config=config,
        attrs=attrs,
    )


def study_objectives(study: optuna.Study) -> tuple[str, ...]:
    """The objective names a wus_tune study was created with (``user_attrs["objectives"]``)."""
    names = study.user_attrs.get("objectives")
    if not names:
        raise UsageError(f"study {study.study_name!r} was not created by wus_tune.study (no 'objectives' attribute)")
    return tuple(names)


def load_candidates(study: optuna.Study) -> list[Candidate]:
    """The study's trials as candidates, each paired with every seed's baseline completed by now."""
    from wus_tune._study.seeds import with_paired

    return with_paired([candidate_from_trial(t) for t in study.get_trials(deepcopy=False)])


def load_analysis(study_name: str, storage: str | None = None) -> tuple[optuna.Study, Analysis]:
    """Load a wus_tune study from its storage and analyse it."""
    from wus_tune._study.storage import default_storage, load_study

    study = load_study(study_name, storage or default_storage(study_name))
    delta = (study.user_attrs.get("spec") or {}).get("constraint_delta")
    return study, analyse(load_candidates(study), study_objectives(study), constraint_delta=delta)


def export_config(candidate: Candidate, path: str | None, *, study_name: str, rule: Rule | str) -> Any:
    """The candidate's TrainConfig with provenance in ``meta``; saved to ``path`` when given."""
    from wus_tune._study.seeds import claim
    from wus_tune.config import TrainConfig

    if candidate.config is None:
        raise UsageError(f"trial {candidate.number} has no stored config")
    config = TrainConfig.from_dict(candidate.config)
    config.meta = {
        **config.meta,
        "study": study_name,
        "trial": candidate.number,
        "selected_by": str(rule),
        "values": list(candidate.values or ()),
    }
    if (paired := claim(candidate.attrs.get("paired"))) is not None:
        config.meta["claim"] = paired  # the paired delta and speed-up vs the baseline, with their intervals
    if path:
        config.save(path)
    return config
