"""Independent reference of the ORIGINAL CLIPSeg forward pass, run on the original tensors.

Input: a mapping of the original tensors under their original names (OpenAI CLIP keys such as
`visual.transformer.resblocks.3.attn.in_proj_weight`, `text_projection`, `visual.proj`, and the
decoder keys such as `film_mul.weight`, `reduces.0.weight`, `blocks.1.self_attn.in_proj_weight`,
`trans_conv.weight` / `trans_conv.{0,2,4}.weight`), the architecture mapping (`arch` in params.yaml),
normalized pixel values and token ids.
Output: dicts of activations in the working dtype (`vision.block{k}`, `text.block{k}`, `decoder.step{i}`,
...) and the logits [P, H_out, W_out]. Each block's parts are recorded too (`vision.block3.attention`, ...), and
every dict lists its entries in the order the forward pass computes them, a part before its block:
the vision tower, the pooled output, the text tower, the conditional embeddings, the decoder steps,
the logits. The first entry where a converted model disagrees is therefore where its fault starts.

Written from the original code's description (docs/original-format.md) with plain torch and nothing from transformers, so that it
can prove a conversion to the Hugging Face layout correct. Every tensor is cast to the working dtype
(`dtype`: float32 by default, float64 for verify-outputs) when used, whatever its stored dtype (the
CLIP file mixes fp16 and fp32). The arch mapping is trusted (it is validated where params are read);
the tensors are checked against it.

Layout: the original runs its transformers sequence-first ([T, B, W]); here everything is
batch-first ([B, T, W]). Attention, LayerNorm and the MLPs act per sample, so the two are the same
computation with the first two axes swapped.
"""

from collections.abc import Mapping, Sequence
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .architecture import Architecture, clip_block_shapes, decoder_block_shapes, linear_shapes, norm_shapes

LAYER_NORM_EPS = 1e-5  # OpenAI CLIP's LayerNorm and nn.TransformerEncoderLayer's default
QUICK_GELU_SCALE = 1.702  # OpenAI CLIP's activation: x * sigmoid(1.702 x)


class _Weights:
    """The original tensors, each cast to the reference's working dtype when it is used (never all at once)."""

    def __init__(self, tensors: "Mapping[str, Tensor] | _Weights", dtype: torch.dtype):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"reference: dtype must be torch.float32 or torch.float64, found {dtype}")
        self.tensors = tensors.tensors if isinstance(tensors, _Weights) else tensors
        self.dtype = dtype


def _tensor(weights: _Weights, key: str, shape: Sequence[int], cast: bool = True) -> Tensor:
    """The tensor under `key` in the working dtype (as stored if not `cast`), after checking it exists with the shape
    `arch` implies."""
    if key not in weights.tensors:
        raise ValueError(
            f"reference: tensor '{key}' is missing (expected shape {list(shape)}); "
            "pass the original CLIP and decoder tensors under their original key names"
        )
    tensor = weights.tensors[key]  # read once: from a TensorFile every lookup reads the file
    if list(tensor.shape) != list(shape):
        raise ValueError(
            f"reference: tensor '{key}' has shape {list(tensor.shape)}, expected {list(shape)} from arch; "
            "check that the arch parameters match the checkpoint variant"
        )
    if not cast:
        return tensor
    if tensor.dtype == torch.float16 and weights.dtype == torch.float64:
        tensor = tensor.float()  # exact, and with the float32 -> float64 step a third faster than float16 -> float64
    return tensor.to(weights.dtype)


def _group(weights: _Weights, prefix: str, shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """Tensors `prefix + suffix` for every suffix in `shapes`, keyed by suffix."""
    return {suffix: _tensor(weights, prefix + suffix, shape) for suffix, shape in shapes.items()}


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, LAYER_NORM_EPS)


def _mha(x: Tensor, in_w: Tensor, in_b: Tensor, out_w: Tensor, out_b: Tensor, heads: int, causal: bool) -> Tensor:
    """nn.MultiheadAttention self-attention on batch-first x [B, T, W]; in_w stacks q, k, v rows."""
    batch, tokens, width = x.shape
    head_dim = width // heads
    q, k, v = F.linear(x, in_w, in_b).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, tokens, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    # softmax(q k^T / sqrt(head_dim)) v, through the kernel nn.MultiheadAttention itself calls when, as in CLIP and the
    # decoder, no attention weights are asked for. CLIP's text mask is causal: position i sees only j <= i, so padding
    # after the end token never leaks back.
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=head_dim**-0.5)
    return F.linear(out.transpose(1, 2).reshape(batch, tokens, width), out_w, out_b)


