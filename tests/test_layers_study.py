"""The study side's imports run one way: the CLIs (``wus_tune.study``, ``wus_tune.pareto``) -> ``run_study``
and where trials run -> the trial machinery -> the front maths, which is pure Python.

Read from the source with ``ast``: an import inside a function or under ``TYPE_CHECKING`` counts as much as
one at the top, and ``from wus_tune import X`` is an import of the package's ``__init__`` (and of the
submodule ``X`` when there is one). The package-wide version of this test (the training core never imports
the study side) belongs to the Method redesign; this one covers the study side.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wus_tune"
FRONT = "wus_tune._study.front"
CLIS = {"wus_tune.study", "wus_tune.pareto", "wus_tune.train", "wus_tune._cli"}
# The search space and the method catalog close a cycle through the training core (config -> methods ->
# _study.space -> _study.catalog -> config): the Method redesign's to break, not counted here.
CORE_CYCLE = {"wus_tune._study.space", "wus_tune._study.catalog"}


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = module_names()


def imports_of(name: str) -> set[str]:
    """Every module ``name`` imports, anywhere in its source: ``wus_tune`` modules by their dotted name,
    other libraries by their top-level name."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {_known(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            out.add(_known(base))
            out |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    out.discard(name)
    return out


def _known(dotted: str) -> str:
    """The longest prefix of ``dotted`` that is a module of the package; else the top-level library."""
    if not dotted.startswith("wus_tune"):
        return dotted.split(".")[0]
    while dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted


def is_study_side(name: str) -> bool:
    return name in ("wus_tune.study", "wus_tune.pareto", "wus_tune.confirm", "wus_tune.production") or (
        name.startswith("wus_tune._study.") and name not in CORE_CYCLE
    )


def closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for dep in imports_of(todo.pop()):
            if dep in MODULES and dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_walk_sees_imports_inside_functions_and_under_type_checking():
    # guards the test itself: these imports exist only inside a function / under TYPE_CHECKING
    assert "wus_tune._study.ray_backend" in imports_of("wus_tune._study.launch")  # inside connect_ray
    assert "wus_tune._study.spec" in imports_of("wus_tune._study.tuned_plain")  # TYPE_CHECKING only
    assert "optuna" in imports_of("wus_tune._study.candidates")  # TYPE_CHECKING only


def test_the_front_maths_imports_no_optuna_mlflow_torch_or_cli():
    direct = imports_of(FRONT)
    for lib in ("optuna", "mlflow", "torch", "numpy"):
        assert lib not in direct, f"{FRONT} imports {lib}"
    # At import: the errors module only. Inside a function, the method catalog, to look up an objective a
    # method declares (lp_sphere's sparsity): only that needs the methods' code.
    assert module_level_imports(FRONT) == {"__future__", "collections", "dataclasses", "math", "typing", "wus_tune.errors"}
    assert direct - module_level_imports(FRONT) == {"statistics", "wus_tune._study.catalog"}
    reached = closure(FRONT)
    assert not (reached & CLIS)
    assert not any(name.startswith("wus_tune._study.") and name != "wus_tune._study.catalog" for name in reached)
    for name in reached:
        assert not ({"optuna", "mlflow"} & imports_of(name)), f"{FRONT} reaches {name}, which imports Optuna or MLflow"


def module_level_imports(name: str) -> set[str]:
    """What ``name`` imports at its top level (what importing it runs), as :func:`imports_of` names them."""
    tree = ast.parse(MODULES[name].read_text())
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {_known(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add(_known(node.module or ""))
    return out


def test_the_front_maths_runs_without_torch_optuna_mlflow_or_numpy():
    """Load the module with those libraries made unimportable, and the package's ``__init__`` (which
    imports the trainer) left out, then do the maths of a three-objective study."""
    code = f"""
import sys, types
for lib in ("torch", "optuna", "mlflow", "numpy"):
    sys.modules[lib] = None  # importing it now raises ImportError
pkg = types.ModuleType("wus_tune"); pkg.__path__ = [{str(PACKAGE)!r}]; sys.modules["wus_tune"] = pkg
from wus_tune._study.front import Candidate, analyse, hypervolume
cands = [Candidate(0, "COMPLETE", (0.9, 1.0, 5.0), role="baseline", uses_method=False),
         Candidate(1, "COMPLETE", (0.88, 0.6, 4.0)), Candidate(2, "COMPLETE", (0.91, 0.8, 6.0))]
a = analyse(cands, ["accuracy", "relative_time", "cost"])
assert a.front == [0, 1, 2] and a.hv_history[-1][1] > 0, a
assert a.select("knee").number in (0, 1, 2)
print(hypervolume([(1.0, 1.0, 1.0)], ["minimize"] * 3, (2.0, 2.0, 2.0)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1.0"


def test_the_study_side_has_no_import_cycle():
    nodes = sorted(n for n in MODULES if is_study_side(n))
    edges = {n: sorted(d for d in imports_of(n) if d in nodes) for n in nodes}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in edges[n]:
            if state.get(d) == 1:  # d is on the path that led here
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(d) :], n, d]))
            if d not in state:
                visit(d, path + [n])
        state[n] = 2

    for n in nodes:
        if n not in state:
            visit(n, [])


def test_no_module_of_the_package_imports_a_command_line():
    """The CLIs sit on top: ``run_study`` and the maths never reach back up to them."""
    for name in MODULES:
        if name in ("wus_tune.study", "wus_tune.pareto", "wus_tune.train") or not is_study_side(name):
            continue
        assert not (imports_of(name) & {"wus_tune.study", "wus_tune.pareto"}), f"{name} imports a study CLI"


def test_the_public_names_stay_importable_from_the_clis():
    import wus_tune.pareto as pareto
    import wus_tune.study as study

    for name in pareto.__all__:
        assert hasattr(pareto, name), name
    for name in ("OBJECTIVES", "objective_values", "candidate_from_trial", "load_candidates", "load_analysis",
                 "export_config", "format_table", "front_json", "with_feasibility", "pooled_baseline", "analyse"):  # fmt: skip
        assert hasattr(pareto, name), name
    for name in ("run_study", "StudyOutcome", "StudySpec", "initial_trials", "main", "build_parser", "spec_from_args"):
        assert hasattr(study, name), name
