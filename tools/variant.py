"""clipseg-variant: checkpoint files (URLs or paths) -> a complete, pinned `models.<name>` section in params.yaml.

    clipseg-variant add NAME --clip URL_OR_PATH --decoder URL_OR_PATH [--member FILE.pth]
    clipseg-variant add NAME --checkpoint URL_OR_PATH       # a whole original model's state_dict()

The files are fetched and read as the download stage reads them (no pickled code; a TorchScript CLIP only when its
sha256 matches a pin given here), the architecture is inferred from the tensors (clipseg_pipeline.inference), every
source's sha256 is pinned, and the section is written into params.yaml with its comments and layout kept
(clipseg_pipeline.params_file); the variant joins `variants`, so `dvc repro` builds it. A refused file leaves
params.yaml as it was.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from clipseg_pipeline import params as params_mod
from clipseg_pipeline.errors import PipelineError
from clipseg_pipeline.fetch import FetchError, FetchPolicy, fetch
from clipseg_pipeline.inference import DEFAULTS, infer
from clipseg_pipeline.original import TORCHSCRIPT, describe
from clipseg_pipeline.inputs import load_image
from clipseg_pipeline.params_file import DEFAULT_PROMPTS, add_variant, variant_section
from clipseg_pipeline.sources import cache_path, original_tensors, side_files

PROG = "clipseg-variant"
# Where the download stage keeps fetched files (dvc.yaml's --cache): fetched here once, found there by URL.
CACHE = Path("data/downloads")
# The published variants' tokenizer files and reference image (as params.yaml's published sections list them).
PUBLISHED_SIDE_SOURCES = {
    "vocab": "https://huggingface.co/openai/clip-vit-base-patch32/resolve/main/vocab.json",
    "merges": "https://huggingface.co/openai/clip-vit-base-patch32/resolve/main/merges.txt",
    "image": "http://images.cocodataset.org/val2017/000000039769.jpg",
}
# OpenAI publishes each CLIP file under a URL whose second-last segment is its sha256 (its own loader checks it).
OPENAI_CLIP_URL = re.compile(r"https://openaipublic\.azureedge\.net/clip/models/([0-9a-f]{64})/[^/]+\.pt")
# Variant names become folder names and DVC stage names (download@NAME).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class VariantError(PipelineError):
    """The files cannot become a variant; params.yaml was left as it was."""


def _recorded(value: str, root: Path) -> str:
    """A source as params.yaml records it: a URL as given; a path relative to the repository root when inside it."""
    if urlsplit(value).scheme in ("http", "https", "file"):
        return value
    path = Path(value).expanduser().resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices separated by commas, like 3,6,9; found {text!r}") from None


def _wanted(args: argparse.Namespace, root: Path, current: params_mod.Params) -> dict[str, tuple[str, str | None, str | None]]:
    """Each source: (url as recorded, the pin it must match or None, the zip member or None).

    A URL another variant pinned keeps that pin: a shared file (one CLIP for many decoders) is then found in the
    download cache, checked, and not fetched again."""
    pins = {s.url: s.sha256 for model in current.models.values() for s in model.sources.values() if s.sha256}
    weights = {"checkpoint": args.checkpoint} if args.checkpoint else {"clip": args.clip, "decoder": args.decoder}
    wanted = {name: (url := _recorded(value, root), pins.get(url), None) for name, value in weights.items()}
    weight = "checkpoint" if args.checkpoint else "decoder"
    wanted[weight] = (wanted[weight][0], None, args.member)
    if "clip" in wanted:
        match = OPENAI_CLIP_URL.fullmatch(wanted["clip"][0])
        wanted["clip"] = (wanted["clip"][0], args.clip_sha256 or (match and match.group(1)) or wanted["clip"][1], None)
    for name, default in PUBLISHED_SIDE_SOURCES.items():
        given = getattr(args, name)
        url = _recorded(given, root) if given else default
        wanted[name] = (url, pins.get(url), None)
    return wanted


def _fetch_all(wanted: dict, args: argparse.Namespace, policy: FetchPolicy, root: Path) -> dict:
    fetched = {}
    for name, (url, pin, _) in sorted(wanted.items()):
        try:
            fetched[name] = fetch(name, url, pin, cache_path(root / args.cache, url), policy, root=root)
        except FetchError as exc:
            if name in PUBLISHED_SIDE_SOURCES and not getattr(args, name):
                raise VariantError(
                    f"cannot fetch the default {name} ({url}): {exc}. Pass --{name} with a local copy or another URL"
                ) from exc
            raise
    return fetched


def _check_forms(wanted: dict, fetched: dict) -> None:
    """Refusals worth saying in this command's words before the readers say them in params.yaml's."""
    if "clip" in fetched and describe(fetched["clip"].path) == TORCHSCRIPT and not fetched["clip"].pinned:
        raise VariantError(
            f"{wanted['clip'][0]} is a TorchScript archive, which is only loaded when its sha256 matches a pin you give "
            "(loading it compiles code from the file): pass --clip-sha256 with the hash its publisher gives (OpenAI's "
            "URLs carry it), or give CLIP as a plain state dict"
        )
    weight = "checkpoint" if "checkpoint" in fetched else "decoder"
    kind = describe(fetched[weight].path)
    if kind.startswith("a zip archive with members") and not wanted[weight][2]:
        raise VariantError(f"{wanted[weight][0]} is {kind}: pass --member with the .pth file to take from it")


def add(args: argparse.Namespace) -> str:
    """Add the variant; returns what to tell the user."""
    root = args.params.resolve().parent
    current = params_mod.load(args.params)
    if args.name in current.models:
        raise VariantError(f"{args.params}: models.{args.name} exists already; choose another name")
    wanted = _wanted(args, root, current)
    policy = FetchPolicy(timeout_s=current.download.timeout_s, retries=current.download.retries,
                         max_bytes=current.download.max_bytes, progress=sys.stderr.isatty())
    fetched = _fetch_all(wanted, args, policy, root)
    _check_forms(wanted, fetched)
    sources = {name: params_mod.Source(name, url, fetched[name].sha256, member)
               for name, (url, _, member) in sorted(wanted.items())}
    tensors = original_tensors(sources, fetched, root / args.cache / "extracted" / args.name, current.download)
    given = {name: value for name, value in (("extract_layers", args.extract_layers),
                                             ("decoder_num_attention_heads", args.decoder_heads),
                                             ("conditional_layer", args.conditional_layer)) if value is not None}
    inferred = infer(tensors, given, args.name)
    recorded = {name: {"url": s.url, "sha256": s.sha256, **({"member": s.member} if s.member else {})}
                for name, s in sources.items()}
    image = load_image(fetched["image"].path)  # refuses what is not a whole, reasonably sized image
    section = variant_section(inferred.architecture, recorded, inferred.assumed, args.prompt or DEFAULT_PROMPTS, image.size)
    # The whole file with the new section must parse, and the tokenizer and image must fit the model, before writing.
    data = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    data["models"][args.name] = section
    data["variants"].append(args.name)
    side_files(params_mod.parse(data).model(args.name), fetched, current.download.max_member_bytes)
    files = ", ".join(s.url for name, s in sources.items() if name not in PUBLISHED_SIDE_SOURCES)
    add_variant(args.params, args.name, section, f"Added by {PROG} from {files}")
    if inferred.assumed:
        values = ", ".join(f"{name} = {section['architecture'][name]}" for name in inferred.assumed)
        note = f"Assumed (the tensors cannot tell; the original code's defaults): {values}.\n"
    else:
        note = "Nothing assumed: every setting came from the tensors or from you.\n"
    return (
        f"Added models.{args.name} to {args.params} and to `variants`.\n{note}"
        f"Build it:  dvc repro export@{args.name}\n"
        f"The Hugging Face model will be in outputs/{args.name}/hf/."
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = top.add_subparsers(dest="command", required=True)
    add_cmd = commands.add_parser(
        "add", help="add a variant to params.yaml from checkpoint files",
        description="Add a variant to params.yaml from checkpoint files: infer its architecture, pin every file.",
        epilog=(
            "What the tensors cannot tell takes the original code's default and is marked as assumed: "
            f"extract_layers {list(DEFAULTS['extract_layers'])}, decoder heads {DEFAULTS['decoder_num_attention_heads']}, "
            f"conditional layer {DEFAULTS['conditional_layer']}. A decoder that extracts other than 3 layers needs "
            "--extract-layers."
        ),
    )
    add_cmd.add_argument("name", help="the variant's name (letters, digits, '.', '_', '-')")
    weights = add_cmd.add_mutually_exclusive_group(required=True)
    weights.add_argument("--clip", metavar="URL_OR_PATH", help="OpenAI's CLIP file (TorchScript archive or state dict)")
    weights.add_argument("--checkpoint", metavar="URL_OR_PATH",
                         help="a whole original model's state_dict() (CLIP under clip_model., and the decoder), "
                              "in place of --clip and --decoder")
    add_cmd.add_argument("--decoder", metavar="URL_OR_PATH", help="the decoder weights: a .pth, or a zip holding one")
    add_cmd.add_argument("--member", metavar="FILE", help="the .pth to take from a zip (its file name)")
    add_cmd.add_argument("--clip-sha256", metavar="HEX", help="the CLIP file's published sha256 (needed for TorchScript, "
                                                              "unless an OpenAI URL carries it)")
    for name, what in (("vocab", "vocab.json"), ("merges", "merges.txt"), ("image", "the reference image")):
        add_cmd.add_argument(f"--{name}", metavar="URL_OR_PATH",
                             help=f"{what} (default: the published one, {PUBLISHED_SIDE_SOURCES[name]})")
    add_cmd.add_argument("--extract-layers", type=_layers, metavar="I,J,K",
                         help="the vision blocks the decoder reads (default 3,6,9, assumed)")
    add_cmd.add_argument("--decoder-heads", type=int, metavar="N", help="the decoder's attention heads (default 4, assumed)")
    add_cmd.add_argument("--conditional-layer", type=int, metavar="N",
                         help="the decoder step where the condition enters (default 0, assumed)")
    add_cmd.add_argument("--prompt", action="append", metavar="TEXT",
                         help=f"a prompt to verify with (repeat for several; default: {', '.join(DEFAULT_PROMPTS)})")
    add_cmd.add_argument("--params", type=Path, default=params_mod.PARAMS_FILE, help="the params file (default: params.yaml)")
    add_cmd.add_argument("--cache", type=Path, default=CACHE,
                         help=f"where fetched files are kept, relative to the params file's folder (default: {CACHE}, "
                              "the download stage's)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    problem = None
    if not NAME_RE.fullmatch(args.name):
        problem = f"the name {args.name!r} must be letters, digits, '.', '_' or '-', starting with a letter or digit"
    elif args.clip and not args.decoder:
        problem = "--clip needs --decoder (or give a whole model's state_dict() as --checkpoint)"
    elif args.checkpoint and (args.decoder or args.clip_sha256):
        problem = "--checkpoint holds CLIP and the decoder: give it without --decoder and --clip-sha256"
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    try:
        print(add(args))
    except PipelineError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
