"""The name map: original CLIPSeg tensors (OpenAI CLIP + decoder names) <-> CLIPSegForImageSegmentation tensors.

An ordered table of anchored rules, one row per original module; every source key must match exactly one rule. The
tensor surgery (the q/k/v split, the projections' transpose) is a set of small operations, each with its inverse, so
the map also runs backwards (OriginalLayout). `remap` is a pure function over a mapping of tensors, torch tensors or
numpy arrays alike: remap-weights moves numpy arrays and never imports torch (seconds of start-up for work that only
slices and transposes).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .architecture import Architecture
from .errors import PipelineError
from .original import CLIP_SCALARS, FULL_MODEL_PREFIX
from .tensor_io import LazyTensors, Spec, TensorFile, numpy_dtype, stored_dtype
# A torch tensor or a numpy array: the surgery below uses only what both have (shape, slicing, .T).
Tensor = Any


class RemapError(PipelineError):
    """The source tensors do not map onto the configured architecture."""


# ---- tensor surgery: small operations, each with its inverse ----------------------------------------------------


def split_qkv(stacked: Tensor) -> tuple[Tensor, ...]:
    """nn.MultiheadAttention stacks the q, k and v projections along dim 0; Hugging Face keeps three Linear layers.
    The parts are views: the writer lays each one out in order as it writes it."""
    rows = stacked.shape[0]
    if rows % 3:
        raise RemapError(f"an in_proj tensor of shape {list(stacked.shape)} cannot be split into q, k, v")
    third = rows // 3
    return stacked[:third], stacked[third : 2 * third], stacked[2 * third :]


def join_qkv(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if isinstance(q, np.ndarray):
        return np.concatenate([q, k, v], axis=0)
    import torch

    return torch.cat([q, k, v], dim=0)


def transpose(matrix: Tensor) -> Tensor:
    """The original applies its projections as `x @ P`; nn.Linear computes `x @ W.T`, so W = P.T (a view, laid out
    when written)."""
    if len(matrix.shape) != 2:
        raise RemapError(f"a projection must be a matrix, found shape {list(matrix.shape)}")
    return matrix.T


def identity(tensor: Tensor) -> Tensor:
    return tensor


# ---- the name map: one row per original module ------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    pattern: str  # full match against the original key
    targets: tuple[str, ...]  # str.format templates over the pattern's groups; empty for a drop
    op: Callable[[Tensor], Tensor | tuple[Tensor, ...]] = identity
    reason: str = ""  # why a key is dropped

    @property
    def regex(self) -> re.Pattern:
        return re.compile(self.pattern)


def _rename(pattern: str, target: str) -> Rule:
    return Rule(pattern, (target,))


def _split(pattern: str, target: str) -> Rule:
    """`target` names the q/k/v projection `{qkv}`; the rule yields the three in the order split_qkv returns them."""
    return Rule(pattern, tuple(target.replace("{qkv}", proj) for proj in ("q_proj", "k_proj", "v_proj")), split_qkv)


def _drop(pattern: str, reason: str) -> Rule:
    return Rule(pattern, (), reason=reason)


def _tower(src: str, dst: str) -> tuple[Rule, ...]:
    """The rows of one pre-LayerNorm CLIP transformer (text or vision): same shape of names on both towers."""
    block = rf"{src}transformer\.resblocks\.(\d+)\."
    layer = f"{dst}encoder.layers.{{0}}."
    return (
        _split(rf"{block}attn\.in_proj_(weight|bias)",  layer + "self_attn.{qkv}.{1}"),
        _rename(rf"{block}attn\.out_proj\.(weight|bias)", layer + "self_attn.out_proj.{1}"),
        _rename(rf"{block}ln_1\.(weight|bias)",           layer + "layer_norm1.{1}"),
        _rename(rf"{block}ln_2\.(weight|bias)",           layer + "layer_norm2.{1}"),
        _rename(rf"{block}mlp\.c_fc\.(weight|bias)",      layer + "mlp.fc1.{1}"),
        _rename(rf"{block}mlp\.c_proj\.(weight|bias)",    layer + "mlp.fc2.{1}"),
    )  # fmt: skip


RULES: tuple[Rule, ...] = (
    # CLIP text tower (OpenAI names carry no prefix)
    _rename(r"token_embedding\.weight",          "clip.text_model.embeddings.token_embedding.weight"),
    _rename(r"positional_embedding",             "clip.text_model.embeddings.position_embedding.weight"),
    _rename(r"ln_final\.(weight|bias)",          "clip.text_model.final_layer_norm.{0}"),
    *_tower("",                                  "clip.text_model."),
    Rule(r"text_projection",                     ("clip.text_projection.weight",), transpose),
    _rename(r"logit_scale",                      "clip.logit_scale"),
    # CLIP vision tower
    _rename(r"visual\.class_embedding",          "clip.vision_model.embeddings.class_embedding"),
    _rename(r"visual\.positional_embedding",     "clip.vision_model.embeddings.position_embedding.weight"),
    _rename(r"visual\.conv1\.weight",            "clip.vision_model.embeddings.patch_embedding.weight"),
    _rename(r"visual\.ln_pre\.(weight|bias)",    "clip.vision_model.pre_layrnorm.{0}"),
    _rename(r"visual\.ln_post\.(weight|bias)",   "clip.vision_model.post_layernorm.{0}"),
    *_tower(r"visual\.",                         "clip.vision_model."),
    Rule(r"visual\.proj",                        ("clip.visual_projection.weight",), transpose),
    # CLIPSeg decoder (nn.TransformerEncoderLayer names inside `blocks`)
    _rename(r"film_(mul|add)\.(weight|bias)",    "decoder.film_{0}.{1}"),
    _rename(r"reduces\.(\d+)\.(weight|bias)",    "decoder.reduces.{0}.{1}"),
    _split(r"blocks\.(\d+)\.self_attn\.in_proj_(weight|bias)", "decoder.layers.{0}.self_attn.{qkv}.{1}"),
    _rename(r"blocks\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "decoder.layers.{0}.self_attn.out_proj.{1}"),
    _rename(r"blocks\.(\d+)\.linear1\.(weight|bias)", "decoder.layers.{0}.mlp.fc1.{1}"),
    _rename(r"blocks\.(\d+)\.linear2\.(weight|bias)", "decoder.layers.{0}.mlp.fc2.{1}"),
    _rename(r"blocks\.(\d+)\.norm1\.(weight|bias)", "decoder.layers.{0}.layer_norm1.{1}"),
    _rename(r"blocks\.(\d+)\.norm2\.(weight|bias)", "decoder.layers.{0}.layer_norm2.{1}"),
    _rename(r"trans_conv\.(weight|bias)",        "decoder.transposed_convolution.{0}"),
    _rename(r"trans_conv\.(\d)\.(weight|bias)",  "decoder.transposed_convolution.{0}.{1}"),
    # Drops, each with its reason
    _drop(r"model\..+",                          "the original keeps `self.model = clip_model.visual`: a second copy of the vision tower"),
    _drop(r"reduce\.(weight|bias)",              "a layer the original decoder defines but its forward pass never uses"),
    _drop(rf"({'|'.join(CLIP_SCALARS)})",        "a scalar setting stored in OpenAI's archive, not a weight; checked against the architecture"),
)  # fmt: skip

@dataclass(frozen=True)
class Report:
    mapped: dict[str, list[str]]  # original key -> target keys
    dropped: dict[str, str]  # original key -> reason
    rules_fired: dict[str, int]  # rule pattern -> how many keys it matched


def match_rules(names: list[str], rules: tuple[Rule, ...] = RULES) -> dict[str, tuple[Rule, tuple[str, ...]]]:
    """Each original name -> (its one rule, the regex groups). Unmatched or doubly matched names are an error."""
    matched: dict[str, tuple[Rule, tuple[str, ...]]] = {}
    unmatched, ambiguous = [], []
    for name in names:
        hits = [(rule, m.groups()) for rule in rules if (m := rule.regex.fullmatch(name))]
        if not hits:
            unmatched.append(name)
        elif len(hits) > 1:
            ambiguous.append(f"{name} (rules {[rule.pattern for rule, _ in hits]})")
        else:
            matched[name] = hits[0]
    if unmatched or ambiguous:
        raise RemapError(
            f"unknown key(s) that no rule maps: {sorted(unmatched)}" * bool(unmatched)
            + ("; " if unmatched and ambiguous else "")
            + f"key(s) matched by several rules: {sorted(ambiguous)}" * bool(ambiguous)
            + ". Is this a CLIPSeg checkpoint of the configured architecture?"
        )
    return matched


def normalize(source: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Accept a full original model's state dict too: its CLIP keys carry a `clip_model.` prefix."""
    normal = {name.removeprefix(FULL_MODEL_PREFIX): tensor for name, tensor in source.items()}
    if len(normal) != len(source):
        raise RemapError(f"keys present both with and without the {FULL_MODEL_PREFIX!r} prefix")
    return normal


