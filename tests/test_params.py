"""params.yaml -> validated settings: every hand-editing mistake is refused by `parse`/`load`, naming the key and what
is allowed, before any stage does any work."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from clipseg_pipeline import params
from clipseg_pipeline.params import ParamsError

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
VARIANTS = sorted(PUBLISHED["models"])
TINY = "models.clipseg-tiny"


def edited(path: str, value: object = None, *, delete: bool = False) -> dict:
    """The repository's params with the entry at the dotted `path` set to `value` (or deleted)."""
    data = copy.deepcopy(PUBLISHED)
    *parents, leaf = path.split(".")  # variant names hold hyphens, never dots
    node = data
    for key in parents:
        node = node[key]
    if delete:
        del node[leaf]
    else:
        node[leaf] = value
    return data


def refused(data: object, pattern: str) -> ParamsError:
    with pytest.raises(ParamsError, match=pattern) as err:
        params.parse(data)
    return err.value


def test_the_repository_params_parse():
    parsed = params.load(REPO / "params.yaml")
    assert sorted(parsed.models) == VARIANTS
    assert {"clipseg-tiny", "clipseg-rd16", "clipseg-rd64", "clipseg-rd64-refined"} <= set(VARIANTS)
    assert parsed.model("clipseg-rd16").architecture.reduce_dim == 16
    assert parsed.model("clipseg-rd64-refined").architecture.use_complex_transposed_convolution is True
    assert parsed.model("clipseg-rd64").sources["decoder"].member == "rd64-uni.pth"


# --- variants --------------------------------------------------------------------------------------


def test_unknown_variant_in_variants_lists_the_allowed_ones():
    allowed = re.escape(str(VARIANTS))
    refused(edited("variants", ["clipseg-rd32"]), rf"`variants` lists \['clipseg-rd32'\]; allowed variants: {allowed}")


@pytest.mark.parametrize("value", [[], [64]])
def test_empty_or_non_text_variants(value):
    refused(edited("variants", value), rf"`variants` lists .*; allowed variants: {re.escape(str(VARIANTS))}")


def test_a_variant_listed_twice():
    refused(edited("variants", ["clipseg-tiny", "clipseg-tiny"]), r"`variants` lists \['clipseg-tiny'\] more than once")


def test_asking_for_an_unknown_variant_lists_the_allowed_ones():
    with pytest.raises(ParamsError, match=rf"unknown variant 'clipseg-rd8'; the variants under `models` are {re.escape(str(VARIANTS))}"):
        params.parse(PUBLISHED).model("clipseg-rd8")


def test_no_models_at_all():
    refused(edited("models", {}), r"`models` is empty")


# --- missing fields --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, pattern",
    [
        ("download", r"`\(top level\)` lacks \['download'\]"),
        ("download.max_member_bytes", r"`download` lacks \['max_member_bytes'\]"),
        ("verify.reference_dtype", r"`verify` lacks \['reference_dtype'\]"),
        (f"{TINY}.architecture.vision.patch_size", rf"`{TINY}.architecture.vision` lacks \['patch_size'\]"),
        (f"{TINY}.sources.clip.sha256", rf"`{TINY}.sources.clip` lacks \['sha256'\]"),
        (f"{TINY}.sources.image", rf"`{TINY}.sources` lacks the source\(s\) \['image'\]"),
        (f"{TINY}.sources.vocab", rf"`{TINY}.sources` needs tokenizer files: either `vocab` and `merges`, or `bpe`"),
        (f"{TINY}.verify", rf"`{TINY}` lacks \['verify'\]"),
        (f"{TINY}.assumed", rf"`{TINY}` lacks \['assumed'\]"),
        (f"{TINY}.sources.decoder", rf"`{TINY}.sources` needs the weights in one form: .* found \['clip'\]"),
        ("models.clipseg-rd64.expected.atol", r"`models.clipseg-rd64.expected` lacks \['atol'\]"),
    ],
)
def test_missing_field(path, pattern):
    refused(edited(path, delete=True), pattern)