def _clip_block(x: Tensor, p: Mapping[str, Tensor], heads: int, causal: bool,
                parts: dict[str, Tensor] | None = None) -> Tensor:
    """OpenAI CLIP residual block: pre-LayerNorm, QuickGELU MLP.

    `parts`, when given, receives what each sub-layer outputs, in order: norm1, attention, norm2, mlp.
    """
    norm1 = _layer_norm(x, p["ln_1.weight"], p["ln_1.bias"])
    attention = _mha(norm1, p["attn.in_proj_weight"], p["attn.in_proj_bias"],
                     p["attn.out_proj.weight"], p["attn.out_proj.bias"], heads, causal)
    x = x + attention
    norm2 = _layer_norm(x, p["ln_2.weight"], p["ln_2.bias"])
    h = F.linear(norm2, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])
    mlp = F.linear(h * torch.sigmoid(QUICK_GELU_SCALE * h), p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
    if parts is not None:
        parts.update(norm1=norm1, attention=attention, norm2=norm2, mlp=mlp)
    return x + mlp


def _decoder_block(x: Tensor, p: Mapping[str, Tensor], heads: int, parts: dict[str, Tensor] | None = None) -> Tensor:
    """nn.TransformerEncoderLayer in eval mode: post-norm, ReLU (dropout is off at inference).

    `parts`, when given, receives what each sub-layer outputs, in order: attention, norm1, mlp, norm2.
    """
    attention = _mha(x, p["self_attn.in_proj_weight"], p["self_attn.in_proj_bias"],
                     p["self_attn.out_proj.weight"], p["self_attn.out_proj.bias"], heads, False)
    norm1 = _layer_norm(x + attention, p["norm1.weight"], p["norm1.bias"])
    mlp = F.linear(F.linear(norm1, p["linear1.weight"], p["linear1.bias"]).relu_(), p["linear2.weight"], p["linear2.bias"])
    norm2 = _layer_norm(norm1 + mlp, p["norm2.weight"], p["norm2.bias"])
    if parts is not None:
        parts.update(attention=attention, norm1=norm1, mlp=mlp, norm2=norm2)
    return norm2


def _run_block(out: dict[str, Tensor], name: str, block, x: Tensor, *args) -> Tensor:
    """Run `block` on x, recording its parts as `name.part` and then its output as `name` in `out`."""
    parts: dict[str, Tensor] = {}
    x = block(x, *args, parts)
    out |= {f"{name}.{part}": value for part, value in parts.items()}
    out[name] = x
    return x


def _positional_embedding(tensors: _Weights, arch: Architecture, grid: tuple[int, int]) -> Tensor:
    """Vision positional embedding [1 + gh*gw, W]; the patch rows are resized bicubically to `grid`."""
    vision = arch.vision
    width, stored_side = vision.hidden_size, vision.grid_side
    pos = _tensor(tensors, "visual.positional_embedding", (vision.positions, width))
    if grid == (stored_side, stored_side):
        return pos
    # Patch rows are row-major over the stored grid; the class row has no grid position and is kept.
    patches = pos[1:].T.reshape(1, width, stored_side, stored_side)
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patches.reshape(width, grid[0] * grid[1]).T])


