"""One training step and one evaluation, as the trainer runs them and the pricing step re-runs them.

Shared by :mod:`wus_tune.trainer` (the loop) and :mod:`wus_tune.pricing` (which repeats each kind of step
on a copy of the training state to price it), so a priced step is the very code the run executed: the
methods' hooks around it, the owner's own step, the learning-rate factors. Torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wus_tune.config import TrainConfig
from wus_tune.errors import ConfigError
from wus_tune.layers import param_groups
from wus_tune.methods import Method, RunInfo, StepContext, build_methods

__all__ = [
    "attach_methods", "autocast_forward", "evaluate", "evaluate_batch", "forward_eval", "make_optimizer", "sample_chooser",
    "set_learning_rates", "step_owner", "train_step",
]  # fmt: skip


def attach_methods(model: nn.Module, config: TrainConfig, run: RunInfo) -> tuple[nn.Module, list[Method], Any, Any]:
    """The config's methods set up on the model, the optimizer (built by a method or the config), and
    the method that owns the step (None: the trainer's own step)."""
    methods = build_methods(config)
    for method in methods:
        model = method.setup(model, run)
    optimizer = make_optimizer(model, config, methods, run)
    for method in methods:
        method.attach(model, optimizer, run)
    return model, methods, optimizer, step_owner(methods)


def make_optimizer(model: nn.Module, config: TrainConfig, methods: list[Method], run: RunInfo) -> torch.optim.Optimizer:
    built = [(m, opt) for m in methods if (opt := m.make_optimizer(model, run)) is not None]
    if len(built) > 1:
        raise ConfigError(f"methods: {built[0][0].name} and {built[1][0].name} both build the optimizer; "
                          "combine at most one of them")
    if built:
        return built[0][1]
    opt = config.optim
    groups = param_groups(model, weight_decay=opt.weight_decay, bias_weight_decay=opt.bias_weight_decay)
    groups = [g for g in groups if g["params"]]
    if opt.name == "adamw":
        return torch.optim.AdamW(groups, lr=opt.lr)
    return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov)


def step_owner(methods: list[Method]) -> Method | None:
    owners = [m for m in methods if m.owns_step()]
    if len(owners) > 1:
        raise ConfigError(f"methods: {owners[0].name} and {owners[1].name} both own the training step; "
                          "combine at most one of them")
    return owners[0] if owners else None


def sample_chooser(methods: list[Method]) -> Method | None:
    """The method that chooses each epoch's training samples (overrides ``epoch_samples``), if any."""
    choosers = [m for m in methods if type(m).epoch_samples is not Method.epoch_samples]
    if len(choosers) > 1:
        raise ConfigError(f"methods: {choosers[0].name} and {choosers[1].name} both choose each epoch's training "
                          "samples; combine at most one of them")
    return choosers[0] if choosers else None


def set_learning_rates(optimizer: torch.optim.Optimizer, peak_lrs: list[float], schedule: float,
                       methods: list[Method], run: RunInfo) -> None:  # fmt: skip
    factors = [1.0] * len(peak_lrs)
    for method in methods:
        for i, f in enumerate(method.lr_factors(optimizer, run) or ()):
            factors[i] *= f
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = peak_lrs[i] * schedule * factors[i]


def autocast_forward(model: nn.Module, autocast: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model(x)

    return forward


def train_step(ctx: StepContext, methods: list[Method], owner: Method | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: the owner's, or forward, backward, ``optimizer.step()``; others' hooks around it."""
    others = [m for m in methods if m is not owner]
    if owner is None:
        ctx.logits = ctx.forward(ctx.inputs)
        ctx.loss = ctx.loss_fn(ctx.logits.float(), ctx.targets)
        ctx.loss.backward()
    for method in others:
        method.before_step(ctx)
    if owner is None:
        ctx.optimizer.step()
    else:
        cost = owner.train_step(ctx)
        ctx.loss, ctx.logits = cost.loss, cost.logits
    for method in others:
        method.after_step(ctx)
    ctx.optimizer.zero_grad(set_to_none=True)
    return ctx.loss, ctx.logits


@torch.no_grad()
def forward_eval(model: nn.Module, x: torch.Tensor, autocast: Any) -> None:
    was_training = model.training
    model.eval()
    with autocast:
        model(x)
    model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, autocast: Any) -> tuple[float, float]:
    """(mean loss, accuracy) over every batch of ``loader``."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=loader.device)
    correct = torch.zeros((), device=loader.device)
    seen = 0
    for x, y in loader:
        batch_loss, batch_correct = evaluate_batch(model, x, y, autocast)
        loss_sum += batch_loss
        correct += batch_correct
        seen += len(y)
    model.train(was_training)
    return float(loss_sum) / max(1, seen), float(correct) / max(1, seen)


@torch.no_grad()
def evaluate_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, correct predictions) of one batch; the model must be in evaluation mode."""
    with autocast:
        logits = model(x).float()
    return F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()
