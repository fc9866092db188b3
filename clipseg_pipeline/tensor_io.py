"""File I/O shared by every stage: safetensors and JSON written atomically and deterministically.

safetensors files are written by streaming one tensor at a time into a temporary file that is renamed into place, so
a killed stage never leaves a partial file at an output path, and read one tensor at a time: a stage never holds more
than the tensors it is working on, whatever the checkpoint's size. Temporary files are named after their writing
process (`.<name>.<pid>.tmp`); the next write of the same path removes those whose process is gone (a killed run's).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import glob
import hashlib
import itertools
import json
import math
import mmap
import os
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import PipelineError

# How many bytes of written tensors may wait to be hashed (write_safetensors with sha256): more than the largest tensor
# of a published model (the 101 MB token embedding in float32), so that its hash overlaps the writing of the next ones.
HASH_BACKLOG_BYTES = 160 << 20
# The largest safetensors header we accept (the format itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
# safetensors' dtype names, keyed by the dtype's own name (torch.float32 and numpy's float32 are both "float32"); a
# tensor of any other dtype is refused.
DTYPE_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
# The numpy dtype holding each one's elements (and so giving its size in bytes). numpy has no bfloat16: a BF16 tensor
# read or written as a numpy array travels as its raw 16 bits, in uint16.
_NUMPY = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "uint16", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def dtype_name(dtype: Any) -> str:
    """safetensors' name ("F32", ...) of a torch or numpy dtype, or of a name such as "float32"; torch need not be
    imported (the stages that only move tensors run on numpy, without torch's seconds of start-up)."""
    name = str(dtype).removeprefix("torch.")
    if name in DTYPE_NAMES:
        return DTYPE_NAMES[name]
    raise OutputError(f"dtype {dtype} cannot be stored in safetensors; use one of {sorted(DTYPE_NAMES)}")


class OutputError(PipelineError):
    """An output could not be written; nothing was left at its path."""


TEMP_SUFFIX = ".tmp"


def remove_stale_temps(path: Path) -> None:
    """Remove the temporary files of `path` whose writing process no longer runs (a stage killed mid-write)."""
    prefix = f".{path.name}."
    for temp in Path(path).parent.glob(glob.escape(prefix) + "*" + TEMP_SUFFIX):
        pid = temp.name[len(prefix) : -len(TEMP_SUFFIX)]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            temp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    if os.name != "posix":
        return True  # no safe liveness probe (os.kill would terminate the process): keep the file
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


@contextlib.contextmanager
def atomic_output(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it is renamed onto `path`, else removed."""
    path = Path(path)
    # Named after this process, so that a later run can tell a killed writer's leftover from a live one's file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        # 0o666 less the umask: the permissions an ordinary new file gets.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, mode) as handle:
            yield handle
        # No fsync: the rename already guarantees that a killed stage leaves either the old file or the whole new one,
        # and after a power loss DVC sees a damaged output as changed (size and hash) and reruns its stage.
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"{path}: the disk is full ({exc.strerror}); free some space and run the stage again") from exc
        raise OutputError(f"{path}: could not write ({exc}); nothing was written there") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Spec:
    """What the header needs to know of a tensor before its bytes exist: its dtype by safetensors' name, its shape."""

    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self):
        if self.dtype not in _NUMPY:
            raise OutputError(f"Spec dtype must be a safetensors dtype name {sorted(_NUMPY)}, found {self.dtype!r}")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize


def stored_dtype(tensor) -> str:
    """safetensors' dtype name for a torch tensor or numpy array; a numpy uint16 array is bfloat16's raw bits (as
    TensorFile "np" gives them: safetensors has no unsigned 16-bit type here)."""
    if isinstance(tensor, np.ndarray) and tensor.dtype == np.uint16:
        return "BF16"
    return dtype_name(tensor.dtype)


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype that holds a safetensors dtype's elements (uint16 for BF16's raw bits)."""
    return np.dtype(_NUMPY[name])


def _matches(tensor, spec: Spec) -> bool:
    return stored_dtype(tensor) == spec.dtype and tuple(tensor.shape) == spec.shape


class LazyTensors(Mapping[str, Any]):
    """Tensors (torch or numpy) known by their spec up front and computed one at a time when read, so that a stage
    can stream a whole checkpoint through `write_safetensors` while holding only the tensor in hand."""

    def __init__(self, specs: Mapping[str, Spec], produce: Callable[[str], Any]):
        self.specs = dict(specs)
        self._produce = produce

    def __getitem__(self, name: str):
        if name not in self.specs:
            raise KeyError(name)
        tensor = self._produce(name)
        spec = self.specs[name]
        if not _matches(tensor, spec):
            raise OutputError(f"tensor {name!r} came out as {tensor.dtype} {list(tensor.shape)}, planned as {spec.dtype} {list(spec.shape)}")
        return tensor

    def __contains__(self, name: object) -> bool:  # Mapping's default would produce the tensor to find out
        return name in self.specs

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def spec_of(tensors: Mapping[str, Any], name: str) -> Spec:
    if isinstance(tensors, (LazyTensors, TensorFile)):
        return tensors.specs[name]
    tensor = tensors[name]
    try:
        return Spec(stored_dtype(tensor), tuple(tensor.shape))
    except OutputError as exc:
        raise OutputError(f"tensor {name!r}: {exc}") from exc


def _order(specs: Mapping[str, Spec]) -> list[str]:
    # Largest element size first, then by name: every data offset stays aligned to its dtype (as safetensors does),
    # and the order does not depend on how the mapping was built, so the bytes are reproducible.
    return sorted(specs, key=lambda name: (-numpy_dtype(specs[name].dtype).itemsize, name))


def _header(specs: Mapping[str, Spec], names: list[str], metadata: Mapping[str, str]) -> bytes:
    entries: dict[str, object] = {}
    offset = 0
    for name in names:
        spec = specs[name]
        entries[name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    header = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)


def _raw_bytes(tensor) -> memoryview:
    """A torch tensor's or numpy array's bytes in C order (little-endian, as safetensors stores them)."""
    if isinstance(tensor, np.ndarray):
        return memoryview(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8))
    import torch  # only a stage holding torch tensors gets here, and it has torch loaded already

    return memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
                      sha256: bool = False) -> str | None:
    """Write `tensors` to `path` in the safetensors format, one tensor at a time, atomically, with sorted metadata,
    then re-open the file with the safetensors library's own parser and check every tensor's name, dtype and shape.

    The bytes are not read back: DVC hashes every output as the stage ends, and a second pass over 600 MB would cost
    about as much as writing it. With `sha256`, returns the file's sha256, computed from the bytes as they are written,
    on a second thread (hashlib lets go of the interpreter while it hashes), so most of the hashing overlaps the
    writing: 600 MB measured 0.5 s written and hashed, against 0.3 s to write and 0.36 s to read back and hash. The
    tensors waiting to be hashed are held to HASH_BACKLOG_BYTES (and the one being written)."""
    specs = {name: spec_of(tensors, name) for name in tensors}
    names = _order(specs)
    header = _header(specs, names, metadata or {})
    digest = hashlib.sha256() if sha256 else None
    with contextlib.ExitStack() as stack:
        hasher = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="sha256")) if digest else None
        handle = stack.enter_context(atomic_output(path))
        backlog: collections.deque = collections.deque()  # (future, bytes), oldest first; one thread hashes in order
        waiting = 0
        chunks = itertools.chain((struct.pack("<Q", len(header)), header), (_raw_bytes(tensors[name]) for name in names))
        for chunk in chunks:
            handle.write(chunk)
            if hasher:
                backlog.append((hasher.submit(digest.update, chunk), len(chunk)))
                waiting += len(chunk)
                # A big tensor's hash overlaps the writing of the small ones after it; only a backlog over the bound
                # waits. Hashed tensors are let go at once.
                while backlog and (backlog[0][0].done() or waiting > HASH_BACKLOG_BYTES):
                    hashing, size = backlog.popleft()
                    hashing.result()
                    waiting -= size
        for hashing, _ in backlog:
            hashing.result()
    try:
        _verify_written(path, specs)
    except OutputError:
        Path(path).unlink(missing_ok=True)
        raise
    return digest.hexdigest() if digest else None


def _read_exactly(handle: IO[bytes], start: int, count: int) -> np.ndarray:
    """Up to `count` bytes from `start` of an unbuffered file, read straight into a new array (shorter at the file's
    end)."""
    data = np.empty(count, dtype=np.uint8)
    target = memoryview(data)
    handle.seek(start)
    done = 0
    while done < count and (got := handle.readinto(target[done:])):
        done += got
    return data[:done]


class TensorFile(Mapping[str, Any]):
    """A safetensors file read one tensor at a time: a stage holds only the tensors it is working on.

    Each tensor is its own private (copy-on-write) memory map of its bytes in the file: its pages are the page cache's,
    not a copy in freshly allocated memory (which cost a fault per 4 KB page and a copy: verify-outputs' reference read
    its 300 MB of original tensors in 0.22 s that way, against 0.02 s mapped), and they leave the process when the
    tensor is freed (one map of the whole file would keep every touched page resident until the end). Writing into a
    tensor changes only the process's copy of that page, never the file. Where the filesystem cannot map files, the
    bytes are read instead.

    `framework` is "pt" for torch tensors or "np" for numpy arrays (a BF16 tensor then comes as its raw bits in uint16,
    numpy having no bfloat16), as in safetensors' own safe_open."""

    def __init__(self, path: Path, framework: str = "pt"):
        if framework not in ("pt", "np"):
            raise ValueError(f"framework must be 'pt' or 'np', found {framework!r}")
        self.path = Path(path)
        self.framework = framework
        try:
            with open(self.path, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                if size > MAX_HEADER_BYTES:
                    raise ValueError(f"a header of {size} bytes")
                header = json.loads(handle.read(size))
            self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
            self._base = 8 + size
            self.specs = {name: Spec(e["dtype"], tuple(e["shape"])) for name, e in header.items()}
            self._offsets = {name: tuple(e["data_offsets"]) for name, e in header.items()}
        except (OSError, struct.error, ValueError, KeyError, TypeError, OutputError) as exc:
            raise OutputError(f"{self.path}: not a readable safetensors file ({exc}); rerun the stage that writes it") from exc

    def __getitem__(self, name: str):
        spec, (begin, end) = self.specs[name], self._offsets[name]
        if end - begin != spec.nbytes:
            raise OutputError(f"{self.path}: tensor {name!r} spans {end - begin} bytes, its shape needs {spec.nbytes}")
        start = self._base + begin
        if spec.nbytes == 0:
            data = np.empty(0, dtype=np.uint8)
        else:
            with open(self.path, "rb", buffering=0) as handle:
                if os.fstat(handle.fileno()).st_size < start + spec.nbytes:
                    raise OutputError(f"{self.path}: truncated inside tensor {name!r}; rerun the stage that writes it")
                skip = start % mmap.ALLOCATIONGRANULARITY  # a map starts on a page boundary
                try:
                    # ACCESS_COPY: a private, copy-on-write map (MAP_PRIVATE on POSIX), on every platform.
                    mapped = mmap.mmap(handle.fileno(), skip + spec.nbytes, access=mmap.ACCESS_COPY, offset=start - skip)
                except OSError:  # a filesystem that cannot map files (some FUSE mounts): the same bytes, read
                    data = _read_exactly(handle, start, spec.nbytes)
                else:
                    # The array holds the map, which is unmapped when the last tensor viewing it is freed.
                    data = np.frombuffer(mapped, dtype=np.uint8, count=spec.nbytes, offset=skip)
            if len(data) != spec.nbytes:
                raise OutputError(f"{self.path}: truncated inside tensor {name!r}; rerun the stage that writes it")
        array = data.view(numpy_dtype(spec.dtype)).reshape(spec.shape)
        if self.framework == "np":
            return array
        import torch  # a stage reading torch tensors has torch loaded already

        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if spec.dtype == "BF16" else tensor

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the whole tensor to find out
        return name in self.specs

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.specs))

    def __len__(self) -> int:
        return len(self.specs)


