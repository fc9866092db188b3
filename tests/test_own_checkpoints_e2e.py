"""End to end: the README's "Convert your own checkpoint" commands, as written, in a temporary copy of the project.

Two fine-tuned decoders sharing one CLIP file served from 127.0.0.1 are added with clipseg-variant and built in one
`dvc repro` (the default clipseg-tiny comes from the template's cache): the CLIP file is fetched once, both variants
verify and export naming their assumed settings, and `dvc metrics show` lists them side by side.
"""

from __future__ import annotations

import json

import pytest

from tests.dvc_project import REPRO_TIMEOUT_S, clone, reproduced_template, run
from tests.http_server import serve
from tests.test_readme import STAND_IN, own_checkpoint_block, write_own_checkpoints

pytestmark = pytest.mark.slow

VARIANTS = ("my-decoder", "my-other-decoder")


def test_two_own_decoders_sharing_clip_build_in_one_repro(tmp_path_factory):
    project = clone(reproduced_template(tmp_path_factory), tmp_path_factory.mktemp("own") / "repo", with_cache=True)
    variables = write_own_checkpoints(project.root)
    clip = (project.root / variables["CLIP"]).read_bytes()
    with serve({"/clip.pth": clip}) as server:
        variables["CLIP"] = server.url("/clip.pth")
        output = run(["bash", "-c", STAND_IN + own_checkpoint_block()], project.root, project.env | variables,
                     REPRO_TIMEOUT_S)
        fetched = [seen for seen in server.requests if seen.path == "/clip.pth"]
    assert len(fetched) == 1, fetched  # by clipseg-variant, once; download found it in its cache, pinned
    for name in VARIANTS:
        assert f"Running stage 'export@{name}'" in output
        verify = json.loads((project.root / "reports" / name / "verify.json").read_text())
        exported = json.loads((project.root / "reports" / name / "export.json").read_text())
        assert verify["passed"] and exported["assumed"] == verify["assumed"] == [
            "decoder_num_attention_heads", "extract_layers", "conditional_layer"]
        assert (project.root / "outputs" / name / "hf" / "model.safetensors").is_file()
    assert "Running stage 'download@clipseg-tiny'" not in output
    # dvc metrics show: one row per variant's metrics file, side by side.
    metrics = output.split("dvc metrics show", 1)[-1] if "dvc metrics show" in output else output
    assert all(f"metrics/{name}/verify.json" in metrics for name in VARIANTS)
