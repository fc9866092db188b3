"""The converted model held to the reference: what each of the reference's entries is in the converted model, the two
sides' entries on the same inputs, their element-wise comparison, and where a fault starts.

Every element of every entry is compared. The three outputs (logits, conditional embeddings, pooled output) decide pass
or fail; the intermediates locate a fault: in the order data flows through the model, the first entry that diverges
while every entry before it agrees names the converted weights, and the original tensors they were made from, to look
at. Which converted module computes an entry is derived from the name map (ORIGINS names only the original modules).
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .architecture import Architecture
from .converted_model import hf_outputs
from .errors import PipelineError
from .inputs import pixel_values, token_ids
from .name_map import match_rules, split_qkv, transpose
from .params import Expected
from .recording import OUTPUTS, print_figures, recorded
from .reference import reference_forward
from .tensor_io import write_json


class VerificationError(PipelineError):
    """The converted model does not compute what the original computes."""


def cannot_run(original: Path, variant: str, exc: ValueError) -> VerificationError:
    """The reference refused the original files (a missing or misshapen tensor): the architecture is wrong for them."""
    return VerificationError(f"the reference cannot run {original} with models.{variant}.architecture ({exc}): that "
                             "architecture does not describe these original files; fix it in params.yaml")


# ---- the reference's entries and the original modules that compute them ----------------------------------------


@dataclass(frozen=True)
class Origin:
    entry: str  # the reference's name for it: a str.format template over the module pattern's groups (and {cond})
    module: str  # regex matching the original module(s) that compute it, from the start of a key to a dot or its end
    probe: str = "output"  # record what the converted module outputs, what goes "input" into it, or "" (a model output)
    setting: str = ""  # a config.json setting that shapes it too


ORIGINS: tuple[Origin, ...] = (
    Origin("vision.embeddings",          r"visual\.(?:conv1|class_embedding|positional_embedding)"),
    Origin("vision.pre_norm",            r"visual\.ln_pre"),
    Origin("vision.block{0}.norm1",      r"visual\.transformer\.resblocks\.(\d+)\.ln_1"),
    Origin("vision.block{0}.attention",  r"visual\.transformer\.resblocks\.(\d+)\.attn"),
    Origin("vision.block{0}.norm2",      r"visual\.transformer\.resblocks\.(\d+)\.ln_2"),
    Origin("vision.block{0}.mlp",        r"visual\.transformer\.resblocks\.(\d+)\.mlp"),
    Origin("vision.block{0}",            r"visual\.transformer\.resblocks\.(\d+)"),
    Origin("vision.post_norm",           r"visual\.ln_post"),
    Origin("pooled_output",              r"visual\.proj", probe=""),
    Origin("text.embeddings",            r"token_embedding|positional_embedding"),
    Origin("text.block{0}.norm1",        r"transformer\.resblocks\.(\d+)\.ln_1"),
    Origin("text.block{0}.attention",    r"transformer\.resblocks\.(\d+)\.attn"),
    Origin("text.block{0}.norm2",        r"transformer\.resblocks\.(\d+)\.ln_2"),
    Origin("text.block{0}.mlp",          r"transformer\.resblocks\.(\d+)\.mlp"),
    Origin("text.block{0}",              r"transformer\.resblocks\.(\d+)"),
    Origin("text.final_norm",            r"ln_final"),
    # The text model picks the pooled token inline, not in a module: what enters the projection is that pick.
    Origin("text.pooled",                r"text_projection", probe="input",
           setting="config.json text_config.eos_token_id (2 pools at the argmax of the ids, as the original does)"),
    Origin("conditional_embeddings",     r"text_projection", probe=""),
    Origin("decoder.step{0}.reduce",     r"reduces\.(\d+)", setting="config.json extract_layers, which picks its input"),
    Origin("decoder.step{cond}.film_{0}", r"film_(mul|add)", setting="config.json conditional_layer"),
    Origin("decoder.step{0}.attention",  r"blocks\.(\d+)\.self_attn"),
    Origin("decoder.step{0}.norm1",      r"blocks\.(\d+)\.norm1"),
    Origin("decoder.step{0}.mlp",        r"blocks\.(\d+)\.linear[12]"),
    Origin("decoder.step{0}.norm2",      r"blocks\.(\d+)\.norm2"),
    Origin("decoder.step{0}",            r"blocks\.(\d+)"),
    # The refined decoder's Conv2d and first ConvTranspose2d (indices 1 and 3 are ReLUs).
    Origin("logits.trans_conv{0}",       r"trans_conv\.([02])"),
    Origin("logits",                     r"trans_conv", probe="",
           setting="config.json use_complex_transposed_convolution"),
)  # fmt: skip


@dataclass(frozen=True)
class Entry:
    name: str
    converted: str  # the converted model's module that computes it (its name in model.named_modules())
    original: tuple[str, ...]  # the original modules whose tensors it was converted from
    probe: str
    setting: str
    converted_parts: tuple[str, ...] = ()  # the converted module's weights, by their names below it
    original_parts: tuple[str, ...] = ()  # likewise the original module's, and the surgery the name map did on them

    def describe(self) -> str:
        def named(module: str, parts: tuple[str, ...], separator: str) -> str:
            return f"{module} ({separator.join(parts)})" if parts else module

        setting = f" (and {self.setting})" if self.setting else ""
        return (f"the converted {named(self.converted, self.converted_parts, ', ')}{setting}, which comes from the "
                f"original {named(', '.join(self.original), self.original_parts, '; ')}")


# What the name map's tensor surgery did, in words.
SURGERY = {split_qkv: "in_proj split into q, k, v", transpose: "transposed: the original computes x @ proj"}


def _below(module: str, names: list[str]) -> tuple[str, ...]:
    """The first name component below `module` of each of `names`, in order, once each; a bare weight or bias is no
    part of its own."""
    parts = [name[len(module) + 1:].split(".")[0] for name in names if name.startswith(module + ".")]
    return tuple(dict.fromkeys(part for part in parts if part not in ("weight", "bias")))


def _common_module(names: list[str]) -> str:
    """The deepest module holding every tensor `names` names."""
    parents = [name.split(".")[:-1] for name in names]
    common = []
    for parts in zip(*parents):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common)


def entries(arch: Architecture) -> dict[str, Entry]:
    """Every entry the reference computes for `arch`, with the converted module and the original modules behind it:
    ORIGINS' original modules, converted by the name map's rules."""
    keys = sorted(arch.original_shapes())
    rules = match_rules(keys)
    converted = {key: [template.format(*groups) for template in rule.targets] for key, (rule, groups) in rules.items()}
    found: dict[str, Entry] = {}
    for origin in ORIGINS:
        pattern = re.compile(f"(?:{origin.module})" + r"(?=\.|$)")
        groups: dict[tuple, list[tuple[str, str]]] = {}
        for key in keys:
            if m := pattern.match(key):
                groups.setdefault(m.groups(), []).append((m.group(0), key))
        for values, matched in groups.items():
            name = origin.entry.format(*values, cond=arch.conditional_layer)
            targets = [target for _, key in matched for target in converted[key]]
            module = _common_module(targets)
            originals = tuple(sorted({original for original, _ in matched}))
            surgery = tuple(dict.fromkeys(SURGERY[rules[key][0].op] for _, key in matched if rules[key][0].op in SURGERY))
            original_parts = _below(originals[0], [key for _, key in matched]) if len(originals) == 1 else ()
            found[name] = Entry(name, module, originals, origin.probe, origin.setting, _below(module, targets),
                                (", ".join(original_parts),) * bool(original_parts) + surgery)
    return found


@dataclass(frozen=True)
class Comparison:
    name: str
    max_abs_diff: float  # inf when the converted model gives NaN or Inf
    max_rel_diff: float  # max abs diff / max |reference|
    tolerance: float
    passed: bool


def _one_row_if_shared(ours: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first row of both entries when both are one image's entry expanded to every prompt (stride 0 on the batch
    dimension: every row is the same row), else both unchanged: the vision tower's entries, most of the comparing,
    are then differenced once instead of once per prompt, with the same maxima."""
    if ours.ndim and ours.stride(0) == 0 and ref.stride(0) == 0:
        return ours[:1], ref[:1]
    return ours, ref


