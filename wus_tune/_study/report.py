"""The study's report: console table, trials CSV, Pareto plot (PNG and interactive HTML), hypervolume history.

All relative figures are against the study's full-length baseline (role ``baseline``) and the baseline
frontier (the Pareto front of the plain trials); see :mod:`wus_tune._study.front` for the definitions.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wus_tune._study.front import Analysis, Candidate, Rule
from wus_tune._study.seeds import versus_frontier

_AXIS = {"time": "training time incl. required evaluations (s, wall)", "cost": "training cost (FLOPs)",
         "relative_time": "time in full-length baseline runs (priced per trial on its device)"}
_MARKERS = "oD^v<>Ph*Xd"


def variant(c: Candidate) -> str:
    """What a trial ran, as the study recorded it (``variant``: ``none``, ``wus``, ``wus+lr``,
    ``approx_ops+wus``, :func:`wus_tune._study.catalog.trial_label`); without that record, its ``method``
    choice, or ``none`` for plain training."""
    recorded = c.attrs.get("variant")
    method = c.attrs.get("method")
    if recorded is None or (recorded == "none" and method not in (None, "none")):  # an older study: WUS's variant only
        return str(method) if method is not None else ("method" if c.uses_method else "none")
    return str(recorded)


def label(c: Candidate) -> str:
    """What a trial ran (:func:`variant`); tuned-plain and guideline trials are marked."""
    if c.role == "tuned-plain":
        return "none (tuned)"
    return f"{variant(c)} (guideline)" if c.role == "guideline" else variant(c)


def _labels(cands: Sequence[Candidate]) -> list[str]:
    """The labels found, the plain recipe first."""
    found = {label(c) for c in cands}
    return [x for x in ("none",) if x in found] + sorted(found - {"none"})


def step_mix(result: Mapping[str, Any]) -> str:
    """The steps of each kind a method named, as fractions of a trial's steps (``"skip:all 13%"``), from its
    ``result`` summary; empty for plain training."""
    from wus_tune.trainer import FULL_KIND

    counts = {k.removeprefix("step:"): n for k, n in (result.get("work_counts") or {}).items() if k.startswith("step:")}
    total = sum(counts.values())
    return ", ".join(f"{kind} {n / total:.0%}" for kind, n in counts.items() if kind != FULL_KIND and n) if total else ""


_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_GREY = "#7f7f7f"
_HUES = tuple(c for c in _PALETTE if c != _GREY)


def _colors(names: Sequence[str]) -> dict[str, str]:
    """Each label's colour: grey for the plain recipe, the others tab10's hues in :func:`_labels` order
    (as hex: plotly reads no ``C0`` names), so every method, a plug-in's from an entry point too, gets
    one without a table of method names."""
    others = [n for n in names if n != "none"]
    return {"none": _GREY} | {n: _HUES[k % len(_HUES)] for k, n in enumerate(others)}


def _legend(name: str) -> str:
    if name == "none (tuned)":
        return "plain, optimizer tuned (the yardstick of methods that tune it)"
    return "plain (no method)" if name == "none" else name


def _fmt_cost(name: str, v: float) -> str:
    if name == "sparsity":
        return f"{v:.1%}"
    if name == "relative_time":
        return f"{v:.3f}"
    return f"{v:.1f}s" if name == "time" else f"{v:.3g}"


def relative(analysis: Analysis, c: Candidate) -> dict[str, float | None]:
    """Accuracy change (points) and speed-up versus the baseline, and the advantage over the frontier."""
    out: dict[str, float | None] = dict.fromkeys(
        ("acc_delta_pts", "speedup", "frontier_acc_gain_pts", "frontier_time_saved", "frontier_time_saved_fraction")
    )
    if not c.ok:
        return out
    b = analysis.baseline
    if b is not None:
        out["acc_delta_pts"] = (c.values[0] - b.values[0]) * 100
        out["speedup"] = b.values[1] / c.values[1] if c.values[1] > 0 else None
    paired = c.attrs.get("paired") or {}
    if paired.get("seeds", 1) > 1:  # several seeds: the claim is the paired one (seed s against baseline seed s)
        for key in ("acc_delta_pts", "speedup"):
            if paired.get(key):
                out[key] = paired[key]["mean"]
    adv = analysis.advantages.get(c.number)
    if adv is not None and c.uses_method:  # a plain trial's advantage over its own frontier is not informative
        out["frontier_acc_gain_pts"] = None if adv.acc_gain is None else adv.acc_gain * 100
        out["frontier_time_saved"] = adv.time_saved
        out["frontier_time_saved_fraction"] = adv.time_saved_fraction
    return out


def _bounds(c: Candidate, key: str, fmt: str) -> str:
    """`` [low, high]``: the trial's paired 90% interval of ``key`` (``acc_delta_pts``, ``speedup``); "" without one."""
    stats = ((c.attrs.get("paired") or {}).get(key)) or {}
    if stats.get("n", 0) < 2 or stats.get("low") is None or stats.get("high") is None:
        return ""
    return f" [{stats['low']:{fmt}}, {stats['high']:{fmt}}]"