def check_architecture(source: Mapping[str, Tensor], arch: Architecture, variant: str) -> None:
    """Compare the source's keys and shapes with the architecture in params.yaml, naming the setting to fix."""
    where = f"models.{variant}.architecture"
    expected = arch.original_shapes()
    names = set(source)
    refined = arch.use_complex_transposed_convolution
    if "trans_conv.0.weight" in names and not refined:
        raise RemapError(f"the decoder is a refined one (trans_conv.0/2/4) but {where}.use_complex_transposed_convolution is false: set it to true")
    if "trans_conv.weight" in names and refined:
        raise RemapError(f"the decoder has a plain trans_conv but {where}.use_complex_transposed_convolution is true: set it to false")
    film = source.get("film_mul.weight")
    if film is not None and film.shape[0] != arch.reduce_dim:
        raise RemapError(
            f"the decoder has reduce_dim {film.shape[0]} (film_mul.weight {list(film.shape)}) but {where}.reduce_dim is "
            f"{arch.reduce_dim}: set it to {film.shape[0]}, or use the decoder file made for reduce_dim {arch.reduce_dim}"
        )
    droppable = {n for n in names if any(rule.regex.fullmatch(n) for rule in RULES if not rule.targets)}
    unknown = sorted(names - expected.keys() - droppable)
    missing = sorted(expected.keys() - names)
    wrong = sorted(f"{n}: expected {list(s)}, found {list(source[n].shape)}" for n, s in expected.items() if n in names and tuple(source[n].shape) != s)
    problems = [f"{label} {items}" for label, items in (("unknown key(s)", unknown), ("missing key(s)", missing), ("wrong shape(s)", wrong)) if items]
    if problems:
        raise RemapError("; ".join(problems) + f". The checkpoint does not match {where}: fix the architecture or the source")
    implied = {"input_resolution": arch.vision.image_size, "context_length": arch.text.max_position_embeddings, "vocab_size": arch.text.vocab_size}
    for scalar, value in implied.items():
        if scalar in names and int(source[scalar]) != value:
            raise RemapError(f"the CLIP archive says {scalar} = {int(source[scalar])} but {where} implies {value}: fix the architecture")


