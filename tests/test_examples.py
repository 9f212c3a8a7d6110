"""The examples in examples/ run as their docstrings say: a tiny study on each, the pick exported and
reproduced with ``python -m wus_tune.train --config``. Studies run in this process (MLflow off, the report
in studies/<name>/); the reproductions are real subprocesses."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import worker_env
from wus_tune._cli import run_main
from wus_tune.study import main as study_main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def examples_on_path(study_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return study_dir


def study(name: str, train: dict, **spec) -> Path:
    """A tiny study (baseline + WUS default); returns the exported best_config.yaml."""
    Path(f"{name}.yaml").write_text(yaml.safe_dump({
        "name": name, "train": {"epochs": 2, "device": "cpu", **train}, "n_trials": 2, "baseline_fractions": [],
        "tracking_uri": "none", **spec,
    }))  # fmt: skip
    try:
        code = run_main(study_main, ["--spec", f"{name}.yaml"])
    except SystemExit as e:
        code = e.code
    assert code == 0
    best = Path("studies") / name / "best_config.yaml"
    assert best.is_file()
    return best


def reproduce(config: Path, out: str) -> dict:
    env = worker_env(PYTHONPATH=f"{EXAMPLES.parent}:{EXAMPLES}")
    done = subprocess.run([sys.executable, "-m", "wus_tune.train", "--config", str(config), "--out", out, "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (Path(out) / "model.pt").is_file()
    return json.loads((Path(out) / "result.json").read_text())


def image_folder_tarball(path: Path, classes: int = 2, per_class: int = 10, size: int = 32) -> Path:
    """PNG images of two easy classes (dark vs bright, with noise) in ``train/<class>/``."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    with tarfile.open(path, "w:gz") as tar:
        for c in range(classes):
            for i in range(per_class):
                pixels = (torch.rand(size, size, 3, generator=g) * 80 + 40 + 100 * c).clamp(0, 255).to(torch.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels.numpy()).save(buf, format="PNG")
                info = tarfile.TarInfo(f"train/class{c}/{i:03d}.png")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
    return path


def test_torchvision_resnet18_on_an_image_folder_tarball(examples_on_path, one_torch_thread):
    import resnet18_cifar

    archive = image_folder_tarball(examples_on_path / "images.tar.gz")
    best = study("r18", {
        "model": {"factory": "resnet18_cifar:build"},
        "data": {"name": "imagefolder", "data_dir": str(archive), "cache_dir": "cache", "val_fraction": 0.2},
        "optim": {"batch_size": 8}, "epochs": 1,
    })  # fmt: skip
    config = yaml.safe_load(best.read_text())
    assert config["model"]["factory"] == "resnet18_cifar:build"
    assert config["model"]["factory_version"] is None  # a plain module: no version to record
    result = reproduce(best, "prod")
    expected = resnet18_cifar.build((3, 32, 32), 2)
    assert result["num_params"] == sum(p.numel() for p in expected.parameters())
    state = torch.load("prod/model.pt", weights_only=True)["state_dict"]
    assert state["conv1.weight"].shape == (64, 3, 3, 3)  # the 32x32 stem, not ImageNet's 7x7
    expected.load_state_dict(state)


def test_tabular_mlp_on_the_users_own_data_function(examples_on_path, one_torch_thread):
    best = study("tab", {
        "model": {"factory": "tabular_mlp:build", "kwargs": {"hidden": 16}},
        "data": {"factory": "tabular_mlp:load", "kwargs": {"test_fraction": 0.2}},
        "optim": {"batch_size": 64, "lr": 0.05}, "epochs": 3,
    })  # fmt: skip
    from wus_tune.data import load_dataset
    from wus_tune.config import DataConfig

    ds = load_dataset(DataConfig(factory="tabular_mlp:load"))
    assert ds.input_shape == (30,) and ds.num_classes == 2 and not ds.is_image
    assert ds.size("test") == 114 and ds.size("train") + ds.size("val") == 455
    result = reproduce(best, "prod")
    assert result["test_acc"] is not None and result["val_acc"] > 0.8  # standardised features: an easy table


def test_fine_tuning_keeps_the_frozen_backbone_frozen(examples_on_path, one_torch_thread):
    env = worker_env(PYTHONPATH=f"{EXAMPLES.parent}:{EXAMPLES}")
    pretrain = subprocess.run(
        [sys.executable, "-m", "wus_tune.train", "--model", "finetune_frozen:build", "--model.kwargs",
         "{freeze: false, channels: 8}", "--dataset", "digits", "--epochs", "1", "--device", "cpu", "--out",
         "pretrained", "--quiet"], env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pretrain.returncode == 0, pretrain.stderr
    checkpoint = str(examples_on_path / "pretrained" / "model.pt")
    best = study("ft", {
        "model": {"factory": "finetune_frozen:build", "kwargs": {"backbone": checkpoint, "channels": 8}},
        "data": {"name": "digits"}, "optim": {"batch_size": 64},
    })  # fmt: skip
    reproduce(best, "prod")
    before = torch.load(checkpoint, weights_only=True)["state_dict"]
    after = torch.load("prod/model.pt", weights_only=True)["state_dict"]
    backbone = [k for k in before if k.startswith("backbone.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)  # weights and BN statistics
    import finetune_frozen

    torch.manual_seed(0)  # the config's seed: the head the fine-tuning started from
    start = finetune_frozen.build((1, 8, 8), 10, backbone=checkpoint, channels=8)
    assert not torch.equal(start.head.weight, after["head.weight"])  # the head trained


def test_a_streamed_dataset_that_decodes_each_sample(examples_on_path, one_torch_thread):
    """The streamed example: every split decoded per sample by a DataLoader worker, the decoding charged."""
    import streamed_decode

    data = streamed_decode.load()
    x, label = data["train"][0]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and 0 <= label < 10
    best = study("dec", {
        "model": {"name": "mlp", "width": 0.25},
        "data": {"factory": "streamed_decode:load", "memory_budget_mb": 0, "num_workers": 1},
        "epochs": 2,
    })  # fmt: skip
    result = reproduce(best, "prod")
    assert result["val_acc"] > 0.3  # ten classes, two epochs of a small MLP on 32x32 images
    trials = yaml.safe_load(best.read_text())
    assert trials["data"]["factory"] == "streamed_decode:load"
