"""Weight update skipping (WUS), after Safayenikoo & Akturk (2020).

When the watched accuracy stops moving, stop updating the weights (and stop computing their gradients)
while the biases keep training; after ``skip_length`` checks, full updates resume and the signal is
measured afresh. WUS+LR couples the skip windows to the learning rate (``variant: wus+lr``, the default,
applies ``bias_lr_factor`` and ``lr_decay``; ``variant: wus`` leaves them out).

The rule, exactly (all accuracies are fractions in [0, 1]):

* A *check* happens at the end of each epoch (or every ``check_every`` steps); it reports one accuracy
  ``a_t`` to :meth:`WUSController.observe`.
* The *variation* over a window of ``W`` changes is the range of the last ``W + 1`` accuracies seen in
  full-update mode: ``max(a[-W-1:]) - min(a[-W-1:])`` (:func:`accuracy_variation`). It is small exactly
  when every improvement (and every drop) over the window is small.
* A skip window starts at a check when: more than ``warmup`` checks have happened; at least ``W + 1``
  accuracies have been seen since full updates last (re)started; ``variation < threshold``; the training
  progress lies in ``schedule_window = [start, end)``; and the cap ``max_skip_fraction`` of all check
  intervals would not be exceeded.
* A skip window lasts ``skip_length`` check intervals, or ends early when progress leaves the schedule
  window or the cap is reached. The accuracies measured inside it are not used: after it, the history
  restarts from the accuracy at the check that ended it.

Inside a skip window every weight has ``requires_grad`` switched off, so autograd computes no
weight-gradient products and backpropagation stops at the earliest parameter that still trains. Their
``.grad`` is ``None``, so torch optimizers leave them (no update, no weight decay) and keep their
momentum buffers for when full updates resume. Which "biases" keep training is ``bias_scope``: every
bias (the paper's reading) or the biases of the last ``K`` parameterised layers; the fewer train, the
earlier backpropagation stops and the cheaper a skip step is. Normalisation layers (BatchNorm etc.)
belong to the layer before them: their shift (``bias``) is that layer's bias, their scale (``weight``)
is frozen with the weights unless ``train_bn_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from wus_tune.config import check_choice, check_range
from wus_tune.errors import ConfigError
from wus_tune.layers import is_shift, norm_parameter_ids, param_groups, parameterised_layers

__all__ = [
    "WUSConfig",
    "WUSController",
    "accuracy_variation",
    "should_skip",
    "layer_groups",
    "skip_frozen_parameters",
    "param_groups",
    "Replay",
    "replay",
]

_KEY = "methods.wus"  # where a TrainConfig holds these knobs, for the messages


@dataclass
class WUSConfig:
    """The knobs of weight update skipping: the rule exactly is this module's docstring. A TrainConfig
    holds them as the ``methods.wus`` entry (no entry: WUS is off)."""

    signal: Literal["val_acc", "train_acc"] = "val_acc"  # metric watched at each check
    check_every: int = 0  # 0: check at the end of each epoch; N > 0: every N optimizer steps
    window: int = 2  # W: number of most recent accuracy changes looked at
    threshold: float = 0.01  # tau: skip when the accuracy range over the window is below this (fraction, 0.01 = 1 point)
    warmup: int = 2  # checks at the start with no skipping
    skip_length: int = 2  # checks a skip window lasts before full updates resume
    max_skip_fraction: float = 1.0  # cap on the fraction of checks spent skipping
    bias_scope: str = "all"  # "all", or "last:K" (biases of the last K parameterised layers keep training)
    train_bn_scale: bool = False  # keep BatchNorm's scale (gamma) training in skip windows, like a bias
    # "wus+lr": bias_lr_factor and lr_decay apply (WUS+LR; at their defaults of 1 that is plain WUS);
    # "wus": they do not (the paper's WUS, whatever they say), so a study can search the two variants
    variant: Literal["wus", "wus+lr"] = "wus+lr"
    bias_lr_factor: float = 1.0  # WUS+LR: LR factor of the biases inside skip windows
    lr_decay: float = 1.0  # WUS+LR: base LR factor applied each time a plateau starts a skip window
    schedule_window: list[float] = field(default_factory=lambda: [0.0, 0.75])  # [start, end) fraction of training where skipping may happen
    # Inside a skip window, compute the frozen layers' output once (eval-mode normalisation, no augmentation)
    # and train the layers above on it; meant for bias_scope last:K (see wus_tune.methods.wus.frozen_prefix).
    cache_frozen_prefix: bool = False
    cache_max_mb: float = 1024.0  # cap on that cache (MiB on the training device); over it, ordinary skip steps

    def lr_coupling(self) -> tuple[float, float]:
        """``(bias_lr_factor, lr_decay)`` as they apply: both 1 for the variant ``wus``."""
        return (self.bias_lr_factor, self.lr_decay) if self.variant == "wus+lr" else (1.0, 1.0)

    def label(self) -> str:
        """``wus+lr`` when the LR coupling changes anything, else ``wus``: what a study's tables show."""
        return "wus+lr" if self.lr_coupling() != (1.0, 1.0) else "wus"

    def validate(self) -> WUSConfig:
        check_choice(f"{_KEY}.signal", self.signal, ("val_acc", "train_acc"))
        check_choice(f"{_KEY}.variant", self.variant, ("wus", "wus+lr"))
        check_range(f"{_KEY}.check_every", self.check_every, low=0, high=10**9)
        check_range(f"{_KEY}.window", self.window, low=1, high=1000)
        check_range(f"{_KEY}.threshold", self.threshold, low=0.0, high=1.0)
        check_range(f"{_KEY}.warmup", self.warmup, low=0, high=10**6)
        check_range(f"{_KEY}.skip_length", self.skip_length, low=1, high=10**6)
        check_range(f"{_KEY}.max_skip_fraction", self.max_skip_fraction, low=0.0, high=1.0)
        check_range(f"{_KEY}.bias_lr_factor", self.bias_lr_factor, low=0.0, high=100.0)
        check_range(f"{_KEY}.lr_decay", self.lr_decay, low=0.0, high=1.0, low_open=True)
        parse_bias_scope(self.bias_scope)
        check_range(f"{_KEY}.cache_max_mb", self.cache_max_mb, low=0.0, high=1e9)
        if len(self.schedule_window) != 2:
            raise ConfigError(f"{_KEY}.schedule_window: expected [start, end], got {self.schedule_window}")
        start, end = self.schedule_window
        check_range(f"{_KEY}.schedule_window[0]", start, low=0.0, high=1.0)
        check_range(f"{_KEY}.schedule_window[1]", end, low=0.0, high=1.0)
        if start >= end:
            raise ConfigError(f"{_KEY}.schedule_window: start {start} must be below end {end}")
        return self


