"""The Pareto analysis of a study from the command line, and the names its maths and loading export.

``python -m wus_tune.pareto --study NAME`` prints the front, exports the config a rule (or ``--trial``)
picks and confirms the pick (:mod:`wus_tune.confirm`). The definitions (dominance, hypervolume, the
baseline frontier, the knee, the selection rules) and the maths live in :mod:`wus_tune._study.front`
(pure Python, no Optuna); reading a study's trials in :mod:`wus_tune._study.candidates`. Both are
importable from here, as they always were::

    >>> from wus_tune.pareto import hypervolume, pareto_front
    >>> pareto_front([(0.9, 10.0), (0.8, 5.0), (0.85, 12.0)], ["maximize", "minimize"])
    [0, 1]
    >>> hypervolume([(0.9, 10.0), (0.8, 5.0)], ["maximize", "minimize"], (0.7, 20.0))
    2.0
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from wus_tune._study import candidates as _candidates
from wus_tune._study import front as _front
from wus_tune._study.candidates import (
    candidate_from_trial,
    export_config,
    load_analysis,
    load_candidates,
    study_objectives,
)
from wus_tune._study.front import (
    OBJECTIVES,
    RULES,
    Advantage,
    Analysis,
    Candidate,
    Rule,
    analyse,
    dominates,
    frontier_advantage,
    hypervolume,
    hypervolume_history,
    knee,
    objective_direction,
    objective_names,
    objective_values,
    on_frontier,
    parse_rule,
    pareto_front,
    pooled_baseline,
    reference_point,
    select,
    with_feasibility,
)
from wus_tune._study.report import format_table, front_json
from wus_tune.errors import UsageError

if TYPE_CHECKING:
    import argparse

    import optuna

    from wus_tune._cli import ArgumentParser

# what users import from here: the CLI, two report helpers, the front maths and the loading
__all__ = ["format_table", "front_json", "main"]
__all__ += _front.__all__
__all__ += _candidates.__all__


def build_parser() -> ArgumentParser:
    from wus_tune._cli import ArgumentParser  # a bad option is one line and exit 2, like every CLI here

    p = ArgumentParser(
        prog="python -m wus_tune.pareto",
        description="Print a study's Pareto front, export the config chosen by a rule (or any trial's), confirm the pick.",
    )
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///studies/<study>.db)")
    p.add_argument("--select", help="knee | fastest-within:D (points) | most-accurate-under:S (seconds, FLOPs or N%%); "
                   "default: the study's own rule (the one its best_config.yaml used)")
    p.add_argument("--trial", type=int, help="export (--out) or confirm (--confirm) this trial instead of the rule's pick "
                   "(any trial with a config, the baseline too)")  # fmt: skip
    p.add_argument("--out", help="write the chosen config here (YAML or .json), for wus_tune.train --config")
    p.add_argument("--all", action="store_true", help="list every completed trial, not only the front")
    p.add_argument("--format", choices=("text", "json"), default="text", help="text table (default) or JSON on stdout")
    p.add_argument("--confirm", metavar="auto|K",
                   help="re-run the pick (or --trial), the baseline and the frontier point in interleaved rounds (fresh seeds) "
                        "until a paired 90%% interval decides whether the study's claim holds: auto starts with 3 rounds, "
                        "K (>= 2) with K (wus_tune.confirm)")  # fmt: skip
    p.add_argument("--max-rounds", type=int, default=8, metavar="N",
                   help="rounds --confirm adds at most before it says undecided (default 8)")
    p.add_argument("--tracking-uri", help="MLflow URI to log a confirmation under the study's parent run "
                   "(default: the study's own, when it holds no password)")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wus_tune.pareto --study NAME [--storage URL] [--select RULE | --trial N] [--out best.yaml]
    [--format text|json] [--confirm auto|K [--max-rounds N]]``."""
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        rule = parse_rule(args.select) if args.select else None
        study, analysis = load_analysis(args.study, args.storage)
        rule = rule or parse_rule((study.user_attrs.get("spec") or {}).get("select") or "knee")
        by_rule = analysis.select(rule) if analysis.complete else None
        chosen = _chosen(args, analysis, by_rule)
        numbers = [c.number for c in analysis.complete] if args.all else analysis.front
        if args.format == "json":
            _print_json(args, study, analysis, rule, by_rule, numbers)
        else:
            _print_text(study, analysis, by_rule, numbers)
        if chosen is None:
            raise UsageError(f"study {args.study!r} has no completed trials yet")
        say = print if args.format == "text" else (lambda text: print(text, file=sys.stderr))
        if args.trial is None:
            say(f"selected by {rule}: trial {chosen.number}")
        if args.out:
            _export(args, study, chosen, rule, say)
        _confirm(args, study, analysis, rule, say)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _check_args(args: argparse.Namespace) -> None:
    if args.trial is not None and args.select:
        raise UsageError("--trial and --select: choose one")
    if args.confirm is not None:
        from wus_tune.confirm import parse_rounds

        args.confirm = parse_rounds(args.confirm)
    if args.max_rounds < 2:
        raise UsageError(f"--max-rounds: expected an integer >= 2, got {args.max_rounds}")


