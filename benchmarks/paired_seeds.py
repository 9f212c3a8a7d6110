"""Claims with error bars, and what they cost: ``seeds: 1`` against ``seeds: 3`` and ``seeds: {min: 1, max: 3}``.

    python benchmarks/paired_seeds.py [--spec benchmarks/specs/vgg11-cifar10-subset.yaml] [--sampler-seeds 0,1,2]
                                      [--trials 24] [--modes 1,3,1-3] [--confirm-rounds 3] [--out FILE.json]
    python benchmarks/paired_seeds.py --quick      # a smoke run: digits, a tiny MLP, 3 epochs, a few trials

Runs the spec's study once per mode and sampler seed, each in a fresh directory (SQLite Optuna storage,
MLflow off), then confirms the pick with fresh seeds (``wus_tune.confirm``, ``--confirm-rounds`` paired
rounds, never a seed the study used). Per study it reports:

* compute: the FLOPs the study's ``fit`` calls executed (``compute_flops``: a fork's prefix is the
  baseline's, a replayed seed runs nothing), that in full-length baseline runs (``baseline_runs``: FLOPs
  over one baseline run's), their summed wall seconds (``fit_s``) and that in baseline runs
  (``baseline_runs_wall``: over a baseline seed's mean ``fit`` seconds; the relative-time view of the
  compute, measured, so load-dependent), and ``scratch_flops``, what the same trials would cost with every
  seed trained from scratch;
* the pick's accuracy claim: its paired 90% interval (seed ``s`` against the baseline's seed ``s``) and,
  from the same runs, the unpaired one (Welch, the pairing ignored): their widths and ratio;
* the confirmation: its verdict, and whether its fresh mean lies inside the claimed interval (``seeds: 1``
  claims no interval).

The issue's aims (``seeds: 3`` at most 2.2x the compute of ``seeds: 1`` and at most half of three
from-scratch seeds per trial; racing at most 1.5x; the paired interval at least 2x narrower; the
confirmation inside the claim in 3 of 3 runs) are printed beside the figures as met / missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = {"1": 1, "3": 3, "1-3": {"min": 1, "max": 3}}
QUICK = {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "epochs": 3, "device": "cpu",
         "schedule": {"name": "step"}}  # fmt: skip


def run_one(spec_path: str | None, mode: str, seed: int, trials: int, rounds: int, workdir: Path, quick: bool) -> dict:
    import yaml

    from wus_tune._study.front import parse_rule
    from wus_tune._study.seeds import unpaired_acc_interval
    from wus_tune._study.spec import StudySpec
    from wus_tune.confirm import confirm
    from wus_tune.study import run_study

    raw = yaml.safe_load(Path(spec_path).read_text()) if spec_path else {}
    if quick:
        # a pick other than the baseline, so the smoke run reaches the interval widths and the confirmation
        raw |= {"train": QUICK, "baseline_fractions": [0.67], "baseline_repeats": 1, "select": "fastest-within:50"}
    name = f"{raw.get('name', 'study')}-seeds{mode}-{seed}"
    raw |= {"name": name, "n_trials": trials, "seed": seed, "seeds": MODES[mode], "tracking_uri": "none",
            "storage": f"sqlite:///{workdir}/{name}.db", "confirm": 0}  # fmt: skip
    raw.setdefault("train", {})["seed"] = seed
    data = raw.get("train", {}).get("data", {})
    if data.get("data_dir"):  # the study runs in workdir
        data["data_dir"] = str(Path(data["data_dir"]).resolve())
    spec = StudySpec.from_dict(raw, spec_path or "quick")
    start = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(workdir)  # the baseline's snapshots go to studies/<name>/ here
    try:
        outcome = run_study(spec, echo=None, report_dir=workdir / "report" / name)
        pick = outcome.selected
        conf = None
        if pick is not None and pick.role != "baseline":
            conf = confirm(outcome.analysis, study_name=name, rule=parse_rule(spec.select), repeats=rounds,
                           max_rounds=max(2, rounds), say=None)  # fmt: skip
    finally:
        os.chdir(cwd)
    wall = time.perf_counter() - start
    cands = [c for c in outcome.analysis.candidates if c.state == "COMPLETE"]
    res = lambda c: c.attrs.get("result") or {}  # noqa: E731
    baselines = {c.config["seed"]: c for c in cands if c.role == "baseline"}
    one_run = float(res(next(iter(baselines.values()))).get("cost_flops") or 1.0) if baselines else 1.0
    flops = sum(float(res(c).get("compute_flops", res(c).get("cost_flops", 0.0))) for c in cands)
    fit_s = sum(float(e.get("fit_s", 0.0)) for c in cands for e in c.attrs.get("seeds") or [])
    base_fit = statistics.fmean(float(e.get("fit_s", 0.0)) for c in baselines.values() for e in c.attrs.get("seeds") or []) \
        if baselines else 0.0  # fmt: skip
    scratch = sum(float(res(c).get("cost_flops", 0.0)) * len(c.attrs.get("seeds") or [0]) for c in cands)
    out = {
        "mode": mode, "sampler_seed": seed, "trials": len(cands), "wall_s": wall,
        "fit_s": fit_s, "baseline_runs_wall": fit_s / base_fit if base_fit else None,
        "compute_flops": flops, "baseline_runs": flops / one_run, "scratch_flops": scratch,
        "seeds_per_trial": statistics.fmean(len(c.attrs.get("seeds") or [0]) for c in cands if c.role != "baseline")
        if any(c.role != "baseline" for c in cands) else None,
        "pick": None if pick is None else pick.number,
    }  # fmt: skip
    if pick is not None and (paired := pick.attrs.get("paired")):
        acc = paired["acc_delta_pts"]
        out["claim"] = paired
        per_seed = pick.attrs.get("seeds") or []
        seeds = [e["seed"] for e in per_seed if e["seed"] in baselines]
        if len(seeds) >= 2 and acc.get("low") is not None:
            unpaired = unpaired_acc_interval([e["values"][0] for e in per_seed if e["seed"] in baselines],
                                             [baselines[s].values[0] for s in seeds])  # fmt: skip
            out["paired_width_pts"] = acc["high"] - acc["low"]
            out["unpaired_width_pts"] = unpaired.high - unpaired.low
            out["width_ratio"] = out["unpaired_width_pts"] / out["paired_width_pts"] if out["paired_width_pts"] else None
    if conf is not None:
        out["confirmation"] = {"verdict": conf.verdict, "acc_delta_pts": conf.acc_delta_pts, "speedup": conf.speedup,
                               "claim_held": conf.claim_held}  # fmt: skip
    return out


def summarise(rows: list[dict]) -> list[str]:
    by = {}
    for r in rows:
        by.setdefault(r["mode"], []).append(r)
    lines = [f"{'seeds':>6} {'runs':>4} {'FLOPs':>10} {'baseline runs':>13} {'x seeds:1':>9} {'/ scratch':>9} "
             f"{'paired w':>8} {'unpaired w':>10} {'inside':>7}"]  # fmt: skip
    ref = statistics.fmean(r["compute_flops"] for r in by.get("1", [])) if by.get("1") else None
    for mode, rs in by.items():
        flops = statistics.fmean(r["compute_flops"] for r in rs)
        scratch = statistics.fmean(r["scratch_flops"] for r in rs)
        widths = [(r["paired_width_pts"], r["unpaired_width_pts"]) for r in rs if "paired_width_pts" in r]
        held = [r["confirmation"]["claim_held"].get("acc_delta_pts") for r in rs if r.get("confirmation")]
        held = [h for h in held if h is not None]
        lines.append(
            f"{mode:>6} {len(rs):>4} {flops:>10.3g} {statistics.fmean(r['baseline_runs'] for r in rs):>13.1f} "
            f"{(flops / ref if ref else float('nan')):>9.2f} {flops / scratch if scratch else float('nan'):>9.2f} "
            + (f"{statistics.fmean(w[0] for w in widths):>8.2f} {statistics.fmean(w[1] for w in widths):>10.2f} " if widths else f"{'-':>8} {'-':>10} ")
            + (f"{sum(held)}/{len(held)}" if held else "-").rjust(7)
        )  # fmt: skip
    aims = []
    if ref and by.get("3"):
        r3 = statistics.fmean(r["compute_flops"] for r in by["3"])
        s3 = statistics.fmean(r["scratch_flops"] for r in by["3"])
        aims.append(f"seeds: 3 costs {r3 / ref:.2f}x seeds: 1 (aim <= 2.2x: {'met' if r3 / ref <= 2.2 else 'missed'}) and "
                    f"{r3 / s3:.2f} of from-scratch seeds (aim <= 0.5: {'met' if r3 / s3 <= 0.5 else 'missed'})")  # fmt: skip
        ratios = [r["width_ratio"] for r in by["3"] if r.get("width_ratio")]
        if ratios:
            aims.append(f"paired interval {statistics.fmean(ratios):.2f}x narrower than unpaired (aim >= 2x: "
                        f"{'met' if min(ratios) >= 2 else 'missed'}; min {min(ratios):.2f}x)")  # fmt: skip
        held = [r["confirmation"]["claim_held"].get("acc_delta_pts") for r in by["3"] if r.get("confirmation")]
        held = [h for h in held if h is not None]
        if held:
            aims.append(f"confirmation inside the claim in {sum(held)} of {len(held)} runs (aim: all)")
    if ref and by.get("1-3"):
        rr = statistics.fmean(r["compute_flops"] for r in by["1-3"])
        aims.append(f"racing costs {rr / ref:.2f}x seeds: 1 (aim <= 1.5x: {'met' if rr / ref <= 1.5 else 'missed'})")
    return lines + aims


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="benchmarks/specs/vgg11-cifar10-subset.yaml")
    p.add_argument("--sampler-seeds", default="0,1,2", help="one study per mode and sampler seed")
    p.add_argument("--trials", type=int, default=24, help="trials per study (the baselines included)")
    p.add_argument("--modes", default="1,3,1-3", help="seeds: 1 | 3 | 1-3 ({min: 1, max: 3})")
    p.add_argument("--confirm-rounds", type=int, default=3, help="fresh paired rounds confirming each pick")
    p.add_argument("--quick", action="store_true", help="smoke run: digits, tiny MLP, 3 epochs, 7 trials, one sampler seed")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        print(f"error: --modes: expected some of {', '.join(MODES)}, got {args.modes!r}", file=sys.stderr)
        return 2
    seeds = [0] if args.quick else [int(s) for s in args.sampler_seeds.split(",")]
    trials = 7 if args.quick else args.trials
    rows = []
    with tempfile.TemporaryDirectory(prefix="paired_seeds_") as tmp:
        for seed in seeds:
            for mode in modes:
                row = run_one(None if args.quick else args.spec, mode, seed, trials, 2 if args.quick else args.confirm_rounds,
                              Path(tmp), args.quick)  # fmt: skip
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("claim", "confirmation")}), flush=True)
    for line in summarise(rows):
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
