"""Tests for the tokenizer files (stages/tokenizer.py, the download stage's two tokenizer sources, the export's copy):
whichever way they come, transformers' CLIPTokenizer gives the ids OpenAI's own SimpleTokenizer gives.

`SimpleTokenizer` below re-implements OpenAI's algorithm (clip/simple_tokenizer.py) from its description, without
ftfy and html-unescaping, which Hugging Face's tokenizer skips too (see docs/original-format.md, "Known traps").
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import regex

from clipseg_pipeline import tokenizer
from stages import download
from tools import synthetic
from clipseg_pipeline.inputs import tokenizer as hf_tokenizer
from tests.pipeline_fixture import SYNTHETIC, VARIANT, tiny_pipeline, write_params  # noqa: F401

START, END = "<|startoftext|>", "<|endoftext|>"
# OpenAI's pattern: special tokens, English contractions, letter runs, single digits, runs of other non-space marks.
PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
# Ordinary prompts: case, repeated spaces, punctuation, digits, contractions, hyphens, accented letters (NFC).
PROMPTS = [
    "a cat",
    "A Remote",
    "  two cats\ton a   blanket ",
    "the cat's toy, isn't it?",
    "a photo of 3 dogs!",
    "red-and-white striped umbrella",
    "something to fill",
    "café au lait",
    "über-cool wood",
]


def openai_byte_table() -> dict[int, str]:
    """bytes_to_unicode as OpenAI writes it: printable bytes map to themselves, the rest to 256 + n in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(keep, [chr(c) for c in codes]))


class SimpleTokenizer:
    """OpenAI's CLIP tokenizer, read from bpe_simple_vocab_16e6.txt.gz."""

    def __init__(self, bpe_gz: Path):
        self.byte_encoder = openai_byte_table()
        lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(merge) for merge in merges]
        vocab += [START, END]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks = dict(zip(merges, range(len(merges))))

    def bpe(self, token: str) -> list[str]:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return list(word)

    def encode(self, text: str) -> list[int]:
        text = regex.sub(r"\s+", " ", text).strip().lower()  # basic cleaning, without ftfy
        ids = []
        for token in PATTERN.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[piece] for piece in self.bpe(token)]
        return [self.encoder[START], *ids, self.encoder[END]]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hf_ids(tok, prompts: list[str]) -> list[list[int]]:
    return [tok(prompt)["input_ids"] for prompt in prompts]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer trained on the prompts' own words, so that they take several merges each."""
    words = [w for p in PROMPTS for w in regex.findall(r"[\p{L}]+", p.lower())] * 3 + ["blankets", "umbrellas", "cats"]
    return synthetic.write_tokenizer_files(tmp_path_factory.mktemp("corpus"), words=words)


def test_the_test_byte_table_is_openais(small_corpus):
    # The two implementations in stages/ and this test's must agree with each other, all 256 bytes in order.
    assert openai_byte_table() == tokenizer.bytes_to_unicode() == synthetic.bytes_to_unicode()


@pytest.mark.parametrize("files", ["small", "synthetic"])
def test_hf_files_tokenize_like_openais_tokenizer(small_corpus, files):
    paths = small_corpus if files == "small" else {"vocab": SYNTHETIC / "vocab.json", "bpe": SYNTHETIC / "bpe_simple_vocab_16e6.txt.gz"}
    openai = SimpleTokenizer(paths["bpe"])
    tok = hf_tokenizer(paths["vocab"].parent)
    expected = [openai.encode(p) for p in PROMPTS]
    assert hf_ids(tok, PROMPTS) == expected
    if files == "small":
        assert any(len(ids) < len(p.strip()) for ids, p in zip(expected, PROMPTS)), "the merges must actually merge"


def test_vocab_rebuilt_from_the_gz_is_the_published_vocab(small_corpus):
    merges = list(SimpleTokenizer(small_corpus["bpe"]).bpe_ranks)
    assert tokenizer.vocab_from_merges(merges) == json.loads(small_corpus["vocab"].read_text(encoding="utf-8"))


def tokenizer_sources(kind: str) -> dict:
    """clipseg-tiny's sources, its tokenizer from vocab.json + merges.txt or from CLIP's bpe gz."""
    names = {"clip": "clip.pt", "decoder": "weights.zip", "image": "image.jpg"}
    names |= {"vocab": "vocab.json", "merges": "merges.txt"} if kind == "vocab" else {"bpe": "bpe_simple_vocab_16e6.txt.gz"}
    sources = {name: {"url": str(SYNTHETIC / file), "sha256": sha256(SYNTHETIC / file)} for name, file in names.items()}
    sources["decoder"]["member"] = "tiny-uni.pth"
    return sources


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory) -> dict[str, Path]:
    """The download stage's output folder for each tokenizer source."""
    folders = {}
    for kind in ("vocab", "bpe"):
        root = tmp_path_factory.mktemp(f"download-{kind}")
        params = write_params(root / "params.yaml", sources=tokenizer_sources(kind))
        argv = ["--variant", VARIANT, "--params", str(params), "--out", str(root / "data"), "--cache", str(root / "cache"),
                "--metrics", str(root / "download.metrics.json"), "--report", str(root / "download.json"), "--no-progress"]
        assert download.main(argv) == 0
        folders[kind] = root / "data"
    return folders


def test_both_tokenizer_sources_give_the_same_files(downloaded):
    vocab, bpe = downloaded["vocab"], downloaded["bpe"]
    assert json.loads((bpe / "vocab.json").read_text(encoding="utf-8")) == json.loads((vocab / "vocab.json").read_text(encoding="utf-8"))
    assert (bpe / "merges.txt").read_text(encoding="utf-8").splitlines() == (vocab / "merges.txt").read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("kind", ["vocab", "bpe"])
def test_downloaded_tokenizer_gives_openais_ids(downloaded, kind):
    openai = SimpleTokenizer(SYNTHETIC / "bpe_simple_vocab_16e6.txt.gz")
    assert hf_ids(hf_tokenizer(downloaded[kind]), PROMPTS) == [openai.encode(p) for p in PROMPTS]


def test_exported_tokenizer_gives_openais_ids_and_cuts_at_77(tiny_pipeline):  # noqa: F811
    from transformers import CLIPSegProcessor

    tok = CLIPSegProcessor.from_pretrained(tiny_pipeline.export, local_files_only=True).tokenizer
    openai = SimpleTokenizer(SYNTHETIC / "bpe_simple_vocab_16e6.txt.gz")
    assert hf_ids(tok, PROMPTS) == [openai.encode(p) for p in PROMPTS]
    assert tok.model_max_length == 77
    long = tok(" ".join(["cat"] * 200), truncation=True)["input_ids"]
    assert len(long) == 77 and long[-1] == openai.encoder[END]
