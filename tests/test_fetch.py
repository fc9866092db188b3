"""Tests for stages/fetch.py against tests/http_server.py; no request leaves 127.0.0.1."""

import dataclasses
import errno
import hashlib
import re
import socket
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests

from clipseg_pipeline import fetch as fetch_module
from clipseg_pipeline.fetch import Fetched, FetchError, FetchPolicy, fetch
from tests.http_server import Fault, Seen, serve

DATA = bytes(range(256)) * 40  # 10240 bytes: ten chunks at POLICY.chunk_bytes
SHA = hashlib.sha256(DATA).hexdigest()
WRONG_SHA = "0" * 64
PATH = "/model.bin"
# Drops happen at a chunk boundary: urllib3 discards a chunk cut short, so the resume point is predictable.
DROP = 3 * 1024
POLICY = FetchPolicy(
    timeout_s=2.0, retries=3, backoff_s=0, max_bytes=1 << 20, chunk_bytes=1024, progress=False
)
HINT = "Without network, download the file elsewhere and point the `url` of source 'weights' in params.yaml"


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # A proxy from the environment would receive the requests meant for 127.0.0.1 and *.invalid.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def start():
    """start(files, faults=None) -> LocalServer; every server stops when the test ends."""
    with ExitStack() as stack:
        yield lambda files, faults=None: stack.enter_context(serve(files, faults))


def dest_of(tmp_path: Path) -> Path:
    return tmp_path / "out" / "model.bin"


def partial_of(tmp_path: Path) -> Path:
    return tmp_path / "out" / "model.bin.partial"


def run(url: str, tmp_path: Path, sha256: str | None = SHA, policy: FetchPolicy = POLICY) -> Fetched:
    return fetch("weights", url, sha256, dest_of(tmp_path), policy, root=tmp_path)


def failure(url: str, problem: str) -> str:
    """The `match` pattern of a FetchError about source 'weights' at `url`."""
    return f"^source 'weights' \\({re.escape(url)}\\): {problem}"


def assert_downloaded(got: Fetched, tmp_path: Path, pinned: bool = True) -> None:
    assert got == Fetched(path=dest_of(tmp_path), sha256=SHA, size=len(DATA), pinned=pinned)
    assert dest_of(tmp_path).read_bytes() == DATA
    assert not partial_of(tmp_path).exists()


def assert_nothing_left(tmp_path: Path) -> None:
    assert not dest_of(tmp_path).exists()
    assert not partial_of(tmp_path).exists()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- http: success paths -------------------------------------------------------------------------


@pytest.mark.parametrize("sha256, pinned", [(SHA, True), (SHA.upper(), True), (None, False)])
def test_downloads_and_reports_the_hash(start, tmp_path, sha256, pinned):
    server = start({PATH: DATA})
    assert_downloaded(run(server.url(PATH), tmp_path, sha256), tmp_path, pinned)
    assert server.requests == [Seen(PATH, None)]


def test_downloads_without_content_length(start, tmp_path):
    server = start({PATH: DATA}, {PATH: Fault(omit_length=True)})
    assert_downloaded(run(server.url(PATH), tmp_path), tmp_path)


def test_existing_dest_with_the_pinned_hash_is_not_downloaded_again(start, tmp_path):
    server = start({PATH: DATA})
    dest_of(tmp_path).parent.mkdir()
    dest_of(tmp_path).write_bytes(DATA)
    assert run(server.url(PATH), tmp_path) == Fetched(dest_of(tmp_path), SHA, len(DATA), pinned=True)
    assert server.requests == []


def test_existing_dest_with_other_bytes_is_replaced(start, tmp_path):
    server = start({PATH: DATA})
    dest_of(tmp_path).parent.mkdir()
    dest_of(tmp_path).write_bytes(b"stale")
    assert_downloaded(run(server.url(PATH), tmp_path), tmp_path)
    assert server.requests == [Seen(PATH, None)]


def test_resumes_after_a_dropped_connection(start, tmp_path):
    server = start({PATH: DATA}, {PATH: Fault(drop_after=DROP, times=1)})
    assert_downloaded(run(server.url(PATH), tmp_path), tmp_path)
    assert server.requests == [Seen(PATH, None), Seen(PATH, f"bytes={DROP}-")]


