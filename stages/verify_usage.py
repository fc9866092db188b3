"""verify-usage: the built model used the other ways users use it, against the reference, prompt by prompt.

verify-outputs holds the converted model to the original on one image and text prompts. This stage checks what it
does not: the model conditioned on image prompts (crops of the reference image; the original runs a prompt image
through its own vision tower and takes its projected class token, transformers through `conditional_pixel_values`), and
a batch of two different images (the reference image and its mirror image), each with its own text prompt, in one
forward call, against the reference run image by image: nothing may mix across the batch. The converted model runs
its own forward, as a user calls it. Every element of every output must be within `verify.atol`; for each prompt the
stage records its verdict and how many mask pixels (sigmoid > 0.5) differ from the reference's (one metrics file per
prompt), and draws the reference's mask for each image prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clipseg_pipeline import params as params_mod
from clipseg_pipeline.comparison import (
    VerificationError, batch_outputs, cannot_run, check_report, checks, failure_message, image_prompt_outputs,
    reference_batch, write_checks,
)  # fmt: skip
from clipseg_pipeline.converted_model import load_model
from clipseg_pipeline.inputs import load_image, pixel_values, prompt_pixel_values, token_ids, tokenizer
from clipseg_pipeline.pictures import write_mask_pictures
from clipseg_pipeline.reference import image_prompt_forward
from clipseg_pipeline.recording import print_figures
from clipseg_pipeline.runner import exit_now, run_stage, stage_parser
from clipseg_pipeline.tensor_io import TensorFile, write_json

STAGE = "verify-usage"
# The two images of the batch, as the report names them.
BATCH_IMAGES = ("the reference image", "the reference image mirrored")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.verify_usage", __doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="build-model's directory")
    parser.add_argument("--original", type=Path, required=True, help="download's folder (original.safetensors, tokenizer, image)")
    parser.add_argument("--out", type=Path, required=True, help="the folder for the image prompts' mask pictures")
    parser.add_argument("--metrics", type=Path, required=True, help="the folder for one metrics file per prompt")
    parser.add_argument("--report", type=Path, required=True, help="the JSON report to write")
    args = parser.parse_args(argv)

    def body() -> None:
        params = params_mod.load(args.params)
        model_params = params.model(args.variant)
        arch, proc, reference_dtype = model_params.architecture, params.processor, params.verify.reference_dtype
        dtype, atol = getattr(torch, reference_dtype), params.verify.atol
        torch.set_num_threads(params.verify.threads)
        image = load_image(args.original / "image")
        pixels = pixel_values(image, proc.image_size, proc.image_mean, proc.image_std)
        boxes = model_params.image_prompts
        prompts = (prompt_pixel_values(image, boxes, proc.image_size, proc.image_mean, proc.image_std,
                                       f"models.{args.variant}.verify.image_prompts") if boxes else None)
        batch_prompts = [model_params.prompts[0], model_params.prompts[1 % len(model_params.prompts)]]
        batch_pixels, batch_ids = torch.cat([pixels, pixels.flip(-1)]), token_ids(tokenizer(args.original), batch_prompts)
        model = load_model(args.model)
        converted_image = image_prompt_outputs(model, pixels, prompts) if boxes else {}
        converted_batch = batch_outputs(model, batch_pixels, batch_ids["input_ids"], batch_ids["attention_mask"])
        del model  # the reference's float64 entries need the room
        original = TensorFile(args.original / "original.safetensors")
        try:
            reference_image = image_prompt_forward(original, arch, pixels, prompts, dtype) if boxes else {}
            reference_rows = reference_batch(original, arch, batch_pixels, batch_ids["input_ids"], dtype)
        except ValueError as exc:
            raise cannot_run(original.path, args.variant, exc) from exc
        uses = [
            *checks("image", converted_image, reference_image, [{"box": list(box)} for box in boxes], atol),
            *checks("batch", converted_batch, reference_rows,
                    [{"prompt": prompt, "image": name} for prompt, name in zip(batch_prompts, BATCH_IMAGES)], atol),
        ]
        print_figures(STAGE, {f"{check.name} {c.name}": (c.max_abs_diff, c.tolerance)
                              for check in uses for c in check.comparisons})
        if boxes:  # the original's prediction for each image prompt, drawn in float64 (the same pixels everywhere)
            write_mask_pictures(image, reference_image["logits"],
                                [f"image prompt: the crop {list(box)}" for box in boxes], args.out)
        write_json(args.report, {
            "stage": STAGE,
            "variant": args.variant,
            "tolerance_atol": atol,
            "reference_dtype": reference_dtype,
            "checks": check_report(uses),
            "passed": all(check.passed for check in uses),
        })
        write_checks(args.metrics, uses)
        if message := failure_message([], {}, {}, uses):
            raise VerificationError(message)

    return run_stage(STAGE, args.variant, body, imports=("transformers.models.clipseg.modeling_clipseg",))


if __name__ == "__main__":
    exit_now(main())
