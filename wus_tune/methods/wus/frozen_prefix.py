"""Reuse what a frozen prefix cannot change: compute its output once, train the top on it.

When every parameter below some layer is frozen (WUS's skip window with ``bias_scope: last:K``), and the
frozen layers' normalisation uses its running statistics (eval mode) and the images are not augmented,
the prefix's output for each training image is fixed. :func:`build_feature_cache` computes it once, in
batches, on the device, under a memory cap; the top is then trained on ``cache.features[index]``, so a
step costs the top's forward and backward only.

Exactly what changes against an ordinary skip step (a user opts in, e.g. ``wus.cache_frozen_prefix``):

* the prefix runs in eval mode: BatchNorm normalises with its running statistics and does not update
  them; dropout is off. The top keeps training mode;
* cached steps see the images without augmentation (one fixed view of each image per window);
* the batches are drawn by the cache (a seeded permutation of the training set per pass), not by the
  data loader.

The split is found on the model as a chain of modules applied in order: an ``nn.Sequential`` (nested ones
are flattened), or any module with a ``forward_chain()`` method returning that list. The prefix is the
chain up to the first module that has a parameter requiring a gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["sequential_chain", "split_frozen_prefix", "FeatureCache", "build_feature_cache", "cache_bytes",
           "PrefixCacheSession"]


def sequential_chain(model: nn.Module) -> list[nn.Module] | None:
    """The model as modules applied one after another, or ``None`` if it does not say it is one."""
    if isinstance(model, nn.Sequential):
        chain: list[nn.Module] = []
        for child in model:
            inner = sequential_chain(child) if isinstance(child, nn.Sequential) or hasattr(child, "forward_chain") else None
            chain.extend(inner if inner is not None else [child])
        return chain
    forward_chain = getattr(model, "forward_chain", None)
    if callable(forward_chain):
        chain = []
        for child in forward_chain():
            inner = sequential_chain(child) if isinstance(child, nn.Sequential) else None
            chain.extend(inner if inner is not None else [child])
        return chain
    return None


def split_frozen_prefix(model: nn.Module) -> tuple[nn.Sequential, nn.Sequential] | None:
    """``(prefix, top)`` sharing the model's modules, split before the first module with a parameter that
    requires a gradient; ``None`` when the model is not a chain or nothing below the top is frozen."""
    chain = sequential_chain(model)
    if chain is None:
        return None
    first = next((i for i, m in enumerate(chain) if any(p.requires_grad for p in m.parameters())), None)
    if not first:  # None: nothing trains; 0: the first module trains, so there is no prefix to cache
        return None
    return nn.Sequential(*chain[:first]), nn.Sequential(*chain[first:])


@dataclass
class FeatureCache:
    """The prefix's output for every training image, with its targets, and the order to draw batches in."""

    features: torch.Tensor  # (N, ...) on the training device
    targets: torch.Tensor  # (N,)
    generator: torch.Generator

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def batch_indices(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Endless batches: a fresh permutation of the cache per pass, last partial batch dropped
        (unless the cache is smaller than one batch)."""
        n = len(self.targets)
        per_pass = max(1, n // batch_size)
        while True:
            order = torch.randperm(n, device=self.targets.device, generator=self.generator)
            for i in range(per_pass):
                yield order[i * batch_size:(i + 1) * batch_size]


def cache_bytes(prefix: nn.Module, sample: torch.Tensor, num_images: int, autocast_dtype: torch.dtype | None = None) -> tuple[int, torch.Size, torch.dtype]:
    """Bytes a cache of ``num_images`` would take, with the feature shape and dtype (one image probed)."""
    with torch.no_grad(), _autocast(sample.device.type, autocast_dtype), _eval_mode(prefix):
        out = prefix(sample[:1])
    return num_images * out[0].numel() * out.element_size(), out.shape[1:], out.dtype


def build_feature_cache(
    prefix: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_images: int,
    max_bytes: int,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> FeatureCache | None:
    """Run ``prefix`` in eval mode over ``batches`` (the whole training set, unaugmented, in order) and keep
    its outputs; ``None`` when they would take more than ``max_bytes`` (checked before anything is
    allocated). Peak memory: the cache plus one batch's forward pass."""
    iterator = iter(batches)
    try:
        x, y = next(iterator)
    except StopIteration:
        return None
    needed, shape, dtype = cache_bytes(prefix, x, num_images, autocast_dtype)
    if needed > max_bytes:
        return None
    device = x.device
    features = torch.empty((num_images, *shape), dtype=dtype, device=device)
    targets = torch.empty(num_images, dtype=y.dtype, device=device)
    filled = 0
    with torch.no_grad(), _autocast(device.type, autocast_dtype), _eval_mode(prefix):
        while True:
            n = len(y)
            features[filled:filled + n] = prefix(x)
            targets[filled:filled + n] = y
            filled += n
            try:
                x, y = next(iterator)
            except StopIteration:
                break
    if filled != num_images:
        raise ValueError(f"num_images: expected {num_images} images from batches, got {filled}")
    return FeatureCache(features, targets, torch.Generator(device=device).manual_seed(seed))


def _autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


class PrefixCacheSession:
    """One cache's life: built at the first step of a frozen period, used for its steps, dropped at its end.

    ``begin(...)`` builds the cache (or records a fallback when it would exceed ``max_bytes`` or the model
    has no frozen prefix) and is a no-op while one is held; ``step_loss(loss_fn)`` trains on the next
    cached batch; ``end()`` drops the cache, so its memory is free outside the frozen period.
    """

    def __init__(self, model: nn.Module, *, max_bytes: int, batch_size: int, seed: int = 0,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self.seed = seed
        self.autocast_dtype = autocast_dtype
        self.cache: FeatureCache | None = None
        self.top: nn.Sequential | None = None
        self.builds = 0  # caches built
        self.fallbacks = 0  # frozen periods that ran without a cache (over the cap, or no prefix)
        self.peak_bytes = 0
        self._open = False  # inside a frozen period (with or without a cache)
        self._indices: Iterator[torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        """A cache is held (its steps train the top on it)."""
        return self.cache is not None

    @property
    def in_period(self) -> bool:
        """Inside a frozen period, with or without a cache."""
        return self._open

    def begin(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_images: int) -> bool:
        """Start a frozen period (once); returns whether its steps train on a cache."""
        if self._open:
            return self.active
        self._open = True
        split = split_frozen_prefix(self.model)
        cache = None
        if split is not None:
            prefix, top = split
            cache = build_feature_cache(prefix, batches, num_images=num_images, max_bytes=self.max_bytes,
                                        seed=self.seed + self.builds + self.fallbacks,
                                        autocast_dtype=self.autocast_dtype)
        if cache is None:
            self.fallbacks += 1
            return False
        self.cache, self.top = cache, top
        self.builds += 1
        self.peak_bytes = max(self.peak_bytes, cache.nbytes)
        self._indices = cache.batch_indices(self.batch_size)
        return True

    def step_loss(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, logits, targets)`` of the top on the next cached batch (call ``loss.backward()``)."""
        assert self.cache is not None and self.top is not None and self._indices is not None, "begin() first"
        index = next(self._indices)
        features, targets = self.cache.features[index], self.cache.targets[index]
        with _autocast(features.device.type, self.autocast_dtype):
            logits = self.top(features)
        return loss_fn(logits.float(), targets), logits, targets

    def end(self) -> None:
        """Close the frozen period and free the cache."""
        self.cache = self.top = self._indices = None
        self._open = False
