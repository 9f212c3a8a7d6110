"""A sampler whose draws depend on the study's seed and the trial's number only, not on which process asks.

Trials on a Ray cluster are asked by whichever Ray worker process is free, and one process serves many
trials. A sampler seeded once per process would draw differently from run to run (which process asks
which trial, and that process's seed, change), so two runs of one spec with one ``--seed`` would ask
different parameters. :class:`TrialSeededSampler` builds the study's sampler afresh for every trial,
seeded with :func:`trial_seed` of the study seed and the trial number: the randomness of a trial's
parameters is fixed by the two, and no two trials of a study share a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState


def trial_seed(study_seed: int, number: int) -> int:
    """The sampler seed of trial ``number``: both numbers mixed (NumPy's ``SeedSequence``), so the seeds of
    nearby studies and trials (seed 1 trial 0, seed 0 trial 1) are unrelated, not shifted copies."""
    import numpy as np

    return int(np.random.SeedSequence([study_seed, number]).generate_state(1)[0])


class TrialSeededSampler(BaseSampler):
    """``make(seed)``'s sampler, made again with :func:`trial_seed` before each trial (Optuna calls
    ``before_trial`` once the trial has its number, before anything is sampled); every other call goes to
    that trial's sampler. Samplers keep their state in the study (NSGA-II's generations) or recompute it, so
    a fresh one per trial samples as a long-lived one would, given its seed."""

    def __init__(self, make: Callable[[int], BaseSampler], study_seed: int) -> None:
        self._make, self._study_seed = make, study_seed
        self._inner = make(study_seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = self._make(trial_seed(self._study_seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:  # fmt: skip
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:  # fmt: skip
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:  # fmt: skip
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()