def parse_bias_scope(scope: str) -> int | None:
    """``"all"`` -> None (every bias trains in skip windows); ``"last:K"`` -> K."""
    if scope == "all":
        return None
    if isinstance(scope, str) and scope.startswith("last:"):
        try:
            k = int(scope[5:])
        except ValueError:
            k = 0
        if k >= 1:
            return k
    raise ConfigError(f"{_KEY}.bias_scope: expected 'all' or 'last:K' with K >= 1, got {scope!r}")


def accuracy_variation(history: Sequence[float], window: int) -> float | None:
    """Range of the last ``window + 1`` accuracies; ``None`` while fewer are known."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if len(history) < window + 1:
        return None
    recent = history[-(window + 1) :]
    return max(recent) - min(recent)


def should_skip(history: Sequence[float], *, window: int, threshold: float) -> bool:
    """The plateau test: has the accuracy moved by less than ``threshold`` over the last ``window`` checks?"""
    variation = accuracy_variation(history, window)
    return variation is not None and variation < threshold


def layer_groups(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The model's parameterised layers (:func:`wus_tune.layers.parameterised_layers`: registration order,
    a normalisation layer joined to the layer before it, shared parameters once), each as its
    ``(name, parameter)`` list, so "the last K layers" counts convolutions and linear layers."""
    return [list(layer.params) for layer in parameterised_layers(model)]


