"""The tuned-plain yardstick: a fair comparison for methods whose trials retune the optimizer.

A method whose study declaration says ``tunes_optimizer`` (edge of chaos) searches the learning rate, momentum, batch size and
weight decay; the fixed baseline frontier does not, so beating it may only say "tuning the optimizer helps".
So the study also runs *tuned-plain* trials (role ``tuned-plain``, method ``none``): the same optimizer knobs,
sampled from the same ranges, without the method, one for every trial of the method (the same budget;
:class:`TunedPlainBalancer` enqueues one after each method trial). They are kept off the baseline frontier,
and :func:`compare` sets the method's trials against the tuned-plain group: best accuracy of each group,
and the method trials' accuracy gain over the tuned-plain front at equal time.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from wus_tune._study.catalog import METHOD_KEY, method_parts, tunes_optimizer

if TYPE_CHECKING:
    import optuna

    from wus_tune._study.front import Analysis
    from wus_tune._study.spec import ResolvedStudy

ROLE = "tuned-plain"


def tuning_choices(methods: tuple[str, ...]) -> list[str]:
    """The compared ``method`` choices with a method that retunes the optimizer (``tunes_optimizer``)."""
    return [m for m in methods if tunes_optimizer(m)]


def sampling_choice(choices: list[str]) -> str:
    """The choice whose knobs a tuned-plain trial samples: the one combining the fewest methods (its
    optimizer knobs, with as few other knobs as can be)."""
    return min(choices, key=lambda m: len(method_parts(m)))


class TunedPlainBalancer:
    """Optuna callback: after a trial of an optimizer-tuning method, enqueue one tuned-plain trial while the
    group has fewer trials (any state, waiting ones too) than the method's."""

    def __init__(self, study_def: ResolvedStudy) -> None:
        self.choices = tuning_choices(study_def.methods)
        self.enabled = bool(self.choices)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not self.enabled or trial.user_attrs.get("method") not in self.choices:
            return
        trials = study.get_trials(deepcopy=False)
        by_method = sum(1 for t in trials if t.user_attrs.get("method") in self.choices and t.user_attrs.get("role") != ROLE)
        tuned = sum(1 for t in trials if t.user_attrs.get("role") == ROLE)
        if tuned < by_method:
            study.enqueue_trial({}, user_attrs={"role": ROLE, "overrides": {METHOD_KEY: sampling_choice(self.choices)}},
                                skip_if_exists=False)  # fmt: skip


def compare(analysis: Analysis) -> dict[str, Any] | None:
    """The method trials (per tuning method) against the tuned-plain group; None without tuned-plain trials."""
    from wus_tune._study.front import frontier_advantage

    tuned = [c for c in analysis.complete if c.role == ROLE]
    if not tuned:
        return None
    points = [(c.values[1], c.values[0]) for c in tuned]
    groups: dict[str, list[Any]] = {}
    for c in analysis.complete:
        method = c.attrs.get("method")
        if c.role != ROLE and method not in (None, "none") and tuning_choices((str(method),)):
            groups.setdefault(str(method), []).append(c)
    out: dict[str, Any] = {"tuned_plain": {"trials": len(tuned), "best_accuracy": max(c.values[0] for c in tuned),
                                           "numbers": [c.number for c in tuned]}, "methods": {}}  # fmt: skip
    for method, cands in sorted(groups.items()):
        gains = [a.acc_gain for c in cands if (a := frontier_advantage(c.values[1], c.values[0], points)).acc_gain is not None]
        out["methods"][method] = {
            "trials": len(cands),
            "best_accuracy": max(c.values[0] for c in cands),
            "median_gain_pts_at_equal_time": statistics.median(gains) * 100 if gains else None,
            "best_gain_pts_at_equal_time": max(gains) * 100 if gains else None,
            "compared": len(gains),
        }
    return out


def summary_lines(comparison: dict[str, Any] | None, objective: str) -> list[str]:
    if not comparison:
        return []
    t = comparison["tuned_plain"]
    lines = [f"tuned plain (the methods' optimizer knobs, no method): {t['trials']} trials, best accuracy {t['best_accuracy']:.2%}"]
    for method, m in comparison["methods"].items():
        text = f"  {method}: {m['trials']} trials, best accuracy {m['best_accuracy']:.2%}"
        if m["median_gain_pts_at_equal_time"] is not None:
            text += (f"; vs the tuned-plain front at equal {objective}: median {m['median_gain_pts_at_equal_time']:+.2f} pts, "
                     f"best {m['best_gain_pts_at_equal_time']:+.2f} pts ({m['compared']} trials within its range)")  # fmt: skip
        lines.append(text)
    return lines