def remap(source: Mapping[str, Tensor], rules: tuple[Rule, ...] = RULES) -> tuple[dict[str, Tensor], Report]:
    """Original tensors -> Hugging Face tensors, with a report of what every key became. No file I/O."""
    matched = match_rules(sorted(source), rules)
    target: dict[str, Tensor] = {}
    mapped: dict[str, list[str]] = {}
    dropped: dict[str, str] = {}
    fired = {rule.pattern: 0 for rule in rules}
    for name, (rule, groups) in sorted(matched.items()):
        fired[rule.pattern] += 1
        if not rule.targets:
            dropped[name] = rule.reason
            continue
        result = rule.op(source[name])
        tensors = result if isinstance(result, tuple) else (result,)
        names = [template.format(*groups) for template in rule.targets]
        duplicate = [n for n in names if n in target]
        if duplicate:
            raise RemapError(f"target key(s) {duplicate} produced twice (second time from {name!r})")
        target.update(zip(names, tensors, strict=True))
        mapped[name] = names
    return target, Report(mapped=mapped, dropped=dropped, rules_fired=fired)


def shape_arrays(shapes: Mapping[str, tuple[int, ...]], dtype: str = "F32") -> dict[str, np.ndarray]:
    """Data-less arrays of the given shapes (one element repeated by a zero stride: nothing is allocated), on which
    `remap` plans what it would produce."""
    return {name: np.broadcast_to(np.zeros((), numpy_dtype(dtype)), shape) for name, shape in shapes.items()}