# Unpinned too: a file spliced from two offsets would then be taken as it is, and its hash recorded as the pin to use.
RESTART_PINS = pytest.mark.parametrize("sha256, pinned", [(SHA, True), (None, False)], ids=["pinned", "unpinned"])


@RESTART_PINS
def test_restarts_when_the_server_ignores_range(start, tmp_path, sha256, pinned):
    # The answer to the Range request is a 200 with the whole file: it replaces the partial, never extends it.
    server = start({PATH: DATA}, {PATH: Fault(drop_after=DROP, times=1, ignore_range=True)})
    assert_downloaded(run(server.url(PATH), tmp_path, sha256), tmp_path, pinned)
    assert server.requests == [Seen(PATH, None), Seen(PATH, f"bytes={DROP}-")]


@RESTART_PINS
@pytest.mark.parametrize("range_from", [0, DROP - 1, DROP + 1, DROP + 1024], ids=["start", "before", "after", "chunk-after"])
def test_restarts_when_the_server_answers_another_range(start, tmp_path, sha256, pinned, range_from):
    # A 206 whose Content-Range starts elsewhere than the partial ends cannot continue it: the partial is dropped and
    # the file fetched whole.
    server = start({PATH: DATA}, {PATH: Fault(drop_after=DROP, times=1, range_from=range_from)})
    assert_downloaded(run(server.url(PATH), tmp_path, sha256), tmp_path, pinned)
    assert server.requests == [Seen(PATH, None), Seen(PATH, f"bytes={DROP}-"), Seen(PATH, None)]


def test_resumes_the_partial_left_by_a_killed_run(start, tmp_path):
    server = start({PATH: DATA})
    partial_of(tmp_path).parent.mkdir()
    partial_of(tmp_path).write_bytes(DATA[:5000])
    assert_downloaded(run(server.url(PATH), tmp_path), tmp_path)
    assert server.requests == [Seen(PATH, "bytes=5000-")]


def test_restarts_when_the_partial_is_longer_than_the_file(start, tmp_path):
    server = start({PATH: DATA})
    partial_of(tmp_path).parent.mkdir()
    partial_of(tmp_path).write_bytes(DATA + b"junk")  # the server answers 416
    assert_downloaded(run(server.url(PATH), tmp_path), tmp_path)
    assert server.requests == [Seen(PATH, f"bytes={len(DATA) + 4}-"), Seen(PATH, None)]


def test_retries_a_server_error_then_succeeds(start, tmp_path):
    server = start({PATH: DATA}, {PATH: Fault(status=500, times=2)})
    assert_downloaded(run(server.url(PATH), tmp_path), tmp_path)
    assert len(server.requests) == 3


# --- http: failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault, reason",
    [(Fault(drop_after=0), "connection dropped"), (Fault(status=500), "HTTP 500 Internal Server Error")],
)
def test_gives_up_after_the_retries(start, tmp_path, fault, reason):
    server = start({PATH: DATA}, {PATH: fault})
    url = server.url(PATH)
    policy = FetchPolicy(retries=2, backoff_s=0, max_bytes=1 << 20, progress=False)
    with pytest.raises(FetchError, match=failure(url, f"gave up after 3 attempts \\(last: {reason}.*{HINT}")):
        run(url, tmp_path, policy=policy)
    assert len(server.requests) == 3
    assert not dest_of(tmp_path).exists()


@pytest.mark.parametrize(
    "files, faults, status",
    [({}, None, "404 Not Found"), ({PATH: DATA}, {PATH: Fault(status=403)}, "403 Forbidden")],
)
def test_client_errors_are_final(start, tmp_path, files, faults, status):
    server = start(files, faults)
    url = server.url(PATH)
    hint = "(a 401/403 may mean the file needs a login this pipeline does not do). "
    with pytest.raises(FetchError, match=failure(url, f"the server answered HTTP {status}\\. Check the URL in params.yaml "
                                                      f"{re.escape(hint)}{HINT}")):
        run(url, tmp_path)
    assert len(server.requests) == 1


