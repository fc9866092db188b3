"""Tests for stages/pictures.py: verify-outputs' mask pictures are the overlays drawn one by one, in the same bytes on
every run."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from clipseg_pipeline import pictures
from tools import synthetic

PROMPTS = ["a cat", "a remote", "a blanket"]


def test_mask_pictures_are_the_overlays_with_the_image_converted_once(tmp_path):
    image = Image.fromarray(synthetic.image_pixels((64, 48)).numpy(), "RGB")
    logits = torch.linspace(-6, 6, len(PROMPTS) * 16 * 16, dtype=torch.float64).reshape(len(PROMPTS), 16, 16)
    paths = pictures.write_mask_pictures(image, logits, PROMPTS, tmp_path / "first")
    probs = pictures.probabilities(logits, image.size, torch.float64)
    for path, prompt, probability in zip(paths, PROMPTS, probs, strict=True):
        np.testing.assert_array_equal(np.array(Image.open(path)), np.array(pictures.overlay(image, probability, prompt)))
    again = pictures.write_mask_pictures(image, logits, PROMPTS, tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
