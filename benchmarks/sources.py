"""Full-size synthetic sources for the benchmark, in the published formats, from tools.synthetic.

    python benchmarks/sources.py --project DIR --out DIR [--seed 0]

Writes into --out (the project whose `tools` package is used is --project, default: this repository):

- `clip.pt`: OpenAI's CLIP ViT-B/16 TorchScript archive (mixed fp16/fp32), shared by the three variants;
- `weights.zip`: the authors' zip layout, `clipseg_weights/{rd64-uni,rd16-uni,rd64-uni-refined}.pth`;
- `vocab.json` + `merges.txt`: a 49408-entry CLIP BPE (the synthetic tokenizer's merges, extended with distinct
  synthetic merges up to CLIP's 48894), so the tokenizer fits the published token table;
- `image.jpg`: the synthetic reference image;
- `original-rd64.pth`: the full in-memory original rd64 model's `state_dict()` as the old one-shot conversion
  script took it (`clip_model.*` in float32 as CLIPSeg loads CLIP on the CPU, the vision keys again under `model.`,
  sharing storage as in the original, and the decoder keys including the unused `reduce.*`), saved with torch.save;
- `sources.json`: every file's size and sha256, and the figures the benchmark quotes (parameters, bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Variant -> (synthetic preset, decoder member), as params.yaml and the published zip name them.
VARIANTS = {
    "clipseg-rd64": ("vit-b16-rd64", "rd64-uni.pth"),
    "clipseg-rd16": ("vit-b16-rd16", "rd16-uni.pth"),
    "clipseg-rd64-refined": ("vit-b16-rd64-refined", "rd64-uni-refined.pth"),
}
ZIP_FOLDER = "clipseg_weights"


def full_merges(tiny: list[tuple[str, str]], count: int, byte_chars: list[str]) -> list[tuple[str, str]]:
    """`tiny` followed by distinct synthetic merges of two byte characters whose concatenation is not yet a token."""
    tokens = {*byte_chars, *(c + "</w>" for c in byte_chars), *(a + b for a, b in tiny)}
    merges = list(tiny)
    for first in byte_chars:
        for second in byte_chars:
            if len(merges) == count:
                return merges
            if first + second not in tokens:
                tokens.add(first + second)
                merges.append((first, second))
    if len(merges) != count:
        raise SystemExit(f"only {len(merges)} distinct synthetic merges are possible, {count} wanted")
    return merges


def full_model_state_dict(clip: dict, decoder: dict, torch) -> dict:
    """The original CLIPDensePredT's state_dict(): CLIP as float32 (clip.load(device='cpu') calls .float()), the
    scalars gone (build_model deletes them), `model.*` the very same vision tensors (`self.model = clip.visual`)."""
    scalars = ("input_resolution", "context_length", "vocab_size")
    weights = {name: tensor.float() for name, tensor in clip.items() if name not in scalars}
    state = {f"clip_model.{name}": tensor for name, tensor in weights.items()}
    state |= {f"model.{name.removeprefix('visual.')}": tensor for name, tensor in weights.items() if name.startswith("visual.")}
    return state | decoder


def write_tokenizer(tokenizer, merges: list[tuple[str, str]], out: Path) -> None:
    """vocab.json + merges.txt through the project's own writer (its name has changed over time)."""
    if hasattr(tokenizer, "write_hf_files"):
        tokenizer.write_hf_files(merges, out)
    else:
        for name, data in tokenizer.hf_files(merges).items():
            (out / name).write_bytes(data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=HERE.parent, help="the project whose tools package to use")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.project.resolve()))
    import torch

    from clipseg_pipeline import tokenizer
    from tools import synthetic

    started = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    arch = synthetic.preset_arch("vit-b16-rd64")
    clip = synthetic.clip_state_dict(arch, args.seed)
    synthetic.write_clip_torchscript(clip, out / "clip.pt")

    payloads = {}
    decoders = {}
    for variant, (preset, member) in VARIANTS.items():
        decoders[variant] = synthetic.decoder_state_dict(synthetic.preset_arch(preset), args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            saved = Path(tmp) / member  # torch names the archive's inner folder after the file's stem
            torch.save(decoders[variant], saved)
            payloads[member] = saved.read_bytes()
    with zipfile.ZipFile(out / "weights.zip", "w") as archive:
        for member, payload in payloads.items():
            info = zipfile.ZipInfo(f"{ZIP_FOLDER}/{member}", date_time=synthetic.ZIP_TIME)
            info.create_system, info.external_attr, info.compress_type = 3, 0o644 << 16, zipfile.ZIP_STORED
            archive.writestr(info, payload)

    byte_chars = list(tokenizer.bytes_to_unicode().values())
    merges = full_merges(synthetic.train_bpe(), tokenizer.MAX_MERGES, byte_chars)
    write_tokenizer(tokenizer, merges, out)
    vocab_size = len(json.loads((out / "vocab.json").read_text(encoding="utf-8")))
    if vocab_size != arch["text"]["vocab_size"]:
        raise SystemExit(f"the tokenizer has {vocab_size} entries, the architecture wants {arch['text']['vocab_size']}")
    synthetic.write_image(out / "image.jpg")

    # The old script's input: the full rd64 model, with the `reduce` layer the original model defines but never uses.
    reduce_arch = synthetic.preset_arch("vit-b16-rd64")
    decoder_full = synthetic.decoder_state_dict(reduce_arch, args.seed, include_reduce=True)
    full = full_model_state_dict(clip, decoder_full, torch)
    torch.save(full, out / "original-rd64.pth")
    unique = {id(t): t for t in full.values()}.values()

    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(out.iterdir()) if p.is_file() and p.name != "sources.json"}
    manifest = {
        "seed": args.seed,
        "files": files,
        "members": {variant: member for variant, (_, member) in VARIANTS.items()},
        "vocab_size": vocab_size,
        "merges": len(merges),
        "original_keys": len(full),
        "original_parameters": sum(t.numel() for t in unique),
        "original_float32_bytes": sum(t.numel() * 4 for t in unique),
        "seconds": time.perf_counter() - started,
    }
    (out / "sources.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
