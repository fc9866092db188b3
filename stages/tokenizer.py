"""CLIP's byte-level BPE files in Hugging Face's format (vocab.json + merges.txt), rebuilt from OpenAI's
bpe_simple_vocab_16e6.txt.gz exactly as CLIP's SimpleTokenizer orders its vocabulary."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from .errors import PipelineError
from .tensor_io import atomic_output

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


def read_bpe_gz(path: Path) -> list[tuple[str, str]]:
    try:
        lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
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


def write_hf_files(merges: list[tuple[str, str]], directory: Path) -> None:
    """vocab.json and merges.txt as Hugging Face's CLIP repositories hold them."""
    vocab = vocab_from_merges(merges)
    with atomic_output(Path(directory) / "vocab.json", "w") as handle:
        handle.write(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
    with atomic_output(Path(directory) / "merges.txt", "w") as handle:
        handle.write("\n".join([MERGES_HEADER, *(" ".join(pair) for pair in merges)]) + "\n")


def check_hf_files(vocab_path: Path, merges_path: Path) -> int:
    """Parse vocab.json and merges.txt enough to refuse a wrong file early; returns the vocabulary size."""
    try:
        vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{vocab_path}: expected a CLIP vocab.json (a JSON object of token -> id), could not parse it ({exc})") from exc
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError(f"{vocab_path}: expected a JSON object of token -> id")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise TokenizerError(f"{vocab_path}: lacks CLIP's special tokens {missing}")
    try:
        first = Path(merges_path).read_text(encoding="utf-8").split("\n", 1)[0]
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{merges_path}: expected a UTF-8 merges.txt ({exc})") from exc
    if not first.startswith("#version"):
        raise TokenizerError(f"{merges_path}: expected a merges.txt starting with '#version', found {first[:60]!r}")
    return len(vocab)
