"""What a study reads about a method: the study's side of the contract, apart from the training hooks.

A method's study declaration is a subclass of :class:`MethodStudy`, named by the method's
:attr:`~wus_tune.methods.Method.study` (``"package.module:Class"``) and imported only by the study, so
training never loads the study side. This module imports nothing of the study either: a small method may
declare both classes in one file (``wus_tune/methods/approx_ops.py``); one whose declaration needs the
study's types keeps it in a module of its own (``wus_tune/methods/wus/study.py``). Everything a study
knows about a method comes from its declaration::

    method                  the Method class it declares
    SEARCH_SPACE            {dotted key: spec search_space entry (type/low/high/log/choices/when/doc)}; the
                            study adds `method` to each one's `when` (the compared choices that run it)
    DEFAULT_TRIAL           the default trial's knobs where they differ from the method's defaults
    combines_with           the methods it may share a trial with ("approx_ops+wus": either side declares it)
    tunes_optimizer         its search space has optim.* knobs: the study also runs tuned-plain trials
    measure_only            it changes nothing in training: a base config's entry stays in every trial
    compared_by_default     a spec without a `methods:` list compares the methods declaring it (WUS)
    OBJECTIVES              objectives read from its metrics ({"sparsity": MetricObjective(...)})
    SPEC_SECTION            a dataclass: the spec's top-level section named after the method (edge_of_chaos)

    search_space(section)           its knobs (``section``: its spec section, or None)
    default_trials()                [dotted-key values of each default trial]
    label(params)                   what a trial running it is called in tables and tags (WUS: wus or wus+lr)
    from_config(config)             the method instance a TrainConfig runs
    check_model(model, config)      None, or a one-line reason why it cannot act on this ModelConfig
    check_module(net, config)       the same for the built network (asked once before a study's first trial)
    plan_section(section, base, methods)          what its spec section adds: SectionPlan (base, knobs, trials)
    prepare_section(section, base, fit=, say=)    the section completed before the study (a calibration run)

Baseline reuse (:mod:`wus_tune._study.reuse`). A method whose trial *is* plain training up to a point it
can compute from a plain run's probes opts in by overriding ``baseline_recording``; with the defaults its
trials train from scratch::

    baseline_recording(config)       BaselineRecording(every_steps, val_acc): the probes a baseline must
                                     record for a trial of this config; None (default): not predictable
    deviation_checks(space, base, progress)
                                     the probes after which some trial of the space could first deviate
                                     (the baseline snapshots only these); default none
    replay_baseline(config, probes)  Deviation(check, states, metrics, charges_probes): the probe after
                                     which the trial first trains differently (None: never, it is the
                                     baseline) and what a fork from an earlier probe loads; default: it
                                     deviates from the first step
    calibrate_space(space, base, probes, explicit)
                                     (space with its own knobs' ranges fitted to the baseline's probes,
                                     note lines); default unchanged

A trial is predicted only when exactly one of its methods opts in, its config equals the baseline's
outside that method's entry, and the baseline recorded what ``baseline_recording`` asks for. The answer
must be exact, not an estimate: a trial reused on a wrong ``Deviation`` is recorded with the baseline's
values, a wrong result.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from wus_tune.config import TrainConfig
    from wus_tune.methods import Method

__all__ = ["MethodStudy", "BaselineRecording", "Deviation", "MetricObjective", "SectionPlan"]


@dataclass(frozen=True)
class BaselineRecording:
    """What a plain baseline run must record for a method's trials to be predicted from it: a probe
    (:class:`wus_tune.run_state.RecordingPlan`) every ``every_steps`` optimizer steps (0: at each epoch's
    end), with a validation pass at each probe when ``val_acc``."""

    every_steps: int
    val_acc: bool


@dataclass
class Deviation:
    """Where a trial first trains differently from the baseline, found on the baseline's probes, and what
    a run forked from the baseline's snapshot at probe ``j <= check`` takes over.

    ``check`` is the 1-based probe after which the trial leaves plain training (0: from its first step;
    None: never, the trial *is* the baseline). ``states[j - 1]`` is the method's ``state_dict()`` after
    probe ``j`` as the trial would have it (loaded on a fork; empty: the method keeps no state);
    ``metrics[j - 1]`` its ``end_epoch`` metrics then (shown on the fork's prefix epochs; empty: none).
    ``charges_probes``: the trial's own run pays a validation pass at each probe (a ``val_acc`` CheckPlan),
    so a fork is charged the prefix's passes, which the baseline measured but did not pay."""

    check: int | None
    states: Sequence[dict[str, Any] | None] = ()
    metrics: Sequence[dict[str, float]] = ()
    charges_probes: bool = False


@dataclass(frozen=True)
class MetricObjective:
    """A study objective read from a method's last-epoch metric: its Optuna ``direction``, the ``metric``
    (``"lp_sphere/sparsity"``) and its value for a run without the method: a number, or the name of the
    :class:`~wus_tune.trainer.TrainResult` field that holds it (``"num_params"``)."""

    direction: str
    metric: str
    absent: float | str


@dataclass(frozen=True, kw_only=True)
class SectionPlan:
    """What a method's spec section adds to a study: the ``base`` config (e.g. with a measuring method on
    in every trial), ``search_space`` entries (the spec's own entries win), and ``trials``, (role, fixed
    values) pairs run instead of the method's default trials."""

    base: TrainConfig
    search_space: Mapping[str, Any] = field(default_factory=dict)
    trials: tuple[tuple[str, dict[str, Any]], ...] = ()


class MethodStudy:
    """Base class of a method's study declaration; override what applies (see the module docstring)."""

    method: ClassVar[type[Method]]
    SEARCH_SPACE: ClassVar[dict[str, dict[str, Any]]] = {}
    DEFAULT_TRIAL: ClassVar[dict[str, Any]] = {}
    combines_with: ClassVar[tuple[str, ...]] = ()
    # its search space has optim.* knobs (edge_of_chaos): a study then also runs tuned-plain trials searching
    # the same knobs with the same budget, its fair yardstick (wus_tune._study.tuned_plain)
    tunes_optimizer: ClassVar[bool] = False
    measure_only: ClassVar[bool] = False
    compared_by_default: ClassVar[bool] = False
    OBJECTIVES: ClassVar[dict[str, MetricObjective]] = {}
    SPEC_SECTION: ClassVar[type | None] = None

    @classmethod
    def search_space(cls, section: Any = None) -> dict[str, dict[str, Any]]:
        return {key: dict(value) for key, value in cls.SEARCH_SPACE.items()}

    @classmethod
    def default_trials(cls) -> list[dict[str, Any]]:
        """Dotted-key values of each default trial: the searched ``methods.<name>.*`` knobs at the method's
        defaults, overlaid by :attr:`DEFAULT_TRIAL`."""
        from wus_tune.methods import knob_defaults

        defaults = knob_defaults(cls.method)
        prefix = f"methods.{cls.method.name}."
        knobs = [key[len(prefix):] for key in cls.search_space() if key.startswith(prefix)]
        trial = {f"{prefix}{k}": defaults[k] for k in knobs
                 if k in defaults and defaults[k] is not inspect.Parameter.empty}  # fmt: skip
        trial.update({f"{prefix}{k}": v for k, v in cls.DEFAULT_TRIAL.items()})
        return [trial]

    @classmethod
    def label(cls, params: Mapping[str, Any]) -> str:
        """What a trial that runs this method with ``params`` (its ``methods.<name>`` entry) is called."""
        return cls.method.name

    @classmethod
    def from_config(cls, config: TrainConfig) -> Method:
        """The method instance ``config`` runs (it must name the method)."""
        from wus_tune.methods import build_methods

        return build_methods({cls.method.name: config.methods[cls.method.name]})[0]

    @classmethod
    def check_model(cls, model: Any, config: Any) -> str | None:
        """None when the method can act on ``model`` (a ModelConfig); else a one-line reason.

        Called when a spec is resolved, before anything is built, so it can judge only what the config
        says (a built-in model's name and depth); the built network is :meth:`check_module`'s."""
        return None

    @classmethod
    def check_module(cls, module: torch.nn.Module, config: Any) -> str | None:
        """None when the method can act on the built network ``module`` (a user's factory or object
        included); else a one-line reason. A study asks it once before any trial, on the model its
        trials will build; the method's ``setup`` should raise a ConfigError for the same reason."""
        return None

    # ---- its spec section (SPEC_SECTION) ------------------------------------------------------------

    @classmethod
    def plan_section(cls, section: Any, base: TrainConfig, methods: Sequence[str]) -> SectionPlan:
        """Validate the spec's section (a SPEC_SECTION instance) against the base config and the compared
        ``methods`` choices, and say what it adds; raises UsageError with one line."""
        return SectionPlan(base=base)

    @classmethod
    def prepare_section(cls, section: Any, base: TrainConfig, *, fit: Callable[..., Any] | None,
                        say: Callable[[str], None]) -> Any:  # fmt: skip
        """The section completed before the study starts (e.g. a constant measured by a short run), or
        ``section`` itself when nothing is missing."""
        return section

    # ---- baseline reuse (see the module docstring) ----------------------------------------------------

    @classmethod
    def baseline_recording(cls, config: TrainConfig) -> BaselineRecording | None:
        """The probes a plain run must record to predict this method's trials of ``config``; None:
        they cannot be predicted (they train from scratch)."""
        return None

    @classmethod
    def deviation_checks(cls, space: Any, base: TrainConfig, progress: Sequence[float]) -> list[int]:
        """The probes (1-based; ``progress[k - 1]`` is the training fraction at probe ``k``) after which
        some trial of ``space`` (a SearchSpace) on ``base`` could first deviate from plain training: the
        baseline keeps a snapshot only there."""
        return []

    @classmethod
    def replay_baseline(cls, config: TrainConfig, probes: Sequence[Mapping[str, Any]]) -> Deviation:
        """Where a trial of ``config`` first deviates from the baseline whose probes (ProbeRecord dicts,
        as :meth:`baseline_recording` asked) are given. Called only when :meth:`baseline_recording` is
        not None and the trial equals the baseline outside this method's entry."""
        return Deviation(check=0)

    @classmethod
    def calibrate_space(cls, space: Any, base: TrainConfig, probes: Sequence[Mapping[str, Any]], *,
                        explicit: Sequence[str] = ()) -> tuple[Any, list[str]]:  # fmt: skip
        """``space`` (a SearchSpace) with this method's knob ranges fitted to the baseline's probes, and
        the one-line notes to print; a key in ``explicit`` (the spec's own ``search_space:`` entries)
        keeps its range."""
        return space, []
