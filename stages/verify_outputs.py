"""verify-outputs: the built Hugging Face model against an independent reference run on the original tensors.

Both get the same pixel values and token ids. The converted model runs its own forward pass (as a user calls it), with
hooks recording what each layer and sub-layer outputs; the reference (clipseg_pipeline.reference, plain torch, nothing
from transformers) computes the same entries from the original tensors; every element of every entry is compared
(clipseg_pipeline.comparison). The three outputs decide pass or fail against `verify.atol`; the first intermediate to
diverge names the weights to look at. Where a variant has published check values, they are checked too, with the
preprocessing they were computed with. Writes a metrics file (verdicts), a report (the same with every detail), the
reference outputs (for export's check) and one mask picture per prompt.

Same bytes on every machine: the reference runs in float64 (params verify.reference_dtype), so the float32 outputs it
stores and the mask pictures drawn from its logits do not depend on the CPU (docs/reproducibility.md). A difference
within tolerance is recorded as passed, without its CPU-dependent figure, which goes to stderr.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from clipseg_pipeline import params as params_mod
from clipseg_pipeline.comparison import (
    Check, Comparison, VerificationError, cannot_run, check_published, check_report, checks, compare, entries,
    failure_message, reference_outputs, traced_forward, write_checks,
)  # fmt: skip
from clipseg_pipeline.converted_model import load_model
from clipseg_pipeline.inputs import load_image, pixel_values, token_ids, tokenizer
from clipseg_pipeline.pictures import write_mask_pictures
from clipseg_pipeline.recording import FIGURE_DIGITS, OUTPUTS, print_figures, recorded
from clipseg_pipeline.runner import exit_now, run_stage, stage_parser
from clipseg_pipeline.tensor_io import TensorFile, write_json, write_safetensors

STAGE = "verify-outputs"


def report(comparisons: list[Comparison], published: Mapping[str, dict], uses: list[Check], atol: float, prompts: int,
           variant: str, reference_dtype: str, assumed: tuple[str, ...] = ()) -> dict:
    intermediates = [c for c in comparisons if c.name not in OUTPUTS]
    return {
        "stage": STAGE,
        "variant": variant,
        "note": (
            "An output passes when every element of |converted - reference| is within tolerance_atol; the reference runs "
            "in reference_dtype (float64: its outputs are the same bytes on every CPU). A passing output is recorded "
            "without its figures: they are the converted model's float32 rounding noise, whose last bits change with the "
            "CPU, so recording them would make this file differ between machines (verify-outputs prints them on stderr). "
            "A failing output records max_abs_diff (the largest "
            "|converted - reference|) and max_rel_diff (the same divided by the largest |reference|), rounded to "
            f"{FIGURE_DIGITS} significant digits. "
            "Intermediates pass within atol + rtol * their largest |reference| (params verify.rtol), which only serves "
            "to locate a fault, so rtol is not recorded here: changing it does not change what export quotes"
        ),
        "tolerance_atol": atol,
        "reference_dtype": reference_dtype,
        # Settings taken from the original code's defaults: verification runs them on both sides, so it cannot tell
        # whether the checkpoint was trained with them.
        "assumed": list(assumed),
        "prompts": prompts,
        "outputs": {c.name: recorded(c.max_abs_diff, c.max_rel_diff, c.passed) for c in comparisons if c.name in OUTPUTS},
        "intermediates_compared": len(intermediates),
        "intermediates_passed": all(c.passed for c in intermediates),
        "first_divergence": next((c.name for c in comparisons if not c.passed), None),
        "published_check": dict(published) or None,
        # Each prompt on its own: its outputs' verdicts and how many mask pixels (sigmoid > 0.5) differ from the
        # reference's.
        "checks": check_report(uses),
        "passed": all(c.passed for c in comparisons if c.name in OUTPUTS) and all(r["passed"] for r in published.values())
                  and all(check.passed for check in uses),
    }


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.verify_outputs", __doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="build-model's directory")
    parser.add_argument("--original", type=Path, required=True, help="download's folder (original.safetensors, tokenizer, image)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the reference outputs and mask pictures")
    parser.add_argument("--metrics", type=Path, required=True, help="the metrics JSON to write")
    parser.add_argument("--checks", type=Path, required=True, help="the folder for one metrics file per prompt")
    parser.add_argument("--report", type=Path, required=True, help="the JSON report to write")
    args = parser.parse_args(argv)

    def body() -> None:
        params = params_mod.load(args.params)
        model_params = params.model(args.variant)
        arch, proc, reference_dtype = model_params.architecture, params.processor, params.verify.reference_dtype
        dtype = getattr(torch, reference_dtype)
        torch.set_num_threads(params.verify.threads)
        image = load_image(args.original / "image")
        pixels = pixel_values(image, proc.image_size, proc.image_mean, proc.image_std)
        tok = tokenizer(args.original)
        ids = token_ids(tok, model_params.prompts)
        model = load_model(args.model)
        converted = traced_forward(model, entries(arch), pixels, ids["input_ids"], ids["attention_mask"])
        published = check_published(model, model_params.expected, image, tok, proc.image_size) if model_params.expected else {}
        del model  # its 600 MB of weights are done with: the reference's float64 entries need the room
        original = TensorFile(args.original / "original.safetensors")
        try:
            reference = reference_outputs(original, arch, pixels, ids["input_ids"], ids["attention_mask"], dtype)
        except ValueError as exc:
            raise cannot_run(original.path, args.variant, exc) from exc
        atol = params.verify.atol
        comparisons = compare(converted, reference, atol, params.verify.rtol)
        # Each prompt on its own: its outputs' verdicts, and how many of its mask pixels differ from the reference's.
        uses = checks("text", {name: converted[name] for name in OUTPUTS}, reference,
                      [{"prompt": prompt} for prompt in model_params.prompts], atol)
        print_figures(STAGE, {c.name: (c.max_abs_diff, c.tolerance) for c in comparisons if c.name in OUTPUTS})
        write_safetensors(args.out / "reference.safetensors", {
            "pixel_values": pixels, "input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"],
            **{name: reference[name].float().contiguous() for name in OUTPUTS},
        }, {"stage": STAGE, "variant": args.variant, "reference_dtype": f"{reference_dtype}, stored rounded to float32"})
        # The original's prediction (the converted model's agrees within atol), drawn in float64: from a float64
        # reference, the same pixels everywhere.
        write_mask_pictures(image, reference["logits"], model_params.prompts, args.out / "masks")
        full = report(comparisons, published, uses, atol, len(model_params.prompts), args.variant, reference_dtype,
                      model_params.assumed)
        write_json(args.report, full)
        write_checks(args.checks, uses)
        write_json(args.metrics, {"passed": full["passed"], "atol": atol, "prompts": len(model_params.prompts)})
        if message := failure_message(comparisons, published, entries(arch), uses):
            raise VerificationError(message)

    return run_stage(STAGE, args.variant, body, imports=("transformers.models.clipseg.modeling_clipseg",))


if __name__ == "__main__":
    exit_now(main())
