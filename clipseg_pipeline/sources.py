"""A variant's sources (URLs, mirrors or local copies) -> verified original tensors and side files, in memory.

Every file is fetched (or read in place when local) and its sha256 checked against the pin before anything parses it
(fetch); the decoder .pth is taken from its zip and both checkpoints are read without running pickled code (original);
the tokenizer files and the image are checked. The download stage writes what this returns.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import PipelineError
from .fetch import FetchPolicy, Fetched, fetch
from .inputs import load_image
from .original import extract_member, load_checkpoint, load_clip, load_decoder
from .params import Download, Model, Source
from .tokenizer import check_hf_files, hf_files, read_bpe_gz, vocab_from_merges


class DownloadError(PipelineError):
    """The sources do not make a usable set of original files."""


def cache_path(cache: Path, url: str) -> Path:
    """Where a URL's bytes are kept between runs: keyed by the URL, so variants sharing a file fetch it once."""
    name = Path(urlparse(url).path).name or "download"
    return cache / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def fetch_all(model: Model, policy: FetchPolicy, cache: Path, root: Path) -> dict[str, Fetched]:
    fetched = {}
    for name, source in sorted(model.sources.items()):
        fetched[name] = fetch(name, source.url, source.sha256, cache_path(cache, source.url), policy, root=root)
        if not fetched[name].pinned:
            warnings.warn(
                f"source {name!r} of {model.variant} is not pinned: its sha256 is {fetched[name].sha256}; "
                f"set models.{model.variant}.sources.{name}.sha256 to it once you trust the file",
                stacklevel=1,
            )
    return fetched


def _finite(tensor: torch.Tensor) -> bool:
    # NaN and inf propagate into the min or max; aminmax reads the tensor once, far faster than isfinite().all().
    if not tensor.numel():
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def check_finite(tensors: dict[str, torch.Tensor], origin: str) -> None:
    bad = sorted(name for name, t in tensors.items() if t.is_floating_point() and not _finite(t))
    if bad:
        raise DownloadError(f"{origin}: tensor(s) with NaN or Inf values: {bad}. The checkpoint is damaged; fetch it again")


def _origin(source: Source) -> str:
    member = f", member {source.member!r}" if source.member else ""
    return f"source {source.name!r} ({source.url}{member})"


def _unpacked(source: Source, fetched: Fetched, workdir: Path, bounds: Download) -> Path:
    """The source's file, or its `member` taken out of the zip it is."""
    if not source.member:
        return fetched.path
    return extract_member(fetched.path, source.member, workdir / source.member, bounds.max_member_bytes)


def original_tensors(
    sources: dict[str, Source], fetched: dict[str, Fetched], workdir: Path, bounds: Download
) -> dict[str, torch.Tensor]:
    """The CLIP and decoder tensors under their original names, in their original dtypes: from OpenAI's CLIP file and a
    decoder file, or from one whole model's state_dict() (`checkpoint`, its CLIP keys' `clip_model.` prefix removed)."""
    if "checkpoint" in sources:
        source = sources["checkpoint"]
        clip, decoder = load_checkpoint(_unpacked(source, fetched["checkpoint"], workdir, bounds), bounds.max_bytes)
        clip_origin = decoder_origin = _origin(source)
    else:
        clip = load_clip(fetched["clip"].path, pinned=fetched["clip"].pinned, max_bytes=bounds.max_bytes)
        decoder = load_decoder(_unpacked(sources["decoder"], fetched["decoder"], workdir, bounds), bounds.max_bytes)
        clip_origin, decoder_origin = _origin(sources["clip"]), _origin(sources["decoder"])
    check_finite(clip, clip_origin)
    check_finite(decoder, decoder_origin)
    clash = sorted(clip.keys() & decoder.keys())
    if clash:
        raise DownloadError(f"the CLIP and decoder files share key(s) {clash}; is the same file configured twice?")
    return {name: t.contiguous() for name, t in (clip | decoder).items()}


def side_files(model: Model, fetched: dict[str, Fetched], max_member_bytes: int) -> dict[str, Path | bytes]:
    """The checked tokenizer files and image, by output file name: a source to copy, or bytes to write."""
    if "bpe" in fetched and not ("vocab" in fetched and "merges" in fetched):
        merges = read_bpe_gz(fetched["bpe"].path, max_member_bytes)
        files: dict[str, Path | bytes] = hf_files(merges)
        vocab_size = len(vocab_from_merges(merges))
    else:
        files = {"vocab.json": fetched["vocab"].path, "merges.txt": fetched["merges"].path}
        vocab_size = check_hf_files(files["vocab.json"], files["merges.txt"])
    expected = model.architecture.text.vocab_size
    if vocab_size != expected:
        raise DownloadError(
            f"the tokenizer has {vocab_size} tokens but models.{model.variant}.architecture.text.vocab_size is {expected}; "
            "the tokenizer files do not belong to this model"
        )
    load_image(fetched["image"].path)  # refuses what is not a whole, reasonably sized image
    return files | {"image": fetched["image"].path}


def count_dtypes(tensors: dict[str, torch.Tensor]) -> dict[torch.dtype, int]:
    counts: dict[torch.dtype, int] = {}
    for tensor in tensors.values():
        counts[tensor.dtype] = counts.get(tensor.dtype, 0) + 1
    return counts
