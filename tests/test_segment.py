"""Tests for stages/segment.py: any image, any mode and size, several prompts -> masks at the image's size, overlays,
a contact sheet; clear one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipseg_pipeline import pictures
from tools import segment, synthetic
from tests.pipeline_fixture import REPO, VARIANT, tiny_pipeline  # noqa: F401

PROMPTS = ["a cat", "a remote"]
EXIF_ORIENTATION = 0x0112
ROTATED_90 = 6  # the stored pixels must be turned 90 degrees clockwise to be upright


def picture(size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(synthetic.image_pixels(size).numpy(), "RGB")


def write_rgba(path: Path) -> tuple[int, int]:
    image = picture((300, 200)).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (200, 1))
    image.putalpha(Image.fromarray(alpha, "L"))
    image.save(path)
    return image.size


def write_grayscale(path: Path) -> tuple[int, int]:
    image = picture((257, 123)).convert("L")
    image.save(path)
    return image.size


def write_palette(path: Path) -> tuple[int, int]:
    image = picture((200, 150)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.save(path)
    return image.size


def write_exif_rotated_jpeg(path: Path) -> tuple[int, int]:
    image = picture((320, 180))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90
    image.save(path, format="JPEG", exif=exif)
    return (180, 320)  # upright: width and height swap


def write_tiny(path: Path) -> tuple[int, int]:
    picture((7, 5)).save(path)
    return (7, 5)


IMAGES = {
    "rgba.png": write_rgba,
    "grayscale.png": write_grayscale,
    "palette.png": write_palette,
    "rotated.jpg": write_exif_rotated_jpeg,
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_segment_writes_masks_at_the_upright_image_size(tiny_pipeline, tmp_path, name):  # noqa: F811
    image_path = tmp_path / name
    width, height = IMAGES[name](image_path)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_pipeline.export), "--image", str(image_path), "--out", str(out), "--npy"]
    assert segment.main(argv + [arg for p in PROMPTS for arg in ("--prompt", p)]) == 0
    stems = ["00-a-cat", "01-a-remote"]
    expected = {f"{s}.{kind}" for s in stems for kind in ("mask.png", "overlay.png", "npy")} | {"contact-sheet.png"}
    assert {p.name for p in out.iterdir()} == expected
    for stem in stems:
        with Image.open(out / f"{stem}.mask.png") as mask:
            assert (mask.mode, mask.size) == ("L", (width, height))
            grays = np.asarray(mask)
        probs = np.load(out / f"{stem}.npy")
        assert probs.dtype == np.float32 and probs.shape == (height, width)
        # The model's probabilities, resized: they vary over the image (a constant would be a fill, not an output),
        # though the mask's grays may all be 0: the prompts name nothing the trained tiny model sees in these pictures.
        assert 0.0 <= probs.min() < probs.max() <= 1.0
        assert np.array_equal(np.round(probs * 255).astype(np.uint8), grays)
        with Image.open(out / f"{stem}.overlay.png") as overlay:
            assert overlay.size == (width, height + pictures.LEGEND_HEIGHT)
    with Image.open(out / "contact-sheet.png") as sheet:
        assert sheet.width > min(width, pictures.SHEET_CELL_WIDTH) * len(PROMPTS)


def test_segment_handles_an_image_smaller_than_a_patch(tiny_pipeline, tmp_path):  # noqa: F811
    size = write_tiny(tmp_path / "tiny.png")
    assert segment.main(["--model", str(tiny_pipeline.export), "--image", str(tmp_path / "tiny.png"), "--prompt", "a cat", "--out", str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "00-a-cat.mask.png") as mask:
        assert mask.size == size


def test_encoding_the_image_once_gives_what_the_models_own_forward_gives(tiny_pipeline):  # noqa: F811
    from clipseg_pipeline.inputs import load_image, token_ids

    processor = segment.load_processor(tiny_pipeline.export)
    model = segment.load_model(tiny_pipeline.export)
    image = load_image(tiny_pipeline.original / "image")
    prompts = ["a cat", "a remote", "a blanket"]
    ids = token_ids(processor.tokenizer, prompts)
    got = segment.segment(model, processor, image, ids)
    batch = processor(text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits
    assert got.shape == (3, image.height, image.width)
    torch.testing.assert_close(got, pictures.probabilities(logits, image.size), atol=1e-5, rtol=0)


def test_segment_runs_from_the_command_line(tiny_pipeline, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "tools.segment", "--model", str(tiny_pipeline.export), "--image", str(tiny_pipeline.original / "image"),
         "--prompt", "a cat", "--out", str(out)],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(out / "00-a-cat.mask.png"), str(out / "00-a-cat.overlay.png"), str(out / "contact-sheet.png")]
    assert "segment: loaded" in result.stderr and " s)" in result.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--model": "absent"}, r"absent: no such model folder; pass an export folder such as outputs/<variant>/hf"),
        ({"--image": "not-an-image.txt"}, r"not-an-image.txt: not a readable image"),
        ({"--image": "absent.png"}, r"absent.png: not a readable image"),
        ({"--prompt": "  "}, r"prompt 0 is '  '; every prompt must be a non-empty text"),
    ],
)
def test_segment_errors_are_one_clear_line(tiny_pipeline, tmp_path, capsys, change, message):  # noqa: F811
    (tmp_path / "not-an-image.txt").write_text("hello", encoding="utf-8")
    args = {"--model": str(tiny_pipeline.export), "--image": str(tiny_pipeline.original / "image"), "--prompt": "a cat", "--out": str(tmp_path / "out")}
    args |= {k: str(tmp_path / v) if k != "--prompt" else v for k, v in change.items()}
    assert segment.main([x for pair in args.items() for x in pair]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("segment ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_folder_without_weights_is_not_a_model(tiny_pipeline, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(segment.SegmentError, match=r"not an exported model folder, it lacks \['model.safetensors'"):
        segment.check_model_dir(folder)


def test_contact_sheet_lays_pictures_out_in_rows():
    cells = [Image.new("RGB", (640, 100), "red") for _ in range(5)]
    sheet = pictures.contact_sheet(cells)
    cell_w, cell_h = pictures.SHEET_CELL_WIDTH, 50  # scaled to the cell width, aspect kept
    columns, rows = pictures.SHEET_MAX_COLUMNS, 2
    gap = pictures.SHEET_GAP
    assert sheet.size == (columns * cell_w + (columns + 1) * gap, rows * cell_h + (rows + 1) * gap)
    with pytest.raises(ValueError, match="at least one picture"):
        pictures.contact_sheet([])


def test_an_image_prompt_segments_as_the_original_model_would(tiny_pipeline, tmp_path):  # noqa: F811
    # The image prompt through the tool (transformers' processor and forward) against the reference's image-prompt
    # path on the original tensors: the same probabilities at the image's size.
    import numpy as np
    import yaml

    from clipseg_pipeline.architecture import Architecture
    from clipseg_pipeline.inputs import crop, load_image, pixel_values
    from clipseg_pipeline.reference import image_prompt_forward
    from clipseg_pipeline.tensor_io import TensorFile

    image = load_image(tiny_pipeline.original / "image")
    crop(image, (95, 190, 245, 340), "test").save(tmp_path / "example.png")
    out = tmp_path / "masks"
    done = subprocess.run(
        [sys.executable, "-m", "tools.segment", "--model", str(tiny_pipeline.export), "--image", str(tiny_pipeline.original / "image"),
         "--prompt", "a cat", "--image-prompt", str(tmp_path / "example.png"), "--out", str(out), "--npy"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.glob("*.npy")) == ["00-a-cat.npy", "01-image-example-png.npy"]
    got = np.load(out / "01-image-example-png.npy")
    params = yaml.safe_load(tiny_pipeline.params.read_text(encoding="utf-8"))
    arch = Architecture.from_mapping(params["models"][VARIANT]["architecture"])
    mean, std = params["processor"]["image_mean"], params["processor"]["image_std"]
    example = load_image(tmp_path / "example.png")
    with torch.inference_mode():
        logits = image_prompt_forward(TensorFile(tiny_pipeline.original / "original.safetensors"), arch,
                                      pixel_values(image, 352, mean, std), pixel_values(example, 352, mean, std),
                                      torch.float64)["logits"]
    want = pictures.probabilities(logits, image.size, torch.float64)[0].numpy()
    assert got.shape == (image.height, image.width) and np.abs(got - want).max() < 1e-4


def test_without_any_prompt_the_tool_says_what_to_give(tiny_pipeline, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:
        segment.main(["--model", str(tiny_pipeline.export), "--image", str(tiny_pipeline.original / "image"), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "give at least one --prompt or --image-prompt" in capsys.readouterr().err
