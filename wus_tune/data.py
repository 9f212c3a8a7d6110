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
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.nn.functional as F

from wus_tune.config import DataConfig
from wus_tune.errors import DataError, one_line

__all__ = [
    "Dataset",
    "DeviceLoader",
    "StreamLoader",
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

CACHE_VERSION = 1  # bump when the decoded layout changes, so old cache files are rebuilt
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_TV_HINT = (
    "pass --data-dir with torchvision's CIFAR files or an ImageFolder directory/.tar.gz "
    "(e.g. ../shared/data/cifar10-train-jpeg.tar.gz), or use --dataset digits"
)


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
        options = dict(
            batch_size=batch_size, device=device, train=split == "train", augment=augment and image,
            crop=self.crop_ok, flip=self.flip_ok, mean=mean, std=std, drop_last=drop_last, seed=seed,
            channels_last=channels_last and image, dtype=dtype,
        )  # fmt: skip
        if split in self.streamed:
            return StreamLoader(self.streamed[split], num_workers=self.num_workers, **options)  # type: ignore[arg-type]
        return DeviceLoader(getattr(self, f"{split}_x"), getattr(self, f"{split}_y"), **options)  # type: ignore[arg-type]


@dataclass
class _Decoded:
    """What the cache holds: a source's full training (and test) images, before any split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    classes: list[str]
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None


# ---- public entry point -----------------------------------------------------------------------------

SPLITS = ("train", "val", "test")
_EXTRA_KEYS = ("classes", "flip")  # what a factory's mapping may carry beside the splits


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
    import wus_tune.plugins as plugins

    if data is None:
        key = "data.factory" if cfg.factory else "data.name"
        path = cfg.factory or plugins.dataset_registry().get(cfg.name)
        if path is None:
            raise DataError(f"data.name: unknown dataset {cfg.name!r}; choose one of {', '.join(plugins.dataset_registry())}")
        factory = plugins.load_object(path, key)
        # Like a model's fields: only those set to other than their defaults (the built-ins' own defaults).
        fields = {k: v for k, v in (("data_dir", cfg.data_dir), ("cache_dir", cfg.cache_dir), ("download", cfg.download))
                  if v != getattr(DataConfig, k)}  # fmt: skip
        data = plugins.call_factory(factory, key, (), cfg.kwargs, fields)
        where = f"{key}: {path}" if cfg.factory else f"data.name: {cfg.name}"
    else:
        where = "data"
    splits, classes, flip_ok = _parse(data, where)
    for split, value in list(splits.items()):
        if not isinstance(value, tuple) and _nbytes(value) <= cfg.memory_budget_mb * 2**20:
            splits[split] = _materialise(value, f"{where}: {split}", cfg.num_workers)
    splits = _split_validation(splits, cfg, where)
    tensors = {k: v for k, v in splits.items() if isinstance(v, tuple)}
    streamed = {k: v for k, v in splits.items() if not isinstance(v, tuple)}
    _check_consistent(splits, where)
    num_classes = _num_classes(tensors, streamed, classes, where)
    get = lambda split, i: tensors[split][i] if split in tensors else None  # noqa: E731
    return Dataset(
        train_x=get("train", 0), train_y=get("train", 1), val_x=get("val", 0), val_y=get("val", 1),
        test_x=get("test", 0), test_y=get("test", 1),
        classes=list(classes) if classes is not None else [str(c) for c in range(num_classes)],
        name=cfg.name, flip_ok=flip_ok and cfg.flip, crop_ok=cfg.crop, normalize=cfg.normalize,
        streamed=streamed, num_workers=cfg.num_workers,
    )  # fmt: skip


def _parse(data: Any, where: str) -> tuple[dict[str, Any], list[str] | None, bool]:
    """A factory's result -> ({split: (x, y) or a torch Dataset}, class names or None, flip_ok)."""
    if isinstance(data, Mapping):
        unknown = sorted(set(map(str, data)) - set(SPLITS) - set(_EXTRA_KEYS))
        if unknown:
            raise DataError(f"{where}: unknown key {unknown[0]!r} in the returned mapping; expected train, val, test "
                            f"(and optionally classes, flip)")  # fmt: skip
        if "train" not in data:
            raise DataError(f"{where}: the returned mapping has no 'train' split")
        splits = {k: _split(data[k], f"{where}: {k}") for k in SPLITS if data.get(k) is not None}
        classes = data.get("classes")
        if classes is not None and not (isinstance(classes, (list, tuple)) and classes):
            raise DataError(f"{where}: classes: expected a non-empty list of names, got {type(classes).__name__}")
        return splits, [str(c) for c in classes] if classes is not None else None, bool(data.get("flip", True))
    return {"train": _split(data, where)}, None, True


def _split(value: Any, where: str) -> Any:
    """A split: an (x, y) pair of tensors (numpy arrays are converted) or a map-style torch Dataset."""
    from torch.utils.data import Dataset as TorchDataset
    from torch.utils.data import IterableDataset

    if isinstance(value, IterableDataset):
        raise DataError(f"{where}: an IterableDataset has no length or random access; give a map-style Dataset")
    if isinstance(value, TorchDataset):
        try:
            n = len(value)  # type: ignore[arg-type]
        except TypeError:
            raise DataError(f"{where}: the Dataset has no __len__") from None
        if n == 0:
            raise DataError(f"{where}: the Dataset is empty")
        item = _item(value, 0, where)
        _check_x(item[0].unsqueeze(0), f"{where}: item 0")
        return value
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise DataError(f"{where}: expected (x, y) tensors, a mapping of splits or a torch Dataset, "
                        f"got {type(value).__name__}")  # fmt: skip
    x, y = (_tensor(v, f"{where}: {name}") for v, name in zip(value, "xy"))
    _check_x(x, f"{where}: x")
    y = _check_y(y, f"{where}: y")
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{where}: the split is empty")
    return (x, y)


def _tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if type(value).__module__ == "numpy":
        return torch.from_numpy(value)
    raise DataError(f"{where}: expected a tensor, got {type(value).__name__}")


def _check_x(x: torch.Tensor, where: str) -> None:
    if x.dtype == torch.uint8:
        if x.ndim != 4:
            raise DataError(f"{where}: uint8 images must be (N, C, H, W), got shape {tuple(x.shape)}; "
                            "add the channel dimension (x.unsqueeze(1)) or give float features")  # fmt: skip
    elif not x.is_floating_point():
        raise DataError(f"{where}: expected uint8 images or float inputs, got {x.dtype}; convert with x.float()")
    elif x.ndim < 2:
        raise DataError(f"{where}: expected inputs (N, D) or (N, C, H, W), got shape {tuple(x.shape)}")


def _check_y(y: torch.Tensor, where: str) -> torch.Tensor:
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{where}: labels must be integer class indices, got {y.dtype}; convert with y.long()")
    if y.ndim != 1:
        raise DataError(f"{where}: labels must have shape (N,), got {tuple(y.shape)} (class indices, not one-hot)")
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{where}: labels must be class indices 0..C-1, found {int(y.min())}")
    return y.to(torch.int64)


def _item(ds: Any, i: int, where: str) -> tuple[torch.Tensor, int]:
    try:
        item = ds[i]
    except Exception as e:
        raise DataError(f"{where}: reading item {i} raised {one_line(e, with_type=True)}") from None
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError(f"{where}: items must be (x, y) pairs, item {i} is {type(item).__name__}")
    x, y = item
    if not isinstance(x, torch.Tensor) and type(x).__module__ != "numpy":
        raise DataError(f"{where}: item {i}'s x is {type(x).__name__}, not a tensor; give the Dataset a transform "
                        "that returns tensors (e.g. torchvision's PILToTensor)")  # fmt: skip
    label = torch.as_tensor(y)
    if label.ndim != 0 or label.is_floating_point() or label.dtype == torch.bool:
        raise DataError(f"{where}: item {i}'s label must be an integer class index, got {y!r}")
    return torch.as_tensor(x), int(label)


def _nbytes(ds: Any) -> int:
    x, _ = _item(ds, 0, "data")
    return len(ds) * x.numel() * x.element_size()


# Materialised Datasets, by object: a study's trials get the same Dataset object and read it once.
_MATERIALISED: dict[int, tuple[Any, tuple[torch.Tensor, torch.Tensor]]] = {}


def _materialise(ds: Any, where: str, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a map-style Dataset once into (x, y) tensors; a DataLoader's workers help with large ones."""
    hit = _MATERIALISED.get(id(ds))
    if hit is not None and hit[0] is ds:
        return hit[1]
    from torch.utils.data import DataLoader

    workers = num_workers if len(ds) >= 20_000 else 0  # below that, starting workers costs more than it saves
    xs, ys = [], []
    try:
        for x, y in DataLoader(ds, batch_size=512, num_workers=workers):
            xs.append(torch.as_tensor(x))
            ys.append(torch.as_tensor(y))
    except Exception as e:
        raise DataError(f"{where}: reading the Dataset failed ({one_line(e, with_type=True)}); "
                        "items must be (tensor, int) pairs of one shape")  # fmt: skip
    pair = _split((torch.cat(xs), torch.cat(ys)), where)
    if len(_MATERIALISED) >= 4:
        _MATERIALISED.pop(next(iter(_MATERIALISED)))
    _MATERIALISED[id(ds)] = (ds, pair)
    return pair


def _split_validation(splits: dict[str, Any], cfg: DataConfig, where: str) -> dict[str, Any]:
    """Apply ``subset`` to the training split and, without a ``val`` split, cut one from it."""
    train = splits["train"]
    n = len(train[1]) if isinstance(train, tuple) else len(train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    if cfg.subset is not None:
        if cfg.subset > n:
            raise DataError(f"data.subset: {cfg.subset} is more than the {n} training samples of {cfg.name}")
        order = order[: cfg.subset]
    n_val = 0
    if "val" not in splits:
        n_val = round(len(order) * cfg.val_fraction)
        if cfg.val_fraction > 0:
            n_val = min(max(n_val, 1), len(order) - 1)
    if cfg.subset is None and n_val == 0:
        return splits
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    out = dict(splits)
    out["train"] = _take(train, train_idx)
    if n_val:
        out["val"] = _take(train, val_idx)
    return out


def _take(split: Any, index: torch.Tensor) -> Any:
    if isinstance(split, tuple):
        return split[0][index], split[1][index]
    from torch.utils.data import Subset

    return Subset(split, index.tolist())


def _check_consistent(splits: dict[str, Any], where: str) -> None:
    """Every split: the training split's input shape and dtype."""
    def shape_dtype(split: Any) -> tuple[tuple[int, ...], torch.dtype]:
        if isinstance(split, tuple):
            return tuple(split[0].shape[1:]), split[0].dtype
        x, _ = _item(split, 0, where)
        return tuple(x.shape), x.dtype

    ref = shape_dtype(splits["train"])
    for name, split in splits.items():
        got = shape_dtype(split)
        if got != ref:
            raise DataError(f"{where}: {name} inputs are {got[1]} {got[0]} but train inputs are {ref[1]} {ref[0]}")


def _num_classes(tensors: dict[str, Any], streamed: dict[str, Any], classes: list[str] | None, where: str) -> int:
    """len(classes) when named, else the largest label + 1 (streamed splits: their first 4,096 items)."""
    top = max(int(y.max()) for _, y in tensors.values()) if tensors else -1
    for split, ds in streamed.items():
        step = max(1, len(ds) // 4096)
        top = max(top, max(_item(ds, i, f"{where}: {split}")[1] for i in range(0, len(ds), step)))
    if classes is not None:
        if top >= len(classes):
            raise DataError(f"{where}: label {top} found but only {len(classes)} classes are named")
        return len(classes)
    if top < 1:
        raise DataError(f"{where}: every label is {top}; a classifier needs at least two classes")
    return top + 1


# ---- built-in datasets: factories like a user's, registered in wus_tune.plugins ----------------------


def digits(*, cache_dir: str | None = None) -> dict[str, Any]:
    """scikit-learn's bundled 8x8 digits (offline), scaled to uint8; never flipped (a mirrored 2 is no digit)."""
    d = _cached("digits", cache_dir, {"source": "sklearn-digits"}, _load_digits)
    return {"train": (d.train_x, d.train_y), "classes": d.classes, "flip": False}


def cifar10(*, data_dir: str | None = None, cache_dir: str | None = None, download: bool = True) -> dict[str, Any]:
    """CIFAR-10: torchvision's files under ``data_dir`` (downloaded when allowed), or an ImageFolder copy."""
    return _decoded_splits(_cifar("cifar10", data_dir, cache_dir, download))


def cifar100(*, data_dir: str | None = None, cache_dir: str | None = None, download: bool = True) -> dict[str, Any]:
    """CIFAR-100 (the 100 fine labels), from the same sources as :func:`cifar10`."""
    return _decoded_splits(_cifar("cifar100", data_dir, cache_dir, download))


def imagefolder(*, data_dir: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """Any ImageFolder directory or ``.tar.gz`` (``[top/]<class>/<image>``, or ``train/`` + ``test/``)."""
    path = _existing(data_dir)
    return _decoded_splits(_cached("imagefolder", cache_dir, _path_key(path), lambda: _load_image_folder(path)))


def _decoded_splits(d: _Decoded) -> dict[str, Any]:
    out: dict[str, Any] = {"train": (d.train_x, d.train_y), "classes": d.classes}
    if d.test_x is not None:
        out["test"] = (d.test_x, d.test_y)
    return out


def default_cache_dir() -> Path:
    """``$WUS_TUNE_CACHE`` if set, else ``~/.cache/wus_tune``."""
    return Path(os.environ.get("WUS_TUNE_CACHE") or Path.home() / ".cache" / "wus_tune").expanduser()


# ---- sources ----------------------------------------------------------------------------------------


def _cifar(name: str, data_dir: str | None, cache_dir: str | None, download: bool) -> _Decoded:
    """torchvision's CIFAR files or an ImageFolder directory/archive, decoded once and cached."""
    tv_cls = _torchvision_class(name)
    if data_dir:
        path = _existing(data_dir)
        if path.is_file() or (not (path / tv_cls.base_folder).is_dir() and _has_class_folders(path)):
            return _cached(name, cache_dir, _path_key(path), lambda: _load_image_folder(path))
        root = path.parent if path.name == tv_cls.base_folder else path  # accept the batches folder itself
    else:
        root = _cache_root(cache_dir) / "torchvision"
    root = root.resolve()
    key = {"source": f"torchvision-{name}", "root": str(root)}
    return _cached(name, cache_dir, key, lambda: _load_cifar(name, root, download))


def _existing(data_dir: str | None) -> Path:
    path = Path(data_dir or "").expanduser()
    if not data_dir or not path.exists():
        raise DataError(f"data.data_dir: {data_dir!r} does not exist")
    return path


def _load_digits() -> _Decoded:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).to(torch.int64)  # 8x8 counts 0..16, stored as float64
    x = (x * 255 // 16).to(torch.uint8).unsqueeze(1)
    return _Decoded(x, torch.from_numpy(bunch.target).to(torch.int64), [str(c) for c in range(10)])


def _torchvision_class(name: str) -> Any:
    from torchvision.datasets import CIFAR10, CIFAR100

    return {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]


def _load_cifar(name: str, root: Path, download: bool) -> _Decoded:
    """torchvision's CIFAR files under ``root``; downloaded there first when allowed and missing.

    torchvision rejects files whose md5 differs from the official release (a re-pickled or trimmed copy);
    those are read by :func:`_read_cifar_pickles`, which follows the same documented format.
    """
    tv_cls = _torchvision_class(name)
    folder = root / tv_cls.base_folder
    names = [f for f, _ in tv_cls.train_list + tv_cls.test_list] + [tv_cls.meta["filename"]]
    if all((folder / f).is_file() for f in names):
        try:
            parts = [tv_cls(str(root), train=train, download=False) for train in (True, False)]
        except RuntimeError:  # md5 mismatch
            return _read_cifar_pickles(folder, tv_cls)
    elif not download:
        raise DataError(f"{name}: not found in {root} and data.download is off; {_TV_HINT}")
    else:
        try:
            parts = [tv_cls(str(root), train=train, download=True) for train in (True, False)]
        except Exception as e:  # URLError, timeouts, a corrupt download: all mean the same to the user
            raise DataError(f"{name}: download into {root} failed ({one_line(e)}); {_TV_HINT}") from None
    (train_x, train_y), (test_x, test_y) = [
        (torch.from_numpy(p.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(p.targets, dtype=torch.int64))
        for p in parts
    ]
    return _Decoded(train_x, train_y, list(parts[0].classes), test_x, test_y)


def _read_cifar_pickles(folder: Path, tv_cls: Any) -> _Decoded:
    """Read CIFAR's python pickle batches: dicts with ``data`` uint8 (N, 3072), channel-major 32x32 rows,
    and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100); class names in the meta file."""

    def load(file: str) -> dict[str, Any]:
        try:
            with open(folder / file, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except Exception as e:
            raise DataError(f"{folder / file}: not a readable CIFAR pickle file ({one_line(e)})") from None

    def split(files: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for file, _md5 in files:
            entry = load(file)
            try:
                xs.append(torch.as_tensor(entry["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
                ys.append(torch.as_tensor(entry["labels"] if "labels" in entry else entry["fine_labels"]))
            except (KeyError, TypeError, RuntimeError) as e:
                raise DataError(f"{folder / file}: not a CIFAR batch ({one_line(e)})") from None
            if len(xs[-1]) != len(ys[-1]):
                raise DataError(f"{folder / file}: {len(xs[-1])} images but {len(ys[-1])} labels")
        return torch.cat(xs), torch.cat(ys).to(torch.int64)

    meta = load(tv_cls.meta["filename"])
    if tv_cls.meta["key"] not in meta:
        raise DataError(f"{folder / tv_cls.meta['filename']}: no {tv_cls.meta['key']!r} entry")
    return _Decoded(*split(tv_cls.train_list), list(meta[tv_cls.meta["key"]]), *split(tv_cls.test_list))


# ---- ImageFolder: [top/]<class>/<image>, a directory or an archive -------------------------------------


def _is_image(name: str) -> bool:
    p = PurePosixPath(name)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in p.parts)


def _has_class_folders(path: Path, depth: int = 2) -> bool:
    """Whether a subdirectory (or a sub-subdirectory, for a ``train/`` top folder) holds images directly."""
    try:
        subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
        return any(
            any(f.is_file() and _is_image(f.name) for f in d.iterdir())
            or (depth > 1 and _has_class_folders(d, depth - 1))
            for d in subdirs
        )
    except OSError:
        return False


def _tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """Stream (name, bytes) of an archive's image files; nothing is extracted to disk."""
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and _is_image(member.name):
                    data = tar.extractfile(member)
                    yield member.name, data.read() if data else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        hint = "expected a .tar.gz of [top/]<class>/<image>"
        raise DataError(f"{path}: cannot read the archive ({one_line(e)}); {hint}") from None


def _dir_files(path: Path) -> Iterator[tuple[str, bytes]]:
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for file in sorted(filenames):
            full = Path(dirpath, file)
            rel = full.relative_to(path).as_posix()
            if _is_image(rel):
                try:
                    yield rel, full.read_bytes()
                except OSError as e:
                    raise DataError(f"{full}: cannot read ({e.strerror or e})") from None


def _decode_image(data: bytes, name: str) -> torch.Tensor:
    """Decode to uint8 (C, H, W) with C 1 or 3: alpha is dropped, 16-bit depth reduced to 8.

    torchvision's decoder is 4x faster than PIL on small JPEGs; PIL takes the formats it lacks (BMP, TIFF)
    and takes over entirely once torchvision drops its decoders (deprecated in 0.29 for TorchCodec).
    """
    try:
        from torchvision.io import ImageReadMode, decode_image

        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except Exception:
        img = _decode_with_pil(data, name)
    if img.ndim == 4:  # animated GIF: first frame
        img = img[0]
    if img.dtype == torch.uint16:
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    return img[:3] if img.shape[0] == 4 else img[:1] if img.shape[0] == 2 else img


def _decode_with_pil(data: bytes, name: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            arr = np.asarray(im)
    except Exception as e:
        raise DataError(f"{name}: cannot decode the image ({one_line(e)})") from None
    return torch.from_numpy(arr.copy()).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)


def _load_image_folder(path: Path) -> _Decoded:
    """Decode ``[top/]<class>/<image>``; a ``train/`` + ``test/`` pair of top folders gives a test split too.

    Images are ordered by path, so the decoded tensor does not depend on archive order; classes are the
    sorted folder names. All images must share one size (no resizing: that is a dataset decision).
    """
    entries: Iterable[tuple[str, bytes]] = _tar_members(path) if path.is_file() else _dir_files(path)
    images: dict[PurePosixPath, torch.Tensor] = {}
    with warnings.catch_warnings():  # torchvision warns of its decoders' deprecation on every call
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        for name, data in entries:
            p = PurePosixPath(name)
            if len(p.parts) >= 2:  # files outside a class folder carry no label
                images[p] = _decode_image(data, f"{path}:{name}" if path.is_file() else str(path / name))
    if not images:
        raise DataError(f"{path}: no images found; expected the ImageFolder layout [top/]<class>/<image>")

    roots = sorted({p.parent.parent for p in images}, key=str)
    by_name = {r.name: r for r in roots}
    if len(roots) == 1:
        train_root, test_root = roots[0], None
    elif set(by_name) == {"train", "test"} and len(by_name) == 2:
        train_root, test_root = by_name["train"], by_name["test"]
    else:
        found = ", ".join(str(r) or "." for r in roots)
        raise DataError(f"{path}: images at several levels ({found}); expected [top/]<class>/<image> or train/ + test/")

    ordered = sorted(images, key=str)
    first = ordered[0]
    size = images[first].shape[1:]
    for p in ordered:
        if images[p].shape[1:] != size:
            h, w = images[p].shape[1:]
            raise DataError(f"{path}: {p} is {h}x{w} but {first} is {size[0]}x{size[1]}; all images must have one size")
    if len({images[p].shape[0] for p in ordered}) > 1:  # a few grayscale images among colour ones
        images = {p: img.expand(3, -1, -1) for p, img in images.items()}

    classes = sorted({p.parent.name for p in ordered if p.parent.parent == train_root})
    index = {c: i for i, c in enumerate(classes)}

    def split(root: PurePosixPath) -> tuple[torch.Tensor, torch.Tensor]:
        paths = [p for p in ordered if p.parent.parent == root]
        unknown = sorted({p.parent.name for p in paths} - index.keys())
        if unknown:
            raise DataError(f"{path}: {root}/ has classes missing from {train_root}/: {', '.join(unknown)}")
        labels = torch.tensor([index[p.parent.name] for p in paths], dtype=torch.int64)
        return torch.stack([images[p] for p in paths]), labels

    train = split(train_root)
    return _Decoded(*train, classes, *(split(test_root) if test_root is not None else (None, None)))


# ---- cache ------------------------------------------------------------------------------------------


def _cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _path_key(path: Path) -> dict[str, Any]:
    """Identify a file or directory by absolute path, sizes and mtimes, so an edited source is re-decoded."""
    path = path.resolve()
    if path.is_file():
        st = path.stat()
        return {"source": "file", "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for file in sorted(filenames):
            full = os.path.join(dirpath, file)
            st = os.stat(full)
            digest.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"source": "dir", "path": str(path), "files": digest.hexdigest()}


def _cached(name: str, cache_dir: str | None, key: dict[str, Any], build: Callable[[], _Decoded]) -> _Decoded:
    """Load the decoded source from the cache, or decode and store it. A bad cache file is rebuilt."""
    key_text = json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True)
    # Named after the archive or folder when there is one, so cifar10 and imagefolder runs share its cache.
    prefix = Path(key["path"]).name if "path" in key else name
    file = _cache_root(cache_dir) / f"{prefix}-{hashlib.sha256(key_text.encode()).hexdigest()[:16]}.pt"
    if file.exists():
        try:
            return _from_payload(torch.load(file, map_location="cpu", weights_only=True), key_text)
        except Exception as e:
            warnings.warn(f"{file}: unreadable dataset cache ({one_line(e)}); decoding the source again", stacklevel=3)
    decoded = build()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")  # write-then-rename: readers never see half a file
        torch.save({"key": key_text, **vars(decoded)}, tmp)
        os.replace(tmp, file)
    except OSError as e:
        warnings.warn(f"{file}: cannot write the dataset cache ({e.strerror or e}); going on without", stacklevel=3)
    return decoded


def _from_payload(payload: Any, key_text: str) -> _Decoded:
    if not isinstance(payload, dict) or payload.get("key") != key_text:
        raise ValueError("written for another source or version")
    decoded = _Decoded(**{k: v for k, v in payload.items() if k != "key"})
    pairs = [(decoded.train_x, decoded.train_y)]
    if decoded.test_x is not None or decoded.test_y is not None:
        pairs.append((decoded.test_x, decoded.test_y))
    for x, y in pairs:
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.ndim == 4):
            raise ValueError("images are not a uint8 (N, C, H, W) tensor")
        if not (isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.shape == x.shape[:1]):
            raise ValueError("labels do not match the images")
    return decoded


# ---- device-resident batches ------------------------------------------------------------------------


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in 0..1 units.

    Computed from each channel's 256-bin histogram: exact, fast, and without a float copy of the images (1 GiB
    for CIFAR-10 in float64). A constant channel gets std 1, which leaves it at 0 after normalisation
    instead of dividing by zero.
    """
    if x.dtype != torch.uint8 or x.ndim != 4 or len(x) == 0:
        raise ValueError(f"channel_stats expects non-empty uint8 (N, C, H, W) images, got {x.dtype} {tuple(x.shape)}")
    # On the CPU: CUDA's bincount is refused under torch.use_deterministic_algorithms(True).
    counts = torch.stack([torch.bincount(x[:, c].reshape(-1).cpu(), minlength=256) for c in range(x.shape[1])])
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum(1).double()
    mean = counts.double() @ values / n
    std = (counts.double() @ values.square() / n - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, 1.0)
    return tuple(mean.tolist()), tuple(std.tolist())


def crop_padding(height: int, width: int) -> int:
    """Zero padding of the random crop: 4 px as for CIFAR, 1 px for images under 16 px (8x8 digits)."""
    return 4 if min(height, width) >= 16 else 1


def crop_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop each image of a batch from its zero-padded copy at its own offset, mirrored where ``flip``.

    ``out[b, :, i, j] = padded[b, :, dy[b] + i, dx[b] + j]`` (``j`` read as ``W - 1 - j`` where
    ``flip[b]``), with offsets in ``[0, 2 * pad]``: offset ``pad`` is the identity, so the crop is the
    image shifted by ``pad - offset`` with zeros filling the border. Crop and flip are one gather, with no
    loop over images. The result has channels-last strides.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    cols = torch.arange(w, device=x.device).expand(b, w)
    if flip is not None:
        cols = torch.where(flip[:, None], w - 1 - cols, cols)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + cols
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # gathered as (B, H, W, C)


def feature_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and (population) std of float inputs along dim 1 (features of (N, D), channels of (N, C, ...)),
    over every other dim, in float64; a constant feature gets std 1 (it stays at 0 after normalising)."""
    if not x.is_floating_point() or x.ndim < 2 or len(x) == 0:
        raise ValueError(f"feature_stats expects non-empty float (N, D, ...) inputs, got {x.dtype} {tuple(x.shape)}")
    means, stds = [], []
    for c in range(x.shape[1]):
        column = x[:, c].double()
        var, mean = torch.var_mean(column, correction=0)
        means.append(float(mean))
        stds.append(float(var.sqrt()) if var > 0 else 1.0)
    return tuple(means), tuple(stds)


class _Batches:
    """What both loaders do to a batch on the device: crop/flip (images, training), normalise, convert.

    uint8 inputs are scaled to 0..1 before the statistics apply; float inputs are used as they are."""

    def __init__(
        self, *, sample: torch.Tensor, device: torch.device, train: bool, augment: bool, crop: bool, flip: bool,
        mean: tuple[float, ...] | None, std: tuple[float, ...] | None, seed: int, channels_last: bool,
        dtype: torch.dtype,
    ) -> None:  # fmt: skip
        self.device, self.train, self.dtype = device, train, dtype
        self.augment = augment and sample.ndim == 4 and (crop or flip)
        self.crop, self.flip = crop, flip
        self.memory_format = torch.channels_last if channels_last and sample.ndim == 4 else torch.contiguous_format
        if mean is None or std is None:
            stats = channel_stats(sample) if sample.dtype == torch.uint8 else feature_stats(sample)
            mean, std = mean or stats[0], std or stats[1]
        view = (1, -1) + (1,) * (sample.ndim - 2)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(view)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(view)
        unit = 255.0 if sample.dtype == torch.uint8 else 1.0
        self._scale, self._shift = 1 / (unit * std_t), -mean_t / std_t  # (x/unit - mean)/std = x*scale + shift
        self.pad = crop_padding(*sample.shape[2:]) if sample.ndim == 4 and crop else 0
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, x: torch.Tensor, *, augment: bool = True) -> torch.Tensor:
        if augment and self.train and self.augment:
            b = len(x)
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2, b), device=self.device, generator=self.generator)
            flip = torch.rand(b, device=self.device, generator=self.generator) < 0.5 if self.flip else None
            x = crop_flip(x, dy, dx, self.pad, flip)
        out = torch.addcmul(self._shift, x.to(torch.float32), self._scale)
        return out.to(dtype=self.dtype, memory_format=self.memory_format)


class DeviceLoader:
    """Batches of one split, held on ``device`` (uint8 images, or float inputs) and converted per batch.

    Training mode draws a fresh ``randperm`` each epoch from a generator on ``device`` seeded with
    ``seed`` (the same seed gives the same batches on the same device), crops and/or flips images
    (N, C, H, W) when ``augment`` (never other inputs), and drops the last partial batch when
    ``drop_last`` -- unless the split is smaller than one batch, which then gives one partial batch
    rather than an empty epoch. Evaluation mode keeps the split's order and every sample. Batches are
    ``(x, y)``: ``x`` normalised with ``mean``/``std`` (per channel, or per feature of (N, D) inputs;
    0..1 units for uint8; computed from ``x`` when omitted, so pass the training statistics to a
    validation loader) in ``dtype``.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        train: bool = False,
        augment: bool = False,
        crop: bool = True,
        flip: bool = True,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        drop_last: bool = True,
        seed: int = 0,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if x.dtype == torch.uint8 and x.ndim != 4:
            raise ValueError(f"x: expected uint8 (N, C, H, W) images, got {tuple(x.shape)}")
        if not (x.dtype == torch.uint8 or (x.is_floating_point() and x.ndim >= 2)):
            raise ValueError(f"x: expected uint8 images or float (N, ...) inputs, got {x.dtype} {tuple(x.shape)}")
        if y.shape != x.shape[:1]:
            raise ValueError(f"y: expected shape ({len(x)},), got {tuple(y.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.batch_size, self.train, self.drop_last = batch_size, train, drop_last
        self.batches = _Batches(
            sample=x, device=self.device, train=train, augment=augment, crop=crop, flip=flip, mean=mean, std=std,
            seed=seed, channels_last=channels_last, dtype=dtype,
        )  # fmt: skip
        self.generator = self.batches.generator

    @property
    def pad(self) -> int:
        return self.batches.pad

    def __len__(self) -> int:
        n = len(self.y)
        if self.train and self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples per epoch (fewer than the split holds when a partial batch is dropped)."""
        return min(len(self.y), len(self) * self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.y), device=self.device, generator=self.generator) if self.train else None
        for i in range(len(self)):
            window = slice(i * self.batch_size, (i + 1) * self.batch_size)
            index = order[window] if order is not None else window
            yield self.batches(self.x[index]), self.y[index]

    def batches_in_order(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every example of the split once, in stored order, converted and never augmented (e.g. to cache
        a frozen prefix's features); the shuffling generator is not touched."""
        size = batch_size or self.batch_size
        for start in range(0, len(self.y), size):
            window = slice(start, start + size)
            yield self.batches(self.x[window], augment=False), self.y[window]


class StreamLoader:
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
        self,
        dataset: Any,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        train: bool = False,
        augment: bool = False,
        crop: bool = True,
        flip: bool = True,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        drop_last: bool = True,
        seed: int = 0,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        num_workers: int = 2,
    ) -> None:
        from torch.utils.data import DataLoader

        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.drop_last = train and drop_last and len(dataset) >= batch_size
        sample = torch.as_tensor(dataset[0][0]).unsqueeze(0)
        self.batches = _Batches(
            sample=sample, device=self.device, train=train, augment=augment, crop=crop, flip=flip, mean=mean,
            std=std, seed=seed, channels_last=channels_last, dtype=dtype,
        )  # fmt: skip
        self.loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=train, drop_last=self.drop_last,
            generator=torch.Generator().manual_seed(seed) if train else None,
            num_workers=num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
        )  # fmt: skip
        self.wait_s = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        return min(len(self.dataset), len(self) * self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import time

        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - start
            x = torch.as_tensor(x).to(self.device, non_blocking=True)
            y = torch.as_tensor(y).to(self.device, torch.int64, non_blocking=True)
            yield self.batches(x), y
