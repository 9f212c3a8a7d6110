"""wus_tune.data: sources, split, cache and the device-resident loader (CPU; a few seconds in all)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wus_tune.data as data
from wus_tune.config import DataConfig
from wus_tune.data import DeviceLoader, channel_stats, crop_flip, load_dataset
from wus_tune.errors import DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every default cache (and torchvision root) inside the test's directory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("WUS_TUNE_CACHE", str(cache))
    return cache


# ---- digits and the split ---------------------------------------------------------------------------


def test_digits_shapes_and_split() -> None:
    ds = load_dataset(DataConfig(name="digits", val_fraction=0.1))
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_x.shape[1:] == (1, 8, 8) and ds.input_shape == (1, 8, 8)
    assert len(ds.train_x) + len(ds.val_x) == 1797 and len(ds.val_x) == round(1797 * 0.1)
    assert ds.test_x is None and ds.num_classes == 10 and not ds.flip_ok
    assert int(ds.train_x.max()) == 255  # 16 * 255 // 16
    assert set(ds.train_y.tolist()) == set(range(10))


def test_split_depends_on_split_seed_only() -> None:
    a = load_dataset(DataConfig(name="digits", split_seed=3))
    b = load_dataset(DataConfig(name="digits", split_seed=3, augment=False))
    c = load_dataset(DataConfig(name="digits", split_seed=4))
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.val_x, c.val_x)
    # train and val are disjoint and together the whole set
    everything = load_dataset(DataConfig(name="digits", val_fraction=0.0)).train_x
    together = torch.cat([a.train_x, a.val_x]).flatten(1)
    assert len(together) == len(everything)
    assert sorted(map(bytes, together.numpy())) == sorted(map(bytes, everything.flatten(1).numpy()))


def test_subset_and_minimum_validation() -> None:
    ds = load_dataset(DataConfig(name="digits", subset=100, val_fraction=0.001))
    assert len(ds.train_x) == 99 and len(ds.val_x) == 1  # at least one validation image
    again = load_dataset(DataConfig(name="digits", subset=100, val_fraction=0.001))
    assert torch.equal(ds.train_x, again.train_x)
    with pytest.raises(DataError, match="subset"):
        load_dataset(DataConfig(name="digits", subset=5000))


# ---- torchvision's CIFAR pickle files -------------------------------------------------------------------


def _write_cifar(root: Path, hundred: bool, per_file: int = 4) -> dict[str, np.ndarray]:
    """A tiny copy of torchvision's python-pickle layout; returns the images/labels written, in order."""
    rng = np.random.default_rng(0)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    n_classes = 100 if hundred else 10
    train_files = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    written: dict[str, list[np.ndarray]] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for split, files in (("train", train_files), ("test", ["test"] if hundred else ["test_batch"])):
        for name in files:
            x = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            y = rng.integers(0, n_classes, per_file).tolist()
            entry = {"data": x, ("fine_labels" if hundred else "labels"): y, "filenames": [f"{i}.png" for i in y]}
            if hundred:
                entry["coarse_labels"] = [v // 5 for v in y]
            (folder / name).write_bytes(pickle.dumps(entry))
            written[f"{split}_x"].append(x.reshape(-1, 3, 32, 32))
            written[f"{split}_y"].append(np.array(y))
    names = [f"class{i:02d}" for i in range(n_classes)]
    meta = {"fine_label_names": names, "coarse_label_names": names[:20]} if hundred else {"label_names": names}
    (folder / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta))
    return {k: np.concatenate(v) for k, v in written.items()}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_read_by_own_reader(tmp_path: Path, name: str) -> None:
    """torchvision refuses files whose md5 is not the official one; our reader of the same format takes over."""
    written = _write_cifar(tmp_path / "tv", hundred=name == "cifar100")
    ds = load_dataset(DataConfig(name=name, data_dir=str(tmp_path / "tv"), download=False, val_fraction=0.0))
    assert torch.equal(ds.train_x, torch.from_numpy(written["train_x"]))
    assert torch.equal(ds.train_y, torch.from_numpy(written["train_y"]))
    assert ds.test_x is not None and ds.test_y is not None
    assert torch.equal(ds.test_x, torch.from_numpy(written["test_x"]))
    assert ds.test_y.tolist() == written["test_y"].tolist()
    assert ds.num_classes == (100 if name == "cifar100" else 10) and ds.flip_ok


