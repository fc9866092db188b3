"""File I/O shared by every stage: safetensors and JSON written atomically and deterministically.

safetensors files are written by streaming one tensor at a time into a temporary file that is renamed into place, so
a killed stage never leaves a partial file at an output path and the weights are never copied whole in memory.
They are read back by memory mapping, one tensor at a time.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import torch

from .errors import PipelineError

# safetensors' dtype names; a tensor of any other dtype is refused.
DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class OutputError(PipelineError):
    """An output could not be written; nothing was left at its path."""


@contextlib.contextmanager
def atomic_output(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it is synced and renamed onto `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"{path}: the disk is full ({exc.strerror}); free some space and run the stage again") from exc
        raise OutputError(f"{path}: could not write ({exc}); nothing was written there") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _order(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    # Largest element size first, then by name: every data offset stays aligned to its dtype (as safetensors does),
    # and the order does not depend on how the mapping was built, so the bytes are reproducible.
    return sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))


def _header(tensors: Mapping[str, torch.Tensor], names: list[str], metadata: Mapping[str, str]) -> bytes:
    entries: dict[str, object] = {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in DTYPE_NAMES:
            raise OutputError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    header = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to `path` in the safetensors format, one tensor at a time, atomically, with sorted metadata."""
    names = _order(tensors)
    header = _header(tensors, names, metadata or {})
    with atomic_output(path) as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for name in names:
            tensor = tensors[name].detach().to("cpu").contiguous()
            handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")


class TensorFile(Mapping[str, torch.Tensor]):
    """A safetensors file opened by memory mapping; each tensor is read only when asked for."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise OutputError(f"{self.path}: not a readable safetensors file ({exc}); rerun the stage that writes it") from exc
        self._names = sorted(self._file.keys())
        self.metadata: dict[str, str] = dict(self._file.metadata() or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())


def verify_written(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Re-open a written file and compare every tensor bit for bit with what was meant to be written."""
    written = TensorFile(path)
    if set(written) != set(tensors):
        raise OutputError(f"{path}: re-reading found keys {sorted(set(written) ^ set(tensors))} differing from those written")
    for name, tensor in tensors.items():
        back = written[name]
        if back.dtype != tensor.dtype or back.shape != tensor.shape or not torch.equal(back, tensor):
            raise OutputError(f"{path}: tensor {name!r} does not read back as written; the disk or filesystem is faulty")


def write_json(path: Path, data: object) -> None:
    """Deterministic JSON (sorted keys, fixed indentation, trailing newline), written atomically."""
    text = json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    with atomic_output(path, "w") as handle:
        handle.write(text)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def round_figure(value: float, digits: int = 3) -> float:
    """Round to `digits` significant digits, so figures that differ in their last bits across CPUs record the same."""
    if value == 0 or value != value or value in (float("inf"), float("-inf")):
        return value
    return float(f"{value:.{digits - 1}e}")
