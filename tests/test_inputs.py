"""Tests for stages/inputs.py's pixel values: the same bits as the published CLIPSeg image processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipseg_pipeline import inputs
from tests.pipeline_fixture import SYNTHETIC

PUBLISHED = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def processor_pixels(image, size: int, mean, std) -> torch.Tensor:
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    processor = ViTImageProcessorPil(do_resize=True, size={"height": size, "width": size}, resample=inputs.RESAMPLE_BILINEAR,
                                     do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(mean), image_std=list(std))
    return processor(images=image, return_tensors="pt")["pixel_values"]


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("image", [
    pytest.param(lambda: inputs.load_image(SYNTHETIC / "image.jpg"), id="synthetic-photo"),
    pytest.param(lambda: noise(640, 480, 0), id="noise-640x480"),
    pytest.param(lambda: noise(37, 53, 1), id="noise-37x53-upscaled"),
    pytest.param(lambda: noise(1, 1, 2), id="one-pixel"),
    pytest.param(lambda: Image.new("RGB", (352, 352), (255, 0, 17)), id="flat-352"),
])
@pytest.mark.parametrize(("mean", "std"), [PUBLISHED, HALF], ids=["imagenet", "half"])
@pytest.mark.parametrize("size", [352, 224])
def test_pixel_values_are_the_published_processors_bit_for_bit(image, mean, std, size):
    picture = image()
    ours = inputs.pixel_values(picture, size, mean, std)
    theirs = processor_pixels(picture, size, mean, std)
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape == (1, 3, size, size)
    assert ours.is_contiguous()
    assert torch.equal(ours, theirs)
