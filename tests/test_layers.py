"""Imports run one way. The code's imports, read with ``ast`` (imports inside functions and under
``TYPE_CHECKING`` included), form no circle between modules, and no module imports a package that
the declared order puts above it:

    apps -> fedprompt -> {prompt_modules, optimizers}
    inside fedprompt: foundation <- configuration <- {data, federation} <- training <- tasks
                      <- execution <- {flower, serving, api, cli}

The configuration layer is ``fedprompt.config``, every package's ``config`` module and the
cross-section checks (``fedprompt.config_checks``): plain pydantic models and checks that any layer
may read, and that import nothing but each other and the foundation (so ``fedprompt.config`` loads
without torch).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedprompt", "prompt_modules", "optimizers", "apps")
FOUNDATION = {
    "fedprompt.errors",
    "fedprompt.files",
    "fedprompt.seeding",
    "fedprompt.config_base",
    "fedprompt.config_loading",
}
ENTRY = {"fedprompt", "fedprompt.api", "fedprompt.cli"}

BELOW_TRAINING = {"foundation", "configuration", "data", "federation", "optimizers", "prompt_modules"}
ALLOWED: dict[str, set[str]] = {
    "optimizers": set(),
    "prompt_modules": set(),
    "foundation": set(),
    "configuration": {"foundation"},
    "data": {"foundation", "configuration"},
    "federation": {"foundation", "configuration", "optimizers"},
    "training": BELOW_TRAINING - {"data"},
    "tasks": BELOW_TRAINING | {"training"},
    "execution": BELOW_TRAINING | {"training", "tasks"},
    "serving": {"foundation", "configuration", "prompt_modules"},
    "flower": BELOW_TRAINING | {"training", "tasks", "execution"},
    "entry": BELOW_TRAINING | {"training", "tasks", "execution", "flower", "serving"},
    "apps": BELOW_TRAINING | {"training", "tasks", "execution", "flower", "serving", "entry"},
}
"""Layer -> the other layers it may import (a layer may always import itself)."""


def layer_of(module: str) -> str:
    top = module.split(".")[0]
    if top != "fedprompt":
        return top
    if module in FOUNDATION:
        return "foundation"
    if module in ENTRY:
        return "entry"
    if module == "fedprompt.config" or module.endswith(".config") or _is_config_check(module):
        return "configuration"
    return module.split(".")[1]


def _is_config_check(module: str) -> bool:
    """``fedprompt.config_checks`` and its modules: the checks of one section against another."""
    return module == "fedprompt.config_checks" or module.startswith("fedprompt.config_checks.")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "template" not in path.relative_to(ROOT).parts:  # a Flower app users copy, not a module
                modules[module_name(path)] = path
    return modules


MODULES = source_modules()


def imports_of(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import of our packages in ``path``, wherever it stands;
    ``from package import name`` counts as an import of ``package.name`` when that is a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                yield node.lineno, _known(target)


def _known(target: str) -> str:
    """The longest prefix of ``target`` that is one of our modules (``a.b.name`` -> ``a.b``)."""
    while target not in MODULES and "." in target:
        target = target.rpartition(".")[0]
    return target


GRAPH = {module: sorted(set(imports_of(module, path))) for module, path in MODULES.items()}


def test_every_import_goes_down_the_declared_order():
    wrong = []
    for module, imports in GRAPH.items():
        own = layer_of(module)
        for line, target in imports:
            other = layer_of(target)
            if other != own and other not in ALLOWED[own]:
                wrong.append(
                    f"{MODULES[module].relative_to(ROOT)}:{line} imports {target} ({other}); "
                    f"{own} may import {sorted(ALLOWED[own]) or 'nothing of ours'}"
                )
    assert not wrong, "imports against the declared order of packages:\n" + "\n".join(wrong)


def test_no_module_imports_itself_through_a_circle():
    """Tarjan's strongly connected components of the module graph: each must be one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for _, target in GRAPH.get(node, []):
            if target == node:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(GRAPH)))
    for module in GRAPH:
        if module not in index:
            visit(module)
    described = []
    for circle in circles:
        edges = [
            f"  {MODULES[a].relative_to(ROOT)}:{line} imports {b}"
            for a in circle
            for line, b in GRAPH[a]
            if b in circle and b != a
        ]
        described.append(" <-> ".join(circle) + "\n" + "\n".join(edges))
    assert not circles, "import circles:\n" + "\n".join(described)


def test_the_checks_catch_what_they_are_for():
    """The rules are not vacuous: the graph holds the imports the layers are known to make."""
    assert "fedprompt.tasks.registry" in {target for _, target in GRAPH["fedprompt.api"]}
    assert layer_of("fedprompt.federation.strategies.config") == "configuration"
    assert layer_of("fedprompt.config_checks.privacy") == "configuration"
    assert layer_of("fedprompt.federation.server") == "federation"
    assert "training" not in ALLOWED["federation"] and "fedprompt" not in ALLOWED["prompt_modules"]
    inside_functions = {t for _, t in GRAPH["fedprompt.cli"]}
    assert "fedprompt.serving.launch" in inside_functions  # imported inside a function of the cli


@pytest.mark.parametrize("module", ["fedprompt.config", "fedprompt.federation.strategies.config"])
def test_the_configuration_imports_without_torch(module):
    heavy = "('torch', 'datasets', 'open_clip', 'transformers')"
    code = f"import sys, {module}; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