def test_times_out(start, tmp_path):
    server = start({PATH: DATA}, {PATH: Fault(delay_s=10)})
    url = server.url(PATH)
    policy = FetchPolicy(timeout_s=0.2, retries=1, backoff_s=0, max_bytes=1 << 20, progress=False)
    problem = "gave up after 2 attempts \\(last: no response within 0.2 s"
    with pytest.raises(FetchError, match=failure(url, problem)):
        run(url, tmp_path, policy=policy)
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    "host, why",
    [("nonexistent.invalid", "the name does not resolve"), ("127.0.0.1:{port}", "connection refused")],
)
def test_unreachable_host_is_final_and_hints_at_a_local_copy(tmp_path, host, why):
    host = host.format(port=closed_port())
    url = f"http://{host}{PATH}"
    problem = f"could not reach host {re.escape(host)} \\({why}\\)"
    with pytest.raises(FetchError, match=failure(url, problem)) as err:
        run(url, tmp_path)
    assert str(err.value).endswith(
        f"{HINT} at the local copy (a path relative to the repository or a file:// URL)."
    )


@pytest.mark.parametrize("url", ["http:///model.bin", "http://a..b/model.bin"])
def test_malformed_url(tmp_path, url):
    with pytest.raises(FetchError, match=failure(url, "the request failed \\(.*\\)\\. Without network")):
        run(url, tmp_path)


def test_hash_mismatch_deletes_the_download(start, tmp_path):
    server = start({PATH: DATA})
    url = server.url(PATH)
    problem = (f"sha256 mismatch: expected {WRONG_SHA}, got {SHA}; the download was deleted. Check that the mirror "
               "serves the right file or, if the file legitimately changed, update the sha256 pin in params.yaml. "
               + re.escape(HINT))
    with pytest.raises(FetchError, match=failure(url, problem)):
        run(url, tmp_path, WRONG_SHA)
    assert_nothing_left(tmp_path)


def test_refuses_a_file_larger_than_the_bound_from_content_length(start, tmp_path):
    server = start({PATH: DATA})
    url = server.url(PATH)
    bound = len(DATA) - 1
    policy = FetchPolicy(backoff_s=0, max_bytes=bound, progress=False)
    problem = f"the file is {len(DATA)} bytes, larger than the bound {bound} \\(params: download.max_bytes\\)"
    with pytest.raises(FetchError, match=failure(url, problem)):
        run(url, tmp_path, policy=policy)
    assert_nothing_left(tmp_path)


def test_refuses_a_file_larger_than_the_bound_while_streaming(start, tmp_path):
    server = start({PATH: DATA}, {PATH: Fault(omit_length=True)})
    url = server.url(PATH)
    bound = len(DATA) - 1
    policy = FetchPolicy(backoff_s=0, max_bytes=bound, chunk_bytes=1024, progress=False)
    problem = f"the file is over {bound} bytes \\(counted while streaming\\), larger than the bound {bound}"
    with pytest.raises(FetchError, match=failure(url, problem)):
        run(url, tmp_path, policy=policy)
    assert_nothing_left(tmp_path)


# --- local sources -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url_of", [Path.as_uri, str, lambda path: "data/model.bin"], ids=["file-url", "absolute", "relative"]
)
def test_local_sources_are_verified_in_place(tmp_path, url_of):
    local = tmp_path / "data" / "model.bin"
    local.parent.mkdir()
    local.write_bytes(DATA)
    assert run(url_of(local), tmp_path) == Fetched(path=local, sha256=SHA, size=len(DATA), pinned=True)
    assert not dest_of(tmp_path).exists()


def test_local_hash_mismatch_keeps_the_users_file(tmp_path):
    local = tmp_path / "model.bin"
    local.write_bytes(DATA)
    where = re.escape(str(local))
    problem = f"sha256 mismatch in {where}: expected {WRONG_SHA}, got {SHA}.*update the sha256 pin"
    with pytest.raises(FetchError, match=failure("model.bin", problem)):
        run("model.bin", tmp_path, WRONG_SHA)
    assert local.read_bytes() == DATA


def test_local_file_larger_than_the_bound(tmp_path):
    (tmp_path / "model.bin").write_bytes(DATA)
    policy = FetchPolicy(max_bytes=100, progress=False)
    problem = f"the file is {len(DATA)} bytes, larger than the bound 100 \\(params: download.max_bytes\\)"
    with pytest.raises(FetchError, match=failure("model.bin", problem)):
        run("model.bin", tmp_path, policy=policy)


