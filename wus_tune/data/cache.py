"""The decoded-tensor disk cache: a source is decoded once, then read back with ``torch.load``.

Files live under ``cfg.cache_dir``, ``$WUS_TUNE_CACHE`` or ``~/.cache/wus_tune``, named after the source and
a hash of what identifies it (:func:`path_key` for files and folders), so an edited source is decoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wus_tune.data.walk import walk_files
from wus_tune.errors import one_line

__all__ = ["CACHE_VERSION", "Decoded", "cached", "cache_root", "default_cache_dir", "path_key"]

CACHE_VERSION = 1  # bump when the decoded layout changes, so old cache files are rebuilt


@dataclass
class Decoded:
    """What the cache holds: a source's full training (and test) images, before any split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    classes: list[str]
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None


def default_cache_dir() -> Path:
    """``$WUS_TUNE_CACHE`` if set, else ``~/.cache/wus_tune``."""
    return Path(os.environ.get("WUS_TUNE_CACHE") or Path.home() / ".cache" / "wus_tune").expanduser()


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def path_key(path: Path) -> dict[str, Any]:
    """Identify a file or directory by absolute path, sizes and mtimes, so an edited source is re-decoded."""
    path = path.resolve()
    if path.is_file():
        st = path.stat()
        return {"source": "file", "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    digest = hashlib.sha256()
    for rel, full in walk_files(path):  # the files decoding reads, behind symbolic links too
        try:
            st = full.stat()
        except OSError:  # a broken link: decoding says so if it is an image, and ignores it if not
            continue
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"source": "dir", "path": str(path), "files": digest.hexdigest()}


def cached(name: str, cache_dir: str | None, key: dict[str, Any], build: Callable[[], Decoded]) -> Decoded:
    """Load the decoded source from the cache, or decode and store it. A bad cache file is rebuilt."""
    key_text = json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True)
    # Named after the archive or folder when there is one, so cifar10 and imagefolder runs share its cache.
    prefix = Path(key["path"]).name if "path" in key else name
    file = cache_root(cache_dir) / f"{prefix}-{hashlib.sha256(key_text.encode()).hexdigest()[:16]}.pt"
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


def _from_payload(payload: Any, key_text: str) -> Decoded:
    if not isinstance(payload, dict) or payload.get("key") != key_text:
        raise ValueError("written for another source or version")
    decoded = Decoded(**{k: v for k, v in payload.items() if k != "key"})
    pairs = [(decoded.train_x, decoded.train_y)]
    if decoded.test_x is not None or decoded.test_y is not None:
        pairs.append((decoded.test_x, decoded.test_y))
    for x, y in pairs:
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.ndim == 4):
            raise ValueError("images are not a uint8 (N, C, H, W) tensor")
        if not (isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.shape == x.shape[:1]):
            raise ValueError("labels do not match the images")
    return decoded
