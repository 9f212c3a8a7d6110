"""The config file format and the production-training CLI, including every kind of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wus_tune.config import TrainConfig
from wus_tune.errors import ConfigError
from wus_tune.train import main

REPO = Path(__file__).resolve().parents[1]


def test_round_trip_yaml_and_json(tmp_path):
    config = TrainConfig().replace({"methods.wus": {}, "methods.wus.bias_scope": "last:2", "data.subset": 500})
    for name in ("c.yaml", "c.json"):
        assert TrainConfig.load(config.save(tmp_path / name)) == config


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"methods": {"wus": {"treshold": 0.1}}}, r"methods\.wus\.treshold: unknown argument"),
        ({"methods": {"wus": {"threshold": 2.0}}}, r"methods\.wus\.threshold: 2\.0 is out of range"),
        ({"methods": {"wus": {"threshold": "high"}}}, r"methods\.wus\.threshold: expected a number"),
        ({"methods": {"wus": {"window": 2.5}}}, r"methods\.wus\.window: expected an integer"),
        ({"methods": {"wus": {"variant": "none"}}}, r"methods\.wus\.variant: unknown value 'none'"),
        ({"methods": {"wus": {"schedule_window": [0.8, 0.2]}}}, r"methods\.wus\.schedule_window: start 0\.8 must be below end 0\.2"),
        ({"wus": {"threshold": 2.0}}, r"methods\.wus\.threshold: 2\.0 is out of range"),  # version 1, off: still checked
        ({"model": {"name": "vgg19"}}, r"model\.name: unknown value 'vgg19'"),
        ({"data": {"name": "mnist"}}, r"data\.name: unknown value"),
        ({"epochs": 0}, r"epochs: 0 is out of range"),
        ({"epochs": 1.5}, r"epochs: expected an integer"),
        ({"version": 3}, r"version: this wus_tune reads config version 2"),
        ({"optim": {"nesterov": "yes"}}, r"optim\.nesterov: expected true or false"),
        ({"schedule": {"milestones": [0.75, 0.5]}}, r"schedule\.milestones: must be increasing"),
        ({"methods": {"warp_drive": {}}}, r"methods\.warp_drive: unknown method"),
        ({"device": "tpu"}, r"device: expected auto"),
        ({"wus": []}, r"wus: expected a mapping"),
        ({"version": 2, "wus": {}}, r"wus: unknown key"),
    ],
)
def test_invalid_configs_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(raw)


def test_cli_trains_on_digits_and_saves_weights_with_config(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--model", "mlp", "--dataset", "digits", "--epochs", "2", "--device", "cpu",
                 "--methods.wus.threshold", "0.02", "--out", str(out), "--quiet"])
    assert code == 0
    assert "done: val" in capsys.readouterr().out
    config = TrainConfig.load(out / "config.yaml")
    assert config.methods == {"wus": {"threshold": 0.02}} and config.epochs == 2
    checkpoint = torch.load(out / "model.pt", weights_only=True)
    assert TrainConfig.from_dict(checkpoint["config"]) == config
    assert any(k.endswith("weight") for k in checkpoint["state_dict"])
    assert (out / "result.json").exists()

    # the saved config trains again, with an option overriding it
    again = tmp_path / "again"
    assert main(["--config", str(out / "config.yaml"), "--epochs", "1", "--out", str(again), "--quiet"]) == 0
    assert TrainConfig.load(again / "config.yaml").epochs == 1


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wus_tune.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                       "WUS_TUNE_CACHE": str(cwd / "cache")})


def _bad_input_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("version: 2\nmethods: {wus: {thresold: 0.1}}\n")
    corrupt = tmp_path / "corrupt.yaml"
    corrupt.write_text("model: {name: [vgg11\n")
    blocker = tmp_path / "file"
    blocker.write_text("")
    return [
        (["--model", "vgg19", "--dataset", "digits"], "model.name: unknown value 'vgg19'"),
        (["--dataset", "mnist"], "data.name: unknown value 'mnist'"),
        (["--config", str(unknown_key)], "methods.wus.thresold: unknown argument"),
        (["--config", str(corrupt)], "not valid YAML"),
        (["--config", str(tmp_path / "missing.yaml")], "cannot read config file"),
        (["--dataset", "digits", "--methods.wus.threshold", "-1"], "methods.wus.threshold: -1.0 is out of range"),
        (["--dataset", "digits", "--method", "warp_drive"], "methods.warp_drive: unknown method"),
        (["--dataset", "imagefolder", "--data-dir", str(tmp_path / "nowhere")], "nowhere"),
        (["--dataset", "digits", "--epochs", "1", "--out", str(blocker / "sub")], "--out"),
        (["--dataset", "digits", "--no-such-option", "1"], "unrecognized argument"),
    ]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, message in _bad_input_cases(tmp_path):
        proc = _cli(*args, "--device", "cpu", cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, proc.stderr)
        assert message in lines[0], (args, lines[0])
        assert "Traceback" not in proc.stderr


# ---- one override syntax for both CLIs -------------------------------------------------------------------


def _study_spec(argv):
    from wus_tune.study import build_parser, spec_from_args

    args, dotted = build_parser().parse_known_args(argv)
    args.dotted = dotted
    return spec_from_args(args).resolve().base


def _train_config(argv):
    from wus_tune._cli import ArgumentParser, add_set_option
    from wus_tune.train import add_config_options, config_from_args

    parser = ArgumentParser(prog="train")
    parser.add_argument("--config")
    add_set_option(parser)
    add_config_options(parser)
    args, unknown = parser.parse_known_args(argv)
    return config_from_args(args, unknown)


@pytest.mark.parametrize("argv", [
    ["--set", "model.width=0.5", "--set", "methods.wus.threshold=0.02", "--set", "data.data_dir=2024"],
    ["--model.width", "0.5", "--methods.wus.threshold=0.02", "--data.data_dir", "2024"],
    ["--set", "model.width=0.5", "--methods.wus.threshold", "0.02", "--set", "data.data_dir=2024"],
])  # fmt: skip
def test_study_and_train_read_the_same_overrides(argv):
    for config in (_study_spec(["--dataset", "digits", *argv]), _train_config(["--dataset", "digits", *argv])):
        assert config.model.width == 0.5 and config.methods["wus"]["threshold"] == 0.02
        assert config.data.data_dir == "2024"  # a path stays text


def test_method_options_in_both_clis():
    for config in (_study_spec(["--dataset", "digits", "--methods.approx_ops.sample_ratio", "0.4"]),
                   _train_config(["--dataset", "digits", "--set", "methods.approx_ops.sample_ratio=0.4"])):  # fmt: skip
        assert config.methods["approx_ops"]["sample_ratio"] == 0.4


@pytest.mark.parametrize("argv, message", [
    (["--set", "model.width"], "expected KEY=VALUE"),
    (["--model.width"], "--model.width: expected a value"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
])  # fmt: skip
def test_bad_overrides_are_usage_errors(argv, message):
    from wus_tune.errors import UsageError

    with pytest.raises(UsageError, match=message):
        _study_spec(argv)
