"""Tests for clipseg_pipeline.reference: each piece checked against torch.nn modules or explicit formulas."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipseg_pipeline import reference
from clipseg_pipeline.architecture import Architecture

ARCH = Architecture.from_mapping({
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
               "patch_size": 16, "image_size": 224},
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 64, "max_position_embeddings": 77},
    "projection_dim": 16,
    "extract_layers": [1, 2, 3],
    "reduce_dim": 16,
    "decoder_num_attention_heads": 4,
    "decoder_intermediate_size": 64,
    "conditional_layer": 0,
    "use_complex_transposed_convolution": False,
})
REFINED_ARCH = replace(ARCH, use_complex_transposed_convolution=True)


def make_tensors(arch: Architecture = ARCH, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random original-format tensors; LayerNorm weights near 1 so activations stay well scaled."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in arch.original_shapes().items():
        if key == "logit_scale":  # CLIP's, not read by CLIPSeg's forward pass
            continue
        noise = torch.randn(shape, generator=gen)
        is_norm_weight = key.endswith("weight") and len(shape) == 1
        tensors[key] = 1 + 0.1 * noise if is_norm_weight else noise / math.sqrt(shape[-1])
    return tensors


def _strip(tensors: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def _pixels(size: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ids(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


PROMPTS = _ids([[1, 5, 63, 0, 0], [1, 7, 9, 63, 0], [1, 63, 0, 0, 0]])


def _explicit_layer_norm(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = v.sum() / v.numel()
    var = ((v - mean) ** 2).sum() / v.numel()
    return (v - mean) / math.sqrt(var + 1e-5) * weight + bias


@pytest.mark.parametrize("causal", [False, True])
def test_clip_block_matches_explicit_formulas_on_two_tokens(causal):
    tensors = make_tensors()
    p = _strip(tensors, "visual.transformer.resblocks.0.")
    x = torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(3))
    heads, head_dim = 4, 8
    w_q, w_k, w_v = p["attn.in_proj_weight"].split(32)
    b_q, b_k, b_v = p["attn.in_proj_bias"].split(32)
    expected = torch.empty(2, 32)
    for i in range(2):
        h = [_explicit_layer_norm(x[0, j], p["ln_1.weight"], p["ln_1.bias"]) for j in range(2)]
        seen = range(i + 1) if causal else range(2)
        attended = []
        for head in range(heads):
            rows = slice(head * head_dim, (head + 1) * head_dim)
            q = w_q[rows] @ h[i] + b_q[rows]
            scores = [float(q @ (w_k[rows] @ h[j] + b_k[rows])) / math.sqrt(head_dim) for j in seen]
            weights = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
            attended.append(sum(w * (w_v[rows] @ h[j] + b_v[rows]) for w, j in zip(weights, seen)))
        y = x[0, i] + p["attn.out_proj.weight"] @ torch.cat(attended) + p["attn.out_proj.bias"]
        hidden = p["mlp.c_fc.weight"] @ _explicit_layer_norm(y, p["ln_2.weight"], p["ln_2.bias"]) + p["mlp.c_fc.bias"]
        hidden = hidden / (1 + torch.exp(-1.702 * hidden))
        expected[i] = y + p["mlp.c_proj.weight"] @ hidden + p["mlp.c_proj.bias"]
    actual = reference._clip_block(x, p, heads, causal)
    torch.testing.assert_close(actual[0], expected, atol=1e-5, rtol=1e-5)


def test_decoder_block_matches_transformer_encoder_layer():
    tensors = make_tensors()
    p = _strip(tensors, "blocks.1.")
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=64, dropout=0.0)
    layer.load_state_dict(p)
    layer.eval()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = layer(x.transpose(0, 1)).transpose(0, 1)  # the layer is sequence-first
    torch.testing.assert_close(reference._decoder_block(x, p, heads=4), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_mha_matches_multihead_attention(causal):
    tensors = make_tensors()
    p = _strip(tensors, "transformer.resblocks.1.attn.")
    attention = nn.MultiheadAttention(32, 4)
    attention.load_state_dict(p)
    x = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(5))
    mask = torch.full((6, 6), float("-inf")).triu(1) if causal else None
    with torch.no_grad():
        expected, _ = attention(*(x.transpose(0, 1),) * 3, attn_mask=mask, need_weights=False)
    actual = reference._mha(x, p["in_proj_weight"], p["in_proj_bias"], p["out_proj.weight"], p["out_proj.bias"],
                            heads=4, causal=causal)
    torch.testing.assert_close(actual, expected.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_plain_trans_conv_matches_conv_transpose2d():
    tensors = make_tensors()
    module = nn.ConvTranspose2d(16, 1, kernel_size=16, stride=16)
    module.load_state_dict(_strip(tensors, "trans_conv."))
    a = torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = module(a)
    actual = reference._trans_conv(reference._Weights(tensors, torch.float32), ARCH, a)
    assert actual.shape == (2, 1, 48, 48)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_refined_trans_conv_matches_sequential():
    tensors = make_tensors(REFINED_ARCH)
    module = nn.Sequential(nn.Conv2d(16, 16, kernel_size=3, padding=1), nn.ReLU(),
                           nn.ConvTranspose2d(16, 8, kernel_size=4, stride=4), nn.ReLU(),
                           nn.ConvTranspose2d(8, 1, kernel_size=4, stride=4))
    module.load_state_dict(_strip(tensors, "trans_conv."))
    a = torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = module(a)
    actual = reference._trans_conv(reference._Weights(tensors, torch.float32), REFINED_ARCH, a)
    assert actual.shape == (2, 1, 48, 48)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_vision_embeddings_put_the_class_token_first_then_patches_row_by_row():
    tensors = make_tensors()
    pixels = _pixels(224)
    out = reference.encode_image(tensors, ARCH, pixels)
    pos, conv = tensors["visual.positional_embedding"], tensors["visual.conv1.weight"]
    ln_pre = tensors["visual.ln_pre.weight"], tensors["visual.ln_pre.bias"]
    expected_cls = tensors["visual.class_embedding"] + pos[0]
    torch.testing.assert_close(out["vision.embeddings"][0, 0], expected_cls)
    torch.testing.assert_close(out["vision.pre_norm"][0, 0], _explicit_layer_norm(expected_cls, *ln_pre))
    for row, col in [(0, 1), (5, 9), (13, 13)]:
        patch = pixels[0, :, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16]
        token = 1 + row * 14 + col
        embedded = torch.einsum("wchk,chk->w", conv, patch) + pos[token]
        torch.testing.assert_close(out["vision.embeddings"][0, token], embedded)
        torch.testing.assert_close(out["vision.pre_norm"][0, token], _explicit_layer_norm(embedded, *ln_pre))
    ln_post = tensors["visual.ln_post.weight"], tensors["visual.ln_post.bias"]
    post_norm = _explicit_layer_norm(out["vision.block3"][0, 0], *ln_post)
    torch.testing.assert_close(out["vision.post_norm"][0], post_norm)
    torch.testing.assert_close(out["pooled_output"][0], post_norm @ tensors["visual.proj"])


def test_positional_embedding_kept_at_native_size():
    tensors = make_tensors()
    assert torch.equal(reference._positional_embedding(reference._Weights(tensors, torch.float32), ARCH, (14, 14)), tensors["visual.positional_embedding"])
    assert reference.encode_image(tensors, ARCH, _pixels(224))["vision.block3"].shape == (1, 197, 32)


def test_positional_embedding_resized_bicubically_at_352():
    tensors = make_tensors()
    stored = tensors["visual.positional_embedding"]
    resized = reference._positional_embedding(reference._Weights(tensors, torch.float32), ARCH, (22, 22))
    assert resized.shape == (485, 32)
    assert torch.equal(resized[0], stored[0])
    # Row r*14 + c of the stored table is grid cell (r, c); channels go first for interpolate.
    grid = stored[1:].reshape(14, 14, 32).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(22, 22), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    torch.testing.assert_close(resized[1:].reshape(22, 22, 32), expected)
    out = reference.encode_image(tensors, ARCH, _pixels(352))
    assert out["vision.embeddings"].shape == (1, 485, 32)
    assert out["pooled_output"].shape == (1, 16)


def test_positional_resize_keeps_a_constant_embedding_constant():
    tensors = make_tensors()
    tensors["visual.positional_embedding"] = torch.arange(32.0).expand(197, 32).clone()
    resized = reference._positional_embedding(reference._Weights(tensors, torch.float32), ARCH, (22, 22))
    torch.testing.assert_close(resized, torch.arange(32.0).expand(485, 32))


def test_text_pooling_takes_the_argmax_token():
    tensors = make_tensors()
    ids = _ids([[1, 5, 63, 7, 2, 0], [1, 63, 4, 4, 4, 4]])
    out = reference.encode_text(tensors, ARCH, ids)
    last = out["text.block1"]
    normed = F.layer_norm(last, (32,), tensors["ln_final.weight"], tensors["ln_final.bias"], 1e-5)
    torch.testing.assert_close(out["text.final_norm"], normed)
    torch.testing.assert_close(out["text.pooled"], torch.stack([normed[0, 2], normed[1, 1]]))
    expected = torch.stack([normed[0, 2], normed[1, 1]]) @ tensors["text_projection"]
    torch.testing.assert_close(out["conditional_embeddings"], expected)
    assert not torch.allclose(out["conditional_embeddings"][0], normed[0, -1] @ tensors["text_projection"])


def test_tokens_after_the_end_token_do_not_change_the_condition():
    tensors = make_tensors()
    a = reference.encode_text(tensors, ARCH, _ids([[1, 5, 63, 0, 0, 0]]))
    b = reference.encode_text(tensors, ARCH, _ids([[1, 5, 63, 9, 8, 7]]))
    torch.testing.assert_close(a["conditional_embeddings"], b["conditional_embeddings"])


def test_decoder_steps_read_activations_deepest_first_and_accumulate():
    tensors = make_tensors()
    activations = [torch.randn(1, 197, 32, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    cond = torch.randn(1, 16, generator=torch.Generator().manual_seed(7))
    a = F.linear(activations[2], tensors["reduces.0.weight"], tensors["reduces.0.bias"])
    a = (F.linear(cond, tensors["film_mul.weight"], tensors["film_mul.bias"])[:, None] * a
         + F.linear(cond, tensors["film_add.weight"], tensors["film_add.bias"])[:, None])
    expected = reference._decoder_block(a, _strip(tensors, "blocks.0."), heads=4)
    out = reference.decode(tensors, ARCH, activations, cond)
    torch.testing.assert_close(out["decoder.step0"], expected)
    for i, act in [(1, activations[1]), (2, activations[0])]:
        a = F.linear(act, tensors[f"reduces.{i}.weight"], tensors[f"reduces.{i}.bias"]) + out[f"decoder.step{i - 1}"]
        expected = reference._decoder_block(a, _strip(tensors, f"blocks.{i}."), heads=4)
        torch.testing.assert_close(out[f"decoder.step{i}"], expected)


def test_logits_tile_comes_from_its_row_major_token():
    tensors = make_tensors()
    out = reference.reference_forward(tensors, ARCH, _pixels(352), PROMPTS)
    tokens, kernel = out["decoder.step2"], tensors["trans_conv.weight"][:, 0]
    for p, row, col in [(0, 0, 1), (1, 3, 17), (2, 21, 5)]:
        # Plain trans_conv: the 16x16 output tile at grid cell (row, col) sees only that cell's token.
        token = tokens[p, 1 + row * 22 + col]
        expected = torch.einsum("d,dij->ij", token, kernel) + tensors["trans_conv.bias"]
        tile = out["logits"][p, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16]
        torch.testing.assert_close(tile, expected)


def _as_clip_file(tensors: dict) -> dict:
    """Stored as in the CLIP file: fp16 matrices, fp32 LayerNorms and embeddings."""
    fp32 = ("embedding", "ln_", "norm")
    return {k: v if v.ndim == 1 or any(s in k for s in fp32) else v.half() for k, v in tensors.items()}


def test_fp16_stored_tensors_compute_in_float32():
    tensors = make_tensors()
    mixed = _as_clip_file(tensors)
    assert {v.dtype for v in mixed.values()} == {torch.float16, torch.float32}
    out = reference.reference_forward(mixed, ARCH, _pixels(224).half(), PROMPTS)
    assert all(v.dtype == torch.float32 for v in out.values())
    # Same numbers as float32 copies of the rounded tensors: nothing is computed in fp16.
    rounded = reference.reference_forward({k: v.float() for k, v in mixed.items()}, ARCH, _pixels(224).half(), PROMPTS)
    for key in out:
        torch.testing.assert_close(out[key], rounded[key], atol=0, rtol=0)
    exact = reference.reference_forward(tensors, ARCH, _pixels(224), PROMPTS)
    torch.testing.assert_close(out["logits"], exact["logits"], atol=2e-2, rtol=2e-2)


def test_float64_computes_every_entry_in_float64_from_the_same_tensors():
    mixed = _as_clip_file(make_tensors())
    out = reference.reference_forward(mixed, ARCH, _pixels(224), PROMPTS, torch.float64)
    assert all(v.dtype == torch.float64 for v in out.values())
    single = reference.reference_forward(mixed, ARCH, _pixels(224), PROMPTS)
    assert out.keys() == single.keys()
    for key in out:  # float32 agrees to its own rounding: the same computation, only finer
        torch.testing.assert_close(single[key], out[key].float(), atol=1e-4, rtol=1e-4)
    # and is no copy of it: float64 keeps digits float32 cannot hold
    assert not torch.equal(out["logits"], out["logits"].float().double())


def test_other_working_dtypes_are_refused():
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64, found torch.float16"):
        reference.reference_forward(make_tensors(), ARCH, _pixels(224), PROMPTS, torch.float16)


@pytest.mark.parametrize("arch", [ARCH, REFINED_ARCH], ids=["plain", "refined"])
def test_reference_forward_shapes(arch):
    out = reference.reference_forward(make_tensors(arch), arch, _pixels(352), PROMPTS)
    expected = {"vision.embeddings": (1, 485, 32), "vision.pre_norm": (1, 485, 32), "vision.post_norm": (1, 32),
                "pooled_output": (1, 16), "text.embeddings": (3, 5, 32), "text.final_norm": (3, 5, 32),
                "text.pooled": (3, 32), "conditional_embeddings": (3, 16), "logits": (3, 352, 352),
                "decoder.step0.film_mul": (3, 16), "decoder.step0.film_add": (3, 16)}
    parts = ("", ".norm1", ".attention", ".norm2", ".mlp")
    expected |= {f"vision.block{k}{part}": (1, 485, 32) for k in range(4) for part in parts}
    expected |= {f"text.block{k}{part}": (3, 5, 32) for k in range(2) for part in parts}
    expected |= {f"decoder.step{i}{part}": (3, 485, 16) for i in range(3) for part in (*parts, ".reduce")}
    if arch.use_complex_transposed_convolution:
        expected |= {"logits.trans_conv0": (3, 16, 22, 22), "logits.trans_conv2": (3, 8, 88, 88)}
    assert {key: tuple(value.shape) for key, value in out.items()} == expected


def test_entries_come_in_the_order_they_are_computed_each_part_before_its_block():
    out = reference.reference_forward(make_tensors(REFINED_ARCH), REFINED_ARCH, _pixels(224), PROMPTS)
    vision = ["vision.embeddings", "vision.pre_norm"]
    vision += [f"vision.block{k}{part}" for k in range(4) for part in (".norm1", ".attention", ".norm2", ".mlp", "")]
    text = ["text.embeddings"]
    text += [f"text.block{k}{part}" for k in range(2) for part in (".norm1", ".attention", ".norm2", ".mlp", "")]
    decoder = []
    for i in range(3):
        decoder += [f"decoder.step{i}.reduce"] + [f"decoder.step0.film_{f}" for f in ("mul", "add") if i == 0]
        decoder += [f"decoder.step{i}{part}" for part in (".attention", ".norm1", ".mlp", ".norm2", "")]
    assert list(out) == [*vision, "vision.post_norm", "pooled_output", *text, "text.final_norm", "text.pooled",
                         "conditional_embeddings", *decoder, "logits.trans_conv0", "logits.trans_conv2", "logits"]


@pytest.mark.parametrize("causal", [False, True])
def test_clip_block_parts_add_up_to_the_block(causal):
    p = _strip(make_tensors(), "transformer.resblocks.0.")
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(8))
    parts = {}
    y = reference._clip_block(x, p, 4, causal, parts)
    assert list(parts) == ["norm1", "attention", "norm2", "mlp"]
    torch.testing.assert_close(parts["norm1"], F.layer_norm(x, (32,), p["ln_1.weight"], p["ln_1.bias"], 1e-5))
    torch.testing.assert_close(parts["attention"], reference._mha(parts["norm1"], p["attn.in_proj_weight"],
                               p["attn.in_proj_bias"], p["attn.out_proj.weight"], p["attn.out_proj.bias"], 4, causal))
    after_attention = x + parts["attention"]
    torch.testing.assert_close(parts["norm2"], F.layer_norm(after_attention, (32,), p["ln_2.weight"], p["ln_2.bias"], 1e-5))
    torch.testing.assert_close(y, after_attention + parts["mlp"])
    torch.testing.assert_close(y, reference._clip_block(x, p, 4, causal))


def test_decoder_block_parts_follow_post_norm_order():
    p = _strip(make_tensors(), "blocks.0.")
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(9))
    parts = {}
    y = reference._decoder_block(x, p, 4, parts)
    assert list(parts) == ["attention", "norm1", "mlp", "norm2"]
    torch.testing.assert_close(parts["norm1"], F.layer_norm(x + parts["attention"], (16,), p["norm1.weight"],
                                                            p["norm1.bias"], 1e-5))
    torch.testing.assert_close(y, F.layer_norm(parts["norm1"] + parts["mlp"], (16,), p["norm2.weight"],
                                               p["norm2.bias"], 1e-5))
    assert y is parts["norm2"]


@pytest.mark.parametrize("conditional_layer", [0, 1])
def test_one_image_for_many_prompts_equals_one_prompt_at_a_time(conditional_layer):
    arch = replace(ARCH, conditional_layer=conditional_layer)
    tensors = make_tensors(arch)
    vision = reference.encode_image(tensors, arch, _pixels(352))
    activations = [vision[f"vision.block{k}"] for k in arch.extract_layers]
    cond = reference.encode_text(tensors, arch, PROMPTS)["conditional_embeddings"]
    together = reference.decode(tensors, arch, activations, cond)
    for p in range(3):
        alone = reference.decode(tensors, arch, activations, cond[p:p + 1])
        for key, value in alone.items():
            # Batching changes the summation order: float32 noise, relative to each entry's scale.
            torch.testing.assert_close(together[key][p:p + 1], value, atol=1e-5 * value.abs().max().item(), rtol=0)
    repeated = reference.decode(tensors, arch, [act.expand(3, -1, -1) for act in activations], cond)
    torch.testing.assert_close(together["logits"], repeated["logits"])


class _CountingLookups(dict):
    """Original tensors that count how often each is looked up (from a TensorFile, every lookup reads the file)."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.lookups: dict[str, int] = {}

    def __getitem__(self, key):
        self.lookups[key] = self.lookups.get(key, 0) + 1
        return super().__getitem__(key)