def test_cifar_torchvision_path_agrees_with_own_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10

    _write_cifar(tmp_path / "tv", hundred=False)
    cfg = DataConfig(name="cifar10", data_dir=str(tmp_path / "tv"), download=False, val_fraction=0.0)
    ours = load_dataset(DataConfig(**{**vars(cfg), "cache_dir": str(tmp_path / "c1")}))

    def md5(name: str) -> str:
        return hashlib.md5((tmp_path / "tv" / CIFAR10.base_folder / name).read_bytes()).hexdigest()

    # Make torchvision accept the fake files, and make sure it is torchvision that reads them.
    monkeypatch.setattr(CIFAR10, "train_list", [[f, md5(f)] for f, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[f, md5(f)] for f, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(CIFAR10.meta["filename"])})
    monkeypatch.setattr(data.builtin, "_read_cifar_pickles", lambda *a: pytest.fail("own reader used"))
    theirs = load_dataset(DataConfig(**{**vars(cfg), "cache_dir": str(tmp_path / "c2")}))
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    assert ours.classes == theirs.classes


def test_cifar_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="cifar10", download=False))
    message = str(err.value)
    assert "--data-dir" in message and "digits" in message and "\n" not in message
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataConfig(name="cifar100", data_dir=str(tmp_path / "nowhere"), download=False))


def test_corrupt_cifar_pickle(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "tv", hundred=False)
    (tmp_path / "tv" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path / "tv"), download=False))


# ---- ImageFolder directories and archives -------------------------------------------------------------


CLASSES = ["bird", "cat", "dog"]


def _images(per_class: int = 3, size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{c}/{i:02d}.png": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
        for c in CLASSES
        for i in range(per_class)
    }


def _write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _encode(img: torch.Tensor, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, fmt)
    return buf.getvalue()


def _png(img: torch.Tensor) -> bytes:
    return _encode(img, "PNG")


def _folder_cfg(path: Path, **kw: object) -> DataConfig:
    fields = {"name": "imagefolder", "data_dir": str(path), "val_fraction": 0.0, **kw}
    return DataConfig(**fields)  # type: ignore[arg-type]