def seed_entry(analysis: Analysis, c: Candidate) -> dict[str, Any] | None:
    """A trial's seeds for ``--format json``: ``per_seed`` (``seed`` and the objective values by name) and, per
    objective, the mean with its 90% interval over the seeds (``Interval.to_dict``); None for a trial run
    before seeds were recorded."""
    from wus_tune.intervals import mean_difference

    per_seed = c.attrs.get("seeds")
    if not per_seed:
        return None
    rows = [{"seed": e["seed"], "values": dict(zip(analysis.objectives, e["values"]))} for e in per_seed]
    return {"per_seed": rows,
            "objectives": {name: mean_difference([e["values"][k] for e in per_seed]).to_dict()
                           for k, name in enumerate(analysis.objectives)}}  # fmt: skip


def reuse_mark(c: Candidate) -> str:
    """`` =baseline`` for a trial completed with the baseline's values (not trained), `` forked@k`` for one
    resumed from the baseline's snapshot at check k (:mod:`wus_tune._study.reuse`)."""
    if c.attrs.get("reused"):
        return f" ={c.attrs['reused']}"
    forked = c.attrs.get("forked")
    return f" forked@{forked['point']}" if isinstance(forked, dict) else ""


def table_rows(analysis: Analysis, numbers: Sequence[int], *, mark: int | None = None) -> list[list[str]]:
    """Header plus one row per trial number, ordered by time/cost."""
    obj = analysis.objectives[1]
    third = list(analysis.objectives[2:])
    header = ["trial", "role", "method", "accuracy", "vs base", obj, *third, "speed-up", "vs frontier", "saved", "front"]
    cands = sorted((analysis.by_number(n) for n in numbers), key=lambda c: (c.values or (0, 0))[1])
    rows = [header]
    front = set(analysis.front)
    for c in cands:
        if not c.ok:
            continue
        r = relative(analysis, c)
        rows.append([
            str(c.number) + ("<" if c.number == mark else ""),
            c.role + reuse_mark(c),
            label(c).removesuffix(" (guideline)"),
            f"{c.values[0] * 100:.2f}%",
            "" if r["acc_delta_pts"] is None else f"{r['acc_delta_pts']:+.2f}" + _bounds(c, "acc_delta_pts", "+.2f"),
            _fmt_cost(obj, c.values[1]),
            *(_fmt_cost(name, v) for name, v in zip(third, c.values[2:])),
            "" if r["speedup"] is None else f"{r['speedup']:.2f}x" + _bounds(c, "speedup", ".2f"),
            "" if r["frontier_acc_gain_pts"] is None else f"{r['frontier_acc_gain_pts']:+.2f} pts",
            "" if r["frontier_time_saved_fraction"] is None else f"{r['frontier_time_saved_fraction'] * 100:+.0f}%",
            "*" if c.number in front else "",
        ])  # fmt: skip
    return rows


