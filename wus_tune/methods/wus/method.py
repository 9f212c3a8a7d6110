"""Weight update skipping as a :class:`~wus_tune.methods.Method`: the trainer's side of
:mod:`wus_tune.methods.wus.rule`.

The rule lives in :class:`~wus_tune.methods.wus.rule.WUSController` (usable in any loop); this class connects
it to the trainer's hooks: it asks for a check each epoch (or every ``check_every`` steps) on the validation
accuracy (charged to the run) or the running training accuracy, gives the controller the check's
accuracy, multiplies the optimizer groups' learning rates by the controller's WUS+LR factors, and names
the kind of step it makes (``"skip:<bias_scope>"`` inside a skip window).

With ``cache_frozen_prefix`` it owns the training step: inside a skip window it trains the layers above
the frozen prefix on the prefix's features, computed once per window
(:class:`~wus_tune.methods.wus.frozen_prefix.PrefixCacheSession`); its step kinds are then
``skip:<scope>:cache-build`` (the window's first step, which builds the cache) and ``skip:<scope>:cached``.

A config turns it on with a ``methods.wus`` entry, whose keys are :class:`~wus_tune.methods.wus.rule.WUSConfig`'s
fields; what a study searches and how it learns from its baseline is :mod:`wus_tune.methods.wus.study`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from wus_tune.config import build_dataclass
from wus_tune.errors import ConfigError
from wus_tune.methods import CheckPlan, Method, RunInfo, StepContext, StepCost, register
from wus_tune.methods.wus.rule import WUSConfig, WUSController


def wus_config(params: dict[str, Any]) -> WUSConfig:
    """The WUSConfig of a ``methods.wus`` entry (its missing knobs at their defaults), checked; a bad key
    or value raises ConfigError naming it."""
    return build_dataclass(WUSConfig, dict(params), "methods.wus").validate()


@register
class WUS(Method):
    """Weight update skipping (Safayenikoo & Akturk, 2020); see :mod:`wus_tune.methods.wus.rule` for the
    exact rule. Its keyword arguments are :class:`~wus_tune.methods.wus.rule.WUSConfig`'s fields.

    Metrics: ``wus/skipping``, ``wus/skip_windows``, ``wus/skipped_intervals``, ``wus/variation``,
    ``wus/lr_decay``; with ``cache_frozen_prefix`` also ``wus/cached_steps`` (this epoch),
    ``wus/cache_builds``, ``wus/cache_fallbacks`` (windows run without a cache) and ``wus/cache_peak_mb``.
    Its skip steps are the kinds ``skip:<bias_scope>`` (and ``:cache-build`` / ``:cached``) of the result's
    ``step_kinds`` and each epoch's ``steps_by_kind``.
    """

    name = "wus"
    params_type = WUSConfig
    study = "wus_tune.methods.wus.study:WUSStudy"
    plain_full_steps = True  # outside skip windows a step is the plain one (the LR factors cost nothing)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.config = wus_config(params)
        self.controller: WUSController | None = None
        self._cache = None  # a PrefixCacheSession with cache_frozen_prefix, once attached
        self._cache_fits = False  # the skip windows' cache fits under cache_max_mb (its size never changes)
        self._train_loader = None
        self._fallback_windows = 0
        self._cached_steps = 0  # this epoch

    def attach(self, model: nn.Module, optimizer: Any, run: RunInfo) -> None:
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
            raise ConfigError("methods.wus.cache_frozen_prefix: needs a device-resident training set (a streamed "
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

    def owns_step(self) -> bool:  # only the caching WUS owns its step
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
