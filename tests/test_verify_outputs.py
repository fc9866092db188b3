"""Tests for stages.verify_outputs: the converted model against the reference, and negative controls.

Every fixture is built in tmp_path from synthetic sources (stages.synthetic) by the stages' own main() functions, with
a params file modelled on the repository's: the tiny preset (the clipseg-tiny variant's architecture), two tiny
variations, and ViT-B/16-sized random weights for the plain and the refined decoder. Each negative control damages a
converted model the way a conversion bug would, between build-model and verify-outputs, and checks that
verify-outputs fails naming the culprit.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from clipseg_pipeline.converted_model import load_model
from clipseg_pipeline.recording import OUTPUTS
from stages import build_model, download, remap_weights, verify_outputs
from tools import synthetic
from clipseg_pipeline.tensor_io import TensorFile, write_safetensors
from tests.pipeline_fixture import REPO, edited_params

VARIANT = "v"
SEED = 0
# Of different lengths, so padding and the pooled position differ between prompts.
PROMPTS = ["a cat", "two cats sitting on a pink blanket", "remote"]
# Full size: two prompts of different lengths suffice (the text tower and the decoder run once per prompt).
FULL_SIZE_PROMPTS = PROMPTS[:2]


@dataclass(frozen=True)
class Built:
    """A variant taken through download, remap-weights and build-model in its own folder."""

    root: Path
    params: Path

    @property
    def original(self) -> Path:
        return self.root / "data"

    @property
    def model(self) -> Path:
        return self.root / "model"

    def stage_argv(self, params: Path | None = None) -> list[str]:
        return ["--variant", VARIANT, "--params", str(params or self.params)]

    def verify_argv(self, out: Path, model: Path | None = None, params: Path | None = None) -> list[str]:
        return self.stage_argv(params) + [
            "--model", str(model or self.model), "--original", str(self.original),
            "--out", str(out / "verify"), "--metrics", str(out / "verify.metrics.json"), "--checks", str(out / "prompts"),
            "--report", str(out / "verify.json"),
        ]  # fmt: skip

    def remap_argv(self, out: Path, params: Path) -> list[str]:
        return self.stage_argv(params) + [
            "--original", str(self.original / "original.safetensors"),
            "--out", str(out / "remapped.safetensors"), "--metrics", str(out / "remap.metrics.json"),
            "--report", str(out / "remap.json"),
        ]  # fmt: skip


def write_params(path: Path, arch: dict, sources: dict[str, Path], member: str, prompts: list[str]) -> Path:
    """The repository's params.yaml with one variant, `v`, whose sources are the synthetic files (pinned)."""
    pinned = {name: {"url": str(sources[name]), "sha256": synthetic.sha256_file(sources[name])}
              for name in ("clip", "vocab", "merges", "image")}
    pinned["decoder"] = {"url": str(sources["decoder"]), "sha256": synthetic.sha256_file(sources["decoder"]), "member": member}
    only_v = {VARIANT: {"architecture": arch, "sources": pinned, "assumed": [],
                        "verify": {"prompts": prompts, "image_prompts": [[100, 100, 300, 260]]},
                        "expected": None, "export": {"dtype": "float32", "synthetic": True}, "onnx": {"base_model": None}}}
    return edited_params(REPO / "params.yaml", lambda data: data.update(variants=[VARIANT], models=only_v), path)


def build(root: Path, arch: dict, member: str, prompts: list[str] = PROMPTS) -> Built:
    sources = synthetic.write_sources(root / "sources", arch, SEED, decoder_member=member)
    built = Built(root, write_params(root / "params.yaml", arch, sources, member, prompts))
    remapped = root / "remapped.safetensors"
    stages = [
        (download, ["--out", str(built.original), "--cache", str(root / "cache"), "--metrics", str(root / "download.metrics.json"),
                     "--report", str(root / "download.json")]),
        (remap_weights, ["--original", str(built.original / "original.safetensors"), "--out", str(remapped),
                         "--metrics", str(root / "remap.metrics.json"), "--report", str(root / "remap.json")]),
        (build_model, ["--remapped", str(remapped), "--out", str(built.model), "--metrics", str(root / "build.json")]),
    ]  # fmt: skip
    for stage, argv in stages:
        assert stage.main(built.stage_argv() + argv) == 0, f"{stage.__name__} failed on the synthetic sources"
    return built


