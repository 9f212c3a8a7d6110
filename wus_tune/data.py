"""Datasets as one uint8 tensor, and a batch iterator that lives on the training device.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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
    "load_dataset",
    "channel_stats",
    "crop_flip",
    "crop_padding",
    "default_cache_dir",
    "IMAGE_EXTENSIONS",
]

CACHE_VERSION = 1  # bump when the decoded layout changes, so old cache files are rebuilt
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_NO_FLIP = {"digits"}  # datasets whose classes are not mirror-symmetric (a mirrored 2 is no digit)
_TV_HINT = (
    "pass --data-dir with torchvision's CIFAR files or an ImageFolder directory/.tar.gz "
    "(e.g. ../shared/data/cifar10-train-jpeg.tar.gz), or use --dataset digits"
)


@dataclass
class Dataset:
    """Decoded splits: images uint8 ``(N, C, H, W)``, labels int64 ``(N,)``; ``test_*`` is None without a test split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    classes: list[str]
    name: str
    flip_ok: bool = True  # whether horizontal flips preserve the label (False for digits)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (c, h, w)

    @cached_property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the training split (0..1 units); every split is normalised with these."""
        return channel_stats(self.train_x)

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
    ) -> DeviceLoader:
        """A :class:`DeviceLoader` for ``"train"``, ``"val"`` or ``"test"`` with the training split's statistics.

        Only the training split is shuffled and augmented; flips follow :attr:`flip_ok`.
        """
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
        if x is None or y is None:
            raise DataError(f"{self.name}: has no {split} split")
        mean, std = self.mean_std
        return DeviceLoader(
            x, y, batch_size=batch_size, device=device, train=split == "train", augment=augment, flip=self.flip_ok,
            mean=mean, std=std, drop_last=drop_last, seed=seed, channels_last=channels_last, dtype=dtype,
        )  # fmt: skip


@dataclass
class _Decoded:
    """What the cache holds: a source's full training (and test) images, before any split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    classes: list[str]
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None


# ---- public entry point -----------------------------------------------------------------------------


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load ``cfg.name`` (decoded once, then from the cache) and split off the validation images.

    The split depends on ``cfg.split_seed`` only: a seeded permutation of the training images, cut to
    ``cfg.subset`` images, of which the first ``val_fraction`` (at least one when above 0) validate.
    Each split keeps the source order, so evaluation order is stable.
    """
    key, build = _source(cfg)
    decoded = _cached(cfg, key, build)
    n = len(decoded.train_y)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    if cfg.subset is not None:
        if cfg.subset > n:
            raise DataError(f"data.subset: {cfg.subset} is more than the {n} training images of {cfg.name}")
        order = order[: cfg.subset]
    n_val = round(len(order) * cfg.val_fraction)
    if cfg.val_fraction > 0:
        n_val = min(max(n_val, 1), len(order) - 1)
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    return Dataset(
        train_x=decoded.train_x[train_idx], train_y=decoded.train_y[train_idx],
        val_x=decoded.train_x[val_idx], val_y=decoded.train_y[val_idx],
        test_x=decoded.test_x, test_y=decoded.test_y,
        classes=list(decoded.classes), name=cfg.name, flip_ok=cfg.name not in _NO_FLIP,
    )  # fmt: skip


def default_cache_dir() -> Path:
    """``$WUS_TUNE_CACHE`` if set, else ``~/.cache/wus_tune``."""
    return Path(os.environ.get("WUS_TUNE_CACHE") or Path.home() / ".cache" / "wus_tune").expanduser()


# ---- sources ----------------------------------------------------------------------------------------


def _source(cfg: DataConfig) -> tuple[dict[str, Any], Callable[[], _Decoded]]:
    """The cache key of ``cfg``'s source and the function that decodes it."""
    if cfg.name == "digits":
        return {"source": "sklearn-digits"}, _load_digits
    if cfg.name == "imagefolder":
        path = _existing(cfg.data_dir)
        return _path_key(path), lambda: _load_image_folder(path)
    # cifar10 / cifar100
    tv_cls = _torchvision_class(cfg.name)
    if cfg.data_dir:
        path = _existing(cfg.data_dir)
        if path.is_file() or (not (path / tv_cls.base_folder).is_dir() and _has_class_folders(path)):
            return _path_key(path), lambda: _load_image_folder(path)
        root = path.parent if path.name == tv_cls.base_folder else path  # accept the batches folder itself
    else:
        root = _cache_root(cfg) / "torchvision"
    root = root.resolve()
    return {"source": f"torchvision-{cfg.name}", "root": str(root)}, lambda: _load_cifar(cfg.name, root, cfg.download)


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


