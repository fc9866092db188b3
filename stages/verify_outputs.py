"""verify-outputs: the built Hugging Face model against an independent reference run on the original tensors.

Both get the same pixel values and token ids; every output is compared in full (logits, conditional embeddings,
pooled output) together with the intermediates they share, so a failure names the first layer that diverged. Where a
variant has published check values, they are checked too, with the preprocessing they were computed with.
Writes a metrics JSON, the reference outputs (for export's dtype check) and one mask picture per prompt.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from . import params as params_mod
from .errors import PipelineError, run_stage
from .tensor_io import TensorFile, round_figure, write_json, write_safetensors

STAGE = "verify-outputs"
OUTPUTS = ("logits", "conditional_embeddings", "pooled_output")
# Figures are recorded to this many significant digits, so the metrics file is the same on every CPU.
FIGURE_DIGITS = 2


class VerificationError(PipelineError):
    """The converted model does not compute what the original computes."""


@dataclass(frozen=True)
class Comparison:
    name: str
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    passed: bool


def hf_outputs(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The converted model's outputs and intermediates, encoding the one image once for all prompts."""
    with torch.inference_mode():
        vision = model.clip.get_image_features(pixel_values=pixel_values, output_hidden_states=True)
        text = model.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        prompts = input_ids.shape[0]
        activations = [vision.hidden_states[i + 1].expand(prompts, -1, -1) for i in model.config.extract_layers]
        decoded = model.decoder(activations, text.pooler_output, output_hidden_states=True)
    # hidden_states[0] is the input of the first block (after pre_layrnorm): the reference's "vision.embeddings".
    out = {"vision.embeddings": vision.hidden_states[0]}
    out |= {f"vision.block{k}": h for k, h in enumerate(vision.hidden_states[1:])}
    # Text states past the end token differ by design (padding is masked here, not in the original): compare the rest.
    keep = attention_mask.bool()[..., None]
    out |= {f"text.block{k}": torch.where(keep, h, 0.0) for k, h in enumerate(text.hidden_states[1:])}
    out |= {f"decoder.step{i}": h for i, h in enumerate(decoded.hidden_states[1:])}
    out |= {"conditional_embeddings": text.pooler_output, "pooled_output": vision.pooler_output, "logits": decoded.logits}
    return out


def reference_outputs(original: Mapping[str, torch.Tensor], arch: Mapping, pixel_values, input_ids, attention_mask) -> dict[str, torch.Tensor]:
    from .reference import reference_forward

    with torch.inference_mode():
        out = reference_forward(original, arch, pixel_values, input_ids)
    keep = attention_mask.bool()[..., None]
    return {name: torch.where(keep, t, 0.0) if name.startswith("text.block") else t for name, t in out.items()}


def _order_key(name: str) -> tuple:
    # The order data flows through the model, so the first failing entry is where a fault starts.
    stage = ("vision.embeddings", "vision.block", "pooled_output", "text.block", "conditional_embeddings", "decoder.step", "logits")
    prefix = next(i for i, p in enumerate(stage) if name.startswith(p))
    number = re.search(r"(\d+)$", name)
    return prefix, int(number.group(1)) if number else 0


def compare(converted: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], atol: float, rtol: float) -> list[Comparison]:
    """Max abs and relative difference per shared tensor, in data-flow order.

    The three outputs pass when every element is within `atol`. Intermediates, whose scale grows through the network,
    pass within `atol + rtol * max|reference|`; they only serve to name where a fault starts.
    """
    shared = sorted(converted.keys() & reference.keys(), key=_order_key)
    missing = sorted(set(OUTPUTS) - set(shared))
    if missing:
        raise VerificationError(f"outputs {missing} were not produced by both models")
    results = []
    for name in shared:
        ours, ref = converted[name].float(), reference[name].float()
        if ours.shape != ref.shape:
            raise VerificationError(f"{name}: the converted model gives shape {list(ours.shape)}, the reference {list(ref.shape)}")
        diff = (ours - ref).abs()
        scale = ref.abs().max().item() if ref.numel() else 0.0
        max_abs = diff.max().item() if diff.numel() else 0.0
        max_rel = (diff / ref.abs().clamp_min(1e-6)).max().item() if diff.numel() else 0.0
        tolerance = atol if name in OUTPUTS else atol + rtol * scale
        passed = bool(torch.isfinite(ours).all()) and max_abs <= tolerance
        results.append(Comparison(name, max_abs, max_rel, tolerance, passed))
    return results