@pytest.mark.parametrize("arch", [ARCH, REFINED_ARCH], ids=["plain", "refined"])
def test_the_forward_pass_looks_up_each_original_tensor_once(arch):
    tensors = _CountingLookups(make_tensors(arch))
    reference.reference_forward(tensors, arch, _pixels(352), PROMPTS, torch.float64)
    assert tensors.lookups == dict.fromkeys(set(arch.original_shapes()) - {"logit_scale"}, 1)


def test_missing_key_names_the_key():
    tensors = make_tensors()
    del tensors["blocks.2.norm2.bias"]
    with pytest.raises(ValueError, match=r"'blocks\.2\.norm2\.bias' is missing \(expected shape \[16\]\)"):
        reference.reference_forward(tensors, ARCH, _pixels(224), PROMPTS)


def test_wrong_shape_names_key_and_both_shapes():
    tensors = make_tensors()
    tensors["visual.proj"] = tensors["visual.proj"].T
    with pytest.raises(ValueError, match=r"'visual\.proj' has shape \[16, 32\], expected \[32, 16\]"):
        reference.encode_image(tensors, ARCH, _pixels(224))


def test_plain_weights_with_refined_arch_are_refused():
    with pytest.raises(ValueError, match=r"'trans_conv\.0\.weight' is missing"):
        reference.reference_forward(make_tensors(ARCH), REFINED_ARCH, _pixels(224), PROMPTS)


@pytest.mark.parametrize("call, message", [
    (lambda t: reference.decode(t, ARCH, [torch.zeros(2, 197, 32)] * 3, torch.zeros(3, 16)), "batch sizes"),
    (lambda t: reference.decode(t, ARCH, [torch.zeros(1, 197, 32)] * 2, torch.zeros(3, 16)), "needs 3 activations"),
    (lambda t: reference.decode(t, ARCH, [torch.zeros(1, 7, 32)] * 3, torch.zeros(3, 16)), "square grid"),
    (lambda t: reference.encode_text(t, ARCH, torch.zeros(1, 78, dtype=torch.long)), "L <= 77"),
    (lambda t: reference.encode_text(t, ARCH, _ids([[1, 64]])), r"\[0, 64\)"),
    (lambda t: reference.encode_image(t, ARCH, torch.zeros(1, 4, 224, 224)), r"\[B, 3, H, W\]"),
    (lambda t: reference.reference_forward(t, replace(ARCH, extract_layers=(1, 2, 4)), _pixels(224), PROMPTS),
     "extract_layers"),
], ids=["batch", "activations", "grid", "length", "vocab", "channels", "extract_layers"])
def test_bad_inputs_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(make_tensors())