def format_table(analysis: Analysis, numbers: Sequence[int] | None = None, *, mark: int | None = None) -> str:
    """The given trials (default: the Pareto front) as a text table, relative to the baseline."""
    rows = table_rows(analysis, numbers if numbers is not None else analysis.front, mark=mark)
    if not rows:
        return "(no completed trials)"
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def front_json(analysis: Analysis, *, study_name: str, rule: Rule | str, selected: Candidate | None,
               numbers: Sequence[int] | None = None) -> dict[str, Any]:
    """The front (or ``numbers``) and the baseline as JSON-ready data: each entry has ``number``, ``role``,
    ``method``, ``accuracy``, the objective values by name, ``speedup`` (the baseline's value of the study's
    time objective over the trial's), ``acc_delta_pts``, ``selected``, ``test_accuracy`` (None without a test
    split; never used to select), ``time_s`` (wall) and the frontier figures; with several seeds per trial
    (``seeds:``) ``seeds`` (per-seed values, and each objective's mean with its 90% interval), ``paired`` (the
    paired accuracy delta and speed-up with their intervals) and ``versus_frontier`` (above / below /
    undecided: statistically indistinguishable from the baseline frontier). ``trials`` lists every completed
    trial the same way."""
    def entry(c: Candidate) -> dict[str, Any]:
        r = relative(analysis, c)
        res = c.attrs.get("result") or {}
        out: dict[str, Any] = {"number": c.number, "role": c.role, "method": label(c), "accuracy": c.values[0]}
        out.update({name: v for name, v in zip(analysis.objectives, c.values)})
        out.update(speedup=r["speedup"], acc_delta_pts=r["acc_delta_pts"],
                   selected=selected is not None and c.number == selected.number,
                   test_accuracy=res.get("test_acc"), time_s=res.get("time_s"), relative_time=res.get("relative_time"),
                   frontier_acc_gain_pts=r["frontier_acc_gain_pts"],
                   frontier_time_saved_fraction=r["frontier_time_saved_fraction"], pareto=c.number in analysis.front)  # fmt: skip
        out.update(seeds=seed_entry(analysis, c), paired=c.attrs.get("paired"), versus_frontier=versus_frontier(c, analysis))
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}

    shown = [analysis.by_number(n) for n in (numbers if numbers is not None else analysis.front)]
    base = analysis.baseline
    baseline = None
    if base is not None:
        baseline = entry(base) | {"trials": base.attrs.get("baseline_trials", [base.number])}
        baseline.update({name: v for name, v in zip(analysis.objectives, base.values)}, accuracy=base.values[0])
    return {
        "study": study_name,
        "objectives": list(analysis.objectives),
        "time_objective": analysis.objectives[1],
        "rule": str(rule),
        "selected": selected.number if selected is not None else None,
        "baseline": baseline,
        "front": [entry(c) for c in sorted(shown, key=lambda c: c.values[1]) if c.ok],
        "trials": [entry(c) for c in analysis.complete],
    }


def write_csv(analysis: Analysis, path: Path, *, selected: int | None = None) -> Path:
    """Every trial (failed and pruned ones too), with objective values, the Pareto flag and the relative figures."""
    front = set(analysis.front)
    fields = ["trial", "state", "role", "variant", "feasible", *analysis.objectives, "pareto", "selected",
              "acc_delta_pts", "speedup", "frontier_acc_gain_pts", "frontier_time_saved", "frontier_time_saved_fraction",
              "time_s", "relative_time", "reference_time_s", "test_acc", "cost_flops", "changed_step_fraction", "flops_fraction", "epochs",
              "mlflow_run_id", "fail_reason", "pruned_at_epoch", "params", "reused", "forked_at_check", "not_forked", "method"]  # fmt: skip
    fields = list(dict.fromkeys(fields))  # an objective named like a result field (relative_time) once
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for c in analysis.candidates:
            res = c.attrs.get("result") or {}
            row: dict[str, Any] = {
                "trial": c.number, "state": c.state, "role": c.role, "variant": variant(c),
                "method": c.attrs.get("method", variant(c)), "feasible": c.feasible,
                "pareto": c.number in front, "selected": c.number == selected,
                "time_s": res.get("time_s"), "cost_flops": res.get("cost_flops"),
                "relative_time": res.get("relative_time"), "reference_time_s": res.get("reference_time_s"),
                "test_acc": res.get("test_acc"),
                "changed_step_fraction": res.get("changed_step_fraction"), "flops_fraction": res.get("flops_fraction"),
                "epochs": (c.config or {}).get("epochs"), "mlflow_run_id": c.attrs.get("mlflow_run_id"),
                "fail_reason": c.attrs.get("fail_reason"), "params": json.dumps(c.params, sort_keys=True),
                "pruned_at_epoch": (c.attrs.get("pruned") or {}).get("epoch"),  # state PRUNED: stopped by the pruner
                "reused": c.attrs.get("reused"), "forked_at_check": (c.attrs.get("forked") or {}).get("point"),
                "not_forked": c.attrs.get("reuse_skipped"),
            }  # fmt: skip
            row.update(relative(analysis, c))
            for name, v in zip(analysis.objectives, c.values or ()):
                row[name] = v
            w.writerow(row)
    return path


