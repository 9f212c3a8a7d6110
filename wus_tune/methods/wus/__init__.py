"""Weight update skipping (WUS), after Safayenikoo & Akturk (2020): when the watched accuracy stops
moving, skip the weight updates (and the gradients behind them) while the biases keep training.

One package, one module per part:

* :mod:`~wus_tune.methods.wus.rule`: the knobs (:class:`WUSConfig`), the rule (:func:`should_skip`,
  :func:`accuracy_variation`) and :class:`WUSController`, which applies it in any training loop;
* :mod:`~wus_tune.methods.wus.frozen_prefix`: the cache of a frozen prefix's output (``cache_frozen_prefix``);
* :mod:`~wus_tune.methods.wus.method`: the :class:`~wus_tune.methods.Method` the trainer calls;
* :mod:`~wus_tune.methods.wus.study`: what a study searches and how it predicts a trial from its baseline
  (imported by the study only).
"""

from wus_tune.methods.wus.method import WUS
from wus_tune.methods.wus.rule import (
    Replay, WUSConfig, WUSController, accuracy_variation, layer_groups, param_groups, replay, should_skip, skip_frozen_parameters,
)  # fmt: skip

__all__ = ["WUS", "Replay", "WUSConfig", "WUSController", "accuracy_variation", "layer_groups", "param_groups", "replay",
           "should_skip", "skip_frozen_parameters"]  # fmt: skip
