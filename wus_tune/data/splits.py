"""What a source returned -> checked splits: ``(x, y)`` tensors, a mapping of splits, or a torch Dataset.

Every check here raises a one-line :class:`~wus_tune.errors.DataError` naming where the data came from
(``where``: ``data``, ``data.name: cifar10``, ``data.factory: pkg.mod:load``) and the split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from wus_tune.config import DataConfig
from wus_tune.errors import DataError, one_line

__all__ = ["SPLITS", "parse", "materialise", "nbytes", "split_validation", "check_consistent", "num_classes"]

SPLITS = ("train", "val", "test")
_EXTRA_KEYS = ("classes", "flip")  # what a factory's mapping may carry beside the splits


def parse(data: Any, where: str) -> tuple[dict[str, Any], list[str] | None, bool]:
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


def nbytes(ds: Any) -> int:
    """A torch Dataset's size in memory as tensors, estimated from its first item."""
    x, _ = _item(ds, 0, "data")
    return len(ds) * x.numel() * x.element_size()


# Materialised Datasets, by object: a study's trials get the same Dataset object and read it once.
_MATERIALISED: dict[int, tuple[Any, tuple[torch.Tensor, torch.Tensor]]] = {}


def materialise(ds: Any, where: str, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def split_validation(splits: dict[str, Any], cfg: DataConfig, where: str) -> dict[str, Any]:
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


def check_consistent(splits: dict[str, Any], where: str) -> None:
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


def num_classes(tensors: dict[str, Any], streamed: dict[str, Any], classes: list[str] | None, where: str) -> int:
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
