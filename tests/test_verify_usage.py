"""verify-usage: the converted model conditioned on image prompts and run on a batch of two different images, against
the reference prompt by prompt; and negative controls, each a fault of the kind a conversion or a model bug makes."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers.models.clipseg import modeling_clipseg

from stages import verify_usage
from tests.pipeline_fixture import edited_params
from tests.test_verify_outputs import VARIANT, Built, tiny  # noqa: F401  (a fixture)


@dataclass(frozen=True)
class Usage:
    code: int
    stderr: str
    out: Path

    @property
    def report(self) -> dict:
        return json.loads((self.out / "usage.json").read_text(encoding="utf-8"))

    def metrics(self, check: str) -> dict:
        return json.loads((self.out / "metrics" / f"{check}.json").read_text(encoding="utf-8"))


def run_usage(built: Built, out: Path, params: Path | None = None) -> Usage:
    argv = built.stage_argv(params) + ["--model", str(built.model), "--original", str(built.original),
                                       "--out", str(out / "masks"), "--metrics", str(out / "metrics"),
                                       "--report", str(out / "usage.json")]  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        code = verify_usage.main(argv)
    return Usage(code, stderr.getvalue(), out)


def error_line(run: Usage) -> str:
    lines = [line for line in run.stderr.splitlines() if line.startswith(f"verify-usage {VARIANT}: error: ")]
    assert len(lines) == 1, run.stderr
    return lines[0]


@pytest.fixture(scope="module")
def usage(tiny, tmp_path_factory) -> Usage:  # noqa: F811
    return run_usage(tiny, tmp_path_factory.mktemp("usage"))


def test_image_prompts_and_a_batch_match_the_reference_prompt_by_prompt(usage):
    assert usage.code == 0, usage.stderr
    checks = usage.report["checks"]
    assert sorted(checks) == ["batch-0", "batch-1", "image-0"]
    assert checks["image-0"]["box"] == [100, 100, 300, 260]
    assert {checks["batch-0"]["image"], checks["batch-1"]["image"]} == {"the reference image", "the reference image mirrored"}
    for name, check in checks.items():
        assert check["passed"] and check["logits"] == {"passed": True}, name
        assert check["mask_pixels_differ"] == 0, name
        assert usage.metrics(name) == {"passed": True, "mask_px": 0}
    assert set(checks["image-0"]) >= {"conditional_embeddings", "logits"}
    assert set(checks["batch-0"]) >= {"conditional_embeddings", "logits", "pooled_output"}
    assert usage.report["passed"] is True
    # The reference's mask for the image prompt, drawn over the reference image.
    assert [p.name for p in (usage.out / "masks").iterdir()] == ["00-image-prompt-the-crop-100-100-300-260.png"]


def test_the_image_prompt_conditions_differently_from_the_text_prompts(tiny, usage):  # noqa: F811
    # The image prompt's condition is the prompt image's projected class token: not the query image's pooled output,
    # and not a text condition (else the check would compare the same thing twice).
    from clipseg_pipeline.architecture import Architecture
    from clipseg_pipeline.inputs import crop, load_image, pixel_values
    from clipseg_pipeline.reference import encode_image, image_prompt_forward
    from clipseg_pipeline.tensor_io import TensorFile
    import yaml

    arch = Architecture.from_mapping(yaml.safe_load(tiny.params.read_text(encoding="utf-8"))["models"][VARIANT]["architecture"])
    image, original = load_image(tiny.original / "image"), TensorFile(tiny.original / "original.safetensors")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    query, prompt = pixel_values(image, 352, mean, std), pixel_values(crop(image, (100, 100, 300, 260), "x"), 352, mean, std)
    with torch.inference_mode():
        out = image_prompt_forward(original, arch, query, prompt, torch.float64)
        own = encode_image(original, arch, prompt, torch.float64)["pooled_output"]
        query_pooled = encode_image(original, arch, query, torch.float64)["pooled_output"]
    assert torch.equal(out["conditional_embeddings"], own)
    assert (own - query_pooled).abs().max() > 1e-3


def test_an_image_condition_from_the_wrong_token_is_caught(tiny, tmp_path, monkeypatch):  # noqa: F811
    # A model that pooled the prompt image at the first patch instead of the class token.
    forward = modeling_clipseg.CLIPSegVisionModel.forward

    def wrong_token(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.pooler_output = self.post_layernorm(out.last_hidden_state[:, 1, :])
        return out

    monkeypatch.setattr(modeling_clipseg.CLIPSegVisionModel, "forward", wrong_token)
    run = run_usage(tiny, tmp_path)
    assert run.code == 1
    message = error_line(run)
    assert "image-0 {'box': [100, 100, 300, 260]} (conditional_embeddings: max abs diff" in message
    assert run.report["checks"]["image-0"]["conditional_embeddings"]["passed"] is False
    assert run.metrics("image-0")["passed"] is False


def test_images_swapped_within_a_batch_are_caught(tiny, tmp_path, monkeypatch):  # noqa: F811
    # A model that mixes up the rows of a batch: each prompt meets the other image. One image with several prompts
    # (verify-outputs' check) cannot show it: every row holds the same image.
    forward = modeling_clipseg.CLIPSegDecoder.forward

    def swapped(self, hidden_states, conditional_embeddings, *args, **kwargs):
        return forward(self, [h.flip(0) for h in hidden_states], conditional_embeddings, *args, **kwargs)

    monkeypatch.setattr(modeling_clipseg.CLIPSegDecoder, "forward", swapped)
    run = run_usage(tiny, tmp_path)
    assert run.code == 1
    message = error_line(run)
    assert "batch-0" in message and "batch-1" in message and "logits: max abs diff" in message
    checks = run.report["checks"]
    assert not checks["batch-0"]["passed"] and checks["batch-0"]["mask_pixels_differ"] > 0
    assert run.metrics("batch-0")["mask_px"] == checks["batch-0"]["mask_pixels_differ"]


def test_an_image_prompt_box_outside_the_image_is_named(tiny, tmp_path):  # noqa: F811
    params = edited_params(tiny.params, lambda p: p["models"][VARIANT]["verify"].update(image_prompts=[[600, 0, 700, 100]]),
                           tmp_path / "params.yaml")
    run = run_usage(tiny, tmp_path, params)
    assert run.code == 1
    assert (f"models.{VARIANT}.verify.image_prompts[0]: the box [600, 0, 700, 100] reaches beyond the 640x480 image; "
            "keep right <= 640 and bottom <= 480") in error_line(run)
    assert not (tmp_path / "usage.json").exists()


def test_no_image_prompts_leaves_the_batch_check(tiny, tmp_path):  # noqa: F811
    params = edited_params(tiny.params, lambda p: p["models"][VARIANT]["verify"].update(image_prompts=[]),
                           tmp_path / "params.yaml")
    run = run_usage(tiny, tmp_path, params)
    assert run.code == 0, run.stderr
    assert sorted(run.report["checks"]) == ["batch-0", "batch-1"]