def test_imagefolder_archive_and_cache_reuse(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _images()
    files = {f"train/{k}": _png(v) for k, v in images.items()}
    files["train/cat/extra.jpg"] = _encode(images["cat/00.png"], "JPEG")
    files["train/README.txt"] = b"not an image"
    files["train/dog/._00.png"] = b"macOS resource fork"
    archive = _write_tar(tmp_path / "set.tar.gz", files)

    ds = load_dataset(_folder_cfg(archive))
    assert ds.classes == CLASSES and ds.test_x is None and ds.flip_ok
    assert ds.train_x.shape == (10, 3, 8, 8)
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    order = sorted(images)  # the decoded tensor follows path order; the JPEG sorts after cat/02.png
    assert torch.equal(ds.train_x[:3], torch.stack([images[k] for k in order[:3]]))
    assert torch.equal(ds.train_x[7:], torch.stack([images[k] for k in order[6:]]))

    cached = list(cache_dir.glob("set.tar.gz-*.pt"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    monkeypatch.setattr(data.image_folder, "_decode_image", lambda *a: pytest.fail("decoded again despite the cache"))
    again = load_dataset(_folder_cfg(archive))
    assert torch.equal(again.train_x, ds.train_x) and again.classes == ds.classes
    as_cifar = load_dataset(DataConfig(name="cifar10", data_dir=str(archive), val_fraction=0.0))  # same cache
    assert torch.equal(as_cifar.train_x, ds.train_x) and as_cifar.name == "cifar10"
    assert cached[0].stat().st_mtime_ns == mtime and len(list(cache_dir.glob("*.pt"))) == 1

    # A changed source gets a new cache entry.
    os.utime(archive, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(pytest.fail.Exception):
        load_dataset(_folder_cfg(archive))


def test_corrupt_cache_is_rebuilt(tmp_path: Path, cache_dir: Path) -> None:
    archive = _write_tar(tmp_path / "set.tgz", {k: _png(v) for k, v in _images().items()})
    first = load_dataset(_folder_cfg(archive))
    (cache_file,) = cache_dir.glob("*.pt")
    cache_file.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        second = load_dataset(_folder_cfg(archive))
    assert torch.equal(first.train_x, second.train_x)
    assert torch.load(cache_file, weights_only=True)["train_x"].shape == first.train_x.shape


def test_imagefolder_directory_with_train_and_test(tmp_path: Path) -> None:
    for split, seed in (("train", 0), ("test", 1)):
        for name, img in _images(per_class=2, seed=seed).items():
            path = tmp_path / "set" / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_png(img))
    ds = load_dataset(_folder_cfg(tmp_path / "set", val_fraction=0.2))
    assert (len(ds.train_x), len(ds.val_x)) == (5, 1)
    assert ds.test_x is not None and ds.test_y is not None and ds.test_y.tolist() == [0, 0, 1, 1, 2, 2]


def test_cifar_name_with_imagefolder_sources(tmp_path: Path) -> None:
    images = _images(size=32)
    archive = _write_tar(tmp_path / "c.tar.gz", {f"train/{k}": _png(v) for k, v in images.items()})
    for name, img in images.items():
        (tmp_path / "dir" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dir" / name).write_bytes(_png(img))
    from_tar, from_dir = (
        load_dataset(DataConfig(name="cifar10", data_dir=str(source), download=False, val_fraction=0.0))
        for source in (archive, tmp_path / "dir")
    )
    assert from_tar.name == "cifar10" and from_tar.input_shape == (3, 32, 32)
    assert torch.equal(from_tar.train_x, from_dir.train_x) and from_tar.classes == from_dir.classes == CLASSES


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(_folder_cfg(tmp_path / "missing.tar.gz"))

    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(os.urandom(2000))
    with pytest.raises(DataError, match="cannot read the archive"):
        load_dataset(_folder_cfg(garbage))

    good = _write_tar(tmp_path / "good.tar.gz", {k: _png(v) for k, v in _images(per_class=20).items()})
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="cannot read the archive"):
        load_dataset(_folder_cfg(truncated))

    bad_image = _write_tar(tmp_path / "bad.tar.gz", {"cat/1.png": _png(_images()["cat/00.png"]), "dog/2.png": b"xx"})
    with pytest.raises(DataError, match="dog/2.png"):
        load_dataset(_folder_cfg(bad_image))

    mixed = {k: _png(v) for k, v in _images().items()}
    mixed["dog/big.png"] = _png(torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(DataError, match=r"dog/big.png is 16x16"):
        load_dataset(_folder_cfg(_write_tar(tmp_path / "mixed.tar.gz", mixed)))

    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_dataset(_folder_cfg(tmp_path / "empty"))


def _write_folder(root: Path, images: dict[str, torch.Tensor]) -> Path:
    for name, img in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_png(img))
    return root


def test_imagefolder_follows_symbolic_links(tmp_path: Path) -> None:
    """Datasets kept on another disk behind links read as if the folders were there (as torchvision's does)."""
    images = _images()
    elsewhere = _write_folder(tmp_path / "other-disk" / "images", images)
    expected = load_dataset(_folder_cfg(elsewhere))

    (tmp_path / "linked-split").mkdir()
    (tmp_path / "linked-split" / "train").symlink_to(elsewhere, target_is_directory=True)
    via_split = load_dataset(_folder_cfg(tmp_path / "linked-split"))
    as_cifar = load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path / "linked-split"), val_fraction=0.0))

    mixed = _write_folder(tmp_path / "linked-class" / "train", {k: v for k, v in images.items() if not k.startswith("dog/")})
    (mixed / "dog").symlink_to(elsewhere / "dog", target_is_directory=True)
    via_class = load_dataset(_folder_cfg(tmp_path / "linked-class"))
    for ds in (via_split, as_cifar, via_class):
        assert ds.classes == CLASSES and torch.equal(ds.train_x, expected.train_x)
        assert torch.equal(ds.train_y, expected.train_y)

    # The cache follows the links too: an image added behind one is seen.
    (elsewhere / "dog" / "99.png").write_bytes(_png(images["dog/00.png"]))
    assert len(load_dataset(_folder_cfg(tmp_path / "linked-class")).train_x) == len(expected.train_x) + 1


