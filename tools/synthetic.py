"""Synthetic CLIPSeg sources: architecture + seed -> files in the published formats, random weights.

Writes what the download stage would fetch for a real variant (docs/original-format.md):
an OpenAI CLIP TorchScript archive with mixed fp16/fp32 weights, a zip holding a decoder state dict
saved with `torch.save`, a CLIP-style byte-level BPE tokenizer (Hugging Face `vocab.json` +
`merges.txt` and OpenAI's `bpe_simple_vocab_16e6.txt.gz`) and a JPEG. The same seed gives the same
bytes. Serves the test fixtures and the full-size benchmark; the `clipseg-tiny` default is its tiny preset trained on
scenes of coloured shapes by tools.train_tiny.

    python -m tools.synthetic --out /tmp/tiny --preset tiny --seed 0
"""

from __future__ import annotations

import argparse
import copy
import functools
import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from clipseg_pipeline.architecture import Architecture, linear_shapes
from clipseg_pipeline.schema import SchemaError

Shapes = dict[str, tuple[int, ...]]

# File names inside a variant's source folder; the keys are what `write_sources` returns.
SOURCE_NAMES = {
    "clip": "clip.pt",
    "decoder": "weights.zip",
    "vocab": "vocab.json",
    "merges": "merges.txt",
    "bpe": "bpe_simple_vocab_16e6.txt.gz",
    "image": "image.jpg",
}

VIT_B16_RD64 = {
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "patch_size": 16, "image_size": 224},
    "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 8, "vocab_size": 49408, "max_position_embeddings": 77},
    "projection_dim": 512, "extract_layers": [3, 6, 9], "reduce_dim": 64,
    "decoder_num_attention_heads": 4, "decoder_intermediate_size": 2048,
    "conditional_layer": 0, "use_complex_transposed_convolution": False,
}

TINY = {
    "vision": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 4,
               "num_attention_heads": 4, "patch_size": 16, "image_size": 224},
    # vocab_size None: filled with the built-in tokenizer's size by `preset_arch`.
    "text": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": None, "max_position_embeddings": 77},
    "projection_dim": 16, "extract_layers": [1, 2, 3], "reduce_dim": 16,
    "decoder_num_attention_heads": 4, "decoder_intermediate_size": 64,
    "conditional_layer": 0, "use_complex_transposed_convolution": False,
}

# name: arch, decoder zip member, whether the tokenizer must match the token table. The ViT-B/16
# presets keep the published 49408-row table (exact parameter count); the tiny tokenizer's ids all
# fall inside it, so the model still runs, but its vocabulary is not the real one.
PRESETS = {
    "tiny":                 {"arch": TINY, "member": "tiny-uni.pth", "match_vocab": True},
    "vit-b16-rd64":         {"arch": VIT_B16_RD64, "member": "rd64-uni.pth", "match_vocab": False},
    "vit-b16-rd16":         {"arch": {**VIT_B16_RD64, "reduce_dim": 16},
                             "member": "rd16-uni.pth", "match_vocab": False},
    "vit-b16-rd64-refined": {"arch": {**VIT_B16_RD64, "use_complex_transposed_convolution": True},
                             "member": "rd64-uni-refined.pth", "match_vocab": False},
}

SCALAR_KEYS = ("input_resolution", "context_length", "vocab_size")
# The decoder draws from its own stream so that its first tensor does not repeat CLIP's first values.
DECODER_SEED_OFFSET = 1_000_003
# Python module name the TorchScript classes claim: fixed so the archive does not depend on whether
# this file runs as `__main__` or as `tools.synthetic`.
TORCHSCRIPT_NAMESPACE = "clip_synthetic"
# 1980-01-01 is the earliest time a zip can hold; a fixed time keeps the bytes reproducible.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)

