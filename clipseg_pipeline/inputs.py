"""The model inputs every consumer shares: the published processor settings, the tokenizer and pixel values."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PipelineError

if TYPE_CHECKING:  # tensors come from transformers' processors; export checks token ids as numpy arrays, without torch
    import torch

# CLIP's text context; the published processors set the tokenizer's model_max_length to it.
CONTEXT_LENGTH = 77
# PIL's BILINEAR, as the published preprocessor_config.json has it.
RESAMPLE_BILINEAR = 2


class InputError(PipelineError):
    """An image or prompt that cannot be turned into model inputs."""


def tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    # transformers 5.x's tokenizers-backed CLIPTokenizer silently ignores vocab_file/merges_file (it then tokenizes
    # everything to a 3-token vocabulary): the files must be passed as `vocab` and `merges`.
    tok = CLIPTokenizer(
        vocab=str(Path(directory) / "vocab.json"),
        merges=str(Path(directory) / "merges.txt"),
        model_max_length=CONTEXT_LENGTH,
    )
    if len(tok) < 2 + 256:
        raise InputError(f"{directory}: the tokenizer files give only {len(tok)} tokens; expected CLIP's byte-level BPE")
    return tok


def load_image(path: Path):
    """An RGB PIL image, upright as its EXIF orientation says, or a clear error naming the file.

    Images larger than PIL's decompression-bomb bound (about 89 million pixels) are refused before they are decoded.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                upright = ImageOps.exif_transpose(image)
                return _eight_bit(upright).convert("RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: refusing an image this large ({exc}); use an image of a few megapixels") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from exc


def crop(image, box: Sequence[int], where: str):
    """The part of a PIL image inside `box` (left, top, right, bottom), refused when the box leaves the image."""
    left, top, right, bottom = box
    if right > image.width or bottom > image.height:
        raise InputError(f"{where}: the box {list(box)} reaches beyond the {image.width}x{image.height} image; keep "
                         f"right <= {image.width} and bottom <= {image.height}")
    return image.crop((left, top, right, bottom))


def _eight_bit(image):
    """A 16-bit grey image (PNG, TIFF) scaled to 8 bits, as a viewer shows it; any other image as it is. PIL's convert
    would clip its values at 255 instead: every grey above 1/257 of white would turn white."""
    if not image.mode.startswith("I;16"):
        return image
    import numpy as np
    from PIL import Image

    grey = np.asarray(image).astype(np.float64)  # "I;16", "I;16L" and "I;16B" come as uint16 in their byte order
    return Image.fromarray(np.rint(grey * (255 / 65535)).astype(np.uint8), "L")


def pixel_values(image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An RGB PIL image -> [1, 3, size, size] float32, as the published CLIPSeg image processor computes it
    (transformers' ViTImageProcessorPil): resized to size x size by PIL (bilinear, no crop), rescaled by 1/255 in
    float64 then rounded to float32, normalized in float32. The same operations on the same values, so the same bits
    (tests/test_inputs.py holds it to the processor), without importing transformers: verify-outputs computes its
    reference's input while the stage is still importing transformers."""
    import numpy as np
    import torch

    resized = np.asarray(image.resize((size, size), resample=RESAMPLE_BILINEAR), dtype=np.uint8)
    rescaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalized = (rescaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1))[None])


def token_ids(tok, prompts: Sequence[str | bytes], padding: str = "longest", tensors: str = "pt") -> dict:
    """{"input_ids", "attention_mask"} [P, L] for the prompts, as torch tensors (`tensors` "pt") or numpy arrays ("np")."""
    if isinstance(prompts, (str, bytes)):
        raise InputError(f"expected a list of prompts, got the single text {prompts[:60]!r}; pass [text]")
    if not prompts:
        raise InputError("no prompts given; pass at least one prompt text")
    texts = [_text(index, prompt) for index, prompt in enumerate(prompts)]
    # Prompts longer than CLIP's context are cut (the end token is kept), as CLIP's own tokenize(truncate=True) does.
    encoded = tok(texts, padding=padding, truncation=True, max_length=CONTEXT_LENGTH, return_tensors=tensors)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _text(index: int, prompt: object) -> str:
    """A prompt as text the tokenizer takes: bytes must be UTF-8, and text must be encodable as UTF-8."""
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"prompt {index} ({prompt[:60]!r}) is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                "write prompts as UTF-8"
            ) from exc
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"prompt {index} is {prompt!r}; every prompt must be a non-empty text")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"prompt {index} ({prompt[:60]!r}) holds characters that are not text ({exc.reason}); fix its encoding"
        ) from exc
    return prompt


def prompt_pixel_values(image, boxes: Sequence[Sequence[int]], size: int, mean: Sequence[float], std: Sequence[float],
                        where: str):
    """Image prompts, crops of `image`, each preprocessed as a query image is (to size x size, as transformers'
    processor does for `visual_prompt`): [K, 3, size, size]."""
    import torch

    return torch.cat([pixel_values(crop(image, box, f"{where}[{i}]"), size, mean, std) for i, box in enumerate(boxes)])
