"""A user's own model and data, first-class: from a package on PYTHONPATH through the study CLI, MLflow,
the export and production training; through the Python API without any package; and bad factories or bad
data as one line, exit status 2, nothing written (issue 10's acceptance)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import worker_env
from wus_tune import TrainConfig, fit
from wus_tune._cli import run_main
from wus_tune.errors import ConfigError, DataError
from wus_tune.study import main as study_main
from wus_tune.train import main as train_main

# The user's package, as a user would write it: nested modules, a layer without bias, a version.
NETS = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x):
        return torch.relu(self.norm(self.linear(x)))


class Net(nn.Module):
    def __init__(self, d_in, num_classes, hidden, blocks):
        super().__init__()
        self.body = nn.Sequential(Block(d_in, hidden), *[Block(hidden, hidden) for _ in range(blocks - 1)])
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def build(input_shape, num_classes, hidden=16, blocks=2):
    (d_in,) = input_shape
    return Net(d_in, num_classes, hidden, blocks)


def two_layer(input_shape, num_classes, hidden=32):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def not_a_module(input_shape, num_classes):
    return [nn.Linear(4, 2)]


def raises(input_shape, num_classes):
    raise ValueError("hidden must be even")


def wrong_logits(input_shape, num_classes):
    return nn.Linear(input_shape[0], num_classes + 1)


NOT_CALLABLE = 3
'''

DATA = '''
import torch


def load(n=240, features=6, seed=0):
    """Two informative features, three classes; a separate validation split."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return {"train": (x[:200], y[:200]), "val": (x[200:], y[200:])}


def as_list():
    return [1, 2, 3]


def ragged():
    return torch.randn(10, 4), torch.zeros(9, dtype=torch.long)


def float_labels():
    return torch.randn(50, 4), torch.rand(50)


def three_d_uint8():
    return torch.zeros(50, 8, 8, dtype=torch.uint8), torch.arange(50) % 2


def no_train():
    return {"val": (torch.randn(50, 4), torch.arange(50) % 2)}


def odd_val():
    return {"train": (torch.randn(50, 4), torch.arange(50) % 2), "val": (torch.randn(10, 5), torch.arange(10) % 2)}


def int_inputs():
    return torch.arange(200).reshape(50, 4), torch.arange(50) % 2


def one_hot():
    return torch.randn(50, 4), torch.eye(2)[torch.arange(50) % 2].long()


class Pairless(torch.utils.data.Dataset):
    def __len__(self):
        return 30

    def __getitem__(self, i):
        return torch.zeros(4)


def pairless():
    return Pairless()
