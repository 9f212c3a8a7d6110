"""What a study reads about weight update skipping: its knobs, its default trial, and how its trials are
predicted from the study's plain baseline (imported by the study only, :mod:`wus_tune.methods.study`).

The variant is an ordinary knob: ``methods.wus.variant`` is ``wus`` (no LR coupling) or ``wus+lr`` (the
two LR-coupling knobs are searched too); a trial without WUS is the method choice ``none``.

Baseline reuse: until its first skip window a WUS trial *is* the plain run, and the controller's decisions
up to then depend only on the accuracy it watches. So a plain baseline that records that signal at every
check (``baseline_recording``) predicts the trial: :func:`~wus_tune.methods.wus.rule.replay` runs the real
controller on it (``replay_baseline``), the first skip window can start only after the smallest warm-up
and window, inside the widest schedule window (``deviation_checks``), and the ranges of the knobs that
decide when skipping starts are fitted to the signal (:func:`calibrate_space`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from wus_tune._study.space import SearchSpace
from wus_tune.config import TrainConfig
from wus_tune.methods.study import BaselineRecording, Deviation, MethodStudy
from wus_tune.methods.wus.method import WUS, wus_config
from wus_tune.methods.wus.rule import WUSConfig, replay
from wus_tune.run_state import signal_of

PREFIX = "methods.wus."
VARIANT, THRESHOLD, WINDOW, WARMUP = (f"{PREFIX}{k}" for k in ("variant", "threshold", "window", "warmup"))
_WUS_LR = {VARIANT: ["wus+lr"]}


def knobs(config: TrainConfig) -> WUSConfig:
    """WUS's knobs in ``config``: its ``methods.wus`` entry, the rest at their defaults."""
    return wus_config(config.methods.get(WUS.name) or {})


class WUSStudy(MethodStudy):
    """WUS in a study: compared by a spec without a ``methods:`` list, and beside approx_ops, lp_sphere and
    edge_of_chaos in one trial (``approx_ops+wus``)."""

    method = WUS
    compared_by_default = True
    combines_with = ("approx_ops", "lp_sphere", "edge_of_chaos")
    SEARCH_SPACE = {
        VARIANT: {"type": "categorical", "choices": ["wus", "wus+lr"], "doc": "WUS alone or coupled with the LR"},
        THRESHOLD: {"type": "float", "low": 0.001, "high": 0.05, "log": True, "doc": "plateau threshold tau"},
        WINDOW: {"type": "int", "low": 1, "high": 4, "doc": "window W of accuracy changes"},
        WARMUP: {"type": "int", "low": 0, "high": 4, "doc": "checks before skipping may start"},
        f"{PREFIX}skip_length": {"type": "int", "low": 1, "high": 4, "doc": "checks a skip window lasts"},
        f"{PREFIX}bias_scope": {"type": "categorical", "choices": ["all", "last:1", "last:2", "last:4"],
                                "doc": "biases that keep training in a skip window"},
        f"{PREFIX}bias_lr_factor": {"type": "float", "low": 0.1, "high": 10.0, "log": True, "when": _WUS_LR,
                                    "doc": "bias LR factor in skip windows"},
        f"{PREFIX}lr_decay": {"type": "float", "low": 0.3, "high": 1.0, "when": _WUS_LR, "doc": "base LR factor at each plateau"},
        f"{PREFIX}schedule_window[1]": {"type": "float", "low": 0.5, "high": 0.95,
                                        "doc": "end of the part where skipping may happen"},
    }

    @classmethod
    def default_trials(cls) -> list[dict[str, Any]]:
        """WUS at the base config's settings, without LR coupling."""
        return [{VARIANT: "wus"}]

    @classmethod
    def label(cls, params: Mapping[str, Any]) -> str:
        return wus_config(dict(params)).label()

    # ---- baseline reuse ----------------------------------------------------------------------------

    @classmethod
    def baseline_recording(cls, config: TrainConfig) -> BaselineRecording:
        w = knobs(config)
        return BaselineRecording(every_steps=w.check_every, val_acc=w.signal == "val_acc")

    @classmethod
    def deviation_checks(cls, space: SearchSpace, base: TrainConfig, progress: Sequence[float]) -> list[int]:
        """After the smallest warm-up and the smallest window, inside the widest schedule window."""

        def bound(key: str, default: float, high: bool) -> float:
            if key in space and space[key].type != "categorical":
                return space[key].high if high else space[key].low
            return default

        w = knobs(base)
        first = int(max(bound(WARMUP, w.warmup, False) + 1, bound(WINDOW, w.window, False) + 1))
        start = bound(f"{PREFIX}schedule_window[0]", w.schedule_window[0], False)
        end = bound(f"{PREFIX}schedule_window[1]", w.schedule_window[1], True)
        return [k for k in range(first, len(progress) + 1) if start <= progress[k - 1] < end]

    @classmethod
    def replay_baseline(cls, config: TrainConfig, probes: Sequence[Mapping[str, Any]]) -> Deviation:
        """The real controller with the trial's knobs on the baseline's signal
        (:func:`~wus_tune.methods.wus.rule.replay`); on ``val_acc`` the trial's own checks are validation
        passes it pays for."""
        w = knobs(config)
        signal = signal_of(probes, w.signal)
        if signal is None:  # the study checks the probes against baseline_recording first
            raise ValueError(f"the probes lack the {w.signal} signal WUS watches")
        result = replay(signal, w, progress=[p["progress"] for p in probes], total_checks=len(signal))
        return Deviation(check=result.first_skip, states=result.states, metrics=result.metrics,
                         charges_probes=w.signal == "val_acc")  # fmt: skip

    @classmethod
    def calibrate_space(cls, space: SearchSpace, base: TrainConfig, probes: Sequence[Mapping[str, Any]], *,
                        explicit: Sequence[str] = ()) -> tuple[SearchSpace, list[str]]:  # fmt: skip
        return calibrate_space(space, base, probes, explicit=explicit)