# Ordinary English prompt words, including the ones CLIPSeg's reference checks use.
BPE_CORPUS = (
    "a", "an", "the", "of", "to", "on", "in", "and", "with", "photo", "picture", "image",
    "cat", "cats", "dog", "remote", "remotes", "blanket", "glass", "jar", "wood", "wooden",
    "something", "fill", "table", "chair", "sofa", "couch", "pink", "red", "green", "blue",
    "white", "black", "small", "large", "two", "sitting", "lying", "person", "bottle", "cup",
)
MAX_MERGES = 200
HF_MERGES_HEADER = "#version: 0.2"
OPENAI_BPE_HEADER = '"bpe_simple_vocab_16e6.txt#version: 0.2'
END_OF_WORD = "</w>"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to draw as mean + std * N(0, 1); `half` marks what OpenAI stores in fp16."""

    key: str
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0
    half: bool = False


# ---------------------------------------------------------------------------------------------
# Weight layouts (pure)
# ---------------------------------------------------------------------------------------------

# Trained-looking scales: weights keep activations near unit variance, LayerNorms sit near but not
# at their initial 1/0 (so a LayerNorm that was never loaded is detectable), biases are small.
BIAS_STD = 0.02
NORM_STD = 0.02
TOKEN_EMBEDDING_STD = 0.02
POSITION_STD = 0.01


def architecture(arch: dict) -> Architecture:
    """The params-form `arch` validated; the shapes of every tensor come from it."""
    try:
        return Architecture.from_mapping(arch)
    except SchemaError as exc:
        raise ValueError(f"invalid architecture: {exc}") from exc


def _weight(shapes: Shapes, key: str, half: bool, fan_in: int | None = None) -> TensorSpec:
    """A weight scaled to keep activations near unit variance; `fan_in` defaults to an nn.Linear's input width."""
    shape = shapes[key]
    return TensorSpec(key, shape, (fan_in or shape[1]) ** -0.5, half=half)


def _bias(shapes: Shapes, key: str, half: bool) -> TensorSpec:
    return TensorSpec(key, shapes[key], BIAS_STD, half=half)


def _linear(shapes: Shapes, prefix: str, half: bool) -> list[TensorSpec]:
    return [_weight(shapes, f"{prefix}.weight", half), _bias(shapes, f"{prefix}.bias", half)]


def _layer_norm(shapes: Shapes, prefix: str) -> list[TensorSpec]:
    # OpenAI's convert_weights leaves LayerNorms in fp32.
    return [TensorSpec(f"{prefix}.weight", shapes[f"{prefix}.weight"], NORM_STD, mean=1.0),
            TensorSpec(f"{prefix}.bias", shapes[f"{prefix}.bias"], NORM_STD)]


def _attention(shapes: Shapes, prefix: str, half: bool) -> list[TensorSpec]:
    # nn.MultiheadAttention with q, k, v stacked in one in_proj.
    return [_weight(shapes, f"{prefix}.in_proj_weight", half), _bias(shapes, f"{prefix}.in_proj_bias", half),
            *_linear(shapes, f"{prefix}.out_proj", half)]


def _clip_tower(shapes: Shapes, prefix: str, layers: int) -> list[TensorSpec]:
    # OpenAI's Transformer: pre-LN ResidualAttentionBlocks in registration order.
    specs = []
    for i in range(layers):
        block = f"{prefix}resblocks.{i}"
        specs += [*_attention(shapes, f"{block}.attn", half=True),
                  *_layer_norm(shapes, f"{block}.ln_1"),
                  *_linear(shapes, f"{block}.mlp.c_fc", half=True),
                  *_linear(shapes, f"{block}.mlp.c_proj", half=True),
                  *_layer_norm(shapes, f"{block}.ln_2")]
    return specs


def clip_specs(arch: dict) -> list[TensorSpec]:
    """OpenAI CLIP's parameters in `state_dict()` order: a module's own parameters, then children."""
    a = architecture(arch)
    shapes = a.clip_shapes()
    width, text_width, patch = a.vision.hidden_size, a.text.hidden_size, a.vision.patch_size
    return [
        TensorSpec("positional_embedding", shapes["positional_embedding"], POSITION_STD),
        _weight(shapes, "text_projection", half=True, fan_in=text_width),  # used as x @ P
        TensorSpec("logit_scale", (), 0.0, mean=math.log(100.0)),  # trained CLIP sits at the clamp, 100
        TensorSpec("visual.class_embedding", shapes["visual.class_embedding"], width ** -0.5),
        TensorSpec("visual.positional_embedding", shapes["visual.positional_embedding"], width ** -0.5),
        _weight(shapes, "visual.proj", half=True, fan_in=width),
        _weight(shapes, "visual.conv1.weight", half=True, fan_in=3 * patch * patch),
        *_layer_norm(shapes, "visual.ln_pre"),
        *_clip_tower(shapes, "visual.transformer.", a.vision.num_hidden_layers),
        *_layer_norm(shapes, "visual.ln_post"),
        *_clip_tower(shapes, "transformer.", a.text.num_hidden_layers),
        TensorSpec("token_embedding.weight", shapes["token_embedding.weight"], TOKEN_EMBEDDING_STD),
        *_layer_norm(shapes, "ln_final"),
    ]