def test_imagefolder_link_cycle_is_one_line(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "set", {f"train/{k}": v for k, v in _images().items()})
    (root / "train" / "cat" / "again").symlink_to(root / "train", target_is_directory=True)  # train/cat/again/cat/...
    start = time.monotonic()
    with pytest.raises(DataError, match=r"symbolic link .*loops back") as e:
        load_dataset(_folder_cfg(root))
    assert "\n" not in str(e.value) and "cat/again" in str(e.value) and time.monotonic() - start < 30


# ---- DeviceLoader -----------------------------------------------------------------------------------


def _toy(n: int = 50, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n)


def test_loader_batch_counts() -> None:
    x, y = _toy(50)
    assert len(DeviceLoader(x, y, batch_size=16, train=True)) == 3
    assert len(DeviceLoader(x, y, batch_size=16, train=True, drop_last=False)) == 4
    assert len(DeviceLoader(x, y, batch_size=64, train=True)) == 1  # smaller than a batch: one partial batch
    ev = DeviceLoader(x, y, batch_size=16)
    assert len(ev) == 4 and [len(b) for _, b in ev] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([b for _, b in ev]), y)  # eval keeps the order and every image
    assert [len(b) for _, b in DeviceLoader(x, y, batch_size=16, train=True)] == [16, 16, 16]


def test_loader_shuffles_deterministically_per_seed() -> None:
    x, y = _toy(50)

    def epochs(seed: int) -> list[torch.Tensor]:
        loader = DeviceLoader(x, y, batch_size=10, train=True, augment=True, seed=seed)
        return [torch.cat([b for _, b in loader]) for _ in range(2)]

    a, b, c = epochs(1), epochs(1), epochs(2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], a[1])  # a fresh permutation each epoch
    assert not torch.equal(a[0], c[0])
    assert sorted(a[0].tolist()) == list(range(50))


def test_loader_normalises_with_training_stats() -> None:
    ds = load_dataset(DataConfig(name="digits"))
    xs = torch.cat([xb for xb, _ in ds.loader("train", batch_size=256, drop_last=False)])
    assert abs(xs.mean().item()) < 1e-4 and abs(xs.std().item() - 1) < 1e-3
    mean, std = channel_stats(ds.train_x)
    assert mean == pytest.approx([ds.train_x.double().mean().item() / 255])
    assert std == pytest.approx([ds.train_x.double().std(unbiased=False).item() / 255])
    val = ds.loader("val", batch_size=1000)
    assert not val.train and len(val) == 1
    expected = (ds.val_x.float() / 255 - mean[0]) / std[0]
    assert torch.allclose(next(iter(val))[0], expected, atol=1e-5)


def test_loader_dtype_and_channels_last() -> None:
    x, y = _toy(20, size=32)
    loader = DeviceLoader(x, y, batch_size=8, train=True, augment=True, channels_last=True, dtype=torch.bfloat16)
    for xb, yb in loader:
        assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.bfloat16 and yb.dtype == torch.int64
        assert xb.is_contiguous(memory_format=torch.channels_last)
    xb, _ = next(iter(DeviceLoader(x, y, batch_size=8, train=True, augment=True)))
    assert xb.is_contiguous() and xb.dtype == torch.float32