# --- wrong types -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, value, pattern",
    [
        (f"{TINY}.architecture.reduce_dim", "64", rf"`{TINY}.architecture.reduce_dim` must be an integer, found '64' \(str\)"),
        (f"{TINY}.architecture.vision.hidden_size", 32.0, r"`.*vision.hidden_size` must be an integer, found 32.0 \(float\)"),
        ("download.retries", True, r"`download.retries` must be an integer, found True \(bool\)"),
        ("download.timeout_s", "60", r"`download.timeout_s` must be a number, found '60' \(str\)"),
        (f"{TINY}.architecture.use_complex_transposed_convolution", "yes", r"must be true/false, found 'yes'"),
        (f"{TINY}.architecture.extract_layers", "1,2,3", r"`.*extract_layers` must be a list, found '1,2,3'"),
        (f"{TINY}.verify.prompts", "a cat", rf"`{TINY}.verify.prompts` must be a list, found 'a cat'"),
        (f"{TINY}.sources.clip.url", 7, rf"`{TINY}.sources.clip.url` must be a string, found 7 \(int\)"),
        (f"{TINY}.sources", ["clip"], rf"`{TINY}.sources` must be a mapping, found \[.clip.\] \(list\)"),
        (f"{TINY}.export.dtype", "int8", r"`.*export.dtype` is 'int8'; allowed: \['float32', 'float16', 'bfloat16'\]"),
        ("processor.image_mean", [0.5, 0.5], r"`processor.image_mean` must be 3 numbers, found \[0.5, 0.5\]"),
        ("processor.image_std", [0.5, 0, 0.5], r"`processor.image_std` must be three positive numbers"),
        ("models.clipseg-rd64.expected.padding", "left", r"`.*expected.padding` must be 'max_length' or 'longest', found 'left'"),
        ("models.clipseg-rd64.expected.logits", [[1.0, 2.0], [3.0]], r"`.*expected.logits` must be a square list of rows"),
        ("models.clipseg-rd64.expected.logits", [["a"]], r"`.*expected.logits\[0\]` must be a non-empty list of numbers"),
        ("models.clipseg-rd64.expected.pooled_output", [], r"`.*expected.pooled_output` must be a non-empty list of numbers"),
    ],
)
def test_wrong_type(path, value, pattern):
    refused(edited(path, value), pattern)


def test_a_section_that_is_not_a_mapping():
    refused(edited("download", [1, 2]), r"`download` must be a mapping, found \[1, 2\] \(list\)")


# --- unknown keys, at every level ------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "verbose",
        "download.max_gigabytes",
        f"{TINY}.decoder",
        f"{TINY}.architecture.vision.dropout",
        "models.clipseg-rd64.sources.decoder.md5",
        "models.clipseg-rd64.expected.rtol",
    ],
)
def test_unknown_key_names_the_allowed_keys(path):
    *where, key = path.split(".")
    section = PUBLISHED
    for part in where:
        section = section[part]
    name = ".".join(where) or "(top level)"
    error = refused(edited(path, 1), rf"unknown key\(s\) \['{key}'\] in `{re.escape(name)}`; allowed: \[")
    allowed = str(error).split("allowed: ", 1)[1]
    assert all(repr(existing) in allowed for existing in section)  # every key the section may hold is listed


def test_unknown_source_names_the_allowed_sources():
    pattern = r"unknown source\(s\) \['weights'\] in `models.clipseg-tiny.sources`; allowed: \['bpe', 'checkpoint', 'clip', 'decoder', 'image', 'merges', 'vocab'\]"
    refused(edited(f"{TINY}.sources.weights", {"url": "x", "sha256": None}), pattern)


def test_an_unknown_key_that_is_not_text():
    data = copy.deepcopy(PUBLISHED)
    data["download"][1] = 2
    refused(data, r"unknown key\(s\) \[1\] in `download`")


# --- values out of range ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sha256",
    ["abc", "0" * 63, "g" * 64, "0" * 65, "A" * 64, f"sha256:{'0' * 57}"],
    ids=["short", "63-digits", "not-hex", "65-digits", "uppercase", "prefixed"],
)
def test_bad_sha256_format(sha256):
    refused(edited(f"{TINY}.sources.clip.sha256", sha256), rf"`{TINY}.sources.clip.sha256` must be 64 lowercase hex digits or null, found '{sha256}'")


@pytest.mark.parametrize(
    "where, prompts, problem",
    [
        (f"{TINY}.verify.prompts", [], r"must be a non-empty list of prompt texts"),
        (f"{TINY}.verify.prompts", ["a cat", ""], r"holds ''; every prompt must be a non-empty string"),
        (f"{TINY}.verify.prompts", ["   "], r"holds '   '; every prompt must be a non-empty string"),
        (f"{TINY}.verify.prompts", ["a cat", 3], r"holds 3; every prompt must be a non-empty string"),
        ("models.clipseg-rd64.expected.prompts", [], r"must be a non-empty list of prompt texts"),
    ],
)
def test_empty_prompts(where, prompts, problem):
    refused(edited(where, prompts), rf"`{re.escape(where)}` {problem}")


