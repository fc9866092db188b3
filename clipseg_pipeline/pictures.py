"""Mask pictures: a prompt's predicted probability map as a grayscale picture, laid over its image with the prompt as
a legend, and a contact sheet of several such overlays.

Pixels are computed in float and quantised once to 8 bits, and PNGs are written without timestamps, so the same
prediction always gives the same bytes. verify-outputs' pictures are computed in float64: float32's last bits differ
between CPUs and now and then move a pixel across an 8-bit step; float64's are far too fine to.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .tensor_io import atomic_output

OVERLAY_ALPHA = 0.6
LEGEND_HEIGHT = 18
# A contact sheet shows each overlay at most this wide, so a sheet of large photos stays a viewable size.
SHEET_CELL_WIDTH = 320
SHEET_MAX_COLUMNS = 4
SHEET_GAP = 4
# zlib's fastest level: on photo-like pictures four times as fast as its default (6), with files within 1% of its size
# (overlays come out smaller, grayscale masks larger). zlib's deflate is plain C: the same bytes on every CPU.
PNG_COMPRESS_LEVEL = 1


def probabilities(logits: torch.Tensor, size: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sigmoid of [P, h, w] logits, resized to the image's (width, height) -> [P, height, width] in [0, 1], computed
    in `dtype` (float64 for pictures whose bytes must not depend on the CPU)."""
    width, height = size
    resized = torch.nn.functional.interpolate(logits[:, None].to(dtype), size=(height, width), mode="bilinear", align_corners=False)
    return torch.sigmoid(resized[:, 0])


def quantise(values: torch.Tensor) -> np.ndarray:
    """Floats in [0, 1] -> uint8, rounded once."""
    return (values.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def mask_picture(probability: torch.Tensor):
    """A [height, width] probability map as a grayscale picture: black = 0, white = 1."""
    from PIL import Image

    return Image.fromarray(quantise(probability), "L")


def rgb_values(image, dtype: torch.dtype) -> torch.Tensor:
    """The image's pixels as [height, width, 3] values in [0, 1], in `dtype`."""
    return torch.from_numpy(np.array(image.convert("RGB"))).to(dtype) / 255.0


def overlay(image, probability: torch.Tensor, legend: str, rgb: torch.Tensor | None = None):
    """The image darkened where the mask is low, tinted red where it is high, with a legend strip underneath; computed
    in the probability's dtype. A caller drawing several overlays of one image passes its `rgb_values` in that dtype,
    converted once rather than once per overlay."""
    from PIL import Image, ImageDraw

    if rgb is None:
        rgb = rgb_values(image, probability.dtype)
    p = probability[..., None]
    red = torch.tensor([1.0, 0.1, 0.1], dtype=probability.dtype)
    mixed = rgb * (1 - OVERLAY_ALPHA * p) + red * (OVERLAY_ALPHA * p)
    picture = Image.new("RGB", (image.width, image.height + LEGEND_HEIGHT), "white")
    picture.paste(Image.fromarray(quantise(mixed), "RGB"), (0, 0))
    ImageDraw.Draw(picture).text((4, image.height + 3), legend[:200], fill="black")
    return picture


def fit_width(picture, width: int = SHEET_CELL_WIDTH):
    """The picture scaled down (aspect kept) to at most `width` pixels wide; unchanged when narrower."""
    from PIL import Image

    scale = min(1.0, width / picture.width)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture if size == picture.size else picture.resize(size, Image.Resampling.BILINEAR)


def contact_sheet(pictures: Sequence, cell_width: int = SHEET_CELL_WIDTH, max_columns: int = SHEET_MAX_COLUMNS):
    """Pictures side by side in a grid (row-major, in the given order), each scaled to at most `cell_width` wide."""
    from PIL import Image

    if not pictures:
        raise ValueError("a contact sheet needs at least one picture")
    cells = [fit_width(picture, cell_width) for picture in pictures]
    columns = min(len(cells), max_columns)
    rows = math.ceil(len(cells) / columns)
    cell_w = max(c.width for c in cells)
    cell_h = max(c.height for c in cells)
    sheet = Image.new("RGB", (columns * cell_w + (columns + 1) * SHEET_GAP, rows * cell_h + (rows + 1) * SHEET_GAP), "white")
    for index, cell in enumerate(cells):
        row, column = divmod(index, columns)
        sheet.paste(cell, (SHEET_GAP + column * (cell_w + SHEET_GAP), SHEET_GAP + row * (cell_h + SHEET_GAP)))
    return sheet


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def prompt_stem(index: int, prompt: str) -> str:
    """A file name stem per prompt: its position keeps two prompts with the same slug apart."""
    return f"{index:02d}-{slug(prompt)}"


def save_png(picture, path: Path) -> None:
    with atomic_output(path) as handle:
        picture.save(handle, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL)


def write_mask_pictures(image, logits: torch.Tensor, prompts: Sequence[str], directory: Path) -> list[Path]:
    """One overlay PNG per prompt, named by its position and text; computed in float64 (the same bytes on every CPU)."""
    probs = probabilities(logits, image.size, torch.float64)
    rgb = rgb_values(image, torch.float64)
    paths = []
    for index, (prompt, probability) in enumerate(zip(prompts, probs, strict=True)):
        path = Path(directory) / f"{prompt_stem(index, prompt)}.png"
        save_png(overlay(image, probability, prompt, rgb), path)
        paths.append(path)
    return paths
