"""Readers for the original CLIPSeg files: OpenAI's CLIP archive, the decoder .pth and the zip that carries it, and a
whole original model's state_dict() (CLIP and decoder in one file).

Trust boundary: a decoder .pth and a plain CLIP state dict are read with `torch.load(weights_only=True)`, which never
runs pickled code, and only in torch's zip format, after the archive's unpacked size was checked against a bound (the
legacy format allocates whatever its pickle asks for before any check can run). A TorchScript archive can only be read
by TorchScript's loader, which compiles the archive's code; it is loaded only when its sha256 was pinned in params.yaml
and matched, i.e. only the exact file that OpenAI published.
"""

from __future__ import annotations

import pickle
import struct
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .errors import PipelineError
from .tensor_io import atomic_output

if TYPE_CHECKING:  # torch is imported by the loaders that use it: remap-weights needs only the shape tables
    import torch

# OpenAI's CLIP file carries these three non-weight scalars beside the weights.
CLIP_SCALARS = ("input_resolution", "context_length", "vocab_size")
# Telltale keys that say which file we hold.
CLIP_TELLTALE = "visual.conv1.weight"
DECODER_TELLTALE = "film_mul.weight"
# A whole original model's state_dict() holds CLIP under this prefix (the model's `clip_model` attribute).
FULL_MODEL_PREFIX = "clip_model."
FULL_MODEL_TELLTALE = FULL_MODEL_PREFIX + CLIP_TELLTALE
USE_CHECKPOINT = (
    "it is a whole CLIPSeg model's state_dict(), CLIP and decoder in one file: give it as the `checkpoint` source in "
    "place of `clip` and `decoder`"
)
# What describe() calls the two zip layouts torch writes.
TORCHSCRIPT = "a TorchScript archive"
STATE_DICT_ZIP = "a torch.save state dict"
# What torch.load raises on a damaged file besides UnpicklingError (found by fuzzing truncated and bit-flipped files).
TORCH_LOAD_ERRORS = (
    RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, MemoryError, struct.error
)  # fmt: skip
# torch's own UnpicklingError text around the one line that says what was refused.
TORCH_BOILERPLATE = (
    "Weights only load failed", "Check the documentation", "Please file an issue", "Re-running `torch.load`"
)  # fmt: skip


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
    if not head:
        return "an empty file"
    if head[:1] == b"\x80":
        return "a legacy (non-zip) torch/pickle file"
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK\x03\x04"):
            return "a damaged zip archive (its member directory is missing: a truncated download?)"
        return f"an unrecognised file starting with bytes {head[:8].hex()}"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "a damaged zip archive"
    if any(PurePosixPath(n).parts[1:2] == ("code",) for n in names) or any(n.endswith("/constants.pkl") for n in names):
        return TORCHSCRIPT
    if any(n.endswith("/data.pkl") for n in names):
        return STATE_DICT_ZIP
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
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
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
                f"{archive_path}: {found} named {member!r}; members: {names}. Set the source's `member` in "
                "params.yaml to the file name of one of them"
            )
        info = matches[0]
        if info.file_size > max_bytes:
            raise SourceFormatError(
                f"{archive_path}: member {info.filename!r} unpacks to {info.file_size} bytes, above the bound {max_bytes} "
                "(params: download.max_member_bytes); refusing a possible decompression bomb. Raise the bound only if "
                "the member really is that large"
            )
        _copy_bounded(archive, info, dest, max_bytes, archive_path, names)
    return dest


def _copy_bounded(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, max_bytes: int, archive_path: Path, names: list[str]
) -> None:
    # The size in the zip directory can lie (a decompression bomb): count the bytes as they unpack. (Python's zipfile
    # also stops at the declared size and then fails the CRC check, so a lie ends as "corrupt", not as a full disk.)
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
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        # RuntimeError: an encrypted member; NotImplementedError: a compression method zipfile lacks.
        raise SourceFormatError(
            f"{archive_path}: member {info.filename!r} cannot be unpacked: the zip archive is corrupt or unsupported "
            f"({exc}); members: {names}. Download it again"
        ) from exc


def check_unpacked_size(path: Path, max_bytes: int) -> None:
    """Refuse a torch zip whose members unpack to more than `max_bytes`, before torch allocates anything for them.

    torch's reader allocates each member at the size the zip directory declares (and checks every tensor against the
    size of its member), so bounding the declared sizes bounds the memory a checkpoint can claim.
    """
    with zipfile.ZipFile(path) as archive:
        unpacked = sum(info.file_size for info in archive.infolist())
    if unpacked > max_bytes:
        raise SourceFormatError(
            f"{path}: the checkpoint unpacks to {unpacked} bytes, above the bound {max_bytes} (params: download.max_bytes); "
            "refusing a possible decompression bomb. Raise download.max_bytes only if the file really is that large"
        )


def load_state_dict(path: Path, what: str, max_bytes: int) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict in torch's zip format, read without executing pickled code."""
    import torch

    kind = describe(path)
    if kind != STATE_DICT_ZIP:
        raise SourceFormatError(f"{path}: expected {what} (a torch.save state dict, zip format), found {_with_hint(kind)}")
    check_unpacked_size(path, max_bytes)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise SourceFormatError(
            f"{path}: refused to read {what}: its pickle is damaged or asks for code or objects beyond plain tensors "
            f"({_unpickling_reason(exc)}). Nothing from it was run; only plain state dicts are read. Get the file from "
            "its published source"
        ) from exc
    except TORCH_LOAD_ERRORS as exc:
        raise SourceFormatError(
            f"{path}: expected {what} (a torch.save state dict), the file is damaged ({_first_line(exc)})"
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise SourceFormatError(f"{path}: expected {what} (a mapping of names to tensors), found a {type(data).__name__}")
    odd = sorted(
        f"{k!r}: {type(v).__name__}" for k, v in data.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))
    )
    if odd:
        raise SourceFormatError(f"{path}: expected {what} (a mapping of names to tensors), found entries {odd[:10]}")
    return data


