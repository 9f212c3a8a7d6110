"""The built-in datasets: factories like a user's, registered by name in :mod:`wus_tune.registry`.

``digits`` (scikit-learn, offline, 8x8), ``cifar10`` / ``cifar100`` (torchvision's pickle files, or an
ImageFolder directory / ``.tar.gz``) and ``imagefolder``; each is decoded once and read from the cache after.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from wus_tune.data.cache import Decoded, cache_root, cached, path_key
from wus_tune.data.image_folder import has_class_folders, load_image_folder
from wus_tune.errors import DataError, one_line

__all__ = ["digits", "cifar10", "cifar100", "imagefolder"]

_TV_HINT = (
    "pass --data-dir with torchvision's CIFAR files or an ImageFolder directory/.tar.gz "
    "(e.g. ../shared/data/cifar10-train-jpeg.tar.gz), or use --dataset digits"
)


def digits(*, cache_dir: str | None = None) -> dict[str, Any]:
    """scikit-learn's bundled 8x8 digits (offline), scaled to uint8; never flipped (a mirrored 2 is no digit)."""
    d = cached("digits", cache_dir, {"source": "sklearn-digits"}, _load_digits)
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
    return _decoded_splits(cached("imagefolder", cache_dir, path_key(path), lambda: load_image_folder(path)))


def _decoded_splits(d: Decoded) -> dict[str, Any]:
    out: dict[str, Any] = {"train": (d.train_x, d.train_y), "classes": d.classes}
    if d.test_x is not None:
        out["test"] = (d.test_x, d.test_y)
    return out


def _cifar(name: str, data_dir: str | None, cache_dir: str | None, download: bool) -> Decoded:
    """torchvision's CIFAR files or an ImageFolder directory/archive, decoded once and cached."""
    tv_cls = _torchvision_class(name)
    if data_dir:
        path = _existing(data_dir)
        if path.is_file() or (not (path / tv_cls.base_folder).is_dir() and has_class_folders(path)):
            return cached(name, cache_dir, path_key(path), lambda: load_image_folder(path))
        root = path.parent if path.name == tv_cls.base_folder else path  # accept the batches folder itself
    else:
        root = cache_root(cache_dir) / "torchvision"
    root = root.resolve()
    key = {"source": f"torchvision-{name}", "root": str(root)}
    return cached(name, cache_dir, key, lambda: _load_cifar(name, root, download))


def _existing(data_dir: str | None) -> Path:
    path = Path(data_dir or "").expanduser()
    if not data_dir or not path.exists():
        raise DataError(f"data.data_dir: {data_dir!r} does not exist")
    return path


def _load_digits() -> Decoded:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).to(torch.int64)  # 8x8 counts 0..16, stored as float64
    x = (x * 255 // 16).to(torch.uint8).unsqueeze(1)
    return Decoded(x, torch.from_numpy(bunch.target).to(torch.int64), [str(c) for c in range(10)])


def _torchvision_class(name: str) -> Any:
    from torchvision.datasets import CIFAR10, CIFAR100

    return {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]


def _load_cifar(name: str, root: Path, download: bool) -> Decoded:
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
    return Decoded(train_x, train_y, list(parts[0].classes), test_x, test_y)


def _read_cifar_pickles(folder: Path, tv_cls: Any) -> Decoded:
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
    return Decoded(*split(tv_cls.train_list), list(meta[tv_cls.meta["key"]]), *split(tv_cls.test_list))