def _reference_crop(img: torch.Tensor, dy: int, dx: int, pad: int, flip: bool) -> torch.Tensor:
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=img.dtype)
    padded[:, pad : pad + h, pad : pad + w] = img
    out = padded[:, dy : dy + h, dx : dx + w]
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("size", [8, 32])
def test_crop_flip_matches_reference(size: int) -> None:
    x, _ = _toy(6, size)
    pad = data.crop_padding(size, size)
    assert pad == (1 if size < 16 else 4)
    dy = torch.tensor([0, pad, 2 * pad, 1, 0, 2 * pad])
    dx = torch.tensor([2 * pad, pad, 0, 0, 1, 2 * pad])
    flip = torch.tensor([False, False, True, True, False, True])
    out = crop_flip(x, dy, dx, pad, flip)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(len(x)):
        assert torch.equal(out[i], _reference_crop(x[i], int(dy[i]), int(dx[i]), pad, bool(flip[i])))
    assert torch.equal(out[1], x[1])  # offset == pad, no flip: the identity
    unflipped = [_reference_crop(x[i], int(dy[i]), int(dx[i]), pad, False) for i in range(len(x))]
    assert torch.equal(crop_flip(x, dy, dx, pad), torch.stack(unflipped))


def _matching_transform(out: torch.Tensor, img: torch.Tensor, pad: int) -> tuple[int, int, bool] | None:
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            for flip in (False, True):
                if torch.equal(out, _reference_crop(img, dy, dx, pad, flip)):
                    return dy, dx, flip
    return None


@pytest.mark.parametrize("flip", [True, False])
def test_loader_augmentation_is_a_shifted_copy(flip: bool) -> None:
    """Each augmented image equals some zero-padded shift (mirrored only when flips are on) of its source."""
    x, y = _toy(64, size=8)
    loader = DeviceLoader(x, y, batch_size=64, train=True, augment=True, flip=flip, mean=(0.0,) * 3, std=(1 / 255,) * 3)
    xb, yb = next(iter(loader))
    out = xb.round().to(torch.uint8)  # mean 0, std 1/255: the batch is the raw 0..255 values
    found = [_matching_transform(out[i], x[int(yb[i])], pad=1) for i in range(len(out))]
    assert all(f is not None for f in found)
    assert len({(dy, dx) for dy, dx, _ in found}) > 3  # offsets are per image
    flips = {f for *_, f in found}
    assert flips == ({False, True} if flip else {False})


def test_dataset_flip_defaults_reach_the_loader() -> None:
    ds = load_dataset(DataConfig(name="digits"))
    assert not ds.loader("train", batch_size=32, augment=True).batches.flip
    with pytest.raises(DataError, match="no test split"):
        ds.loader("test", batch_size=32)


# ---- the real archive -------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_cifar10_archive(tmp_path: Path) -> None:
    archive = Path(os.environ.get("WUS_TUNE_CIFAR_TGZ", REPO / "../shared/data/cifar10-train-jpeg.tar.gz"))
    if not archive.is_file():
        pytest.skip(f"{archive} not found (set WUS_TUNE_CIFAR_TGZ to the CIFAR-10 JPEG archive)")
    cfg = DataConfig(name="cifar10", data_dir=str(archive), cache_dir=str(tmp_path / "c"), val_fraction=0.1)
    start = time.perf_counter()
    ds = load_dataset(cfg)
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    cached = load_dataset(cfg)
    cached_s = time.perf_counter() - start
    print(f"decode {decode_s:.1f} s, cached load {cached_s:.2f} s")
    assert len(ds.train_x) + len(ds.val_x) == 50_000 and len(ds.val_x) == 5_000
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    assert torch.equal(ds.val_y, cached.val_y)
    mean, _ = channel_stats(torch.cat([ds.train_x, ds.val_x]))
    assert mean == pytest.approx((0.4913, 0.4821, 0.4465), abs=0.01)


# ---- any kind of data: float features, Datasets materialised or streamed, augmentation settings ----------


class _Items(torch.utils.data.Dataset):
    """uint8 images (1, 8, 8) made on the fly; ``delay`` seconds of "decoding" per item."""

    def __init__(self, n: int = 96, delay: float = 0.0) -> None:
        self.n, self.delay, self.reads = n, delay, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.reads += 1
        if self.delay:
            time.sleep(self.delay)
        label = i % 2
        return torch.full((1, 8, 8), 60 + 120 * label, dtype=torch.uint8) + (i % 7), label


