"""A Hugging Face model folder: its side files, its weights in the export dtype, its manifest, and the checks that
hold the folder to what verify-outputs verified. Used by the export stage; nothing here imports transformers'
modelling code (seconds of start-up): tests/test_export.py loads every dtype's export with from_pretrained and runs it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .architecture import Architecture
from .errors import PipelineError
from .hf_layout import WEIGHTS_FILE, check_shapes, state_dict_shapes, weights_metadata
from .inputs import CONTEXT_LENGTH, RESAMPLE_BILINEAR, token_ids
from .name_map import OriginalLayout
from .precision import cast_tensors
from .recording import OUTPUTS, print_figures, recorded
from .schema import SchemaError
from .tensor_io import TensorFile, dtype_name, link_or_copy, sha256_file, write_json, write_safetensors

MANIFEST = "manifest.json"
CARD = "README.md"
# What from_pretrained, the Hub's widgets and AutoModel read to pick the class; build-model's config leaves it empty.
ARCHITECTURES = ["CLIPSegForImageSegmentation"]
SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}



class ExportError(PipelineError):
    """The exported folder does not load or does not compute what was verified."""


def preprocessor_config(size: int, mean: list[float], std: list[float]) -> dict:
    return {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": mean,
        "image_processor_type": "ViTImageProcessor",
        "image_std": std,
        "processor_class": "CLIPSegProcessor",
        "resample": RESAMPLE_BILINEAR,
        "rescale_factor": 1 / 255,
        "size": {"height": size, "width": size},
    }


def tokenizer_config() -> dict:
    return {
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": CONTEXT_LENGTH,
        "processor_class": "CLIPSegProcessor",
        "tokenizer_class": "CLIPTokenizer",
        **SPECIAL_TOKENS,
    }


def export_config(config: Mapping, dtype: str) -> dict:
    return {**config, "architectures": ARCHITECTURES, "dtype": dtype}


def write_weights(model_dir: Path, out: Path, dtype: str, variant: str) -> str:
    """The folder's model.safetensors: build-model's weights in `dtype`; returns its sha256.

    When the built file already is what this export would write (float32, this variant's metadata), it is passed on as
    it is, hard-linked where the filesystem allows (the same bytes, without writing 600 MB again); else every tensor is
    cast and the file hashed as it is written. The export stage runs this in the background while it imports its
    libraries."""
    source_path, path = model_dir / WEIGHTS_FILE, out / WEIGHTS_FILE
    source = TensorFile(source_path, framework="np")
    metadata = weights_metadata(variant, dtype, source.metadata.get("source_sha256", ""))
    if source.metadata == metadata and all(spec.dtype == dtype_name(dtype) for spec in source.specs.values()):
        link_or_copy(source_path, path)
        return sha256_file(path)
    return write_safetensors(path, cast_tensors(source, dtype), metadata, sha256=True)


def write_manifest(out: Path, known: Mapping[str, str], synthetic: bool) -> dict:
    """manifest.json: every other file's size and sha256, and whether the weights are synthetic (publish then asks
    for an explicit flag); `known` gives the sha256 of files hashed as they were written, the others are read and
    hashed here."""
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": known.get(p.name) or sha256_file(p)} for p in files},
        "synthetic": synthetic,
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def check_tokenizer(out: Path, reference: TensorFile, prompts: Sequence[str]) -> None:
    """The folder's tokenizer loads, and gives verify-outputs' token ids for the same prompts."""
    from transformers import CLIPTokenizer  # imported at start-up by main(): here it costs nothing

    ids = token_ids(CLIPTokenizer.from_pretrained(out), prompts, tensors="np")
    for name in ("input_ids", "attention_mask"):
        if not np.array_equal(ids[name], reference[name]):
            raise ExportError(
                f"the tokenizer in {out} gives {name} {ids[name].tolist()} for {list(prompts)}, verify-outputs used "
                f"{reference[name].tolist()}; check tokenizer_config.json and special_tokens_map.json against the tokenizer files"
            )


def check_loadable(out: Path) -> Architecture:
    """config.json describes a model whose state dict is exactly model.safetensors' tensors, as from_pretrained needs;
    returns the architecture it describes. The config's reading and the state dict's layout come from hf_layout, which
    tests hold to transformers' CLIPSegConfig and model, so the export need not import transformers' modelling code:
    seconds of start-up.

    A float32 export holds the verified model's very bytes (write_weights), so verify-outputs' comparison is this
    folder's: checking that it loads needs no second forward pass.
    """
    exported = TensorFile(out / WEIGHTS_FILE)
    try:
        arch = Architecture.from_config(json.loads((out / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, SchemaError) as exc:
        raise ExportError(f"{out / 'config.json'}: not a CLIPSeg config ({exc!r}); rerun build-model") from exc
    check_shapes(state_dict_shapes(arch), {name: spec.shape for name, spec in exported.specs.items()})
    return arch


def check_outputs(out: Path, arch: Architecture, reference: TensorFile, dtype: str, atol: float, threads: int) -> dict:
    """A float16/bfloat16 export (`dtype`) computes the reference outputs within `atol` (the error its weights' rounding
    makes) on verify-outputs' inputs; returns {output: {"max_abs_diff": exact figure, "passed": bool}}.

    Its weights are read back from the folder's model.safetensors, exactly as stored, mapped to the original layout and
    run through the reference forward pass (reference.py) of the architecture `arch` its config.json describes.
    That this layout is what transformers' model computes with, verify-outputs showed by running the converted model
    itself on the same weights before rounding (and tests/test_export.py runs each export with from_pretrained). The
    weights are computed in float32: what this folder holds is its weights, while the arithmetic a user's runtime does
    in float16 or bfloat16 is its own (a GPU's kernels round otherwise than a CPU's), and a CPU without bfloat16
    instructions emulates it about ten times slower.
    """
    import torch

    from .reference import reference_forward

    torch.set_num_threads(threads)  # params verify.threads: a fixed count keeps the last bits the same everywhere
    original = OriginalLayout(TensorFile(out / WEIGHTS_FILE), arch.original_shapes())
    try:
        with torch.inference_mode():
            got = reference_forward(original, arch, reference["pixel_values"], reference["input_ids"], torch.float32)
    except ValueError as exc:
        raise ExportError(f"the weights in {out / 'model.safetensors'} cannot run as the model its config.json describes "
                          f"({exc}); rerun build-model and export") from exc
    results = {}
    for name in OUTPUTS:
        diff = (got[name] - reference[name]).abs().max().item()
        results[name] = {"max_abs_diff": diff, "passed": diff <= atol}  # NaN compares False: fails
    # How many mask pixels (logit > 0, i.e. sigmoid > 0.5) differ from the reference's, per prompt.
    results["logits"]["mask_pixels_differ"] = [int(n) for n in ((got["logits"] > 0) != (reference["logits"] > 0)).flatten(1).sum(1)]
    failed = sorted(name for name, r in results.items() if not r["passed"])
    if failed:
        raise ExportError(
            f"the exported model in {out} (its {dtype} weights) "
            f"differs from the reference in {failed} beyond {atol} "
            f"({ {n: results[n]['max_abs_diff'] for n in failed} }); raise export.atol for this dtype in params.yaml "
            "or export float32"
        )
    return results


def check_export(out: Path, reference_file: Path, prompts: Sequence[str], dtype: str, atol: float, verify_report: Mapping, threads: int) -> dict:
    """Hold the folder to what verify-outputs checked; per output, the comparison with the reference as the report
    records it (see recording.recorded): for float32, verify-outputs' own, the weights being identical; for
    float16/bfloat16, the reference forward pass run on this folder's weights (its exact figures go to stderr)."""
    check_tokenizer(out, TensorFile(reference_file, framework="np"), prompts)
    arch = check_loadable(out)
    if dtype == "float32":
        results = {name: {**verify_report["outputs"][name], "checked_by": "verify-outputs (the same float32 weights)"}
                   for name in OUTPUTS}
        results["logits"]["mask_pixels_differ"] = [verify_report["checks"][f"text-{i}"]["mask_pixels_differ"]
                                                   for i in range(len(prompts))]
        return results
    results = check_outputs(out, arch, TensorFile(reference_file), dtype, atol, threads)
    print_figures("export", {f"{name} ({dtype})": (r["max_abs_diff"], atol) for name, r in results.items()})
    checked_by = f"the reference forward pass, in float32, on this folder's {dtype} weights"
    exported = {name: recorded(r["max_abs_diff"], None, r["passed"]) | {"checked_by": checked_by} for name, r in results.items()}
    exported["logits"]["mask_pixels_differ"] = results["logits"]["mask_pixels_differ"]
    return exported


def read_report(path: Path, stage: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: cannot read the {stage} report ({exc}); run `dvc repro` so the {stage} stage writes it") from exc
