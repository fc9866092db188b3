"""verify-outputs: the built Hugging Face model against an independent reference run on the original tensors.

Both get the same pixel values and token ids. The converted model runs its own forward pass (as a user calls it), with
hooks recording what each layer and sub-layer outputs; the reference (stages.reference) computes the same entries from
the original tensors. Every element of every entry is compared. The three outputs (logits, conditional embeddings,
pooled output) decide pass or fail against `verify.atol`; the intermediates locate a fault: in the order data flows
through the model, the first entry that diverges while every entry before it agrees names the converted weights, and
the original tensors they were made from, to look at. Where a variant has published check values, they are checked
too, with the preprocessing they were computed with.
Writes a metrics JSON, the reference outputs (for export's check) and one mask picture per prompt.

The reference's image side (its vision tower: in float64, most of the reference's cost) needs neither the tokenizer nor
transformers, so it runs in a forked process, on one thread, while this one imports transformers' modelling code
(write_vision_reference, stages.forked); the converted model then gets the very pixel values it was given.

Same bytes on every machine: the reference runs in float64 (params verify.reference_dtype), so the float32 outputs it
stores and the mask pictures drawn from its logits do not depend on the CPU's instruction set or thread count (float64
rounding is 500 million times finer than a float32 step); a float32 reference takes half the time, and its bytes are
the same only on CPUs with the same instruction set. The converted model runs in float32, as users run it, and the
last bits of its outputs do depend on the CPU; so a difference within tolerance is recorded as passed, without its
figure, and the exact figures are printed on stderr. A difference beyond tolerance is recorded to FIGURE_DIGITS
significant digits.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from . import params as params_mod
from .errors import PipelineError, exit_now, keep_freed_memory, run_stage
from .forked import Forked
from .hf_layout import WEIGHTS_FILE
from .inputs import load_image, pixel_values, token_ids, tokenizer
from .pictures import write_mask_pictures
from .reference import encode_image, forward_from_vision, reference_forward
from .recording import FIGURE_DIGITS, OUTPUTS, print_figures, recorded
from .tensor_io import TensorFile, write_json, write_safetensors

STAGE = "verify-outputs"
ENTRY_ORDER = "entries"  # write_vision_reference's metadata key: its entries' names, in the order computed


class VerificationError(PipelineError):
    """The converted model does not compute what the original computes."""


# ---- the converted model's entries: one row per Hugging Face module whose output the reference also computes -------


@dataclass(frozen=True)
class Probe:
    pattern: str  # full match against a name from model.named_modules()
    entry: str  # str.format template over the pattern's groups (and {cond}, the conditional layer)
    takes_input: bool = False  # record what goes into the module rather than what comes out


PROBES: tuple[Probe, ...] = (
    Probe(r"clip\.vision_model\.embeddings",                               "vision.embeddings"),
    Probe(r"clip\.vision_model\.pre_layrnorm",                             "vision.pre_norm"),
    Probe(r"clip\.(vision|text)_model\.encoder\.layers\.(\d+)",            "{0}.block{1}"),
    Probe(r"clip\.(vision|text)_model\.encoder\.layers\.(\d+)\.layer_norm1", "{0}.block{1}.norm1"),
    Probe(r"clip\.(vision|text)_model\.encoder\.layers\.(\d+)\.self_attn", "{0}.block{1}.attention"),
    Probe(r"clip\.(vision|text)_model\.encoder\.layers\.(\d+)\.layer_norm2", "{0}.block{1}.norm2"),
    Probe(r"clip\.(vision|text)_model\.encoder\.layers\.(\d+)\.mlp",       "{0}.block{1}.mlp"),
    Probe(r"clip\.vision_model\.post_layernorm",                           "vision.post_norm"),
    Probe(r"clip\.text_model\.embeddings",                                 "text.embeddings"),
    Probe(r"clip\.text_model\.final_layer_norm",                           "text.final_norm"),
    # The text model picks the pooled token inline, not in a module: what enters the projection is that pick.
    Probe(r"clip\.text_projection",                                        "text.pooled", takes_input=True),
    Probe(r"decoder\.reduces\.(\d+)",                                      "decoder.step{0}.reduce"),
    Probe(r"decoder\.film_(mul|add)",                                      "decoder.step{cond}.film_{0}"),
    Probe(r"decoder\.layers\.(\d+)",                                       "decoder.step{0}"),
    Probe(r"decoder\.layers\.(\d+)\.self_attn",                            "decoder.step{0}.attention"),
    Probe(r"decoder\.layers\.(\d+)\.layer_norm1",                          "decoder.step{0}.norm1"),
    Probe(r"decoder\.layers\.(\d+)\.mlp",                                  "decoder.step{0}.mlp"),
    Probe(r"decoder\.layers\.(\d+)\.layer_norm2",                          "decoder.step{0}.norm2"),
    # The refined decoder's Conv2d and first ConvTranspose2d (indices 1 and 3 are ReLUs).
    Probe(r"decoder\.transposed_convolution\.([02])",                      "logits.trans_conv{0}"),
)  # fmt: skip


def _tower_sources(tower: str, hf: str, original: str) -> tuple[tuple[str, str, str], ...]:
    layer, block = f"{hf}.encoder.layers.{{0}}", f"{original}transformer.resblocks.{{0}}"
    return (
        (rf"{tower}\.block(\d+)\.norm1",     f"{layer}.layer_norm1",                          f"{block}.ln_1"),
        (rf"{tower}\.block(\d+)\.attention", f"{layer}.self_attn (q_proj, k_proj, v_proj, out_proj)",
                                             f"{block}.attn (in_proj_weight/in_proj_bias split into q, k, v; out_proj)"),
        (rf"{tower}\.block(\d+)\.norm2",     f"{layer}.layer_norm2",                          f"{block}.ln_2"),
        (rf"{tower}\.block(\d+)\.mlp",       f"{layer}.mlp (fc1, fc2)",                       f"{block}.mlp (c_fc, c_proj)"),
        (rf"{tower}\.block(\d+)",            layer,                                           block),
    )  # fmt: skip


# What computes each entry: (entry pattern, the converted weights or setting, the original tensors or rule). When an
# entry is the first to diverge, these are where the fault is.
SOURCES: tuple[tuple[str, str, str], ...] = (
    (r"vision\.embeddings",  "clip.vision_model.embeddings (patch_embedding, class_embedding, position_embedding)",
                             "visual.conv1, visual.class_embedding, visual.positional_embedding"),
    (r"vision\.pre_norm",    "clip.vision_model.pre_layrnorm",   "visual.ln_pre"),
    *_tower_sources("vision", "clip.vision_model", "visual."),
    (r"vision\.post_norm",   "clip.vision_model.post_layernorm", "visual.ln_post"),
    (r"pooled_output",       "clip.visual_projection",           "visual.proj (transposed: the original computes x @ proj)"),
    (r"text\.embeddings",    "clip.text_model.embeddings (token_embedding, position_embedding)",
                             "token_embedding, positional_embedding"),
    *_tower_sources("text", "clip.text_model", ""),
    (r"text\.final_norm",    "clip.text_model.final_layer_norm", "ln_final"),
    (r"text\.pooled",        "pooling position, set by config.json text_config.eos_token_id (2 pools at the argmax of "
                             "the ids, as the original does)", "end token's position (the argmax of the ids)"),
    (r"conditional_embeddings", "clip.text_projection",          "text_projection (transposed: the original computes x @ proj)"),
    (r"decoder\.step(\d+)\.reduce", "decoder.reduces.{0} (and config.json extract_layers, which picks its input)",
                                    "reduces.{0}"),
    (r"decoder\.step\d+\.film_(mul|add)", "decoder.film_{0}",     "film_{0}"),
    (r"decoder\.step(\d+)\.attention", "decoder.layers.{0}.self_attn (q_proj, k_proj, v_proj, out_proj)",
                                       "blocks.{0}.self_attn (in_proj_weight/in_proj_bias split into q, k, v; out_proj)"),
    (r"decoder\.step(\d+)\.norm1", "decoder.layers.{0}.layer_norm1", "blocks.{0}.norm1"),
    (r"decoder\.step(\d+)\.mlp",   "decoder.layers.{0}.mlp (fc1, fc2)", "blocks.{0}.linear1, blocks.{0}.linear2"),
    (r"decoder\.step(\d+)\.norm2", "decoder.layers.{0}.layer_norm2", "blocks.{0}.norm2"),
    (r"decoder\.step(\d+)",        "decoder.layers.{0}",             "blocks.{0}"),
    (r"logits\.trans_conv(\d)",    "decoder.transposed_convolution.{0}", "trans_conv.{0}"),
    (r"logits",              "decoder.transposed_convolution (and config.json use_complex_transposed_convolution)",
                             "trans_conv"),
)  # fmt: skip


def sources(entry: str) -> tuple[str, str]:
    """The converted weights and the original tensors that compute `entry`."""
    for pattern, hf, original in SOURCES:
        if m := re.fullmatch(pattern, entry):
            return hf.format(*m.groups()), original.format(*m.groups())
    raise KeyError(f"no row of SOURCES describes the entry {entry!r}")


@dataclass(frozen=True)
class Comparison:
    name: str
    max_abs_diff: float  # inf when the converted model gives NaN or Inf
    max_rel_diff: float  # max abs diff / max |reference|
    tolerance: float
    passed: bool


def _record(store: dict[str, torch.Tensor], entry: str, takes_input: bool):
    def hook(module, args, output=None):  # a pre-hook gets no output
        value = args[0] if takes_input else output
        store[entry] = (value[0] if isinstance(value, tuple) else value).detach()  # attention also returns weights

    return hook


def mask_padding(entries: Mapping[str, torch.Tensor], attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero the text states past each prompt's end: the converted model masks padding, the original never sees any
    (its causal mask keeps padding from reaching the end token), so only those positions differ, by design."""
    keep = attention_mask.bool()[..., None]
    return {name: torch.where(keep, t, 0.0) if name.startswith("text.") and t.ndim == 3 else t for name, t in entries.items()}


