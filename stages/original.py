"""Readers for the original CLIPSeg files: OpenAI's CLIP archive, the decoder .pth and the zip that carries it.

Trust boundary: a decoder .pth and a plain CLIP state dict are read with `torch.load(weights_only=True)`, which never
runs pickled code. A TorchScript archive can only be read by TorchScript's loader, which compiles the archive's code;
it is loaded only when its sha256 was pinned in params.yaml and matched, i.e. only the exact file that OpenAI published.
"""

from __future__ import annotations

import pickle
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import torch

from .errors import PipelineError

from .tensor_io import atomic_output

# OpenAI's CLIP file carries these three non-weight scalars beside the weights.
CLIP_SCALARS = ("input_resolution", "context_length", "vocab_size")
# Telltale keys that say which file we hold.
CLIP_TELLTALE = "visual.conv1.weight"
DECODER_TELLTALE = "film_mul.weight"


class SourceFormatError(PipelineError):
    """A source file is not what the variant says it is."""


def describe(path: Path) -> str:
    """What kind of file this is, in words, from its first bytes and (for zips) its member names."""
    head = _head(path)
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "an HTML or XML page (a server's error or login page saved as the file?)"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file"
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return "a legacy (non-zip) torch/pickle file"
    if not zipfile.is_zipfile(path):
        return f"an unrecognised file starting with bytes {head[:8].hex()}"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return "a corrupt zip archive"
    if any(PurePosixPath(n).parts[1:2] == ("code",) for n in names) or any(n.endswith("/constants.pkl") for n in names):
        return "a TorchScript archive"
    if any(n.endswith("/data.pkl") for n in names):
        return "a torch.save state dict"
    return f"a zip archive with members {sorted(names)[:20]}"


def _head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(512)


def extract_member(archive_path: Path, member: str, dest: Path, max_bytes: int) -> Path:
    """Copy the zip member whose file name is `member` (in whatever folder it sits) to `dest`, bounded in size.

    The member is found by its base name because the published zip keeps the weights in a folder that unzip -j
    flattens. Archives with unsafe member names are refused outright: they are never what the authors published.
    """
    try:
        archive = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceFormatError(f"{archive_path}: expected a zip archive holding {member!r}, found {describe(archive_path)} ({exc})") from exc
    with archive:
        names = archive.namelist()
        unsafe = [n for n in names if n.startswith(("/", "\\")) or ".." in PurePosixPath(n.replace("\\", "/")).parts or ":" in n]
        if unsafe:
            raise SourceFormatError(f"{archive_path}: refusing an archive with unsafe member paths {unsafe}; members: {names}")
        matches = [info for info in archive.infolist() if PurePosixPath(info.filename).name == member and not info.is_dir()]
        if len(matches) != 1:
            found = "no member" if not matches else f"{len(matches)} members"
            raise SourceFormatError(
                f"{archive_path}: {found} named {member!r}; members: {names}. Set the source's `member` to one of them"
            )
        info = matches[0]
        if info.file_size > max_bytes:
            raise SourceFormatError(
                f"{archive_path}: member {info.filename!r} unpacks to {info.file_size} bytes, above the bound {max_bytes} "
                "(params: download.max_member_bytes)"
            )
        _copy_bounded(archive, info, dest, max_bytes, archive_path)
    return dest


def _copy_bounded(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, max_bytes: int, archive_path: Path) -> None:
    # The size in the zip directory can lie (a decompression bomb): count the bytes as they unpack.
    written = 0
    try:
        with archive.open(info) as source, atomic_output(dest) as target:
            while chunk := source.read(1 << 20):
                written += len(chunk)
                if written > max_bytes:
                    raise SourceFormatError(
                        f"{archive_path}: member {info.filename!r} unpacks past the bound {max_bytes} bytes "
                        "(params: download.max_member_bytes); refusing a possible decompression bomb"
                    )
                target.write(chunk)
    except (zipfile.BadZipFile, zlib.error) as exc:
        raise SourceFormatError(f"{archive_path}: the zip archive is corrupt ({exc}); download it again") from exc


