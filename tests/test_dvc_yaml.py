"""dvc.yaml lists, as each stage's dependencies, exactly the stages/ modules its command imports, directly or not, at
the top of a module or inside a function: a module missing from the list would let a stage's code change without DVC
rerunning it, and a module listed but never imported reruns it for nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def imported_modules(path: Path) -> set[str]:
    """The stages/ modules a module's source imports anywhere in it (relative or as `stages.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("stages."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("stages."))
    return found


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported_modules(REPO / "stages" / f"{name}.py"))
    return seen


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_depends_on_exactly_the_modules_it_imports(stage):
    command = STAGES[stage]["cmd"]
    module = re.match(r"python -m stages\.(\w+) ", command).group(1)
    listed = {dep for dep in STAGES[stage]["deps"] if dep.startswith("stages/") and dep.endswith(".py")}
    assert listed == {f"stages/{name}.py" for name in closure(module)}


def test_the_import_scan_sees_imports_inside_functions():
    assert {"reference", "remap_weights", "original"} <= closure("export")
