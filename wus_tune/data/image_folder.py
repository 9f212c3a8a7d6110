"""ImageFolder sources: ``[top/]<class>/<image>`` in a directory or a ``.tar.gz`` archive, decoded to uint8."""

from __future__ import annotations

import io
import tarfile
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import torch

from wus_tune.data.cache import Decoded
from wus_tune.data.walk import walk_files
from wus_tune.errors import DataError, one_line

__all__ = ["IMAGE_EXTENSIONS", "has_class_folders", "load_image_folder"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_image_folder(path: Path) -> Decoded:
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
    return Decoded(*train, classes, *(split(test_root) if test_root is not None else (None, None)))


def has_class_folders(path: Path, depth: int = 2) -> bool:
    """Whether a subdirectory (or a sub-subdirectory, for a ``train/`` top folder) holds images directly."""
    try:
        subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
        return any(
            any(f.is_file() and _is_image(f.name) for f in d.iterdir())
            or (depth > 1 and has_class_folders(d, depth - 1))
            for d in subdirs
        )
    except OSError:
        return False


def _is_image(name: str) -> bool:
    p = PurePosixPath(name)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in p.parts)


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
    for rel, full in walk_files(path):
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
