"""export: the built model + tokenizer files -> a Hugging Face model folder that loads offline with from_pretrained.

Writes model.safetensors (in the variant's export dtype), config.json, preprocessor_config.json (the published
processor: 352x352, bilinear, ImageNet mean/std), vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json and manifest.json (every file's size and sha256). The exported folder is then loaded back as a
user would, run on verify-outputs' inputs and compared with the reference outputs within the dtype's tolerance.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from . import params as params_mod
from .errors import PipelineError, run_stage
from .inputs import CONTEXT_LENGTH, RESAMPLE_BILINEAR
from .tensor_io import TensorFile, atomic_output, sha256_file, write_json, write_safetensors

STAGE = "export"
MANIFEST = "manifest.json"
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


def write_weights(model_dir: Path, out: Path, dtype: str, variant: str) -> None:
    source = TensorFile(model_dir / "model.safetensors")
    target = getattr(torch, dtype)
    tensors = {name: source[name].to(target) for name in source}
    write_safetensors(out / "model.safetensors", tensors, {"format": "pt", "stage": STAGE, "variant": variant, "dtype": dtype})
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = dtype
    write_json(out / "config.json", config)


def write_manifest(out: Path) -> dict:
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}}
    write_json(out / MANIFEST, manifest)
    return manifest


def check_export(out: Path, reference_file: Path, atol: float) -> dict:
    """Load the folder as a user would and compare its outputs with the reference on verify-outputs' inputs."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    from .verify_outputs import OUTPUTS, hf_outputs

    CLIPSegProcessor.from_pretrained(out)
    model = CLIPSegForImageSegmentation.from_pretrained(out).eval()
    reference = TensorFile(reference_file)
    dtype = next(model.parameters()).dtype
    got = hf_outputs(model, reference["pixel_values"].to(dtype), reference["input_ids"], reference["attention_mask"])
    results = {}
    for name in OUTPUTS:
        diff = (got[name].float() - reference[name].float()).abs().max().item()
        results[name] = {"max_abs_diff": diff, "passed": diff <= atol}
    failed = sorted(name for name, r in results.items() if not r["passed"])
    if failed:
        raise ExportError(
            f"the exported model in {out} differs from the reference in {failed} beyond {atol} "
            f"({ {n: results[n]['max_abs_diff'] for n in failed} }); raise verify.atol for this dtype or export float32"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = params_mod.stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="build-model's directory")
    parser.add_argument("--original", type=Path, required=True, help="download's folder (tokenizer files)")
    parser.add_argument("--reference", type=Path, required=True, help="verify-outputs' reference.safetensors")
    parser.add_argument("--out", type=Path, required=True, help="the Hugging Face model folder to write")
    parser.add_argument("--report", type=Path, required=True, help="the JSON report to write")
    args = parser.parse_args(argv)

    def body() -> None:
        from .tensor_io import round_figure
        from .verify_outputs import FIGURE_DIGITS

        params = params_mod.load(args.params)
        model = params.model(args.variant)
        # Build the folder beside its destination and move it into place only once it loads and checks out, so a
        # killed or failed export never leaves a half-written model folder at the output path.
        staging = args.out.with_name(f".{args.out.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            write_weights(args.model, staging, model.dtype, args.variant)
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(args.original / name, staging / name)
            proc = params.processor
            write_json(staging / "preprocessor_config.json", preprocessor_config(proc.image_size, list(proc.image_mean), list(proc.image_std)))
            write_json(staging / "tokenizer_config.json", tokenizer_config())
            write_json(staging / "special_tokens_map.json", SPECIAL_TOKENS)
            manifest = write_manifest(staging)
            atol = params.export_atol[model.dtype]
            results = check_export(staging, args.reference, atol)
            shutil.rmtree(args.out, ignore_errors=True)
            staging.rename(args.out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        write_json(args.report, {
            "stage": STAGE,
            "variant": args.variant,
            "dtype": model.dtype,
            "tolerance_atol": atol,
            "outputs": {n: {"max_abs_diff": round_figure(r["max_abs_diff"], FIGURE_DIGITS), "passed": r["passed"]} for n, r in results.items()},
            "files": len(manifest["files"]),
            "bytes": sum(f["bytes"] for f in manifest["files"].values()),
        })

    return run_stage(STAGE, args.variant, body)


if __name__ == "__main__":
    sys.exit(main())