def hf_outputs(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The converted model's three outputs for one image [1, 3, H, W] and P prompts, the image encoded once for all.

    The calls CLIPSegForImageSegmentation.forward makes, without encoding the image again for every prompt (the vision
    tower is most of the cost); verify-outputs and segment use it. The published checks run the model's own
    forward, as a user calls it (`check_published`).
    """
    with torch.inference_mode():
        vision = model.clip.get_image_features(pixel_values=pixel_values, interpolate_pos_encoding=True, output_hidden_states=True)
        text = model.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        prompts = input_ids.shape[0]
        activations = [vision.hidden_states[i + 1].expand(prompts, -1, -1) for i in model.config.extract_layers]
        decoded = model.decoder(activations, text.pooler_output)
    return {"logits": decoded.logits, "conditional_embeddings": text.pooler_output, "pooled_output": vision.pooler_output.expand(prompts, -1)}


def traced_forward(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The converted model's three outputs for one image and P prompts (`hf_outputs`) and, under the reference's names
    (PROBES), what each layer and sub-layer computed on the way; the one image's entries serve every prompt."""
    prompts = input_ids.shape[0]
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for module_name, module in model.named_modules():
        for probe in PROBES:
            if m := re.fullmatch(probe.pattern, module_name):
                entry = probe.entry.format(*m.groups(), cond=model.config.conditional_layer)
                register = module.register_forward_pre_hook if probe.takes_input else module.register_forward_hook
                handles.append(register(_record(captured, entry, probe.takes_input)))
    try:
        with torch.inference_mode():
            out = hf_outputs(model, pixel_values, input_ids, attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    captured = {name: t.expand(prompts, *t.shape[1:]) if t.shape[0] == 1 else t for name, t in captured.items()}
    return mask_padding(captured | out, attention_mask)


def reference_outputs(original: Mapping[str, torch.Tensor], arch: Mapping, pixel_values, input_ids, attention_mask,
                      dtype: torch.dtype, vision: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The reference's entries in `dtype`, in the order it computes them; the one image's entries serve every prompt.
    `vision`, when given, is encode_image's part already computed from `pixel_values` (see write_vision_reference)."""
    prompts = input_ids.shape[0]
    with torch.inference_mode():
        if vision is None:
            out = reference_forward(original, arch, pixel_values, input_ids, dtype)
        else:
            out = forward_from_vision(original, arch, vision, input_ids, dtype)
    out = {name: t.expand(prompts, *t.shape[1:]) if t.shape[0] == 1 else t for name, t in out.items()}
    return mask_padding(out, attention_mask)


def write_vision_reference(original: Path, arch: Mapping, image: Path, processor: params_mod.Processor,
                           dtype: str, out: Path) -> None:
    """The reference's image side, on one thread: the pixel values both models get, and encode_image's entries in
    `dtype` (not rounded), written to `out`. It needs neither the tokenizer nor transformers, so the stage runs it in a
    forked process while it imports transformers' modelling code (stages.forked): the vision tower in float64 is most
    of the reference, and the other core is idle during the imports."""
    keep_freed_memory()  # a forked process does not inherit what run_stage sets (it runs after the fork)
    torch.set_num_threads(1)  # the other core imports; and see stages.forked on thread pools after a fork
    pixels = pixel_values(load_image(image), processor.image_size, processor.image_mean, processor.image_std)
    with torch.inference_mode():
        vision = encode_image(TensorFile(original), arch, pixels, getattr(torch, dtype))
    # A safetensors file keeps its tensors in its own order; the comparison needs the reference's (the order data flows).
    write_safetensors(out, {"pixel_values": pixels, **vision}, {ENTRY_ORDER: json.dumps(list(vision))})


def read_vision_reference(path: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What write_vision_reference wrote: the pixel values, and encode_image's entries in the order it computed them."""
    written = TensorFile(path)
    return written["pixel_values"], {name: written[name] for name in json.loads(written.metadata[ENTRY_ORDER])}


def _one_row_if_shared(ours: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first row of both entries when both are one image's entry expanded to every prompt (stride 0 on the batch
    dimension: every row is the same row), else both unchanged: the vision tower's entries, most of the comparing,
    are then differenced once instead of once per prompt, with the same maxima."""
    if ours.ndim and ours.stride(0) == 0 and ref.stride(0) == 0:
        return ours[:1], ref[:1]
    return ours, ref


def compare(converted: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], atol: float, rtol: float) -> list[Comparison]:
    """Max abs and relative difference of every entry, in the reference's order (the order data flows).

    The outputs pass when every element is within `atol`. Intermediates, whose scale grows through the network, pass
    within `atol + rtol * max|reference|`; they only serve to name where a fault starts. The relative difference is
    taken against the entry's largest reference value: element by element it would divide by values near zero.
    """
    one_sided = sorted(converted.keys() ^ reference.keys())
    if one_sided:
        raise VerificationError(
            f"entries computed by only one side: {one_sided}. The model's config.json and the variant's architecture in "
            "params.yaml describe different models: rebuild the model (build-model) from this architecture"
        )
    results = []
    for name in reference:
        ours, ref = converted[name], reference[name]
        if ours.shape != ref.shape:
            raise VerificationError(f"{name}: the converted model gives shape {list(ours.shape)}, the reference {list(ref.shape)}")
        ours, ref = _one_row_if_shared(ours, ref)
        # Differenced in float64: a float64 reference (the default) is not copied by double(), and subtracting it
        # promotes the converted float32 entry exactly, element by element, without a float64 copy of the entry.
        ref = ref.double()
        scale = ref.abs().max().item() if ref.numel() else 0.0
        max_abs = (ours - ref).abs_().max().item() if ref.numel() else 0.0
        if not math.isfinite(max_abs):  # max() propagates NaN: any NaN or Inf in the converted entry lands here
            max_abs = max_rel = math.inf
        else:
            max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else math.inf)
        tolerance = atol if name in OUTPUTS else atol + rtol * scale
        results.append(Comparison(name, max_abs, max_rel, tolerance, max_abs <= tolerance))
    return results


def check_published(model, expected: params_mod.Expected, image, tok, size: int) -> dict[str, dict]:
    """The published values, through the model's own forward, as a user calls it, and the original preprocessing.

    They are the first prompt's row of a batch of expected.prompts (the image repeated for each). Rows of a batch are
    computed independently, so only that row is run, its ids tokenized with the whole batch (the padding as it was):
    the image goes through the vision tower once, not once per prompt."""
    pixels = pixel_values(image, size, expected.image_mean, expected.image_std)
    ids = {name: tensor[:1] for name, tensor in token_ids(tok, expected.prompts, expected.padding).items()}
    with torch.inference_mode():
        out = model(pixel_values=pixels, **ids)
    n = len(expected.logits)
    got = {
        "logits": out.logits[0, :n, :n],
        "conditional_embeddings": out.conditional_embeddings[0, : len(expected.conditional_embeddings)],
        "pooled_output": out.pooled_output[0, : len(expected.pooled_output)],
    }
    want = {"logits": expected.logits, "conditional_embeddings": expected.conditional_embeddings, "pooled_output": expected.pooled_output}
    results, exact = {}, {}
    for name, tensor in got.items():
        diff = (tensor - torch.tensor(want[name], dtype=tensor.dtype)).abs().max().item()
        passed = diff <= expected.atol  # NaN compares False: fails
        exact[f"published {name}"] = (diff, expected.atol)
        results[name] = recorded(diff, None, passed) | {"tolerance": expected.atol}
    print_figures(STAGE, exact)
    return results


def _describe(c: Comparison) -> str:
    if not math.isfinite(c.max_abs_diff):
        return "NaN or Inf values"
    return f"max abs diff {c.max_abs_diff:.3g} > tolerance {c.tolerance:.3g}"


def failure_message(comparisons: list[Comparison], published: Mapping[str, dict]) -> str | None:
    failed_outputs = [c for c in comparisons if c.name in OUTPUTS and not c.passed]
    failed_published = sorted(name for name, r in published.items() if not r["passed"])
    if not failed_outputs and not failed_published:
        return None
    parts = []
    if failed_outputs:
        first = next(c for c in comparisons if not c.passed)
        hf, original = sources(first.name)
        parts.append(
            "the converted model differs from the reference in "
            + ", ".join(f"{c.name} ({_describe(c)})" for c in failed_outputs)
            + f". First divergence, in the order data flows: {first.name} ({_describe(first)}), while every entry before "
            f"it agrees. Check the converted {hf}, which comes from the original {original}"
        )
    if failed_published:
        parts.append(f"the published check values differ for {failed_published}: {dict(published)}")
    return "; ".join(parts)


def metrics(comparisons: list[Comparison], published: Mapping[str, dict], atol: float, prompts: int, variant: str,
            reference_dtype: str) -> dict:
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
        "prompts": prompts,
        "outputs": {c.name: recorded(c.max_abs_diff, c.max_rel_diff, c.passed) for c in comparisons if c.name in OUTPUTS},
        "intermediates_compared": len(intermediates),
        "intermediates_passed": all(c.passed for c in intermediates),
        "first_divergence": next((c.name for c in comparisons if not c.passed), None),
        "published_check": dict(published) or None,
        "passed": all(c.passed for c in comparisons if c.name in OUTPUTS) and all(r["passed"] for r in published.values()),
    }


def load_model(directory: Path):
    """The converted model: transformers' CLIPSegForImageSegmentation built from config.json without initialising its
    weights, then given model.safetensors' tensors (memory-mapped, as from_pretrained maps them). A folder whose weights
    do not fit its config.json is refused, every mismatch listed: from_pretrained would fill missing or misshapen
    weights with random values and drop unexpected ones, with only a warning.

    from_pretrained itself would end in the same model (tests/test_verify_outputs.py holds the two to the same state,
    attention implementation and outputs; tests/test_build_model.py and tests/test_export.py load the folders with it),
    but in a fresh process it first compiles the regular expressions of transformers' checkpoint conversion tables for
    every architecture: 0.1-0.3 s of this stage's work at full size, against 0.03 s for this."""
    # Imported here, not at the top: segment and the tests use this module's helpers, and transformers' modelling code
    # costs seconds of start-up (main imports it with the rest of the stage's start-up).
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation
    from transformers.initialization import no_init_weights

    try:
        config = CLIPSegConfig.from_pretrained(directory)
        with no_init_weights():  # every weight is replaced below: initialising 600 MB would be wasted
            model = CLIPSegForImageSegmentation(config)
        weights = load_file(directory / WEIGHTS_FILE)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise VerificationError(f"{directory}: the model does not load ({str(exc).splitlines()[0]}); rerun build-model") from exc

    def described(tensor) -> str:  # a float32 weight by its shape alone, as from_pretrained's messages give it
        return f"{list(tensor.shape)}" + ("" if tensor.dtype == torch.float32 else f" {tensor.dtype}")

    wanted = {name: described(t) for name, t in model.state_dict().items()}
    found = {name: described(t) for name, t in weights.items()}
    problems = {
        "missing_keys": sorted(wanted.keys() - found.keys()),
        "unexpected_keys": sorted(found.keys() - wanted.keys()),
        "mismatched_keys": sorted(f"{key}: file {found[key]}, config {wanted[key]}"
                                  for key in wanted.keys() & found.keys() if found[key] != wanted[key]),
    }
    problems = {kind: items for kind, items in problems.items() if items}
    if problems:
        raise VerificationError(
            f"{directory}: the weights in model.safetensors do not fit config.json ({problems}); is config.json's "
            "use_complex_transposed_convolution (or reduce_dim, projection_dim, extract_layers) the one the weights were "
            "made for? Rebuild the model with build-model"
        )
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def cannot_run(original: Path, variant: str, exc: ValueError) -> VerificationError:
    return VerificationError(f"the reference cannot run {original} with models.{variant}.architecture ({exc}): that "
                             "architecture does not describe these original files; fix it in params.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = params_mod.stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="build-model's directory")
    parser.add_argument("--original", type=Path, required=True, help="download's folder (original.safetensors, tokenizer, image)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the reference outputs and mask pictures")
    parser.add_argument("--metrics", type=Path, required=True, help="the metrics JSON to write")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="clipseg-verify-"))

    def vision_job(params: params_mod.Params) -> tuple:
        return (args.original / "original.safetensors", params.model(args.variant).architecture, args.original / "image",
                params.processor, params.verify.reference_dtype, scratch / "vision.safetensors")

    # The reference's image side starts now, in a forked process, and runs while this one imports transformers' modelling
    # code below (bad params are reported by the body, as always).
    try:
        background = Forked.start(write_vision_reference, *vision_job(params_mod.load(args.params)))
    except PipelineError:
        background = None

    def body() -> None:
        params = params_mod.load(args.params)
        model_params = params.model(args.variant)
        original = TensorFile(args.original / "original.safetensors")
        reference_dtype = params.verify.reference_dtype
        job = vision_job(params)
        try:
            # Taken before the model is loaded: the two processes' memory never adds up to the model's peak.
            if background is not None and background.call == (write_vision_reference, job):
                background.result()
            else:
                write_vision_reference(*job)
            pixels, vision = read_vision_reference(job[-1])  # the pixels are the very values the vision tower got
        except ValueError as exc:
            raise cannot_run(original.path, args.variant, exc) from exc
        torch.set_num_threads(params.verify.threads)
        image = load_image(args.original / "image")
        tok = tokenizer(args.original)
        proc = params.processor
        ids = token_ids(tok, model_params.prompts)
        model = load_model(args.model)
        converted = traced_forward(model, pixels, ids["input_ids"], ids["attention_mask"])
        published = check_published(model, model_params.expected, image, tok, proc.image_size) if model_params.expected else {}
        del model  # its 600 MB of weights are done with: the reference's entries (float64 by default) need the room
        try:
            reference = reference_outputs(original, model_params.architecture, pixels, ids["input_ids"], ids["attention_mask"],
                                          getattr(torch, reference_dtype),
                                          vision=vision)
        except ValueError as exc:
            raise cannot_run(original.path, args.variant, exc) from exc
        atol, rtol = params.verify.atol, params.verify.rtol
        comparisons = compare(converted, reference, atol, rtol)
        print_figures(STAGE, {c.name: (c.max_abs_diff, c.tolerance) for c in comparisons if c.name in OUTPUTS})
        args.out.mkdir(parents=True, exist_ok=True)
        write_safetensors(args.out / "reference.safetensors", {
            "pixel_values": pixels, "input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"],
            **{name: reference[name].float().contiguous() for name in OUTPUTS},
        }, {"stage": STAGE, "variant": args.variant, "reference_dtype": f"{reference_dtype}, stored rounded to float32"})
        # The original's prediction (the converted model's agrees within atol), drawn in float64: from a float64
        # reference, the same pixels everywhere.
        write_mask_pictures(image, reference["logits"], model_params.prompts, args.out / "masks")
        write_json(args.metrics, metrics(comparisons, published, atol, len(model_params.prompts), args.variant, reference_dtype))
        message = failure_message(comparisons, published)
        if message:
            raise VerificationError(message)

    try:
        # This stage loads the model: its modelling code is imported with the rest of the start-up, not inside the work.
        from transformers import CLIPSegForImageSegmentation  # noqa: F401

        return run_stage(STAGE, args.variant, body)
    finally:
        if background is not None:
            background.close()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    exit_now(main())
