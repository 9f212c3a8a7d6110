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


def test_readme_has_exactly_two_setup_commands():
    setup = README.read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in setup.splitlines() if line.startswith("    ")]
    assert commands == ['pip install -e ".[test]"', "python -m pytest"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert all(c in ci for c in commands)