@pytest.mark.parametrize("layers", [[1, 2, 4], [-1, 2, 3], [], [True, 2, 3], [1.0, 2, 3]])
def test_extract_layers_out_of_range(layers):
    pattern = rf"`{TINY}.architecture.extract_layers` must list block indices in 0..3, found {re.escape(str(layers))}"
    refused(edited(f"{TINY}.architecture.extract_layers", layers), pattern)


@pytest.mark.parametrize(
    "path, value, pattern",
    [
        ("download.max_bytes", 0, r"`download.max_bytes` must be 1 or more, found 0"),
        ("download.max_member_bytes", -5, r"`download.max_member_bytes` must be 1 or more, found -5"),
        ("download.retries", -1, r"`download.retries` must be 0 or more, found -1"),
        ("download.timeout_s", 0, r"`download.timeout_s` must be a positive number of seconds, found 0"),
        ("verify.atol", -1e-4, r"`verify.atol` must be 0 or more"),
        ("verify.reference_dtype", "float16", r"`verify.reference_dtype` is 'float16'; allowed: \['float64', 'float32'\]"),
        ("export.atol.float16", -1, r"`export.atol.float16` must be 0 or more"),
        ("processor.image_size", 0, r"`processor.image_size` must be 1 or more"),
        (f"{TINY}.architecture.text.vocab_size", 0, rf"`{TINY}.architecture.text.vocab_size` must be 1 or more"),
        (f"{TINY}.architecture.reduce_dim", 0, rf"`{TINY}.architecture.reduce_dim` must be 1 or more"),
        (f"{TINY}.architecture.reduce_dim", 18, r"the decoder width 18 is not divisible by its 4 attention heads"),
        (f"{TINY}.architecture.conditional_layer", 3, r"`.*conditional_layer` must index extract_layers \(0..2\), found 3"),
        (f"{TINY}.architecture.vision.image_size", 230, r"`.*vision.image_size` \(230\) must be a multiple of patch_size \(16\)"),
        (f"{TINY}.architecture.vision.patch_size", 15, r"must be a multiple of patch_size \(15\)"),
        (f"{TINY}.sources.clip.url", " ", rf"`{TINY}.sources.clip.url` is empty"),
    ],
)
def test_value_out_of_range(path, value, pattern):
    refused(edited(path, value), pattern)


def test_refined_decoder_needs_an_even_width():
    data = edited(f"{TINY}.architecture.use_complex_transposed_convolution", True)
    data["models"]["clipseg-tiny"]["architecture"]["reduce_dim"] = 15
    data["models"]["clipseg-tiny"]["architecture"]["decoder_num_attention_heads"] = 3
    refused(data, r"the refined decoder .* needs a patch_size divisible by 4 and an even reduce_dim, found 16 and 15")


@pytest.mark.parametrize("member", ["clipseg_weights/rd64-uni.pth", "../rd64-uni.pth", "/abs/rd64-uni.pth", "..", "", "C:x.pth"])
def test_member_must_be_a_plain_file_name(member):
    pattern = rf"`models.clipseg-rd64.sources.decoder.member` must be a plain file name .*found {re.escape(repr(member))}"
    refused(edited("models.clipseg-rd64.sources.decoder.member", member), pattern)


# --- the file itself -------------------------------------------------------------------------------


def write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"variants: [clipseg-tiny\ndownload: {", r"not valid YAML"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"not UTF-8 text \(invalid start byte at byte 0\); save the params file as UTF-8"),
        (b"", r"the params file is empty"),
        (b"# only a comment\n", r"the params file is empty"),
        (b"just some text", r"`\(top level\)` must be a mapping, found str"),
        (b"- a\n- list\n", r"`\(top level\)` must be a mapping, found list"),
        (b"variants: [a]\nvariants: [b]\n", r"not valid YAML: .*the key 'variants' appears twice in one mapping; keep one"),
        (b"x: !!python/object/apply:os.system ['true']\n", r"not valid YAML"),
    ],
    ids=["broken-yaml", "binary", "empty", "comment-only", "scalar", "list", "duplicate-key", "python-tag"],
)
def test_a_file_that_is_not_usable_yaml(tmp_path, content, pattern):
    with pytest.raises(ParamsError, match=pattern):
        params.load(write(tmp_path, content))