def _verify_written(path: Path, specs: Mapping[str, Spec]) -> None:
    """Re-open a written file with the safetensors library's own parser and compare every tensor's dtype and shape
    with what was meant to be written."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle:  # only the header is read
            names = set(handle.keys())
            for name in names & set(specs):
                got = handle.get_slice(name)
                if got.get_dtype() != specs[name].dtype or tuple(got.get_shape()) != specs[name].shape:
                    raise OutputError(f"{path}: tensor {name!r} reads back as {got.get_dtype()} {got.get_shape()}")
    except SafetensorError as exc:
        raise OutputError(f"{path}: the written file does not parse as safetensors ({exc})") from exc
    if names != set(specs):
        raise OutputError(f"{path}: re-reading found keys {sorted(names ^ set(specs))} differing from those written")


def link_or_copy(source: Path, path: Path) -> str:
    """Put `source`'s bytes at `path` atomically: a hard link where the filesystem allows one (no bytes move; DVC,
    which keys its hashes by inode, need not hash them again), else a copy. Returns "link" or "copy".

    Only for files nobody edits in place: the stages always write a new file and rename it over the old one, which
    leaves every other link to the old file as it was (and DVC's own links are read-only)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # another filesystem (EXDEV), or one without hard links
        with atomic_output(path) as handle, open(source, "rb") as src:
            shutil.copyfileobj(src, handle)
        return "copy"
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: could not write ({exc}); nothing was written there") from exc
    return "link"


def write_json(path: Path, data: object) -> None:
    """Deterministic JSON (sorted keys, fixed indentation, trailing newline), written atomically."""
    text = json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    with atomic_output(path, "w") as handle:
        handle.write(text)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The file's sha256, read `chunk_bytes` at a time into one reused buffer."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(chunk_bytes))
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(buffer[:count])
    return digest.hexdigest()


def round_figure(value: float, digits: int = 3) -> float:
    """Round to `digits` significant digits: a figure recorded for reading, not for its last bits."""
    if value == 0 or value != value or value in (float("inf"), float("-inf")):
        return value
    return float(f"{value:.{digits - 1}e}")
