"""Walking a dataset's folder: the one walk that decoding and the cache key share, so both see the same files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from wus_tune.errors import DataError

__all__ = ["walk_files"]


def walk_files(root: Path) -> Iterator[tuple[str, Path]]:
    """Every file under ``root``, as (its path relative to ``root`` in POSIX form, its full path): sorted
    within each folder, a folder's files before its subfolders, hidden folders skipped.

    Symbolic links to folders are followed, as torchvision's ImageFolder does (datasets kept on another disk
    behind a link). A link back to a folder that contains it would make the walk endless: it is a one-line
    :class:`DataError` naming the link instead.
    """
    chains = {os.fspath(root): (os.path.realpath(root),)}  # folder -> the real paths of it and its parents
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        chain = chains.pop(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in dirnames:
            folder = os.path.join(dirpath, name)
            real = os.path.realpath(folder)
            if real in chain:
                raise DataError(f"{folder}: the symbolic link loops back to {real}, which contains it; "
                                "remove the link or point it outside the dataset")  # fmt: skip
            chains[folder] = (*chain, real)
        for name in sorted(filenames):
            full = Path(dirpath, name)
            yield full.relative_to(root).as_posix(), full