def converted_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every converted tensor's name and shape: the architecture's original weights run through the rules."""
    converted, _ = remap(shape_arrays(arch.original_shapes()))
    return {name: tuple(tensor.shape) for name, tensor in converted.items()}


def shape_only(source: TensorFile) -> dict[str, np.ndarray]:
    """The source (read with framework "np") as data-less arrays for planning: one element repeated to each tensor's
    shape by a zero stride, so nothing is read or allocated; the scalar entries keep their values for the checks."""
    return {
        name: source[name] if spec.shape == () else np.broadcast_to(np.zeros((), numpy_dtype(spec.dtype)), spec.shape)
        for name, spec in source.specs.items()
    }


def stream(source: Mapping[str, Tensor], original_names: Mapping[str, str], plan: Mapping[str, Tensor], report: Report) -> LazyTensors:
    """The remapped tensors, each computed from its source tensor only when the writer asks for it.

    `plan` is `remap` run on `shape_only` arrays: the targets' dtypes and shapes, known before any data is read.
    """
    origin = {target: (name, index) for name, targets in report.mapped.items() for index, target in enumerate(targets)}
    rules = match_rules(sorted(report.mapped))

    @functools.lru_cache(maxsize=4)  # a q/k/v split is asked for three times, not in a row
    def apply(name: str) -> tuple[Tensor, ...]:
        result = rules[name][0].op(source[original_names[name]])
        return result if isinstance(result, tuple) else (result,)

    def produce(target: str) -> Tensor:
        name, index = origin[target]
        return apply(name)[index]

    return LazyTensors({name: Spec(stored_dtype(t), tuple(t.shape)) for name, t in plan.items()}, produce)


# Each surgery's inverse, from the converted tensors a rule produced (in the order it produced them) back to the
# original tensor.
INVERSES: dict[Callable, Callable[[list[Tensor]], Tensor]] = {
    identity: lambda parts: parts[0],
    transpose: lambda parts: transpose(parts[0]),
    split_qkv: lambda parts: join_qkv(*parts),
}


class OriginalLayout(Mapping[str, Tensor]):
    """Converted tensors (Hugging Face names, e.g. an exported model.safetensors) seen under the original names
    `names`: each one rebuilt by running its rule backwards, when it is read. The reference, which reads original
    names, can so run on what a converted file holds. A name whose rule drops it, or whose converted tensors are not
    all there, is absent."""

    def __init__(self, converted: Mapping[str, Tensor], names: Iterable[str], rules: tuple[Rule, ...] = RULES):
        self._converted = converted
        self._parts: dict[str, tuple[Callable, tuple[str, ...]]] = {}
        for name, (rule, groups) in match_rules(sorted(names), rules).items():
            targets = tuple(template.format(*groups) for template in rule.targets)
            if targets and all(target in converted for target in targets):
                self._parts[name] = (INVERSES[rule.op], targets)

    def __getitem__(self, name: str) -> Tensor:
        inverse, targets = self._parts[name]
        return inverse([self._converted[target] for target in targets])

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)