def _trans_conv(a: Architecture, shapes: Shapes) -> list[TensorSpec]:
    # ConvTranspose2d weights are [in, out, k, k]; with stride == kernel each output pixel sees
    # `in` inputs, so fan_in is the input channel count.
    if not a.use_complex_transposed_convolution:
        return [_weight(shapes, "trans_conv.weight", half=False, fan_in=a.reduce_dim),
                _bias(shapes, "trans_conv.bias", half=False)]
    return [_weight(shapes, "trans_conv.0.weight", half=False, fan_in=a.reduce_dim * 9),
            _bias(shapes, "trans_conv.0.bias", half=False),
            _weight(shapes, "trans_conv.2.weight", half=False, fan_in=a.reduce_dim),
            _bias(shapes, "trans_conv.2.bias", half=False),
            _weight(shapes, "trans_conv.4.weight", half=False, fan_in=a.reduce_dim // 2),
            _bias(shapes, "trans_conv.4.bias", half=False)]


def decoder_specs(arch: dict, include_reduce: bool = False) -> list[TensorSpec]:
    """CLIPDensePredT's own parameters in the original registration order, all fp32."""
    a = architecture(arch)
    # `reduce` is defined by the original model but never used by its forward pass: not among the decoder's shapes.
    shapes = a.decoder_shapes() | linear_shapes("reduce.", a.reduce_dim, a.vision.hidden_size)
    specs = [*_linear(shapes, "film_mul", half=False), *_linear(shapes, "film_add", half=False)]
    if include_reduce:
        specs += _linear(shapes, "reduce", half=False)
    specs += _trans_conv(a, shapes)
    depth = len(a.extract_layers)
    for i in range(depth):
        specs += _linear(shapes, f"reduces.{i}", half=False)
    for i in range(depth):  # nn.TransformerEncoderLayer
        block = f"blocks.{i}"
        specs += [*_attention(shapes, f"{block}.self_attn", half=False),
                  *_linear(shapes, f"{block}.linear1", half=False),
                  *_linear(shapes, f"{block}.linear2", half=False),
                  *_layer_norm(shapes, f"{block}.norm1"),
                  *_layer_norm(shapes, f"{block}.norm2")]
    return specs


# ---------------------------------------------------------------------------------------------
# Weights (pure, in memory)
# ---------------------------------------------------------------------------------------------

def draw(specs: Iterable[TensorSpec], seed: int) -> dict[str, torch.Tensor]:
    """Draw every tensor in order from one generator: same specs and seed, same values."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for spec in specs:
        tensor = torch.randn(spec.shape, generator=generator).mul_(spec.std).add_(spec.mean)
        tensors[spec.key] = tensor.half() if spec.half else tensor
    return tensors


def clip_state_dict(arch: dict, seed: int) -> dict[str, torch.Tensor]:
    """What `torch.jit.load(ViT-B-16.pt).state_dict()` holds: 302 weights + 3 int64 scalars."""
    architecture(arch)
    tensors = draw(clip_specs(arch), seed)
    # The scalars sit on the root module as buffers, which `state_dict()` lists after the root's
    # parameters and before its children.
    root = ["positional_embedding", "text_projection", "logit_scale"]
    scalars = {
        "input_resolution": torch.tensor(arch["vision"]["image_size"], dtype=torch.int64),
        "context_length": torch.tensor(arch["text"]["max_position_embeddings"], dtype=torch.int64),
        "vocab_size": torch.tensor(arch["text"]["vocab_size"], dtype=torch.int64),
    }
    return {**{k: tensors.pop(k) for k in root}, **scalars, **tensors}


def decoder_state_dict(arch: dict, seed: int, include_reduce: bool = False) -> dict[str, torch.Tensor]:
    """The decoder file's state dict (plain or refined per the arch), fp32."""
    architecture(arch)
    return draw(decoder_specs(arch, include_reduce), seed + DECODER_SEED_OFFSET)


# ---------------------------------------------------------------------------------------------
# File writers
# ---------------------------------------------------------------------------------------------

def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill `<tmpdir>/<path.name>`, then move it into place.

    The temporary file keeps the final name because torch names the folder inside its archives after
    the file's stem.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        write(tmpdir / path.name)
        os.replace(tmpdir / path.name, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@functools.cache
def _torchscript_class(signature: tuple) -> type[nn.Module]:
    """One Python class per module layout, named by a digest of the layout.

    TorchScript gives each layout a type named after the class; a name already taken by another
    layout gets a process-global `___torch_mangle_N` prefix, so the archive's bytes would depend on
    what was scripted earlier in the process. Distinct names plus a cached class (reused layouts
    reuse the type) keep the output a function of the state dict alone.
    """
    name = "Module_" + hashlib.sha256(repr(signature).encode()).hexdigest()[:16]
    return type(name, (nn.Module,), {"__module__": TORCHSCRIPT_NAMESPACE, "__qualname__": name})


def _nest(state_dict: dict[str, torch.Tensor]) -> dict:
    tree: dict = {}
    for key, tensor in state_dict.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"key {key!r} nests under a tensor entry; cannot build modules")
        node[leaf] = tensor
    return tree


def _build_module(tree: dict) -> nn.Module:
    # Floating tensors become parameters, integer scalars buffers (they cannot require grad).
    tensors = {n: t for n, t in tree.items() if isinstance(t, torch.Tensor)}
    children = {n: _build_module(sub) for n, sub in tree.items() if isinstance(sub, dict)}
    signature = (tuple((n, t.is_floating_point()) for n, t in tensors.items()),
                 tuple((n, type(c).__name__) for n, c in children.items()))
    module = _torchscript_class(signature)()
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            module.register_parameter(name, nn.Parameter(tensor))
        else:
            module.register_buffer(name, tensor)
    for name, child in children.items():
        module.add_module(name, child)
    return module


def write_clip_torchscript(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Write a TorchScript archive whose `state_dict()` is `state_dict` (keys, order, dtypes).

    The modules carry no methods: the parsing code only reads weights, and methods would embed this
    file's source path in the archive's debug records.
    """
    module = _build_module(_nest(state_dict))
    with warnings.catch_warnings():
        # TorchScript is deprecated, but it is the format OpenAI published; nothing else writes it.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        scripted = torch.jit.script(module)
        _atomic_write(path, lambda tmp: torch.jit.save(scripted, str(tmp)))


def write_decoder_zip(state_dict: dict[str, torch.Tensor], path: Path, member: str,
                      folder: str = "clipseg_weights") -> None:
    """`torch.save(state_dict)` stored (uncompressed) as `folder/member` in the zip at `path`."""
    with tempfile.TemporaryDirectory() as tmp:
        # Saved under the member's name so the inner archive folder is its stem, as for the originals.
        saved = Path(tmp) / member
        torch.save(state_dict, saved)
        payload = saved.read_bytes()
    info = zipfile.ZipInfo(f"{folder}/{member}" if folder else member, date_time=ZIP_TIME)
    info.create_system = 3  # unix; zipfile would write 0 on Windows
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_STORED

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w") as archive:
            archive.writestr(info, payload)

    _atomic_write(path, write)


def write_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """`torch.save(state_dict)` as a bare file: how the original `training.py` saves a decoder (only the trainable
    weights) and how a plain CLIP state dict or a whole model's `state_dict()` is kept."""
    _atomic_write(path, lambda tmp: torch.save(state_dict, tmp))


def plain_clip_state_dict(arch: dict, seed: int) -> dict[str, torch.Tensor]:
    """CLIP as a plain state dict (`model.state_dict()` of the model OpenAI's `build_model` returns): the archive's
    weights without its three scalar settings, which `build_model` deletes."""
    return {name: t for name, t in clip_state_dict(arch, seed).items() if name not in SCALAR_KEYS}


def full_model_state_dict(arch: dict, seed: int) -> dict[str, torch.Tensor]:
    """A whole original model's `state_dict()`: CLIP under `clip_model.`, its vision tower again under `model.` (the
    original keeps `self.model = clip_model.visual`), then the decoder's weights."""
    clip = plain_clip_state_dict(arch, seed)
    return {
        **{f"clip_model.{name}": t for name, t in clip.items()},
        **{f"model.{name.removeprefix('visual.')}": t for name, t in clip.items() if name.startswith("visual.")},
        **decoder_state_dict(arch, seed),
    }


def write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda tmp: tmp.write_bytes(data))


# ---------------------------------------------------------------------------------------------
# Tokenizer: a tiny but real CLIP byte-level BPE
# ---------------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's byte -> printable character table (in its order: printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + n for n in range(len(others))]
    return {b: chr(c) for b, c in zip(printable + others, chars)}


def _word_symbols(word: str, byte_chars: dict[int, str]) -> tuple[str, ...]:
    if not word or any(c.isspace() for c in word):
        raise ValueError(f"BPE corpus word {word!r} must be non-empty and without whitespace")
    chars = [byte_chars[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + END_OF_WORD)  # CLIP marks the word end on the last symbol


def _apply_merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(symbols):
        if symbols[i:i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def train_bpe(words: Iterable[str] = BPE_CORPUS, max_merges: int = MAX_MERGES) -> list[tuple[str, str]]:
    """Greedy BPE on `words`; ties broken by the pair itself so the result is deterministic.

    Stops when every word is one token or after `max_merges`. A pair whose concatenation is already
    a token is skipped: `vocab.json` cannot hold one string twice.
    """
    byte_chars = bytes_to_unicode()
    corpus = Counter(_word_symbols(w.lower(), byte_chars) for w in words)
    tokens = {*byte_chars.values(), *(c + END_OF_WORD for c in byte_chars.values())}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for symbols, count in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        candidates = [p for p in pairs if p[0] + p[1] not in tokens]
        if not candidates:
            break
        best = min(candidates, key=lambda p: (-pairs[p], p))
        merges.append(best)
        tokens.add(best[0] + best[1])
        corpus = Counter({_apply_merge(s, best): c for s, c in corpus.items()})
    return merges


def tokenizer_vocab(merges: list[tuple[str, str]]) -> list[str]:
    """OpenAI SimpleTokenizer's vocabulary order: bytes, bytes + </w>, merges, special tokens."""
    chars = list(bytes_to_unicode().values())
    return [*chars, *(c + END_OF_WORD for c in chars), *(a + b for a, b in merges), *SPECIAL_TOKENS]


def tokenizer_vocab_size(words: Iterable[str] | None = None) -> int:
    """512 + merges + 2 for the tokenizer `write_tokenizer_files(words=words)` writes."""
    return len(tokenizer_vocab(train_bpe(BPE_CORPUS if words is None else words)))


def tokenizer_files(merges: list[tuple[str, str]]) -> dict[str, bytes]:
    """Bytes of vocab.json, merges.txt and the OpenAI gz for `merges`."""
    vocab = {token: i for i, token in enumerate(tokenizer_vocab(merges))}
    lines = [f"{a} {b}" for a, b in merges]
    # OpenAI reads lines[1:48895] of the gz: a trailing newline would become an empty merge in a
    # file this short, so the last line has none.
    openai = "\n".join([OPENAI_BPE_HEADER, *lines]).encode("utf-8")
    return {
        "vocab": json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
        "merges": ("\n".join([HF_MERGES_HEADER, *lines]) + "\n").encode("utf-8"),
        "bpe": gzip.compress(openai, compresslevel=9, mtime=0),  # mtime 0: reproducible bytes
    }


def write_tokenizer_files(directory: Path, words: list[str] | None = None) -> dict[str, Path]:
    """Train the BPE on `words` (default: the built-in corpus) and write its three files."""
    merges = train_bpe(BPE_CORPUS if words is None else words)
    paths = {}
    for name, data in tokenizer_files(merges).items():
        paths[name] = Path(directory) / SOURCE_NAMES[name]
        write_bytes(paths[name], data)
    return paths


# ---------------------------------------------------------------------------------------------
# Image
# ---------------------------------------------------------------------------------------------

def _blob(x: torch.Tensor, y: torch.Tensor, centre: tuple[float, float],
          radii: tuple[float, float]) -> torch.Tensor:
    """Soft-edged ellipse weight in [0, 1]."""
    r = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
    return torch.sigmoid((1.0 - r) * 12.0)


def image_pixels(size: tuple[int, int] = (640, 480)) -> torch.Tensor:
    """uint8 [H, W, 3]: a blue-green gradient with an orange and a grey blob (two 'objects')."""
    width, height = size
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    rgb = torch.stack([40 + 60 * x, 90 + 80 * y, 170 - 50 * x], dim=-1)
    for centre, radii, colour in (((0.30, 0.55), (0.18, 0.28), (230, 140, 40)),
                                  ((0.72, 0.45), (0.15, 0.22), (90, 90, 100))):
        weight = _blob(x, y, centre, radii).unsqueeze(-1)
        rgb = rgb * (1 - weight) + torch.tensor(colour, dtype=torch.float32) * weight
    return rgb.round().clamp(0, 255).to(torch.uint8)


def write_image(path: Path, size: tuple[int, int] = (640, 480)) -> None:
    write_jpeg(image_pixels(size), path)


def write_jpeg(pixels: torch.Tensor, path: Path) -> None:
    """uint8 [H, W, 3] as a deterministic baseline JPEG (fixed quality and subsampling, no metadata)."""
    image = Image.fromarray(pixels.numpy())
    _atomic_write(path, lambda tmp: image.save(tmp, format="JPEG", quality=90, subsampling=2,
                                               optimize=False, progressive=False))


# ---------------------------------------------------------------------------------------------
# Everything together
# ---------------------------------------------------------------------------------------------

def write_sources(directory: Path, arch: dict, seed: int, *, decoder_member: str,
                  include_reduce: bool = False, match_vocab: bool = True) -> dict[str, Path]:
    """Write a variant's six source files into `directory`; returns them keyed like SOURCE_NAMES.

    With `match_vocab` the token table must have the tokenizer's size, as a coherent model needs.
    """
    architecture(arch)
    tokenizer_size = tokenizer_vocab_size()
    if match_vocab and arch["text"]["vocab_size"] != tokenizer_size:
        raise ValueError(
            f"arch text vocab_size is {arch['text']['vocab_size']} but the synthetic tokenizer has "
            f"{tokenizer_size} tokens; set arch['text']['vocab_size'] = tokenizer_vocab_size() "
            f"or pass match_vocab=False")
    directory = Path(directory)
    paths = {name: directory / file for name, file in SOURCE_NAMES.items()}
    write_clip_torchscript(clip_state_dict(arch, seed), paths["clip"])
    write_decoder_zip(decoder_state_dict(arch, seed, include_reduce), paths["decoder"], decoder_member)
    write_tokenizer_files(directory)
    write_image(paths["image"])
    return paths


def preset_arch(name: str) -> dict:
    """A preset's arch as a fresh dict, the tokenizer's size filled in where the table leaves None."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    arch = copy.deepcopy(PRESETS[name]["arch"])  # callers may edit it
    if arch["text"]["vocab_size"] is None:
        arch["text"]["vocab_size"] = tokenizer_vocab_size()
    return arch


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.synthetic",
        description="Write synthetic CLIPSeg source files (published formats, random weights).")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the sources into")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    paths = write_sources(args.out, preset_arch(args.preset), args.seed,
                          decoder_member=preset["member"], match_vocab=preset["match_vocab"])
    for path in paths.values():
        print(f"{sha256_file(path)}  {path.stat().st_size:>11,d}  {path}")


if __name__ == "__main__":
    main()
