"""Selective Backprop: forward the whole batch, train only on the examples with the highest loss.

Jiang, Wong, Zhou, Andersen, Dean, Ganger, Joshi, Kaminsky, Kozuch, Lipton, Pillai, "Accelerating Deep
Learning by Focusing on the Biggest Losers", 2019 (https://arxiv.org/abs/1910.00762).

The maths. Most examples of a batch are already classified with a small loss, and their gradient is
small too; the backward pass, about two thirds of a step's arithmetic, is spent mostly on them. Each
step therefore

1. forwards the whole batch of ``B`` examples without building a graph (the *selection forward*) and
   reads each example's loss ``l_i``;
2. keeps the ``k = max(1, round(keep * B))`` examples of highest loss (:func:`hardest`);
3. trains on those ``k`` alone: forward with a graph, the mean loss over the ``k``, backward, update.

A step costs one forward of ``B`` plus a forward and backward of ``k``: with ``keep = 1/3`` about
``1/3 + 1/3 * 3/3 = 2/3`` of a plain step in FLOPs (forward : backward about 1 : 2). The paper selects by
the loss's percentile among recent losses with a probability ``P(select) = percentile^beta`` and fills a
training batch from the selected examples across several forwards; ``beta = 2`` keeps about a third.
This implementation keeps a fixed top ``keep`` fraction of each batch instead (deterministic, the same
number of optimizer steps as the baseline, a smaller batch per step), with ``keep = 0.33`` as the default,
the paper's selectivity. The learning rate is not rescaled: the mean over the kept examples already has
the scale of a mean loss.

Pitfalls. BatchNorm sees the selection forward in training mode (batch statistics, as the loss the step
ranks is the training loss), so its running statistics take one extra update per step, from the full
batch. The training loss reported is the selection forward's mean over the whole batch (what a plain
step reports); the accuracy likewise.

Use it in your own loop::

    from wus_tune.methods.selective_backprop import selective_step
    loss, logits = selective_step(model, optimizer, x, y, keep=0.33)

or with the trainer: ``methods: {selective_backprop: {keep: 0.33}}``. See
docs/methods/selective_backprop.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wus_tune.errors import ConfigError
from wus_tune.methods import Method, StepContext, StepCost, register
from wus_tune.methods.study import MethodStudy

__all__ = ["kept_count", "hardest", "per_sample_loss", "select", "selective_step", "why_not", "SelectiveBackprop", "SelectiveBackpropStudy"]


# ---- pure functions ----------------------------------------------------------------------------


def kept_count(batch: int, keep: float) -> int:
    """How many of ``batch`` examples a step trains on: ``round(keep * batch)``, at least 1, at most ``batch``."""
    return min(batch, max(1, round(keep * batch)))


def hardest(losses: torch.Tensor, k: int) -> torch.Tensor:
    """The positions of the ``k`` largest of ``losses`` (a 1-D tensor), highest first."""
    return torch.topk(losses, k, sorted=True).indices


def per_sample_loss(loss_fn: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each example's loss under ``loss_fn``: a ``nn.CrossEntropyLoss`` (its label smoothing and class
    weights kept) or a function ``f(logits, targets, reduction=...)``."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return F.cross_entropy(logits, targets, weight=loss_fn.weight, ignore_index=loss_fn.ignore_index,
                               reduction="none", label_smoothing=loss_fn.label_smoothing)  # fmt: skip
    return loss_fn(logits, targets, reduction="none")


def select(forward: Callable[[torch.Tensor], torch.Tensor], loss_fn: Any, inputs: torch.Tensor, targets: torch.Tensor,
           keep: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The selection forward: ``(positions kept, each example's loss, logits)`` of the whole batch, no graph."""
    with torch.no_grad():
        logits = forward(inputs).float()
        losses = per_sample_loss(loss_fn, logits, targets)
    return hardest(losses, kept_count(len(targets), keep)), losses, logits


