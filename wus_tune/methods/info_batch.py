"""InfoBatch: prune part of the well-learned samples each epoch, rescale the loss of the rest.

Qin, Wang, Zheng, Gu, Peng, Xu, Zhou, Shang, Sun, Xie, Wang, You, "InfoBatch: Lossless Training Speed Up by
Unbiased Dynamic Data Pruning", ICLR 2024 (https://arxiv.org/abs/2303.04947).

The maths. Every training sample keeps a score ``s_i``: its loss the last time it was trained on (all 1
before the first epoch, so nothing is below the mean then). Before each epoch,

1. the *well-learned* samples are those with ``s_i < mean(s)``;
2. a random ``prune_ratio`` fraction ``r`` of them is left out of the epoch (:func:`prune`);
3. the well-learned samples that stay have their loss scaled by ``1 / (1 - r)``, so the epoch's expected
   gradient over the well-learned set is the one of the full set (the paper's unbiasedness argument:
   each of them is drawn with probability ``1 - r``);
4. from the fraction ``anneal`` of the epochs on (the paper's ``delta = 0.875``), every sample is drawn
   again with weight 1, so the last epochs correct the remaining bias of the pruned schedule.

An epoch then has ``(1 - r * well-learned fraction)`` of the batches: with ``r = 0.5`` and about half the
samples below the mean, a quarter fewer steps. The learning-rate schedule follows the epochs (the trainer
spreads it over each epoch's batches), so it ends where a full run's does. The cost: each step records its
samples' losses (a per-sample loss, a scatter), and each epoch's pruning reads every score once.

Use it in your own loop::

    from wus_tune.methods.info_batch import prune, weighted_loss
    scores = torch.ones(n)
    for epoch in range(epochs):
        kept, weights = prune(scores, 0.5, generator) if epoch < 0.875 * epochs else (torch.arange(n), torch.ones(n))
        for index in kept[torch.randperm(len(kept))].split(batch_size):
            losses = per_sample_loss(loss_fn, model(x[index]), y[index])
            weighted_loss(losses, weights[index]).backward(); optimizer.step(); optimizer.zero_grad()
            scores[index] = losses.detach()

or with the trainer: ``methods: {info_batch: {prune_ratio: 0.5, anneal: 0.875}}``. See docs/methods/info_batch.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wus_tune.errors import ConfigError
from wus_tune.methods import Method, RunInfo, StepContext, StepCost, register
from wus_tune.methods.selective_backprop import per_sample_loss
from wus_tune.methods.study import MethodStudy

__all__ = ["prunes_in", "prune", "weighted_loss", "InfoBatch", "InfoBatchStudy"]


# ---- pure functions ----------------------------------------------------------------------------


def prunes_in(epoch: int, epochs: int, anneal: float) -> bool:
    """Whether epoch ``epoch`` (from 0) of ``epochs`` prunes: from the second epoch (the first records the
    scores) while ``epoch < anneal * epochs``."""
    return 1 <= epoch < anneal * epochs


def prune(scores: torch.Tensor, prune_ratio: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's draw: ``(kept positions, weight of every sample)``.

    The samples with ``scores < scores.mean()`` are well-learned; ``round(prune_ratio * their number)`` of
    them, chosen uniformly (``generator`` on the scores' device), are left out. ``kept`` lists the others in
    position order; ``weights`` is ``1 / (1 - prune_ratio)`` for the well-learned samples kept, 1 elsewhere
    (the pruned samples' weight is never read)."""
    low = torch.nonzero(scores < scores.mean()).flatten()
    n_pruned = round(prune_ratio * len(low))
    weights = torch.ones_like(scores, dtype=torch.float32)
    keep = torch.ones(len(scores), dtype=torch.bool, device=scores.device)
    if n_pruned:
        order = torch.randperm(len(low), generator=generator, device=scores.device)
        keep[low[order[:n_pruned]]] = False
        weights[low[order[n_pruned:]]] = 1.0 / (1.0 - prune_ratio)
    return torch.nonzero(keep).flatten(), weights


def weighted_loss(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The batch's training loss: the mean of the per-sample losses, each times its weight (None: 1)."""
    return losses.mean() if weights is None else (losses * weights).mean()


def _check_args(prune_ratio: Any, anneal: Any) -> None:
    if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)) or not 0 <= prune_ratio < 1:
        raise ValueError(f"prune_ratio: expected a fraction in [0, 1), got {prune_ratio!r}")
    if isinstance(anneal, bool) or not isinstance(anneal, (int, float)) or not 0 <= anneal <= 1:
        raise ValueError(f"anneal: expected a fraction of the epochs in [0, 1], got {anneal!r}")


# ---- the Method ----------------------------------------------------------------------------------


