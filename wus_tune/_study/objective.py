"""The Optuna objective: trial -> TrainConfig -> ``fit`` -> objective values, with one MLflow child run.

What a trial stores in its user attributes (read by :mod:`wus_tune._study.candidates` and the report):
``role``, ``method`` (the method choice: ``none``, ``wus``, ``approx_ops+wus``), ``variant`` (what it ran,
:func:`~wus_tune._study.catalog.trial_label`: ``none``, ``wus``, ``wus+lr``, ``approx_ops+wus``), ``config``
(the full TrainConfig dict, so any trial can be exported),
``mlflow_run_id``, ``result`` (summary figures and the timing of the machinery: ``fit_s``,
``overhead_s``, ``mlflow_s``; with several seeds the first seed's figures, ``compute_flops`` summed over the
seeds and ``seeds`` their count), ``seeds`` (per seed: ``seed``, objective ``values``, ``compute_flops``,
``fit_s`` and its reuse record), ``paired`` (the comparison with the baseline's runs on the same seeds,
:func:`wus_tune._study.seeds.paired_summary`), and ``fail_reason`` plus ``timing`` when it raised.

A trial runs the study's ``seeds`` (:mod:`wus_tune._study.seeds`): each seed planned, forked from that seed's
baseline snapshot or trained, in turn; its objective values are the means over its seeds. A baseline trial
is one seed's baseline.

Enqueued trials carry ``overrides`` (dotted key -> value) in their user attributes: fixed values that
are not (or cannot be) Optuna parameters, e.g. ``epochs`` of a shorter baseline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wus_tune._study import reuse
from wus_tune._study.front import objective_values
from wus_tune._study.seeds import PAIRED_ATTR, SEEDS_ATTR, Seeds
from wus_tune._study.space import METHOD_KEY, apply_values, flat_config
from wus_tune.errors import TrainingDiverged
from wus_tune.pricing import coverage_line

if TYPE_CHECKING:
    import optuna

    from wus_tune._study.spec import ResolvedStudy
    from wus_tune._study.tracking import MlflowTracker, NullTracker
    from wus_tune.config import TrainConfig
    from wus_tune.trainer import TrainResult

CONSTRAINT_KEY = "accuracy_floor"  # value = (baseline accuracy - delta) - accuracy; feasible when <= 0
RESULT_FIELDS = ("val_acc", "best_val_acc", "test_acc", "time_s", "train_time_s", "eval_time_s", "required_eval_time_s",
                 "hook_time_s", "compile_time_s", "cost_flops", "changed_step_fraction", "flops_fraction", "total_steps",
                 "changed_steps", "relative_time", "reference_time_s", "modelled_time_s", "coverage", "unpriced",
                 "timing_overhead_s", "work_counts")  # fmt: skip


def one_line(e: BaseException) -> str:
    """The reason a trial failed, in one line (``fail_reason`` in Optuna and MLflow)."""
    from wus_tune._study.storage import redact
    from wus_tune.errors import one_line as first_line

    line = first_line(e, with_type=True)
    if is_out_of_memory(e):
        return redact(f"out of memory: the model or batch does not fit on the device (try a smaller "
                      f"model.width or optim.batch_size); {line}")[:1000]  # fmt: skip
    return redact(line)[:1000]


def is_out_of_memory(e: BaseException) -> bool:
    """``torch.OutOfMemoryError`` (CUDA, MPS), or a CPU allocator failure (a ``RuntimeError`` saying so)."""
    import sys

    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, (RuntimeError, MemoryError)) and (
        isinstance(e, MemoryError) or "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower()
    )


def _release_memory() -> None:
    """After a failed trial: drop its tensors from the CUDA cache so the next trial starts clean."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class Objective:
    """Callable objective for ``study.optimize``; ``fit`` is injectable for tests and benchmarks."""

    def __init__(
        self,
        study: ResolvedStudy,
        tracker: MlflowTracker | NullTracker,
        *,
        fit: Callable[..., TrainResult] | None = None,
        say: Callable[[str], None] | None = None,
        while_waiting: Callable[[optuna.Study], Any] | None = None,
    ) -> None:
        if fit is None:
            from wus_tune.trainer import fit
        self.study, self.tracker, self.fit = study, tracker, fit
        self._sample_s = 0.0
        self.pruner = None
        if study.pruner is not None:
            from wus_tune._study.pruning import FrontierSettings, ParetoPruner

            if isinstance(study.pruner, FrontierSettings):
                from wus_tune._study.frontier_pruning import FrontierPruner

                self.pruner = FrontierPruner(study.pruner, study.objectives)
            else:
                self.pruner = ParetoPruner(study.pruner, study.objectives)
        self.reference = baseline_config(study)  # every trial's time is also priced in units of this run
        self.baselines = baseline_configs(study)  # its runs (other seeds too): a trial forks from its seed's
        self.say = say or (lambda _: None)
        self.while_waiting = while_waiting  # the stale-trial sweep, run while waiting for the baseline
        self._length_said = False  # the CPU shrink line, once per invocation
        self._calibrated: Any = None  # the search space calibrated on the baseline's signal, once known

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        """Train the trial's config on each of its seeds (``seeds``: one for a baseline trial, which is one
        seed's baseline), and return the objectives' means over them (the sampler learns from means)."""
        from wus_tune._study.tracking import NullTrialRun

        start = time.perf_counter()
        run: Any = NullTrialRun()
        fit_s = 0.0
        try:
            config, role, label = self._config(trial)
            params = {k: v for k, v in flat_config(config.to_dict()).items() if not k.startswith("meta")}
            tags = {"optuna.study_name": self.study.name, "wus_tune.role": role, "wus_tune.variant": label}
            # the method choice, a param and a tag to filter on ("none": the plain recipe)
            params[METHOD_KEY] = tags["wus_tune.method"] = trial.user_attrs.get("method", "none")
            seeds = Seeds(1, 1) if role == "baseline" else self.study.seeds
            if role == "baseline-frontier":  # the yardstick races are judged against: never raced itself
                seeds = Seeds(seeds.max, seeds.max)
            plan, why = self._plan(trial, config, role)
            tags.update(reuse.plan_tags(plan))
            if seeds.max > 1:
                tags["wus_tune.seeds"] = str(seeds)
            run = self.tracker.start_trial(trial.number, params=params, tags=tags)
            if run.run_id:
                trial.set_user_attr("mlflow_run_id", run.run_id)
            done: list[SeedRun] = []
            wanted = seeds.min
            while len(done) < wanted:
                k = len(done)
                config_k = config if k == 0 else config.replace({"seed": config.seed + k})
                if k > 0:
                    plan, why = self._plan(trial, config_k, role)
                one = self._one_seed(trial, config_k, role, plan, why, run, first=k == 0)
                fit_s += one.fit_s
                done.append(one)
                if len(done) == wanted and wanted < seeds.max and self._race(trial, done, seeds) == "more":
                    wanted += 1
            objective = {name: sum(r.objective[name] for r in done) / len(done) for name in self.study.objectives}
            if self.study.constraint_delta is not None:
                trial.set_constraint(CONSTRAINT_KEY, self._constraint(trial, role, objective["accuracy"]))
            self._record_seeds(trial, role, done)
            summary = dict(done[0].summary)
            if len(done) > 1:  # the work the trial did: every seed's
                summary["compute_flops"] = sum(float(r.summary.get("compute_flops", 0.0)) for r in done)
            summary["seeds"] = len(done)
            # One attribute write for all of it: each is a storage transaction (milliseconds on SQLite).
            trial.set_user_attr("result", summary | self._timing(start, fit_s, run))
            if role == "baseline":  # the frontier pruner's yardstick, should this run or a later one use it
                from wus_tune._study.frontier_pruning import CURVE_ATTR, FrontierPruner, curve_row

                if not isinstance(self.pruner, FrontierPruner):  # that one's hook stored it already
                    trial.set_user_attr(CURVE_ATTR, [curve_row(r) for r in done[0].result.epochs])
            trained = reuse.REUSED_ATTR not in done[0].attrs  # a replayed seed's figures are its twin's, in the summary
            extra = timing_metrics(done[0].result) if trained else {}
            extra |= seed_metrics(done, trial.user_attrs.get(PAIRED_ATTR), several=len(done) > 1)
            run.finish(done[0].result, objective, extra)  # last: the run is FINISHED only once everything is recorded
        except BaseException as e:
            if _is_pruned(e):  # stopped by the pruner: PRUNED in Optuna, KILLED in MLflow (not a failure)
                trial.set_user_attr("timing", self._timing(start, fit_s, run))
                run.prune(trial.user_attrs.get("pruned", {}).get("epoch", 0), str(e))
                raise
            try:
                trial.set_user_attr("fail_reason", one_line(e))
                trial.set_user_attr("timing", self._timing(start, fit_s, run))
            finally:
                run.fail(e)  # never raises: the trial's own error is what Optuna records
                if is_out_of_memory(e):
                    _release_memory()
            raise
        return tuple(objective[name] for name in self.study.objectives)

    def _length_check(self, config: TrainConfig) -> Callable[[Any], None]:
        """After the baseline's first epoch on a CPU: say once how long the study may take, and how to
        shrink it, when that is hours (a spec sized for a GPU, run as it is)."""

        def check(record: Any) -> None:
            if record.epoch != 1 or self._length_said:
                return
            self._length_said = True
            line = length_line(record.train_time_s + record.eval_time_s, config.epochs, self.study.n_trials)
            if line is not None:
                self.say(line)

        return check

    def _one_seed(self, trial: optuna.Trial, config: TrainConfig, role: str, plan: reuse.Decision, why: str, run: Any,
                  *, first: bool) -> SeedRun:  # fmt: skip
        """One seed of a trial: replayed, forked from that seed's baseline snapshot, or trained. Only the
        first seed logs its epochs to MLflow and answers to the pruner (a pruned trial stops there)."""
        from types import SimpleNamespace

        attrs: dict[str, Any] = {reuse.NOT_FORKED_ATTR: why} if why else {}
        kwargs: dict[str, Any] = {}
        if role == "baseline" and self.study.reuse.any:
            kwargs["recording"] = reuse.baseline_plan(self.study, trial.number)
        elif plan.kind == "fork":
            plan, state = self._fork(trial, plan, config, attrs)
            if state is not None:
                kwargs["resume_from"] = state
        if plan.kind == "reuse":  # never deviates from the baseline's run: its values, not trained
            b = plan.baseline
            summary = reuse.reused_summary(b, plan.replay) | {"reused_from": b.number}
            objective = dict(zip(self.study.objectives, b.values))  # its twin's: the baseline's, plus the checks it pays
            objective |= objective_values(SimpleNamespace(**(summary | {"epochs": []})), self.study.objectives)
            attrs[reuse.REUSED_ATTR] = "baseline"
            return SeedRun(config.seed, objective, summary, attrs, SimpleNamespace(**(summary | {"epochs": []})), 0.0)
        on_epoch = run.log_epoch if first else None
        if first and role == "baseline" and _on_cpu(config):
            on_epoch = _both(run.log_epoch, self._length_check(config))
        if self.pruner is not None and first:  # may raise optuna.TrialPruned (wus_tune._study.pruning, frontier_pruning)
            hook = self.pruner.for_trial(trial, role=role, epochs=config.epochs, config=config, plan=plan)
            on_epoch = _both(on_epoch or run.log_epoch, hook)
        fit_start = time.perf_counter()
        try:
            result = self.fit(config, on_epoch=on_epoch, relative_to=self.reference, **kwargs)
        finally:  # a pruned trial's training time counts as training too
            fit_s = time.perf_counter() - fit_start - (run.epoch_overhead_s if first else 0.0)
        objective = objective_values(result, self.study.objectives)
        bad = [k for k, v in objective.items() if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(f"objective {bad[0]} is {objective[bad[0]]}" + ("" if first else f" (seed {config.seed})"))
        summary = {k: getattr(result, k, None) for k in RESULT_FIELDS} | {"epochs": len(result.epochs)}
        summary["unit_costs"] = {k: v["seconds"] for k, v in (getattr(result, "unit_costs", None) or {}).items()}
        summary |= reuse.record_run(trial, plan, result, kwargs, attrs=attrs)
        if (line := coverage_line(trial.number, summary)) is not None:
            self.say(line)
        if "no_snapshots" in summary:
            self.say(f"reuse: baseline trial {trial.number} kept no snapshots ({summary.pop('no_snapshots')}): "
                     "trials that deviate from it train from scratch")  # fmt: skip
        return SeedRun(config.seed, objective, summary, attrs, result, fit_s)

    def _record_seeds(self, trial: optuna.Trial, role: str, done: list[SeedRun]) -> None:
        """The trial's per-seed values (``seeds``), its first seed's reuse attributes (``forked``,
        ``reuse_skipped``; ``reused`` only when every seed was), and, beside the baseline, the paired
        comparison with the baseline's runs on the same seeds (``paired``)."""
        from wus_tune._study.seeds import paired_summary

        first = dict(done[0].attrs)
        if not all(reuse.REUSED_ATTR in r.attrs for r in done):
            first.pop(reuse.REUSED_ATTR, None)
            forked = [r.attrs[reuse.FORKED_ATTR] for r in done if reuse.FORKED_ATTR in r.attrs]
            if forked and reuse.FORKED_ATTR not in first:
                first[reuse.FORKED_ATTR] = forked[0]
        for key, value in first.items():
            trial.set_user_attr(key, value)
        per_seed = [{"seed": r.seed, "values": [r.objective[n] for n in self.study.objectives],
                     "compute_flops": float(r.summary.get("compute_flops", 0.0)), "fit_s": r.fit_s,
                     **{k: r.attrs[k] for k in (reuse.FORKED_ATTR, reuse.REUSED_ATTR, reuse.NOT_FORKED_ATTR) if k in r.attrs}}
                    for r in done]  # fmt: skip
        trial.set_user_attr(SEEDS_ATTR, per_seed)
        if role == "baseline":
            return
        baselines = baseline_by_seed(trial.study)
        paired = paired_summary({r.seed: [r.objective[n] for n in self.study.objectives] for r in done},
                                {s: v for s, (v, _) in baselines.items()},
                                baseline_trials={s: n for s, (_, n) in baselines.items()})  # fmt: skip
        if paired is not None:
            trial.set_user_attr(PAIRED_ATTR, paired)

    def _race(self, trial: optuna.Trial, done: list[SeedRun], seeds: Seeds) -> str:
        """``race`` on the seeds so far against the baseline frontier of the completed trials (seed means)."""
        from wus_tune._study.candidates import load_candidates
        from wus_tune._study.front import on_frontier
        from wus_tune._study.seeds import race, race_threshold, seed_noise_pts

        baselines = baseline_by_seed(trial.study)
        deltas = [(r.objective["accuracy"] - baselines[r.seed][0][0]) * 100 for r in done if r.seed in baselines]
        if not deltas:
            return "more"  # nothing to pair with yet: the seeds asked for at most
        accs = [v[0] for v, _ in baselines.values()]
        plain = [(c.values[1], c.values[0]) for c in load_candidates(trial.study) if c.ok and on_frontier(c)]
        time_mean = sum(r.objective[self.study.objectives[1]] for r in done) / len(done)
        threshold = race_threshold(time_mean, plain, sum(accs) / len(accs))
        verdict = race(deltas, threshold, max_seeds=seeds.max, noise_pts=seed_noise_pts(accs))
        self.say(f"trial {trial.number}: racing after {len(done)} seed{'s' * (len(done) > 1)}: {verdict}")
        return verdict

    def _plan(self, trial: optuna.Trial, config: TrainConfig, role: str) -> tuple[reuse.Decision, str]:
        """Replay / fork / train for a trial of a method the baseline can predict (waiting for a baseline
        another worker is training), on ``config``'s seed; and why it trains from scratch ("" if it does not,
        or if nothing could be said)."""
        spec = self.study.reuse
        if role == "baseline" or not (spec.replay or spec.fork):
            return reuse.Decision("train"), ""
        if not reuse.predictable_methods(config):
            return reuse.Decision("train"), ""  # plain, or only methods a baseline cannot predict: nothing to say
        # the baseline run this trial's config matches (its seed's): known before waiting for it
        reasons = [reuse.fork_blocker(config.to_dict(), b.to_dict()) for b in self.baselines]
        blocker = None if None in reasons else reasons[0]
        if blocker is None:
            baseline, why = reuse.wait_for_baseline(trial.study, config, timeout_s=spec.baseline_wait_s,
                                                    while_waiting=self.while_waiting)  # fmt: skip
            plan = reuse.decide(config, baseline, spec, why_no_baseline=why)
        else:
            plan = reuse.Decision("train", blocker)
        return plan, plan.reason if plan.kind == "train" else ""

    def _fork(self, trial: optuna.Trial, plan: reuse.Decision, config: TrainConfig,
              attrs: dict[str, Any]) -> tuple[reuse.Decision, Any]:  # fmt: skip
        """The baseline's snapshot for a forked trial, or (a snapshot refused: unreadable, another run's)
        a plan to train from scratch, said in one line."""
        try:
            return plan, reuse.fork_state(plan, plan.baseline, config)
        except reuse.SnapshotRefused as e:
            self.say(f"trial {trial.number}: trains from scratch: {e}")
            attrs[reuse.NOT_FORKED_ATTR] = str(e)
            return reuse.Decision("train", str(e), first_skip=plan.first_skip, replay=plan.replay, method=plan.method), None

    def _space(self, study: optuna.Study) -> Any:
        """The search space: calibrated on the baseline's signal once that is known (``reuse.calibrate``)."""
        if self._calibrated is not None or not self.study.reuse.calibrate:
            return self._calibrated or self.study.space
        baseline, _, _ = reuse.find_baseline(study)
        if baseline is None:
            return self.study.space
        explicit = tuple((self.study.spec.get("search_space") or {}).keys())
        self._calibrated, notes = reuse.calibrate_space(self.study.space, self.study.base, baseline.probes,
                                                        explicit=explicit, methods=reuse.study_methods(self.study))  # fmt: skip
        if reuse.CALIBRATED_ATTR not in study.user_attrs:
            study.set_user_attr(reuse.CALIBRATED_ATTR, self._calibrated.to_json())
            for note in notes:
                self.say(note)
        return self._calibrated

    def _timing(self, start: float, fit_s: float, run: Any) -> dict[str, float]:
        """Seconds of training (``fit`` minus its MLflow logging) and of everything else in the trial; of
        the latter, ``sample_s`` went to sampling the parameters (the sampler plus one storage write per
        parameter) and ``mlflow_s`` to MLflow."""
        return {"fit_s": fit_s, "overhead_s": time.perf_counter() - start - fit_s, "mlflow_s": run.overhead_s,
                "sample_s": self._sample_s}  # fmt: skip

    def _config(self, trial: optuna.Trial) -> tuple[TrainConfig, str, str]:
        """The trial's config, role and label (what it ran: ``none``, ``wus+lr``, ``approx_ops+wus``;
        :func:`~wus_tune._study.catalog.trial_label`); stores them on the trial."""
        from wus_tune._study.catalog import trial_label

        attrs = trial.user_attrs
        role = str(attrs.get("role", "search"))
        fixed = attrs.get("overrides") or {}
        t = time.perf_counter()
        space = self.study.space if attrs.get("role") else self._space(trial.study)  # enqueued trials: their own values
        values = space.sample(trial, fixed=fixed)
        self._sample_s = time.perf_counter() - t
        if role == "tuned-plain":  # the method's optimizer knobs were sampled; train them without the method
            values[METHOD_KEY] = "none"
        config = apply_values(self.study.base, values)
        config.meta = {**config.meta, "study": self.study.name, "trial": trial.number}
        label = trial_label(values.get(METHOD_KEY, "none"), config)
        if "role" not in attrs:
            trial.set_user_attr("role", role)
        trial.set_user_attr("variant", label)
        trial.set_user_attr("method", values.get(METHOD_KEY, "none"))  # "none": the plain recipe
        trial.set_user_attr("config", config.to_dict())
        return config, role, label

    def _constraint(self, trial: optuna.Trial, role: str, accuracy: float) -> float:
        """``(baseline accuracy - delta points) - accuracy``; 0 (feasible) while no baseline has completed."""
        if role == "baseline":
            base_acc: float | None = accuracy
        else:
            pooled = baseline_values(trial.study)
            base_acc = None if pooled is None else pooled[0]
        if base_acc is None:
            return 0.0
        return (base_acc - self.study.constraint_delta / 100) - accuracy


LONG_STUDY_S = 3600.0  # a study estimated longer than this on a CPU gets the shrink line
SHRINK_HINT = "--set model.width=0.25 --set data.subset=10000 --epochs 16"  # the specs' own CPU line


def length_line(first_epoch_s: float, epochs: int, n_trials: int | None) -> str | None:
    """What a CPU user should hear after the baseline's first epoch when the study would take hours:
    one full-length run is ``epochs`` such epochs and a trial costs at most that (forks and skips cost
    less), so ``n_trials`` of them bound the study. None when the bound is under an hour."""
    run_s = first_epoch_s * epochs
    trials = n_trials or 1
    if run_s * trials < LONG_STUDY_S:
        return None
    return (f"note: on this CPU the baseline's first epoch took {first_epoch_s:.0f} s: one full-length run is "
            f"about {_duration(run_s)}, {trials} trial(s) up to {_duration(run_s * trials)}; to shrink it for a "
            f"CPU: {SHRINK_HINT} (docs/study.md)")  # fmt: skip


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def _on_cpu(config: TrainConfig) -> bool:
    import torch

    return config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
@dataclass
class SeedRun:
    """One seed of a trial: its objective values, ``result`` summary, reuse attributes and fit seconds."""

    seed: int
    objective: dict[str, float]
    summary: dict[str, Any]
    attrs: dict[str, Any]
    result: Any  # the TrainResult (or, replayed, its twin's figures)
    fit_s: float


def seed_metrics(done: list[SeedRun], paired: dict[str, Any] | None, *, several: bool) -> dict[str, float]:
    """MLflow metrics of a trial's seeds: ``val_acc_seed_<s>`` and ``objective/<name>_seed_<s>`` per seed, and
    the paired comparison (``paired/acc_delta_pts`` with ``_low`` / ``_high``, ``paired/speedup`` likewise)."""
    out: dict[str, float] = {}
    if several:
        for r in done:
            out[f"val_acc_seed_{r.seed}"] = r.objective["accuracy"]
            out |= {f"objective/{k}_seed_{r.seed}": v for k, v in r.objective.items()}
    for key in ("acc_delta_pts", "speedup"):
        stats = (paired or {}).get(key) or {}
        out |= {f"paired/{key}{suffix}": stats[name] for name, suffix in (("mean", ""), ("low", "_low"), ("high", "_high"))
                if isinstance(stats.get(name), (int, float))}  # fmt: skip
    return out


def _both(first: Callable[[Any], None], second: Callable[[Any], None]) -> Callable[[Any], None]:
    def call(record: Any) -> None:
        first(record)
        second(record)

    return call


def _is_pruned(e: BaseException) -> bool:
    import sys

    optuna = sys.modules.get("optuna")
    return optuna is not None and isinstance(e, optuna.TrialPruned)


def baseline_config(study: ResolvedStudy) -> TrainConfig:
    """The config of the study's full-length baseline trial (the first of
    :func:`~wus_tune._study.spec.initial_trials`)."""
    from wus_tune._study.spec import initial_trials

    role, values = initial_trials(study)[0]
    assert role == "baseline", role
    return apply_values(study.base, values)


def baseline_configs(study: ResolvedStudy) -> list[TrainConfig]:
    """The configs of the study's full-length baseline runs (``baseline_repeats``: one per seed), the
    first being :func:`baseline_config`."""
    from wus_tune._study.spec import initial_trials

    return [apply_values(study.base, values) for role, values in initial_trials(study)
            if role == "baseline" and values.get("epochs") == study.base.epochs]  # fmt: skip


def timing_metrics(result: TrainResult) -> dict[str, float]:
    """The relative-time figures of a result, as MLflow metrics (``timing/price/step:full`` & co)."""
    out = {k: v for k in ("relative_time", "reference_time_s", "modelled_time_s", "timing_overhead_s", "coverage")
           if isinstance(v := getattr(result, k, None), (int, float))}  # fmt: skip
    for kind, cost in (getattr(result, "unit_costs", None) or {}).items():
        out[f"timing/price/{kind}"] = cost["seconds"]
    for kind, n in (getattr(result, "work_counts", None) or {}).items():
        out[f"timing/count/{kind}"] = n
    return out


def baseline_by_seed(study: optuna.Study) -> dict[int, tuple[tuple[float, ...], int]]:
    """seed -> (values, trial number) of the COMPLETE full-length baseline trials (the first per seed)."""
    import optuna

    out: dict[int, tuple[tuple[float, ...], int]] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        config = t.user_attrs.get("config") or {}
        if t.user_attrs.get("role") == "baseline" and t.values and "seed" in config:
            out.setdefault(int(config["seed"]), (tuple(t.values), t.number))
    return out


def baseline_values(study: optuna.Study) -> tuple[float, ...] | None:
    """The baseline as every comparison sees it: each objective's median over the COMPLETE baseline
    trials (``baseline_repeats``; :func:`wus_tune._study.front.pooled_baseline`); None while none has completed."""
    import optuna

    from wus_tune._study.candidates import candidate_from_trial
    from wus_tune._study.front import pooled_baseline

    done = [candidate_from_trial(t) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get("role") == "baseline" and t.values]  # fmt: skip
    pooled = pooled_baseline(done)
    return None if pooled is None else tuple(pooled.values)