def test_float_features_are_standardised_and_never_augmented() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([1.0, 10, 100, 0.1, 3]) + 7
    y = (x[:, 0] > 7).long()
    ds = load_dataset(DataConfig(val_fraction=0.2), data=(x, y))
    assert ds.input_shape == (5,) and not ds.is_image and ds.size("train") == 160 and ds.size("val") == 40
    batch, labels = next(iter(ds.loader("train", batch_size=160, augment=True)))
    assert batch.shape == (160, 5) and batch.mean(0).abs().max() < 1e-4 and (batch.std(0, unbiased=False) - 1).abs().max() < 1e-4
    ordered = ds.loader("train", batch_size=160, augment=True).batches(ds.train_x)  # the transform alone: no crop/flip
    mean, std = ds.mean_std
    assert torch.allclose(ordered, (ds.train_x - torch.tensor(mean)) / torch.tensor(std), atol=1e-5)
    raw = load_dataset(DataConfig(val_fraction=0.2, normalize=False), data=(x, y))
    assert torch.equal(next(iter(raw.loader("val", batch_size=40)))[0], raw.val_x)


def test_a_given_val_split_is_used_as_given_and_subset_cuts_train_only() -> None:
    x, y = torch.randn(100, 3), torch.arange(100) % 3
    ds = load_dataset(DataConfig(subset=40), data={"train": (x, y), "val": (x[:10], y[:10]), "classes": ["a", "b", "c"]})
    assert ds.size("train") == 40 and torch.equal(ds.val_x, x[:10]) and ds.classes == ["a", "b", "c"]


@pytest.mark.parametrize("crop, flip", [(False, True), (True, False), (False, False)])
def test_crop_and_flip_are_separate_settings(crop: bool, flip: bool) -> None:
    x, y = _toy(64, size=8)
    ds = load_dataset(DataConfig(crop=crop, flip=flip, val_fraction=0.0, normalize=False), data=(x, y))
    loader = ds.loader("train", batch_size=64, augment=True)
    out = (loader.batches(ds.train_x) * 255).round().to(torch.uint8)
    mirrored = [torch.equal(out[i], ds.train_x[i].flip(-1)) for i in range(64)]
    same = [torch.equal(out[i], ds.train_x[i]) for i in range(64)]
    if not crop:
        assert all(s or m for s, m in zip(same, mirrored)) and (any(mirrored) == flip)
    else:
        assert not any(mirrored) and not all(same)


def test_a_dataset_within_the_budget_is_materialised_once() -> None:
    items = _Items(96)
    cfg = DataConfig(val_fraction=0.25)
    ds = load_dataset(cfg, data={"train": items})
    first = items.reads
    again = load_dataset(cfg, data={"train": items})
    assert not ds.streamed and ds.train_x.dtype == torch.uint8 and ds.input_shape == (1, 8, 8)
    assert ds.size("train") == 72 and ds.num_classes == 2 and torch.equal(again.train_x, ds.train_x)
    assert first >= 96 and items.reads - first < 5  # the second load read only the first item (its checks)


def test_a_dataset_over_the_budget_is_streamed_with_workers() -> None:
    from wus_tune.data import StreamLoader

    cfg = DataConfig(val_fraction=0.25, memory_budget_mb=0.001, num_workers=1)
    ds = load_dataset(cfg, data={"train": _Items(96)})
    assert set(ds.streamed) == {"train", "val"} and ds.train_x is None and ds.size("train") == 72
    loader = ds.loader("train", batch_size=16, augment=True, seed=0)
    assert isinstance(loader, StreamLoader) and loader.loader.persistent_workers and len(loader) == 4
    batches = list(loader)
    assert len(batches) == 4 and batches[0][0].shape == (16, 1, 8, 8) and batches[0][0].dtype == torch.float32
    mean, std = ds.mean_std  # estimated from the streamed training items: the same as exact here
    assert mean[0] == pytest.approx(float(torch.stack([_Items(96)[int(i)][0] for i in ds.streamed["train"].indices]).double().mean() / 255), abs=1e-6)
    assert loader.wait_s > 0