@register
class InfoBatch(Method):
    """Dynamic data pruning (:func:`prune`): each epoch before ``anneal`` of them draws the samples it keeps.

    Args:
        prune_ratio: fraction of the well-learned samples (score below the mean) left out of an epoch, in
            [0, 1); the paper's default 0.5.
        anneal: the fraction of the epochs that prune (the paper's delta, 0.875): from there on every sample
            is trained on with weight 1.

    Its steps are ordinary steps with a weighted loss that also record each sample's loss (priced as they
    ran); the pruning before each epoch is charged to the run as one-off work. Metrics:
    ``info_batch/kept_fraction`` (samples drawn in the epoch / samples in the split) and
    ``info_batch/well_learned_fraction`` (samples below the mean score when the epoch was drawn).
    """

    name = "info_batch"
    study = "wus_tune.methods.info_batch:InfoBatchStudy"

    def __init__(self, *, prune_ratio: float = 0.5, anneal: float = 0.875) -> None:
        _check_args(prune_ratio, anneal)
        super().__init__(prune_ratio=prune_ratio, anneal=anneal)
        self.scores: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None  # this epoch's, None when it does not prune
        self.generator: torch.Generator | None = None
        self._drawn: tuple[int, torch.Tensor | None] | None = None  # (epoch, kept) of the latest draw
        self._well_learned = 0.0

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, run: RunInfo) -> None:
        loader = run.train_loader
        if loader is None or not hasattr(loader, "split_size"):
            raise ConfigError("methods.info_batch: needs the trainer's training loader (wus_tune.fit) to draw each "
                              "epoch's samples; in your own loop use wus_tune.methods.info_batch.prune")
        self.scores = torch.ones(loader.split_size, device=run.device)
        self.generator = torch.Generator().manual_seed(run.config.seed + 1013)  # its own: the data order is the loader's

    def epoch_samples(self, epoch: int, run: RunInfo) -> torch.Tensor | None:
        if self._drawn is not None and self._drawn[0] == epoch:  # a run resumed inside this epoch: the same draw
            return self._drawn[1]
        kept = None
        self.weights, self._well_learned = None, 0.0
        if prunes_in(epoch, run.config.epochs, self.params["anneal"]) and self.params["prune_ratio"] > 0:
            scores = self.scores.cpu()  # one transfer per epoch; the draw runs on the CPU generator
            self._well_learned = float((scores < scores.mean()).float().mean())
            kept, weights = prune(scores, self.params["prune_ratio"], self.generator)
            self.weights = weights.to(self.scores.device)
        self._drawn = (epoch, kept)
        return kept

    def train_step(self, step: StepContext) -> StepCost:
        logits = step.forward(step.inputs)
        losses = per_sample_loss(step.loss_fn, logits.float(), step.targets)
        index = step.indices
        weights = self.weights[index] if self.weights is not None and index is not None else None
        weighted_loss(losses, weights).backward()
        step.optimizer.step()
        losses = losses.detach()
        if index is not None:
            self.scores[index] = losses
        return StepCost(loss=losses.mean(), logits=logits.detach())

    def end_epoch(self, model: nn.Module, run: RunInfo) -> dict[str, float]:
        kept = self._drawn[1] if self._drawn is not None else None
        n = len(self.scores) if self.scores is not None else 0
        return {"info_batch/kept_fraction": len(kept) / n if kept is not None and n else 1.0,
                "info_batch/well_learned_fraction": self._well_learned}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.cpu().clone(), "rng": self.generator.get_state(),
                "drawn": None if self._drawn is None else (self._drawn[0], self._drawn[1]),
                "weights": None if self.weights is None else self.weights.cpu().clone(),
                "well_learned": self._well_learned}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.scores.device
        self.scores = state["scores"].to(device)
        self.generator.set_state(state["rng"])
        self._drawn = None if state["drawn"] is None else (int(state["drawn"][0]), state["drawn"][1])
        self.weights = None if state["weights"] is None else state["weights"].to(device)
        self._well_learned = float(state["well_learned"])


class InfoBatchStudy(MethodStudy):
    """info_batch in a study: the pruning ratio and the annealing fraction, the paper's values as its default trial."""

    method = InfoBatch
    SEARCH_SPACE = {
        "methods.info_batch.prune_ratio": {"type": "float", "low": 0.3, "high": 0.7,
                                           "doc": "fraction of the well-learned samples left out of an epoch"},
        "methods.info_batch.anneal": {"type": "float", "low": 0.6, "high": 0.95,
                                      "doc": "fraction of the epochs that prune (full data after it)"},
    }  # fmt: skip
    DEFAULT_TRIAL = {"prune_ratio": 0.5, "anneal": 0.875}
