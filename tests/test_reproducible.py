"""The same bytes on every CPU: verify-outputs and export, run in a fresh process whose torch, oneDNN and MKL
are held to older instruction sets (as on another machine), write exactly the bytes a run with this CPU's own kernels
wrote: the reference outputs, the mask pictures, the metrics, the exported folder and its report.

The simulated CPU is not a no-op: the same float32 forward pass gives other last bits under it (checked below), which
is what made the reference outputs, the masks and the recorded figures differ between machines before the reference
ran in float64 and the figures within tolerance stopped being recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline_fixture import REPO, VARIANT, tiny_pipeline, write_params  # noqa: F401

# Plain (non-vectorised) ATen kernels, oneDNN limited to SSE4.1, MKL to SSE4.2: what an older x86 CPU would run.
OTHER_CPU = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}

FLOAT32_FORWARD = """
import hashlib, sys, torch
from clipseg_pipeline.inputs import load_image, pixel_values, token_ids, tokenizer
from clipseg_pipeline.params import load
from clipseg_pipeline.reference import reference_forward
from clipseg_pipeline.tensor_io import TensorFile
params = load(sys.argv[1]); model = params.model(sys.argv[2]); torch.set_num_threads(params.verify.threads)
folder = sys.argv[3]
pixels = pixel_values(load_image(folder + "/image"), params.processor.image_size, params.processor.image_mean, params.processor.image_std)
ids = token_ids(tokenizer(folder), model.prompts)["input_ids"]
out = reference_forward(TensorFile(folder + "/original.safetensors"), model.architecture, pixels, ids, torch.float32)
print(hashlib.sha256(out["logits"].numpy().tobytes() + out["vision.block1.mlp"].numpy().tobytes()).hexdigest())
"""


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=REPO, env={**os.environ, **(env or {})},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def files(folder: Path) -> dict[str, str]:
    """Every file under `folder`, by relative path, with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_simulated_cpu_changes_float32_results(tiny_pipeline):  # noqa: F811
    args = ["-c", FLOAT32_FORWARD, str(tiny_pipeline.params), VARIANT, str(tiny_pipeline.original)]
    assert run(args).stdout != run(args, OTHER_CPU).stdout


def test_verify_outputs_writes_the_same_bytes_on_another_cpu(tiny_pipeline, tmp_path):  # noqa: F811
    out, metrics = tmp_path / "verify", tmp_path / "verify.json"
    result = run(["-m", "stages.verify_outputs", "--variant", VARIANT, "--params", str(tiny_pipeline.params),
                  "--model", str(tiny_pipeline.model), "--original", str(tiny_pipeline.original),
                  "--out", str(out), "--metrics", str(tmp_path / "verify.metrics.json"), "--checks", str(tmp_path / "prompts"),
                  "--report", str(metrics)], OTHER_CPU)
    assert files(out) == files(tiny_pipeline.reference.parent)
    assert len(files(out)) == 1 + len(tiny_pipeline.prompts)  # reference.safetensors and one picture per prompt
    assert metrics.read_bytes() == tiny_pipeline.report("verify").read_bytes()
    assert "verify-outputs: logits: max abs diff" in result.stderr  # the exact figures are still shown


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_writes_the_same_bytes_on_another_cpu(tiny_pipeline, tmp_path, dtype):  # noqa: F811
    # bfloat16 runs the exported model and compares it with the reference, float32 reuses verify-outputs' comparison.
    params = write_params(tmp_path / "params.yaml", dtype=dtype)
    exports = {}
    for name, env in (("this-cpu", None), ("other-cpu", OTHER_CPU)):
        out, report = tmp_path / name / "hf", tmp_path / name / "export.json"
        run(["-m", "stages.export", *tiny_pipeline.export_argv(out, report, params)], env)
        exports[name] = (files(out), report.read_bytes())
    assert exports["this-cpu"] == exports["other-cpu"]
    report = json.loads(exports["other-cpu"][1])
    assert report["dtype"] == dtype and all(r["passed"] for r in report["outputs"].values())
