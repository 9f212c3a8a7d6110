"""Data: :func:`load_dataset`, the one way data enters the trainer, and batch iterators on the training device.

Any source -- a built-in dataset, a ``wus_tune.datasets`` entry point, a ``data.factory`` import path, or
the objects handed to ``fit(config, data=...)`` -- gives ``(x, y)`` tensors or a mapping of splits, each an
``(x, y)`` pair or a map-style ``torch.utils.data.Dataset``; :func:`load_dataset` checks and splits it.
Kinds: uint8 images ``(N, C, H, W)`` (cropped/flipped when augmenting), float inputs (features ``(N, D)``:
never augmented), and Datasets, materialised once when they fit ``data.memory_budget_mb`` or streamed by
:class:`StreamLoader` when they do not.

Small image datasets fit in device memory as uint8 (CIFAR-10: 150 MiB), so instead of a DataLoader with
worker processes, :class:`DeviceLoader` keeps the images on the device and makes a batch by slicing a
``randperm``, cropping and flipping it with one batched gather, and normalising it there. On a GPU this
takes microseconds per batch, so the time a training run reports is time spent training.

:func:`load_dataset` decodes a source once and caches the decoded tensors (``torch.save``) under
``cfg.cache_dir``, ``$WUS_TUNE_CACHE`` or ``~/.cache/wus_tune``; the train/validation split is made after
the cache, from ``cfg.split_seed`` alone. Sources: ``digits`` (scikit-learn, offline, 8x8), ``cifar10`` /
``cifar100`` (torchvision's pickle files, or an ImageFolder directory / ``.tar.gz``) and ``imagefolder``.
See ``docs/data.md``.

Modules, in the order data flows through them: ``builtin`` (the built-in datasets), ``image_folder``
(ImageFolder directories and archives), ``cache`` (the decoded-tensor disk cache), ``splits`` (checking what
a source returned and cutting validation), ``dataset`` (:class:`Dataset`, :func:`load_dataset`),
``augment`` (crop/flip, normalisation statistics) and ``loaders`` (:class:`DeviceLoader`,
:class:`StreamLoader`, sharing :class:`LoaderOptions`).
"""

from __future__ import annotations

from wus_tune.data.augment import channel_stats, crop_flip, crop_padding, feature_stats
from wus_tune.data.builtin import cifar10, cifar100, digits, imagefolder
from wus_tune.data.cache import default_cache_dir
from wus_tune.data.dataset import Dataset, load_dataset
from wus_tune.data.image_folder import IMAGE_EXTENSIONS
from wus_tune.data.loaders import DeviceLoader, LoaderOptions, StreamLoader

__all__ = [
    "Dataset",
    "DeviceLoader",
    "StreamLoader",
    "LoaderOptions",
    "load_dataset",
    "feature_stats",
    "digits",
    "cifar10",
    "cifar100",
    "imagefolder",
    "channel_stats",
    "crop_flip",
    "crop_padding",
    "default_cache_dir",
    "IMAGE_EXTENSIONS",
]
