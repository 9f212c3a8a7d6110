"""Weight update skipping as a :class:`~wus_tune.methods.Method`: the trainer's side of :mod:`wus_tune.wus`.

The rule lives in :class:`wus_tune.wus.WUSController` (usable in any loop); this class connects it to
the trainer's hooks: it asks for a check each epoch (or every ``check_every`` steps) on the validation
accuracy (charged to the run) or the running training accuracy, gives the controller the check's
accuracy, multiplies the optimizer groups' learning rates by the controller's WUS+LR factors, and names
the kind of step it makes (``"skip:<bias_scope>"`` inside a skip window).

With ``wus.cache_frozen_prefix`` it owns the training step: inside a skip window it trains the layers
above the frozen prefix on the prefix's features, computed once per window
(:class:`wus_tune.frozen_prefix.PrefixCacheSession`); its step kinds are then ``skip:<scope>:cache-build``
(the window's first step, which builds the cache) and ``skip:<scope>:cached``.

Its configuration is the ``wus:`` section of a TrainConfig (:class:`~wus_tune.config.WUSConfig`), not a
``methods:`` entry; the study's virtual key ``wus.variant`` (``none``/``wus``/``wus+lr``) is expanded here.

Baseline reuse: until its first skip window a WUS trial *is* the plain run, and the controller's decisions
up to then depend only on the accuracy it watches. So a plain baseline that records that signal at every
check (``baseline_recording``) predicts the trial: :func:`wus_tune.wus.replay` runs the real controller on
it (``replay_baseline``), the first skip window can start only after the smallest warm-up and window,
inside the widest schedule window (``deviation_checks``), and the ranges of the knobs that decide when
skipping starts are fitted to the signal (:func:`calibrate_space`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from torch import nn

from wus_tune.errors import ConfigError
from wus_tune.methods import BaselineRecording, CheckPlan, Deviation, Method, RunInfo, StepContext, StepCost, register
from wus_tune.run_state import signal_of

if TYPE_CHECKING:
    from wus_tune._study.space import SearchSpace
    from wus_tune.config import TrainConfig

VARIANT_KEY = "wus.variant"
VARIANTS = ("none", "wus", "wus+lr")
_WUS_ON = {VARIANT_KEY: ["wus", "wus+lr"]}
_WUS_LR = {VARIANT_KEY: ["wus+lr"]}
CALIBRATED_KEYS = ("wus.threshold", "wus.window", "wus.warmup")  # and the schedule-window end


def variant_overrides(variant: str) -> dict[str, Any]:
    """The config overrides of a ``wus.variant`` value: none (off), wus (no LR coupling), wus+lr (as configured)."""
    if variant == "none":
        return {"wus.enabled": False}
    if variant == "wus":
        return {"wus.enabled": True, "wus.bias_lr_factor": 1.0, "wus.lr_decay": 1.0}
    if variant == "wus+lr":
        return {"wus.enabled": True}
    raise ConfigError(f"{VARIANT_KEY}: unknown value {variant!r}; choose one of {', '.join(VARIANTS)}")


@register
class WUS(Method):
    """Weight update skipping (Safayenikoo & Akturk, 2020); see :mod:`wus_tune.wus` for the exact rule.

    Metrics: ``wus/skipping``, ``wus/skip_windows``, ``wus/skipped_intervals``, ``wus/variation``,
    ``wus/lr_decay``; with ``cache_frozen_prefix`` also ``wus/cached_steps`` (this epoch),
    ``wus/cache_builds``, ``wus/cache_fallbacks`` (windows run without a cache) and ``wus/cache_peak_mb``.
    """

    name = "wus"
    partner = True
    VIRTUAL_KEYS = {VARIANT_KEY: VARIANTS}
    SEARCH_SPACE = {
        VARIANT_KEY: {"type": "categorical", "choices": ["wus", "wus+lr"], "doc": "WUS alone or coupled with the LR"},
        "wus.threshold": {"type": "float", "low": 0.001, "high": 0.05, "log": True, "when": _WUS_ON,
                          "doc": "plateau threshold tau"},
        "wus.window": {"type": "int", "low": 1, "high": 4, "when": _WUS_ON, "doc": "window W of accuracy changes"},
        "wus.warmup": {"type": "int", "low": 0, "high": 4, "when": _WUS_ON, "doc": "checks before skipping may start"},
        "wus.skip_length": {"type": "int", "low": 1, "high": 4, "when": _WUS_ON, "doc": "checks a skip window lasts"},
        "wus.bias_scope": {"type": "categorical", "choices": ["all", "last:1", "last:2", "last:4"], "when": _WUS_ON,
                           "doc": "biases that keep training in a skip window"},
        "wus.bias_lr_factor": {"type": "float", "low": 0.1, "high": 10.0, "log": True, "when": _WUS_LR,
                               "doc": "bias LR factor in skip windows"},
        "wus.lr_decay": {"type": "float", "low": 0.3, "high": 1.0, "when": _WUS_LR, "doc": "base LR factor at each plateau"},
        "wus.schedule_window[1]": {"type": "float", "low": 0.5, "high": 0.95, "when": _WUS_ON,
                                   "doc": "end of the part where skipping may happen"},
    }

    def __init__(self, **params: Any) -> None:
        from wus_tune.config import WUSConfig

        config = params.pop("config", None) or WUSConfig(enabled=True, **params)
        super().__init__(**{k: v for k, v in vars(config).items() if k != "enabled"})
        self.config = config
        self.controller = None
        self._cache = None  # a PrefixCacheSession with cache_frozen_prefix, once attached
        self._cache_fits = False  # the skip windows' cache fits under cache_max_mb (its size never changes)
        self._train_loader = None
        self._fallback_windows = 0
        self._cached_steps = 0  # this epoch

    # ---- study data ------------------------------------------------------------------------------

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return bool(config.wus.enabled)

    @classmethod
    def from_config(cls, config: Any) -> "WUS":
        return cls(config=config.wus)

    @classmethod
    def switch(cls, on: bool) -> dict[str, Any]:
        return {"wus.enabled": on}

    @classmethod
    def default_trials(cls) -> list[dict[str, Any]]:
        """WUS at the base config's settings, without LR coupling."""
        return [{VARIANT_KEY: "wus"}]

    @classmethod
    def expand_virtual(cls, values: dict[str, Any]) -> dict[str, Any]:
        variant = values.pop(VARIANT_KEY, None)
        return {} if variant is None else variant_overrides(variant)

    # ---- baseline reuse ----------------------------------------------------------------------------

    RECORDED_KNOBS = ("signal", "check_every")

    @classmethod
    def config_section(cls) -> str:
        return "wus"

    @classmethod
    def baseline_recording(cls, config: TrainConfig) -> BaselineRecording:
        return BaselineRecording(every_steps=config.wus.check_every, val_acc=config.wus.signal == "val_acc")

    @classmethod
    def deviation_checks(cls, space: SearchSpace, base: TrainConfig, progress: Sequence[float]) -> list[int]:
        """After the smallest warm-up and the smallest window, inside the widest schedule window."""

        def bound(key: str, default: float, high: bool) -> float:
            if key in space and space[key].type != "categorical":
                return space[key].high if high else space[key].low
            return default

        w = base.wus
        first = int(max(bound("wus.warmup", w.warmup, False) + 1, bound("wus.window", w.window, False) + 1))
        start = bound("wus.schedule_window[0]", w.schedule_window[0], False)
        end = bound("wus.schedule_window[1]", w.schedule_window[1], True)
        return [k for k in range(first, len(progress) + 1) if start <= progress[k - 1] < end]

    @classmethod
    def replay_baseline(cls, config: TrainConfig, probes: Sequence[Mapping[str, Any]]) -> Deviation:
        """The real controller with the trial's knobs on the baseline's signal (:func:`wus_tune.wus.replay`);
        on ``val_acc`` the trial's own checks are validation passes it pays for."""
        from wus_tune.methods.wus.rule import replay

        signal = signal_of(probes, config.wus.signal)
        if signal is None:  # the study checks the probes against baseline_recording first
            raise ValueError(f"the probes lack the {config.wus.signal} signal WUS watches")
        result = replay(signal, config.wus, progress=[p["progress"] for p in probes], total_checks=len(signal))
        return Deviation(check=result.first_skip, states=result.states, metrics=result.metrics,
                         charges_probes=config.wus.signal == "val_acc")  # fmt: skip

    @classmethod
    def calibrate_space(cls, space: SearchSpace, base: TrainConfig, probes: Sequence[Mapping[str, Any]], *,
                        explicit: Sequence[str] = ()) -> tuple[SearchSpace, list[str]]:  # fmt: skip
        return calibrate_space(space, base, probes, explicit=explicit)

    # ---- run-time hooks --------------------------------------------------------------------------

    def attach(self, model: nn.Module, optimizer: Any, run: RunInfo) -> None:
        from wus_tune.methods.wus.rule import WUSController

        cfg = self.config
        total_checks = run.config.epochs if cfg.check_every == 0 else run.total_steps // cfg.check_every
        # The trainer sets every group's lr each step, so the controller gives factors (lr_factors) instead.
        self.controller = WUSController(model, optimizer, cfg, total_checks=total_checks, manage_lr=False)
        if cfg.cache_frozen_prefix:
            self._attach_cache(model, run)

    def _attach_cache(self, model: nn.Module, run: RunInfo) -> None:
        import torch

        from wus_tune.methods.wus.frozen_prefix import PrefixCacheSession, cache_bytes, split_frozen_prefix

        if run.train_loader is None or not hasattr(run.train_loader, "batches_in_order"):
            raise ConfigError("wus.cache_frozen_prefix: needs a device-resident training set (a streamed "
                              "Dataset has no fixed order to cache); turn the knob off")
        self._train_loader = run.train_loader
        autocast_dtype = torch.bfloat16 if run.device.type == "cuda" else None
        max_bytes = int(self.config.cache_max_mb * 2**20)
        self._cache = PrefixCacheSession(model, max_bytes=max_bytes, batch_size=run.batch_size,
                                         seed=run.config.seed, autocast_dtype=autocast_dtype)
        with self._skip_mode(model):
            split = split_frozen_prefix(model)
            if split is not None:
                sample, _ = next(self._train_loader.batches_in_order(1))
                needed, _, _ = cache_bytes(split[0], sample, len(self._train_loader.y), autocast_dtype)
                self._cache_fits = needed <= max_bytes

    def check_plan(self, run: RunInfo) -> CheckPlan:
        return CheckPlan(every_steps=self.config.check_every, signal=self.config.signal)

    def on_check(self, metrics: dict[str, float], progress: float) -> None:
        accuracy = metrics["val_acc"] if "val_acc" in metrics else metrics["train_acc"]
        was_skipping = self.controller.skipping
        self.controller.observe(accuracy, progress)
        if self._cache is not None:
            if not self.controller.skipping and self._cache.in_period:
                self._cache.end()  # the window is over: free the cache
            if self.controller.skipping and not was_skipping and not self._cache_fits:
                self._fallback_windows += 1

    def lr_factors(self, optimizer: Any, run: RunInfo) -> list[float]:
        return [self.controller.lr_factor(i) for i in range(len(optimizer.param_groups))]

    def step_kind(self) -> str:
        if not self.controller.skipping:
            return ""
        kind = f"skip:{self.config.bias_scope}"
        if self._cache_fits:
            kind += ":cached" if self._cache.in_period else ":cache-build"
        return kind

    def owns_step(self) -> bool:  # per instance (the base asks the class): only the caching WUS owns its step
        return bool(self.config.cache_frozen_prefix)

    def train_step(self, step: StepContext) -> StepCost:
        """With ``cache_frozen_prefix``: inside a skip window, the top on cached features (the window's
        first step builds the cache: charged to it); otherwise the ordinary step."""
        if self.controller.skipping and self._cache_fits:
            if not self._cache.in_period:
                loader = self._train_loader
                self._cache.begin(loader.batches_in_order(max(512, step.run.batch_size)), len(loader.y))
            loss, logits, step.targets = self._cache.step_loss(step.loss_fn)
            self._cached_steps += 1
        else:
            logits = step.forward(step.inputs)
            loss = step.loss_fn(logits.float(), step.targets)
        loss.backward()
        step.optimizer.step()
        return StepCost(loss=loss, logits=logits)

    def warm_up_modes(self, model: nn.Module) -> list[contextlib.AbstractContextManager[Any]]:
        return [self._skip_mode(model)]

    @contextlib.contextmanager
    def _skip_mode(self, model: nn.Module) -> Iterator[None]:
        """The model as a skip window leaves it (weights frozen), for the untimed warm-up."""
        frozen = self.controller.frozen_parameters
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def end_epoch(self, model: nn.Module, run: RunInfo) -> dict[str, float]:
        metrics = self.controller.metrics()
        if self._cache is not None:
            metrics.update({"wus/cached_steps": float(self._cached_steps), "wus/cache_builds": float(self._cache.builds),
                            "wus/cache_fallbacks": float(self._fallback_windows + self._cache.fallbacks),
                            "wus/cache_peak_mb": self._cache.peak_bytes / 2**20})
            self._cached_steps = 0
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)


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
    from wus_tune._study.space import SearchSpace

    signal = signal_of(probes, base.wus.signal)
    if not signal or "wus.threshold" not in space:
        return space, []
    progress = [float(p["progress"]) for p in probes]
    n = len(signal)
    params = {p.key: p for p in space.params}
    mine = {k for k in params if k not in explicit}
    w = base.wus
    end_key = "wus.schedule_window[1]"
    start = params["wus.schedule_window[0]"].low if "wus.schedule_window[0]" in params else w.schedule_window[0]
    if end_key in params and params[end_key].type == "float":
        e = params[end_key]
        if end_key in mine and n >= 4 and sum(p < e.low for p in progress) < 3:
            low = min(progress[2] + 0.5 / n, float(e.high) - 0.01)
            params[end_key] = e = replace(e, low=float(f"{max(low, start + 0.01):.4g}"), high=max(float(e.high), low))
        end_low, end_high = float(e.low), float(e.high)
    else:
        end_low = end_high = w.schedule_window[1]
    m = sum(1 for p in progress if p < end_low)  # a skip window can start at check i only if i >= W + 1 and i > warm-up
    for key, cap, floor in (("wus.window", m - 1, 1), ("wus.warmup", m - 2, 0)):
        if key in mine and params[key].type == "int" and m >= 2:
            p = params[key]
            params[key] = replace(p, low=floor, high=max(floor, min(int(p.high), cap)))
    calibrated = SearchSpace(tuple(params.values()))
    w_lo, w_hi = _int_range(calibrated, "wus.window", (w.window, w.window))
    warm_lo, _ = _int_range(calibrated, "wus.warmup", (w.warmup, w.warmup))
    seen = variations(signal, progress, windows=range(w_lo, w_hi + 1), warmup=warm_lo, schedule_window=(start, end_high))
    tau = params["wus.threshold"]
    if not seen:
        return calibrated, [f"warning: the baseline's {n} checks leave no room for a plateau test (window {w_lo}..{w_hi}, "
                            f"warm-up from {warm_lo}); no WUS trial of this space can skip"]  # fmt: skip
    eps = 1e-4
    if "wus.threshold" not in mine or tau.type != "float":
        if float(tau.high) <= min(seen):
            return calibrated, [
                f"warning: search_space.wus.threshold {tau.low:g}..{tau.high:g} cannot fire on the baseline's signal "
                f"(its smallest variation over windows {w_lo}..{w_hi} is {min(seen):.4g}); those trials equal the "
                "baseline and are reused, not trained"]  # fmt: skip
        return calibrated, []
    low = max(_quantile(seen, low_q), eps) + eps
    high = max(_quantile(seen, high_q) + eps, low * 2)
    params["wus.threshold"] = replace(tau, low=float(f"{low:.4g}"), high=float(f"{high:.4g}"))
    out = SearchSpace(tuple(params.values()))
    shown = ", ".join(f"{k} {out[k].low:g}..{out[k].high:g}" for k in (*CALIBRATED_KEYS, end_key) if k in mine and k in out)
    return out, [f"reuse: search space calibrated on the baseline's {w.signal} ({n} checks): {shown}"]
