"""A third-party method joins a study through the ``wus_tune.methods`` entry-point group alone: no file of
wus_tune is edited. The package is written here, declared by a ``*.dist-info/entry_points.txt`` on
PYTHONPATH (what ``pip install`` of a package with that entry point leaves), and a digits study run as a
subprocess compares it with the plain recipe. Its study declaration (search space, default trial) is a
class of its own that the package names; training never imports it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, worker_env

PACKAGE = '''
"""Freeze the first layer after a fraction of training (default: half)."""
from torch import nn

from wus_tune.methods import Method
from wus_tune.methods.study import MethodStudy


def first_layer(model):
    return next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


class FreezeFirst(Method):
    name = "freeze_early"
    study = "freeze_pkg:FreezeFirstStudy"  # read by the study only

    def __init__(self, at: float = 0.5):
        super().__init__(at=at)
        self.at, self.frozen_steps = at, 0

    def before_step(self, *args):
        # between backward and optimizer.step(); (model, optimizer, ctx) or one step context, whichever
        # the installed wus_tune passes
        if len(args) == 3:
            model, _, ctx = args
        else:
            model, ctx = args[0].model, args[0]
        if ctx.progress >= self.at:
            for p in first_layer(model).parameters():
                p.grad = None  # SGD leaves a parameter without a gradient alone (no decay, no momentum)
            self.frozen_steps += 1

    def end_epoch(self, model, run):
        return {"freeze_early/frozen_steps": float(self.frozen_steps)}


class FreezeFirstStudy(MethodStudy):
    method = FreezeFirst
    SEARCH_SPACE = {"methods.freeze_early.at": {"type": "float", "low": 0.3, "high": 0.7,
                                                "doc": "fraction of training after which layer 1 is frozen"}}
    DEFAULT_TRIAL = {"at": 0.4}
'''

ENTRY_POINTS = """
[wus_tune.methods]
freeze_early = freeze_pkg:FreezeFirst
"""

SPEC = """
name: plugin
train:
  model: {name: mlp, width: 0.25, depth: 3}
  data: {name: digits}
  epochs: 2
  device: cpu
methods: [none, freeze_early]
baseline_fractions: []
n_trials: 3
sampler_options: {n_startup_trials: 1}
"""


@pytest.mark.slow
def test_a_method_from_an_entry_point_runs_in_a_study(tmp_path):
    site = tmp_path / "site"
    (site / "freeze_pkg").mkdir(parents=True)
    (site / "freeze_pkg" / "__init__.py").write_text(textwrap.dedent(PACKAGE))
    info = site / "freeze_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: freeze-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    (tmp_path / "spec.yaml").write_text(SPEC)
    from wus_tune.methods import registry

    assert "freeze_early" not in registry()  # wus_tune itself knows nothing of it

    env = worker_env(PYTHONPATH=f"{site}:{ROOT}")
    found = subprocess.run(
        [sys.executable, "-c", "from importlib.metadata import entry_points as e; "
         "print([x.name for x in e(group='wus_tune.methods')])"],  # fmt: skip
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert "freeze_early" in found.stdout, found.stderr
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run(
        [sys.executable, "-m", "wus_tune.study", "--spec", "spec.yaml", "--tracking-uri", tracking, "--seed", "0"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    import optuna
    from mlflow import MlflowClient

    trials = optuna.load_study(study_name="plugin", storage=f"sqlite:///{tmp_path}/studies/plugin.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    by_method = {}
    for t in trials:
        by_method.setdefault(t.user_attrs["method"], []).append(t)
    assert len(by_method["none"]) >= 1 and any(t.user_attrs["role"] == "method-default" for t in by_method["freeze_early"])
    default = next(t for t in by_method["freeze_early"] if t.user_attrs["role"] == "method-default")
    assert default.user_attrs["config"]["methods"]["freeze_early"]["at"] == 0.4  # its own default trial
    client = MlflowClient(tracking_uri=tracking)
    for t in trials:
        config = t.user_attrs["config"]
        metrics = client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics
        frozen = [v for k, v in metrics.items() if k.endswith("frozen_steps")]  # the method's epoch metric
        if t.user_attrs["method"] == "freeze_early":
            assert "freeze_early" in config["methods"]
            at = config["methods"]["freeze_early"].get("at", 0.5)
            assert 0.3 <= at <= 0.7 and frozen and frozen[0] > 0, metrics  # it ran, and froze the layer
            if t.user_attrs["role"] == "search":
                assert "methods.freeze_early.at" in t.params  # its own search space was sampled
        else:
            assert "freeze_early" not in config["methods"] and not frozen