def tiny_arch(**changes) -> dict:
    return {**synthetic.preset_arch("tiny"), **changes}


def full_arch(preset: str) -> dict:
    """A ViT-B/16 preset at full size. Only the token table shrinks, to the synthetic tokenizer's size: the
    download stage rightly refuses a tokenizer that does not match the model's table (the 49408-row table is never
    read beyond those ids anyway)."""
    arch = synthetic.preset_arch(preset)
    arch["text"]["vocab_size"] = synthetic.tokenizer_vocab_size()
    return arch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Built:
    return build(tmp_path_factory.mktemp("tiny"), tiny_arch(), "tiny-uni.pth")


@pytest.fixture(scope="module")
def tiny_square(tmp_path_factory) -> Built:
    """Text width == projection width (as at full size, 512): an untransposed text projection loads without a shape
    error. (In the tiny preset it is 32 -> 16, and the wrong shape is refused on loading.)"""
    arch = tiny_arch(projection_dim=synthetic.preset_arch("tiny")["text"]["hidden_size"])
    return build(tmp_path_factory.mktemp("tiny-square"), arch, "tiny-uni.pth")


@pytest.fixture(scope="module")
def tiny_refined(tmp_path_factory) -> Built:
    return build(tmp_path_factory.mktemp("tiny-refined"), tiny_arch(use_complex_transposed_convolution=True), "tiny-uni-refined.pth")


@dataclass(frozen=True)
class Verified:
    built: Built
    out: Path
    code: int
    stderr: str

    @property
    def metrics(self) -> dict:
        return json.loads((self.out / "verify.json").read_text(encoding="utf-8"))


def run_verify(built: Built, out: Path, **argv) -> Verified:
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        code = verify_outputs.main(built.verify_argv(out, **argv))
    return Verified(built, out, code, stderr.getvalue())