def skip_frozen_parameters(model: nn.Module, config: WUSConfig) -> list[nn.Parameter]:
    """The parameters a skip window freezes: every weight, and the biases outside ``bias_scope``.

    Parameters the user froze (``requires_grad=False``) are not listed: WUS never touches them.
    """
    last_k = parse_bias_scope(config.bias_scope)
    groups = layer_groups(model)
    norm_params = norm_parameter_ids(model)
    frozen: list[nn.Parameter] = []
    for index, group in enumerate(groups):
        in_scope = last_k is None or index >= len(groups) - last_k
        for name, p in group:
            if is_shift(name):
                keeps_training = in_scope
            elif id(p) in norm_params:
                keeps_training = in_scope and config.train_bn_scale
            else:
                keeps_training = False
            if not keeps_training and p.requires_grad:
                frozen.append(p)
    return frozen


@dataclass
class WUSState:
    """Counters, also the metrics the trainer logs as ``wus/...``."""

    checks: int = 0
    skip_windows: int = 0
    skipped_intervals: int = 0
    last_variation: float = math.nan


class WUSController:
    """Switches a model between full updates and bias-only updates from an accuracy signal.

    Works inside any training loop::

        controller = WUSController(model, optimizer, WUSConfig(threshold=0.01))
        for epoch in range(epochs):
            train_one_epoch(model, optimizer)          # skip steps are cheaper by themselves
            controller.observe(evaluate(model), progress=(epoch + 1) / epochs)

    Args:
        model: the model being trained.
        optimizer: its optimizer. For WUS+LR's bias learning-rate factor, biases must be in groups of
            their own (see :func:`param_groups`).
        config: the rule's knobs (:class:`WUSConfig`; ``signal`` and ``check_every`` are the loop's to follow).
        total_checks: how many checks training will make; needed for ``max_skip_fraction < 1``.
        manage_lr: multiply the optimizer groups' ``lr`` at transitions (right without a scheduler, or
            with a chainable one such as StepLR). A loop that sets ``lr`` itself every step, like
            :func:`wus_tune.fit`, passes ``False`` and multiplies by :meth:`lr_factor` instead.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: WUSConfig,
        *,
        total_checks: int | None = None,
        manage_lr: bool = True,
    ) -> None:
        config.validate()
        if config.max_skip_fraction < 1.0 and total_checks is None:
            raise ValueError("max_skip_fraction < 1 needs total_checks")
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.total_checks = total_checks
        self.manage_lr = manage_lr
        self.state = WUSState()
        self.skipping = False
        self.history: list[float] = []
        self._intervals_left = 0
        self._decay = 1.0
        self._bias_lr_factor, self._lr_decay = config.lr_coupling()
        # Recorded now, so a parameter the user froze is never switched on at the end of a skip window.
        self._frozen = skip_frozen_parameters(model, config)
        frozen_ids = {id(p) for p in self._frozen}
        shift_ids = {id(p) for g in param_groups(model, weight_decay=0)[1:] for p in g["params"]}
        self._bias_group = [
            bool(g["params"]) and all(id(p) in shift_ids for p in g["params"]) for g in optimizer.param_groups
        ]
        if self._bias_lr_factor != 1.0 and not any(self._bias_group):
            raise ValueError(
                "bias_lr_factor needs the biases in an optimizer group of their own; "
                "build the optimizer from wus_tune.param_groups(model, ...)"
            )
        if not any(id(p) not in frozen_ids and p.requires_grad for p in model.parameters()):
            raise ValueError(f"bias_scope {config.bias_scope!r} leaves no parameter training in skip windows")

    # ---- the signal --------------------------------------------------------------------------

    def observe(self, accuracy: float, progress: float | None = None) -> bool:
        """Record one check's accuracy; switch mode if due. Returns whether the next interval skips.

        ``progress`` is the fraction of training done (0..1); skipping happens only inside the
        config's ``schedule_window``. Without it the schedule window is not applied.
        """
        cfg = self.config
        self.state.checks += 1
        in_window = progress is None or cfg.schedule_window[0] <= progress < cfg.schedule_window[1]
        if self.skipping:
            self.state.skipped_intervals += 1
            self._intervals_left -= 1
            if self._intervals_left <= 0 or not in_window or not self._cap_allows():
                self._set_skipping(False)
                self.history = [accuracy]
            return self.skipping

        self.history.append(accuracy)
        variation = accuracy_variation(self.history, cfg.window)
        self.state.last_variation = math.nan if variation is None else variation
        if (
            self.state.checks > cfg.warmup
            and in_window
            and self._cap_allows()
            and should_skip(self.history, window=cfg.window, threshold=cfg.threshold)
        ):
            self._intervals_left = cfg.skip_length
            self.state.skip_windows += 1
            self._set_skipping(True, decay=self._lr_decay)
        return self.skipping

    def _cap_allows(self) -> bool:
        if self.total_checks is None:
            return True
        return self.state.skipped_intervals + 1 <= self.config.max_skip_fraction * self.total_checks

    # ---- the mode ----------------------------------------------------------------------------

    def lr_factor(self, group_index: int) -> float:
        """The factor WUS+LR puts on an optimizer group's scheduled learning rate right now."""
        factor = self._decay
        if self.skipping and self._bias_group[group_index]:
            factor *= self._bias_lr_factor
        return factor

    def _set_skipping(self, skipping: bool, decay: float = 1.0) -> None:
        before = [self.lr_factor(i) for i in range(len(self.optimizer.param_groups))]
        self.skipping = skipping
        self._decay *= decay
        for p in self._frozen:
            p.requires_grad_(not skipping)
            if skipping:
                p.grad = None  # a stale gradient would make the optimizer step the frozen weight
        if self.manage_lr:
            for i, group in enumerate(self.optimizer.param_groups):
                if before[i] > 0:
                    group["lr"] *= self.lr_factor(i) / before[i]

    @property
    def frozen_parameters(self) -> list[nn.Parameter]:
        """The parameters a skip window freezes (only those trainable when the controller was built)."""
        return list(self._frozen)

    def metrics(self) -> dict[str, float]:
        return {
            "wus/skipping": float(self.skipping),
            "wus/skip_windows": float(self.state.skip_windows),
            "wus/skipped_intervals": float(self.state.skipped_intervals),
            "wus/variation": self.state.last_variation,
            "wus/lr_decay": self._decay,
        }

    def state_dict(self) -> dict:
        """The rule's progress (counters, mode, history, LR decay), to resume training with :meth:`load_state_dict`."""
        return {"state": vars(self.state).copy(), "skipping": self.skipping, "history": list(self.history),
                "intervals_left": self._intervals_left, "decay": self._decay}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the model is put in the saved mode (weights frozen inside a skip
        window). With ``manage_lr`` the optimizer's ``lr`` is expected to come from its own state_dict."""
        manage_lr, self.manage_lr = self.manage_lr, False  # the optimizer's state already holds its lr
        try:
            self._decay = 1.0
            self._set_skipping(bool(state["skipping"]), decay=float(state["decay"]))
        finally:
            self.manage_lr = manage_lr
        self.state = WUSState(**state["state"])
        self.history = [float(a) for a in state["history"]]
        self._intervals_left = int(state["intervals_left"])