def _chosen(args: argparse.Namespace, analysis: Analysis, by_rule: Candidate | None) -> Candidate | None:
    """The trial to export or confirm: ``--trial N``, else the rule's pick (None while nothing completed)."""
    if args.trial is None:
        return by_rule
    try:
        return analysis.by_number(args.trial)
    except KeyError:
        raise UsageError(f"--trial {args.trial}: study {args.study!r} has no such trial "
                         f"(trials 0..{len(analysis.candidates) - 1})") from None  # fmt: skip


def _print_json(args: argparse.Namespace, study: optuna.Study, analysis: Analysis, rule: Rule,
                by_rule: Candidate | None, numbers: Sequence[int]) -> None:  # fmt: skip
    import json

    from wus_tune._study.tuned_plain import compare

    data = front_json(analysis, study_name=study.study_name, rule=rule, selected=by_rule, numbers=numbers)
    data["confirmation"] = study.user_attrs.get("confirmation")
    data["tuned_plain"] = compare(analysis)
    if args.trial is not None:
        data["trial"] = args.trial
    print(json.dumps(data, indent=2))


def _print_text(study: optuna.Study, analysis: Analysis, by_rule: Candidate | None, numbers: Sequence[int]) -> None:
    from wus_tune._study.tuned_plain import compare, summary_lines

    print(f"study {study.study_name}: {len(analysis.complete)} completed trials, {len(analysis.front)} on the front")
    print(format_table(analysis, numbers, mark=by_rule.number if by_rule else None))
    for line in summary_lines(compare(analysis), analysis.objectives[1]):
        print(line)


def _export(args: argparse.Namespace, study: optuna.Study, chosen: Candidate, rule: Rule,
            say: Callable[[str], None]) -> None:  # fmt: skip
    try:
        export_config(chosen, args.out, study_name=study.study_name,
                      rule=f"trial {chosen.number}" if args.trial is not None else rule)  # fmt: skip
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
    say(f"wrote {args.out}  (trial {chosen.number}; train it: python -m wus_tune.train --config {args.out})")


def _confirm(args: argparse.Namespace, study: optuna.Study, analysis: Analysis, rule: Rule,
             say: Callable[[str], None]) -> Any:  # fmt: skip
    """``--confirm auto|K``: re-run the pick; without it, the text output ends with the last confirmation."""
    if args.confirm:
        from wus_tune.confirm import confirm_study

        return confirm_study(study, analysis, rule=rule, repeats=args.confirm, max_rounds=args.max_rounds, say=say,
                             tracking_uri=args.tracking_uri, trial=args.trial)  # fmt: skip
    if args.format == "text":
        from wus_tune.confirm import stored_summary

        text = stored_summary(study)
        if text:
            say("last " + text)
    return None


if __name__ == "__main__":
    sys.exit(main())