def test_a_duplicate_key_deep_inside_is_refused(tmp_path):
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    text = text.replace("  retries: 5 ", "  retries: 5\n  retries: 7 ", 1)
    with pytest.raises(ParamsError, match=r"the key 'retries' appears twice"):
        params.load(write(tmp_path, text.encode()))


def test_a_missing_file(tmp_path):
    with pytest.raises(ParamsError, match=r"cannot read the params file \(No such file or directory\); run from the repository root"):
        params.load(tmp_path / "params.yaml")


def test_params_yaml_is_kept_in_the_layout_dvc_writes(tmp_path):
    # `dvc exp run -S` and `dvc exp apply` rewrite the whole file in their layout: kept in it, one changed value is a
    # one-line diff, and the comments stay.
    import difflib

    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` runs on params.yaml

    def changed_lines(override: str) -> list[str]:
        copy = tmp_path / "params.yaml"
        copy.write_bytes((REPO / "params.yaml").read_bytes())
        apply_overrides(copy, [override])
        before, after = (REPO / "params.yaml").read_text(encoding="utf-8"), copy.read_text(encoding="utf-8")
        return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
                if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))]

    assert changed_lines("models.clipseg-tiny.export.dtype=float16") == [
        "-    export: {dtype: float32, synthetic: true}", "+    export: {dtype: float16, synthetic: true}"]
    assert changed_lines("variants=[clipseg-rd64]") == ["-- clipseg-tiny", "+- clipseg-rd64"]


# --- onnx ------------------------------------------------------------------------------------------


def test_onnx_settings_parse():
    parsed = params.parse(PUBLISHED)
    assert parsed.onnx.files == ("fp32", "fp16", "q8")
    assert set(parsed.onnx.atol) == set(parsed.onnx.mask_agreement) == {"fp16", "q8"}
    assert parsed.model("clipseg-rd64").base_model == "CIDAS/clipseg-rd64"
    assert parsed.model("clipseg-tiny").base_model is None


@pytest.mark.parametrize("files", [["fp8"], [], ["q8", "q8"]])
def test_onnx_files_must_be_transformers_js_dtypes_each_once(files):
    refused(edited("onnx.files", files), r"`onnx.files` is .*; list the files to build, each once, from \['fp32', 'fp16', 'q8'\]")


def test_onnx_files_are_built_in_a_fixed_order():
    assert params.parse(edited("onnx.files", ["q8", "fp32"])).onnx.files == ("fp32", "q8")


def test_onnx_mask_agreement_is_a_share():
    refused(edited("onnx.mask_agreement.q8", 99.0), r"`onnx.mask_agreement.q8` is 99.0; give a share of pixels from 0 to 1")


def test_onnx_tolerance_for_each_rounded_dtype():
    refused(edited("onnx.atol.fp16", delete=True), r"onnx.atol")


def test_onnx_base_model_is_a_hub_id_or_null():
    refused(edited(f"{TINY}.onnx.base_model", "not an id"), r"`models.clipseg-tiny.onnx.base_model` must be a Hub model id")


def test_every_variant_needs_its_onnx_settings():
    refused(edited(f"{TINY}.onnx", delete=True), r"onnx")


# --- the weights' two forms; the assumed settings --------------------------------------------------


def test_a_whole_model_checkpoint_replaces_clip_and_decoder():
    data = edited(f"{TINY}.sources.checkpoint", {"url": "full.pth", "sha256": None})
    del data["models"]["clipseg-tiny"]["sources"]["clip"], data["models"]["clipseg-tiny"]["sources"]["decoder"]
    assert set(params.parse(data).model("clipseg-tiny").sources) == {"checkpoint", "vocab", "merges", "image"}


def test_both_forms_of_weights_at_once_are_refused():
    refused(edited(f"{TINY}.sources.checkpoint", {"url": "full.pth", "sha256": None}),
            r"needs the weights in one form: either `clip` and `decoder` .* or `checkpoint` .*; "
            r"found \['checkpoint', 'clip', 'decoder'\]")


def test_the_published_variants_assume_nothing():
    assert all(not model.assumed for model in params.parse(PUBLISHED).models.values())


def test_assumed_settings_are_read():
    value = ["extract_layers", "decoder_num_attention_heads"]
    assert params.parse(edited(f"{TINY}.assumed", value)).model("clipseg-tiny").assumed == tuple(value)


@pytest.mark.parametrize("value", [["reduce_dim"], ["extract_layers", "extract_layers"], None])
def test_assumed_must_name_settings_the_tensors_cannot_tell(value):
    refused(edited(f"{TINY}.assumed", value), r"`models.clipseg-tiny.assumed` must (list|be a list)")
