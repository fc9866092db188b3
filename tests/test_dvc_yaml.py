"""dvc.yaml lists, as each stage's dependencies, exactly this project's modules its command imports, directly or not,
at the top of a module or inside a function: a module missing from the list would let a stage's code change without
DVC rerunning it, and a module listed but never imported reruns it for nothing. No stage imports another stage. And
each stage's --help describes the command line dvc.yaml gives it."""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
PACKAGES = ("clipseg_pipeline", "stages", "tools")


def imported_modules(path: Path) -> set[str]:
    """This project's modules (as paths like clipseg_pipeline/params.py) a module imports anywhere in it."""
    package = path.parent.name
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found.update(f"{package}/{name.split('.')[0]}.py" for name in names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            top, *rest = node.module.split(".")
            names = rest[:1] or [alias.name for alias in node.names]
            found.update(f"{top}/{name}.py" for name in names)
        elif isinstance(node, ast.Import):
            found.update("/".join(alias.name.split(".")[:2]) + ".py" for alias in node.names
                         if alias.name.split(".")[0] in PACKAGES and "." in alias.name)
    return {name for name in found if (REPO / name).is_file()}


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported_modules(REPO / name))
    return seen


def command_module(stage: str) -> str:
    return "stages/{}.py".format(re.match(r"python -m stages\.(\w+) ", STAGES[stage]["cmd"]).group(1))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_depends_on_exactly_the_modules_it_imports(stage):
    listed = {dep for dep in STAGES[stage]["deps"] if dep.endswith(".py")}
    assert listed == closure(command_module(stage))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_imports_another_stage_or_a_tool(stage):
    others = {name for name in closure(command_module(stage)) if not name.startswith("clipseg_pipeline/")}
    assert others == {command_module(stage)}


def test_the_import_scan_sees_imports_inside_functions():
    assert {"clipseg_pipeline/reference.py", "clipseg_pipeline/name_map.py"} <= closure("stages/export.py")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stages_help_names_it_and_every_option_its_command_passes(stage):
    name = Path(command_module(stage)).stem
    module = importlib.import_module(f"stages.{name}")
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = out.getvalue()
    assert text.startswith(f"usage: python -m stages.{name} ") and module.__doc__.splitlines()[0] in " ".join(text.split())
    passed = re.findall(r"(?<!\S)--[a-z][a-z-]*", STAGES[stage]["cmd"])
    assert passed and all(re.search(rf"^  {option} ", text, re.M) for option in passed), (passed, text)