def check_published(model, expected: params_mod.Expected, image, tok, size: int) -> dict[str, dict]:
    """The published values, through the model's own forward (batch of prompts) and the original preprocessing."""
    from .inputs import pixel_values, token_ids

    pixels = pixel_values(image, size, expected.image_mean, expected.image_std)
    ids = token_ids(tok, expected.prompts, expected.padding)
    with torch.inference_mode():
        out = model(pixel_values=pixels.expand(len(expected.prompts), -1, -1, -1), **ids)
    n = len(expected.logits)
    got = {
        "logits": out.logits[0, :n, :n],
        "conditional_embeddings": out.conditional_embeddings[0, : len(expected.conditional_embeddings)],
        "pooled_output": out.pooled_output[0, : len(expected.pooled_output)],
    }
    want = {"logits": expected.logits, "conditional_embeddings": expected.conditional_embeddings, "pooled_output": expected.pooled_output}
    results = {}
    for name, tensor in got.items():
        diff = (tensor - torch.tensor(want[name], dtype=tensor.dtype)).abs().max().item()
        results[name] = {"max_abs_diff": round_figure(diff, FIGURE_DIGITS), "tolerance": expected.atol, "passed": diff <= expected.atol}
    return results


def failure_message(comparisons: list[Comparison], published: Mapping[str, dict]) -> str | None:
    failed_outputs = [c for c in comparisons if c.name in OUTPUTS and not c.passed]
    failed_published = sorted(name for name, r in published.items() if not r["passed"])
    if not failed_outputs and not failed_published:
        return None
    parts = []
    if failed_outputs:
        first = next(c for c in comparisons if not c.passed)
        worst = ", ".join(f"{c.name} (max abs diff {c.max_abs_diff:.3g} > {c.tolerance:.3g})" for c in failed_outputs)
        parts.append(
            f"the converted model differs from the reference in {worst}; first divergence at {first.name} "
            f"(max abs diff {first.max_abs_diff:.3g}, tolerance {first.tolerance:.3g}): look at the weights that feed it"
        )
    if failed_published:
        parts.append(f"the published check values differ for {failed_published}: {dict(published)}")
    return "; ".join(parts)


def metrics(comparisons: list[Comparison], published: Mapping[str, dict], atol: float, prompts: int) -> dict:
    def figure(c: Comparison) -> dict:
        return {"max_abs_diff": round_figure(c.max_abs_diff, FIGURE_DIGITS), "max_rel_diff": round_figure(c.max_rel_diff, FIGURE_DIGITS), "passed": c.passed}

    return {
        "stage": STAGE,
        "note": f"differences rounded to {FIGURE_DIGITS} significant digits so the file is identical on every CPU",
        "tolerance_atol": atol,
        "prompts": prompts,
        "outputs": {c.name: figure(c) for c in comparisons if c.name in OUTPUTS},
        "intermediates_passed": all(c.passed for c in comparisons if c.name not in OUTPUTS),
        "first_divergence": next((c.name for c in comparisons if not c.passed), None),
        "published_check": dict(published) or None,
        "passed": all(c.passed for c in comparisons if c.name in OUTPUTS) and all(r["passed"] for r in published.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = params_mod.stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="build-model's directory")
    parser.add_argument("--original", type=Path, required=True, help="download's folder (original.safetensors, tokenizer, image)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the reference outputs and mask pictures")
    parser.add_argument("--metrics", type=Path, required=True, help="the metrics JSON to write")
    args = parser.parse_args(argv)

    def body() -> None:
        from transformers import CLIPSegForImageSegmentation

        from .inputs import load_image, pixel_values, token_ids, tokenizer
        from .pictures import write_mask_pictures

        params = params_mod.load(args.params)
        model_params = params.model(args.variant)
        image = load_image(args.original / "image")
        tok = tokenizer(args.original)
        proc = params.processor
        pixels = pixel_values(image, proc.image_size, proc.image_mean, proc.image_std)
        ids = token_ids(tok, model_params.prompts)
        model = CLIPSegForImageSegmentation.from_pretrained(args.model).eval()
        converted = hf_outputs(model, pixels, ids["input_ids"], ids["attention_mask"])
        reference = reference_outputs(TensorFile(args.original / "original.safetensors"), model_params.architecture, pixels, ids["input_ids"], ids["attention_mask"])
        atol, rtol = params.verify.atol, params.verify.rtol
        comparisons = compare(converted, reference, atol, rtol)
        published = check_published(model, model_params.expected, image, tok, proc.image_size) if model_params.expected else {}
        args.out.mkdir(parents=True, exist_ok=True)
        write_safetensors(args.out / "reference.safetensors", {
            "pixel_values": pixels, "input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"],
            **{name: reference[name].contiguous() for name in OUTPUTS},
        }, {"stage": STAGE, "variant": args.variant})
        write_mask_pictures(image, converted["logits"], model_params.prompts, args.out / "masks")
        write_json(args.metrics, metrics(comparisons, published, atol, len(model_params.prompts)))
        message = failure_message(comparisons, published)
        if message:
            raise VerificationError(message)

    return run_stage(STAGE, args.variant, body)


if __name__ == "__main__":
    sys.exit(main())
