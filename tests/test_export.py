"""Tests for stages/export.py and stages/model_card.py: the exported folder loads offline, reproduces the reference in
every dtype, carries a model card whose usage snippet runs, and comes out byte-identical from the same inputs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from clipseg_pipeline import model_card
from clipseg_pipeline import hf_export, precision
from stages import export
from clipseg_pipeline.architecture import Architecture
from clipseg_pipeline.background import Background
from clipseg_pipeline.tensor_io import TensorFile, sha256_file
from tests.pipeline_fixture import REPO, VARIANT, copy_export, edited_params, tiny_pipeline, write_params  # noqa: F401

EXPORT_FILES = {
    "README.md", "config.json", "manifest.json", "merges.txt", "model.safetensors", "preprocessor_config.json",
    "special_tokens_map.json", "tokenizer_config.json", "vocab.json",
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def export_with_dtype(run, tmp_path: Path, dtype: str, atol: float | None = None) -> tuple[int, Path, Path]:
    params = write_params(tmp_path / "params.yaml", dtype=dtype)
    if atol is not None:
        edited_params(params, lambda p: p["export"]["atol"].update({dtype: atol}))
    out, report = tmp_path / "hf", tmp_path / "export.json"
    return export.main(run.export_argv(out, report, params)), out, report


@pytest.fixture(scope="module")
def dtype_exports(tiny_pipeline, tmp_path_factory):  # noqa: F811
    """The tiny model exported in float16 and bfloat16."""
    exports = {}
    for dtype in ("float16", "bfloat16"):
        code, out, report = export_with_dtype(tiny_pipeline, tmp_path_factory.mktemp(dtype), dtype)
        assert code == 0
        exports[dtype] = (out, report)
    return exports


def usage_snippet(readme: str) -> str:
    blocks = re.findall(r"^```python\n(.*?)^```$", readme, flags=re.S | re.M)
    assert len(blocks) == 1, "the model card should hold exactly one Python snippet"
    return blocks[0]


def run_snippet(folder: Path, image: Path) -> subprocess.CompletedProcess:
    """The card's snippet, as written but for the image path, run in the export folder without network."""
    snippet = usage_snippet((folder / "README.md").read_text(encoding="utf-8"))
    assert f'"{model_card.SNIPPET_IMAGE}"' in snippet
    code = snippet.replace(f'"{model_card.SNIPPET_IMAGE}"', repr(str(image)))
    return subprocess.run([sys.executable, "-c", code], cwd=folder, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300)


# --- the folder --------------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """hashlib's own sha256 of the file's bytes: the manifest's hashes come from tensor_io.sha256_file, held here to a
    path that shares nothing with it."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_export_holds_exactly_the_promised_files_and_its_manifest_matches(tiny_pipeline):  # noqa: F811
    folder = tiny_pipeline.export
    assert {p.name for p in folder.iterdir()} == EXPORT_FILES
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["files"]
    assert set(manifest) == EXPORT_FILES - {"manifest.json"}
    for name, entry in manifest.items():
        assert entry == {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}, name


def test_export_loads_offline_and_its_processor_gives_verifications_inputs(tiny_pipeline):  # noqa: F811
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    from clipseg_pipeline.inputs import load_image

    folder = tiny_pipeline.export
    processor = CLIPSegProcessor.from_pretrained(folder, local_files_only=True)
    model = CLIPSegForImageSegmentation.from_pretrained(folder, local_files_only=True)
    assert model.dtype == torch.float32
    assert model.config.architectures == ["CLIPSegForImageSegmentation"]
    assert processor.tokenizer.model_max_length == 77
    reference = TensorFile(tiny_pipeline.reference)
    pixels = processor.image_processor(images=load_image(tiny_pipeline.original / "image"), return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, reference["pixel_values"])
    ids = processor.tokenizer(tiny_pipeline.prompts, padding=True, return_tensors="pt")
    assert torch.equal(ids["input_ids"], reference["input_ids"])


