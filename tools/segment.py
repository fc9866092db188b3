"""segment: an exported model folder + any image + text or image prompts -> one probability map and overlay per prompt.

    python -m tools.segment --model outputs/clipseg-tiny/hf --image photo.jpg --prompt "a cat" --prompt "a remote" --out masks/
    python -m tools.segment --model outputs/clipseg-tiny/hf --image photo.jpg --image-prompt example.png --out masks/

An image prompt is an example of what to find (one-shot segmentation): the model is conditioned on it instead of text.

Writes into --out, per prompt (NN = its position): NN-<prompt>.mask.png (the sigmoid of the prediction as 8-bit
grayscale, at the image's size), NN-<prompt>.overlay.png (the mask over the image, the prompt as a legend underneath)
and, with --npy, NN-<prompt>.npy (the float32 probabilities); then contact-sheet.png with every overlay.
The image is read upright (EXIF orientation applied) in any mode and encoded once for all prompts. Not a DVC stage:
a tool to try an export on your own pictures. Progress and timings go to stderr, the written paths to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from clipseg_pipeline.errors import PipelineError
from clipseg_pipeline.runner import exit_now, run_stage
from clipseg_pipeline.hf_layout import WEIGHTS_FILE

STAGE = "segment"
CONTACT_SHEET = "contact-sheet.png"
# What from_pretrained needs from an export; anything less is not a model folder.
REQUIRED_FILES = ("config.json", WEIGHTS_FILE, "preprocessor_config.json", "vocab.json", "merges.txt")


class SegmentError(PipelineError):
    """The model folder, image or prompts cannot be used."""


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise SegmentError(
            f"{model_dir}: no such model folder; pass an export folder such as outputs/<variant>/hf (`dvc repro` writes it)"
        )
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise SegmentError(f"{model_dir}: not an exported model folder, it lacks {missing}; export it again with `dvc repro`")


def load_processor(model_dir: Path):
    from transformers import CLIPSegProcessor

    check_model_dir(model_dir)
    try:
        return CLIPSegProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise SegmentError(f"{model_dir}: the processor files do not load ({exc}); export the folder again") from exc


def load_model(model_dir: Path):
    from transformers import CLIPSegForImageSegmentation

    try:
        return CLIPSegForImageSegmentation.from_pretrained(model_dir).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise SegmentError(f"{model_dir}: the model does not load ({exc}); export the folder again") from exc


def segment(model, processor, image, ids: dict[str, torch.Tensor]) -> torch.Tensor:
    """Probabilities [prompts, height, width] at the image's size: the image is encoded once, the decoder run per prompt.

    The processor resizes the whole image to the model's square input (no crop), so resizing the prediction back to
    the image's size puts every pixel where it belongs.
    """
    from clipseg_pipeline.converted_model import hf_outputs
    from clipseg_pipeline.pictures import probabilities

    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"].to(model.dtype)
    logits = hf_outputs(model, pixels, ids["input_ids"], ids["attention_mask"])["logits"]
    return probabilities(logits, image.size)


def segment_by_images(model, processor, image, prompt_images: Sequence) -> torch.Tensor:
    """Probabilities [prompt images, height, width] at the image's size, each prompt image (an example of what to
    find) the condition: transformers' `conditional_pixel_values`, through the model's own forward."""
    from clipseg_pipeline.comparison import image_prompt_outputs
    from clipseg_pipeline.pictures import probabilities

    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"].to(model.dtype)
    prompts = processor.image_processor(images=list(prompt_images), return_tensors="pt")["pixel_values"].to(model.dtype)
    return probabilities(image_prompt_outputs(model, pixels, prompts)["logits"], image.size)


def write_results(image, probs: torch.Tensor, prompts: Sequence[str], out: Path, npy: bool) -> list[Path]:
    from clipseg_pipeline.pictures import contact_sheet, fit_width, mask_picture, overlay, prompt_stem, save_png
    from clipseg_pipeline.tensor_io import atomic_output

    paths, cells = [], []
    for index, (prompt, probability) in enumerate(zip(prompts, probs, strict=True)):
        stem = prompt_stem(index, prompt)
        picture = overlay(image, probability, prompt)
        paths += [out / f"{stem}.mask.png", out / f"{stem}.overlay.png"]
        save_png(mask_picture(probability), paths[-2])
        save_png(picture, paths[-1])
        # Only the sheet's small copy is kept: a dozen full-size overlays of a large photo would fill the memory.
        cells.append(fit_width(picture))
        if npy:
            paths.append(out / f"{stem}.npy")
            with atomic_output(paths[-1]) as handle:
                np.save(handle, probability.numpy().astype(np.float32), allow_pickle=False)
    paths.append(out / CONTACT_SHEET)
    save_png(contact_sheet(cells), paths[-1])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.segment", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="an exported model folder (outputs/<variant>/hf)")
    parser.add_argument("--image", type=Path, required=True, help="any image PIL reads (JPEG, PNG, ...; any size and mode)")
    parser.add_argument("--prompt", action="append", default=[], help="a text prompt; repeat for several")
    parser.add_argument("--image-prompt", action="append", type=Path, default=[],
                        help="an image of what to find (an example, as in one-shot segmentation); repeat for several")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the pictures into")
    parser.add_argument("--npy", action="store_true", help="also write each probability map as a float32 .npy")
    args = parser.parse_args(argv)
    if not args.prompt and not args.image_prompt:
        parser.error("give at least one --prompt or --image-prompt")

    def body() -> None:
        from clipseg_pipeline.inputs import load_image, token_ids

        started = time.perf_counter()

        def progress(message: str) -> None:
            print(f"{STAGE}: {message} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)

        # Cheap checks first, so a bad prompt or image is reported before the model is loaded.
        processor = load_processor(args.model)
        ids = token_ids(processor.tokenizer, args.prompt) if args.prompt else None
        image = load_image(args.image)
        prompt_images = [load_image(path) for path in args.image_prompt]
        labels = [*args.prompt, *(f"image {path.name}" for path in args.image_prompt)]
        progress(f"read {args.image} ({image.width}x{image.height}), {len(labels)} prompt(s)")
        model = load_model(args.model)
        progress(f"loaded {args.model} ({str(model.dtype).removeprefix('torch.')})")
        probs = torch.cat([*([segment(model, processor, image, ids)] if ids else []),
                           *([segment_by_images(model, processor, image, prompt_images)] if prompt_images else [])])
        progress("segmented")
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SegmentError(f"{args.out}: cannot create the output folder ({exc.strerror}); pass another --out") from exc
        paths = write_results(image, probs, labels, args.out, args.npy)
        progress(f"wrote {len(paths)} files to {args.out}")
        for path in paths:
            print(path)

    return run_stage(STAGE, str(args.model), body)


if __name__ == "__main__":
    exit_now(main())
