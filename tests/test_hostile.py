"""Hostile and broken inputs, end to end through the stages' entry points: every one gets a clear one-line error (exit
code 1, no traceback), nothing half-written at an output path, and no code run from a downloaded file.

Sources are the synthetic clipseg-tiny files, written once for the module, plus damaged copies made per test; network
cases go through tests/http_server.py on 127.0.0.1. Test names carry the row of the issue's table they cover
(row1 ... row13).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import pathlib
import re
import shlex
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from clipseg_pipeline import fetch, inputs
from stages import download, remap_weights
from tools import synthetic
from clipseg_pipeline.inputs import InputError
from clipseg_pipeline.tensor_io import TensorFile
from tests.http_server import Fault, Seen, serve

REPO = Path(__file__).resolve().parents[1]
VARIANT = "clipseg-tiny"
MEMBER = "tiny-uni.pth"
SEED = 0
OUTPUT_FILES = ("original.safetensors", "vocab.json", "merges.txt", "image")
LOCAL_COPY_HINT = "point the `url` of source '{name}' in params.yaml at the local copy"


# --- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # A proxy from the environment would receive the requests meant for 127.0.0.1 and *.invalid.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(autouse=True)
def quick_fetch(monkeypatch):
    """No sleeping between retries, and 1 KiB chunks so that a dropped connection resumes at a known offset."""
    monkeypatch.setattr(download, "FetchPolicy", functools.partial(fetch.FetchPolicy, backoff_s=0, chunk_bytes=1024))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The clipseg-tiny sources (read-only: tests put their damaged copies in their own tmp_path)."""
    directory = tmp_path_factory.mktemp("tiny-sources")
    return synthetic.write_sources(directory, synthetic.preset_arch("tiny"), SEED, decoder_member=MEMBER)


@pytest.fixture
def start():
    """start(files, faults=None) -> LocalServer; every server stops when the test ends."""
    with ExitStack() as stack:
        yield lambda files, faults=None: stack.enter_context(serve(files, faults))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source(path_or_url: Path | str, sha256: str | None = None, member: str | None = None) -> dict:
    """A params.yaml source entry; a local file is pinned to its own hash unless `sha256` says otherwise."""
    if sha256 is None and isinstance(path_or_url, Path):
        sha256 = sha256_of(path_or_url)
    entry = {"url": str(path_or_url), "sha256": sha256}
    if member:
        entry["member"] = member
    return entry


def tiny_sources(tiny: dict[str, Path], **replace: dict) -> dict[str, dict]:
    """The tiny variant's sources read in place and pinned, with some entries replaced."""
    entries = {name: source(tiny[name]) for name in ("clip", "vocab", "merges", "image")}
    entries["decoder"] = source(tiny["decoder"], member=MEMBER)
    return entries | replace


@functools.cache
def repository_params() -> str:
    return (REPO / "params.yaml").read_text(encoding="utf-8")


def load_yaml(text: str) -> dict:
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml when present: quicker


def dump_yaml(data: dict) -> str:
    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


def write_params(tmp_path: Path, sources: dict[str, dict], *, download_params: dict | None = None, model: dict | None = None) -> Path:
    """The repository's params.yaml building only clipseg-tiny from `sources` (the generator's tiny preset, whose
    architecture it declares); `model` updates the variant's sections."""
    data = load_yaml(repository_params())
    data["variants"] = [VARIANT]
    data["download"].update(download_params or {})
    data["models"][VARIANT]["sources"] = sources
    data["models"][VARIANT]["architecture"] = synthetic.preset_arch("tiny")
    for section, changes in (model or {}).items():
        data["models"][VARIANT][section].update(changes)
    path = tmp_path / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(data), encoding="utf-8")
    return path


def download_argv(tmp_path: Path, params: Path) -> list[str]:
    return [
        "--variant", VARIANT, "--params", str(params), "--out", str(tmp_path / "out"),
        "--cache", str(tmp_path / "cache"), "--metrics", str(tmp_path / "metrics.json"),
        "--report", str(tmp_path / "report.json"), "--no-progress",
    ]  # fmt: skip


def run_download(tmp_path: Path, sources: dict[str, dict], **params) -> int:
    return download.main(download_argv(tmp_path, write_params(tmp_path, sources, **params)))


def error_line(capsys, stage: str = "download") -> str:
    """The one error line a failed stage printed; asserts there is exactly one and no traceback."""
    err = capsys.readouterr().err
    prefix = f"{stage} {VARIANT}: error: "
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0].removeprefix(prefix)


def refused(tmp_path: Path, capsys, sources: dict[str, dict], *patterns: str, **params) -> str:
    """Run the download stage, expect exit code 1 with one error line matching every pattern, and no output."""
    code = run_download(tmp_path, sources, **params)
    line = error_line(capsys)
    assert code == 1
    for pattern in patterns:
        assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    assert_no_output(tmp_path)
    return line


def assert_no_output(tmp_path: Path) -> None:
    """Nothing written to the output folder (not even a temporary file), no report."""
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    assert not (tmp_path / "report.json").exists()


def assert_downloaded(tmp_path: Path, capsys) -> None:
    err = capsys.readouterr().err
    assert "error" not in err, err
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)  # and no temporary file
    assert len(TensorFile(out / "original.safetensors")) > 0


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial")))


def decoder_state(**arch_changes) -> dict[str, torch.Tensor]:
    arch = synthetic.preset_arch("tiny") | arch_changes
    return synthetic.decoder_state_dict(arch, SEED)


def decoder_zip(path: Path, state: dict[str, torch.Tensor], member: str = MEMBER) -> Path:
    synthetic.write_decoder_zip(state, path, member)
    return path


def saved(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def zip_with(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=synthetic.ZIP_TIME), data, compress_type=compression)
    return path