def test_missing_local_file(tmp_path):
    missing = re.escape(str(tmp_path / "data" / "missing.bin"))
    problem = f"{missing} does not exist.*absolute path, a path relative to the repository root .*file:// URL"
    with pytest.raises(FetchError, match=failure("data/missing.bin", problem)):
        run("data/missing.bin", tmp_path)


def test_file_url_naming_a_host(tmp_path):
    url = "file://server/share/model.bin"
    with pytest.raises(FetchError, match=failure(url, "a file:// URL cannot name a host \\('server'\\)")):
        run(url, tmp_path)


# --- bad params ----------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://example.org/model.bin", "s3://bucket/model.bin"])
def test_unsupported_scheme_lists_the_accepted_forms(tmp_path, url):
    scheme = url.split(":")[0]
    forms = re.escape("http://..., https://..., file:///absolute/path, or a plain path")
    problem = f"the scheme '{scheme}' is not supported.*{forms}"
    with pytest.raises(FetchError, match=failure(url, problem)):
        run(url, tmp_path)


def test_malformed_pin(tmp_path):
    with pytest.raises(FetchError, match=failure("model.bin", "the sha256 pin 'abc' is not 64 hex digits. Set it in params.yaml to the "
                                                            "file's sha256, or to null to record it on the next download.$")):
        run("model.bin", tmp_path, "abc")


def test_policy_rejects_a_nonpositive_bound():
    with pytest.raises(ValueError, match="max_bytes > 0"):
        FetchPolicy(max_bytes=0)


def test_an_unreachable_host_is_named_without_the_urls_credentials(tmp_path):
    host = f"127.0.0.1:{closed_port()}"
    with pytest.raises(FetchError) as err:
        run(f"http://user:s3cret@{host}{PATH}", tmp_path)
    assert f"could not reach host {host} (connection refused)." in str(err.value)
    assert "could not reach host user" not in str(err.value)


@pytest.mark.parametrize("filename, where", [("/data/model.bin", " /data/model.bin"), (None, "")])
def test_a_disk_error_names_the_file_when_it_is_known(tmp_path, monkeypatch, filename, where):
    def refuse(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied", filename)

    monkeypatch.setattr(fetch_module, "_fetch_local", refuse)
    with pytest.raises(FetchError) as err:
        run(str(tmp_path / "local.bin"), tmp_path)
    assert str(err.value) == (f"source 'weights' ({tmp_path / 'local.bin'}): could not read or write{where} (Permission "
                              "denied). Check the path and its permissions.")


def _response(status: int, headers: dict[str, str]) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers)
    return response


@pytest.mark.parametrize(
    "headers, offset, total",
    [
        ({"Content-Range": "bytes 100-299/300"}, 100, 300),  # no Content-Length: the range's total says it
        ({"Content-Range": "bytes 100-199/*", "Content-Length": "100"}, 100, 200),  # total unknown: offset + length
        ({"Content-Range": "bytes 100-199/*"}, 100, None),
        ({"Content-Length": "300"}, 0, 300),
        ({}, 0, None),
    ],
)
def test_the_expected_size_comes_from_the_range_first_then_the_length(headers, offset, total):
    assert fetch_module._expected_size(_response(206 if offset else 200, headers), offset) == total


def test_a_resumed_answer_without_a_length_that_ends_early_is_resumed_again(tmp_path, start):
    # The partial holds the first DROP bytes; the server answers ranges without Content-Length (the body ends when the
    # connection closes) and hangs up early once: only Content-Range's total shows the body was cut short.
    partial_of(tmp_path).parent.mkdir(parents=True)
    partial_of(tmp_path).write_bytes(DATA[:DROP])
    server = start({PATH: DATA}, {PATH: Fault(drop_after=2 * 1024, omit_length=True, times=1)})
    assert_downloaded(run(server.url(PATH), tmp_path), tmp_path)
    assert [seen.range for seen in server.requests] == [f"bytes={DROP}-", f"bytes={DROP + 2 * 1024}-"]


