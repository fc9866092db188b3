"""The ONNX folder as transformers.js (the npm package @huggingface/transformers, pinned in js/package-lock.json) loads
it: its documented usage, one image and the prompts padded together, from the local folder with remote models off, for
each dtype; its token ids must be verify-outputs' and its logits the reference's within the stage's tolerances.

The image is given already resized to 352x352 by PIL (bilinear), as verify-outputs resized it: transformers.js's own
resize (sharp) differs from PIL's by up to 0.25 in the tiny model's logits, which would hide the model's own error.
Needs Node.js and `npm ci --ignore-scripts` in js/ (.ci/run does both)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from clipseg_pipeline.inputs import RESAMPLE_BILINEAR, load_image
from clipseg_pipeline.onnx_export import compare_logits
from clipseg_pipeline.params import ONNX_DTYPES
from clipseg_pipeline.tensor_io import TensorFile
from tests.pipeline_fixture import tiny_pipeline  # noqa: F401  (a fixture)

JS = Path(__file__).resolve().parents[1] / "js"
NODE_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if not found:
        pytest.skip("Node.js is not installed: the transformers.js check needs it (and `npm ci --ignore-scripts` in js/)")
    if not (JS / "node_modules" / "@huggingface" / "transformers").is_dir():
        pytest.fail("js/node_modules lacks @huggingface/transformers: run `npm ci --ignore-scripts` in js/")
    return found


@pytest.mark.parametrize("dtype", ONNX_DTYPES)
def test_transformers_js_runs_the_documented_usage_within_tolerance(tiny_pipeline, node, dtype, tmp_path):
    image = tmp_path / "image.png"
    load_image(tiny_pipeline.original / "image").resize((352, 352), resample=RESAMPLE_BILINEAR).save(image)
    out = tmp_path / "logits.bin"
    result = subprocess.run(
        [node, str(JS / "segment.mjs"), str(tiny_pipeline.onnx), dtype, str(image), str(out), *tiny_pipeline.prompts],
        cwd=JS, capture_output=True, text=True, timeout=NODE_TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    reference = TensorFile(tiny_pipeline.reference, framework="np")
    assert shown["input_ids"] == reference["input_ids"].tolist()
    assert shown["attention_mask"] == reference["attention_mask"].tolist()
    assert shown["pixel_values_dims"] == [1, 3, 352, 352]
    assert shown["dims"] == [len(tiny_pipeline.prompts), 352, 352]

    params = yaml.safe_load(tiny_pipeline.params.read_text(encoding="utf-8"))
    atol = params["verify"]["atol"] if dtype == "fp32" else params["onnx"]["atol"][dtype]
    least = 1.0 if dtype == "fp32" else params["onnx"]["mask_agreement"][dtype]
    logits = np.fromfile(out, dtype=np.float32).reshape(shown["dims"])
    diff, agreement = compare_logits(logits, reference["logits"])
    assert diff <= atol and agreement >= least, (diff, agreement)


def test_the_readme_javascript_snippet_runs_as_written(tiny_pipeline, node, tmp_path):
    from tests.test_export_onnx import readme_snippet

    # Beside js/node_modules, so that the import resolves; run from the pipeline's root, whose paths it uses.
    script = JS / f".readme-snippet-{tmp_path.name}.mjs"
    script.write_text(readme_snippet("javascript") + "console.log(JSON.stringify(logits.dims));\n", encoding="utf-8")
    try:
        result = subprocess.run([node, str(script)], cwd=tiny_pipeline.root, capture_output=True, text=True,
                                timeout=NODE_TIMEOUT_S, check=False)
    finally:
        script.unlink()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [2, 352, 352]
