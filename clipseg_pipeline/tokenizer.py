"""CLIP's byte-level BPE files in Hugging Face's format (vocab.json + merges.txt), rebuilt from OpenAI's
bpe_simple_vocab_16e6.txt.gz exactly as CLIP's SimpleTokenizer orders its vocabulary."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

from .errors import PipelineError

# SimpleTokenizer reads lines[1 : 49152 - 256 - 2 + 1] of the gz: a header line, then at most this many merges.
MAX_MERGES = 49152 - 256 - 2
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MERGES_HEADER = "#version: 0.2"


class TokenizerError(PipelineError):
    """Tokenizer files that cannot be used."""


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable character table (the first 256 vocabulary entries, in this order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def read_bpe_gz(path: Path, max_bytes: int) -> list[tuple[str, str]]:
    """The merges of OpenAI's bpe_simple_vocab_16e6.txt.gz, unpacking at most `max_bytes`."""
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise TokenizerError(
                f"{path}: unpacks past the bound {max_bytes} bytes (params: download.max_member_bytes); refusing a "
                "possible decompression bomb. CLIP's merges file unpacks to a few MB"
            )
        lines = data.decode("utf-8").split("\n")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: expected CLIP's gzip-compressed BPE merges file, could not read it ({exc})") from exc
    merges = []
    for number, line in enumerate(lines[1 : MAX_MERGES + 1], start=2):
        if not line:
            continue
        pair = tuple(line.split())
        if len(pair) != 2:
            raise TokenizerError(f"{path}: line {number} is {line!r}, expected two space-separated symbols")
        merges.append(pair)
    if not merges:
        raise TokenizerError(f"{path}: holds no merges")
    return merges


def vocab_from_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    """SimpleTokenizer's vocabulary: bytes, bytes + '</w>', one entry per merge, then the two special tokens."""
    base = list(bytes_to_unicode().values())
    tokens = base + [token + "</w>" for token in base] + ["".join(pair) for pair in merges] + list(SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError("the merges produce duplicate vocabulary entries; the BPE file is not CLIP's format")
    return vocab


def hf_files(merges: list[tuple[str, str]]) -> dict[str, bytes]:
    """The bytes of vocab.json and merges.txt as Hugging Face's CLIP repositories hold them."""
    vocab = vocab_from_merges(merges)
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
        "merges.txt": ("\n".join([MERGES_HEADER, *(" ".join(pair) for pair in merges)]) + "\n").encode("utf-8"),
    }


def check_hf_files(vocab_path: Path, merges_path: Path) -> int:
    """Parse vocab.json and merges.txt as the tokenizer will, to refuse a wrong file here; returns the vocabulary size."""
    try:
        vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TokenizerError(f"{vocab_path}: expected a CLIP vocab.json (a JSON object of token -> id), could not parse it ({exc})") from exc
    if not isinstance(vocab, dict) or sorted(v for v in vocab.values() if type(v) is int) != list(range(len(vocab))):
        raise TokenizerError(
            f"{vocab_path}: expected a JSON object of token -> id, the ids numbering the tokens 0, 1, 2, ..."
        )
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise TokenizerError(f"{vocab_path}: lacks CLIP's special tokens {missing}")
    try:
        lines = Path(merges_path).read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{merges_path}: expected a UTF-8 merges.txt ({exc})") from exc
    if not lines[0].startswith("#version"):
        raise TokenizerError(f"{merges_path}: expected a merges.txt starting with '#version', found {lines[0][:60]!r}")
    for number, line in enumerate(lines[1:], start=2):
        pair = line.split(" ")
        if line and (len(pair) != 2 or not all(token in vocab for token in (*pair, "".join(pair)))):
            raise TokenizerError(
                f"{merges_path}: line {number} is {line[:60]!r}, expected two tokens of {vocab_path} whose join is one too; "
                "the vocab and merges files do not belong together"
            )
    return len(vocab)
