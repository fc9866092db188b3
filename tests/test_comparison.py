"""clipseg_pipeline.comparison and converted_model: the converted model's entries, their comparison with the
reference's, and where a fault is said to start."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from clipseg_pipeline import comparison
from clipseg_pipeline.architecture import Architecture
from clipseg_pipeline.converted_model import hf_outputs, load_model
from clipseg_pipeline.recording import OUTPUTS, recorded
from stages import verify_outputs
from tests.test_verify_outputs import PROMPTS, error_line, run_verify, tampered, tiny, tiny_refined  # noqa: F401  (fixtures)
from tools import synthetic

ENTRIES = comparison.entries(Architecture.from_mapping(synthetic.preset_arch("vit-b16-rd64")))


def architecture(built) -> Architecture:
    import yaml

    return Architecture.from_mapping(yaml.safe_load(built.params.read_text(encoding="utf-8"))["models"]["v"]["architecture"])


def test_recorded_drops_noise_and_keeps_real_differences():
    assert recorded(7.2e-6, 1.3e-7, passed=True) == {"passed": True}
    assert recorded(0.83124, 0.0123456, passed=False) == {"max_abs_diff": 0.83, "max_rel_diff": 0.012, "passed": False}
    assert recorded(math.inf, math.inf, passed=False) == {"max_abs_diff": None, "max_rel_diff": None, "passed": False}
    assert recorded(2.5e-3, None, passed=False) == {"max_abs_diff": 0.0025, "passed": False}


def test_relative_difference_is_taken_against_the_entry_scale():
    reference = {name: torch.tensor([[4.0, 1e-9, -2.0]]) for name in OUTPUTS}
    converted = {name: t + torch.tensor([[0.0, 1e-6, 0.0]]) for name, t in reference.items()}
    comparisons = comparison.compare(converted, reference, atol=1e-4, rtol=1e-4)
    assert all(c.passed for c in comparisons)
    # Element by element, 1e-6 against 1e-9 would read as a 1000-fold difference.
    assert all(c.max_rel_diff == pytest.approx(1e-6 / 4.0) for c in comparisons)


def test_entries_expanded_on_both_sides_compare_as_their_full_copies():
    # One image's entries serve every prompt as stride-0 views, compared on one row: the full copies' figures.
    row = torch.tensor([[[4.0, -2.0, 1e-9]]], dtype=torch.float64)
    ours_row = (row + torch.tensor([[[0.0, 3e-5, -2e-5]]], dtype=torch.float64)).float()
    names = ["vision.block0", "decoder.step0.reduce", *OUTPUTS]
    expanded = {name: (ours_row.expand(3, -1, -1), row.expand(3, -1, -1)) for name in names}
    expanded["decoder.step0.reduce"] = (ours_row.expand(3, -1, -1).contiguous(), row.expand(3, -1, -1))  # one side only
    copies = {name: (ours.contiguous(), ref.contiguous()) for name, (ours, ref) in expanded.items()}

    def compared(pairs):
        converted, reference = {n: ours for n, (ours, _) in pairs.items()}, {n: ref for n, (_, ref) in pairs.items()}
        return comparison.compare(converted, reference, atol=1e-4, rtol=1e-4)

    assert compared(expanded) == compared(copies)
    assert compared(expanded)[0].max_abs_diff == (ours_row.double() - row).abs().max().item() > 0


def test_non_finite_values_fail_and_are_named():
    reference = {name: torch.zeros(2, 3) for name in OUTPUTS}
    converted = {**reference, "logits": torch.full((2, 3), math.nan)}
    comparisons = comparison.compare(converted, reference, atol=1e-4, rtol=1e-4)
    message = comparison.failure_message(comparisons, {}, ENTRIES)
    assert "differs from the reference in logits (NaN or Inf values)" in message
    metrics = verify_outputs.report(comparisons, {}, [], 1e-4, 2, "v", "float64")
    assert metrics["outputs"]["logits"] == {"max_abs_diff": None, "max_rel_diff": None, "passed": False}
    json.dumps(metrics, allow_nan=False)  # what write_json requires


def test_first_divergence_follows_the_reference_order_not_the_names():
    names = ["vision.block2", "vision.block10", "pooled_output", "text.block0", "conditional_embeddings", "logits"]
    reference = {name: torch.ones(1, 2) for name in names}
    converted = {**reference, "vision.block10": torch.zeros(1, 2), "vision.block2": torch.zeros(1, 2), "logits": torch.zeros(1, 2)}
    comparisons = comparison.compare(converted, reference, atol=1e-4, rtol=1e-4)
    assert [c.name for c in comparisons] == names
    message = comparison.failure_message(comparisons, {}, ENTRIES)
    assert "First divergence, in the order data flows: vision.block2 (" in message
    assert "clip.vision_model.encoder.layers.2 (self_attn, layer_norm1, layer_norm2, mlp), which comes from the original visual.transformer.resblocks.2 (" in message


def test_entries_on_one_side_only_are_refused():
    reference = {name: torch.ones(1) for name in OUTPUTS}
    converted = {**reference, "decoder.step3": torch.ones(1)}
    with pytest.raises(comparison.VerificationError) as caught:
        comparison.compare(converted, reference, atol=1e-4, rtol=1e-4)
    assert str(caught.value) == (
        "entries computed by only one side: ['decoder.step3']. The model's config.json and the variant's architecture in "
        "params.yaml describe different models: rebuild the model (build-model) from this architecture")


def test_every_entry_the_converted_model_records_is_one_the_reference_computes_with_its_modules_named(tiny, tiny_refined):
    from clipseg_pipeline.inputs import load_image, pixel_values, token_ids, tokenizer
    from clipseg_pipeline.reference import reference_forward
    from clipseg_pipeline.tensor_io import TensorFile

    for built in (tiny, tiny_refined):
        arch = architecture(built)
        known = comparison.entries(arch)
        model = load_model(built.model)
        modules = dict(model.named_modules())
        pixels = pixel_values(load_image(built.original / "image"), 224, [0.5] * 3, [0.5] * 3)
        ids = token_ids(tokenizer(built.original), PROMPTS)
        traced = comparison.traced_forward(model, known, pixels, ids["input_ids"], ids["attention_mask"])
        ours = reference_forward(TensorFile(built.original / "original.safetensors"), arch, pixels, ids["input_ids"])
        assert list(known) != [] and set(traced) == set(ours) == set(known)
        for entry in known.values():
            # Every converted module named exists in the model, every original module in the original files.
            assert entry.converted in modules, entry
            assert all(any(key == m or key.startswith(m + ".") for key in arch.original_shapes()) for m in entry.original)


def test_entries_are_derived_from_the_name_map():
    assert ENTRIES["vision.block3.attention"].converted == "clip.vision_model.encoder.layers.3.self_attn"
    assert ENTRIES["vision.block3.attention"].original == ("visual.transformer.resblocks.3.attn",)
    assert ENTRIES["text.embeddings"].converted == "clip.text_model.embeddings"
    assert ENTRIES["decoder.step2.mlp"].converted == "decoder.layers.2.mlp"
    assert ENTRIES["decoder.step2.mlp"].original == ("blocks.2.linear1", "blocks.2.linear2")
    assert ENTRIES["decoder.step2.mlp"].describe() == (
        "the converted decoder.layers.2.mlp (fc1, fc2), which comes from the original blocks.2.linear1, blocks.2.linear2")
    assert ENTRIES["decoder.step0.film_add"].converted == "decoder.film_add"
    assert ENTRIES["text.pooled"].probe == "input" and "eos_token_id" in ENTRIES["text.pooled"].describe()


def test_the_stage_loads_the_model_from_pretrained_would(tiny, tiny_refined):
    # load_model skips from_pretrained's conversion tables (0.1-0.3 s at full size): it must end in the same model.
    from transformers import CLIPSegForImageSegmentation

    from clipseg_pipeline.inputs import load_image, pixel_values, token_ids, tokenizer

    for built in (tiny, tiny_refined):
        ours = load_model(built.model)
        theirs = CLIPSegForImageSegmentation.from_pretrained(built.model).eval()
        assert (ours.training, ours.config._attn_implementation) == (theirs.training, theirs.config._attn_implementation)
        ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
        assert list(ours_state) == list(theirs_state)
        for name, tensor in ours_state.items():
            assert tensor.dtype == theirs_state[name].dtype and torch.equal(tensor, theirs_state[name]), name
        pixels = pixel_values(load_image(built.original / "image"), 224, [0.5] * 3, [0.5] * 3)
        ids = token_ids(tokenizer(built.original), PROMPTS)
        with torch.inference_mode():
            assert torch.equal(ours(pixel_values=pixels.expand(len(PROMPTS), -1, -1, -1), **ids).logits,
                               theirs(pixel_values=pixels.expand(len(PROMPTS), -1, -1, -1), **ids).logits)


def test_weights_stored_in_another_dtype_are_refused_on_loading(tiny, tmp_path):
    model = tampered(tiny, tmp_path / "model", lambda state: state.update({name: t.half() for name, t in state.items() if name.endswith("fc1.weight")}))
    run = run_verify(tiny, tmp_path, model=model)
    assert run.code == 1
    message = error_line(run.stderr)
    assert "the weights in model.safetensors do not fit config.json" in message
    assert re.search(r"'mismatched_keys': \['clip\.text_model\.encoder\.layers\.0\.mlp\.fc1\.weight: file \[\d+, \d+\] torch\.float16, config \[\d+, \d+\]'", message), message


def test_hf_outputs_encodes_the_image_once_and_matches_the_models_forward(tiny):
    from clipseg_pipeline.inputs import load_image, pixel_values, token_ids, tokenizer

    model = load_model(tiny.model)
    pixels = pixel_values(load_image(tiny.original / "image"), 352, [0.5] * 3, [0.5] * 3)
    ids = token_ids(tokenizer(tiny.original), PROMPTS)
    fast = hf_outputs(model, pixels, ids["input_ids"], ids["attention_mask"])
    with torch.inference_mode():  # the model's own forward, as a user calls it: the image repeated for each prompt
        own = model(pixel_values=pixels.expand(len(PROMPTS), -1, -1, -1), **ids)
    for name in OUTPUTS:
        torch.testing.assert_close(fast[name], getattr(own, name), atol=1e-5, rtol=1e-5)




def test_an_entry_of_another_shape_is_named_with_both_shapes():
    reference = {"logits": torch.zeros(2, 4, 4)}
    with pytest.raises(comparison.VerificationError,
                       match=re.escape("logits: the converted model gives shape [2, 4, 5], the reference [2, 4, 4]")):
        comparison.compare({"logits": torch.zeros(2, 4, 5)}, reference, atol=1e-4, rtol=1e-4, outputs=["logits"])


def test_mask_pixels_differ_counts_the_pixels_on_the_other_side_of_logit_zero_per_row():
    reference = torch.tensor([[[-1.0, 0.0, 0.5, 2.0]], [[-1.0, 0.0, 0.5, 2.0]]])
    ours = torch.tensor([[[-1.0, 0.0, 0.5, 2.0]],    # the same: none
                         [[0.5, 0.0, -0.5, 0.7]]])   # first and third cross zero; 0 stays "not mask"; 0.7 stays mask
    assert comparison.mask_pixels_differ(ours, reference) == [0, 2]
    # Logit 0 is sigmoid 0.5, not mask; a positive logit below 1 is mask.
    assert comparison.mask_pixels_differ(torch.tensor([[[0.0, 0.5]]]), torch.tensor([[[-0.1, 0.1]]])) == [0]
    assert comparison.mask_pixels_differ(torch.tensor([[[-0.1, 0.1]]]), torch.tensor([[[0.0, 0.5]]])) == [0]


def test_each_check_records_its_rows_mask_pixels_and_verdicts():
    reference = {"logits": torch.tensor([[[1.0, -1.0]], [[1.0, -1.0]]]), "pooled_output": torch.zeros(2, 3)}
    converted = {"logits": torch.tensor([[[1.0, -1.0]], [[-1.0, 1.0]]]), "pooled_output": torch.zeros(2, 3)}
    found = comparison.checks("batch", converted, reference, [{"image": "a"}, {"image": "b"}], atol=1e-4)
    assert [(c.name, c.what, c.mask_pixels_differ, c.passed) for c in found] == [
        ("batch-0", {"image": "a"}, 0, True), ("batch-1", {"image": "b"}, 2, False)]
    report = comparison.check_report(found)
    assert report["batch-1"]["mask_pixels_differ"] == 2 and report["batch-1"]["logits"]["passed"] is False


def test_the_report_records_each_checks_verdict_and_every_figure_of_a_failing_output():
    reference = {"logits": torch.tensor([[[2.0, -1.0]]]), "pooled_output": torch.tensor([[4.0, 0.0, 0.0]])}
    converted = {"logits": torch.tensor([[[2.0, -1.0]]]), "pooled_output": torch.tensor([[4.0, 0.0, 1.0]])}
    found = comparison.checks("image", converted, reference, [{"box": [0, 0, 8, 8]}], atol=1e-4)
    # A failing output keeps both figures: 1.0 off on a scale of 4.0 is a relative difference of 0.25.
    assert comparison.check_report(found) == {"image-0": {
        "box": [0, 0, 8, 8], "mask_pixels_differ": 0, "passed": False,
        "logits": {"passed": True}, "pooled_output": {"max_abs_diff": 1.0, "max_rel_diff": 0.25, "passed": False}}}


def test_an_empty_entry_compares_as_equal():
    # An entry with no elements (a batch of no rows) has nothing to differ: it passes with figures of 0, not an error.
    empty = {name: torch.zeros(0, 3) for name in ["decoder.step0", *OUTPUTS]}
    found = comparison.compare(empty, {name: t.double() for name, t in empty.items()}, atol=1e-4, rtol=1e-4)
    assert [(c.max_abs_diff, c.max_rel_diff, c.passed) for c in found] == [(0.0, 0.0, True)] * len(empty)
    assert found[0].tolerance == 1e-4  # an intermediate's scale is 0: no relative allowance


def test_a_shared_row_is_compared_once_only_when_both_sides_share_it():
    # One side repeats one image's row for each prompt (stride 0); the other holds a different third row. Only entries
    # shared on both sides may be compared on their first row: here every row counts, whichever side shares.
    for row in (torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0]])):  # a column's rows have stride 1
        other = torch.cat([row, row, row + 0.5])
        for ours, ref in ((row.expand(3, -1), other.double()), (other, row.double().expand(3, -1))):
            assert 0 in (ours.stride(0), ref.stride(0)) and ours.stride(0) != ref.stride(0)
            [found] = comparison.compare({"logits": ours}, {"logits": ref}, atol=1e-4, rtol=1e-4, outputs=["logits"])
            assert (found.max_abs_diff, found.passed) == (0.5, False)
    # Both shared: the first row stands for all of them, with the same figures as the full copies.
    row = torch.tensor([[1.0, 2.0, 3.0]])
    [found] = comparison.compare({"logits": row.expand(3, -1) + 0.25}, {"logits": row.double().expand(3, -1)}, atol=1e-4,
                                 rtol=1e-4, outputs=["logits"])
    assert (found.max_abs_diff, found.max_rel_diff, found.passed) == (0.25, 0.25 / 3.0, False)


def test_a_single_number_entry_is_compared():
    [found] = comparison.compare({"scale": torch.tensor(2.5)}, {"scale": torch.tensor(2.0, dtype=torch.float64)},
                                 atol=1e-4, rtol=0.0, outputs=["scale"])
    assert (found.max_abs_diff, found.max_rel_diff, found.passed) == (0.5, 0.25, False)


def test_a_published_value_exactly_at_the_tolerance_passes_and_its_figure_is_printed(tiny, capsys):
    from types import SimpleNamespace

    from clipseg_pipeline.inputs import load_image, tokenizer
    from clipseg_pipeline.params import Expected

    # A model that answers fixed outputs, and published values 0.5 away from them (exact in float32) with atol 0.5.
    out = SimpleNamespace(logits=torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), conditional_embeddings=torch.tensor([[1.0, -1.0]]),
                          pooled_output=torch.tensor([[0.25, 0.0]]))
    expected = Expected(prompts=("a cat", "a dog"), padding="max_length", image_mean=(0.5,) * 3, image_std=(0.5,) * 3,
                        atol=0.5, logits=((1.5, 2.0), (3.0, 4.0)), conditional_embeddings=(1.0, -0.5), pooled_output=(0.25, 0.5))
    results = comparison.check_published(lambda **_: out, expected, load_image(tiny.original / "image"),
                                         tokenizer(tiny.original), 32)
    assert results == {name: {"passed": True, "tolerance": 0.5} for name in OUTPUTS}
    assert "verify-outputs: published logits: max abs diff 0.5 (tolerance 0.5)" in capsys.readouterr().err.splitlines()


def test_each_check_is_written_as_a_metrics_file_of_its_own_and_stale_ones_go(tmp_path):
    reference = {"logits": torch.tensor([[[1.0, -1.0]], [[1.0, -1.0]]])}
    converted = {"logits": torch.tensor([[[1.0, -1.0]], [[-1.0, 1.0]]])}
    found = comparison.checks("batch", converted, reference, [{"image": "a"}, {"image": "b"}], atol=1e-4)
    directory = tmp_path / "checks"
    directory.mkdir()
    (directory / "text-7.json").write_text("{}")  # from an earlier run with more prompts
    comparison.write_checks(directory, found)
    assert sorted(path.name for path in directory.iterdir()) == ["batch-0.json", "batch-1.json"]
    assert json.loads((directory / "batch-1.json").read_text()) == {"passed": False, "mask_px": 2}
    assert json.loads((directory / "batch-0.json").read_text()) == {"passed": True, "mask_px": 0}


def test_a_check_holds_every_entry_it_is_given_to_atol_alone():
    # Not only the model's outputs: an intermediate entry of scale 1 is held to atol too, with no relative allowance.
    reference = {"logits": torch.zeros(1, 1, 2), "vision.block0": torch.ones(1, 3)}
    converted = {"logits": torch.zeros(1, 1, 2), "vision.block0": torch.tensor([[1.0, 1.0, 1.0 + 1.5e-4]])}
    [found] = comparison.checks("image", converted, reference, [{"box": [0, 0, 4, 4]}], atol=1e-4)
    assert [(c.name, c.passed) for c in found.comparisons] == [("logits", True), ("vision.block0", False)]
    assert found.comparisons[1].tolerance == 1e-4


def test_the_failure_message_names_each_failing_output_published_value_and_use():
    reference = {name: torch.zeros(2, 1, 2) for name in OUTPUTS}
    converted = {**reference, "logits": torch.tensor([[[0.0, 0.5]], [[0.0, 0.0]]])}
    uses = comparison.checks("batch", converted, reference, [{"image": "a"}, {"image": "b"}], atol=1e-4)
    comparisons = comparison.compare({"vision.block0": torch.zeros(1, 2), **converted},
                                     {"vision.block0": torch.zeros(1, 2), **reference}, atol=1e-4, rtol=1e-4)
    published = {"logits": {"passed": True}, "pooled_output": {"max_abs_diff": 0.25, "passed": False}}
    message = comparison.failure_message(comparisons, published, ENTRIES, uses)
    assert message == (
        "the converted model differs from the reference in logits (max abs diff 0.5 > tolerance 0.0001). First "
        "divergence, in the order data flows: logits (max abs diff 0.5 > tolerance 0.0001), while every entry before it "
        f"agrees. Check {ENTRIES['logits'].describe()}; "
        f"the published check values differ for ['pooled_output']: {published}; "
        "used otherwise, the converted model differs from the reference in "
        "batch-0 {'image': 'a'} (logits: max abs diff 0.5 > tolerance 0.0001; 1 mask pixels differ)")
    # Each part stands alone: only a use failing, then nothing failing.
    assert comparison.failure_message(comparison.compare(reference, reference, 1e-4, 1e-4), {}, ENTRIES, uses) == (
        "used otherwise, the converted model differs from the reference in "
        "batch-0 {'image': 'a'} (logits: max abs diff 0.5 > tolerance 0.0001; 1 mask pixels differ)")
    assert comparison.failure_message(comparison.compare(reference, reference, 1e-4, 1e-4), {}, ENTRIES, uses[1:]) is None


def test_an_intermediate_may_differ_by_atol_plus_rtol_times_its_scale_an_output_by_atol_alone():
    reference = {"vision.block0": torch.tensor([[100.0, 0.0]], dtype=torch.float64),
                 "logits": torch.tensor([[100.0, 0.0]], dtype=torch.float64)}
    converted = {name: torch.tensor([[100.005, 0.0]]) for name in reference}  # 5e-3 off, float32 rounding aside
    block, logits = comparison.compare(converted, reference, atol=1e-4, rtol=1e-4)
    assert block.tolerance == pytest.approx(1e-4 + 1e-2) and block.passed
    assert logits.tolerance == 1e-4 and not logits.passed


def test_a_difference_exactly_at_the_tolerance_passes():
    [found] = comparison.compare({"logits": torch.tensor([1.5])}, {"logits": torch.tensor([1.0], dtype=torch.float64)},
                                 atol=0.5, rtol=0.0)
    assert (found.max_abs_diff, found.passed) == (0.5, True)


@pytest.mark.parametrize("diff, relative", [(0.0, 0.0), (1.0, math.inf), (0.5, math.inf)])
def test_against_an_all_zero_reference_any_difference_is_infinitely_relative(diff, relative):
    [found] = comparison.compare({"logits": torch.tensor([diff, 0.0])}, {"logits": torch.zeros(2, dtype=torch.float64)},
                                 atol=1e-4, rtol=1e-4)
    assert (found.max_abs_diff, found.max_rel_diff) == (diff, relative)


def test_padding_is_zeroed_in_text_states_only():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    values = {"text.block0": torch.ones(2, 3, 4), "text.pooled": torch.ones(2, 4), "decoder.step0": torch.ones(2, 3, 4)}
    masked = comparison.mask_padding(values, mask)
    assert masked["text.block0"][0, 2].eq(0).all() and masked["text.block0"][0, :2].eq(1).all()
    assert masked["text.block0"][1].eq(1).all()
    assert masked["text.pooled"].eq(1).all() and masked["decoder.step0"].eq(1).all()  # not per-token text states


def test_the_reference_batch_is_each_image_run_alone_in_the_dtype_asked(tiny):
    from clipseg_pipeline.reference import reference_forward
    from clipseg_pipeline.tensor_io import TensorFile

    original, arch = TensorFile(tiny.original / "original.safetensors"), architecture(tiny)
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # four images: more than 3 channels
    ids = torch.tensor([[1, 5, 2], [1, 6, 2], [1, 7, 2], [1, 8, 2]])
    got = comparison.reference_batch(original, arch, pixels, ids, torch.float64)
    for i in (0, 3):
        alone = reference_forward(original, arch, pixels[i : i + 1], ids[i : i + 1], torch.float64)
        for name in OUTPUTS:
            assert got[name].shape[0] == 4 and got[name].dtype == torch.float64
            assert got[name][i : i + 1].equal(alone[name]), name


def test_the_failure_message_lists_several_failures_apart():
    reference = {name: torch.zeros(2, 1, 2) for name in OUTPUTS}
    converted = {**reference, "logits": torch.tensor([[[0.0, 0.5]], [[0.25, 0.0]]]),
                 "pooled_output": torch.tensor([[[0.125, 0.0]], [[0.0, 0.0]]])}
    uses = comparison.checks("batch", converted, reference, [{"image": "a"}, {"image": "b"}], atol=1e-4)
    message = comparison.failure_message(comparison.compare(converted, reference, atol=1e-4, rtol=1e-4), {}, ENTRIES, uses)
    assert message.startswith("the converted model differs from the reference in logits (max abs diff 0.5 > tolerance "
                              "0.0001), pooled_output (max abs diff 0.125 > tolerance 0.0001). First divergence")
    assert message.endswith(
        "; used otherwise, the converted model differs from the reference in batch-0 {'image': 'a'} (logits: max abs diff "
        "0.5 > tolerance 0.0001, pooled_output: max abs diff 0.125 > tolerance 0.0001; 1 mask pixels differ), batch-1 "
        "{'image': 'b'} (logits: max abs diff 0.25 > tolerance 0.0001; 1 mask pixels differ)")