def encode_image(tensors: Mapping[str, Tensor], arch: Architecture, pixel_values: Tensor,
                 dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Normalized pixels [B, 3, H, W] -> {"vision.embeddings", "vision.pre_norm", "vision.block{k}[.part]": [B, T, W],
    "vision.post_norm": [B, W], "pooled_output": [B, proj]}.

    T = 1 + (H // patch) * (W // patch): the class token first, then the patches row by row.
    """
    tensors = _Weights(tensors, dtype)
    vision = arch.vision
    width, patch, heads = vision.hidden_size, vision.patch_size, vision.num_attention_heads
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"reference: pixel_values must be [B, 3, H, W], found {list(pixel_values.shape)}")
    conv = _tensor(tensors, "visual.conv1.weight", (width, 3, patch, patch))
    x = F.conv2d(pixel_values.to(dtype), conv, stride=patch)
    grid = (x.shape[2], x.shape[3])
    x = x.flatten(2).transpose(1, 2)
    cls = _tensor(tensors, "visual.class_embedding", (width,)).expand(x.shape[0], 1, width)
    x = torch.cat([cls, x], dim=1) + _positional_embedding(tensors, arch, grid)
    out = {"vision.embeddings": x}
    ln_pre = _group(tensors, "visual.ln_pre.", norm_shapes("", width))
    x = out["vision.pre_norm"] = _layer_norm(x, ln_pre["weight"], ln_pre["bias"])
    shapes = clip_block_shapes(width, vision.intermediate_size)
    for k in range(vision.num_hidden_layers):
        p = _group(tensors, f"visual.transformer.resblocks.{k}.", shapes)
        x = _run_block(out, f"vision.block{k}", _clip_block, x, p, heads, False)
        del p  # this block's float64 weights are freed before the next block's are cast
    ln_post = _group(tensors, "visual.ln_post.", norm_shapes("", width))
    proj = _tensor(tensors, "visual.proj", (width, arch.projection_dim))
    out["vision.post_norm"] = _layer_norm(x[:, 0], ln_post["weight"], ln_post["bias"])
    out["pooled_output"] = out["vision.post_norm"] @ proj
    return out


def encode_text(tensors: Mapping[str, Tensor], arch: Architecture, input_ids: Tensor,
                dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Token ids [P, L] -> {"text.embeddings", "text.block{k}[.part]", "text.final_norm": [P, L, Wt],
    "text.pooled": [P, Wt], "conditional_embeddings": [P, proj]}."""
    tensors = _Weights(tensors, dtype)
    text = arch.text
    width, vocab, context = text.hidden_size, text.vocab_size, text.max_position_embeddings
    if input_ids.ndim != 2 or input_ids.shape[1] > context:
        raise ValueError(f"reference: input_ids must be [P, L] with L <= {context}, found {list(input_ids.shape)}")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
        raise ValueError(f"reference: input_ids must lie in [0, {vocab}), found "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    ids = input_ids.long()
    # Only the prompts' rows are cast (a lookup is exact in any dtype): the whole table would be 200 MB in float64.
    x = F.embedding(ids, _tensor(tensors, "token_embedding.weight", (vocab, width), cast=False)).to(dtype)
    x = x + _tensor(tensors, "positional_embedding", (context, width))[: ids.shape[1]]
    out, heads = {"text.embeddings": x}, text.num_attention_heads
    shapes = clip_block_shapes(width, text.intermediate_size)
    for k in range(text.num_hidden_layers):
        p = _group(tensors, f"transformer.resblocks.{k}.", shapes)
        x = _run_block(out, f"text.block{k}", _clip_block, x, p, heads, True)
        del p
    ln_final = _group(tensors, "ln_final.", norm_shapes("", width))
    x = out["text.final_norm"] = _layer_norm(x, ln_final["weight"], ln_final["bias"])
    # CLIP's end token has the largest id in its vocabulary, so the argmax finds it in every prompt.
    out["text.pooled"] = x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)]
    out["conditional_embeddings"] = out["text.pooled"] @ _tensor(tensors, "text_projection",
                                                                 (width, arch.projection_dim))
    return out


def _trans_conv(tensors: _Weights, arch: Architecture, a: Tensor,
                parts: dict[str, Tensor] | None = None) -> Tensor:
    """Decoder upsampling: [P, D, g, g] -> [P, 1, g*patch, g*patch].

    For the refined variant, `parts` (when given) receives the outputs of its first two layers before
    their ReLU, named after their original keys: trans_conv0, trans_conv2.
    """
    p = _group(tensors, "trans_conv.", arch.trans_conv_shapes())
    if not arch.use_complex_transposed_convolution:
        return F.conv_transpose2d(a, p["weight"], p["bias"], stride=arch.vision.patch_size)
    # Refined variant: nn.Sequential(Conv2d 3x3, ReLU, ConvTranspose2d, ReLU, ConvTranspose2d).
    k = arch.refined_kernel
    conv0 = F.conv2d(a, p["0.weight"], p["0.bias"], padding=1)
    conv2 = F.conv_transpose2d(F.relu(conv0), p["2.weight"], p["2.bias"], stride=k)
    if parts is not None:
        parts.update(trans_conv0=conv0, trans_conv2=conv2)
    return F.conv_transpose2d(F.relu(conv2), p["4.weight"], p["4.bias"], stride=k)


def decode(tensors: Mapping[str, Tensor], arch: Architecture, activations: Sequence[Tensor],
           conditional_embeddings: Tensor, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Vision activations at extract_layers [B, T, W] + conditions [P, proj] -> {"decoder.step{i}[.part]" [P, T, D],
    "decoder.step{c}.film_mul/film_add" [P, D] (c = conditional_layer), "logits[.part]"}.

    B must be P, or 1: then the one image serves every prompt, so it is encoded once, not P times.
    Step i's parts: reduce (its activation through reduces[i]), film_mul and film_add at the
    conditional layer, then its block's attention, norm1, mlp, norm2.
    """
    tensors = _Weights(tensors, dtype)
    d, steps = arch.reduce_dim, len(arch.extract_layers)
    width, proj = arch.vision.hidden_size, arch.projection_dim
    prompts = conditional_embeddings.shape[0]
    if len(activations) != steps:
        raise ValueError(f"reference: decode needs {steps} activations (one per extract layer "
                         f"{list(arch.extract_layers)}), found {len(activations)}")
    if any(act.shape[0] not in (1, prompts) for act in activations):
        raise ValueError(f"reference: activation batch sizes {[act.shape[0] for act in activations]} "
                         f"must equal the number of prompts ({prompts}) or be 1")
    cond = conditional_embeddings.to(dtype)
    film_mul = _group(tensors, "film_mul.", linear_shapes("", d, proj))
    film_add = _group(tensors, "film_add.", linear_shapes("", d, proj))
    block_shapes = decoder_block_shapes(d, arch.decoder_intermediate_size)
    out, a = {}, None
    # The deepest activation enters first; a batch of 1 broadcasts against the P conditions at FiLM.
    for i, act in enumerate(reversed(activations)):
        reduce = _group(tensors, f"reduces.{i}.", linear_shapes("", d, width))
        reduced = F.linear(act.to(dtype), reduce["weight"], reduce["bias"])
        out[f"decoder.step{i}.reduce"] = reduced.expand(prompts, -1, -1)
        a = reduced if a is None else reduced + a
        if i == arch.conditional_layer:
            mul = out[f"decoder.step{i}.film_mul"] = F.linear(cond, film_mul["weight"], film_mul["bias"])
            add = out[f"decoder.step{i}.film_add"] = F.linear(cond, film_add["weight"], film_add["bias"])
            a = mul.unsqueeze(1) * a + add.unsqueeze(1)
        p = _group(tensors, f"blocks.{i}.", block_shapes)
        a = _run_block(out, f"decoder.step{i}", _decoder_block, a, p, arch.decoder_num_attention_heads)
    out |= {name: t.expand(prompts, *t.shape[1:]) for name, t in out.items() if name.startswith("decoder.step")}
    a = out[f"decoder.step{steps - 1}"]
    side = math.isqrt(a.shape[1] - 1)
    if side * side != a.shape[1] - 1:
        raise ValueError(f"reference: {a.shape[1] - 1} patch tokens do not form a square grid")
    # Drop the class token; tokens run row-major over the grid, so channels move first.
    grid = a[:, 1:].transpose(1, 2).reshape(prompts, d, side, side)
    parts: dict[str, Tensor] = {}
    logits = _trans_conv(tensors, arch, grid, parts)
    out |= {f"logits.{part}": value for part, value in parts.items()}
    out["logits"] = logits.squeeze(1)
    return out


def reference_forward(tensors: Mapping[str, Tensor], arch: Architecture, pixel_values: Tensor,
                      input_ids: Tensor, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """One image [1, 3, H, W] + P prompts [P, L] -> the union of encode_image, encode_text and decode, computed in
    `dtype` (float64 makes the reference's last float32 bits the same on every CPU, see verify-outputs)."""
    return forward_from_vision(tensors, arch, encode_image(tensors, arch, pixel_values, dtype), input_ids, dtype)


def forward_from_vision(tensors: Mapping[str, Tensor], arch: Architecture, vision: Mapping[str, Tensor],
                        input_ids: Tensor, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """reference_forward's rest, from encode_image's entries `vision` (computed elsewhere, in `dtype`): the union of
    those, encode_text and decode."""
    layers = arch.vision.num_hidden_layers
    if any(not 0 <= k < layers for k in arch.extract_layers):
        raise ValueError(f"reference: extract_layers {list(arch.extract_layers)} "
                         f"must be block indices in [0, {layers})")
    text = encode_text(tensors, arch, input_ids, dtype)
    activations = [vision[f"vision.block{k}"] for k in arch.extract_layers]
    return {**vision, **text, **decode(tensors, arch, activations, text["conditional_embeddings"], dtype)}


def image_prompt_forward(tensors: Mapping[str, Tensor], arch: Architecture, pixel_values: Tensor,
                         prompt_pixel_values: Tensor, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """One image [1, 3, H, W] conditioned on K prompt images [K, 3, h, w], as the original conditions on an image: it
    runs the prompt through its own vision tower, at the prompt's own size, and takes the projected class token (the
    pooled output). -> {"conditional_embeddings": [K, proj], "logits": [K, H_out, W_out]}."""
    vision = encode_image(tensors, arch, pixel_values, dtype)
    conditions = encode_image(tensors, arch, prompt_pixel_values, dtype)["pooled_output"]
    activations = [vision[f"vision.block{k}"] for k in arch.extract_layers]
    return {"conditional_embeddings": conditions,
            "logits": decode(tensors, arch, activations, conditions, dtype)["logits"]}