def test_a_file_of_exactly_the_size_bound_is_accepted(tmp_path, start):
    server = start({PATH: DATA})
    exact = dataclasses.replace(POLICY, max_bytes=len(DATA))
    assert_downloaded(run(server.url(PATH), tmp_path, policy=exact), tmp_path)


def test_the_progress_bar_shows_only_when_asked_and_reaches_the_files_size(tmp_path, start, capsys):
    server = start({PATH: DATA})
    run(server.url(PATH), tmp_path / "quiet")
    assert capsys.readouterr().err == ""
    run(server.url(PATH), tmp_path / "shown", policy=dataclasses.replace(POLICY, progress=True))
    final = capsys.readouterr().err.split("\r")[-1]
    # 10240 bytes in units of 1024 bytes, the rate in bytes per second.
    assert final.startswith("weights: 100%") and "| 10.0k/10.0k [" in final and "B/s]" in final, final
    # A resumed download's bar starts at the bytes already there and ends at 100% too.
    partial_of(tmp_path / "resumed").parent.mkdir(parents=True)
    partial_of(tmp_path / "resumed").write_bytes(DATA[:DROP])
    run(server.url(PATH), tmp_path / "resumed", policy=dataclasses.replace(POLICY, progress=True))
    assert capsys.readouterr().err.split("\r")[-1].startswith("weights: 100%")


def test_a_pinned_file_of_exactly_the_size_bound_is_not_downloaded_again(tmp_path, start):
    server = start({PATH: DATA})
    dest_of(tmp_path).parent.mkdir(parents=True)
    dest_of(tmp_path).write_bytes(DATA)
    assert_downloaded(run(server.url(PATH), tmp_path, policy=dataclasses.replace(POLICY, max_bytes=len(DATA))), tmp_path)
    assert server.requests == []


def test_retries_back_off_exponentially_and_give_up_without_a_last_wait(tmp_path, start, monkeypatch):
    waits = []
    monkeypatch.setattr(fetch_module.time, "sleep", waits.append)
    server = start({PATH: DATA}, {PATH: Fault(status=503)})
    with pytest.raises(FetchError, match="gave up after 4 attempts"):
        run(server.url(PATH), tmp_path, policy=dataclasses.replace(POLICY, retries=3, backoff_s=0.5))
    assert waits == [0.5, 1.0, 2.0] and len(server.requests) == 4


def test_giving_up_names_how_far_the_last_attempt_got(start, tmp_path):
    # A resumed download whose answers (no Content-Length) each end 2 KiB into the body: only the range's total shows it.
    partial_of(tmp_path).parent.mkdir(parents=True)
    partial_of(tmp_path).write_bytes(DATA[:DROP])
    server = start({PATH: DATA}, {PATH: Fault(drop_after=2048, omit_length=True)})
    url = server.url(PATH)
    reached = DROP + 3 * 2048
    with pytest.raises(FetchError, match=failure(url, "gave up after 3 attempts \\(last: connection dropped after "
                                                      f"{reached} of {len(DATA)} bytes\\); the bytes received so far are kept and the "
                                                      "next run resumes them. Check that the host is up, or raise "
                                                      "download.timeout_s / download.retries in params.yaml.")):
        run(url, tmp_path, policy=dataclasses.replace(POLICY, retries=2))
    assert partial_of(tmp_path).read_bytes() == DATA[:reached]


def test_every_request_asks_for_the_file_itself_not_a_compressed_copy(tmp_path, start, monkeypatch):
    # Byte offsets, Content-Length and the hash are all about the file's own bytes: a gzip of it would break all three.
    asked = []
    get = requests.Session.get

    def spy(self, url, **kwargs):
        asked.append(requests.structures.CaseInsensitiveDict(kwargs["headers"]))
        return get(self, url, **kwargs)

    monkeypatch.setattr(requests.Session, "get", spy)
    partial_of(tmp_path).parent.mkdir(parents=True)
    partial_of(tmp_path).write_bytes(DATA[:DROP])
    server = start({PATH: DATA})
    assert_downloaded(run(server.url(PATH), tmp_path), tmp_path)
    assert [(h["Accept-Encoding"], h.get("Range")) for h in asked] == [("identity", f"bytes={DROP}-")]
