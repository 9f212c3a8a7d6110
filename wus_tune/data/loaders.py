"""Batch iterators on the training device: :class:`DeviceLoader` for a split held in memory,
:class:`StreamLoader` for a Dataset too large for the memory budget. Both take one :class:`LoaderOptions`
(or its fields as keywords) and transform each batch on the device the same way (:class:`BatchTransform`)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from wus_tune.data.augment import channel_stats, crop_flip, crop_padding, feature_stats

__all__ = ["LoaderOptions", "BatchTransform", "DeviceLoader", "StreamLoader"]


@dataclass(frozen=True, kw_only=True)
class LoaderOptions:
    """How a loader makes the batches of one split: the keywords both loaders take, one by one or as ``options``."""

    batch_size: int
    device: str | torch.device = "cpu"
    train: bool = False  # shuffle (and augment when asked); evaluation mode keeps the split's order
    augment: bool = False  # crop and/or flip, training mode only, images (N, C, H, W) only
    crop: bool = True
    flip: bool = True
    # Normalisation per channel (per feature of (N, D) inputs), in 0..1 units for uint8; None: computed from the
    # split itself, so a validation loader should be given the training statistics.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    drop_last: bool = True  # training mode: drop the last partial batch
    seed: int = 0  # of the shuffling and augmentation generators
    channels_last: bool = False  # images only
    dtype: torch.dtype = torch.float32  # of the inputs of each batch

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")


class BatchTransform:
    """What both loaders do to a batch on the device: crop/flip (images, training), normalise, convert.

    uint8 inputs are scaled to 0..1 before the statistics apply; float inputs are used as they are. ``sample``
    (a few inputs, or the whole split) gives the input kind and, without ``options.mean``/``std``, the statistics."""

    def __init__(self, sample: torch.Tensor, options: LoaderOptions, device: torch.device) -> None:
        self.device, self.train, self.dtype = device, options.train, options.dtype
        self.crop, self.flip = options.crop, options.flip
        self.augment = options.augment and sample.ndim == 4 and (self.crop or self.flip)
        image = sample.ndim == 4
        self.memory_format = torch.channels_last if options.channels_last and image else torch.contiguous_format
        mean, std = options.mean, options.std
        if mean is None or std is None:
            stats = channel_stats(sample) if sample.dtype == torch.uint8 else feature_stats(sample)
            mean, std = mean or stats[0], std or stats[1]
        view = (1, -1) + (1,) * (sample.ndim - 2)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(view)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(view)
        unit = 255.0 if sample.dtype == torch.uint8 else 1.0
        self._scale, self._shift = 1 / (unit * std_t), -mean_t / std_t  # (x/unit - mean)/std = x*scale + shift
        self.pad = crop_padding(*sample.shape[2:]) if image and self.crop else 0
        self.generator = torch.Generator(device=device).manual_seed(options.seed)

    def __call__(self, x: torch.Tensor, *, augment: bool = True) -> torch.Tensor:
        if augment and self.train and self.augment:
            b = len(x)
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2, b), device=self.device, generator=self.generator)
            flip = torch.rand(b, device=self.device, generator=self.generator) < 0.5 if self.flip else None
            x = crop_flip(x, dy, dx, self.pad, flip)
        out = torch.addcmul(self._shift, x.to(torch.float32), self._scale)
        return out.to(dtype=self.dtype, memory_format=self.memory_format)


class _Loader:
    """The one constructor both loaders share: their options, the device and the transform of each batch;
    and the samples a training epoch draws from (:meth:`use_samples`)."""

    def __init__(self, sample: torch.Tensor, options: LoaderOptions | None, fields: dict[str, Any]) -> None:
        if options is None:
            options = LoaderOptions(**fields)
        elif fields:
            options = dataclasses.replace(options, **fields)
        self.options = options
        self.device = torch.device(self.options.device)
        self.batch_size, self.train = self.options.batch_size, self.options.train
        self.batches = BatchTransform(sample, self.options, self.device)
        self.samples: torch.Tensor | None = None  # the positions the next epochs draw from; None: all

    @property
    def pad(self) -> int:
        return self.batches.pad

    def close(self) -> None:
        """Stop what the loader started (a :class:`StreamLoader`'s worker processes); a no-op here."""

    def use_samples(self, indices: torch.Tensor | None) -> None:
        """Draw the following training epochs from these positions of the split only (each at most once, in a
        fresh random order per epoch), or from every sample again (None): a method that trains on a
        per-epoch subset (dynamic data pruning) sets it before each epoch. ``len(self)`` follows it."""
        if indices is None:
            self.samples = None
            return
        if not self.train:
            raise ValueError("use_samples: only a training loader draws a subset")
        indices = torch.as_tensor(indices).to("cpu", torch.int64).flatten()
        n = self.split_size
        if len(indices) == 0 or int(indices.min()) < 0 or int(indices.max()) >= n:
            raise ValueError(f"use_samples: expected 1 or more positions in [0, {n}), got {len(indices)} from "
                             f"{int(indices.min()) if len(indices) else None} to {int(indices.max()) if len(indices) else None}")
        self.samples = indices.to(self.device)

    @property
    def split_size(self) -> int:
        """Samples in the split (whatever subset an epoch draws)."""
        raise NotImplementedError

    def _batch_count(self) -> int:
        """Batches per epoch: training mode drops the last partial batch (``drop_last``) unless the epoch
        draws fewer samples than one batch, which then gives one partial batch rather than an empty epoch."""
        n = len(self.samples) if self.samples is not None else self.split_size
        if self.train and self.options.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, _ in self.indexed():
            yield x, y

    def indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches with each sample's position in the split: ``(x, y, index)``, ``index`` int64 on the device."""
        raise NotImplementedError


class DeviceLoader(_Loader):
    """Batches of one split, held on ``device`` (uint8 images, or float inputs) and converted per batch.

    Training mode draws a fresh ``randperm`` each epoch from a generator on ``device`` seeded with
    ``seed`` (the same seed gives the same batches on the same device), crops and/or flips images
    (N, C, H, W) when ``augment`` (never other inputs), and drops the last partial batch when
    ``drop_last`` -- unless the split is smaller than one batch, which then gives one partial batch
    rather than an empty epoch. Evaluation mode keeps the split's order and every sample. Batches are
    ``(x, y)``: ``x`` normalised with ``mean``/``std`` (per channel, or per feature of (N, D) inputs;
    0..1 units for uint8; computed from ``x`` when omitted, so pass the training statistics to a
    validation loader) in ``dtype``. Options: :class:`LoaderOptions`, or its fields as keywords.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, options: LoaderOptions | None = None, **fields: Any) -> None:
        if x.dtype == torch.uint8 and x.ndim != 4:
            raise ValueError(f"x: expected uint8 (N, C, H, W) images, got {tuple(x.shape)}")
        if not (x.dtype == torch.uint8 or (x.is_floating_point() and x.ndim >= 2)):
            raise ValueError(f"x: expected uint8 images or float (N, ...) inputs, got {x.dtype} {tuple(x.shape)}")
        if y.shape != x.shape[:1]:
            raise ValueError(f"y: expected shape ({len(x)},), got {tuple(y.shape)}")
        super().__init__(x, options, fields)
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.drop_last = self.options.drop_last
        self.generator = self.batches.generator  # the data order; a snapshot saves and restores it

    def __len__(self) -> int:
        return self._batch_count()

    @property
    def split_size(self) -> int:
        return len(self.y)

    @property
    def num_samples(self) -> int:
        """Samples per epoch (fewer than the split holds when a partial batch is dropped or a subset is drawn)."""
        n = len(self.samples) if self.samples is not None else len(self.y)
        return min(n, len(self) * self.batch_size)

    def indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = None
        if self.train:
            pool = self.samples
            order = torch.randperm(len(self.y) if pool is None else len(pool), device=self.device, generator=self.generator)
            order = order if pool is None else pool[order]
        for i in range(len(self)):
            window = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if order is not None:
                index = order[window]
                yield self.batches(self.x[index]), self.y[index], index
            else:  # the split's order: a slice, no gather
                stop = min(window.stop, len(self.y))
                yield self.batches(self.x[window]), self.y[window], torch.arange(window.start, stop, device=self.device)

    def batches_in_order(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every example of the split once, in stored order, converted and never augmented (e.g. to cache
        a frozen prefix's features); the shuffling generator is not touched."""
        size = batch_size or self.batch_size
        for start in range(0, len(self.y), size):
            window = slice(start, start + size)
            yield self.batches(self.x[window], augment=False), self.y[window]


class StreamLoader(_Loader):
    """Batches of a map-style Dataset too large for the memory budget, read by a ``torch.utils.data.DataLoader``.

    ``num_workers`` worker processes decode ahead of the training loop (``persistent_workers``: started
    once, by the first ``iter``, and kept across epochs, so no epoch pays their start-up); batches are
    pinned on CUDA and copied with ``non_blocking``, then augmented and normalised on the device exactly as
    in :class:`DeviceLoader`. Training mode shuffles with a CPU generator seeded with ``seed``.

    Time accounting: the trainer's clock runs while the loop waits for a batch, so data loading is charged
    to training time in every run alike -- a method that makes steps cheaper (WUS) is not credited with
    loading time it does not save. :attr:`wait_s` says how much of it was waiting for data.
    """

    def __init__(
        self, dataset: Any, options: LoaderOptions | None = None, *, num_workers: int = 2, **fields: Any
    ) -> None:
        from torch.utils.data import DataLoader

        super().__init__(torch.as_tensor(dataset[0][0]).unsqueeze(0), options, fields)
        self.dataset = dataset
        self.drop_last = self.train and self.options.drop_last and len(dataset) >= self.batch_size
        # Training batches come from a batch sampler of this loader's own (in the main process), so an epoch
        # can draw a subset; the items carry their position, so each batch knows its samples.
        order = _EpochBatches(self, torch.Generator().manual_seed(self.options.seed)) if self.train else None
        batching = {"batch_sampler": order} if order is not None else {"batch_size": self.batch_size, "shuffle": False}
        self.loader = DataLoader(
            _Numbered(dataset), **batching, num_workers=num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
        )  # fmt: skip
        self.wait_s = 0.0

    def __len__(self) -> int:
        return self._batch_count()

    @property
    def split_size(self) -> int:
        return len(self.dataset)

    @property
    def num_samples(self) -> int:
        n = len(self.samples) if self.samples is not None else len(self.dataset)
        return min(n, len(self) * self.batch_size)

    def close(self) -> None:
        """Stop the worker processes now, not whenever Python's cycle collector gets to them: the loader and
        its batch order refer to each other, so only the collector frees them -- at a later moment, inside
        another run's timed work, and in an order in which each worker waits out torch's 5 s status check
        before it exits (10 s of wall time landed in an unrelated trial of benchmarks/time_truth.py). With the
        DataLoader dropped here, reference counting shuts its workers down at once."""
        self.loader = None

    def indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                x, y, index = next(it)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - start
            x = torch.as_tensor(x).to(self.device, non_blocking=True)
            y = torch.as_tensor(y).to(self.device, torch.int64, non_blocking=True)
            yield self.batches(x), y, torch.as_tensor(index).to(self.device, torch.int64, non_blocking=True)


class _Numbered(torch.utils.data.Dataset):
    """A Dataset's items with their position: ``(x, y, i)``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        x, y = self.dataset[i]
        return x, y, i


class _EpochBatches(torch.utils.data.Sampler):
    """A streamed training epoch's batches of positions: a fresh permutation of the split, or of the loader's
    :attr:`~_Loader.samples`, cut as :meth:`_Loader._batch_count` says."""

    def __init__(self, loader: StreamLoader, generator: torch.Generator) -> None:
        self.owner, self.generator = loader, generator

    def __len__(self) -> int:
        return self.owner._batch_count()

    def __iter__(self) -> Iterator[list[int]]:
        pool = self.owner.samples
        n = len(self.owner.dataset) if pool is None else len(pool)
        order = torch.randperm(n, generator=self.generator)
        if pool is not None:
            order = pool.cpu()[order]
        size = self.owner.batch_size
        for i in range(len(self)):
            yield order[i * size:(i + 1) * size].tolist()
