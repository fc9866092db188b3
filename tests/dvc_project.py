"""Temporary copies of the project as git + DVC repositories, and `dvc` run inside them, for the end-to-end tests.

    template = reproduced_template(tmp_path_factory)         # built once per test session: clipseg-tiny reproduced
    project = clone(template, tmp_path / "work", with_cache=True)
    result = project.repro()
    assert result.ran == [] and "download@clipseg-tiny" in result.skipped

Every command runs with a timeout, in its own process group (killed whole on timeout), with the interpreter running
the tests first on PATH (the stages' `python -m stages.<name>` then resolves to it and finds the copy's ./stages and ./clipseg_pipeline), and
with an environment that keeps all traffic on 127.0.0.1: no proxies, no AWS metadata or profile lookups, Hugging Face
offline, and no user or system git/DVC configuration.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.pipeline_fixture import edited_params

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What a clone of the project needs to run the pipeline: code, pipeline, settings, the DVC config (not its cache) and
# the committed synthetic sources.
PROJECT_FILES = (
    "clipseg_pipeline",
    "stages",
    "tools",
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    ".gitignore",
    ".dvcignore",
    ".dvc/config",
    ".dvc/.gitignore",
    "data/synthetic",
)
VARIANT = "clipseg-tiny"
STAGES = ("download", "remap-weights", "build-model", "verify-outputs", "verify-usage", "export", "export-onnx")
# Where the pipeline writes, per variant (plus dvc.lock): what "the same bytes" is about.
OUTPUT_DIRS = ("data/{v}", "outputs/{v}", "metrics/{v}", "reports/{v}")
# A cold `dvc repro` of one tiny variant takes about a minute on 2 cores, nearly all of it importing torch and
# transformers in each stage; these bounds only stop a hung run.
REPRO_TIMEOUT_S = 900
COMMAND_TIMEOUT_S = 300
LOCALHOST = "127.0.0.1"

_RAN = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping", re.MULTILINE)
_RESTORED = re.compile(r"^Stage '([^']+)' is cached - skipping run, checking out outputs", re.MULTILINE)
_templates: dict[Path, Path] = {}


def stage_names(variant: str, stages: Iterable[str] = STAGES) -> list[str]:
    """DVC's names for a variant's matrix stages, e.g. `verify-outputs@clipseg-tiny`."""
    return [f"{stage}@{variant}" for stage in stages]


@dataclass(frozen=True)
class Repro:
    """Which stages a `dvc repro` ran, skipped as unchanged, or restored from the run cache, in order."""

    output: str
    ran: list[str]
    skipped: list[str]
    restored: list[str]

    @classmethod
    def parse(cls, output: str) -> Repro:
        return cls(output, _RAN.findall(output), _SKIPPED.findall(output), _RESTORED.findall(output))


class CommandError(AssertionError):
    """A command in a temporary project failed or timed out; the message carries its output."""


def isolated_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every command runs with: see the module docstring."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith(("AWS_", "DVC_", "GIT_", "HF_"))}
    env.pop("PYTHONPATH", None)
    config = home / "config"
    config.mkdir(parents=True, exist_ok=True)
    env |= {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)]),
        "NO_PROXY": f"{LOCALHOST},localhost",
        "no_proxy": f"{LOCALHOST},localhost",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "DVC_GLOBAL_CONFIG_DIR": str(config / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(config / "dvc-system"),
        "DVC_SITE_CACHE_DIR": str(config / "dvc-site-cache"),
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(config / "huggingface"),
        "TRANSFORMERS_OFFLINE": "1",
        # S3 remotes: fixed test credentials, no instance metadata probes, no profile files.
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(config / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(config / "aws-credentials"),
    }
    return env | (extra or {})


def run(args: list[str], cwd: Path, env: dict[str, str], timeout_s: float, *, stderr: bool = True) -> str:
    """Run a command; return its output (with stderr unless `stderr` is False), or raise CommandError with all of it.

    A timeout kills the command's whole process group (DVC and the stage it is running)."""
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if stderr else subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        output, errors = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, errors = proc.communicate()
        raise CommandError(f"`{' '.join(args)}` in {cwd} did not finish within {timeout_s} s; output so far:\n{output}{errors or ''}") from None
    if proc.returncode:
        raise CommandError(f"`{' '.join(args)}` in {cwd} failed with exit code {proc.returncode}:\n{output}{errors or ''}")
    return output


class Project:
    """A temporary git + DVC repository holding a copy of the project."""

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.env = env or isolated_env(self.root.parent / f".{self.root.name}-home")

    def dvc(self, *args: str, timeout_s: float = COMMAND_TIMEOUT_S, env: dict[str, str] | None = None, stderr: bool = True) -> str:
        return run([sys.executable, "-m", "dvc", *args], self.root, self.env | (env or {}), timeout_s, stderr=stderr)

    def git(self, *args: str) -> str:
        return run(["git", *args], self.root, self.env, COMMAND_TIMEOUT_S)

    def repro(self, *args: str, env: dict[str, str] | None = None) -> Repro:
        return Repro.parse(self.dvc("repro", *args, timeout_s=REPRO_TIMEOUT_S, env=env))

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)

    def params(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "params.yaml").read_text(encoding="utf-8"))

    def edit_params(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Load params.yaml, let `change` modify it in place, write it back (comments are not kept)."""
        edited_params(self.root / "params.yaml", change)

    def digests(self, variant: str = VARIANT) -> dict[str, str]:
        """sha256 of dvc.lock and of every file the pipeline wrote for `variant`, by path relative to the root."""
        files = [self.root / "dvc.lock"]
        for pattern in OUTPUT_DIRS:
            files += sorted(p for p in (self.root / pattern.format(v=variant)).rglob("*") if p.is_file())
        return {p.relative_to(self.root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def new_project(root: Path) -> Project:
    """Copy the project's working tree (code, pipeline, settings, synthetic sources) to `root`, git init, commit."""
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        source, dest = PROJECT_ROOT / name, root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, dest)
    project = Project(root)
    project.git("init", "-q", "-b", "main")
    project.git("config", "user.name", "clipseg-pipeline tests")
    project.git("config", "user.email", "tests@clipseg-pipeline.invalid")
    project.commit("copy of the project")
    return project


def clone(source: Project, root: Path, *, with_cache: bool = False) -> Project:
    """`git clone` a temporary project. `with_cache` copies its DVC cache too and checks the outputs out, so the clone
    starts where `source` stands; without it the clone is cold, as a fresh CI checkout is."""
    run(["git", "clone", "-q", str(source.root), str(root)], root.parent, source.env, COMMAND_TIMEOUT_S)
    project = Project(root)
    project.git("config", "user.name", "clipseg-pipeline tests")
    project.git("config", "user.email", "tests@clipseg-pipeline.invalid")
    if with_cache:
        shutil.copytree(source.root / ".dvc" / "cache", root / ".dvc" / "cache")
        project.dvc("checkout")
    return project


def reproduced_template(tmp_path_factory) -> Project:
    """A copy of the project with the default variant reproduced and everything committed: built once per test
    session (a cold run takes about a minute) and only ever cloned, never modified, by the tests."""
    base = tmp_path_factory.getbasetemp()
    if base not in _templates:
        project = new_project(tmp_path_factory.mktemp("template") / "clipseg-pipeline")
        result = project.repro()
        if result.ran != stage_names(VARIANT):
            raise CommandError(f"a cold `dvc repro` ran {result.ran}, expected {stage_names(VARIANT)}:\n{result.output}")
        project.commit("reproduce the default variant")
        _templates[base] = project.root
    return Project(_templates[base])