# ---- the search space calibrated on a baseline's signal ------------------------------------------------


def variations(signal: Sequence[float], progress: Sequence[float], *, windows: Sequence[int], warmup: int,
               schedule_window: tuple[float, float]) -> list[float]:  # fmt: skip
    """Every variation the plateau test could see before a first skip window: for each window ``W``, the
    range of the ``W + 1`` accuracies ending at each check that lies after ``warmup`` and inside
    ``schedule_window``."""
    out = []
    for w in windows:
        for i in range(w, len(signal)):  # check i + 1 (1-based) sees accuracies i - w .. i
            if i + 1 <= warmup or not schedule_window[0] <= progress[i] < schedule_window[1]:
                continue
            window = signal[i - w : i + 1]
            out.append(max(window) - min(window))
    return out


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _int_range(space: SearchSpace, key: str, default: tuple[int, int]) -> tuple[int, int]:
    if key in space and space[key].type == "int":
        return int(space[key].low), int(space[key].high)
    return default


def calibrate_space(
    space: SearchSpace,
    base: TrainConfig,
    probes: Sequence[Mapping[str, Any]],
    *,
    explicit: Sequence[str] = (),
    low_q: float = 0.1,
    high_q: float = 0.9,
) -> tuple[SearchSpace, list[str]]:
    """``space`` with the ranges of the knobs that decide when skipping starts derived from the baseline's
    signal, and the one-line notes to print.

    * schedule-window end: its range is kept unless fewer than 3 checks lie before its low end; then
      the low end moves to just after the 3rd check (skipping must be able to start somewhere);
    * with ``m`` checks before that low end: window ``W`` 1 .. min(its high, m - 1) and warm-up
      0 .. min(its high, m - 2), so every sampled window and warm-up leaves a check where a plateau can
      start a skip window whatever end is sampled;
    * threshold ``tau`` (log): from the ``low_q`` to the ``high_q`` quantile of the variations the
      plateau test could see (every window of the range, every check inside the widest schedule window),
      nudged up by 1e-4 because the test is strict (``variation < tau``): small thresholds start skipping
      late or never, large ones early.

    A key in ``explicit`` (the spec's own ``search_space`` entries) keeps its range; when the ranges
    together cannot fire on this signal, one warning line says so.
    """
    w = knobs(base)
    signal = signal_of(probes, w.signal)
    if not signal or THRESHOLD not in space:
        return space, []
    progress = [float(p["progress"]) for p in probes]
    n = len(signal)
    params = {p.key: p for p in space.params}
    mine = {k for k in params if k not in explicit}
    end_key, start_key = f"{PREFIX}schedule_window[1]", f"{PREFIX}schedule_window[0]"
    start = params[start_key].low if start_key in params else w.schedule_window[0]
    if end_key in params and params[end_key].type == "float":
        e = params[end_key]
        if end_key in mine and n >= 4 and sum(p < e.low for p in progress) < 3:
            low = min(progress[2] + 0.5 / n, float(e.high) - 0.01)
            params[end_key] = e = replace(e, low=float(f"{max(low, start + 0.01):.4g}"), high=max(float(e.high), low))
        end_low, end_high = float(e.low), float(e.high)
    else:
        end_low = end_high = w.schedule_window[1]
    m = sum(1 for p in progress if p < end_low)  # a skip window can start at check i only if i >= W + 1 and i > warm-up
    for key, cap, floor in ((WINDOW, m - 1, 1), (WARMUP, m - 2, 0)):
        if key in mine and params[key].type == "int" and m >= 2:
            p = params[key]
            params[key] = replace(p, low=floor, high=max(floor, min(int(p.high), cap)))
    calibrated = replace(space, params=tuple(params.values()))
    w_lo, w_hi = _int_range(calibrated, WINDOW, (w.window, w.window))
    warm_lo, _ = _int_range(calibrated, WARMUP, (w.warmup, w.warmup))
    seen = variations(signal, progress, windows=range(w_lo, w_hi + 1), warmup=warm_lo, schedule_window=(start, end_high))
    tau = params[THRESHOLD]
    if not seen:
        return calibrated, [f"warning: the baseline's {n} checks leave no room for a plateau test (window {w_lo}..{w_hi}, "
                            f"warm-up from {warm_lo}); no WUS trial of this space can skip"]  # fmt: skip
    eps = 1e-4
    if THRESHOLD not in mine or tau.type != "float":
        if float(tau.high) <= min(seen):
            return calibrated, [
                f"warning: search_space.{THRESHOLD} {tau.low:g}..{tau.high:g} cannot fire on the baseline's signal "
                f"(its smallest variation over windows {w_lo}..{w_hi} is {min(seen):.4g}); those trials equal the "
                "baseline and are reused, not trained"]  # fmt: skip
        return calibrated, []
    low = max(_quantile(seen, low_q), eps) + eps
    high = max(_quantile(seen, high_q) + eps, low * 2)
    params[THRESHOLD] = replace(tau, low=float(f"{low:.4g}"), high=float(f"{high:.4g}"))
    out = replace(space, params=tuple(params.values()))
    shown = ", ".join(f"{k} {out[k].low:g}..{out[k].high:g}" for k in (THRESHOLD, WINDOW, WARMUP, end_key) if k in mine and k in out)
    return out, [f"reuse: search space calibrated on the baseline's {w.signal} ({n} checks): {shown}"]
