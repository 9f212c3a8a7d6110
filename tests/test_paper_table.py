"""benchmarks/paper_table.py's arithmetic (the frontier at equal time, the paired columns) and its bad flags;
the script itself is not run here (its smoke run: ``--settings vgg11-cifar10 --quick``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("paper_table", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_frontier_is_linear_between_its_points_and_towards_chance_below(table):
    points = [(0.5, 0.6), (0.75, 0.7), (1.0, 0.8)]
    assert table.frontier_at(points, 0.625, 0.1) == pytest.approx(0.65)
    assert table.frontier_at(points, 0.25, 0.1) == pytest.approx(0.35)  # halfway from (0, chance) to (0.5, 0.6)
    assert table.frontier_at(points, 1.2, 0.1) == 0.8


def test_rows_are_paired_by_seed_and_placed_against_the_frontier(table):
    def run(acc, rel, wall, flops):
        return {"val_acc": acc, "relative_time": rel, "time_s": wall, "train_flops": flops}

    rows = {"baseline": [run(0.80, 1.0, 10.0, 100.0), run(0.82, 1.0, 20.0, 100.0)],
            "frontier 0.5 epochs": [run(0.60, 0.5, 5.0, 50.0), run(0.62, 0.5, 10.0, 50.0)],
            "info_batch (paper)": [run(0.79, 0.75, 8.0, 70.0), run(0.81, 0.75, 14.0, 70.0)]}  # fmt: skip
    out = {t["row"]: t for t in table.summarise(rows, chance=0.1)}
    ib = out["info_batch (paper)"]
    assert ib["acc_mean"] == pytest.approx(80.0) and ib["acc_sd"] == pytest.approx(1.414, abs=1e-3)
    assert ib["time_saved_relative"] == pytest.approx(0.25)
    assert ib["time_saved_wall"] == pytest.approx(1 - (0.8 + 0.7) / 2)  # per seed, then the mean
    assert ib["flops_saved"] == pytest.approx(0.30)
    assert ib["points_vs_frontier"] == pytest.approx(80.0 - 71.0)  # the frontier at 0.75: (61 + 81) / 2
    assert out["baseline"]["points_vs_frontier"] == pytest.approx(0.0)
    assert table.claim("best wus+lr (study)", "cifar100").startswith("35%")
    assert table.claim("info_batch (paper)", "cifar10").startswith("~40%")


@pytest.mark.parametrize("argv, message", [(["--quick", "--gpu"], "exclude each other"),
                                           (["--data", "/nonexistent/c10.tgz"], "does not exist"),
                                           (["--epochs", "1"], "--epochs: expected >= 2")])
def test_bad_flags_are_one_line_and_exit_2(table, capsys, argv, message):
    assert table.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["--rows", "nope"], ["--settings", "lenet-mnist"]])
def test_an_unknown_row_or_setting_is_one_line_and_exit_2(table, capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        table.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid choice" in err and err.count("\n") == 1