'''


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A throw-away package ``acme_<random>`` (nets, data, version 1.2.3) on sys.path; its name."""
    root = tmp_path_factory.mktemp("userpkg")
    name = f"acme_{uuid.uuid4().hex[:8]}"
    (root / name).mkdir()
    (root / name / "__init__.py").write_text('__version__ = "1.2.3"\n')
    (root / name / "nets.py").write_text(textwrap.dedent(NETS))
    (root / name / "data.py").write_text(textwrap.dedent(DATA))
    sys.path.insert(0, str(root))
    yield name, root
    sys.path.remove(str(root))


def spec_for(pkg: str) -> dict:
    return {
        "name": "own",
        "train": {
            "model": {"factory": f"{pkg}.nets:build", "kwargs": {"hidden": 12, "blocks": 2}},
            "data": {"factory": f"{pkg}.data:load", "kwargs": {"n": 240}},
            "optim": {"batch_size": 32, "lr": 0.05},
            "epochs": 2,
            "device": "cpu",
        },
        "baseline_fractions": [0.5],
        "sampler_options": {"n_startup_trials": 2},
    }


def cli(main, argv):
    try:
        return run_main(main, argv)
    except SystemExit as e:
        return e.code


def test_a_spec_with_the_users_package_runs_a_study_fills_mlflow_and_reproduces(package, study_dir):
    pkg, root = package
    (study_dir / "spec.yaml").write_text(yaml.safe_dump(spec_for(pkg)))
    env = worker_env(PYTHONPATH=f"{Path(__file__).resolve().parents[1]}:{root}")
    run = lambda *argv: subprocess.run([sys.executable, "-m", *argv], cwd=study_dir, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=600)
    done = run("wus_tune.study", "--spec", "spec.yaml", "--n-trials", "4")
    assert done.returncode == 0, done.stderr
    assert "selected by" in done.stdout

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{study_dir}/mlruns/mlflow.db")  # absolute: MLflow caches stores by URI
    exp = client.get_experiment_by_name("own")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("wus_tune.role") == "study"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    params = children[0].data.params
    assert params["model.factory"] == f"{pkg}.nets:build" and params["data.factory"] == f"{pkg}.data:load"
    assert params["model.factory_version"] == "1.2.3"
    assert {"val_acc", "time_s"} <= set(children[0].data.metrics)
    assert "best_config.yaml" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}

    done = run("wus_tune.pareto", "--study", "own", "--out", "best.yaml")
    assert done.returncode == 0, done.stderr
    best = yaml.safe_load((study_dir / "best.yaml").read_text())
    assert best["model"]["factory"] == f"{pkg}.nets:build" and best["model"]["kwargs"] == {"hidden": 12, "blocks": 2}
    assert best["model"]["factory_version"] == "1.2.3" and best["data"]["kwargs"] == {"n": 240}

    done = run("wus_tune.train", "--config", "best.yaml", "--out", "prod", "--quiet")
    assert done.returncode == 0, done.stderr
    checkpoint = torch.load(study_dir / "prod" / "model.pt", weights_only=True)
    import importlib

    fresh = importlib.import_module(f"{pkg}.nets").build((6,), 3, hidden=12, blocks=2)
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: the same architecture, key by key
    result = json.loads((study_dir / "prod" / "result.json").read_text())
    assert result["num_params"] == sum(p.numel() for p in fresh.parameters())


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 5, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def test_python_api_takes_the_objects_themselves(study_dir):
    from wus_tune.study import run_study

    def small_net(input_shape, num_classes, hidden=8):  # a notebook's function: no package, no import path
        return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    x, y = make_data()
    outcome = run_study(
        train={"epochs": 2, "device": "cpu", "optim": {"batch_size": 32}, "model": {"kwargs": {"hidden": 10}}},
        model=small_net, data=(x, y), n_trials=3, baseline_fractions=[0.5], tracking_uri="none",
        name="api", echo=None,
    )  # fmt: skip
    assert outcome.best_config is not None and len(outcome.trials_run) == 3
    best = outcome.best_config
    assert best.model.factory == "<python>:test_python_api_takes_the_objects_themselves.<locals>.small_net"
    assert best.model.name == "small_net" and best.data.factory == "<python>:tuple"
    result = fit(best, model=small_net, data=(x, y))
    assert result.num_params == (5 * 10 + 10) + (10 * 2 + 2)
    assert result.config["model"]["factory"] == best.model.factory
    with pytest.raises(ConfigError, match="was given as a Python object"):
        fit(best)  # without the objects the config says what is missing

    from wus_tune.production import train_production

    # production training of that config takes the same objects, and logs the model (its input example
    # comes from the data given, not from the config's "<python>:tuple")
    prod = train_production(best, model=small_net, data=(x, y), epochs=1, out_dir="production",
                            tracking_uri="sqlite:///mlruns/mlflow.db", progress=False)  # fmt: skip
    assert prod.result.num_params == result.num_params and prod.model_uri
    assert (study_dir / "production" / "model.pt").is_file()

    module = small_net((5,), 2)
    before = [p.clone() for p in module.parameters()]
    trained = fit(TrainConfig.from_dict({"epochs": 1, "device": "cpu"}), model=module, data=(x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))  # a copy was trained
    assert not all(torch.equal(a, b) for a, b in zip(before, trained.model.parameters()))


# ---- bad factories and bad data: one line, exit status 2, nothing written ------------------------------

BAD_MODEL = [
    ("model.factory=nope_pkg.nets:build", "model.factory: cannot import 'nope_pkg.nets'"),
    ("model.factory={pkg}.nets:missing", "has no attribute 'missing'"),
    ("model.factory={pkg}.nets.build", "expected an import path 'package.module:function'"),
    ("model.factory={pkg}.nets:NOT_CALLABLE", "is a int, not a callable factory"),
    ("model.factory={pkg}.nets:not_a_module", "not_a_module() returned list, not a torch.nn.Module"),
    ("model.factory={pkg}.nets:raises", "raises() raised ValueError: hidden must be even"),
    ("model.kwargs={{width: 2}}", "model.kwargs: build() does not take these arguments"),
    ("model.factory={pkg}.nets:wrong_logits", "the model returns (2, 4) for a batch of 2; expected logits (2, 3)"),
]
BAD_DATA = [
    ("data.factory={pkg}.data:as_list", "expected (x, y) tensors, a mapping of splits or a torch Dataset, got list"),
    ("data.factory={pkg}.data:ragged", "10 inputs but 9 labels"),
    ("data.factory={pkg}.data:float_labels", "labels must be integer class indices, got torch.float32"),
    ("data.factory={pkg}.data:three_d_uint8", "uint8 images must be (N, C, H, W), got shape (50, 8, 8)"),
    ("data.factory={pkg}.data:no_train", "the returned mapping has no 'train' split"),
    ("data.factory={pkg}.data:odd_val", "val inputs are torch.float32 (5,) but train inputs are torch.float32 (4,)"),
    ("data.factory={pkg}.data:int_inputs", "expected uint8 images or float inputs, got torch.int64"),
    ("data.factory={pkg}.data:one_hot", "labels must have shape (N,), got (50, 2)"),
    ("data.factory={pkg}.data:pairless", "items must be (x, y) pairs, item 0 is Tensor"),
    ("data.kwargs={{n: 5, colour: red}}", "data.kwargs: load() does not take these arguments"),
]


@pytest.mark.parametrize("setting, message", BAD_MODEL + BAD_DATA, ids=[m[:40] for _, m in BAD_MODEL + BAD_DATA])
def test_bad_factories_and_data_are_one_line_and_write_nothing(package, study_dir, capsys, setting, message):
    pkg, _ = package
    (study_dir / "spec.yaml").write_text(yaml.safe_dump(spec_for(pkg)))
    if "data.factory" in setting and "kwargs" not in setting:
        setting_extra = ["--set", "data.kwargs={}"]
    elif "model.factory" in setting and "kwargs" not in setting:
        setting_extra = ["--set", "model.kwargs={}"]
    else:
        setting_extra = []
    assert cli(study_main, ["--spec", "spec.yaml", "--set", setting.format(pkg=pkg), *setting_extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (study_dir / "mlruns").exists() and not (study_dir / "studies").exists()


def test_the_train_cli_says_the_same_and_leaves_no_output(package, study_dir, capsys):
    pkg, _ = package
    base = ["--device", "cpu", "--epochs", "1", "--quiet", "--out", "prod"]
    assert cli(train_main, [*base, "--model", f"{pkg}.nets:raises", "--dataset", f"{pkg}.data:load"]) == 2
    assert "raises() raised ValueError: hidden must be even" in capsys.readouterr().err
    assert cli(train_main, [*base, "--model", f"{pkg}.nets:build", "--dataset", f"{pkg}.data:ragged"]) == 2
    assert "10 inputs but 9 labels" in capsys.readouterr().err
    assert not (study_dir / "prod").exists()
    # and the good pair trains, with the model's kwargs from the command line
    argv = [*base, "--model", f"{pkg}.nets:build", "--model.kwargs", "{hidden: 6, blocks: 1}", "--dataset", f"{pkg}.data:load"]
    assert cli(train_main, argv) == 0
    saved = TrainConfig.load(study_dir / "prod" / "config.yaml")
    assert saved.model.factory == f"{pkg}.nets:build" and saved.model.kwargs == {"hidden": 6, "blocks": 1}
    assert saved.data.factory == f"{pkg}.data:load" and saved.model.factory_version == "1.2.3"
    assert saved.model.name == "build" and saved.data.name == "load"


def test_fit_raises_the_same_errors(package):
    pkg, _ = package
    config = TrainConfig.from_dict({"epochs": 1, "device": "cpu", "model": {"factory": f"{pkg}.nets:build"}})
    with pytest.raises(DataError, match="labels must be integer"):
        fit(config, data=(torch.randn(40, 6), torch.rand(40)))
    with pytest.raises(ConfigError, match="expected an nn.Module or a factory callable, got str"):
        fit(config, model="resnet", data=make_data())


def test_entry_point_plugins_are_listed_and_used_by_name(package, tmp_path, monkeypatch, capsys):
    """A package that registers names (entry points ``wus_tune.models`` / ``wus_tune.datasets``): the
    metadata of an installed distribution, written here as its .dist-info directory on sys.path."""
    pkg, _ = package
    site = tmp_path / "site"
    info = site / "acme_plugin-0.4.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plugin\nVersion: 0.4.0\n")
    (info / "entry_points.txt").write_text(
        f"[wus_tune.models]\nacme-net = {pkg}.nets:build\n\n[wus_tune.datasets]\nacme-data = {pkg}.data:load\n"
    )
    monkeypatch.syspath_prepend(str(site))  # a changed sys.path: the registry scans the entry points again
    assert cli(study_main, ["--list"]) == 0
    listing = capsys.readouterr().out
    assert f"acme-net       {pkg}.nets:build  (entry point wus_tune.models)" in listing
    assert f"acme-data      {pkg}.data:load  (entry point wus_tune.datasets)" in listing
    assert "vgg11          wus_tune.models:vgg11  (built-in)" in listing and "digits" in listing
    config = TrainConfig.from_dict({"model": {"name": "acme-net", "kwargs": {"hidden": 4, "blocks": 1}},
                                    "data": {"name": "acme-data"}, "epochs": 1, "device": "cpu"})  # fmt: skip
    result = fit(config)
    assert result.num_params == 6 * 4 + 2 * 4 + 4 * 3 + 3  # Linear(6, 4, bias=False), LayerNorm(4), Linear(4, 3)
    assert result.config["model"]["factory"] is None and result.config["model"]["name"] == "acme-net"


def test_a_method_that_needs_a_certain_network_checks_the_users_built_module(package, study_dir):
    """gauss_newton needs Linear -> ReLU -> Linear: from a built-in model's config that is known when the spec
    is resolved; a user's factory is judged on the module it builds, with one clear line when it does not fit."""
    from wus_tune.study import StudySpec

    pkg, _ = package
    base = spec_for(pkg)["train"] | {"methods": {"gauss_newton": {"damping": 1e-3}}}
    two_layer = TrainConfig.from_dict({**base, "model": {"factory": f"{pkg}.nets:two_layer", "kwargs": {"hidden": 24}}})
    result = fit(two_layer)
    assert result.val_acc is not None and result.train_flops > 0
    with pytest.raises(ConfigError, match="needs a two-layer ReLU MLP"):
        fit(TrainConfig.from_dict(base))  # blocks with LayerNorm: refused on the built module
    spec = spec_for(pkg) | {"methods": ["gauss_newton"]}
    spec["train"] = {**spec["train"], "model": {"factory": f"{pkg}.nets:two_layer"}}
    StudySpec.from_dict(spec).resolve()  # a user's factory is not refused from its config
    with pytest.raises(Exception, match="two-layer mlp"):
        StudySpec.from_dict(spec | {"train": {**spec["train"], "model": {"name": "mlp", "depth": 3}}}).resolve()
