"""What a study tells its user: one line per finished trial, the closing summary, and the report written
to a local directory or to the MLflow parent run (plots and tables: :mod:`wus_tune._study.report`)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from wus_tune._study.front import Analysis, Candidate
    from wus_tune._study.spec import ResolvedStudy
    from wus_tune.config import TrainConfig


class TrialPrinter:
    """Optuna callback: one line per finished trial."""

    def __init__(self, study_def: ResolvedStudy, say: Callable[[str], None], ran: list[int]) -> None:
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
        paired = a.get("paired") or {}
        if paired.get("seeds", 1) > 1:  # several seeds: the paired claim, with its 90% interval
            text += f"  {paired_text(paired)} vs baseline ({paired['seeds']} seeds)"
        elif self.baseline is not None and cost > 0:
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


def paired_text(paired: dict[str, Any]) -> str:
    """``1.85x [1.70, 2.01] -0.42 pts [-1.10, +0.26]``: a trial's paired speed-up and accuracy delta with
    their 90% intervals (the point alone where there is none)."""
    out = []
    s, a = paired.get("speedup") or {}, paired.get("acc_delta_pts") or {}
    if s:
        out.append(f"{s['mean']:.2f}x" + (f" [{s['low']:.2f}, {s['high']:.2f}]" if s.get("low") is not None and s.get("high") is not None else ""))
    if a:
        out.append(f"{a['mean']:+.2f} pts" + (f" [{a['low']:+.2f}, {a['high']:+.2f}]" if a.get("low") is not None else ""))
    return " ".join(out)


def write_study_report(*, analysis: Analysis, selected: Candidate | None, rule: Any, study_def: ResolvedStudy,
                       tracker: Any, local: Path | None) -> TrainConfig | None:  # fmt: skip
    """Plots, tables, ``best_config.yaml``, the search space and base config: into ``local``, or into a
    temporary directory logged on the MLflow parent run. Returns the exported config (None if none)."""
    from wus_tune._study.candidates import export_config
    from wus_tune._study.report import write_report

    best = None
    with tempfile.TemporaryDirectory(prefix="wus_tune_report_") as tmp:
        out = local or Path(tmp)
        write_report(analysis, out, study_name=study_def.name, selected=selected.number if selected else None)
        if selected is not None:
            best = export_config(selected, str(out / "best_config.yaml"), study_name=study_def.name, rule=rule)
        (out / "search_space.json").write_text(study_def.space.to_json() + "\n")
        study_def.base.save(out / "base_config.yaml")
        if tracker.enabled:
            log_summary(tracker, analysis, selected, rule, out)
    return best


def print_summary(*, analysis: Analysis, selected: Candidate | None, rule: Any, best: TrainConfig | None,
                  study_def: ResolvedStudy, tracker: Any, ran: list[int], timing: dict[str, float], local: Path | None,
                  table: bool, say: Callable[[str], None]) -> None:  # fmt: skip
    """The closing lines: the table (``table``), the counts, reuse, timing, the pick, tuned-plain, the
    baseline's price and where the report is."""
    from wus_tune._study.report import format_table
    from wus_tune._study.reuse import summary_lines as reuse_lines
    from wus_tune._study.seeds import frontier_lines
    from wus_tune._study.storage import mask_url
    from wus_tune._study.tuned_plain import compare, summary_lines as tuned_plain_lines

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
    for line in reuse_lines(analysis.candidates):
        say(line)
    if timing:
        say(f"per trial: training {timing['fit_s']:.2f}s, study machinery {timing['overhead_s']:.3f}s "
            f"(of which MLflow {timing['mlflow_s']:.3f}s)")  # fmt: skip
    if selected is not None:
        test = (selected.attrs.get("result") or {}).get("test_acc")
        say(f"selected by {rule}: trial {selected.number} (<)"
            + (f"; validation {selected.values[0]:.2%}, held-out test {test:.2%} (reported only, never used to select)"
               if test is not None else ""))  # fmt: skip
    if selected is not None and (selected.attrs.get("paired") or {}).get("seeds", 1) > 1:
        paired = selected.attrs["paired"]
        say(f"its claim over {paired['seeds']} paired seeds (90% intervals): {paired_text(paired)} vs the baseline")
    for line in frontier_lines(analysis):
        say(line)
    for line in tuned_plain_lines(compare(analysis), analysis.objectives[1]):
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


def log_summary(tracker: Any, analysis: Analysis, selected: Candidate | None, rule: Any, out: Path) -> None:
    """The report's files, the summary metrics and tags on the parent run; each child run tagged on or off the front."""
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


def mean_timing(cands: Sequence[Candidate]) -> dict[str, float]:
    """Mean seconds per trial of training, study machinery and MLflow over ``cands``; {} without any."""
    rows = [t for c in cands if "overhead_s" in (t := c.attrs.get("result") or c.attrs.get("timing") or {})]
    if not rows:
        return {}
    return {k: sum(float(r.get(k, 0.0)) for r in rows) / len(rows) for k in ("fit_s", "overhead_s", "mlflow_s")}