def error_line(stderr: str) -> str:
    """The stage's one-line error (transformers may log above it)."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"{verify_outputs.STAGE} {VARIANT}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_published_values_are_checked_through_the_models_forward_on_their_first_prompt(tiny, tmp_path):
    from clipseg_pipeline.architecture import Architecture
    from clipseg_pipeline.inputs import CONTEXT_LENGTH, load_image, tokenizer
    from clipseg_pipeline.reference import reference_forward
    from tests.test_inputs import processor_pixels

    # Values "published" by a path that shares nothing with the check: the reference forward pass (plain torch, on the
    # original tensors) on the first prompt alone, padded to the context, and on the image as transformers' processor
    # prepares it with the preprocessing the values were published with (mean = std = 0.5).
    params = yaml.safe_load(tiny.params.read_text(encoding="utf-8"))
    prompts, half, atol = ["a remote", "two cats sitting on a pink blanket", "cat"], [0.5, 0.5, 0.5], 1e-4
    arch = Architecture.from_mapping(params["models"][VARIANT]["architecture"])
    pixels = processor_pixels(load_image(tiny.original / "image"), params["processor"]["image_size"], half, half)
    ids = tokenizer(tiny.original)(prompts[:1], padding="max_length", max_length=CONTEXT_LENGTH, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        want = reference_forward(TensorFile(tiny.original / "original.safetensors"), arch, pixels, ids, torch.float64)
    published = {
        "prompts": prompts, "padding": "max_length", "image_mean": half, "image_std": half, "atol": atol,
        "logits": want["logits"][0, :3, :3].tolist(), "conditional_embeddings": want["conditional_embeddings"][0, :3].tolist(),
        "pooled_output": want["pooled_output"][0, :3].tolist(),
    }  # fmt: skip

    def run_with(expected: dict, name: str) -> Verified:
        changed = edited_params(tiny.params, lambda p: p["models"][VARIANT].update(expected=expected), tmp_path / f"{name}.yaml")
        return run_verify(tiny, tmp_path / name, params=changed)

    # The stage runs the first prompt of the batch, the image once: the reference's values, within float32 rounding.
    agrees = run_with(published, "agrees")
    assert agrees.code == 0, agrees.stderr
    assert agrees.metrics["published_check"] == {name: {"passed": True, "tolerance": atol} for name in OUTPUTS}
    # One value three times the tolerance away: a pass line even ten times looser would let it through.
    off = run_with({**published, "pooled_output": [published["pooled_output"][0] + 3 * atol, *published["pooled_output"][1:]]}, "off")
    assert off.code == 1
    message = error_line(off.stderr)
    assert "the published check values differ for ['pooled_output']: " in message
    figure = re.search(r"'pooled_output': \{'max_abs_diff': (\S+), 'passed': False, 'tolerance': ([^}]+)\}", message)
    assert figure and float(figure[1]) == pytest.approx(3 * atol, abs=atol) and float(figure[2]) == atol, message
    assert off.metrics["published_check"]["pooled_output"] == {"max_abs_diff": pytest.approx(3 * atol, abs=atol), "passed": False, "tolerance": atol}
    assert off.metrics["published_check"]["logits"]["passed"] and off.metrics["passed"] is False


def tampered(built: Built, dest: Path, tensors: Callable[[dict], None] | None = None,
             config: Callable[[dict], None] | None = None) -> Path:
    """A copy of the built model folder with its tensors and/or config.json changed, as a conversion bug would."""
    source = TensorFile(built.model / "model.safetensors")
    state = {name: source[name] for name in source}
    if tensors:
        tensors(state)
    dest.mkdir(parents=True)
    write_safetensors(dest / "model.safetensors", state, {"format": "pt"})
    settings = json.loads((built.model / "config.json").read_text(encoding="utf-8"))
    if config:
        config(settings)
    (dest / "config.json").write_text(json.dumps(settings), encoding="utf-8")
    return dest


def swap(first: str, second: str) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        for suffix in ("weight", "bias"):
            state[f"{first}.{suffix}"], state[f"{second}.{suffix}"] = state[f"{second}.{suffix}"], state[f"{first}.{suffix}"]

    return change


# ---- the converted model computes what the original computes ------------------------------------------------------


def check_passed(run: Verified) -> None:
    assert run.code == 0, run.stderr
    metrics = run.metrics
    assert metrics["passed"] and metrics["intermediates_passed"] and metrics["first_divergence"] is None
    assert set(metrics["outputs"]) == set(OUTPUTS)
    for name, figures in metrics["outputs"].items():
        # Recorded without the CPU-dependent figure; the exact one is on stderr.
        assert figures == {"passed": True}
        printed = re.search(rf"verify-outputs: {name}: max abs diff (\S+) \(tolerance (\S+)\)", run.stderr)
        assert printed and float(printed[1]) <= float(printed[2]) == metrics["tolerance_atol"], run.stderr


@pytest.fixture(scope="module")
def tiny_verified(tiny, tmp_path_factory) -> Verified:
    return run_verify(tiny, tmp_path_factory.mktemp("tiny-verified"))


def test_tiny_model_matches_the_reference_on_every_entry(tiny_verified):
    run = tiny_verified
    check_passed(run)
    metrics = run.metrics
    arch = tiny_arch()
    vision, text, steps = arch["vision"]["num_hidden_layers"], arch["text"]["num_hidden_layers"], len(arch["extract_layers"])
    # Embeddings, pre-norm, post-norm; text embeddings, final norm, pooled; FiLM; 5 entries per block and per step,
    # plus each step's reduce.
    assert metrics["intermediates_compared"] == 3 + 3 + 2 + 5 * (vision + text) + 6 * steps
    assert metrics["prompts"] == len(PROMPTS) and metrics["variant"] == VARIANT
    reference = TensorFile(run.out / "verify" / "reference.safetensors")
    assert reference["logits"].shape == (3, 352, 352) and reference["pooled_output"].shape == (3, arch["projection_dim"])
    assert reference["attention_mask"].sum(dim=1).unique().numel() == 3  # three prompt lengths
    from PIL import Image

    masks = sorted((run.out / "verify" / "masks").iterdir())
    assert [p.name for p in masks] == ["00-a-cat.png", "01-two-cats-sitting-on-a-pink-blanket.png", "02-remote.png"]
    for path in masks:
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.width == 640  # the synthetic image's width


def test_tiny_refined_model_matches_the_reference(tiny_refined, tmp_path):
    run = run_verify(tiny_refined, tmp_path)
    check_passed(run)
    # The refined decoder's two inner layers are compared too.
    assert run.metrics["intermediates_compared"] == 3 + 3 + 2 + 5 * (4 + 2) + 6 * 3 + 2


def test_metrics_reference_and_pictures_are_byte_identical_across_runs(tiny, tiny_verified, tmp_path):
    first, second = tiny_verified, run_verify(tiny, tmp_path)
    assert first.code == second.code == 0
    files = sorted(p.relative_to(first.out) for p in first.out.rglob("*") if p.is_file())
    assert len(files) == 3 + 2 * len(PROMPTS)  # metrics, report, reference; per prompt a picture and a metrics file
    for name in files:
        assert (first.out / name).read_bytes() == (second.out / name).read_bytes(), name


def test_a_vision_tower_that_does_not_fit_the_original_is_named_by_the_reference(tiny, tmp_path):
    params = edited_params(tiny.params, lambda p: p["models"][VARIANT]["architecture"]["vision"].update(
        intermediate_size=2 * p["models"][VARIANT]["architecture"]["vision"]["intermediate_size"]), tmp_path / "params.yaml")
    run = run_verify(tiny, tmp_path, params=params)
    assert run.code == 1
    message = error_line(run.stderr)
    assert f"the reference cannot run {tiny.original / 'original.safetensors'} with models.{VARIANT}.architecture" in message
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" in message
    assert message.endswith("): that architecture does not describe these original files; fix it in params.yaml")
    assert not (tmp_path / "verify.json").exists() and not (tmp_path / "verify").exists()


def test_a_float32_reference_is_used_and_recorded_when_params_ask_for_it(tiny, tiny_verified, tmp_path):
    params = edited_params(tiny.params, lambda p: p["verify"].update(reference_dtype="float32"), tmp_path / "params.yaml")
    run = run_verify(tiny, tmp_path, params=params)
    check_passed(run)
    assert run.metrics["reference_dtype"] == "float32" and tiny_verified.metrics["reference_dtype"] == "float64"
    ours, default = (TensorFile(r.out / "verify" / "reference.safetensors") for r in (run, tiny_verified))
    assert ours.metadata["reference_dtype"] == "float32, stored rounded to float32"
    assert default.metadata["reference_dtype"] == "float64, stored rounded to float32"
    # Computed in float32 indeed: its outputs are not the float64 reference's float32 rounding, but agree with them
    # far within verify.atol.
    assert not torch.equal(ours["logits"], default["logits"])
    torch.testing.assert_close(ours["logits"], default["logits"], atol=1e-4 / 4, rtol=0)


@pytest.fixture(scope="module")
def full_rd64(tmp_path_factory) -> Built:
    return build(tmp_path_factory.mktemp("full-rd64"), full_arch("vit-b16-rd64"), "rd64-uni.pth", FULL_SIZE_PROMPTS)


@pytest.fixture(scope="module")
def full_refined(tmp_path_factory) -> Built:
    return build(tmp_path_factory.mktemp("full-refined"), full_arch("vit-b16-rd64-refined"), "rd64-uni-refined.pth",
                 FULL_SIZE_PROMPTS)


def test_full_size_rd64_matches_the_reference(full_rd64, tmp_path):
    check_passed(run_verify(full_rd64, tmp_path))


def test_full_size_refined_matches_the_reference(full_refined, tmp_path):
    check_passed(run_verify(full_refined, tmp_path))


# ---- negative controls: each damage makes verify-outputs fail and name its culprit --------------------------------


def check_caught(run: Verified, entry: str, *culprits: str) -> str:
    """The stage failed, its message says which outputs differ, names `entry` as the first divergence and the
    converted weights (and original tensors) behind it; the metrics file records the same. Returns the message."""
    assert run.code == 1
    message = error_line(run.stderr)
    assert "the converted model differs from the reference in " in message
    assert f"First divergence, in the order data flows: {entry} (" in message, message
    for culprit in culprits:
        assert culprit in message, message
    metrics = run.metrics
    assert not metrics["passed"] and metrics["first_divergence"] == entry
    failed = [name for name, figures in metrics["outputs"].items() if not figures["passed"]]
    assert failed and all(f"{name} (max abs diff " in message for name in failed)
    return message


def transpose(name: str) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        state[name] = state[name].t().contiguous()

    return change


def test_untransposed_square_text_projection_is_caught(tiny_square, tmp_path):
    # The original computes x @ P; nn.Linear computes x @ W.T: a conversion that forgets W = P.T loads silently here.
    model = tampered(tiny_square, tmp_path / "model", transpose("clip.text_projection.weight"))
    run = run_verify(tiny_square, tmp_path, model=model)
    check_caught(run, "conditional_embeddings", "Check the converted clip.text_projection, which comes from the "
                 "original text_projection (transposed: the original computes x @ proj)")
    # Everything up to the pooled text state agreed; the masks still come from the faulty model.
    assert run.metrics["outputs"]["pooled_output"]["passed"]
    assert len(list((tmp_path / "verify" / "masks").iterdir())) == len(PROMPTS)


def test_untransposed_text_projection_at_full_size_is_caught(full_rd64, tmp_path):
    model = tampered(full_rd64, tmp_path / "model", transpose("clip.text_projection.weight"))
    check_caught(run_verify(full_rd64, tmp_path, model=model), "conditional_embeddings", "clip.text_projection")


def test_a_difference_just_above_the_tolerance_fails_naming_the_output_and_its_figure(tiny, tmp_path):
    # The last bias before the logits adds to every logit alone: shifted by three times verify.atol, the logits differ
    # from the reference by 3 * atol give or take the model's float32 rounding (measured 1e-5; within atol, as the
    # untampered model passes), every entry before them agreeing. A pass line even ten times looser than the tolerance
    # would let this model through.
    atol = yaml.safe_load(tiny.params.read_text(encoding="utf-8"))["verify"]["atol"]
    shift = 3 * atol

    def shifted(state: dict) -> None:
        state["decoder.transposed_convolution.bias"] = state["decoder.transposed_convolution.bias"] + shift

    run = run_verify(tiny, tmp_path, model=tampered(tiny, tmp_path / "model", shifted))
    message = check_caught(run, "logits", "Check the converted decoder.transposed_convolution")
    figure = re.search(r"differs from the reference in logits \(max abs diff (\S+) > tolerance (\S+)\)\.", message)
    assert figure, message
    assert float(figure[1]) == pytest.approx(shift, abs=atol) and float(figure[2]) == atol
    assert run.metrics["outputs"]["logits"]["max_abs_diff"] == pytest.approx(shift, abs=atol)
    assert run.metrics["outputs"]["conditional_embeddings"] == run.metrics["outputs"]["pooled_output"] == {"passed": True}


def test_untransposed_non_square_projection_is_refused_on_loading(tiny, tmp_path):
    model = tampered(tiny, tmp_path / "model", transpose("clip.text_projection.weight"))
    run = run_verify(tiny, tmp_path, model=model)
    assert run.code == 1
    message = error_line(run.stderr)
    assert "the weights in model.safetensors do not fit config.json" in message
    assert "clip.text_projection.weight" in message and "Rebuild the model with build-model" in message


def test_q_and_k_swapped_in_vision_layer_3_is_caught(tiny, tmp_path):
    layer = "clip.vision_model.encoder.layers.3.self_attn"
    model = tampered(tiny, tmp_path / "model", swap(f"{layer}.q_proj", f"{layer}.k_proj"))
    check_caught(run_verify(tiny, tmp_path, model=model), "vision.block3.attention",
                 f"{layer} (q_proj, k_proj, v_proj, out_proj)", "visual.transformer.resblocks.3.attn (in_proj_bias, in_proj_weight, out_proj; in_proj split into q, k, v)")


def test_k_and_v_swapped_in_decoder_layer_1_is_caught(tiny, tmp_path):
    layer = "decoder.layers.1.self_attn"
    model = tampered(tiny, tmp_path / "model", swap(f"{layer}.k_proj", f"{layer}.v_proj"))
    message = check_caught(run_verify(tiny, tmp_path, model=model), "decoder.step1.attention",
                           f"{layer} (q_proj, k_proj, v_proj, out_proj)", "blocks.1.self_attn")
    # The vision and text towers are untouched, so only the logits differ.
    assert "in logits (max abs diff" in message and "conditional_embeddings (" not in message


@pytest.mark.parametrize("norm, entry, original", [
    ("clip.vision_model.encoder.layers.2.layer_norm2", "vision.block2.norm2", "visual.transformer.resblocks.2.ln_2"),
    ("clip.vision_model.pre_layrnorm", "vision.pre_norm", "visual.ln_pre"),
    ("clip.text_model.final_layer_norm", "text.final_norm", "ln_final"),
    # The block's output is this norm's output: the part is named, not just the block.
    ("decoder.layers.2.layer_norm2", "decoder.step2.norm2", "blocks.2.norm2"),
])  # fmt: skip
def test_a_layer_norm_left_at_its_initial_value_is_caught(tiny, tmp_path, norm, entry, original):
    def reset(state: dict) -> None:  # what a freshly constructed nn.LayerNorm holds
        state[f"{norm}.weight"] = torch.ones_like(state[f"{norm}.weight"])
        state[f"{norm}.bias"] = torch.zeros_like(state[f"{norm}.bias"])

    model = tampered(tiny, tmp_path / "model", reset)
    check_caught(run_verify(tiny, tmp_path, model=model), entry, f"Check the converted {norm}, which comes "
                 f"from the original {original}")


def test_refined_weights_under_a_plain_architecture_are_refused_by_remap(tiny_refined, tmp_path, capsys):
    # The realistic slip: a refined variant's params copied from a plain one, the flag left false.
    params = edited_params(tiny_refined.params, lambda p: p["models"][VARIANT]["architecture"].update(
        use_complex_transposed_convolution=False), tmp_path / "params.yaml")
    capsys.readouterr()
    assert remap_weights.main(tiny_refined.remap_argv(tmp_path, params)) == 1
    assert (f"the decoder is a refined one (trans_conv.0/2/4) but models.{VARIANT}.architecture."
            "use_complex_transposed_convolution is false: set it to true") in capsys.readouterr().err
    assert not (tmp_path / "remapped.safetensors").exists()


@pytest.mark.parametrize("refined", [True, False], ids=["refined-weights-plain-config", "plain-weights-refined-config"])
def test_model_folder_whose_config_disagrees_with_its_weights_is_refused(tiny, tiny_refined, tmp_path, refined):
    # from_pretrained would fill the missing upsampling weights with random values, with only a warning.
    built = tiny_refined if refined else tiny
    model = tampered(built, tmp_path / "model", config=lambda c: c.update(use_complex_transposed_convolution=not refined))
    run = run_verify(built, tmp_path, model=model)
    assert run.code == 1
    message = error_line(run.stderr)
    assert "the weights in model.safetensors do not fit config.json" in message
    assert "use_complex_transposed_convolution" in message
    assert re.search(r"'missing_keys': \['decoder\.transposed_convolution\.", message), message
    assert not (tmp_path / "verify.json").exists()


def test_plain_original_verified_against_a_refined_architecture_is_refused(tiny, tmp_path):
    params = edited_params(tiny.params, lambda p: p["models"][VARIANT]["architecture"].update(
        use_complex_transposed_convolution=True), tmp_path / "params.yaml")
    run = run_verify(tiny, tmp_path, params=params)
    assert run.code == 1
    message = error_line(run.stderr)
    assert f"the reference cannot run {tiny.original / 'original.safetensors'} with models.{VARIANT}.architecture" in message
    assert "'trans_conv.0.weight' is missing" in message and "fix it in params.yaml" in message


def _bos_id(built: Built) -> int:
    from clipseg_pipeline.inputs import tokenizer

    return tokenizer(built.original).bos_token_id


@pytest.mark.parametrize("eos_token_id", [1, "bos"], ids=["pad-id-pools-at-0", "start-token"])
def test_text_pooled_at_the_wrong_position_is_caught(tiny, tmp_path, eos_token_id):
    # With any eos_token_id but 2, the model pools at the first occurrence of that id (position 0 when it is absent).
    eos = _bos_id(tiny) if eos_token_id == "bos" else eos_token_id
    model = tampered(tiny, tmp_path / "model", config=lambda c: c["text_config"].update(eos_token_id=eos))
    check_caught(run_verify(tiny, tmp_path, model=model), "text.pooled", "config.json text_config.eos_token_id")


def test_eos_token_id_of_the_real_end_token_pools_at_the_same_position_and_passes(tiny, tmp_path):
    # The verdict comes from what the model computes, not from how its config reads: the end token's own id finds
    # the same position as the argmax of the ids.
    from clipseg_pipeline.inputs import tokenizer

    eos = tokenizer(tiny.original).eos_token_id
    model = tampered(tiny, tmp_path / "model", config=lambda c: c["text_config"].update(eos_token_id=eos))
    check_passed(run_verify(tiny, tmp_path, model=model))


@pytest.fixture(autouse=True, scope="module")
def _no_leftovers(tmp_path_factory):
    yield
    # The full-size folders hold about 2 GB each; free them as soon as this module is done.
    base = tmp_path_factory.getbasetemp()
    for folder in base.glob("full-*"):
        shutil.rmtree(folder, ignore_errors=True)