def write_hypervolume(analysis: Analysis, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe in worker threads
    import matplotlib.pyplot as plt

    csv_path = out / "hypervolume_history.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "hypervolume", "reference"])
        for n, hv in analysis.hv_history:
            w.writerow([n, hv, json.dumps(list(analysis.reference or ()))])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if analysis.hv_history:
        xs, ys = zip(*analysis.hv_history)
        ax.step(xs, ys, where="post", marker="o", ms=3)
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume")
    ref = ", ".join(f"{v:.4g}" for v in analysis.reference or ())
    ax.set_title(f"hypervolume history (reference {ref})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = out / "hypervolume_history.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [csv_path, png]


def _xy(analysis: Analysis, cands: Sequence[Candidate]) -> tuple[list[float], list[float]]:
    return [c.values[1] for c in cands], [c.values[0] * 100 for c in cands]


def _error_bar(c: Candidate) -> tuple[float, float] | None:
    """(below, above) the point, in accuracy points: the trial's paired 90% accuracy-delta interval."""
    stats = ((c.attrs.get("paired") or {}).get("acc_delta_pts")) or {}
    if stats.get("n", 0) < 2 or stats.get("low") is None or stats.get("high") is None:
        return None
    return stats["mean"] - stats["low"], stats["high"] - stats["mean"]


def write_pareto_png(analysis: Analysis, path: Path, *, title: str, selected: int | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obj = analysis.objectives[1]
    done = analysis.complete
    front = sorted((analysis.by_number(n) for n in analysis.front), key=lambda c: c.values[1])
    third = analysis.objectives[2] if len(analysis.objectives) > 2 else None
    fig, ax = plt.subplots(figsize=(7.6 if third else 7, 4.5))
    # Two objectives: colour = method. A third (sparsity/params): colour = its value, marker = method,
    # and the front (a surface in 3-D, no staircase in this projection) is ringed instead of joined.
    norm = None
    if third:
        from matplotlib.colors import Normalize

        zs = [c.values[2] for c in done]
        norm = Normalize(min(zs, default=0.0), max(zs, default=1.0) if zs and max(zs) > min(zs) else min(zs, default=0.0) + 1)
    labels = _labels(done)
    colors = _colors(labels)
    for i, name in enumerate(labels):
        cs = [c for c in done if label(c) == name]
        marker = "s" if name == "none" else _MARKERS[i % len(_MARKERS)]
        if third:
            ax.scatter(*_xy(analysis, cs), s=30, c=[c.values[2] for c in cs], cmap="viridis", norm=norm,
                            marker=marker, edgecolors="#333", linewidths=0.4, label=_legend(name))  # fmt: skip
        else:
            ax.scatter(*_xy(analysis, cs), s=22, color=colors[name], alpha=0.75, label=_legend(name), marker=marker)
        bars = [(c, e) for c in cs if (e := _error_bar(c)) is not None]
        if bars:  # several seeds: the paired 90% interval of the accuracy delta, around the point
            x, y = _xy(analysis, [c for c, _ in bars])
            ax.errorbar(x, y, yerr=[[e[0] for _, e in bars], [e[1] for _, e in bars]], fmt="none",
                        ecolor=colors[name], alpha=0.5, lw=0.8)  # fmt: skip
    if third:
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax,
                     label={"sparsity": "sparsity (masked fraction of the constrained weights)",
                            "params": "active parameters"}.get(third, third))  # fmt: skip
    infeasible = [c for c in analysis.candidates if c.state == "COMPLETE" and not c.feasible and c.values]
    if infeasible:
        ax.scatter(*_xy(analysis, infeasible), s=22, facecolors="none", edgecolors="#999", label="infeasible")
    if front and third:
        ax.scatter(*_xy(analysis, front), s=90, facecolors="none", edgecolors="#2ca02c", lw=1.4,
                   label=f"Pareto front (accuracy, {analysis.objectives[1]}, {third})")  # fmt: skip
    elif front:
        ax.step(*_xy(analysis, front), where="post", color="#2ca02c", lw=1.2, label="Pareto front")
    frontier = analysis.frontier
    if len(frontier) >= 1:
        ax.plot(*_xy(analysis, frontier), "--", color="#555", lw=1.2, label="baseline frontier (plain, fewer epochs)")
    if analysis.baseline is not None:
        ax.scatter(*_xy(analysis, [analysis.baseline]), s=160, marker="*", color="black", zorder=5, label="baseline")
    if selected is not None:
        c = analysis.by_number(selected)
        ax.scatter(*_xy(analysis, [c]), s=140, facecolors="none", edgecolors="red", lw=1.8, zorder=6,
                   label=f"selected (trial {selected})")
    ax.set_xlabel(_AXIS.get(obj, obj))
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_pareto_html(analysis: Analysis, path: Path, *, title: str, selected: int | None = None) -> Path:
    import plotly.graph_objects as go

    obj = analysis.objectives[1]

    def hover(c: Candidate) -> str:
        r = relative(analysis, c)
        parts = [f"trial {c.number} ({c.role}, {label(c)})", f"accuracy {c.values[0] * 100:.2f}%",
                 f"{obj} {_fmt_cost(obj, c.values[1])}"]  # fmt: skip
        parts += [f"{name} {_fmt_cost(name, v)}" for name, v in zip(analysis.objectives[2:], c.values[2:])]
        if r["speedup"] is not None:
            parts.append(f"{r['speedup']:.2f}x{_bounds(c, 'speedup', '.2f')} vs baseline, "
                         f"{r['acc_delta_pts']:+.2f} pts{_bounds(c, 'acc_delta_pts', '+.2f')}")  # fmt: skip
        if r["frontier_acc_gain_pts"] is not None:
            parts.append(f"{r['frontier_acc_gain_pts']:+.2f} pts vs frontier at equal {obj}")
        parts += [f"{k} = {v}" for k, v in sorted(c.params.items())]
        return "<br>".join(parts)

    fig = go.Figure()
    done = analysis.complete
    third = analysis.objectives[2] if len(analysis.objectives) > 2 else None
    symbols = ["circle", "diamond", "triangle-up", "triangle-down", "cross", "x", "star", "hexagon", "pentagon"]
    labels = _labels(done)
    colors = _colors(labels)
    for i, name in enumerate(labels):
        cs = [c for c in done if label(c) == name]
        x, y = _xy(analysis, cs)
        marker: dict[str, Any] = dict(symbol="square" if name == "none" else symbols[i % len(symbols)])
        if third:
            marker.update(color=[c.values[2] for c in cs], colorscale="Viridis", showscale=i == 0,
                          colorbar=dict(title=third), line=dict(width=0.5, color="#333"))  # fmt: skip
            zs = [c.values[2] for c in done]
            marker.update(cmin=min(zs), cmax=max(zs))
        else:
            marker["color"] = colors[name]
        bars = [_error_bar(c) or (0.0, 0.0) for c in cs]
        error_y = dict(type="data", symmetric=False, array=[b[1] for b in bars], arrayminus=[b[0] for b in bars],
                       thickness=0.8, width=2) if any(b != (0.0, 0.0) for b in bars) else None  # fmt: skip
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", name=_legend(name), marker=marker, error_y=error_y,
                                 text=[hover(c) for c in cs], hoverinfo="text"))  # fmt: skip
    front = sorted((analysis.by_number(n) for n in analysis.front), key=lambda c: c.values[1])
    if front and third:
        x, y = _xy(analysis, front)
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", name="Pareto front (3 objectives)",
                                 marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(color="#2ca02c", width=2))))  # fmt: skip
    elif front:
        x, y = _xy(analysis, front)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", line=dict(shape="hv", color="#2ca02c"), name="Pareto front"))
    if analysis.frontier:
        x, y = _xy(analysis, analysis.frontier)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", line=dict(dash="dash", color="#555"), name="baseline frontier"))
    if analysis.baseline is not None:
        x, y = _xy(analysis, [analysis.baseline])
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", marker=dict(symbol="star", size=16, color="black"),
                                 name="baseline", text=[hover(analysis.baseline)], hoverinfo="text"))  # fmt: skip
    if selected is not None:
        c = analysis.by_number(selected)
        x, y = _xy(analysis, [c])
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", name=f"selected (trial {selected})",
                                 marker=dict(size=18, color="rgba(0,0,0,0)", line=dict(color="red", width=2)),
                                 text=[hover(c)], hoverinfo="text"))  # fmt: skip
    fig.update_layout(
        title=title,
        xaxis_title=_AXIS.get(obj, obj),
        yaxis_title="validation accuracy (%)",
        template="plotly_white",
    )
    # Self-contained (plotly.js inlined): the artifact opens offline and inside MLflow's artifact viewer.
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


def write_report(analysis: Analysis, out: str | Path, *, study_name: str, selected: int | None = None) -> list[Path]:
    """All report files into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{study_name}: {len(analysis.complete)} trials, {len(analysis.front)} on the Pareto front"
    paths = [write_csv(analysis, out / "trials.csv", selected=selected)]
    if analysis.complete:
        paths.append(write_pareto_png(analysis, out / "pareto_front.png", title=title, selected=selected))
        paths.append(write_pareto_html(analysis, out / "pareto_front.html", title=title, selected=selected))
        paths += write_hypervolume(analysis, out)
    return paths