def selective_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor, *,
                   keep: float = 0.33, loss_fn: Any = None,
                   forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One Selective Backprop step: select on the whole batch, then forward, backward and update on the
    kept examples. Returns the whole batch's mean loss and its logits (from the selection forward); the
    gradients are left in place (zero them before the next step, as after any step)."""
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    forward = forward if forward is not None else model
    kept, losses, logits = select(forward, loss_fn, inputs, targets, keep)
    loss = loss_fn(forward(inputs[kept]).float(), targets[kept])
    loss.backward()
    optimizer.step()
    return losses.mean(), logits


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def why_not(model: nn.Module, batch: int, keep: float) -> str | None:
    """None when a step can train ``model`` on the kept part of a batch of ``batch``; else a one-line reason."""
    k = kept_count(batch, keep)
    if k < 2 and any(isinstance(m, _BATCH_NORMS) for m in model.modules()):
        return (f"it trains on {k} example of each batch of {batch}, and BatchNorm cannot normalise a batch of "
                "one in training; raise optim.batch_size or keep")
    return None


def _check_keep(keep: Any) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep: expected a fraction in (0, 1], got {keep!r}")


# ---- the Method ----------------------------------------------------------------------------------


@register
class SelectiveBackprop(Method):
    """Train each step on the ``keep`` fraction of the batch with the highest loss (:func:`selective_step`).

    Args:
        keep: fraction of each batch trained on, in (0, 1]; 1 trains on every example after a wasted
            selection forward (a check of the pricing, not a speed-up).

    Its steps are of kind ``selective`` (the selection forward included), priced as they ran. Metrics:
    ``selective_backprop/kept_fraction`` (examples trained on / examples forwarded in the epoch) and
    ``selective_backprop/kept_loss_ratio`` (mean loss of the kept examples / mean loss of the batch: how
    much harder the kept ones are).
    """

    name = "selective_backprop"
    study = "wus_tune.methods.selective_backprop:SelectiveBackpropStudy"

    def __init__(self, *, keep: float = 0.33) -> None:
        _check_keep(keep)
        super().__init__(keep=keep)
        self._kept = self._seen = 0
        self._kept_loss = self._loss = 0.0

    def setup(self, model: nn.Module, run: Any) -> nn.Module:
        why = why_not(model, run.batch_size, self.params["keep"])
        if why is not None:
            raise ConfigError(f"methods.selective_backprop: {why}")
        return model

    def step_kind(self) -> str:
        return "selective"

    def train_step(self, step: StepContext) -> StepCost:
        kept, losses, logits = select(step.forward, step.loss_fn, step.inputs, step.targets, self.params["keep"])
        loss = step.loss_fn(step.forward(step.inputs[kept]).float(), step.targets[kept])
        loss.backward()
        step.optimizer.step()
        self._kept += len(kept)
        self._seen += len(losses)
        # tensors stay on the device until the epoch's end: no synchronisation per step
        self._kept_loss = self._kept_loss + losses[kept].sum()
        self._loss = self._loss + losses.sum()
        return StepCost(loss=losses.mean(), logits=logits)

    def end_epoch(self, model: nn.Module, run: Any) -> dict[str, float]:
        metrics = {"selective_backprop/kept_fraction": self._kept / max(1, self._seen)}
        if self._seen:
            mean_kept, mean_all = float(self._kept_loss) / self._kept, float(self._loss) / self._seen
            metrics["selective_backprop/kept_loss_ratio"] = mean_kept / mean_all if mean_all > 0 else 1.0
        self._kept = self._seen = 0
        self._kept_loss = self._loss = 0.0
        return metrics


class SelectiveBackpropStudy(MethodStudy):
    """selective_backprop in a study: the kept fraction, the paper's selectivity as its default trial."""

    method = SelectiveBackprop
    SEARCH_SPACE = {
        "methods.selective_backprop.keep": {"type": "float", "low": 0.2, "high": 0.8,
                                            "doc": "fraction of each batch trained on (highest losses)"},
    }  # fmt: skip
    DEFAULT_TRIAL = {"keep": 0.33}

    @classmethod
    def check_module(cls, module: nn.Module, config: Any) -> str | None:
        why = why_not(module, config.optim.batch_size, config.methods.get(cls.method.name, {}).get("keep", 0.33))
        return f"selective_backprop: {why}" if why else None