def member_bytes(tiny: dict[str, Path]) -> bytes:
    with zipfile.ZipFile(tiny["decoder"]) as archive:
        return archive.read(f"clipseg_weights/{MEMBER}")


# --- row 1: a download whose sha256 differs from the pin -----------------------------------------


def test_row1_hash_mismatch_over_http_names_everything_and_keeps_nothing(tmp_path, capsys, start, tiny):
    data = tiny["clip"].read_bytes()
    server = start({"/ViT-B-16.pt": data})
    url = server.url("/ViT-B-16.pt")
    pin, actual = "0" * 64, hashlib.sha256(data).hexdigest()
    refused(
        tmp_path, capsys, tiny_sources(tiny, clip=source(url, pin)),
        rf"^source 'clip' \({re.escape(url)}\): sha256 mismatch: expected {pin}, got {actual}; the download was deleted",
        re.escape(LOCAL_COPY_HINT.format(name="clip")),
    )  # fmt: skip
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing a later run could trust
    # With the right pin the next run downloads it again and succeeds.
    assert run_download(tmp_path, tiny_sources(tiny, clip=source(url, actual))) == 0
    assert_downloaded(tmp_path, capsys)
    assert server.requests == [Seen("/ViT-B-16.pt", None)] * 2


def test_row1_hash_mismatch_of_a_local_copy_keeps_the_users_file(tmp_path, capsys, tiny):
    local = tmp_path / "mirror" / "clip.pt"
    local.parent.mkdir()
    local.write_bytes(tiny["clip"].read_bytes())
    pin = "f" * 64
    refused(
        tmp_path, capsys, tiny_sources(tiny, clip=source(local, pin)),
        rf"^source 'clip' \({re.escape(str(local))}\): sha256 mismatch in .*: expected {pin}, got {sha256_of(local)}\. "
        r"Replace the file .* update the sha256 pin in params\.yaml",
    )  # fmt: skip
    assert local.read_bytes() == tiny["clip"].read_bytes()


# --- row 2: a connection dropped mid-file ----------------------------------------------------------

DROP = 3 * 1024  # a chunk boundary (see quick_fetch): the resume point is predictable


def test_row2_a_dropped_connection_is_resumed_with_a_range_request(tmp_path, capsys, start, tiny):
    server = start({"/clip.pt": tiny["clip"].read_bytes()}, {"/clip.pt": Fault(drop_after=DROP, times=1)})
    assert run_download(tmp_path, tiny_sources(tiny, clip=source(server.url("/clip.pt"), sha256_of(tiny["clip"])))) == 0
    assert_downloaded(tmp_path, capsys)
    assert server.requests == [Seen("/clip.pt", None), Seen("/clip.pt", f"bytes={DROP}-")]
    assert leftovers(tmp_path) == []


def test_row2_a_server_ignoring_range_is_read_from_the_start(tmp_path, capsys, start, tiny):
    fault = Fault(drop_after=DROP, times=1, ignore_range=True)
    server = start({"/clip.pt": tiny["clip"].read_bytes()}, {"/clip.pt": fault})
    assert run_download(tmp_path, tiny_sources(tiny, clip=source(server.url("/clip.pt"), sha256_of(tiny["clip"])))) == 0
    assert_downloaded(tmp_path, capsys)
    assert server.requests == [Seen("/clip.pt", None), Seen("/clip.pt", f"bytes={DROP}-")]  # answered 200: whole file


def test_row2_gives_up_after_bounded_retries_naming_the_url(tmp_path, capsys, start, tiny):
    server = start({"/clip.pt": tiny["clip"].read_bytes()}, {"/clip.pt": Fault(drop_after=DROP)})
    url = server.url("/clip.pt")
    refused(
        tmp_path, capsys, tiny_sources(tiny, clip=source(url, sha256_of(tiny["clip"]))),
        rf"^source 'clip' \({re.escape(url)}\): gave up after 3 attempts \(last: connection dropped",
        r"raise download.timeout_s / download.retries in params.yaml", re.escape(LOCAL_COPY_HINT.format(name="clip")),
        download_params={"retries": 2},
    )  # fmt: skip
    assert len(server.requests) == 3


# --- row 3: HTTP errors, timeouts and unknown hosts --------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "files, fault, problem",
    [
        ({}, None, r"the server answered HTTP 404 Not Found\. Check the URL in params\.yaml"),
        ({"/image.jpg": b"x"}, Fault(status=500), r"gave up after 2 attempts \(last: HTTP 500 Internal Server Error\)"),
        ({"/image.jpg": b"x"}, Fault(delay_s=5), r"gave up after 2 attempts \(last: no response within 0\.2 s\)"),
    ],
    ids=["404", "500", "timeout"],
)
def test_row3_http_failures_name_the_source_url_and_the_local_copy_way_out(tmp_path, capsys, start, tiny, files, fault, problem):
    server = start(files, {"/image.jpg": fault} if fault else None)
    url = server.url("/image.jpg")
    refused(
        tmp_path, capsys, tiny_sources(tiny, image=source(url, sha256_of(tiny["image"]))),
        rf"^source 'image' \({re.escape(url)}\): {problem}", re.escape(LOCAL_COPY_HINT.format(name="image")),
        download_params={"retries": 1, "timeout_s": 0.2},
    )  # fmt: skip


@pytest.mark.parametrize(
    "host, why", [("clipseg-mirror.invalid", "the name does not resolve"), ("127.0.0.1:{port}", "connection refused")]
)
def test_row3_unreachable_hosts(tmp_path, capsys, tiny, host, why):
    host = host.format(port=closed_port())
    url = f"http://{host}/weights.zip"
    refused(
        tmp_path, capsys, tiny_sources(tiny, decoder=source(url, "0" * 64, MEMBER)),
        rf"^source 'decoder' \({re.escape(url)}\): could not reach host {re.escape(host)} \({why}\)\.",
        re.escape(LOCAL_COPY_HINT.format(name="decoder")),
    )  # fmt: skip