def _with_hint(kind: str) -> str:
    if kind.startswith("a legacy"):
        return f"{kind} (re-save it with torch >= 1.6, whose torch.save writes the zip format)"
    return kind


def _unpickling_reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith(TORCH_BOILERPLATE)]
    return lines[0] if lines else _first_line(exc)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_decoder(path: Path, max_bytes: int) -> dict[str, torch.Tensor]:
    kind = describe(path)
    if kind == TORCHSCRIPT:
        raise SourceFormatError(
            f"{path}: expected the CLIPSeg decoder as a torch.save state dict, found {kind} (is the CLIP file configured "
            "as the decoder?)"
        )
    if kind.startswith("a zip archive with members"):
        raise SourceFormatError(
            f"{path}: expected the CLIPSeg decoder as a torch.save state dict, found {kind}. If this is the authors' "
            "weights zip, set the decoder source's `member` in params.yaml to the .pth file to take from it"
        )
    state = load_state_dict(path, "the CLIPSeg decoder weights", max_bytes)
    if FULL_MODEL_TELLTALE in state:
        raise SourceFormatError(f"{path}: not a decoder alone: {USE_CHECKPOINT}")
    if DECODER_TELLTALE not in state:
        hint = " (it holds CLIP backbone keys: is the clip file configured as the decoder?)" if CLIP_TELLTALE in state else ""
        raise SourceFormatError(f"{path}: not a CLIPSeg decoder: no {DECODER_TELLTALE!r} among its keys{hint}")
    return state


def load_clip(path: Path, pinned: bool, max_bytes: int) -> dict[str, torch.Tensor]:
    """OpenAI's CLIP weights from its TorchScript archive, or from a plain state dict as OpenAI's loader accepts."""
    import torch

    kind = describe(path)
    if kind == TORCHSCRIPT:
        if not pinned:
            raise SourceFormatError(
                f"{path}: a TorchScript archive is only loaded when its sha256 is pinned (TorchScript loading compiles "
                "code from the file). Set the clip source's `sha256` in params.yaml to the published hash"
            )
        check_unpacked_size(path, max_bytes)
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated, but it is the format OpenAI published: nothing to act on.
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except TORCH_LOAD_ERRORS as exc:
            raise SourceFormatError(f"{path}: the TorchScript archive does not load ({_first_line(exc)})") from exc
        state = {name: tensor.detach() for name, tensor in module.state_dict().items()}
    elif kind == STATE_DICT_ZIP:
        state = load_state_dict(path, "OpenAI's CLIP weights", max_bytes)
    else:
        raise SourceFormatError(
            f"{path}: expected OpenAI's CLIP weights (a TorchScript archive or a torch.save state dict), "
            f"found {_with_hint(kind)}"
        )
    if CLIP_TELLTALE not in state:
        hint = " (it holds CLIPSeg decoder keys: is the decoder file configured as clip?)" if DECODER_TELLTALE in state else ""
        if FULL_MODEL_TELLTALE in state:
            hint = f" ({USE_CHECKPOINT})"
        raise SourceFormatError(f"{path}: not an OpenAI CLIP checkpoint: no {CLIP_TELLTALE!r} among its keys{hint}")
    return state


def load_checkpoint(path: Path, max_bytes: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A whole original model's state_dict() -> (CLIP's tensors with the `clip_model.` prefix taken off, the rest).

    The rest is the decoder and the `model.*` second copy of the vision tower, which remap-weights drops with its
    reason. Read like a decoder file: a plain state dict only, never a TorchScript archive.
    """
    kind = describe(path)
    if kind == TORCHSCRIPT:
        raise SourceFormatError(
            f"{path}: expected a whole CLIPSeg model's state_dict() (a torch.save state dict), found {kind}: OpenAI's "
            "CLIP file goes in the `clip` source, with the decoder file as `decoder`"
        )
    state = load_state_dict(path, "a whole CLIPSeg model's state_dict()", max_bytes)
    if FULL_MODEL_TELLTALE not in state or DECODER_TELLTALE not in state:
        hint = ""
        if CLIP_TELLTALE in state:
            hint = " (it is a CLIP state dict alone: give it as `clip`, with the decoder file as `decoder`)"
        elif DECODER_TELLTALE in state:
            hint = (" (it is a decoder alone, as the original training.py saves one: give it as `decoder`, with OpenAI's "
                    "CLIP file as `clip`)")
        raise SourceFormatError(
            f"{path}: not a whole CLIPSeg model's state_dict(): it needs both {FULL_MODEL_TELLTALE!r} and "
            f"{DECODER_TELLTALE!r} among its keys{hint}"
        )
    clip = {name.removeprefix(FULL_MODEL_PREFIX): t for name, t in state.items() if name.startswith(FULL_MODEL_PREFIX)}
    rest = {name: t for name, t in state.items() if not name.startswith(FULL_MODEL_PREFIX)}
    return clip, rest
