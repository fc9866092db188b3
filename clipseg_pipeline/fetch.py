"""Fetch one model source file: a URL or local path -> verified bytes on disk.

The only module of the project that touches the network. `fetch()` takes a source from params.yaml
(`url`, `sha256` pin or None) and returns where its verified bytes are:

- http(s): streamed into `<dest>.partial`, resumed with a Range request after a dropped connection (also
  across runs), bounded by `max_bytes`, hashed while streaming, and moved to `dest` only once verified.
- file:// URLs and plain paths (relative to the repository root): hashed and verified in place, no copy.

Every expected failure is a `FetchError` whose message names the source and URL and says what to do.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import requests
from tqdm import tqdm
from urllib3.exceptions import LocationParseError, NameResolutionError, NewConnectionError, ReadTimeoutError

from .errors import PipelineError

ACCEPTED_FORMS = (
    "http://..., https://..., file:///absolute/path, or a plain path "
    "(absolute, or relative to the repository root)"
)
SHA256_RE = re.compile(r"[0-9a-f]{64}")
CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class FetchError(PipelineError):
    """An expected fetch failure; the message names the source and URL and says what to do."""


class _Transient(Exception):
    """A failure worth retrying (dropped connection, timeout, 5xx); the message is a short reason."""


@dataclass(frozen=True, kw_only=True)
class FetchPolicy:
    timeout_s: float = 30.0  # connect timeout, and the longest wait for the next bytes of a response
    retries: int = 5  # attempts after the first one, for transient errors only
    backoff_s: float = 1.0  # sleep before retry k is backoff_s * 2**k
    max_bytes: int  # refuse a larger file before it fills the disk
    chunk_bytes: int = 1 << 20
    progress: bool = True  # tqdm bar on stderr

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError(f"FetchPolicy needs timeout_s > 0, retries >= 0, backoff_s >= 0: {self}")
        if self.max_bytes <= 0 or self.chunk_bytes <= 0:
            raise ValueError(f"FetchPolicy needs max_bytes > 0 and chunk_bytes > 0: {self}")


@dataclass(frozen=True)
class Fetched:
    path: Path  # where the verified bytes are
    sha256: str
    size: int
    pinned: bool  # False: the caller should warn and record `sha256` as the pin


def fetch(
    name: str, url: str, sha256: str | None, dest: Path, policy: FetchPolicy, *, root: Path
) -> Fetched:
    """Return the verified bytes of source `name`; http(s) sources are downloaded to `dest`."""
    pin = _check_pin(name, url, sha256)
    scheme = urlsplit(url).scheme
    try:
        if scheme in ("http", "https"):
            return _fetch_http(name, url, pin, dest, policy)
        if scheme in ("file", ""):
            return _fetch_local(name, url, pin, policy, root)
    except OSError as exc:  # the local disk, not the network: requests' errors are handled where they arise
        raise _error(name, url, _disk_problem(exc, dest)) from exc
    raise _error(
        name, url, f"the scheme {scheme!r} is not supported. Set the source's `url` in params.yaml to one "
        f"of: {ACCEPTED_FORMS}."
    )


def _check_pin(name: str, url: str, sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    pin = sha256.strip().lower()
    if not SHA256_RE.fullmatch(pin):
        raise _error(
            name, url, f"the sha256 pin {sha256!r} is not 64 hex digits. Set it in params.yaml to the "
            "file's sha256, or to null to record it on the next download."
        )
    return pin


# --- local sources -------------------------------------------------------------------------------


def _fetch_local(name: str, url: str, pin: str | None, policy: FetchPolicy, root: Path) -> Fetched:
    path = _local_path(name, url, root)
    if not path.is_file():
        raise _error(
            name, url, f"{path} does not exist. Put the file there, or fix the source's `url` in "
            f"params.yaml: it can be an absolute path, a path relative to the repository root ({root}), "
            "or a file:// URL."
        )
    size = path.stat().st_size
    if size > policy.max_bytes:
        raise _error(name, url, _too_large(f"{size} bytes", policy.max_bytes))
    digest = _hash_file(path, policy.chunk_bytes).hexdigest()
    if pin is not None and digest != pin:
        # The local file is the user's own copy: report it, never delete it.
        raise _error(
            name, url, f"sha256 mismatch in {path}: expected {pin}, got {digest}. Replace the file with the "
            "right one or, if this file is the one you want, update the sha256 pin in params.yaml."
        )
    return Fetched(path=path, sha256=digest, size=size, pinned=pin is not None)


def _local_path(name: str, url: str, root: Path) -> Path:
    if not url.startswith("file:"):
        path = Path(url)
        return path if path.is_absolute() else root / path
    parts = urlsplit(url)
    # file://host/... would silently drop the host; a relative file URL is not a thing (RFC 8089).
    if parts.netloc not in ("", "localhost"):
        raise _error(
            name, url, f"a file:// URL cannot name a host ({parts.netloc!r}): write file:///absolute/path, "
            "or drop file:// for a path relative to the repository root."
        )
    return Path(url2pathname(parts.path))


# --- http(s) sources -----------------------------------------------------------------------------


def _fetch_http(name: str, url: str, pin: str | None, dest: Path, policy: FetchPolicy) -> Fetched:
    if pin is not None and _matches(dest, pin, policy):
        return Fetched(path=dest, sha256=pin, size=dest.stat().st_size, pinned=True)
    partial = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, size = _download_with_retries(name, url, partial, policy)
    if pin is not None and digest != pin:
        # A bad file left behind would be resumed or trusted by a later run.
        partial.unlink()
        raise _network_error(
            name, url, f"sha256 mismatch: expected {pin}, got {digest}; the download was deleted. Check that "
            "the mirror serves the right file or, if the file legitimately changed, update the sha256 pin in "
            "params.yaml."
        )
    os.replace(partial, dest)  # atomic: `dest` only ever holds a complete, verified file
    return Fetched(path=dest, sha256=digest, size=size, pinned=pin is not None)


def _matches(dest: Path, pin: str, policy: FetchPolicy) -> bool:
    if not dest.is_file() or dest.stat().st_size > policy.max_bytes:
        return False
    return _hash_file(dest, policy.chunk_bytes).hexdigest() == pin


def _download_with_retries(name: str, url: str, partial: Path, policy: FetchPolicy) -> tuple[str, int]:
    attempts = policy.retries + 1
    with requests.Session() as session:
        for attempt in range(attempts):
            try:
                return _download(session, name, url, partial, policy)
            except _Transient as exc:
                reason = str(exc)
            if attempt + 1 < attempts:
                time.sleep(policy.backoff_s * 2**attempt)
    raise _network_error(
        name, url, f"gave up after {attempts} attempts (last: {reason}); the bytes received so far are kept "
        "and the next run resumes them. Check that the host is up, or raise download.timeout_s / "
        "download.retries in params.yaml."
    )


def _download(
    session: requests.Session, name: str, url: str, partial: Path, policy: FetchPolicy
) -> tuple[str, int]:
    """One attempt: continue `partial` up to the end of the file; return its sha256 and size."""
    try:
        response, offset = _request(session, url, partial, policy)
        with response:
            _check_status(name, url, response, offset)
            total = _expected_size(response, offset)
            if total is not None and total > policy.max_bytes:
                partial.unlink(missing_ok=True)
                raise _network_error(name, url, _too_large(f"{total} bytes", policy.max_bytes))
            hasher = _hash_file(partial, policy.chunk_bytes) if offset else hashlib.sha256()
            size = _stream(name, url, response, partial, offset, hasher, total, policy)
    except (requests.RequestException, LocationParseError) as exc:  # urllib3 lets the latter escape
        raise _classify(name, url, exc, policy) from exc
    if total is not None and size < total:
        raise _Transient(f"connection dropped after {size} of {total} bytes")
    return hasher.hexdigest(), size


def _request(
    session: requests.Session, url: str, partial: Path, policy: FetchPolicy
) -> tuple[requests.Response, int]:
    """GET `url`, asking only for the bytes after `partial`; return the response and where its body starts."""
    offset = partial.stat().st_size if partial.is_file() else 0
    if offset == 0:
        return _get(session, url, {}, policy), 0
    response = _get(session, url, {"Range": f"bytes={offset}-"}, policy)
    content_range = _content_range(response)
    if response.status_code == 206 and content_range and int(content_range.group(1)) == offset:
        return response, offset
    if response.status_code == 200:  # the server ignores Range: its body is the whole file
        return response, 0
    if response.status_code in (206, 416):
        # The partial cannot be continued (a different range, or longer than the file): start over.
        response.close()
        partial.unlink()
        return _get(session, url, {}, policy), 0
    return response, offset  # an error status, for the caller to report


def _get(
    session: requests.Session, url: str, headers: dict[str, str], policy: FetchPolicy
) -> requests.Response:
    # identity: byte offsets, Content-Length and the hash must all be about the file itself, not a gzip of it.
    headers = {"Accept-Encoding": "identity", **headers}
    return session.get(url, headers=headers, stream=True, timeout=policy.timeout_s)


def _content_range(response: requests.Response) -> re.Match[str] | None:
    return CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", "").strip())


def _check_status(name: str, url: str, response: requests.Response, offset: int) -> None:
    status = response.status_code
    if status >= 500:
        raise _Transient(f"HTTP {status} {response.reason}")
    if status != (206 if offset else 200):
        raise _network_error(
            name, url, f"the server answered HTTP {status} {response.reason}. Check the URL in params.yaml "
            "(a 401/403 may mean the file needs a login this pipeline does not do)."
        )


def _expected_size(response: requests.Response, offset: int) -> int | None:
    """The size of the whole file, when the server says it."""
    if offset:
        match = _content_range(response)
        if match and match.group(3) != "*":
            return int(match.group(3))
    length = response.headers.get("Content-Length", "")
    return offset + int(length) if length.isdigit() else None


def _stream(
    name: str,
    url: str,
    response: requests.Response,
    partial: Path,
    offset: int,
    hasher: hashlib._Hash,
    total: int | None,
    policy: FetchPolicy,
) -> int:
    """Append the body to `partial` (from scratch if offset is 0), hashing it; return the size reached."""
    size = offset
    bar = tqdm(
        total=total,
        initial=offset,
        desc=name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not policy.progress,
    )
    with bar, partial.open("ab" if offset else "wb") as out:
        for chunk in response.iter_content(policy.chunk_bytes):
            size += len(chunk)
            if size > policy.max_bytes:  # the server sent no size, or more than it said
                break
            out.write(chunk)
            hasher.update(chunk)
            bar.update(len(chunk))
    if size > policy.max_bytes:
        partial.unlink()
        size_text = f"over {policy.max_bytes} bytes (counted while streaming)"
        raise _network_error(name, url, _too_large(size_text, policy.max_bytes))
    return size


def _classify(name: str, url: str, exc: Exception, policy: FetchPolicy) -> Exception:
    """Map a requests error to a `_Transient` (retried) or a final `FetchError`."""
    if isinstance(exc, requests.Timeout):  # before ConnectionError: ConnectTimeout is both
        return _Transient(f"no response within {policy.timeout_s} s")
    if isinstance(exc, requests.exceptions.SSLError):  # a ConnectionError too, but retrying cannot fix it
        return _network_error(name, url, f"the TLS connection failed (certificate? clock?): {exc}.")
    if isinstance(exc, requests.ConnectionError):
        cause = exc.args[0] if exc.args else None
        if isinstance(getattr(cause, "reason", None), NewConnectionError):
            # Not retried: without network (the usual cause) retrying only delays the hint.
            return _unreachable(name, url, cause.reason)
        if isinstance(cause, ReadTimeoutError):  # requests reports a stall mid-body this way
            return _Transient(f"no data for {policy.timeout_s} s")
        return _Transient("connection dropped")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):  # the body ended before Content-Length
        return _Transient("connection dropped mid-file")
    return _network_error(name, url, f"the request failed ({exc}).")  # e.g. a malformed URL, a redirect loop


def _unreachable(name: str, url: str, reason: NewConnectionError) -> FetchError:
    host = urlsplit(url).netloc.rpartition("@")[2]  # as written in the URL, without any user:password
    why = "the name does not resolve" if isinstance(reason, NameResolutionError) else "connection refused"
    return _network_error(name, url, f"could not reach host {host} ({why}).")


def _disk_problem(exc: OSError, dest: Path) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"the disk holding {dest.parent} is full ({exc.strerror}). Free some space and run again: a download "
            "resumes from the bytes already received."
        )
    where = f" {exc.filename}" if exc.filename else ""
    return f"could not read or write{where} ({exc.strerror or exc}). Check the path and its permissions."


def _too_large(size: str, bound: int) -> str:
    return (
        f"the file is {size}, larger than the bound {bound} (params: download.max_bytes); nothing was "
        "kept. Check the URL, or raise download.max_bytes if the file really is that large."
    )


def _error(name: str, url: str, problem: str) -> FetchError:
    return FetchError(f"source {name!r} ({url}): {problem}")


def _network_error(name: str, url: str, problem: str) -> FetchError:
    # Offline or behind a broken mirror, a local copy is the way out; say so on every network error.
    return _error(
        name, url, f"{problem} Without network, download the file elsewhere and point the `url` of source "
        f"{name!r} in params.yaml at the local copy (a path relative to the repository or a file:// URL)."
    )


def _hash_file(path: Path, chunk_bytes: int) -> hashlib._Hash:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            hasher.update(chunk)
    return hasher
