"""DVC experiments on the synthetic variant: `dvc exp run -S` sets params, `dvc exp show` compares the runs.

Two experiments start from the reproduced template, each in a temporary directory (`--temp`) so they do not stack:
one asks for other prompts (reruns verify-outputs, verify-usage and export), one exports in float16 (reruns export only). Then
`dvc exp show --json` must list both with their settings and metrics, and the params.yaml DVC rewrote for each must
still be a valid params file with exactly the requested changes.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.dvc_project import COMMAND_TIMEOUT_S, REPRO_TIMEOUT_S, VARIANT, Project, Repro, clone, reproduced_template, run, stage_names

pytestmark = pytest.mark.slow

PARAMS = "params.yaml"
VERIFY_METRICS = f"metrics/{VARIANT}/verify.json"
EXPORT_METRICS = f"metrics/{VARIANT}/export.json"
# name -> the -S settings; `variants` is set too, as a user picking models with `dvc exp run` does.
EXPERIMENTS = {
    "dog-prompt": [f"variants=[{VARIANT}]", f"models.{VARIANT}.verify.prompts=[a dog]"],
    "float16-export": [f"models.{VARIANT}.export.dtype=float16"],
}


@dataclass(frozen=True)
class Experiments:
    project: Project
    runs: dict[str, Repro]
    shown: dict[str, dict[str, Any]]  # experiment name (and the baseline's branch) -> its `dvc exp show` entry


def shown_by_name(show: list[dict]) -> dict[str, dict[str, Any]]:
    """`dvc exp show --json` entries by name: the baseline commit and each experiment run on it."""
    entries = {}
    for baseline in show:
        if baseline.get("name"):
            entries[baseline["name"]] = baseline
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                entries[rev["name"]] = rev
    return entries


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> Experiments:
    project = clone(reproduced_template(tmp_path_factory), tmp_path_factory.mktemp("experiments") / "repo", with_cache=True)
    runs = {}
    for name, settings in EXPERIMENTS.items():
        args = [arg for setting in settings for arg in ("-S", setting)]
        runs[name] = Repro.parse(project.dvc("exp", "run", "--temp", "-n", name, *args, timeout_s=REPRO_TIMEOUT_S))
    show = json.loads(project.dvc("exp", "show", "--json", stderr=False))
    return Experiments(project, runs, shown_by_name(show))


def params_of(entry: dict) -> dict:
    return entry["data"]["params"][PARAMS]["data"]


def metrics_of(entry: dict, path: str) -> dict:
    return entry["data"]["metrics"][path]["data"]


def test_each_experiment_runs_only_the_stages_its_setting_concerns(experiments):
    assert sorted(experiments.runs["dog-prompt"].ran) == sorted(stage_names(VARIANT, ("verify-outputs", "verify-usage", "export", "export-onnx")))
    # export-onnx makes its graphs from build-model's float32 weights and writes its own side files: export's dtype
    # does not concern it.
    assert experiments.runs["float16-export"].ran == stage_names(VARIANT, ("export",))


def test_exp_show_lists_both_experiments_with_their_settings_and_metrics(experiments):
    shown = experiments.shown
    assert {"main", *EXPERIMENTS} <= shown.keys()
    baseline, dog, half = shown["main"], shown["dog-prompt"], shown["float16-export"]

    assert params_of(dog)["models"][VARIANT]["verify"]["prompts"] == ["a dog"]
    assert metrics_of(dog, VERIFY_METRICS)["prompts"] == 1 and metrics_of(dog, VERIFY_METRICS)["passed"]
    assert params_of(half)["models"][VARIANT]["export"]["dtype"] == "float16"
    assert metrics_of(half, EXPORT_METRICS)["passed"] and metrics_of(half, EXPORT_METRICS)["atol"] == 0.05
    # A float16 file is about half the float32 one.
    assert metrics_of(half, EXPORT_METRICS)["bytes"] < 0.75 * metrics_of(baseline, EXPORT_METRICS)["bytes"]
    # The baseline keeps its own settings and metrics.
    assert metrics_of(baseline, VERIFY_METRICS)["prompts"] == len(params_of(baseline)["models"][VARIANT]["verify"]["prompts"])
    assert metrics_of(baseline, EXPORT_METRICS)["atol"] == 1e-4


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_params_rewritten_by_exp_run_hold_exactly_the_requested_changes(experiments, name, tmp_path):
    # DVC rewrites the whole params.yaml (block-style lists, long lines folded, null written as nothing): the values
    # must be the baseline's with the -S settings applied, the comments kept, and the stages must accept the file.
    project = experiments.project
    text = project.git("show", f"{experiments.shown[name]['rev']}:{PARAMS}")
    want = copy.deepcopy(project.params())
    for setting in EXPERIMENTS[name]:
        key, value = setting.split("=", 1)
        *parents, leaf = key.split(".")
        node = want
        for parent in parents:
            node = node[parent]
        node[leaf] = yaml.safe_load(value)
    assert yaml.safe_load(text) == want
    assert "# Which variants `dvc repro` builds." in text

    rewritten = tmp_path / PARAMS
    rewritten.write_text(text, encoding="utf-8")
    check = f"from pathlib import Path; from clipseg_pipeline.params import load; print(load(Path({str(rewritten)!r})).variants)"
    assert run([sys.executable, "-c", check], project.root, project.env, COMMAND_TIMEOUT_S).strip() == f"('{VARIANT}',)"
