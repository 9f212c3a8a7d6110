""":class:`Dataset`, the splits ready to train on, and :func:`load_dataset`, the one way data enters the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from wus_tune.config import DataConfig
from wus_tune.data.augment import channel_stats, feature_stats
from wus_tune.data.loaders import DeviceLoader, LoaderOptions, StreamLoader
from wus_tune.data.splits import check_consistent, materialise, nbytes, num_classes, parse, split_validation
from wus_tune.errors import DataError
from wus_tune.factories import call_factory, load_object
from wus_tune.registry import dataset_registry

__all__ = ["Dataset", "load_dataset"]


@dataclass
class Dataset:
    """Splits ready to train on: ``x`` uint8 images ``(N, C, H, W)`` or float inputs ``(N, ...)`` (features
    ``(N, D)``, float images), labels int64 ``(N,)``; ``test_*`` is None without a test split.

    A split too large for ``data.memory_budget_mb`` is in :attr:`streamed` (a ``torch.utils.data.Dataset``
    read by a DataLoader) instead, and its ``*_x``/``*_y`` are None."""

    train_x: torch.Tensor | None
    train_y: torch.Tensor | None
    val_x: torch.Tensor | None
    val_y: torch.Tensor | None
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    classes: list[str]
    name: str
    flip_ok: bool = True  # whether horizontal flips preserve the label (False for digits, or data.flip off)
    crop_ok: bool = True  # data.crop
    normalize: bool = True  # data.normalize
    streamed: dict[str, Any] = field(default_factory=dict)  # split -> torch Dataset, read by a DataLoader
    num_workers: int = 2  # DataLoader workers of streamed splits

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input without the batch dimension: (C, H, W) for images, (D,) for features."""
        return tuple(self.sample(1).shape[1:])

    @property
    def is_image(self) -> bool:
        """4-D inputs (N, C, H, W): the ones that may be cropped and flipped."""
        return len(self.input_shape) == 3

    def has(self, split: str) -> bool:
        return split in self.streamed or getattr(self, f"{split}_y") is not None

    def size(self, split: str) -> int:
        """Samples in a split (0 when it does not exist)."""
        if split in self.streamed:
            return len(self.streamed[split])
        y = getattr(self, f"{split}_y")
        return 0 if y is None else len(y)

    def sample(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` training inputs, as raw tensors (for checks: shapes, a model's output)."""
        if "train" in self.streamed:
            ds = self.streamed["train"]
            return torch.stack([torch.as_tensor(ds[i][0]) for i in range(min(n, len(ds)))])
        assert self.train_x is not None
        return self.train_x[:n]

    @cached_property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (per-feature for (N, D) inputs) mean and std of the training split (0..1 units for
        uint8); every split is normalised with these. A streamed training split is estimated from up to
        4,096 of its samples, spread evenly. ``data.normalize: false``: mean 0, std 1."""
        if "train" in self.streamed:
            ds = self.streamed["train"]
            step = max(1, len(ds) // 4096)
            x = torch.stack([torch.as_tensor(ds[i][0]) for i in range(0, len(ds), step)])
        else:
            assert self.train_x is not None
            x = self.train_x
        if not self.normalize:
            return (0.0,) * x.shape[1], (1.0,) * x.shape[1]
        return channel_stats(x) if x.dtype == torch.uint8 else feature_stats(x)

    def loader(
        self,
        split: str,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = True,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> DeviceLoader | StreamLoader:
        """Batches of ``"train"``, ``"val"`` or ``"test"``, normalised with the training split's statistics.

        Only the training split is shuffled and augmented; augmentation needs images (N, C, H, W) and
        follows :attr:`crop_ok` and :attr:`flip_ok`. A split in memory is a :class:`DeviceLoader`; a streamed
        one a :class:`StreamLoader` (DataLoader workers, pinned memory, persistent workers).
        """
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if not self.has(split):
            raise DataError(f"{self.name}: has no {split} split")
        mean, std = self.mean_std
        image = self.is_image
        options = LoaderOptions(
            batch_size=batch_size, device=device, train=split == "train", augment=augment and image,
            crop=self.crop_ok, flip=self.flip_ok, mean=mean, std=std, drop_last=drop_last, seed=seed,
            channels_last=channels_last and image, dtype=dtype,
        )  # fmt: skip
        if split in self.streamed:
            return StreamLoader(self.streamed[split], options, num_workers=self.num_workers)
        return DeviceLoader(getattr(self, f"{split}_x"), getattr(self, f"{split}_y"), options)


def load_dataset(cfg: DataConfig, data: Any = None) -> Dataset:
    """The data of ``cfg`` (or ``data``, the objects themselves), checked and split, ready for loaders.

    One path for every source. ``data`` -- or what the factory returns: the registered ``cfg.name``'s
    (built-ins are decoded once, then read from the cache) or ``cfg.factory``'s -- is ``(x, y)`` or a
    mapping ``{"train": ..., "val": ..., "test": ...}`` whose splits are ``(x, y)`` pairs or map-style
    ``torch.utils.data.Dataset`` objects giving ``(x, y)`` items (``val``/``test`` optional; the mapping may
    also say ``classes`` (names) and ``flip`` (False: mirroring changes the label)).

    Without a ``val`` split, validation is cut from the training data from ``cfg.split_seed`` alone: a
    seeded permutation, cut to ``cfg.subset`` samples, of which the first ``val_fraction`` (at least one
    when above 0) validate; each split keeps the source order, so evaluation order is stable. A Dataset
    that fits ``cfg.memory_budget_mb`` is materialised into tensors once; a larger one is streamed.
    Wrong types, shapes or dtypes raise a one-line :class:`DataError`.
    """
    if data is None:
        key = "data.factory" if cfg.factory else "data.name"
        path = cfg.factory or dataset_registry().get(cfg.name)
        if path is None:
            raise DataError(f"data.name: unknown dataset {cfg.name!r}; choose one of {', '.join(dataset_registry())}")
        factory = load_object(path, key)
        # Like a model's fields: only those set to other than their defaults (the built-ins' own defaults).
        fields = {k: v for k, v in (("data_dir", cfg.data_dir), ("cache_dir", cfg.cache_dir), ("download", cfg.download))
                  if v != getattr(DataConfig, k)}  # fmt: skip
        data = call_factory(factory, key, (), cfg.kwargs, fields)
        where = f"{key}: {path}" if cfg.factory else f"data.name: {cfg.name}"
    else:
        where = "data"
    splits, classes, flip_ok = parse(data, where)
    for split, value in list(splits.items()):
        if not isinstance(value, tuple) and nbytes(value) <= cfg.memory_budget_mb * 2**20:
            splits[split] = materialise(value, f"{where}: {split}", cfg.num_workers)
    splits = split_validation(splits, cfg, where)
    tensors = {k: v for k, v in splits.items() if isinstance(v, tuple)}
    streamed = {k: v for k, v in splits.items() if not isinstance(v, tuple)}
    check_consistent(splits, where)
    n_classes = num_classes(tensors, streamed, classes, where)
    get = lambda split, i: tensors[split][i] if split in tensors else None  # noqa: E731
    return Dataset(
        train_x=get("train", 0), train_y=get("train", 1), val_x=get("val", 0), val_y=get("val", 1),
        test_x=get("test", 0), test_y=get("test", 1),
        classes=list(classes) if classes is not None else [str(c) for c in range(n_classes)],
        name=cfg.name, flip_ok=flip_ok and cfg.flip, crop_ok=cfg.crop, normalize=cfg.normalize,
        streamed=streamed, num_workers=cfg.num_workers,
    )  # fmt: skip
