"""tensor_io: torch tensors and numpy arrays written to the same bytes and read back as either, and the stages that only
move tensors kept free of torch."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipseg_pipeline import tensor_io
from clipseg_pipeline.tensor_io import LazyTensors, OutputError, Spec, TensorFile, write_safetensors

ROOT = Path(__file__).resolve().parents[1]


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=generator)
    return {
        "f64": base.double(), "f32": base, "f16": base.half(), "bf16": base.bfloat16(), "i64": torch.arange(7),
        "u8": torch.arange(4, dtype=torch.uint8), "flag": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
        "transposed": base.t(), "empty": torch.zeros(0, 4),
    }  # fmt: skip


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: its raw bits travel as uint16.
    return tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def test_torch_and_numpy_write_the_same_bytes_and_read_back_as_either(tmp_path):
    torch_file, numpy_file = tmp_path / "torch.safetensors", tmp_path / "numpy.safetensors"
    write_safetensors(torch_file, tensors(), {"k": "v"})
    write_safetensors(numpy_file, {name: as_numpy(t) for name, t in tensors().items()}, {"k": "v"})
    assert torch_file.read_bytes() == numpy_file.read_bytes()
    as_torch, as_np = TensorFile(torch_file), TensorFile(torch_file, framework="np")
    assert as_torch.metadata == as_np.metadata == {"k": "v"}
    for name, tensor in tensors().items():
        assert as_torch[name].dtype == tensor.dtype and torch.equal(as_torch[name], tensor), name
        assert np.array_equal(as_np[name], as_numpy(tensor)) and as_np[name].dtype == as_numpy(tensor).dtype, name
    assert as_np.specs["bf16"] == Spec("BF16", (3, 5))


@pytest.mark.parametrize("numpy", [False, True])
def test_the_sha256_taken_while_writing_is_the_files(tmp_path, numpy):
    # Hashed on a second thread as the tensors are written: in file order, header included, from either framework.
    data = {name: as_numpy(t) if numpy else t for name, t in tensors().items()}
    path = tmp_path / "t.safetensors"
    digest = write_safetensors(path, data, {"b": "2", "a": "1"}, sha256=True)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert write_safetensors(tmp_path / "u.safetensors", data) is None


def test_a_spec_takes_safetensors_dtype_names_only():
    with pytest.raises(OutputError, match=r"safetensors dtype name .* found 'torch.float32'"):
        Spec(str(torch.float32), (1,))


def test_a_tensor_safetensors_cannot_store_is_named_and_nothing_is_written(tmp_path):
    with pytest.raises(OutputError, match=r"tensor 'odd': dtype torch.complex64 cannot be stored in safetensors"):
        write_safetensors(tmp_path / "x.safetensors", {"fine": torch.zeros(1), "odd": torch.zeros(1, dtype=torch.complex64)})
    assert not list(tmp_path.iterdir())


def test_a_lazy_tensor_that_comes_out_other_than_planned_is_refused(tmp_path):
    lazy = LazyTensors({"x": Spec("F32", (2,))}, lambda name: np.zeros(2, np.float64))
    with pytest.raises(OutputError, match=r"tensor 'x' came out as float64 \[2\], planned as F32 \[2\]"):
        write_safetensors(tmp_path / "x.safetensors", lazy)
    assert not list(tmp_path.iterdir())


def test_asking_whether_a_name_is_there_reads_no_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"x": np.zeros(3, np.float32)})
    stored = TensorFile(path)
    path.write_bytes(b"")  # any read of a tensor would now fail as truncated
    assert "x" in stored and "y" not in stored
    with pytest.raises(OutputError, match="truncated inside tensor 'x'"):
        stored["x"]
    produced = []
    lazy = LazyTensors({"x": Spec("F32", (2,))}, lambda name: produced.append(name) or np.zeros(2, np.float32))
    assert "x" in lazy and "y" not in lazy and produced == []


def test_a_read_tensor_is_the_readers_own_copy_of_the_file(tmp_path):
    """Tensors are private maps of the file: writing into one changes neither the file nor a later read of it, and a
    tensor stays readable after its file is replaced or removed."""
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"x": np.arange(5000, dtype=np.float32), "y": np.ones((3, 2), np.float16)})
    before = path.read_bytes()
    stored, as_np = TensorFile(path), TensorFile(path, framework="np")
    x, y = stored["x"], as_np["y"]
    x[0], y[1, 1] = -1.0, 7.0
    assert path.read_bytes() == before
    assert stored["x"][0].item() == 0.0 and as_np["y"][1, 1] == 1.0
    write_safetensors(path, {"x": np.zeros(5000, np.float32), "y": np.zeros((3, 2), np.float16)})
    path.unlink()
    assert x[4999].item() == 4999.0 and y[1, 1] == 7.0 and y[0, 0] == 1.0


def test_a_filesystem_that_cannot_map_files_is_read_instead(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"x": np.arange(5000, dtype=np.float32), "y": np.ones((3, 2), np.float16)})
    mapped = {name: TensorFile(path, framework="np")[name] for name in ("x", "y")}

    def cannot_map(*args, **kwargs):
        raise OSError(19, "No such device")  # ENODEV: what mmap gives on a filesystem without mapping support

    monkeypatch.setattr(tensor_io.mmap, "mmap", cannot_map)
    stored = TensorFile(path, framework="np")
    for name, expected in mapped.items():
        np.testing.assert_array_equal(stored[name], expected)
    np.testing.assert_array_equal(TensorFile(path)["x"].numpy(), mapped["x"])
    with open(path, "r+b") as handle:  # cut into y, stored last (float16 after float32), once the header is read
        handle.truncate(path.stat().st_size - 2)
    with pytest.raises(OutputError, match="truncated inside tensor 'y'"):
        stored["y"]


def test_an_unknown_framework_is_refused(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", {"x": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="framework must be 'pt' or 'np'"):
        TensorFile(tmp_path / "x.safetensors", framework="tf")


def test_the_stages_that_only_move_tensors_import_neither_torch_nor_transformers():
    # Each import costs seconds of every run's start-up: remap-weights and build-model move numpy arrays, and
    # export loads torch and the modelling code only for a float16/bfloat16 export, whose check runs the model.
    code = (
        "import sys; import stages.remap_weights, stages.build_model, stages.export; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 64 * 3, 64 * 3 + 1, 1000])
def test_sha256_file_is_hashlibs_sha256_of_the_bytes(tmp_path, size):
    # The manifest, publish's check and the dry-run listing all hash with this helper: it is held to hashlib over the
    # whole bytes at once, for files empty, shorter than a chunk, of whole chunks and one byte past them.
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    assert tensor_io.sha256_file(path, chunk_bytes=64) == hashlib.sha256(data).hexdigest()
    assert tensor_io.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_a_write_that_fails_is_reported_with_its_path_and_leaves_nothing(tmp_path, monkeypatch):
    # Any OSError on the way (here the final rename, refused) stops the stage with the path named: never swallowed.
    path = tmp_path / "out" / "report.json"

    def refuse(source, target):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(tensor_io.os, "replace", refuse)
    with pytest.raises(tensor_io.OutputError) as caught:
        tensor_io.write_json(path, {"a": 1})
    assert str(caught.value).startswith(f"{path}: could not write ([Errno 13] Permission denied")
    assert str(caught.value).endswith("; nothing was written there")
    assert list(path.parent.iterdir()) == []


def test_where_hard_links_fail_the_file_is_copied(tmp_path, monkeypatch):
    source, path = tmp_path / "source.bin", tmp_path / "out" / "copy.bin"
    source.write_bytes(bytes(range(256)) * 1000)
    path.parent.mkdir()
    path.write_bytes(b"an older version")

    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(tensor_io.os, "link", cross_device)
    assert tensor_io.link_or_copy(source, path) == "copy"
    assert path.read_bytes() == source.read_bytes() and not path.samefile(source)
    assert sorted(p.name for p in path.parent.iterdir()) == ["copy.bin"]  # no temporary file left


def test_without_a_safe_liveness_probe_every_writer_counts_as_running(monkeypatch):
    # os.kill(pid, 0) is a probe on POSIX only (elsewhere it would end the process): a temp file is then kept.
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    assert tensor_io._running(dead) is False
    monkeypatch.setattr(tensor_io.os, "name", "nt")
    assert tensor_io._running(dead) is True


def test_a_live_writers_temp_file_is_kept_and_the_writer_left_alone(tmp_path):
    path = tmp_path / "model.safetensors"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as writer:
        try:
            live = tmp_path / f".{path.name}.{writer.pid}{tensor_io.TEMP_SUFFIX}"
            live.write_bytes(b"half")
            tensor_io.remove_stale_temps(path)
            assert live.exists()
            with pytest.raises(subprocess.TimeoutExpired):  # still running: the probe sent no signal that ends it
                writer.wait(timeout=0.5)
        finally:
            writer.kill()


def test_another_users_process_counts_as_running(monkeypatch):
    def not_yours(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(tensor_io.os, "kill", not_yours)
    assert tensor_io._running(1) is True


@pytest.mark.parametrize(
    "specs, message",
    [
        ({"a": tensor_io.Spec("F32", (3,))}, "tensor 'a' reads back as F32 [2]"),  # the shape alone differs
        ({"a": tensor_io.Spec("F16", (2,))}, "tensor 'a' reads back as F32 [2]"),  # the dtype alone differs
        ({"a": tensor_io.Spec("F32", (2,)), "b": tensor_io.Spec("F32", (1,))},
         "re-reading found keys ['b'] differing from those written"),
    ],
)
def test_a_file_that_does_not_read_back_as_written_is_refused_by_name(tmp_path, specs, message):
    # The writer's self-check, fed a spec the file does not meet (as a writer bug would leave it).
    path = tmp_path / "t.safetensors"
    tensor_io.write_safetensors(path, {"a": torch.zeros(2)})
    with pytest.raises(tensor_io.OutputError) as caught:
        tensor_io._verify_written(path, specs)
    assert str(caught.value) == f"{path}: {message}"


def test_a_written_file_that_does_not_parse_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(tensor_io.OutputError, match=rf"^{re.escape(str(path))}: the written file does not parse as safetensors \("):
        tensor_io._verify_written(path, {"a": tensor_io.Spec("F32", (2,))})


def test_the_hash_computed_while_writing_many_tensors_is_the_files_hash(tmp_path):
    # Many chunks queued to the hashing thread: they must be hashed one at a time, in the order they were written.
    tensors = {f"t{i:03d}": torch.full((16384,), float(i)) for i in range(200)}
    path = tmp_path / "many.safetensors"
    assert tensor_io.write_safetensors(path, tensors, sha256=True) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_written_file_that_fails_its_read_back_is_removed(tmp_path, monkeypatch):
    def mismatch(path, specs):
        raise tensor_io.OutputError(f"{path}: tensor 'a' reads back as F16 [2]")

    monkeypatch.setattr(tensor_io, "_verify_written", mismatch)
    path = tmp_path / "t.safetensors"
    with pytest.raises(tensor_io.OutputError, match="reads back as F16"):
        tensor_io.write_safetensors(path, {"a": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_json_is_written_the_same_way_every_time(tmp_path):
    # Sorted keys, two-space indentation, UTF-8 text as is, a final newline: the recorded bytes do not depend on the
    # order a stage built its dict in. NaN is not JSON and is refused.
    path = tmp_path / "report.json"
    tensor_io.write_json(path, {"b": [1, 2], "a": "é"})
    assert path.read_bytes() == '{\n  "a": "é",\n  "b": [\n    1,\n    2\n  ]\n}\n'.encode("utf-8")
    with pytest.raises(ValueError):
        tensor_io.write_json(tmp_path / "nan.json", {"x": float("nan")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_hard_link_is_made_where_possible_and_a_failed_rename_leaves_nothing(tmp_path, monkeypatch):
    source, path = tmp_path / "source.bin", tmp_path / "linked.bin"
    source.write_bytes(b"weights")
    assert tensor_io.link_or_copy(source, path) == "link" and path.samefile(source)

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tensor_io.os, "replace", refuse)
    with pytest.raises(tensor_io.OutputError) as caught:
        tensor_io.link_or_copy(source, tmp_path / "other.bin")
    assert str(caught.value) == f"{tmp_path / 'other.bin'}: could not write ([Errno 13] Permission denied); nothing was written there"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linked.bin", "source.bin"]
