"""Tests for stages/synthetic.py: the generated files have the published formats and are reproducible."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from tools import synthetic

REPO = Path(__file__).resolve().parents[1]

# Key names from the published files (docs/original-format.md), written out independently of the generator.
CLIP_TOP_KEYS = [
    "positional_embedding", "text_projection", "logit_scale", "token_embedding.weight",
    "ln_final.weight", "ln_final.bias",
    "visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight",
    "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
]
CLIP_BLOCK_KEYS = [
    "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
    "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
]
SCALARS = ["input_resolution", "context_length", "vocab_size"]
# What OpenAI's convert_weights turns to fp16: Linear/Conv weights and biases, MHA in_proj, projections.
FP16_KEY = re.compile(r".*(in_proj_weight|in_proj_bias|out_proj\.\w+|c_fc\.\w+|c_proj\.\w+|conv1\.weight)"
                      r"|text_projection|visual\.proj")
DECODER_COMMON = ["film_mul.weight", "film_mul.bias", "film_add.weight", "film_add.bias"]
DECODER_BLOCK = [
    "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
    "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
]
VIT_B16_CLIP_PARAMS = 149_620_737
RD64_DECODER_PARAMS = 1_073_153


def expected_clip_keys(vision_layers: int, text_layers: int) -> set[str]:
    blocks = [f"visual.transformer.resblocks.{i}.{k}" for i in range(vision_layers) for k in CLIP_BLOCK_KEYS]
    blocks += [f"transformer.resblocks.{i}.{k}" for i in range(text_layers) for k in CLIP_BLOCK_KEYS]
    return {*CLIP_TOP_KEYS, *blocks, *SCALARS}


def expected_decoder_keys(depth: int, refined: bool, reduce: bool) -> set[str]:
    convs = ["trans_conv.0", "trans_conv.2", "trans_conv.4"] if refined else ["trans_conv"]
    keys = {*DECODER_COMMON, *(f"{c}.{p}" for c in convs for p in ("weight", "bias"))}
    keys |= {f"reduces.{i}.{p}" for i in range(depth) for p in ("weight", "bias")}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in DECODER_BLOCK}
    if reduce:
        keys |= {"reduce.weight", "reduce.bias"}
    return keys


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jit_state_dict(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated, still the reader
        return torch.jit.load(str(path)).state_dict()


def load_decoder(path: Path, name: str) -> dict[str, torch.Tensor]:
    with zipfile.ZipFile(path) as archive:
        return torch.load(io.BytesIO(archive.read(name)), weights_only=True)


@pytest.fixture(scope="module")
def tiny_arch() -> dict:
    return synthetic.preset_arch("tiny")


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory, tiny_arch) -> dict[str, Path]:
    return synthetic.write_sources(tmp_path_factory.mktemp("tiny"), tiny_arch, 0,
                                   decoder_member="tiny-uni.pth")


# --- CLIP TorchScript -----------------------------------------------------------------------------

def test_tiny_clip_archive_holds_exactly_the_published_keys(tiny_sources, tiny_arch):
    loaded = jit_state_dict(tiny_sources["clip"])
    assert set(loaded) == expected_clip_keys(4, 2)
    assert len(loaded) == 4 * 12 + 2 * 12 + 14 + 3


def test_tiny_clip_archive_round_trips_values_order_and_dtypes(tiny_sources, tiny_arch):
    generated = synthetic.clip_state_dict(tiny_arch, 0)
    loaded = jit_state_dict(tiny_sources["clip"])
    assert list(loaded) == list(generated)
    for key, tensor in generated.items():
        assert loaded[key].dtype == tensor.dtype, key
        assert torch.equal(loaded[key], tensor), key


def test_tiny_clip_dtypes_follow_openai_convert_weights(tiny_sources):
    loaded = jit_state_dict(tiny_sources["clip"])
    for key, tensor in loaded.items():
        if key in SCALARS:
            expected = torch.int64
        elif FP16_KEY.fullmatch(key):
            expected = torch.float16
        else:
            expected = torch.float32
        assert tensor.dtype == expected, key
    assert loaded["token_embedding.weight"].dtype == torch.float32
    assert loaded["visual.transformer.resblocks.0.attn.in_proj_bias"].dtype == torch.float16


def test_tiny_clip_shapes_and_scalars(tiny_sources, tiny_arch):
    loaded = jit_state_dict(tiny_sources["clip"])
    vocab = tiny_arch["text"]["vocab_size"]
    expected = {
        "positional_embedding": (77, 32), "text_projection": (32, 16), "logit_scale": (),
        "token_embedding.weight": (vocab, 32), "visual.class_embedding": (32,),
        "visual.positional_embedding": (197, 32), "visual.proj": (32, 16),
        "visual.conv1.weight": (32, 3, 16, 16),
        "visual.transformer.resblocks.3.attn.in_proj_weight": (96, 32),
        "visual.transformer.resblocks.3.mlp.c_fc.weight": (128, 32),
        "transformer.resblocks.1.mlp.c_proj.weight": (32, 128),
        "transformer.resblocks.1.attn.in_proj_bias": (96,),
        "ln_final.weight": (32,),
    }
    for key, shape in expected.items():
        assert tuple(loaded[key].shape) == shape, key
    assert [loaded[k].item() for k in SCALARS] == [224, 77, vocab]
    assert all(loaded[k].shape == () for k in SCALARS)


def test_layer_norms_are_not_left_at_their_initial_values(tiny_arch):
    state = synthetic.clip_state_dict(tiny_arch, 0)
    weight, bias = state["ln_final.weight"], state["ln_final.bias"]
    assert not torch.equal(weight, torch.ones_like(weight))
    assert not torch.equal(bias, torch.zeros_like(bias))
    assert (weight - 1).abs().max() < 0.2


def test_seed_changes_values_and_same_seed_repeats(tiny_arch):
    a, b = synthetic.clip_state_dict(tiny_arch, 0), synthetic.clip_state_dict(tiny_arch, 0)
    c = synthetic.clip_state_dict(tiny_arch, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.proj"], c["visual.proj"])


def test_torchscript_bytes_do_not_depend_on_what_was_scripted_before(tmp_path, tiny_arch):
    # TorchScript mangles a class name reused by another layout; a different layout scripted first
    # must not change the archive.
    other = synthetic.preset_arch("tiny")
    other["vision"]["num_hidden_layers"] = 3
    other["extract_layers"] = [0, 1, 2]
    synthetic.write_clip_torchscript(synthetic.clip_state_dict(other, 0), tmp_path / "a" / "clip.pt")
    synthetic.write_clip_torchscript(synthetic.clip_state_dict(tiny_arch, 0), tmp_path / "b" / "clip.pt")
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "tools.synthetic", "--out", str(fresh), "--preset", "tiny"],
                   cwd=REPO, check=True, capture_output=True)
    assert sha256(tmp_path / "b" / "clip.pt") == sha256(fresh / "clip.pt")


def test_nested_key_under_a_tensor_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'a\.b' nests under a tensor"):
        synthetic.write_clip_torchscript({"a": torch.zeros(1), "a.b": torch.zeros(1)}, tmp_path / "x.pt")


# --- decoder zip ----------------------------------------------------------------------------------

def test_tiny_decoder_zip_member_keys_shapes_and_dtype(tiny_sources):
    with zipfile.ZipFile(tiny_sources["decoder"]) as archive:
        assert archive.namelist() == ["clipseg_weights/tiny-uni.pth"]
    state = load_decoder(tiny_sources["decoder"], "clipseg_weights/tiny-uni.pth")
    assert set(state) == expected_decoder_keys(3, refined=False, reduce=False)
    assert all(t.dtype == torch.float32 for t in state.values())
    assert tuple(state["trans_conv.weight"].shape) == (16, 1, 16, 16)
    assert tuple(state["film_mul.weight"].shape) == (16, 16)
    assert tuple(state["reduces.2.weight"].shape) == (16, 32)
    assert tuple(state["blocks.0.self_attn.in_proj_weight"].shape) == (48, 16)
    assert tuple(state["blocks.0.linear1.weight"].shape) == (64, 16)


def test_refined_decoder_with_reduce(tmp_path):
    arch = synthetic.preset_arch("vit-b16-rd64-refined")
    state = synthetic.decoder_state_dict(arch, 0, include_reduce=True)
    synthetic.write_decoder_zip(state, tmp_path / "w.zip", "rd64-uni-refined.pth", folder="")
    loaded = load_decoder(tmp_path / "w.zip", "rd64-uni-refined.pth")
    assert set(loaded) == expected_decoder_keys(3, refined=True, reduce=True)
    shapes = {k: tuple(v.shape) for k, v in loaded.items()}
    assert shapes["trans_conv.0.weight"] == (64, 64, 3, 3)
    assert shapes["trans_conv.2.weight"] == (64, 32, 4, 4)
    assert shapes["trans_conv.4.weight"] == (32, 1, 4, 4)
    assert shapes["trans_conv.4.bias"] == (1,)
    assert shapes["reduce.weight"] == (64, 768)
    assert len(loaded) == 48 - 2 + 6 + 2


def test_decoder_keys_follow_the_original_registration_order(tiny_arch):
    keys = list(synthetic.decoder_state_dict(tiny_arch, 0, include_reduce=True))
    assert keys[:8] == [*DECODER_COMMON, "reduce.weight", "reduce.bias",
                        "trans_conv.weight", "trans_conv.bias"]


# --- determinism ----------------------------------------------------------------------------------

def test_write_sources_is_byte_identical_across_runs(tmp_path, tiny_arch, tiny_sources):
    again = synthetic.write_sources(tmp_path, tiny_arch, 0, decoder_member="tiny-uni.pth")
    assert {k: sha256(p) for k, p in again.items()} == {k: sha256(p) for k, p in tiny_sources.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(synthetic.SOURCE_NAMES.values())


def test_sources_stay_small(tiny_sources):
    assert sum(p.stat().st_size for p in tiny_sources.values()) < 1_000_000


# --- tokenizer ------------------------------------------------------------------------------------

def test_tokenizer_loads_in_transformers_and_wraps_special_tokens(tiny_sources, tiny_arch):
    vocab = json.loads(tiny_sources["vocab"].read_text(encoding="utf-8"))
    size = synthetic.tokenizer_vocab_size()
    # transformers 5.x ignores vocab_file=/merges_file= in the constructor: pass vocab=/merges=.
    tokenizers = [
        CLIPTokenizer.from_pretrained(tiny_sources["vocab"].parent),
        CLIPTokenizer(vocab=str(tiny_sources["vocab"]), merges=str(tiny_sources["merges"])),
    ]
    for tokenizer in tokenizers:
        ids = tokenizer("a cat")["input_ids"]
        assert ids == [size - 2, vocab["a</w>"], vocab["cat</w>"], size - 1]
        assert len(tokenizer) == size == tiny_arch["text"]["vocab_size"] == len(vocab)
        assert tokenizer("something to fill")["input_ids"][1:-1] == [
            vocab["something</w>"], vocab["to</w>"], vocab["fill</w>"]]


def test_vocab_follows_openai_order(tiny_sources):
    vocab = json.loads(tiny_sources["vocab"].read_text(encoding="utf-8"))
    tokens = sorted(vocab, key=vocab.get)
    chars = list(synthetic.bytes_to_unicode().values())
    merges = tiny_sources["merges"].read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    assert tokens[:256] == chars and tokens[256:512] == [c + "</w>" for c in chars]
    assert tokens[512:-2] == [line.replace(" ", "") for line in merges[1:]]
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert 30 <= len(merges) - 1 <= 200


def test_openai_gz_rebuilds_the_same_vocab(tiny_sources):
    # OpenAI SimpleTokenizer's own reading of the file.
    lines = gzip.open(tiny_sources["bpe"]).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    rebuilt = list(synthetic.bytes_to_unicode().values())
    rebuilt = rebuilt + [v + "</w>" for v in rebuilt]
    rebuilt += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = json.loads(tiny_sources["vocab"].read_text(encoding="utf-8"))
    assert rebuilt == sorted(vocab, key=vocab.get)
    assert lines[1:] == tiny_sources["merges"].read_text(encoding="utf-8").splitlines()[1:]
    assert all(len(m) == 2 for m in merges)


def test_tokenizer_words_change_the_vocab_size(tmp_path):
    paths = synthetic.write_tokenizer_files(tmp_path, words=["cat", "cats"])
    vocab = json.loads(paths["vocab"].read_text(encoding="utf-8"))
    # merges: ca, cat, cat</w>, cats</w>
    assert len(vocab) == synthetic.tokenizer_vocab_size(["cat", "cats"]) == 512 + 4 + 2
    with pytest.raises(ValueError, match="non-empty and without whitespace"):
        synthetic.train_bpe(["two words"])


# --- image, validation, CLI -----------------------------------------------------------------------

def test_image_is_a_jpeg_with_distinct_regions(tiny_sources):
    with Image.open(tiny_sources["image"]) as image:
        assert image.format == "JPEG" and image.size == (640, 480) and image.mode == "RGB"
        blob, background = image.getpixel((192, 264)), image.getpixel((10, 10))
    assert sum(abs(a - b) for a, b in zip(blob, background)) > 150


def test_vocab_mismatch_names_both_sizes(tmp_path):
    arch = synthetic.preset_arch("tiny")
    arch["text"]["vocab_size"] = 1000
    size = synthetic.tokenizer_vocab_size()
    with pytest.raises(ValueError, match=rf"vocab_size is 1000 but the synthetic tokenizer has {size}"):
        synthetic.write_sources(tmp_path, arch, 0, decoder_member="x.pth")


def test_inconsistent_arch_is_refused():
    arch = synthetic.preset_arch("tiny")
    arch["vision"]["image_size"] = 200
    with pytest.raises(ValueError, match=r"invalid architecture: .*image_size` \(200\) must be a multiple of patch_size \(16\)"):
        synthetic.clip_state_dict(arch, 0)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*'tiny'"):
        synthetic.preset_arch("huge")


def test_cli_prints_hash_and_size_of_every_file(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--preset", "tiny", "--seed", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(synthetic.SOURCE_NAMES)
    for line in lines:
        digest, _size, path = line.split()
        assert digest == sha256(Path(path))
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--help"])
    assert exit_info.value.code == 0


# --- full size ------------------------------------------------------------------------------------

def test_full_size_vit_b16_rd64(tmp_path):
    arch = synthetic.preset_arch("vit-b16-rd64")
    start = time.perf_counter()
    clip = synthetic.clip_state_dict(arch, 0)
    decoder = synthetic.decoder_state_dict(arch, 0)
    assert set(clip) == expected_clip_keys(12, 12)
    params = {k: v for k, v in clip.items() if k not in SCALARS}
    assert len(params) == 302 and len(clip) == 305
    assert sum(v.numel() for v in params.values()) == VIT_B16_CLIP_PARAMS
    assert sum(v.numel() for v in decoder.values()) == RD64_DECODER_PARAMS
    assert tuple(clip["token_embedding.weight"].shape) == (49408, 512)
    assert tuple(clip["visual.transformer.resblocks.11.attn.in_proj_weight"].shape) == (2304, 768)
    synthetic.write_clip_torchscript(clip, tmp_path / "ViT-B-16.pt")
    loaded = jit_state_dict(tmp_path / "ViT-B-16.pt")
    layout = {k: (v.dtype, v.shape) for k, v in clip.items()}
    assert {k: (v.dtype, v.shape) for k, v in loaded.items()} == layout
    assert time.perf_counter() - start < 15


def test_a_plain_clip_state_dict_is_the_archive_without_its_scalars(tmp_path, tiny_arch):
    path = tmp_path / "clip.pth"
    synthetic.write_state_dict(synthetic.plain_clip_state_dict(tiny_arch, 0), path)
    loaded = torch.load(path, weights_only=True)
    archive = synthetic.clip_state_dict(tiny_arch, 0)
    assert list(loaded) == [name for name in archive if name not in SCALARS]
    assert all(torch.equal(loaded[name], archive[name]) for name in loaded)


def test_a_bare_decoder_pth_loads_without_running_code(tmp_path, tiny_arch):
    path = tmp_path / "tiny-uni.pth"
    synthetic.write_state_dict(synthetic.decoder_state_dict(tiny_arch, 0), path)
    assert list(torch.load(path, weights_only=True)) == list(synthetic.decoder_state_dict(tiny_arch, 0))


def test_a_full_model_state_dict_holds_clip_the_vision_copy_and_the_decoder(tiny_arch):
    full = synthetic.full_model_state_dict(tiny_arch, 0)
    clip = synthetic.plain_clip_state_dict(tiny_arch, 0)
    assert {n for n in full if n.startswith("clip_model.")} == {f"clip_model.{n}" for n in clip}
    assert {n for n in full if n.startswith("model.")} == {
        "model." + n.removeprefix("visual.") for n in clip if n.startswith("visual.")}
    assert {n for n in full if not n.startswith(("clip_model.", "model."))} == set(synthetic.decoder_state_dict(tiny_arch, 0))
    assert torch.equal(full["model.conv1.weight"], full["clip_model.visual.conv1.weight"])
