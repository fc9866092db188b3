"""Mask pictures: a prompt's predicted probability map laid over its image, with the prompt as a legend.

Pixels are computed in float and quantised once to 8 bits, and PNGs are written without timestamps, so the same
prediction always gives the same bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .tensor_io import atomic_output

OVERLAY_ALPHA = 0.6
LEGEND_HEIGHT = 18


def probabilities(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sigmoid of [P, h, w] logits, resized to the image's (width, height) -> [P, height, width] in [0, 1]."""
    width, height = size
    resized = torch.nn.functional.interpolate(logits[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return torch.sigmoid(resized[:, 0])


def overlay(image, probability: torch.Tensor, legend: str):
    """The image darkened where the mask is low, tinted red where it is high, with a legend strip underneath."""
    from PIL import Image, ImageDraw

    rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)) / 255.0
    p = probability[..., None]
    red = torch.tensor([1.0, 0.1, 0.1])
    mixed = rgb * (1 - OVERLAY_ALPHA * p) + red * (OVERLAY_ALPHA * p)
    pixels = (mixed.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    picture = Image.new("RGB", (image.width, image.height + LEGEND_HEIGHT), "white")
    picture.paste(Image.fromarray(pixels, "RGB"), (0, 0))
    ImageDraw.Draw(picture).text((4, image.height + 3), legend[:200], fill="black")
    return picture


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def save_png(picture, path: Path) -> None:
    with atomic_output(path) as handle:
        picture.save(handle, format="PNG", optimize=False, compress_level=6)


def write_mask_pictures(image, logits: torch.Tensor, prompts: Sequence[str], directory: Path) -> list[Path]:
    """One overlay PNG per prompt, named by its position and text."""
    probs = probabilities(logits, image.size)
    paths = []
    for index, (prompt, probability) in enumerate(zip(prompts, probs, strict=True)):
        path = Path(directory) / f"{index:02d}-{slug(prompt)}.png"
        save_png(overlay(image, probability, prompt), path)
        paths.append(path)
    return paths
