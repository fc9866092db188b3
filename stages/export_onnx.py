"""export-onnx: the verified model -> an ONNX model folder that onnxruntime and transformers.js load as it is.

Writes onnx/model.onnx (float32), onnx/model_fp16.onnx and onnx/model_quantized.onnx (8-bit weights), as params
onnx.files selects, with config.json, preprocessor_config.json and tokenizer_config.json (as export writes them), tokenizer.json
(the fast tokenizer, from the same vocab.json and merges.txt) and README.md (the card). onnxruntime runs every file on
verify-outputs' inputs, one image for all prompts and one image per prompt, and every logit is compared with the
reference's: float32 within verify.atol, fp16 and q8 within onnx.atol and onnx.mask_agreement. The folder is assembled
beside its destination and moved into place only once every file passes. The same inputs give the same bytes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from clipseg_pipeline import onnx_card
from clipseg_pipeline import onnx_export as ox
from clipseg_pipeline import params as params_mod
from clipseg_pipeline.converted_model import load_model
from clipseg_pipeline.hf_export import export_config, preprocessor_config, tokenizer_config
from clipseg_pipeline.inputs import tokenizer
from clipseg_pipeline.model_card import project_version
from clipseg_pipeline.recording import FIGURE_DIGITS, print_figures, recorded
from clipseg_pipeline.runner import exit_now, run_stage, stage_parser
from clipseg_pipeline.tensor_io import TensorFile, atomic_output, round_figure, sha256_file, write_json

STAGE = "export-onnx"


def measured(check: ox.FileCheck, dtype: str) -> dict:
    """A file's comparison as the report records it. float32's difference is rounding noise whose last bits follow the
    CPU: recorded as passed, like verify-outputs'. fp16's and q8's are the rounding of their weights, orders of
    magnitude larger, recorded to FIGURE_DIGITS significant digits (and the mask agreement to 0.01%)."""
    if dtype == "fp32":
        return recorded(check.max_abs_diff, None, check.passed) | {"mask_agreement": round(check.mask_agreement, 4)}
    return {"max_abs_diff": round_figure(check.max_abs_diff, FIGURE_DIGITS), "mask_agreement": round(check.mask_agreement, 4),
            "passed": check.passed}


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.export_onnx", __doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="build-model's directory (the float32 weights)")
    parser.add_argument("--original", type=Path, required=True, help="download's folder (the tokenizer files)")
    parser.add_argument("--reference", type=Path, required=True, help="verify-outputs' reference.safetensors")
    parser.add_argument("--verify-report", type=Path, required=True, help="verify-outputs' report")
    parser.add_argument("--out", type=Path, required=True, help="the ONNX model folder to write")
    parser.add_argument("--metrics", type=Path, required=True, help="the metrics JSON to write")
    parser.add_argument("--report", type=Path, required=True, help="the JSON report to write")
    args = parser.parse_args(argv)
    # Built beside its destination and moved into place only once every file checks out: a failed or killed run never
    # leaves a file that was not verified at the output path.
    staging = args.out.with_name(f".{args.out.name}.staging")

    def body() -> None:
        import torch

        params = params_mod.load(args.params)
        model_params, settings = params.model(args.variant), params.onnx
        verify_report = json.loads(args.verify_report.read_text(encoding="utf-8"))
        if verify_report.get("passed") is not True:
            raise ox.OnnxExportError(f"{args.verify_report} says the model did not pass verify-outputs; only a verified "
                                     "model is exported. Fix the conversion and rerun `dvc repro`")
        torch.set_num_threads(params.verify.threads)
        stored = TensorFile(args.reference, framework="np")
        reference = {name: stored[name] for name in ("input_ids", "attention_mask", "pixel_values", "logits")}
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "onnx").mkdir(parents=True)

        # The same side files as export's folder, written from the same inputs (not copied from it: a change of the
        # export's dtype or tolerance does not make these graphs again).
        config = json.loads((args.model / "config.json").read_text(encoding="utf-8"))
        write_json(staging / "config.json", export_config(config, "float32"))
        proc = params.processor
        write_json(staging / "preprocessor_config.json",
                   preprocessor_config(proc.image_size, list(proc.image_mean), list(proc.image_std)))
        write_json(staging / "tokenizer_config.json", tokenizer_config())
        with atomic_output(staging / "tokenizer.json", "w") as handle:
            handle.write(ox.tokenizer_json(tokenizer(args.original)))
        ox.check_tokenizer(staging, reference, list(model_params.prompts))

        # The float32 graph is the source of the others; kept only when it is one of the files asked for.
        float32_path = staging / ox.FILES["fp32"] if "fp32" in settings.files else staging / ".work" / "model.onnx"
        ox.write_model(ox.export_float32(load_model(args.model), reference), float32_path)
        if "fp16" in settings.files:
            ox.write_model(ox.to_float16(float32_path), staging / ox.FILES["fp16"])
        if "q8" in settings.files:
            ox.quantize_q8(float32_path, staging / ox.FILES["q8"], staging / ".work" / "quantized.onnx")
        shutil.rmtree(staging / ".work", ignore_errors=True)

        tolerances = {"fp32": ox.Tolerance(params.verify.atol, 1.0)} | {
            d: ox.Tolerance(settings.atol[d], settings.mask_agreement[d]) for d in params_mod.ONNX_ROUNDED}
        checks = [c for dtype in settings.files
                  for c in ox.check_file(staging / ox.FILES[dtype], dtype, reference, tolerances[dtype], params.verify.threads)]
        print_figures(STAGE, {f"logits ({c.dtype}, {c.form}), mask agreement {c.mask_agreement:.4%}":
                              (c.max_abs_diff, tolerances[c.dtype].atol) for c in checks})
        if message := ox.failure_message(checks, tolerances):
            raise ox.OnnxExportError(message)

        files = []
        for dtype in settings.files:
            path = staging / ox.FILES[dtype]
            worst = max((c for c in checks if c.dtype == dtype), key=lambda c: (c.max_abs_diff, -c.mask_agreement))
            files.append({
                "dtype": dtype, "path": ox.FILES[dtype], "bytes": path.stat().st_size, "sha256": sha256_file(path),
                "atol": tolerances[dtype].atol, "least_mask_agreement": tolerances[dtype].mask_agreement,
                "checks": {c.form: measured(c, dtype) for c in checks if c.dtype == dtype}, "worst": measured(worst, dtype),
            })
        card = onnx_card.render(onnx_card.OnnxCardInputs(
            variant=args.variant, base_model=model_params.base_model, synthetic=model_params.synthetic,
            image_size=params.processor.image_size, prompts=model_params.prompts,
            reference_dtype=verify_report.get("reference_dtype", "(unknown)"),
            files=[f | {
                "mask_floor": f"{f['least_mask_agreement']:.2%}",
                "measured_diff": f"within {f['atol']:g}" if f["dtype"] == "fp32" else f"{f['worst']['max_abs_diff']:g}",
                "measured_agreement": f"{f['worst']['mask_agreement']:.2%}",
            } for f in files],
            project_version=project_version(),
        ))
        with atomic_output(staging / onnx_card.CARD_FILE, "w") as handle:
            handle.write(card)
        shutil.rmtree(args.out, ignore_errors=True)
        staging.rename(args.out)
        total = sum(f["bytes"] for f in files)
        write_json(args.report, {
            "stage": STAGE,
            "variant": args.variant,
            "note": (
                "Each file run by onnxruntime (CPU) on verify-outputs' inputs in two forms (one image for every prompt; "
                "the image repeated for each prompt); every logit compared with the reference's. fp32 passes within "
                "verify.atol and is recorded as passed (its figure is float32 noise whose last bits follow the CPU); "
                f"fp16 and q8 within onnx.atol, their figures rounded to {FIGURE_DIGITS} significant digits. "
                "mask_agreement: the share of pixels whose mask (logit > 0) matches the reference's"
            ),
            "files": files,
        })
        write_json(args.metrics, {"passed": True, "files": len(files), "bytes": total})
        print(f"{STAGE} {args.variant}: the ONNX folder is {args.out}/ ({len(files)} graphs, {total / 1e6:.1f} MB)",
              file=sys.stderr)

    try:
        return run_stage(STAGE, args.variant, body, imports=("transformers.models.clipseg.modeling_clipseg",))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    exit_now(main())
