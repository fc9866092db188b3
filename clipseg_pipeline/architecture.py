"""What a CLIPSeg model is: its architecture as one typed, validated value, the shapes of every weight it has in the
original files, and the config.json settings it maps to.

Every shape formula lives here: the original-format readers and checks, the reference forward pass, the Hugging Face
layout (hf_layout derives its state dict from these shapes through the name map) and the synthetic generator read
their shapes from an Architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .schema import SchemaError, at_least, check_mapping, is_kind

# The published configs carry these text token ids; with eos_token_id == 2 transformers' CLIPSeg pools the text at the
# argmax of the ids, which is what the original does (its end token has the largest id).
TEXT_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


@dataclass(frozen=True)
class VisionTower:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int  # the resolution CLIP was trained at: its position embeddings form a grid of this size

    @property
    def grid_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def positions(self) -> int:
        """Position embeddings: one per patch of the training grid, plus the class token."""
        return self.grid_side**2 + 1


@dataclass(frozen=True)
class TextTower:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int


@dataclass(frozen=True)
class Architecture:
    vision: VisionTower
    text: TextTower
    projection_dim: int
    extract_layers: tuple[int, ...]  # vision blocks whose outputs feed the decoder, shallowest first
    reduce_dim: int
    decoder_num_attention_heads: int
    decoder_intermediate_size: int
    conditional_layer: int  # the decoder step at which the condition enters (FiLM)
    use_complex_transposed_convolution: bool  # the refined decoder's upsampling

    # ---- reading and writing it ---------------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Any, where: str = "architecture") -> Architecture:
        """An architecture in params.yaml's form, validated: every field present, of its kind, and the numbers fitting
        together. A SchemaError names the dotted key (`where` is the mapping's own)."""
        kinds = {f.name: f.type for f in fields(cls)}
        top = check_mapping(data, where, {name: _KINDS[kind] for name, kind in kinds.items()})
        towers = {}
        for name, tower in (("vision", VisionTower), ("text", TextTower)):
            keys = [f.name for f in fields(tower)]
            check_mapping(top[name], f"{where}.{name}", dict.fromkeys(keys, int))
            for key in keys:
                at_least(top[name][key], 1, f"{where}.{name}.{key}")
            towers[name] = tower(**top[name])
        for key in ("projection_dim", "reduce_dim", "decoder_num_attention_heads", "decoder_intermediate_size"):
            at_least(top[key], 1, f"{where}.{key}")
        layers = top["extract_layers"]
        depth = towers["vision"].num_hidden_layers
        if not layers or not all(is_kind(i, int) and 0 <= i < depth for i in layers):
            raise SchemaError(f"`{where}.extract_layers` must list block indices in 0..{depth - 1}, found {layers}")
        arch = cls(**{**top, **towers, "extract_layers": tuple(layers)})
        if problem := arch.problem(where):
            raise SchemaError(problem)
        return arch

    def problem(self, where: str = "architecture") -> str | None:
        """Why these numbers cannot make a model, naming the keys under `where`; None when they can."""
        vision = self.vision
        if not 0 <= self.conditional_layer < len(self.extract_layers):
            return (f"`{where}.conditional_layer` must index extract_layers (0..{len(self.extract_layers) - 1}), "
                    f"found {self.conditional_layer}")
        if vision.image_size % vision.patch_size:
            return (f"`{where}.vision.image_size` ({vision.image_size}) must be a multiple of patch_size "
                    f"({vision.patch_size})")
        if self.use_complex_transposed_convolution and (vision.patch_size % 4 or self.reduce_dim % 2):
            return (f"`{where}`: the refined decoder (use_complex_transposed_convolution) needs a patch_size divisible "
                    f"by 4 and an even reduce_dim, found {vision.patch_size} and {self.reduce_dim}")
        for name, width, heads in (("vision", vision.hidden_size, vision.num_attention_heads),
                                   ("text", self.text.hidden_size, self.text.num_attention_heads),
                                   ("decoder", self.reduce_dim, self.decoder_num_attention_heads)):
            if width % heads:
                return f"`{where}`: the {name} width {width} is not divisible by its {heads} attention heads"
        return None

    def to_mapping(self) -> dict:
        """params.yaml's form (plain lists and dicts)."""
        data = asdict(self)
        data["extract_layers"] = list(self.extract_layers)
        return data

    @classmethod
    def from_config(cls, config: Mapping) -> Architecture:
        """The architecture a config.json (or CLIPSegConfig.to_dict()) describes."""
        data = {f.name: config[f.name] for f in fields(cls) if f.name not in ("vision", "text")}
        for name, tower in (("vision", VisionTower), ("text", TextTower)):
            data[name] = {f.name: config[f"{name}_config"][f.name] for f in fields(tower)}
        data["extract_layers"] = list(data["extract_layers"])
        return cls.from_mapping(data, "config.json")

    def config_settings(self) -> dict:
        """What this architecture sets in CLIPSegConfig (config.json); every other field keeps transformers' default."""
        data = self.to_mapping()
        return {
            "text_config": {**data.pop("text"), **TEXT_TOKEN_IDS},
            "vision_config": data.pop("vision"),
            **data,
            # The decoder layers always use ReLU whatever this says; recording it keeps config.json truthful.
            "decoder_hidden_act": "relu",
        }

    # ---- the shapes of the original files' weights ---------------------------------------------------------------

    @property
    def refined_kernel(self) -> int:
        """The refined decoder's two transposed convolutions: kernel = stride = patch // 4 (full size for patch 16)."""
        return self.vision.patch_size // 4

    def clip_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight of OpenAI's CLIP file with its shape (the archive's three scalar settings are not weights)."""
        vision, text, proj = self.vision, self.text, self.projection_dim
        shapes = {
            "positional_embedding": (text.max_position_embeddings, text.hidden_size),
            "text_projection": (text.hidden_size, proj),
            "logit_scale": (),
            "token_embedding.weight": (text.vocab_size, text.hidden_size),
            **norm_shapes("ln_final.", text.hidden_size),
            "visual.class_embedding": (vision.hidden_size,),
            "visual.positional_embedding": (vision.positions, vision.hidden_size),
            "visual.proj": (vision.hidden_size, proj),
            "visual.conv1.weight": (vision.hidden_size, 3, vision.patch_size, vision.patch_size),
            **norm_shapes("visual.ln_pre.", vision.hidden_size),
            **norm_shapes("visual.ln_post.", vision.hidden_size),
        }
        for prefix, tower in (("visual.", vision), ("", text)):
            block = clip_block_shapes(tower.hidden_size, tower.intermediate_size)
            for i in range(tower.num_hidden_layers):
                shapes |= prefixed(f"{prefix}transformer.resblocks.{i}.", block)
        return shapes

    def decoder_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight the CLIPSeg decoder's forward pass uses, with its shape (the unused `reduce.*` is not listed)."""
        d, proj, width = self.reduce_dim, self.projection_dim, self.vision.hidden_size
        shapes = {**linear_shapes("film_mul.", d, proj), **linear_shapes("film_add.", d, proj)}
        block = decoder_block_shapes(d, self.decoder_intermediate_size)
        for i in range(len(self.extract_layers)):
            shapes |= linear_shapes(f"reduces.{i}.", d, width) | prefixed(f"blocks.{i}.", block)
        return shapes | prefixed("trans_conv.", self.trans_conv_shapes())

    def trans_conv_shapes(self) -> dict[str, tuple[int, ...]]:
        """The decoder's upsampling, under `trans_conv.`: one transposed convolution (kernel = stride = patch), or the
        refined nn.Sequential(Conv2d 3x3, ReLU, ConvTranspose2d, ReLU, ConvTranspose2d)."""
        d, patch, k = self.reduce_dim, self.vision.patch_size, self.refined_kernel
        if not self.use_complex_transposed_convolution:
            return {"weight": (d, 1, patch, patch), "bias": (1,)}
        return {
            "0.weight": (d, d, 3, 3),       "0.bias": (d,),
            "2.weight": (d, d // 2, k, k),  "2.bias": (d // 2,),
            "4.weight": (d // 2, 1, k, k),  "4.bias": (1,),
        }  # fmt: skip

    def original_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.clip_shapes() | self.decoder_shapes()


_KINDS = {"VisionTower": dict, "TextTower": dict, "int": int, "bool": bool, "tuple[int, ...]": list}


def prefixed(prefix: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {prefix + name: shape for name, shape in shapes.items()}


def linear_shapes(prefix: str, out_dim: int, in_dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}weight": (out_dim, in_dim), f"{prefix}bias": (out_dim,)}


def norm_shapes(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}weight": (width,), f"{prefix}bias": (width,)}


def clip_block_shapes(width: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    """One OpenAI CLIP residual block; nn.MultiheadAttention stacks q, k and v in in_proj."""
    return {
        **norm_shapes("ln_1.", width),
        "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
        **linear_shapes("attn.out_proj.", width, width),
        **norm_shapes("ln_2.", width),
        **linear_shapes("mlp.c_fc.", intermediate, width),
        **linear_shapes("mlp.c_proj.", width, intermediate),
    }


def decoder_block_shapes(width: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    """One nn.TransformerEncoderLayer of the decoder."""
    return {
        "self_attn.in_proj_weight": (3 * width, width), "self_attn.in_proj_bias": (3 * width,),
        **linear_shapes("self_attn.out_proj.", width, width),
        **linear_shapes("linear1.", intermediate, width),
        **linear_shapes("linear2.", width, intermediate),
        **norm_shapes("norm1.", width),
        **norm_shapes("norm2.", width),
    }
