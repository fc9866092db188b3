"""The name map (clipseg_pipeline.name_map): the rule table on the real published key names, tensor surgery round trips, and every failure."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from clipseg_pipeline.architecture import Architecture
from clipseg_pipeline.name_map import (
    RULES,
    OriginalLayout,
    RemapError,
    Rule,
    check_architecture,
    join_qkv,
    match_rules,
    normalize,
    remap,
    split_qkv,
    transpose,
)

DATA = Path(__file__).parent / "data"
VIT_B16 = {
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 16, "image_size": 224},
    "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8, "vocab_size": 49408, "max_position_embeddings": 77},
    "projection_dim": 512,
    "extract_layers": [3, 6, 9],
    "reduce_dim": 64,
    "decoder_num_attention_heads": 4,
    "decoder_intermediate_size": 2048,
    "conditional_layer": 0,
    "use_complex_transposed_convolution": False,
}
SCALARS = {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}


def read_key_list(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape = line.split(" ", 1)
        shapes[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return shapes


def meta_checkpoint(name: str) -> dict[str, torch.Tensor]:
    """The published file's keys as shape-only tensors (scalars as real values, for the architecture check)."""
    shapes = read_key_list(name)
    return {k: torch.tensor(SCALARS[k]) if k in SCALARS else torch.empty(s, device="meta") for k, s in shapes.items()}


def arch(refined: bool = False, reduce_dim: int = 64) -> Architecture:
    a = copy.deepcopy(VIT_B16)
    a["use_complex_transposed_convolution"] = refined
    a["reduce_dim"] = reduce_dim
    return Architecture.from_mapping(a)


@pytest.mark.parametrize("variant, refined", [("rd64", False), ("rd64-refined", True)])
def test_published_names_map_exactly_onto_the_hf_state_dict(variant, refined):
    source = meta_checkpoint(f"original_keys_{variant}.txt")
    check_architecture(source, arch(refined), "clipseg-x")
    target, report = remap(source)
    expected = read_key_list(f"hf_keys_{variant}.txt")
    assert sorted(target) == sorted(expected)
    assert {k: tuple(t.shape) for k, t in target.items()} == expected
    assert sorted(report.dropped) == ["context_length", "input_resolution", "vocab_size"]


def test_full_in_memory_model_state_dict_is_accepted_and_every_rule_fires():
    """What transformers' old script took: CLIP under clip_model., the vision tower again under model., and reduce."""
    plain = meta_checkpoint("original_keys_rd64.txt")
    refined = meta_checkpoint("original_keys_rd64-refined.txt")
    full = {f"clip_model.{k}" if not k.startswith(("film_", "reduces.", "blocks.", "trans_conv")) else k: v for k, v in plain.items()}
    full |= {f"model.{k.removeprefix('visual.')}": v for k, v in plain.items() if k.startswith("visual.")}
    full |= {"reduce.weight": torch.empty(64, 768, device="meta"), "reduce.bias": torch.empty(64, device="meta")}
    assert len(full) == 504 + 3  # a full model's 504 keys (docs/original-format.md), plus the archive's three scalars
    source = normalize(full)
    check_architecture(source, arch(), "clipseg-rd64")
    target, report = remap(source)
    assert sorted(target) == sorted(read_key_list("hf_keys_rd64.txt"))
    assert "reduce.weight" in report.dropped and "model.conv1.weight" in report.dropped
    _, refined_report = remap(refined)
    fired = {p for p, n in report.rules_fired.items() if n} | {p for p, n in refined_report.rules_fired.items() if n}
    assert fired == {rule.pattern for rule in RULES}, "a rule never fires on the published names"


def test_qkv_split_order_and_round_trip():
    stacked = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(12, 2)
    q, k, v = split_qkv(stacked)
    assert torch.equal(q, stacked[:4]) and torch.equal(k, stacked[4:8]) and torch.equal(v, stacked[8:])
    assert torch.equal(join_qkv(q, k, v), stacked)
    bias = torch.randn(9)
    assert torch.equal(join_qkv(*split_qkv(bias)), bias)
    with pytest.raises(RemapError, match=r"cannot be split into q, k, v"):
        split_qkv(torch.zeros(10, 2))


def test_projection_transpose_round_trip_and_meaning():
    projection = torch.randn(6, 4)  # used by the original as x @ P
    weight = transpose(projection)
    x = torch.randn(3, 6)
    assert torch.allclose(torch.nn.functional.linear(x, weight), x @ projection)
    assert torch.equal(transpose(weight), projection)