def _cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


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


def _cached(cfg: DataConfig, key: dict[str, Any], build: Callable[[], _Decoded]) -> _Decoded:
    """Load the decoded source from the cache, or decode and store it. A bad cache file is rebuilt."""
    key_text = json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True)
    # Named after the archive or folder when there is one, so cifar10 and imagefolder runs share its cache.
    prefix = Path(key["path"]).name if "path" in key else cfg.name
    file = _cache_root(cfg) / f"{prefix}-{hashlib.sha256(key_text.encode()).hexdigest()[:16]}.pt"
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


class DeviceLoader:
    """Batches of one split, held on ``device`` as uint8 and converted per batch.

    Training mode draws a fresh ``randperm`` each epoch from a generator on ``device`` seeded with
    ``seed`` (the same seed gives the same batches on the same device), crops and flips when ``augment``,
    and drops the last partial batch when ``drop_last`` -- unless the split is smaller than one batch,
    which then gives one partial batch rather than an empty epoch. Evaluation mode keeps the split's order
    and every image. Batches are ``(x, y)``: ``x`` normalised with ``mean``/``std`` (0..1 units; computed
    from ``x_uint8`` when omitted, so pass the training statistics to a validation loader) in ``dtype``.
    """

    def __init__(
        self,
        x_uint8: torch.Tensor,
        y: torch.Tensor,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        train: bool = False,
        augment: bool = False,
        flip: bool = True,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        drop_last: bool = True,
        seed: int = 0,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if x_uint8.dtype != torch.uint8 or x_uint8.ndim != 4:
            raise ValueError(f"x_uint8: expected uint8 (N, C, H, W), got {x_uint8.dtype} {tuple(x_uint8.shape)}")
        if y.shape != x_uint8.shape[:1]:
            raise ValueError(f"y: expected shape ({len(x_uint8)},), got {tuple(y.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.x = x_uint8.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.batch_size, self.train, self.augment, self.flip = batch_size, train, augment, flip
        self.drop_last = drop_last
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if mean is None or std is None:
            stats = channel_stats(x_uint8)
            mean, std = mean or stats[0], std or stats[1]
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale, self._shift = 1 / (255 * std_t), -mean_t / std_t  # (x/255 - mean)/std = x*scale + shift
        self.pad = crop_padding(*self.x.shape[2:])
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.y)
        if self.train and self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.y), device=self.device, generator=self.generator) if self.train else None
        for i in range(len(self)):
            window = slice(i * self.batch_size, (i + 1) * self.batch_size)
            index = order[window] if order is not None else window
            x, y = self.x[index], self.y[index]
            if self.train and self.augment:
                x = self._augment(x)
            yield self._normalise(x), y

    def batches_in_order(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every image of the split once, in stored order, normalised and never augmented (e.g. to cache
        a frozen prefix's features); the shuffling generator is not touched."""
        size = batch_size or self.batch_size
        for start in range(0, len(self.y), size):
            window = slice(start, start + size)
            yield self._normalise(self.x[window]), self.y[window]

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        b = len(x)
        dy, dx = torch.randint(0, 2 * self.pad + 1, (2, b), device=self.device, generator=self.generator)
        flip = torch.rand(b, device=self.device, generator=self.generator) < 0.5 if self.flip else None
        return crop_flip(x, dy, dx, self.pad, flip)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addcmul(self._shift, x.to(torch.float32), self._scale)
        return out.to(dtype=self.dtype, memory_format=self.memory_format)