def test_closing_a_streamed_loader_stops_its_workers_at_once() -> None:
    """The loader and its batch order refer to each other: left to the cycle collector, the workers stop at
    some later moment (inside another run's timed work) and each waits out torch's 5 s status check."""
    import multiprocessing

    cfg = DataConfig(val_fraction=0.25, memory_budget_mb=0.001, num_workers=1)
    loader = load_dataset(cfg, data={"train": _Items(96)}).loader("train", batch_size=16)
    before = set(multiprocessing.active_children())
    assert len(list(loader)) == 4  # an epoch: the persistent worker stays up for the next one
    worker = set(multiprocessing.active_children()) - before
    assert len(worker) == 1
    start = time.perf_counter()
    loader.close()
    assert not (set(multiprocessing.active_children()) & worker), "the worker outlived close()"
    assert time.perf_counter() - start < 2.0


def test_a_run_on_a_streamed_dataset_leaves_no_worker_behind() -> None:
    import multiprocessing

    from wus_tune.config import TrainConfig
    from wus_tune.trainer import fit

    before = set(multiprocessing.active_children())
    config = TrainConfig.from_dict({"model": {"name": "mlp"}, "epochs": 2, "device": "cpu", "data": {
        "factory": "wus_tune.testing:slow_digits", "kwargs": {"train_ms": 0.001, "val_ms": 0.001},
        "memory_budget_mb": 0, "num_workers": 1}})  # fmt: skip
    result = fit(config, relative_to=config)  # the run's loaders and the pricing's, all streamed by a worker
    assert result.work_seconds["workers"]["seconds"] > 0
    assert not set(multiprocessing.active_children()) - before


def test_both_loaders_take_one_options_object() -> None:
    """One LoaderOptions drives either loader; keywords beside it override its fields."""
    from wus_tune.data import LoaderOptions, StreamLoader

    items = _Items(40)
    x = torch.stack([items[i][0] for i in range(40)])
    y = torch.tensor([items[i][1] for i in range(40)])
    options = LoaderOptions(batch_size=16, mean=(0.5,), std=(0.25,))
    resident, streamed = DeviceLoader(x, y, options), StreamLoader(items, options, num_workers=0)
    assert resident.options is options and len(resident) == len(streamed) == 3  # evaluation: every sample
    for (xa, ya), (xb, yb) in zip(resident, streamed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    torch.testing.assert_close(next(iter(resident))[0], (x[:16] / 255 - 0.5) / 0.25)
    training = DeviceLoader(x, y, options, train=True, seed=3)
    assert training.options.batch_size == 16 and training.train and len(training) == 2
    assert [b.tolist() for _, b in training] == [b.tolist() for _, b in DeviceLoader(x, y, batch_size=16, train=True, seed=3)]
    with pytest.raises(ValueError, match="batch_size: expected >= 1, got 0"):
        DeviceLoader(x, y, options, batch_size=0)


def test_streamed_data_time_is_charged_to_baseline_and_wus_alike(one_torch_thread) -> None:
    """Every item takes 2 ms to "decode" and no worker hides it: each run's training time holds at least
    that, skip steps or not, so WUS is not credited with loading time it does not save."""
    from wus_tune import TrainConfig, fit

    delay, n = 0.002, 96
    raw = {"epochs": 3, "device": "cpu", "optim": {"batch_size": 16},
           "data": {"val_fraction": 0.25, "memory_budget_mb": 0.001, "num_workers": 0}}  # fmt: skip
    wus = {**raw, "methods": {"wus": {"warmup": 0, "threshold": 1.0, "window": 1, "skip_length": 1,
                                       "schedule_window": [0.0, 1.0]}}}  # fmt: skip
    model = lambda shape, k: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, k))  # noqa: E731
    base = fit(TrainConfig.from_dict(raw), model=model, data={"train": _Items(n, delay)})
    skip = fit(TrainConfig.from_dict(wus), model=model, data={"train": _Items(n, delay)})
    loaded = 3 * 72 * delay  # three epochs of the 72 training items
    assert skip.changed_steps > 0
    assert base.train_time_s >= loaded and skip.train_time_s >= loaded
