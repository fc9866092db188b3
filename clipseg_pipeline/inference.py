"""Original CLIPSeg tensors (CLIP + decoder, original names) -> the Architecture they were made with, and the settings
the tensors cannot tell.

The backbone's numbers are read as OpenAI's own loader (`clip.model.build_model`) reads them: widths, depths, patch
and token table from the shapes, the image size from the position embeddings, and the heads of both towers as
width // 64. The decoder's come from the traces the original code leaves: reduce_dim (film_mul's rows), the number of
extracted layers (reduces.N / blocks.N), the feed-forward width, the plain or refined transposed convolution. Which
layers were extracted, the decoder's attention heads and the conditional layer leave no trace: unless given, they take
the original code's defaults and are returned as assumed. Options the Hugging Face model cannot represent, and files
that are not CLIPSeg, are refused. Pure: no file I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .architecture import Architecture
from .errors import PipelineError
from .name_map import RemapError, check_architecture
from .original import CLIP_TELLTALE, DECODER_TELLTALE
from .params import ASSUMABLE
from .schema import SchemaError

# CLIPDensePredT's defaults for what the tensors cannot tell (its extract_layers, n_heads and cond_layer).
DEFAULTS: dict[str, Any] = {"extract_layers": (3, 6, 9), "decoder_num_attention_heads": 4, "conditional_layer": 0}
# How to give each of them instead (clipseg-variant add's options).
OPTIONS = {"extract_layers": "--extract-layers", "decoder_num_attention_heads": "--decoder-heads",
           "conditional_layer": "--conditional-layer"}
# OpenAI's loader gives each CLIP tower width // 64 attention heads.
HEAD_WIDTH = 64
# Traces of original options transformers' CLIPSeg has no place for: key pattern -> the option.
UNREPRESENTABLE = (
    (r"extra_blocks\..+",  "extra_blocks (decoder blocks after the extracted layers)"),
    (r"upsample_proj\..+", "upsample=True (an upsampling projection)"),
    (r"shift_vector",      "fix_shift=True (a learned shift vector)"),
    (r"reduce_cond\..+",   "reduce_cond (a projection of the conditional vector)"),
)  # fmt: skip
# A CLIP with a ResNet image tower (RN50 and kin): CLIPSeg's models take a ViT only.
RESNET_TELLTALE = "visual.attnpool.c_proj.weight"
Tensor = Any  # torch tensors or numpy arrays: only shapes are read


class InferenceError(PipelineError):
    """The tensors are not a CLIPSeg model that transformers can represent, or a setting cannot be inferred."""


@dataclass(frozen=True)
class Inferred:
    architecture: Architecture
    assumed: tuple[str, ...]  # settings set to DEFAULTS, in ASSUMABLE's order


def _count(tensors: Mapping[str, Tensor], pattern: str) -> int:
    return sum(1 for name in tensors if re.fullmatch(pattern, name))


def _shape(tensors: Mapping[str, Tensor], name: str) -> tuple[int, ...]:
    if name not in tensors:
        raise InferenceError(f"the checkpoint lacks {name!r}, which every CLIPSeg model has: the file is incomplete")
    return tuple(tensors[name].shape)


def _heads(width: int, tower: str) -> int:
    if width % HEAD_WIDTH:
        raise InferenceError(
            f"the CLIP {tower} tower is {width} wide: OpenAI's loader gives it width // {HEAD_WIDTH} attention heads, "
            f"which needs a multiple of {HEAD_WIDTH}; this is not a CLIP that OpenAI's code builds"
        )
    return width // HEAD_WIDTH


def check_clipseg(tensors: Mapping[str, Tensor]) -> None:
    """Refuse what is not a ViT CLIP with a CLIPSeg decoder, or carries an option transformers cannot represent."""
    if RESNET_TELLTALE in tensors:
        raise InferenceError("the CLIP backbone is a ResNet (it has visual.attnpool): CLIPSeg models take a ViT backbone")
    missing = [name for name in (CLIP_TELLTALE, DECODER_TELLTALE) if name not in tensors]
    if missing:
        raise InferenceError(
            f"not a CLIPSeg checkpoint: no {' and no '.join(map(repr, missing))} among its keys (a ViT CLIP has "
            f"{CLIP_TELLTALE!r}, a CLIPSeg decoder {DECODER_TELLTALE!r})"
        )
    for pattern, option in UNREPRESENTABLE:
        found = sorted(name for name in tensors if re.fullmatch(pattern, name))
        if found:
            raise InferenceError(
                f"the decoder was trained with the original option {option} (keys {found[:4]}): transformers' CLIPSeg "
                "has no such part, so this checkpoint cannot be converted"
            )


def _decoder(tensors: Mapping[str, Tensor], patch: int, projection_dim: int) -> dict[str, Any]:
    reduce_dim, cond_width = _shape(tensors, DECODER_TELLTALE)
    if cond_width != projection_dim:
        raise InferenceError(
            f"film_mul.weight takes {cond_width}-wide conditions but CLIP's embeddings are {projection_dim} wide: the "
            "decoder was trained with the original option reduce_cond, which transformers' CLIPSeg cannot represent"
        )
    depth = _count(tensors, r"reduces\.\d+\.weight")
    blocks = _count(tensors, r"blocks\.\d+\.self_attn\.in_proj_weight")
    if depth != blocks or not depth:
        raise InferenceError(
            f"the decoder has {depth} reduces.N and {blocks} blocks.N: one of each per extracted layer is needed"
        )
    if "trans_conv.0.weight" in tensors:
        refined = True
    else:
        kernel = _shape(tensors, "trans_conv.weight")[-1]
        if kernel != patch:
            raise InferenceError(
                f"the decoder's transposed convolution has kernel {kernel} but the patch size is {patch} (the original "
                "option trans_conv): transformers' CLIPSeg always uses the patch size, so this cannot be converted"
            )
        refined = False
    return {
        "reduce_dim": reduce_dim,
        "layers": depth,
        "decoder_intermediate_size": _shape(tensors, "blocks.0.linear1.weight")[0],
        "use_complex_transposed_convolution": refined,
    }


def _unknowns(given: Mapping[str, Any], depth: int, vision_layers: int, reduce_dim: int) -> tuple[dict, tuple[str, ...]]:
    """The settings the tensors cannot tell: as given, else the original defaults (then assumed), checked to fit."""
    unknown = sorted(set(given) - set(ASSUMABLE))
    if unknown:
        raise InferenceError(f"only {list(ASSUMABLE)} can be given, not {unknown}: the rest is read from the tensors")
    values = {name: given.get(name, DEFAULTS[name]) for name in ASSUMABLE}
    assumed = tuple(name for name in ASSUMABLE if name not in given)
    layers = tuple(values["extract_layers"])
    if "extract_layers" in given and len(layers) != depth:
        raise InferenceError(f"the decoder takes {depth} extracted layers, but {len(layers)} were given: {list(layers)}")
    if "extract_layers" in assumed and (len(layers) != depth or max(layers) >= vision_layers):
        why = (f"it takes {depth} layers" if len(layers) != depth
               else f"the backbone has only {vision_layers} layers")
        raise InferenceError(
            f"which vision layers the decoder reads leaves no trace in the tensors, and the original default "
            f"{list(layers)} does not fit ({why}): give the {depth} block indices it was trained with "
            f"({OPTIONS['extract_layers']} {','.join(map(str, range(depth)))} for example)"
        )
    if "decoder_num_attention_heads" in assumed and reduce_dim % values["decoder_num_attention_heads"]:
        raise InferenceError(
            f"reduce_dim {reduce_dim} is not divisible by the original default of "
            f"{values['decoder_num_attention_heads']} decoder heads, so the decoder was trained with another n_heads: "
            f"give it ({OPTIONS['decoder_num_attention_heads']} N)"
        )
    return {**values, "extract_layers": list(layers)}, assumed


def infer(tensors: Mapping[str, Tensor], given: Mapping[str, Any] | None = None, variant: str = "NAME") -> Inferred:
    """The architecture of CLIP + decoder tensors under their original names. `given` may set what the tensors cannot
    tell (ASSUMABLE); what it leaves out takes the original code's default and is reported as assumed."""
    check_clipseg(tensors)
    width, _, _, patch = _shape(tensors, CLIP_TELLTALE)
    positions = _shape(tensors, "visual.positional_embedding")[0]
    grid = math.isqrt(positions - 1)
    if grid * grid + 1 != positions:
        raise InferenceError(f"visual.positional_embedding has {positions} rows: not a square grid of patches plus one")
    text_width = _shape(tensors, "ln_final.weight")[0]
    projection_dim = _shape(tensors, "text_projection")[1]
    vision_layers = _count(tensors, r"visual\.transformer\.resblocks\.\d+\.attn\.in_proj_weight")
    decoder = _decoder(tensors, patch, projection_dim)
    unknowns, assumed = _unknowns(given or {}, decoder.pop("layers"), vision_layers, decoder["reduce_dim"])
    data = {
        "vision": {
            "hidden_size": width,
            "intermediate_size": _shape(tensors, "visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
            "num_hidden_layers": vision_layers,
            "num_attention_heads": _heads(width, "vision"),
            "patch_size": patch,
            "image_size": patch * grid,
        },
        "text": {
            "hidden_size": text_width,
            "intermediate_size": _shape(tensors, "transformer.resblocks.0.mlp.c_fc.weight")[0],
            "num_hidden_layers": _count(tensors, r"transformer\.resblocks\.\d+\.attn\.in_proj_weight"),
            "num_attention_heads": _heads(text_width, "text"),
            "vocab_size": _shape(tensors, "token_embedding.weight")[0],
            "max_position_embeddings": _shape(tensors, "positional_embedding")[0],
        },
        "projection_dim": projection_dim,
        **decoder,
        **unknowns,
    }
    try:
        arch = Architecture.from_mapping(data, f"models.{variant}.architecture")
        # Every tensor present with the inferred shape, nothing left over: the files form one model.
        check_architecture(tensors, arch, variant)
    except (SchemaError, RemapError) as exc:
        raise InferenceError(f"the tensors do not form one CLIPSeg model transformers can hold: {exc}") from exc
    return Inferred(arch, assumed)
