"""The clipseg-tiny pipeline run once per test session in a temporary folder, for tests that need its outputs.

The folder is laid out like the repository (data/, outputs/, reports/) and every stage's main() is run on the
committed synthetic sources, with a params file pointing at them, so no test depends on what `dvc repro` left in the
working tree. Use it from a test module with

    from tests.pipeline_fixture import tiny_pipeline  # noqa: F401  (a pytest fixture)

Every module that imports it shares one run (about 30 s): the result is cached here, not per module.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VARIANT = "clipseg-tiny"
SYNTHETIC = REPO / "data" / "synthetic" / VARIANT


@dataclass(frozen=True)
class TinyPipeline:
    """Where one run of the tiny pipeline left its files."""

    root: Path
    params: Path

    @property
    def original(self) -> Path:
        return self.root / "data" / VARIANT

    @property
    def model(self) -> Path:
        return self.root / "outputs" / VARIANT / "model"

    @property
    def reference(self) -> Path:
        return self.root / "outputs" / VARIANT / "verify" / "reference.safetensors"

    @property
    def export(self) -> Path:
        return self.root / "outputs" / VARIANT / "hf"

    @property
    def onnx(self) -> Path:
        return self.root / "outputs" / VARIANT / "onnx"

    def onnx_argv(self, out: Path, report: Path, params: Path | None = None) -> list[str]:
        """stages.export_onnx's command line, as dvc.yaml writes it, to export this run's model again elsewhere."""
        return [
            "--variant", VARIANT, "--params", str(params or self.params), "--model", str(self.model), "--original", str(self.original),
            "--reference", str(self.reference), "--verify-report", str(self.report("verify")), "--out", str(out),
            "--metrics", str(report.with_name(f"{report.stem}.metrics.json")), "--report", str(report),
        ]

    @property
    def prompts(self) -> list[str]:
        """The prompts verify-outputs ran the models on (the reference's token ids are theirs)."""
        return yaml.safe_load(self.params.read_text(encoding="utf-8"))["models"][VARIANT]["verify"]["prompts"]

    def report(self, stage: str) -> Path:
        return self.root / "reports" / VARIANT / f"{stage}.json"

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / VARIANT / f"{stage}.json"

    def export_argv(self, out: Path, report: Path, params: Path | None = None) -> list[str]:
        """stages.export's command line, as dvc.yaml writes it, to export this run's model again elsewhere."""
        return [
            "--variant", VARIANT, "--params", str(params or self.params),
            "--model", str(self.model), "--original", str(self.original), "--reference", str(self.reference),
            "--download-report", str(self.report("download")), "--verify-report", str(self.report("verify")),
            "--out", str(out), "--metrics", str(report.with_name(f"{report.stem}.metrics.json")), "--report", str(report),
        ]


def edited_params(source: Path, change: Callable[[dict], None], target: Path | None = None) -> Path:
    """The params file `source` with `change` applied to its data (in place), written to `target` (by default back to
    `source`); comments are not kept."""
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    change(data)
    target = source if target is None else target
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return target


def write_params(path: Path, *, dtype: str = "float32", sources: dict | None = None) -> Path:
    """The repository's params.yaml building only clipseg-tiny, its sources read in place from data/synthetic/.

    `sources` replaces the variant's sources (e.g. to take the tokenizer from CLIP's bpe gz instead).
    """

    def tiny_only(data: dict) -> None:
        data["variants"] = [VARIANT]
        model = data["models"][VARIANT]
        in_place = {name: {**source, "url": str(REPO / source["url"])} for name, source in model["sources"].items()}
        model["sources"] = in_place if sources is None else sources
        model["export"]["dtype"] = dtype

    return edited_params(REPO / "params.yaml", tiny_only, path)


def run_pipeline(root: Path) -> TinyPipeline:
    """download -> remap-weights -> build-model -> verify-outputs -> export -> export-onnx, as dvc.yaml chains them."""
    from stages import build_model, download, export, export_onnx, remap_weights, verify_outputs

    run = TinyPipeline(root=root, params=write_params(root / "params.yaml"))
    common = ["--variant", VARIANT, "--params", str(run.params)]
    remapped = root / "outputs" / VARIANT / "remapped.safetensors"
    steps = [
        (download, ["--out", str(run.original), "--cache", str(root / "data" / "downloads"),
                    "--metrics", str(run.metrics("download")), "--report", str(run.report("download")), "--no-progress"]),
        (remap_weights, ["--original", str(run.original / "original.safetensors"), "--out", str(remapped),
                         "--metrics", str(run.metrics("remap")), "--report", str(run.report("remap"))]),
        (build_model, ["--remapped", str(remapped), "--out", str(run.model), "--metrics", str(run.metrics("build"))]),
        (verify_outputs, ["--model", str(run.model), "--original", str(run.original),
                          "--out", str(run.reference.parent), "--metrics", str(run.metrics("verify")),
                          "--checks", str(run.root / "metrics" / VARIANT / "prompts"),
                          "--report", str(run.report("verify"))]),
    ]
    for stage, argv in steps:
        if stage.main(common + argv) != 0:
            raise RuntimeError(f"the tiny pipeline failed at {stage.__name__}; see the error above")
    if export.main(run.export_argv(run.export, run.report("export"))) != 0:
        raise RuntimeError("the tiny pipeline failed at stages.export; see the error above")
    if export_onnx.main(run.onnx_argv(run.onnx, run.report("onnx"))) != 0:
        raise RuntimeError("the tiny pipeline failed at stages.export_onnx; see the error above")
    return run


_RUNS: dict[str, TinyPipeline] = {}


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> TinyPipeline:
    """One run of the tiny pipeline, shared by every test module of the session. Treat its files as read-only:
    copy what a test changes."""
    if VARIANT not in _RUNS:
        _RUNS[VARIANT] = run_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))
    return _RUNS[VARIANT]


def copy_export(run: TinyPipeline, destination: Path) -> Path:
    """A private copy of the export folder, for a test that changes or writes into it."""
    shutil.copytree(run.export, destination)
    return destination