def test_export_report_records_dtype_tolerance_and_diffs(tiny_pipeline):  # noqa: F811
    report = json.loads(tiny_pipeline.report("export").read_text(encoding="utf-8"))
    assert report["dtype"] == "float32"
    assert report["tolerance_atol"] == 1e-4
    assert set(report["outputs"]) == {"logits", "conditional_embeddings", "pooled_output"}
    verify = json.loads(tiny_pipeline.report("verify").read_text(encoding="utf-8"))
    # float32: the verified weights themselves, so verify-outputs' comparison stands (recorded without CPU-dependent figures).
    assert report["outputs"] == {name: {**verify["outputs"][name], "checked_by": "verify-outputs (the same float32 weights)"}
                                 | ({"mask_pixels_differ": [verify["checks"][f"text-{i}"]["mask_pixels_differ"]
                                                             for i in range(len(tiny_pipeline.prompts))]}
                                    if name == "logits" else {})
                                 for name in report["outputs"]}
    assert all(r["passed"] for r in report["outputs"].values())
    assert report["files"] == len(EXPORT_FILES) - 1


def test_float32_export_passes_the_built_file_on_as_a_hard_link(tiny_pipeline):  # noqa: F811
    built, exported = tiny_pipeline.model / "model.safetensors", tiny_pipeline.export / "model.safetensors"
    assert os.stat(exported).st_ino == os.stat(built).st_ino  # no bytes written, none for DVC to hash again
    assert TensorFile(exported).metadata == {"format": "pt", "variant": VARIANT, "dtype": "float32",
                                             "source_sha256": TensorFile(built).metadata["source_sha256"]}
    manifest = json.loads((tiny_pipeline.export / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["files"]["model.safetensors"]["sha256"] == file_sha256(built)


def test_without_hard_links_the_built_file_is_copied(tiny_pipeline, tmp_path, monkeypatch):  # noqa: F811
    def no_links(source, target):
        raise OSError(18, "Invalid cross-device link")  # EXDEV: the output lies on another filesystem

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "hf"
    assert export.main(tiny_pipeline.export_argv(out, tmp_path / "export.json")) == 0
    built = tiny_pipeline.model / "model.safetensors"
    assert os.stat(out / "model.safetensors").st_ino != os.stat(built).st_ino
    assert (out / "model.safetensors").read_bytes() == built.read_bytes()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_weights_are_not_read_again_to_be_hashed(tiny_pipeline, tmp_path, monkeypatch, dtype):  # noqa: F811
    # At full size that is 600 MB read and hashed after the rest of the work: the weights are hashed by the process that
    # writes (float32: links) them while the stage imports transformers. The manifest must hold the file's true sha256
    # all the same.
    hashed = []
    monkeypatch.setattr(hf_export, "sha256_file", lambda path: hashed.append(Path(path).name) or sha256_file(path))
    code, out, _ = export_with_dtype(tiny_pipeline, tmp_path, dtype)
    assert code == 0
    assert "model.safetensors" not in hashed and "config.json" in hashed
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["files"]["model.safetensors"]["sha256"] == file_sha256(out / "model.safetensors")


def test_a_built_file_with_other_metadata_is_written_anew(tiny_pipeline, tmp_path):  # noqa: F811
    # Exported under another variant name: the built file's metadata does not fit, so the tensors are written out.
    params = write_params(tmp_path / "params.yaml")
    argv = tiny_pipeline.export_argv(tmp_path / "hf", tmp_path / "export.json", params)
    other = TensorFile(tiny_pipeline.model / "model.safetensors")
    model = tmp_path / "model"
    model.mkdir()
    from clipseg_pipeline.tensor_io import write_safetensors

    write_safetensors(model / "model.safetensors", {name: other[name] for name in other}, {"format": "pt", "variant": "elsewhere"})
    (model / "config.json").write_bytes((tiny_pipeline.model / "config.json").read_bytes())
    argv[argv.index("--model") + 1] = str(model)
    assert export.main(argv) == 0
    written = TensorFile(tmp_path / "hf" / "model.safetensors")
    assert written.metadata["variant"] == VARIANT and os.stat(written.path).st_ino != os.stat(other.path).st_ino
    assert all(torch.equal(written[name], other[name]) for name in other)


def test_a_model_that_failed_verification_is_not_exported(tiny_pipeline, tmp_path, capsys):  # noqa: F811
    report = json.loads(tiny_pipeline.report("verify").read_text(encoding="utf-8"))
    failed = tmp_path / "verify.json"
    failed.write_text(json.dumps({**report, "passed": False, "first_divergence": "vision.block3.attention"}), encoding="utf-8")
    argv = tiny_pipeline.export_argv(tmp_path / "hf", tmp_path / "export.json")
    argv[argv.index("--verify-report") + 1] = str(failed)
    assert export.main(argv) == 1
    err = capsys.readouterr().err
    assert "says the model did not pass verify-outputs (first divergence: vision.block3.attention)" in err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "export.json").exists()


def test_two_exports_of_the_same_inputs_are_byte_identical(tiny_pipeline, tmp_path):  # noqa: F811
    # A different output folder too: nothing in the export may depend on where it was written.
    out = tmp_path / "elsewhere" / "hf"
    assert export.main(tiny_pipeline.export_argv(out, tmp_path / "export.json")) == 0
    for name in EXPORT_FILES:
        assert (out / name).read_bytes() == (tiny_pipeline.export / name).read_bytes(), name
    assert (tmp_path / "export.json").read_bytes() == tiny_pipeline.report("export").read_bytes()


# --- dtypes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_exports_load_and_pass_their_tolerance(tiny_pipeline, dtype_exports, dtype):  # noqa: F811
    from transformers import CLIPSegForImageSegmentation

    from clipseg_pipeline.converted_model import hf_outputs

    out, report_path = dtype_exports[dtype]
    weights = TensorFile(out / "model.safetensors")
    assert {weights[name].dtype for name in weights} == {getattr(torch, dtype)}
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["dtype"] == dtype
    model = CLIPSegForImageSegmentation.from_pretrained(out, local_files_only=True)
    assert model.dtype == getattr(torch, dtype)
    report = json.loads(report_path.read_text(encoding="utf-8"))
    atol = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["export"]["atol"][dtype]
    assert report["dtype"] == dtype and report["tolerance_atol"] == atol
    masks = report["outputs"]["logits"].pop("mask_pixels_differ")
    assert report["outputs"] == {name: {"passed": True, "checked_by": f"the reference forward pass, in float32, on this folder's {dtype} weights"}
                                 for name in ("logits", "conditional_embeddings", "pooled_output")}
    # The stage ran the reference on the folder's weights; transformers, running them as a user loads them, agrees.
    reference = TensorFile(tiny_pipeline.reference)
    got = hf_outputs(model.float().eval(), reference["pixel_values"], reference["input_ids"], reference["attention_mask"])
    for name in ("logits", "conditional_embeddings", "pooled_output"):
        assert (got[name] - reference[name]).abs().max().item() <= atol, name
    # The mask pixels that differ from the reference's, per prompt: what transformers' masks give, but for the few
    # pixels whose logit the two float32 computations put on either side of 0.
    differ = ((got["logits"] > 0) != (reference["logits"] > 0)).flatten(1).sum(1).tolist()
    assert len(masks) == len(tiny_pipeline.prompts) and all(abs(a - b) <= 20 for a, b in zip(masks, differ)), (masks, differ)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"stored in **{dtype}**" in card and f"this export ({dtype}) vs original |" in card
    assert f"| logits | within 0.0001 | within {atol:g} |" in card


def test_a_half_precision_export_imports_torch_but_not_transformers_modelling_code(tiny_pipeline, tmp_path):  # noqa: F811
    argv = tiny_pipeline.export_argv(tmp_path / "hf", tmp_path / "export.json", write_params(tmp_path / "params.yaml", dtype="bfloat16"))
    code = (
        "import json, sys\n"
        "from stages import export\n"
        f"code = export.main({argv!r})\n"
        "print(json.dumps([code, 'torch' in sys.modules, sorted(m for m in sys.modules if m.startswith('transformers.models.clipseg'))]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [0, True, []]
    assert json.loads((tmp_path / "export.json").read_text(encoding="utf-8"))["outputs"]["logits"]["passed"] is True


def test_weights_that_do_not_fit_the_architecture_are_named_not_run(tiny_pipeline, dtype_exports):  # noqa: F811
    out, _ = dtype_exports["bfloat16"]
    arch = hf_export.check_loadable(out)
    wrong = replace(arch, projection_dim=arch.projection_dim * 2)
    with pytest.raises(hf_export.ExportError, match=r"cannot run as the model its config.json describes .*'visual.proj' has shape"):
        hf_export.check_outputs(out, wrong, TensorFile(tiny_pipeline.reference), "bfloat16", 0.25, 2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_an_export_just_beyond_its_tolerance_fails_naming_the_output_and_its_figure(tiny_pipeline, tmp_path, capsys, dtype):  # noqa: F811
    # The built model changed after verify-outputs passed it: the decoder's last bias (the last layer of the refined
    # upsampling clipseg-tiny has), which adds to every logit alone, moved by three times export.atol. The logits then
    # differ from the reference by that much, give or take the dtype's rounding (well within the tolerance, as the passing exports show); a pass line even ten times looser
    # than the tolerance would let this export through.
    from clipseg_pipeline.tensor_io import write_safetensors

    atol = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["export"]["atol"][dtype]
    shift = 3 * atol
    built = TensorFile(tiny_pipeline.model / "model.safetensors")
    model = tmp_path / "model"
    model.mkdir()
    bias = "decoder.transposed_convolution.4.bias"
    assert bias in built
    write_safetensors(model / "model.safetensors", {name: built[name] + shift if name == bias else built[name] for name in built}, built.metadata)
    (model / "config.json").write_bytes((tiny_pipeline.model / "config.json").read_bytes())
    argv = tiny_pipeline.export_argv(tmp_path / "hf", tmp_path / "export.json", write_params(tmp_path / "params.yaml", dtype=dtype))
    argv[argv.index("--model") + 1] = str(model)
    assert export.main(argv) == 1
    err = capsys.readouterr().err
    figure = re.search(rf"its {dtype} weights\) differs from the reference in \['logits'\] beyond {atol} \(\{{'logits': (\S+)\}}\)", err)
    assert figure and float(figure[1]) == pytest.approx(shift, abs=atol), err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "export.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "params.yaml"]  # no staging folder left either


def test_float16_overflow_is_refused_with_the_tensor_named():
    # float16's largest value is 65504: a float32 below 65520 rounds to it, from 65520 up to inf.
    cast = precision.cast_tensors({"big": np.array([1.0, 65520.0], np.float32), "edge": np.array([-65519.0, 65504.0], np.float32)}, "float16")
    assert cast["edge"].dtype == np.float16 and cast["edge"].tolist() == [-65504.0, 65504.0]
    with pytest.raises(precision.PrecisionError, match=r"tensor 'big' does not fit float16.*bfloat16 or float32"):
        cast["big"]
    assert precision.cast_tensors({"big": np.array([1e6], np.float32)}, "bfloat16")["big"].dtype == np.uint16


def test_weights_other_than_float32_are_refused_by_the_cast():
    with pytest.raises(precision.PrecisionError, match=r"tensor 'w' is float64; export casts build-model's float32 weights"):
        precision.cast_array("w", np.zeros(3), "bfloat16")


# Ties (1 + 2^-8 rounds to even, down; 1 + 3 * 2^-8 up), just past a tie, float16's largest and subnormal values and
# underflow, bfloat16's subnormals, float32's smallest and largest (bfloat16 rounds the largest to inf).
EDGE_VALUES = [0.0, -0.0, 1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8), 65504.0, 65519.0, -65519.0,
               6e-8, 3e-8, 1e-8, 2**-133, 1.5 * 2**-126, 1e-45, 3.4028235e38, -3.4028235e38]
# float32 bit patterns of infinities and NaNs, payloads and signs included.
SPECIAL_BITS = [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FBFFFFF]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_cast_rounds_every_value_as_torch_does(dtype):
    rng = np.random.default_rng(0)
    # Values across every exponent each dtype holds, each magnitude twice the cast's chunk over.
    top = 4.8 if dtype == "float16" else 38.5
    spread = rng.standard_normal(3 * precision.CAST_CHUNK) * 10 ** rng.uniform(-46, top, 3 * precision.CAST_CHUNK)
    with np.errstate(over="ignore"):  # the largest magnitudes become float32's infinities, a case of their own
        values = np.concatenate([np.array(EDGE_VALUES), spread]).astype(np.float32)
    if dtype == "float16":
        values = values[np.abs(values) < precision.FLOAT16_OVERFLOW]  # the rest is refused (test above)
    else:
        values = np.concatenate([values, np.array(SPECIAL_BITS, np.uint32).view(np.float32)])
    ours = precision.cast_array("w", values, dtype).view(np.uint16)
    theirs = torch.from_numpy(values).to(getattr(torch, dtype)).view(torch.uint16).numpy()
    nan = np.isnan(values)
    assert np.array_equal(ours[~nan], theirs[~nan])
    # Every NaN becomes one quiet NaN, the one torch's scalar conversion makes (its vector code writes 0xFFFF); built
    # weights hold none (download refuses them).
    assert (ours[nan] == precision.BFLOAT16_NAN).all() and ((theirs[nan] & 0x7FFF) > 0x7F80).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_weights_are_written_by_a_forked_process_with_the_bytes_the_stage_would_write(tiny_pipeline, tmp_path, monkeypatch, dtype):  # noqa: F811
    forked = []
    result = Background.result
    monkeypatch.setattr(Background, "result", lambda self: forked.append(self.forked) or result(self))
    code, out, _ = export_with_dtype(tiny_pipeline, tmp_path, dtype)
    assert code == 0 and forked == [True]
    # Where no process can be forked, the stage writes them itself: the same bytes.
    monkeypatch.setattr("multiprocessing.get_all_start_methods", lambda: ["spawn"])
    code, inline, _ = export_with_dtype(tiny_pipeline, tmp_path / "inline", dtype)
    assert code == 0 and forked == [True, False]
    assert (inline / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["files"]["model.safetensors"]["sha256"] == file_sha256(out / "model.safetensors")


def test_a_failure_in_the_forked_process_is_reported_and_leaves_nothing(tiny_pipeline, tmp_path, capsys):  # noqa: F811
    # A built file with a weight float16 cannot hold: the forked process refuses it, the stage reports its message.
    built = TensorFile(tiny_pipeline.model / "model.safetensors")
    model = tmp_path / "model"
    model.mkdir()
    from clipseg_pipeline.tensor_io import write_safetensors

    big = {name: built[name] * (1e6 if name == "clip.logit_scale" else 1) for name in built}
    write_safetensors(model / "model.safetensors", big, built.metadata)
    (model / "config.json").write_bytes((tiny_pipeline.model / "config.json").read_bytes())
    argv = tiny_pipeline.export_argv(tmp_path / "hf", tmp_path / "export.json", write_params(tmp_path / "params.yaml", dtype="float16"))
    argv[argv.index("--model") + 1] = str(model)
    assert export.main(argv) == 1
    assert "tensor 'clip.logit_scale' does not fit float16 (values become inf)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "params.yaml"]


def test_a_tokenizer_config_that_changes_the_ids_fails_the_check(tiny_pipeline, tmp_path):  # noqa: F811
    folder = copy_export(tiny_pipeline, tmp_path / "hf")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<|endoftext|>"}), encoding="utf-8")
    special = {**hf_export.SPECIAL_TOKENS, "bos_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    with pytest.raises(hf_export.ExportError, match="the tokenizer in .* gives input_ids"):
        hf_export.check_export(folder, tiny_pipeline.reference, tiny_pipeline.prompts, "float32", 1e-4, {}, threads=2)


def test_a_missing_report_is_named_with_the_stage_to_run(tiny_pipeline, tmp_path, capsys):  # noqa: F811
    argv = tiny_pipeline.export_argv(tmp_path / "hf", tmp_path / "export.json")
    argv[argv.index("--verify-report") + 1] = str(tmp_path / "absent.json")
    assert export.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "absent.json: cannot read the verify-outputs report" in err and "\n" not in err
    assert not (tmp_path / "hf").exists()


# --- the model card ----------------------------------------------------------------------------------------------


def test_model_card_metadata_sources_and_verification(tiny_pipeline):  # noqa: F811
    text = (tiny_pipeline.export / "README.md").read_text(encoding="utf-8")
    card = ModelCard(text)
    assert card.data.library_name == "transformers"
    # The tiny variant is synthetic: the card says so plainly, and claims no third-party weights or their licences.
    assert "**This is a synthetic model, not CLIPSeg's weights.**" in text and "synthetic" in card.data.tags
    assert card.data.license == "mit" and "the MIT license does not apply" not in text
    assert "holds the original checkpoints" not in text
    download = json.loads(tiny_pipeline.report("download").read_text(encoding="utf-8"))
    params = yaml.safe_load(tiny_pipeline.params.read_text(encoding="utf-8"))["models"][VARIANT]
    for name, source in download["sources"].items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert params["sources"][name]["url"] in row and source["sha256"] in row and str(source["bytes"]) in row
    verify = json.loads(tiny_pipeline.report("verify").read_text(encoding="utf-8"))
    exported = json.loads(tiny_pipeline.report("export").read_text(encoding="utf-8"))
    for name in verify["outputs"]:
        assert verify["outputs"][name]["passed"] and exported["outputs"][name]["passed"]
        assert f"| {name} | within {verify['tolerance_atol']:g} | within {exported['tolerance_atol']:g} |" in text
    assert "No published check values exist for this variant." in text
    assert f"clipseg-pipeline {model_card.project_version()}" in text
    assert "| reduce_dim | 16 |" in text
    # Reproducible in any clone: no machine paths, no clock.
    assert str(tiny_pipeline.root) not in text and not re.search(r"20\d\d-\d\d-\d\d", text)
    assert text.endswith("```\n")


def rd64_card(verify: dict) -> model_card.CardInputs:
    """The model card's inputs for a float32 clipseg-rd64 export with the given verify report."""
    arch = Architecture.from_mapping(
        yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["models"]["clipseg-rd64"]["architecture"])
    return model_card.CardInputs(
        variant="clipseg-rd64", dtype="float32", architecture=arch, image_size=352, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, prompts=["a cat"], sources=[], verify=verify, export_atol=1e-4,
        export_outputs={"logits": {"passed": True}}, transformers_version="5.24.0", project_version="0.1.0",
    )


def test_model_card_shows_the_published_check_when_there_is_one():
    text = model_card.render(rd64_card({
        "outputs": {"logits": {"passed": True}},
        "passed": True,
        "tolerance_atol": 1e-4,
        "reference_dtype": "float32",
        "published_check": {"logits": {"tolerance": 1e-3, "passed": True}},
    }))
    assert "| logits | within 0.001 | 0.001 | True |" in text
    assert "| logits | within 0.0001 | within 0.0001 |" in text
    assert "No published check values" not in text
    assert "ViT, 12 layers, width 768, 12 heads, patch 16" in text
    assert "the reference ran in float32." in text
    # A converted published variant: its sources' licences, and metadata true for how the model is used.
    card = ModelCard(text)
    assert (card.data.license, card.data.license_name, card.data.license_link) == (
        "other", "clipseg-weights", "https://github.com/timojl/clipseg#weights")
    assert "the MIT license does not apply to the weights" in text and "holds the original" in text
    assert "synthetic" not in text.lower()
    # No transformers pipeline runs CLIPSeg: the card names none (the Hub would offer pipeline() on it) and turns the
    # inference widget off; the usage snippet is the way to run it (tested above).
    assert card.data.pipeline_tag is None and card.data.to_dict()["inference"] is False


def test_no_transformers_pipeline_runs_clipseg_so_the_card_names_none(tiny_pipeline):  # noqa: F811
    from PIL import Image
    from transformers import pipeline

    with pytest.raises(ValueError, match="Invalid conditional"):  # it gives the model no prompt
        pipeline("image-segmentation", model=str(tiny_pipeline.export))(Image.new("RGB", (64, 64)))


def test_model_card_names_the_assumed_settings_and_only_when_there_are_some():
    verify = {"outputs": {"logits": {"passed": True}}, "passed": True, "tolerance_atol": 1e-4, "reference_dtype": "float64"}
    assumed = model_card.render(replace(rd64_card(verify), assumed=("extract_layers", "conditional_layer")))
    assert "**Assumed settings: `extract_layers`, `conditional_layer`.**" in assumed
    assert "Assumed settings" not in model_card.render(rd64_card(verify))


def test_model_card_refuses_a_verify_report_without_the_reference_dtype():
    card = rd64_card({"outputs": {"logits": {"passed": True}}, "passed": True, "tolerance_atol": 1e-4})
    with pytest.raises(model_card.ModelCardError, match=r"verify report lacks reference_dtype .*rerun the verify-outputs stage"):
        model_card.render(card)


def test_model_card_refuses_a_download_report_without_a_source():
    from clipseg_pipeline.params import Source

    sources = {"clip": Source("clip", "https://example.org/clip.pt", None, None)}
    with pytest.raises(model_card.ModelCardError, match=r"lacks the source\(s\) \['clip'\].*rerun the download stage"):
        model_card.source_rows(sources, {"sources": {}})


def test_project_version_falls_back_to_pyproject(monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    expected = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M).group(1)
    assert model_card.project_version() == expected


# float16 too: the snippet must cast the pixel values to the model's dtype (bfloat16 takes the same path).
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_model_card_usage_snippet_runs_as_written(tiny_pipeline, dtype_exports, tmp_path, dtype):  # noqa: F811
    folder = copy_export(tiny_pipeline, tmp_path / "hf") if dtype == "float32" else dtype_exports[dtype][0]
    result = run_snippet(folder, tiny_pipeline.original / "image")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == list(model_card.SNIPPET_PROMPTS)
    assert all(line.endswith("mask (352, 352)") for line in lines), lines  # the reference image's size
    assert {p.name for p in folder.iterdir()} == EXPORT_FILES, "the snippet must not write into the folder"