def compare(converted: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], atol: float, rtol: float,
            outputs: Collection[str] = OUTPUTS) -> list[Comparison]:
    """Max abs and relative difference of every entry, in the reference's order (the order data flows).

    The `outputs` pass when every element is within `atol`. Intermediates, whose scale grows through the network, pass
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
        tolerance = atol if name in outputs else atol + rtol * scale
        results.append(Comparison(name, max_abs, max_rel, tolerance, max_abs <= tolerance))
    return results


def mask_padding(values: Mapping[str, torch.Tensor], attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero the text states past each prompt's end: the converted model masks padding, the original never sees any
    (its causal mask keeps padding from reaching the end token), so only those positions differ, by design."""
    keep = attention_mask.bool()[..., None]
    return {name: torch.where(keep, t, 0.0) if name.startswith("text.") and t.ndim == 3 else t for name, t in values.items()}


def reference_outputs(original: Mapping[str, torch.Tensor], arch: Architecture, pixel_values: torch.Tensor,
                      input_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The reference's entries in `dtype`, in the order it computes them; the one image's entries serve every prompt."""
    prompts = input_ids.shape[0]
    with torch.inference_mode():
        out = reference_forward(original, arch, pixel_values, input_ids, dtype)
    out = {name: t.expand(prompts, *t.shape[1:]) for name, t in out.items()}  # a view: one row stays one row
    return mask_padding(out, attention_mask)


def _record(store: dict[str, torch.Tensor], entry: str, takes_input: bool):
    def hook(module, args, output):
        value = args[0] if takes_input else output
        store[entry] = (value[0] if isinstance(value, tuple) else value).detach()  # attention also returns weights

    return hook


def traced_forward(model, known: Mapping[str, Entry], pixel_values: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The converted model's three outputs for one image and P prompts (`hf_outputs`) and, under the reference's names,
    what each of its modules in `known` (entries()) computed on the way; the one image's entries serve every prompt."""
    prompts = input_ids.shape[0]
    probes: dict[str, list[Entry]] = {}
    for entry in known.values():
        if entry.probe:
            probes.setdefault(entry.converted, []).append(entry)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for module_name, module in model.named_modules():
        for entry in probes.get(module_name, ()):
            handles.append(module.register_forward_hook(_record(captured, entry.name, entry.probe == "input")))
    try:
        out = hf_outputs(model, pixel_values, input_ids, attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    captured = {name: t.expand(prompts, *t.shape[1:]) for name, t in captured.items()}
    return mask_padding(captured | out, attention_mask)


def check_published(model, expected: Expected, image, tok, size: int) -> dict[str, dict]:
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
    print_figures("verify-outputs", exact)
    return results


def _describe(c: Comparison) -> str:
    if not math.isfinite(c.max_abs_diff):
        return "NaN or Inf values"
    return f"max abs diff {c.max_abs_diff:.3g} > tolerance {c.tolerance:.3g}"


def failure_message(comparisons: list[Comparison], published: Mapping[str, dict], known: Mapping[str, Entry],
                    uses: Sequence[Check] = ()) -> str | None:
    """Why verification failed, naming the first divergence's converted and original weights (`known`: entries()),
    and every check of another use (image prompts, a batch) that failed."""
    failed_outputs = [c for c in comparisons if c.name in OUTPUTS and not c.passed]
    failed_published = sorted(name for name, r in published.items() if not r["passed"])
    failed_uses = [check for check in uses if not check.passed]
    if not failed_outputs and not failed_published and not failed_uses:
        return None
    parts = []
    if failed_outputs:
        first = next(c for c in comparisons if not c.passed)
        parts.append(
            "the converted model differs from the reference in "
            + ", ".join(f"{c.name} ({_describe(c)})" for c in failed_outputs)
            + f". First divergence, in the order data flows: {first.name} ({_describe(first)}), while every entry before "
            f"it agrees. Check {known[first.name].describe()}"
        )
    if failed_published:
        parts.append(f"the published check values differ for {failed_published}: {dict(published)}")
    if failed_uses:
        parts.append("used otherwise, the converted model differs from the reference in "
                     + ", ".join(f"{check.name} {check.what} ("
                                 + ", ".join(f"{c.name}: {_describe(c)}" for c in check.comparisons if not c.passed)
                                 + f"; {check.mask_pixels_differ} mask pixels differ)" for check in failed_uses))
    return "; ".join(parts)


# ---- the other ways the model is used: image prompts, batches of images; and the masks ----------------------------


def mask_pixels_differ(ours: torch.Tensor, reference: torch.Tensor) -> list[int]:
    """Per row of [P, H, W] logits, how many mask pixels (sigmoid > 0.5, i.e. logit > 0) differ from the reference's."""
    return [int(n) for n in ((ours > 0) != (reference > 0)).flatten(1).sum(1)]


def image_prompt_outputs(model, pixel_values: torch.Tensor, prompt_pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The converted model conditioned on K prompt images, through its own forward as a user calls it (the query
    image repeated for each prompt): {"conditional_embeddings": [K, proj], "logits": [K, H, W]}."""
    prompts = prompt_pixel_values.shape[0]
    with torch.inference_mode():
        out = model(pixel_values=pixel_values.expand(prompts, -1, -1, -1), conditional_pixel_values=prompt_pixel_values)
    return {"conditional_embeddings": out.conditional_embeddings, "logits": out.logits}


def batch_outputs(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The converted model on a batch of B different images, each with its own prompt, in one forward call."""
    with torch.inference_mode():
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    return {name: getattr(out, name) for name in OUTPUTS}


def reference_batch(original: Mapping[str, torch.Tensor], arch: Architecture, pixel_values: torch.Tensor,
                    input_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What the batch should give: the reference run image by image, each with its own prompt, rows stacked."""
    with torch.inference_mode():
        rows = [reference_forward(original, arch, pixel_values[i : i + 1], input_ids[i : i + 1], dtype)
                for i in range(pixel_values.shape[0])]
    return {name: torch.cat([row[name] for row in rows]) for name in OUTPUTS}


@dataclass(frozen=True)
class Check:
    """One way of using the model, checked on one prompt: its comparisons and how many mask pixels differ."""

    name: str  # "text-0", "image-0", "batch-1"
    what: dict  # the prompt, the image prompt's box, or which image of the batch
    comparisons: tuple[Comparison, ...]
    mask_pixels_differ: int

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)


def checks(kind: str, converted: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
           described: Sequence[dict], atol: float) -> list[Check]:
    """Row i of every output (one prompt, one image) compared on its own, every element within `atol`."""
    found = []
    for i, what in enumerate(described):
        ours = {name: tensor[i : i + 1] for name, tensor in converted.items()}
        ref = {name: reference[name][i : i + 1] for name in converted}
        found.append(Check(f"{kind}-{i}", what, tuple(compare(ours, ref, atol, rtol=0.0)),
                           mask_pixels_differ(ours["logits"], ref["logits"])[0]))
    return found


def check_report(uses: Sequence[Check]) -> dict:
    """Each check as a report records it: what it ran on, its outputs' verdicts, how many mask pixels differ."""
    return {check.name: {**check.what, "mask_pixels_differ": check.mask_pixels_differ, "passed": check.passed,
                         **{c.name: recorded(c.max_abs_diff, c.max_rel_diff, c.passed) for c in check.comparisons}}
            for check in uses}


def write_checks(directory: Path, uses: Sequence[Check]) -> None:
    """One small metrics file per check, so that `dvc metrics show` lists each prompt as a row of its own."""
    shutil.rmtree(directory, ignore_errors=True)
    for check in uses:
        write_json(directory / f"{check.name}.json", {"passed": check.passed, "mask_px": check.mask_pixels_differ})
