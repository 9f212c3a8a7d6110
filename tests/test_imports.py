"""The package's imports run in one direction: no cycle, and the training core never imports the study side.

Every ``import`` counts, also inside a function and under ``if TYPE_CHECKING:`` (it names a dependency all
the same); ``from wus_tune import X`` is an import of ``wus_tune/__init__.py``, ``from wus_tune.pkg import
X`` of the package's ``__init__`` (and of ``pkg.X`` when that is a module). Read with ``ast``, nothing is
imported. And no code outside ``wus_tune/methods/wus/`` names WUS: only the public re-exports of
``wus_tune/__init__.py``, the config migration of older spellings, and prose (docstrings, comments) do.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import wus_tune

ROOT = Path(wus_tune.__file__).parent
# The training core: what fit() needs. The methods' training parts are every module under methods/ but
# their study declarations (methods/<name>/study.py).
CORE = ("config", "data", "models", "plugins", "registry", "factories", "provenance", "prepare", "layers", "timing",
        "run_state", "trainer", "methods")  # fmt: skip
STUDY_SIDE = ("study", "_study", "pareto", "confirm")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in its file."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _in(name: str, areas: tuple[str, ...]) -> bool:
    return any(name == f"wus_tune.{a}" or name.startswith(f"wus_tune.{a}.") for a in areas)


def _is_core(name: str) -> bool:
    return _in(name, CORE) and not name.endswith(".study") or name == "wus_tune.methods.study"


def test_the_walker_sees_imports_in_functions_and_under_type_checking():
    assert "wus_tune.methods" in GRAPH["wus_tune.config"]  # inside TrainConfig.validate
    assert "wus_tune._study.space" in GRAPH["wus_tune.methods.wus.study"]
    assert "wus_tune.trainer" in GRAPH["wus_tune._study.objective"]  # under TYPE_CHECKING and in __init__
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_the_training_core_never_imports_the_study_side():
    core = sorted(name for name in MODULES if _is_core(name))
    assert "wus_tune.trainer" in core and "wus_tune.methods.wus.method" in core and "wus_tune.methods.wus.study" not in core
    offenders = []
    for start in core:
        seen, todo = {start}, [start]
        while todo:
            for nxt in GRAPH[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        offenders += [f"{start} -> {m}" for m in sorted(seen) if _in(m, STUDY_SIDE)]
    assert offenders == []


# ---- no code outside methods/wus/ names WUS ------------------------------------------------------------

WORD = re.compile(r"\bwus\b")  # the word, as grep -w finds it: not wus_tune, but methods.wus, "wus", wus/...


def code_naming_wus(path: Path) -> list[str]:
    """Lines where ``path`` names WUS outside its docstrings and comments."""
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add((first.lineno, first.col_offset))
    return [f"{path.relative_to(ROOT.parent)}:{tok.start[0]}: {tok.line.strip()}"
            for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type != tokenize.COMMENT and not (tok.type == tokenize.STRING and tok.start in docstrings)
            and WORD.search(tok.string)]  # fmt: skip


def test_no_code_outside_the_wus_package_names_wus():
    allowed = {ROOT / "migration.py"}  # the old spellings it reads
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if path in allowed or (ROOT / "methods" / "wus") in path.parents:
            continue
        lines = code_naming_wus(path)
        if path == ROOT / "__init__.py":  # the public names users import for their own loop
            lines = [line for line in lines if "from wus_tune.methods.wus import" not in line]
        offenders += lines
    assert offenders == []
    assert code_naming_wus(ROOT / "migration.py")  # the check sees code where it is
