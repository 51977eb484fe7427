"""The layer rule, read from the code's own imports (``ast``; nothing is imported or run).

The library is layered bottom to top; :data:`LAYERS` lists every module of ``oracle`` in that
order. A module imports only modules listed *below* it (``spec`` lies below all of
``oracle`` and never imports it). An import inside a function is allowed only in a door
(:data:`DOORS`) and only tagged ``# lazy: start-up`` on its line: anything else hides an
upward dependency. ``TYPE_CHECKING`` imports count like any other. The naive second-opinion
models in ``tests/`` import nothing of ``oracle``: they would otherwise share what they check.
``docs/architecture.md`` explains the layers; a new module is added to :data:`LAYERS` where it
belongs, which this test enforces.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Bottom to top. A module may import only modules before it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("adapters", ("oracle.adapters", "oracle.adapters.gemm", "oracle.adapters.torch_io")),
    ("model", ("oracle.model", "oracle.model.arithmetic", "oracle.model.kernels",
               "oracle.model.numerics", "oracle.model.reference", "oracle.model.routing",
               "oracle.model.modular")),
    ("judge", ("oracle.judge", "oracle.judge.bounds", "oracle.judge.rowtest",
               "oracle.judge.verdict", "oracle.judge.placed", "oracle.judge.modular")),
    ("config", ("oracle.config", "oracle.config.settings", "oracle.config.options")),
    ("files", ("oracle.files", "oracle.files.atomic", "oracle.files.counterexample")),
    ("explain", ("oracle.explain", "oracle.explain.diagnose", "oracle.explain.stages",
                 "oracle.explain.plot", "oracle.explain.fit")),
    ("check", ("oracle.check", "oracle.check.loading", "oracle.check.hunt",
               "oracle.check.isolation", "oracle.check.reduction", "oracle.check.harness",
               "oracle.check.placed_search", "oracle.check.modular",
               "oracle.check.conformance", "oracle.check.distributed", "oracle.check.capture")),
    ("doors", ("oracle.cli", "oracle.pytest_plugin", "oracle", "oracle.__main__")),
)
DOORS = frozenset(LAYERS[-1][1])
LAZY_TAG = "# lazy: start-up"
#: Second-opinion models: written from the contract, they must not import the model.
NAIVE_MODELS = ("tests/naive_reference.py", "tests/naive_vllm.py")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the project module imported
    line: int
    in_function: bool
    tagged: bool


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(source: str, module: str, known: frozenset[str]) -> list[Import]:
    """Every import of a project module (one of ``known``, or ``spec``/``spec.*``) in
    ``source``; ``from pkg import name`` counts as ``pkg.name`` where that is a module."""
    tree = ast.parse(source)
    lines = source.splitlines()
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                targets = [f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in known
                           else child.module for a in child.names]
            for target in dict.fromkeys(targets):
                if target.split(".")[0] in ("oracle", "spec"):
                    found.append(Import(module, target, child.lineno, in_function,
                                        LAZY_TAG in lines[child.lineno - 1]))
            visit(child, inner)

    visit(tree, False)
    return found


def order() -> dict[str, int]:
    return {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods} | {
        m: -1 for m in _modules("spec")}


def _modules(package: str) -> list[str]:
    return sorted(module_name(p) for p in (ROOT / package).rglob("*.py"))


def violations(imports: list[Import], rank: dict[str, int]) -> list[str]:
    """Each import that breaks the layer rule, in words."""
    position = {m: (rank[m], i) for i, m in enumerate(
        m for _, mods in LAYERS for m in mods)} | {m: (-1, 0) for m in rank if rank[m] < 0}
    out = []
    for imp in imports:
        where = f"{imp.module}:{imp.line} imports {imp.target}"
        if imp.module.startswith("spec"):
            if imp.target.startswith("oracle"):
                out.append(f"{where}: spec never imports oracle")
            continue
        if imp.target.split(".")[0] == "spec":
            below = True
        elif imp.target not in position:
            out.append(f"{where}: {imp.target} is not in LAYERS")
            continue
        else:
            below = position[imp.target] < position[imp.module]
        if not below:
            out.append(f"{where}: an upward import (its layer lies above or beside it)")
        if imp.in_function and not (imp.module in DOORS and imp.tagged):
            out.append(f"{where}: a function-level import outside a door or untagged "
                       f"({LAZY_TAG!r})")
    return out


def tree_imports() -> list[Import]:
    known = frozenset(m for _, mods in LAYERS for m in mods) | frozenset(_modules("spec"))
    return [imp for package in ("spec", "oracle") for path in sorted((ROOT / package).rglob("*.py"))
            for imp in project_imports(path.read_text(), module_name(path), known)]


def test_every_oracle_module_has_a_layer() -> None:
    listed = {m for _, mods in LAYERS for m in mods}
    assert set(_modules("oracle")) == listed, (
        f"not in LAYERS: {sorted(set(_modules('oracle')) - listed)}; "
        f"listed but missing: {sorted(listed - set(_modules('oracle')))}")


def test_the_tree_keeps_the_layer_rule() -> None:
    assert violations(tree_imports(), order()) == []


def test_spec_import_graph_has_no_circle() -> None:
    graph: dict[str, set[str]] = {}
    for imp in tree_imports():
        if imp.module.startswith("spec") and imp.target in graph.keys() | set(_modules("spec")):
            graph.setdefault(imp.module, set()).add(imp.target)
    done: set[str] = set()

    def walk(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import circle: {' -> '.join((*path, node))}"
        if node in done:
            return
        for nxt in graph.get(node, ()):
            if nxt != "spec":  # the package re-exports; its modules never import it back
                walk(nxt, (*path, node))
        done.add(node)

    for node in list(graph):
        walk(node, ())


@pytest.mark.parametrize("planted, expected", [
    # judge -> check: upward
    ("from oracle.check.harness import evaluate\n", "an upward import"),
    # model -> explain inside a function: upward and lazy
    ("def f():\n    from oracle.explain.diagnose import diagnose\n", "function-level"),
    # a downward import, but lazy outside a door
    ("def f():\n    from oracle.model.reference import run  # lazy: start-up\n",
     "function-level"),
    ("import oracle.nowhere\n", "not in LAYERS"),
])
def test_a_planted_import_is_caught(planted: str, expected: str) -> None:
    known = frozenset(m for _, mods in LAYERS for m in mods)
    module = "oracle.model.numerics" if "explain" in planted else "oracle.judge.bounds"
    found = violations(project_imports(planted, module, known), order())
    assert len(found) >= 1 and any(expected in v for v in found), found


def test_the_rule_allows_downward_and_tagged_door_imports() -> None:
    known = frozenset(m for _, mods in LAYERS for m in mods)
    assert violations(project_imports(
        "from oracle.model.reference import run\nfrom spec import Problem\n",
        "oracle.judge.verdict", known), order()) == []
    assert violations(project_imports(
        "def main():\n    from oracle.explain.diagnose import diagnose  # lazy: start-up\n",
        "oracle.cli", known), order()) == []
    assert violations(project_imports("from oracle.cli import main\n", "spec.problem", known),
                      order()) == ["spec.problem:1 imports oracle.cli: spec never imports oracle"]


@pytest.mark.parametrize("path", NAIVE_MODELS)
def test_naive_models_import_nothing_of_oracle(path: str) -> None:
    source = (ROOT / path).read_text()
    assert not [imp for imp in project_imports(source, "naive", frozenset())
                if imp.target.startswith("oracle")]


def test_a_naive_model_importing_the_model_is_caught() -> None:
    found = project_imports("from oracle.model.reference import run\n", "naive", frozenset())
    assert [imp.target for imp in found] == ["oracle.model.reference"]