# --- row 4: a corrupt zip, a missing member, unsafe member paths ------------------------------------


def test_row4_a_truncated_zip(tmp_path, capsys, tiny):
    bad = tmp_path / "bad" / "weights.zip"
    bad.parent.mkdir()
    bad.write_bytes(tiny["decoder"].read_bytes()[:-200])  # the member directory sits at the end
    refused(
        tmp_path, capsys, tiny_sources(tiny, decoder=source(bad, member=MEMBER)),
        rf"expected a zip archive holding '{MEMBER}', found a damaged zip archive \(its member directory is missing",
    )  # fmt: skip


def test_row4_a_zip_with_damaged_member_data_lists_the_members(tmp_path, capsys, tiny):
    damaged = bytearray(tiny["decoder"].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    bad = tmp_path / "bad" / "weights.zip"
    bad.parent.mkdir()
    bad.write_bytes(bytes(damaged))
    refused(
        tmp_path, capsys, tiny_sources(tiny, decoder=source(bad, member=MEMBER)),
        rf"member 'clipseg_weights/{MEMBER}' cannot be unpacked: the zip archive is corrupt or unsupported \(Bad CRC-32",
        rf"members: \['clipseg_weights/{MEMBER}'\]",
    )  # fmt: skip
    assert leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize(
    "members, problem",
    [
        ({"clipseg_weights/rd64-uni.pth": b"x", "clipseg_weights/rd16-uni.pth": b"x"}, f"no member named '{MEMBER}'"),
        ({f"a/{MEMBER}": b"x", f"b/{MEMBER}": b"x"}, f"2 members named '{MEMBER}'"),
    ],
    ids=["missing", "ambiguous"],
)
def test_row4_the_member_must_be_there_once(tmp_path, capsys, tiny, members, problem):
    bad = zip_with(tmp_path / "bad" / "weights.zip", members)
    listed = re.escape(str(list(members)))
    refused(
        tmp_path, capsys, tiny_sources(tiny, decoder=source(bad, member=MEMBER)),
        rf"{problem}; members: {listed}\. Set the source's `member` in params.yaml",
    )  # fmt: skip


@pytest.mark.parametrize(
    "unsafe",
    [f"../{MEMBER}", f"clipseg_weights/../../{MEMBER}", "{tmp}/escaped/" + MEMBER, f"..\\{MEMBER}", f"C:/{MEMBER}"],
    ids=["dotdot", "nested-dotdot", "absolute", "backslash-dotdot", "drive"],
)
def test_row4_unsafe_member_paths_are_refused_and_nothing_escapes(tmp_path, capsys, tiny, unsafe):
    unsafe = unsafe.format(tmp=tmp_path)
    payload = member_bytes(tiny)
    bad = zip_with(tmp_path / "bad" / "weights.zip", {unsafe: payload, f"clipseg_weights/{MEMBER}": payload})
    listed = re.escape(str([unsafe, f"clipseg_weights/{MEMBER}"]))
    refused(
        tmp_path, capsys, tiny_sources(tiny, decoder=source(bad, member=MEMBER)),
        rf"refusing an archive with unsafe member paths \[{re.escape(repr(unsafe))}\]; members: {listed}",
    )  # fmt: skip
    assert list(tmp_path.rglob(MEMBER)) == []  # neither extracted nor escaped (the absolute case points in tmp_path)


# --- row 5: decompression bombs and oversized files -------------------------------------------------

BOMB_BYTES = 20_000_000  # zeros: deflate to about 20 kB
BOUND = 1_000_000


def test_row5_a_member_larger_than_the_bound_is_refused_before_unpacking(tmp_path, capsys, tiny):
    bomb = zip_with(tmp_path / "bad" / "weights.zip", {f"clipseg_weights/{MEMBER}": bytes(BOMB_BYTES)}, zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 100_000
    refused(
        tmp_path, capsys, tiny_sources(tiny, decoder=source(bomb, member=MEMBER)),
        rf"member 'clipseg_weights/{MEMBER}' unpacks to {BOMB_BYTES} bytes, above the bound {BOUND} "
        r"\(params: download.max_member_bytes\); refusing a possible decompression bomb",
        download_params={"max_member_bytes": BOUND},
    )  # fmt: skip
    assert not (tmp_path / "cache").exists() or not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def lying_zip(path: Path, declared: int, fix_crc: bool) -> Path:
    """A zip whose one member unpacks to BOMB_BYTES while both its headers say `declared` bytes."""
    zip_with(path, {f"clipseg_weights/{MEMBER}": bytes(BOMB_BYTES)}, zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    crc = zlib.crc32(bytes(declared))
    # The uncompressed size sits at offset 22 of the local header and 24 of the central directory entry; the CRC at
    # 14 and 16.
    for signature, size_at, crc_at in ((b"PK\x03\x04", 22, 14), (b"PK\x01\x02", 24, 16)):
        at = data.index(signature)
        struct.pack_into("<I", data, at + size_at, declared)
        if fix_crc:
            struct.pack_into("<I", data, at + crc_at, crc)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "fix_crc, problem",
    [
        (False, r"cannot be unpacked: the zip archive is corrupt or unsupported \(Bad CRC-32"),
        (True, r"expected the CLIPSeg decoder weights \(a torch.save state dict, zip format\), found an unrecognised file "
               r"starting with bytes 0000"),
    ],
    ids=["crc-of-the-real-data", "crc-of-the-declared-data"],
)
def test_row5_a_member_whose_header_lies_never_unpacks_past_its_declared_size(tmp_path, capsys, tiny, fix_crc, problem):
    bomb = lying_zip(tmp_path / "bad" / "weights.zip", declared=1000, fix_crc=fix_crc)
    with zipfile.ZipFile(bomb) as archive:
        assert archive.infolist()[0].file_size == 1000
    refused(
        tmp_path, capsys, tiny_sources(tiny, decoder=source(bomb, member=MEMBER)), problem,
        download_params={"max_member_bytes": BOUND},
    )  # fmt: skip
    # Either refused while unpacking (nothing kept) or unpacked to the 1000 declared bytes, never to 20 MB.
    extracted = list((tmp_path / "cache").rglob(MEMBER))
    assert all(p.stat().st_size <= 1000 for p in extracted)
    assert leftovers(tmp_path / "cache") == []


def test_row5_a_checkpoint_whose_members_unpack_past_the_bound(tmp_path, capsys, tiny):
    """A .pth is itself a zip: torch would allocate what its directory declares, so that is bounded first."""
    plain = saved(tmp_path / "plain.pth", {"film_mul.weight": torch.zeros(BOMB_BYTES // 4)})
    bomb = tmp_path / "bad" / MEMBER
    bomb.parent.mkdir()
    with zipfile.ZipFile(plain) as source_zip, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as bomb_zip:
        for info in source_zip.infolist():
            bomb_zip.writestr(info.filename, source_zip.read(info))
    assert bomb.stat().st_size < 100_000
    refused(
        tmp_path, capsys, tiny_sources(tiny, decoder=source(bomb)),
        rf"the checkpoint unpacks to \d{{8}} bytes, above the bound {BOUND} \(params: download.max_bytes\); refusing",
        download_params={"max_bytes": BOUND},
    )  # fmt: skip


def test_row5_a_tokenizer_gz_that_unpacks_past_the_bound(tmp_path, capsys, tiny):
    import gzip

    bomb = tmp_path / "bad" / "bpe_simple_vocab_16e6.txt.gz"
    bomb.parent.mkdir()
    bomb.write_bytes(gzip.compress(b'"bpe_simple_vocab_16e6.txt#version: 0.2\n' + b"a b\n" * (BOMB_BYTES // 4)))
    sources = tiny_sources(tiny, bpe=source(bomb))
    del sources["vocab"], sources["merges"]
    refused(
        tmp_path, capsys, sources, rf"unpacks past the bound {BOUND} bytes \(params: download.max_member_bytes\)",
        download_params={"max_member_bytes": BOUND},
    )  # fmt: skip


@pytest.mark.parametrize("over_http", [False, True], ids=["local", "http-without-length"])
def test_row5_a_file_larger_than_max_bytes(tmp_path, capsys, start, tiny, over_http):
    data = tiny["clip"].read_bytes()
    bound = len(data) - 1
    url = str(tiny["clip"])
    if over_http:
        url = start({"/clip.pt": data}, {"/clip.pt": Fault(omit_length=True)}).url("/clip.pt")
    refused(
        tmp_path, capsys, tiny_sources(tiny, clip=source(url, sha256_of(tiny["clip"]))),
        rf"^source 'clip' \({re.escape(url)}\): the file is (over )?\S+ bytes.*larger than the bound {bound} "
        r"\(params: download.max_bytes\); nothing was kept",
        download_params={"max_bytes": bound},
    )  # fmt: skip
    assert leftovers(tmp_path) == []


# --- row 6: pickles that would run code ------------------------------------------------------------


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def armed(path: Path, marker: Path, state: dict[str, torch.Tensor]) -> Path:
    """`state` saved with torch.save, plus an entry whose unpickling would run the payload."""
    return saved(path, {**state, "extra": Payload(marker)})


def test_row6_the_payload_is_live(tmp_path):
    """The control: an unguarded torch.load does run it, so the refusals below are meaningful."""
    marker = tmp_path / "ran"
    armed(tmp_path / "evil.pth", marker, {"film_mul.weight": torch.zeros(2)})
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("as_source", ["decoder-in-zip", "decoder-bare", "clip-pinned", "clip-unpinned"])
def test_row6_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, capsys, tiny, as_source):
    marker = tmp_path / "payload-ran"
    if as_source.startswith("decoder"):
        evil = armed(tmp_path / "bad" / MEMBER, marker, decoder_state())
        if as_source == "decoder-in-zip":
            payload = evil.read_bytes()
            evil = zip_with(tmp_path / "bad" / "weights.zip", {f"clipseg_weights/{MEMBER}": payload})
        replace = {"decoder": source(evil, member=MEMBER if as_source == "decoder-in-zip" else None)}
    else:
        evil = armed(tmp_path / "bad" / "clip.pt", marker, synthetic.clip_state_dict(synthetic.preset_arch("tiny"), SEED))
        replace = {"clip": {"url": str(evil), "sha256": None if as_source == "clip-unpinned" else sha256_of(evil)}}
    what = "the CLIPSeg decoder weights" if as_source.startswith("decoder") else "OpenAI's CLIP weights"
    with pytest.warns(UserWarning, match="is not pinned") if as_source == "clip-unpinned" else contextlib.nullcontext():
        refused(
            tmp_path, capsys, tiny_sources(tiny, **replace),
            rf"refused to read {what}: its pickle is damaged or asks for code or objects beyond plain tensors "
            r"\(Trying to load unsupported GLOBAL \w+\.system .*\)\. Nothing from it was run",
        )  # fmt: skip
    assert not marker.exists()


def test_row6_a_legacy_pickle_is_refused_before_it_is_parsed(tmp_path, capsys, tiny):
    import pickle

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "bad" / MEMBER
    evil.parent.mkdir()
    evil.write_bytes(pickle.dumps({"film_mul.weight": Payload(marker)}, protocol=2))
    refused(
        tmp_path, capsys, tiny_sources(tiny, decoder=source(evil)),
        r"found a legacy \(non-zip\) torch/pickle file \(re-save it with torch >= 1.6",
    )  # fmt: skip
    assert not marker.exists()


def test_row6_an_unpinned_torchscript_archive_is_refused_before_torchscript_sees_it(tmp_path, capsys, tiny, monkeypatch):
    loaded = []
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: loaded.append(args))
    with pytest.warns(UserWarning, match="source 'clip' of clipseg-tiny is not pinned"):
        refused(
            tmp_path, capsys, tiny_sources(tiny, clip={"url": str(tiny["clip"]), "sha256": None}),
            r"a TorchScript archive is only loaded when its sha256 is pinned \(TorchScript loading compiles code from "
            r"the file\)\. Set the clip source's `sha256` in params.yaml",
        )  # fmt: skip
    assert loaded == []


# --- row 7: files of the wrong kind ----------------------------------------------------------------

HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def wrong_file(tmp_path: Path, tiny: dict[str, Path], kind: str) -> Path:
    path = tmp_path / "bad" / f"{kind}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "html":
        path.write_bytes(HTML)
    elif kind == "random":
        path.write_bytes(bytes(range(7, 256)) * 8)
    elif kind == "torchscript":
        path.write_bytes(tiny["clip"].read_bytes())
    elif kind == "decoder-state-dict":
        saved(path, decoder_state())
    elif kind == "weights-zip":
        path.write_bytes(tiny["decoder"].read_bytes())
    return path


@pytest.mark.parametrize(
    "name, kind, problem",
    [
        ("clip", "html", r"expected OpenAI's CLIP weights \(a TorchScript archive or a torch.save state dict\), found an HTML "
         r"or XML page \(a server's error or login page saved as the file\?\)"),
        ("clip", "random", r"expected OpenAI's CLIP weights .*, found an unrecognised file starting with bytes 0708090a"),
        ("clip", "decoder-state-dict", r"not an OpenAI CLIP checkpoint: no 'visual.conv1.weight' among its keys \(it holds "
         r"CLIPSeg decoder keys: is the decoder file configured as clip\?\)"),
        ("clip", "weights-zip", rf"expected OpenAI's CLIP weights .*, found a zip archive with members \['clipseg_weights/{MEMBER}'\]"),
        ("decoder", "html", r"expected the CLIPSeg decoder weights \(a torch.save state dict, zip format\), found an HTML or XML page"),
        ("decoder", "random", r"expected the CLIPSeg decoder weights .*, found an unrecognised file starting with bytes 0708090a"),
        ("decoder", "torchscript", r"expected the CLIPSeg decoder as a torch.save state dict, found a TorchScript archive "
         r"\(is the CLIP file configured as the decoder\?\)"),
        ("decoder", "weights-zip", r"found a zip archive with members .*set the decoder source's `member` in params.yaml"),
        ("decoder-in-zip", "html", rf"expected a zip archive holding '{MEMBER}', found an HTML or XML page"),
        ("decoder-in-zip", "random", rf"expected a zip archive holding '{MEMBER}', found an unrecognised file"),
        ("image", "html", r"not a readable image \(cannot identify image file"),
        ("vocab", "html", r"expected a CLIP vocab.json \(a JSON object of token -> id\), could not parse it"),
        ("merges", "html", r"expected a merges.txt starting with '#version', found '<!DOCTYPE html>'"),
    ],
)
def test_row7_a_file_of_the_wrong_kind_says_what_was_expected_and_found(tmp_path, capsys, tiny, name, kind, problem):
    wrong = wrong_file(tmp_path, tiny, kind)
    entry = source(wrong, member=MEMBER if name == "decoder-in-zip" else None)
    line = refused(tmp_path, capsys, tiny_sources(tiny, **{name.removesuffix("-in-zip"): entry}), problem)
    assert line.startswith(f"{wrong}: ")  # the file is named


def test_row7_a_plain_clip_state_dict_is_accepted_like_the_torchscript_archive(tmp_path, capsys, tiny):
    """OpenAI's loader falls back to a state dict; so does this one, with the same tensors and no code run."""
    assert run_download(tmp_path / "a", tiny_sources(tiny)) == 0
    plain = saved(tmp_path / "plain" / "clip.pt", synthetic.clip_state_dict(synthetic.preset_arch("tiny"), SEED))
    assert run_download(tmp_path / "b", tiny_sources(tiny, clip=source(plain))) == 0
    a, b = TensorFile(tmp_path / "a" / "out" / "original.safetensors"), TensorFile(tmp_path / "b" / "out" / "original.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_row7_a_tokenizer_pair_that_does_not_belong_together(tmp_path, capsys, tiny):
    merges = tmp_path / "bad" / "merges.txt"
    merges.parent.mkdir()
    merges.write_text("#version: 0.2\nq z\n", encoding="utf-8")
    refused(
        tmp_path, capsys, tiny_sources(tiny, merges=source(merges)),
        r"merges.txt: line 2 is 'q z', expected two tokens of .*vocab.json whose join is one too; the vocab and merges "
        r"files do not belong together",
    )  # fmt: skip


# --- row 8: unknown, missing, misshapen or non-finite tensors ---------------------------------------


@pytest.mark.parametrize(
    "name, key, value", [("decoder", "film_add.bias", float("nan")), ("clip", "visual.proj", float("-inf"))], ids=["nan", "inf"]
)
def test_row8_nan_or_inf_is_refused_at_download(tmp_path, capsys, tiny, name, key, value):
    if name == "decoder":
        state = decoder_state()
        state[key][3] = value
        replace = source(decoder_zip(tmp_path / "bad" / "weights.zip", state), member=MEMBER)
    else:
        state = synthetic.clip_state_dict(synthetic.preset_arch("tiny"), SEED)
        state[key][0, 1] = value  # visual.proj is fp16 in OpenAI's file
        path = tmp_path / "bad" / "clip.pt"
        synthetic.write_clip_torchscript(state, path)
        replace = source(path)
    refused(
        tmp_path, capsys, tiny_sources(tiny, **{name: replace}),
        rf"^source '{name}' \(.*\): tensor\(s\) with NaN or Inf values: \['{re.escape(key)}'\]\. The checkpoint is damaged",
    )  # fmt: skip


def remap_argv(tmp_path: Path) -> list[str]:
    return [
        "--variant", VARIANT, "--params", str(tmp_path / "params.yaml"),
        "--original", str(tmp_path / "out" / "original.safetensors"),
        "--out", str(tmp_path / "remapped" / "remapped.safetensors"), "--metrics", str(tmp_path / "remap.metrics.json"),
        "--report", str(tmp_path / "remap.json"),
    ]  # fmt: skip


def remap_refuses(tmp_path: Path, capsys, tiny, decoder: dict[str, torch.Tensor], *patterns: str, model: dict | None = None) -> None:
    """The download stage takes the decoder as it is; remap-weights refuses it with exit code 1 and writes nothing."""
    bad = decoder_zip(tmp_path / "bad" / "weights.zip", decoder)
    params = write_params(tmp_path, tiny_sources(tiny, decoder=source(bad, member=MEMBER)), model=model)
    assert download.main(download_argv(tmp_path, params)) == 0
    capsys.readouterr()
    assert remap_weights.main(remap_argv(tmp_path)) == 1
    line = error_line(capsys, "remap-weights")
    for pattern in patterns:
        assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    assert not (tmp_path / "remapped").exists() or not any((tmp_path / "remapped").iterdir())
    assert not (tmp_path / "remap.json").exists()


def test_row8_an_unknown_key(tmp_path, capsys, tiny):
    remap_refuses(
        tmp_path, capsys, tiny, decoder_state() | {"prompt_adapter.weight": torch.zeros(3)},
        r"unknown key\(s\) \['prompt_adapter.weight'\]", r"does not match models.clipseg-tiny.architecture",
    )  # fmt: skip


def test_row8_missing_keys(tmp_path, capsys, tiny):
    state = decoder_state()
    del state["blocks.1.norm2.bias"], state["reduces.2.weight"]
    remap_refuses(tmp_path, capsys, tiny, state, r"missing key\(s\) \['blocks.1.norm2.bias', 'reduces.2.weight'\]")


def test_row8_a_wrong_shape(tmp_path, capsys, tiny):
    state = decoder_state()
    state["blocks.0.linear1.weight"] = torch.zeros(65, 16)
    remap_refuses(tmp_path, capsys, tiny, state, r"wrong shape\(s\) \['blocks.0.linear1.weight: expected \[64, 16\], found \[65, 16\]'\]")


# --- row 9: a decoder of one variant configured as another -----------------------------------------


def test_row9_a_decoder_of_another_width_names_reduce_dim(tmp_path, capsys, tiny):
    remap_refuses(
        tmp_path, capsys, tiny, decoder_state(reduce_dim=32),
        r"the decoder has reduce_dim 32 \(film_mul.weight \[32, 16\]\) but models.clipseg-tiny.architecture.reduce_dim is 16: "
        r"set it to 32",
    )  # fmt: skip


def test_row9_a_refined_decoder_under_a_plain_variant(tmp_path, capsys, tiny):
    remap_refuses(
        tmp_path, capsys, tiny, decoder_state(use_complex_transposed_convolution=True),
        r"the decoder is a refined one \(trans_conv.0/2/4\) but models.clipseg-tiny.architecture."
        r"use_complex_transposed_convolution is false: set it to true",
    )  # fmt: skip


def test_row9_a_plain_decoder_under_a_refined_variant(tmp_path, capsys, tiny):
    remap_refuses(
        tmp_path, capsys, tiny, decoder_state(),
        r"has a plain trans_conv but .*use_complex_transposed_convolution is true: set it to false",
        model={"architecture": {"use_complex_transposed_convolution": True}},
    )  # fmt: skip


# --- row 10: bad params, refused before any work ---------------------------------------------------


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda d: d.update(variants=["clipseg-rd32"]), r"`variants` lists \['clipseg-rd32'\]; allowed variants: \[.*'clipseg-tiny'\]"),
        (lambda d: d["models"][VARIANT]["architecture"].update(reduce_dim="16"), r"reduce_dim` must be an integer, found '16'"),
        (lambda d: d["download"].pop("max_bytes"), r"`download` lacks \['max_bytes'\]"),
        (lambda d: d["models"][VARIANT]["sources"]["clip"].update(mirror="x"), r"unknown key\(s\) \['mirror'\] in `models.clipseg-tiny.sources.clip`; allowed: \['member', 'sha256', 'url'\]"),
        (lambda d: d["download"].update(max_bytes=0), r"`download.max_bytes` must be 1 or more, found 0"),
    ],
    ids=["unknown-variant", "wrong-type", "missing-field", "unknown-key", "zero-bound"],
)
def test_row10_bad_params_are_refused_before_any_work(tmp_path, capsys, start, tiny, edit, problem):
    server = start({"/clip.pt": tiny["clip"].read_bytes()})
    params = write_params(tmp_path, tiny_sources(tiny, clip=source(server.url("/clip.pt"), sha256_of(tiny["clip"]))))
    data = load_yaml(params.read_text(encoding="utf-8"))
    edit(data)
    params.write_text(dump_yaml(data), encoding="utf-8")
    assert download.main(download_argv(tmp_path, params)) == 1
    assert re.search(problem, error_line(capsys))
    assert server.requests == []  # nothing fetched
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_row10_an_unknown_variant_on_the_command_line(tmp_path, capsys, tiny):
    params = write_params(tmp_path, tiny_sources(tiny))
    argv = download_argv(tmp_path, params)
    argv[argv.index(VARIANT)] = "clipseg-rd32"
    assert download.main(argv) == 1
    err = capsys.readouterr().err
    assert "download clipseg-rd32: error: params.yaml: unknown variant 'clipseg-rd32'; the variants under `models` are [" in err
    assert not (tmp_path / "out").exists()


# --- row 11: a stage killed mid-write --------------------------------------------------------------

# Runs the download stage, stalling halfway through writing original.safetensors until it is killed.
STALLING_DOWNLOAD = """
import contextlib, sys, time
from pathlib import Path
from clipseg_pipeline import tensor_io
from stages import download

ready = Path(sys.argv[1])
real_atomic_output = tensor_io.atomic_output


class Stalling:
    def __init__(self, handle):
        self.handle, self.writes = handle, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:  # the size, the header, then the first tensor: write half of it and wait
            self.handle.write(bytes(data)[: len(data) // 2])
            self.handle.flush()
            ready.touch()
            time.sleep(120)
        return self.handle.write(data)


@contextlib.contextmanager
def stalling_output(path, mode="wb"):
    with real_atomic_output(path, mode) as handle:
        yield Stalling(handle) if Path(path).name == "original.safetensors" else handle


tensor_io.atomic_output = stalling_output
sys.exit(download.main(sys.argv[2:]))
"""


def test_row11_a_stage_killed_mid_write_leaves_no_partial_output_and_the_rerun_succeeds(tmp_path, capsys, tiny):
    params = write_params(tmp_path, tiny_sources(tiny))
    ready = tmp_path / "ready"
    with (tmp_path / "stage.err").open("wb") as stage_err:
        stage = subprocess.Popen(
            [sys.executable, "-c", STALLING_DOWNLOAD, str(ready), *download_argv(tmp_path, params)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stage_err,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert stage.poll() is None, (tmp_path / "stage.err").read_text()
            assert time.monotonic() < deadline, "the stage never reached original.safetensors"
            time.sleep(0.05)
    finally:
        stage.kill()  # SIGKILL: no handler, no cleanup
        stage.wait()
    out = tmp_path / "out"
    assert not (out / "original.safetensors").exists()
    assert leftovers(out) == [f".original.safetensors.{stage.pid}.tmp"]  # killed mid-write indeed
    assert run_download(tmp_path, tiny_sources(tiny)) == 0
    assert_downloaded(tmp_path, capsys)  # including: the killed run's temporary file is gone
    assert leftovers(tmp_path) == []


class FailingHandle:
    """A file handle that raises `error` once `budget[0]` bytes (a budget shared by every handle) are written."""

    def __init__(self, handle, budget: list[int], error: BaseException):
        self._handle, self._budget, self._error = handle, budget, error

    def write(self, data) -> int:
        data = data if isinstance(data, str) else bytes(data)
        if len(data) > self._budget[0]:
            self._handle.write(data[: self._budget[0]])
            self._budget[0] = 0
            raise self._error
        self._budget[0] -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


def fail_atomic_writes_after_the_side_files(monkeypatch, tiny, error: BaseException) -> None:
    """Every atomic write goes through os.fdopen: let the extracted decoder and the side files through, then fail."""
    fitting = len(member_bytes(tiny)) + sum(tiny[name].stat().st_size for name in ("vocab", "merges", "image"))
    budget = [fitting + 5000]  # original.safetensors is larger
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *args, **kwargs: FailingHandle(real_fdopen(fd, *args, **kwargs), budget, error))


def test_row11_an_interrupt_mid_write_leaves_nothing_half_written(tmp_path, capsys, tiny, monkeypatch):
    with monkeypatch.context() as patched:
        fail_atomic_writes_after_the_side_files(patched, tiny, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            run_download(tmp_path, tiny_sources(tiny))
    assert not (tmp_path / "out" / "original.safetensors").exists()
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "report.json").exists()
    assert run_download(tmp_path, tiny_sources(tiny)) == 0
    assert_downloaded(tmp_path, capsys)


# --- row 12: the disk fills up ---------------------------------------------------------------------


def test_row12_disk_full_while_writing_an_output(tmp_path, capsys, tiny, monkeypatch):
    fail_atomic_writes_after_the_side_files(monkeypatch, tiny, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    code = run_download(tmp_path, tiny_sources(tiny))
    line = error_line(capsys)
    assert code == 1
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'out' / 'original.safetensors'))}: the disk is full \(No space left on "
                        r"device\); free some space and run the stage again", line)
    assert not (tmp_path / "out" / "original.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_row12_disk_full_while_downloading(tmp_path, capsys, start, tiny, monkeypatch):
    budget = [DROP]
    real_open = pathlib.Path.open

    def open_partial(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return FailingHandle(handle, budget, full) if self.name.endswith(".partial") else handle

    server = start({"/clip.pt": tiny["clip"].read_bytes()})
    url = server.url("/clip.pt")
    with monkeypatch.context() as patched:
        patched.setattr(pathlib.Path, "open", open_partial)
        refused(
            tmp_path, capsys, tiny_sources(tiny, clip=source(url, sha256_of(tiny["clip"]))),
            rf"^source 'clip' \({re.escape(url)}\): the disk holding .* is full \(No space left on device\)\. Free some "
            r"space and run again: a download resumes from the bytes already received\.",
        )  # fmt: skip
    assert run_download(tmp_path, tiny_sources(tiny, clip=source(url, sha256_of(tiny["clip"])))) == 0
    assert_downloaded(tmp_path, capsys)
    assert server.requests[-1] == Seen("/clip.pt", f"bytes={DROP}-")  # resumed after space was freed


# --- row 13: prompts and images --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return inputs.tokenizer(tiny["vocab"].parent)


def test_row13_a_huge_prompt_is_cut_to_the_context_keeping_the_end_token(tokenizer):
    ids = inputs.token_ids(tokenizer, ["a cat on a blanket " * 2000, "a cat"])
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert ids["input_ids"].shape == (2, inputs.CONTEXT_LENGTH)
    assert ids["input_ids"][0, -1] == end and ids["attention_mask"][0].all()
    assert ids["input_ids"][1, 3] == end and ids["attention_mask"][1].sum() == 4


@pytest.mark.parametrize(
    "prompts, problem",
    [
        ([b"a \xff\xfe cat"], r"prompt 0 \(b'a \\xff\\xfe cat'\) is not UTF-8 text \(invalid start byte at byte 2\); write prompts as UTF-8"),
        (["a cat", "a \udcff cat"], r"prompt 1 \('a \\udcff cat'\) holds characters that are not text \(surrogates not allowed\)"),
        ([], r"no prompts given; pass at least one prompt text"),
        (["a cat", " "], r"prompt 1 is ' '; every prompt must be a non-empty text"),
        ([None], r"prompt 0 is None"),
        ("a cat", r"expected a list of prompts, got the single text 'a cat'; pass \[text\]"),
    ],
    ids=["non-utf8-bytes", "lone-surrogate", "empty-list", "blank", "none", "bare-string"],
)
def test_row13_prompts_that_are_not_text_are_refused(tokenizer, prompts, problem):
    with pytest.raises(InputError, match=problem):
        inputs.token_ids(tokenizer, prompts)


def test_row13_utf8_bytes_are_taken_as_text(tokenizer):
    assert torch.equal(inputs.token_ids(tokenizer, ["a cat"])["input_ids"], inputs.token_ids(tokenizer, [b"a cat"])["input_ids"])


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("mode, color, suffix, rgb", [
    ("RGB", (200, 30, 30), "png", (200, 30, 30)),
    ("LA", (100, 50), "png", (100, 100, 100)),  # its grey; the alpha is dropped, as the model card's convert("RGB") does
    # A 16-bit grey, 30000 of 65535: the same grey in 8 bits is round(30000 * 255 / 65535) = 117, not white.
    ("I;16", 30000, "png", (117, 117, 117)),
    # Ink: none of cyan and black, all of magenta and yellow, is red; JPEG stores CMYK inverted (Adobe), TIFF does not.
    ("CMYK", (0, 255, 255, 0), "jpg", (255, 0, 0)),
    # Each channel is (255 - ink) * (255 - black) / 255, rounded: 245 * 225 / 255, 55 * 225 / 255, 215 * 225 / 255.
    ("CMYK", (10, 200, 40, 30), "tiff", (216, 49, 190)),
], ids=["rgb", "grey-alpha", "grey-16-bit", "cmyk-jpeg", "cmyk-tiff"])  # fmt: skip
def test_row13_a_one_pixel_image_gives_full_size_pixel_values(tmp_path, mode, color, suffix, rgb):
    path = tmp_path / f"one.{suffix}"
    Image.new(mode, (1, 1), color).save(path)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = inputs.pixel_values(inputs.load_image(path), 352, mean, std)
    # Computed apart: one pixel resized is that pixel everywhere, and each channel is (value / 255 - mean) / std.
    channels = [(value / 255 - m) / s for value, m, s in zip(rgb, mean, std)]
    expected = torch.tensor(channels, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 352, 352)
    torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", r"not a readable image \(cannot identify image file"),
        (HTML, r"not a readable image \(cannot identify image file"),
        ("truncated", r"not a readable image \(image file is truncated"),
        (png_header(100_000, 100_000), r"refusing an image this large \(Image size \(10000000000 pixels\) exceeds limit"),
        (png_header(10_000, 10_000), r"refusing an image this large"),
    ],
    ids=["empty", "html", "truncated-jpeg", "bomb", "too-large"],
)
def test_row13_a_corrupt_or_oversized_image_is_refused(tmp_path, tiny, content, problem):
    path = tmp_path / "image"
    path.write_bytes(tiny["image"].read_bytes()[:3000] if content == "truncated" else content)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: {problem}"):
        inputs.load_image(path)


def test_row13_a_corrupt_image_source_is_refused_at_download(tmp_path, capsys, tiny):
    bad = tmp_path / "bad" / "image.jpg"
    bad.parent.mkdir()
    bad.write_bytes(tiny["image"].read_bytes()[:3000])
    refused(tmp_path, capsys, tiny_sources(tiny, image=source(bad)), r"not a readable image \(image file is truncated")


def test_row13_verify_with_a_one_pixel_image_and_a_huge_prompt(tmp_path, capsys, tiny):
    """The whole chain to verify-outputs: a 1x1 image and a prompt far past CLIP's context give a normal result."""
    from stages import build_model, verify_outputs

    one = tmp_path / "src" / "one.png"
    one.parent.mkdir()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(one)
    prompts = ["a cat", "a photo of a small red cat " * 300]
    params = write_params(tmp_path, tiny_sources(tiny, image=source(one)), model={"verify": {"prompts": prompts, "image_prompts": []}})
    assert download.main(download_argv(tmp_path, params)) == 0
    model, verify = tmp_path / "model", tmp_path / "verify"
    assert remap_weights.main(remap_argv(tmp_path)) == 0
    build = ["--variant", VARIANT, "--params", str(params), "--remapped", str(tmp_path / "remapped" / "remapped.safetensors"),
             "--out", str(model), "--metrics", str(tmp_path / "build.json")]  # fmt: skip
    assert build_model.main(build) == 0
    argv = ["--variant", VARIANT, "--params", str(params), "--model", str(model), "--original", str(tmp_path / "out"),
            "--out", str(verify), "--metrics", str(tmp_path / "verify.metrics.json"), "--checks", str(tmp_path / "prompts"),
            "--report", str(tmp_path / "verify.json")]  # fmt: skip
    assert verify_outputs.main(argv) == 0, capsys.readouterr().err
    assert len(list((verify / "masks").iterdir())) == 2
    capsys.readouterr()
    # The same stage with the image damaged after download: one clear line, no traceback.
    (tmp_path / "out" / "image").write_bytes(b"\xff\xd8\xff garbage")
    argv[argv.index(str(verify))] = str(tmp_path / "verify-again")
    assert verify_outputs.main(argv) == 1
    assert re.search(r"out/image: not a readable image", error_line(capsys, "verify-outputs"))