@dataclass
class Replay:
    """What the controller would decide on a recorded signal (:func:`replay`)."""

    first_skip: int | None  # the 1-based check after which the first skip window starts; None: never skips
    states: list[dict]  # the controller's state_dict after each check, up to and including first_skip
    metrics: list[dict[str, float]]  # its metrics() after each of those checks


def replay(signal: Sequence[float], config: WUSConfig, *, progress: Sequence[float | None] | None = None,
           total_checks: int | None = None) -> Replay:
    """Run the real :class:`WUSController` over a recorded signal (one accuracy per check, e.g. a plain
    run's validation accuracy at each epoch) and find where its first skip window starts.

    Until that check a WUS run *is* the plain run (same updates, same accuracies), so the decision on
    the plain run's signal is the decision the WUS run would make. ``progress`` is the training fraction
    at each check (as the trainer passes it); ``total_checks`` the run's number of checks (needed for
    ``max_skip_fraction < 1``; default ``len(signal)``).
    """
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(param_groups(model, weight_decay=0.0), lr=0.1)
    controller = WUSController(model, optimizer, config, total_checks=total_checks or len(signal), manage_lr=False)
    states, metrics = [], []
    for i, accuracy in enumerate(signal):
        skipping = controller.observe(float(accuracy), None if progress is None else progress[i])
        states.append(controller.state_dict())
        metrics.append(controller.metrics())
        if skipping:
            return Replay(i + 1, states, metrics)
    return Replay(None, states, metrics)
