"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_own_training_loop_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    loop = next(b for b in blocks if "WUSController(" in b)
    exec(compile(loop, "README.md", "exec"), {})
    assert "wus/skip_windows" in capsys.readouterr().out


def test_own_model_and_data_example_runs(study_dir, capsys, one_torch_thread):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "run_study(model=" in b)
    exec(compile(example, "README.md", "exec"), {})
    kwargs, val_acc, num_params = capsys.readouterr().out.strip().splitlines()[-1].rsplit(" ", 2)
    assert float(val_acc) > 0.7 and int(num_params) == (8 * 32 + 32) + (32 * 2 + 2)
    assert (study_dir / "studies" / "my-model" / "best_config.yaml").is_file()


def test_readme_has_exactly_two_setup_commands():
    setup = README.read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in setup.splitlines() if line.startswith("    ")]
    assert commands == ['pip install -e ".[test]"', "python -m pytest"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert all(c in ci for c in commands)