def test_values_travel_to_the_right_targets():
    source = {
        "transformer.resblocks.0.attn.in_proj_weight": torch.arange(12.0).reshape(6, 2),
        "visual.proj": torch.arange(6.0).reshape(3, 2),
        "blocks.2.linear1.bias": torch.tensor([5.0]),
    }
    target, report = remap(source)
    assert torch.equal(target["clip.text_model.encoder.layers.0.self_attn.k_proj.weight"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(target["clip.visual_projection.weight"], torch.arange(6.0).reshape(3, 2).t())
    assert torch.equal(target["decoder.layers.2.mlp.fc1.bias"], torch.tensor([5.0]))
    assert report.mapped["visual.proj"] == ["clip.visual_projection.weight"]


@pytest.mark.parametrize("refined", [False, True], ids=["plain", "refined"])
def test_the_original_layout_rebuilds_every_mapped_tensor_from_the_converted_ones(refined):
    from clipseg_pipeline import reference
    from tests.test_reference import ARCH, REFINED_ARCH, make_tensors

    tiny = REFINED_ARCH if refined else ARCH
    original = make_tensors(tiny) | {"logit_scale": torch.tensor(4.6), "reduce.weight": torch.zeros(2, 2)}
    converted, report = remap(original)
    layout = OriginalLayout(converted, original)
    assert sorted(layout) == sorted(report.mapped) and "reduce.weight" not in layout
    for name in report.mapped:
        assert layout[name].shape == original[name].shape and torch.equal(layout[name], original[name]), name
    pixels, ids = torch.randn(1, 3, 224, 224), torch.tensor([[1, 5, 63, 0], [1, 63, 0, 0]])
    ours, theirs = (reference.reference_forward(t, tiny, pixels, ids) for t in (layout, original))
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_an_original_name_whose_converted_tensors_are_not_all_there_is_absent():
    original = {"visual.proj": torch.randn(3, 2), "blocks.0.self_attn.in_proj_bias": torch.randn(6)}
    converted, _ = remap(original)
    del converted["decoder.layers.0.self_attn.v_proj.bias"]
    layout = OriginalLayout(converted, original)
    assert list(layout) == ["visual.proj"] and "blocks.0.self_attn.in_proj_bias" not in layout
    with pytest.raises(KeyError):
        layout["blocks.0.self_attn.in_proj_bias"]


def test_unknown_key_is_an_error_listing_it():
    with pytest.raises(RemapError, match=r"unknown key\(s\) that no rule maps: \['visual\.extra_head\.weight'\]"):
        remap({"visual.extra_head.weight": torch.zeros(1), "visual.proj": torch.zeros(2, 2)})


def test_key_matched_by_two_rules_is_an_error():
    rules = (Rule(r"a\.(\d)", ("x.{0}",)), Rule(r"a\.1", ("y",)))
    with pytest.raises(RemapError, match=r"matched by several rules"):
        match_rules(["a.1"], rules)


def test_architecture_check_names_missing_unknown_and_misshapen_keys():
    source = meta_checkpoint("original_keys_rd64.txt")
    del source["visual.ln_post.bias"]
    source["visual.conv1.weight"] = torch.empty(768, 3, 32, 32, device="meta")
    source["something.new"] = torch.empty(1, device="meta")
    with pytest.raises(RemapError) as info:
        check_architecture(source, arch(), "clipseg-rd64")
    message = str(info.value)
    assert "unknown key(s) ['something.new']" in message
    assert "missing key(s) ['visual.ln_post.bias']" in message
    assert "visual.conv1.weight: expected [768, 3, 16, 16], found [768, 3, 32, 32]" in message
    assert "models.clipseg-rd64.architecture" in message


def test_rd16_decoder_under_an_rd64_variant_names_reduce_dim():
    source = meta_checkpoint("original_keys_rd64.txt")
    rd16 = {k: v for k, v in source.items() if not k.startswith(("film_", "reduces.", "blocks.", "trans_conv"))}
    rd16 |= {k: torch.empty(s, device="meta") for k, s in arch(reduce_dim=16).decoder_shapes().items()}
    with pytest.raises(RemapError, match=r"reduce_dim 16 .* models\.clipseg-rd64\.architecture\.reduce_dim is 64: set it to 16"):
        check_architecture(rd16, arch(), "clipseg-rd64")


def test_refined_decoder_under_a_plain_variant_and_the_reverse():
    refined = meta_checkpoint("original_keys_rd64-refined.txt")
    with pytest.raises(RemapError, match=r"refined one .*use_complex_transposed_convolution is false: set it to true"):
        check_architecture(refined, arch(refined=False), "clipseg-rd64")
    plain = meta_checkpoint("original_keys_rd64.txt")
    with pytest.raises(RemapError, match=r"plain trans_conv .*use_complex_transposed_convolution is true: set it to false"):
        check_architecture(plain, arch(refined=True), "clipseg-rd64-refined")


def test_scalar_entries_are_checked_against_the_architecture():
    source = meta_checkpoint("original_keys_rd64.txt")
    source["input_resolution"] = torch.tensor(336)
    with pytest.raises(RemapError, match=r"input_resolution = 336 but models\.v\.architecture implies 224"):
        check_architecture(source, arch(), "v")