def load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict, read without executing pickled code."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise SourceFormatError(
            f"{path}: refused to read {what}: the file's pickle asks for code or objects beyond plain tensors "
            f"({str(exc).splitlines()[0]}). Only plain state dicts are accepted; get the file from its published source"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise SourceFormatError(f"{path}: expected {what} (a torch.save state dict), found {describe(path)} ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise SourceFormatError(f"{path}: expected {what} (a mapping of names to tensors), found a {type(data).__name__}")
    return data


def load_decoder(path: Path) -> dict[str, torch.Tensor]:
    kind = describe(path)
    if kind == "a TorchScript archive":
        raise SourceFormatError(f"{path}: expected the CLIPSeg decoder as a torch.save state dict, found {kind}")
    state = load_state_dict(path, "the CLIPSeg decoder weights")
    if DECODER_TELLTALE not in state:
        hint = " (it holds CLIP backbone keys: is the clip file configured as the decoder?)" if CLIP_TELLTALE in state else ""
        raise SourceFormatError(f"{path}: not a CLIPSeg decoder: no {DECODER_TELLTALE!r} among its keys{hint}")
    return state


def load_clip(path: Path, pinned: bool) -> dict[str, torch.Tensor]:
    """OpenAI's CLIP weights from its TorchScript archive, or from a plain state dict as OpenAI's loader accepts."""
    kind = describe(path)
    if kind == "a TorchScript archive":
        if not pinned:
            raise SourceFormatError(
                f"{path}: a TorchScript archive is only loaded when its sha256 is pinned (TorchScript loading compiles "
                "code from the file). Set the clip source's `sha256` in params.yaml to the published hash"
            )
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise SourceFormatError(f"{path}: the TorchScript archive does not load ({str(exc).splitlines()[0]})") from exc
        state = {name: tensor.detach() for name, tensor in module.state_dict().items()}
    else:
        state = load_state_dict(path, "OpenAI's CLIP weights")
    if CLIP_TELLTALE not in state:
        hint = " (it holds CLIPSeg decoder keys: is the decoder file configured as clip?)" if DECODER_TELLTALE in state else ""
        raise SourceFormatError(f"{path}: not an OpenAI CLIP checkpoint: no {CLIP_TELLTALE!r} among its keys{hint}")
    return state


def clip_shapes(arch: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of OpenAI's CLIP file with its shape, for an architecture from params.yaml."""
    vision, text, proj = arch["vision"], arch["text"], arch["projection_dim"]
    grid = vision["image_size"] // vision["patch_size"]
    shapes = {
        "positional_embedding": (text["max_position_embeddings"], text["hidden_size"]),
        "text_projection": (text["hidden_size"], proj),
        "logit_scale": (),
        "token_embedding.weight": (text["vocab_size"], text["hidden_size"]),
        "ln_final.weight": (text["hidden_size"],),
        "ln_final.bias": (text["hidden_size"],),
        "visual.class_embedding": (vision["hidden_size"],),
        "visual.positional_embedding": (grid * grid + 1, vision["hidden_size"]),
        "visual.proj": (vision["hidden_size"], proj),
        "visual.conv1.weight": (vision["hidden_size"], 3, vision["patch_size"], vision["patch_size"]),
    }
    for prefix, tower in (("visual.", vision), ("", text)):
        shapes |= {f"{prefix}ln_pre.{p}": (tower["hidden_size"],) for p in ("weight", "bias") if prefix}
        shapes |= {f"{prefix}ln_post.{p}": (tower["hidden_size"],) for p in ("weight", "bias") if prefix}
        for i in range(tower["num_hidden_layers"]):
            shapes |= _resblock_shapes(f"{prefix}transformer.resblocks.{i}.", tower["hidden_size"], tower["intermediate_size"])
    return shapes


def _resblock_shapes(prefix: str, width: int, mlp: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}attn.in_proj_weight": (3 * width, width),
        f"{prefix}attn.in_proj_bias": (3 * width,),
        f"{prefix}attn.out_proj.weight": (width, width),
        f"{prefix}attn.out_proj.bias": (width,),
        f"{prefix}ln_1.weight": (width,),
        f"{prefix}ln_1.bias": (width,),
        f"{prefix}ln_2.weight": (width,),
        f"{prefix}ln_2.bias": (width,),
        f"{prefix}mlp.c_fc.weight": (mlp, width),
        f"{prefix}mlp.c_fc.bias": (mlp,),
        f"{prefix}mlp.c_proj.weight": (width, mlp),
        f"{prefix}mlp.c_proj.bias": (width,),
    }


def decoder_shapes(arch: dict) -> dict[str, tuple[int, ...]]:
    """Every weight the CLIPSeg decoder's forward pass uses, with its shape (the unused `reduce.*` is not listed)."""
    d, proj, width = arch["reduce_dim"], arch["projection_dim"], arch["vision"]["hidden_size"]
    mlp, patch = arch["decoder_intermediate_size"], arch["vision"]["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "film_mul.weight": (d, proj),
        "film_mul.bias": (d,),
        "film_add.weight": (d, proj),
        "film_add.bias": (d,),
    }
    for i in range(len(arch["extract_layers"])):
        shapes |= {f"reduces.{i}.weight": (d, width), f"reduces.{i}.bias": (d,)}
        shapes |= {
            f"blocks.{i}.self_attn.in_proj_weight": (3 * d, d),
            f"blocks.{i}.self_attn.in_proj_bias": (3 * d,),
            f"blocks.{i}.self_attn.out_proj.weight": (d, d),
            f"blocks.{i}.self_attn.out_proj.bias": (d,),
            f"blocks.{i}.linear1.weight": (mlp, d),
            f"blocks.{i}.linear1.bias": (mlp,),
            f"blocks.{i}.linear2.weight": (d, mlp),
            f"blocks.{i}.linear2.bias": (d,),
            f"blocks.{i}.norm1.weight": (d,),
            f"blocks.{i}.norm1.bias": (d,),
            f"blocks.{i}.norm2.weight": (d,),
            f"blocks.{i}.norm2.bias": (d,),
        }
    if arch["use_complex_transposed_convolution"]:
        k = patch // 4
        shapes |= {
            "trans_conv.0.weight": (d, d, 3, 3),
            "trans_conv.0.bias": (d,),
            "trans_conv.2.weight": (d, d // 2, k, k),
            "trans_conv.2.bias": (d // 2,),
            "trans_conv.4.weight": (d // 2, 1, k, k),
            "trans_conv.4.bias": (1,),
        }
    else:
        shapes |= {"trans_conv.weight": (d, 1, patch, patch), "trans_conv.bias": (1,)}
    return shapes
