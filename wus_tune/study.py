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

Python API: :func:`run_study` (its steps: :mod:`wus_tune._study.run`). This module is the command line
and the public names; where the trials run is :mod:`wus_tune._study.launch`. See ``docs/study.md``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from wus_tune._cli import ArgumentParser, add_set_option, config_overrides, run_main
from wus_tune._study.run import (
    StudyOutcome,
    analyse_study,
    open_study,
    report_study,
    resolve_study,
    run_study,
    run_trials,
)
from wus_tune._study.spec import StudySpec, initial_trials
from wus_tune.errors import UsageError

__all__ = [
    "StudyOutcome",
    "StudySpec",
    "analyse_study",
    "build_parser",
    "initial_trials",
    "main",
    "open_study",
    "report_study",
    "resolve_study",
    "run_study",
    "run_trials",
    "spec_from_args",
]

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
    p.add_argument("--seeds", metavar="K", help="evaluate every trial on K seeds, paired with the baseline's (default 1; "
                   "a spec's seeds: {min: m, max: M} races; docs/study.md, 'Several seeds')")
    p.add_argument("--constraint-delta", type=float, help="feasible only if accuracy >= baseline - DELTA points")
    p.add_argument("--select", help="rule for best_config.yaml: knee | fastest-within:D | most-accurate-under:S")
    p.add_argument("--pruner", help="none (default) | frontier: stop trials that cannot end above the baseline frontier | "
                   "pareto: rank trials at rungs (docs/study.md, Early stopping)")
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
    if args.seeds is not None:
        from wus_tune._study.seeds import parse_seeds

        if not args.seeds.strip().isdigit() or int(args.seeds) < 1:  # K only: a race is written in a spec
            raise UsageError(f"--seeds: expected an integer >= 1, got {args.seeds!r}")
        changes["seeds"] = parse_seeds(int(args.seeds), "--seeds").max
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
