"""Images kept compressed and decoded per sample, streamed through DataLoader workers: a Dataset too large to
hold decoded in memory, the common case for a user's own images.

Copy this file and run (``data.memory_budget_mb: 0`` streams every split; ``num_workers`` decode in parallel)::

    PYTHONPATH=. python -m wus_tune.study --dataset streamed_decode:load --model mlp --epochs 10 --n-trials 20 \\
        --set data.memory_budget_mb=0 --set data.num_workers=2
    python -m wus_tune.pareto --study mlp-load --confirm auto
    PYTHONPATH=. python -m wus_tune.train --config studies/mlp-load/best_config.yaml

Here the images are scikit-learn's digits, upscaled to 32x32 RGB and stored as PNG bytes, so the example
runs offline; for your own, keep a list of file paths (or bytes) and decode in ``__getitem__`` the same way.
Decoding costs real time in every step: the study's relative time charges it (docs/study.md, "The time
objective"), so a method that makes steps cheaper is not credited with decoding it does not save.
"""

from __future__ import annotations

import io

import torch


class EncodedImages(torch.utils.data.Dataset):
    """``(image, label)`` pairs decoded from PNG bytes on every access: uint8 (3, H, W) tensors."""

    def __init__(self, encoded: list[bytes], labels: list[int]) -> None:
        self.encoded, self.labels = encoded, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(io.BytesIO(self.encoded[i])) as image:
            pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        return pixels.view(image.height, image.width, 3).permute(2, 0, 1).contiguous(), self.labels[i]


def encode_digits(size: int = 32) -> tuple[list[bytes], list[int]]:
    """scikit-learn's 1,797 digits as ``size`` x ``size`` RGB PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    encoded = []
    for image in digits.images:
        gray = Image.fromarray((image * 255 / 16).astype("uint8")).resize((size, size), Image.BILINEAR)
        buffer = io.BytesIO()
        gray.convert("RGB").save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded, [int(t) for t in digits.target]


def load(size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict[str, EncodedImages]:
    """Train and validation splits of encoded images (the validation split is ours: a Dataset is not cut)."""
    encoded, labels = encode_digits(size)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(len(labels) * val_fraction)

    def split(index: list[int]) -> EncodedImages:
        return EncodedImages([encoded[i] for i in index], [labels[i] for i in index])

    return {"train": split(order[n_val:]), "val": split(order[:n_val]), "flip": False}
