"""The export's model card: the variant's settings, sources and verification results -> README.md with Hub metadata.

Rendered with huggingface_hub's ModelCard from the template below, so the YAML block is what the Hub reads (library,
task, license). Every value comes from params.yaml, the stage reports, config.json or this project's version: nothing
from the clock, the machine or the output path, so the same inputs give the same bytes on every run and in every clone.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .architecture import Architecture
from .errors import PipelineError

PROJECT = "clipseg-pipeline"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PROJECT_URL = "https://github.com/timojl/clipseg"
PAPER_URL = "https://arxiv.org/abs/2112.10003"
# The authors' README: "The MIT license does not apply to these weights" (the decoder weights); their code is MIT and
# OpenAI's CLIP weights are MIT. A converted model carries both, so the card names no single SPDX license.
LICENSE = {
    "license": "other",
    "license_name": "clipseg-weights",
    "license_link": "https://github.com/timojl/clipseg#weights",
}
TAGS = ["clipseg", "vision", "zero-shot-image-segmentation"]
# What the usage snippet segments; the snippet runs as written on any image.
SNIPPET_PROMPTS = ("a cat", "a remote", "a blanket")
SNIPPET_IMAGE = "image.jpg"


class ModelCardError(PipelineError):
    """The inputs of the model card are incomplete."""


@dataclass(frozen=True)
class SourceRow:
    name: str
    url: str
    member: str | None
    sha256: str
    bytes: int
    pinned: bool


@dataclass(frozen=True)
class CardInputs:
    variant: str
    dtype: str
    architecture: Architecture
    image_size: int
    image_mean: Sequence[float]
    image_std: Sequence[float]
    prompts: Sequence[str]  # what verification ran the models on
    sources: Sequence[SourceRow]
    verify: Mapping  # reports/<variant>/verify.json
    export_atol: float
    export_outputs: Mapping[str, Mapping]  # the exported folder vs the reference, per output, as export's report records it
    transformers_version: str
    project_version: str
    synthetic: bool = False  # made by this project's generator: the card says so and names no third-party licence
    assumed: Sequence[str] = ()  # architecture settings taken from the original code's defaults, not from the files


TEMPLATE = """---
{{ card_data }}
---

# {{ variant }}: CLIPSeg for `transformers`

[CLIPSeg]({{ project_url }}) (Lüddecke and Ecker, [*Image Segmentation Using Text and Image Prompts*]({{ paper_url }}),
CVPR 2022) segments an image by text prompts: one probability map per prompt.
{%- if synthetic %}

**This is a synthetic model, not CLIPSeg's weights.** Its source files, listed under *Sources*, were made by
{{ project }}'s generator in exactly the published file formats, to test the conversion; it does not segment real
images. Do not publish or use it as a segmentation model.

It is converted to `CLIPSegForImageSegmentation` with its processor, stored in **{{ dtype }}**.
{%- else %}
This repository holds the original checkpoints listed under *Sources* converted to `CLIPSegForImageSegmentation` with
its processor, stored in **{{ dtype }}**.
{%- endif %}
It was made by {{ project }} {{ project_version }} with transformers {{ transformers_version }}; it needs
transformers 4.46.1 or later (4.46.0 breaks 352-pixel inputs).

## Usage

```python
import torch
from PIL import Image
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

model_dir = "."  # the folder holding this README, or this repository's id on the Hugging Face Hub
image = Image.open("{{ snippet_image }}").convert("RGB")  # any image
prompts = {{ snippet_prompts }}

processor = CLIPSegProcessor.from_pretrained(model_dir)
model = CLIPSegForImageSegmentation.from_pretrained(model_dir).eval()
inputs = processor(text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt")
inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
with torch.inference_mode():
    logits = model(**inputs).logits  # [prompts, {{ image_size }}, {{ image_size }}]
# The processor resized the whole image (no crop): resizing back puts every pixel where it belongs.
logits = torch.nn.functional.interpolate(logits[:, None].float(), size=(image.height, image.width), mode="bilinear")
masks = torch.sigmoid(logits[:, 0])  # [prompts, height, width], 1 = where the prompt is
for prompt, mask in zip(prompts, masks):
    picture = Image.fromarray((mask * 255).round().byte().numpy())  # a grayscale mask, the image's size
    print(f"{prompt}: {(mask > 0.5).float().mean().item():.1%} of the image, mask {picture.size}")
```

## Model

| setting | value |
|---|---|
{%- for name, value in settings %}
| {{ name }} | {{ value }} |
{%- endfor %}
{%- if assumed %}

**Assumed settings: {{ assumed }}.** The checkpoint's tensors do not tell these; they were set to the original CLIPSeg
code's defaults (see the table). A model trained with other values computes wrong masks although it passed
verification, which runs the same settings on both sides: if you know the values it was trained with, set them in
the variant's architecture and convert it again.
{%- endif %}

Preprocessing (`preprocessor_config.json`): resize to {{ image_size }}x{{ image_size }} (bilinear, no crop), rescale
1/255, normalize with mean {{ image_mean }} and std {{ image_std }}. Text: CLIP's byte-level BPE, at most 77 tokens.

## Sources

The sha256 of every file as it was read. A pinned file was checked against its pin in params.yaml before it was
parsed; an unpinned one is marked.

| source | from | sha256 | bytes |
|---|---|---|---|
{%- for s in sources %}
| {{ s.name }} | {{ s.url }}{% if s.member %} (member `{{ s.member }}`){% endif %} | `{{ s.sha256 }}`{% if not s.pinned %} (not pinned){% endif %} | {{ s.bytes }} |
{%- endfor %}

## Verification

The converted model was run next to an independent implementation of the original forward pass on the same inputs
(the reference image, prompts {{ prompts }}); the reference ran in {{ reference_dtype }}. The largest absolute
difference over every element is within tolerance for each output (a model that fails is not exported). Each is
given as that bound: its exact figure changes in the last bits from one CPU to another, and this card reads the same
on every machine.
{%- if dtype != "float32" %} The {{ dtype }} weights, exactly as this folder stores them, were run through that
implementation too, computing in float32; computing in {{ dtype }} adds the rounding of your runtime's arithmetic.
{%- endif %}

| output | converted (float32) vs original | this export ({{ dtype }}) vs original |
|---|---|---|
{%- for name, converted, exported in diffs %}
| {{ name }} | {{ converted }} | {{ exported }} |
{%- endfor %}
{% if published %}
Values published with the original conversion, recomputed with their preprocessing:

| output | max abs diff | tolerance | passed |
|---|---|---|---|
{%- for name, r in published %}
| {{ name }} | {{ r.cell }} | {{ r.tolerance }} | {{ r.passed }} |
{%- endfor %}
{% else %}
No published check values exist for this variant.
{% endif %}
## License
{% if synthetic %}
The weights are synthetic, made by {{ project }}, whose code and outputs are MIT-licensed; they contain no third-party
weights.
{% else %}
The weights come from the sources listed above. For the published CLIPSeg variants these are OpenAI's CLIP ViT-B/16
weights, released under the MIT license (https://github.com/openai/CLIP), and the CLIPSeg authors' decoder weights:
their code is MIT-licensed, but they state that **the MIT license does not apply to the weights** and give no other
license (see [their README]({{ license_link }})). Check both terms before you use or redistribute this model.
{% endif %}
## Citation

```bibtex
@InProceedings{lueddecke22_cvpr,
    author    = {L\\"uddecke, Timo and Ecker, Alexander},
    title     = {Image Segmentation Using Text and Image Prompts},
    booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
    month     = {June},
    year      = {2022},
    pages     = {7086-7096}
}
```
"""


def project_version() -> str:
    """This project's version: the installed package's, else pyproject.toml's (a checkout run without installing)."""
    try:
        return importlib.metadata.version(PROJECT)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "(unknown version)"


def source_rows(sources: Mapping, download_report: Mapping) -> list[SourceRow]:
    """params' sources (where from) joined with the download report (what was actually read), by source name."""
    fetched = download_report.get("sources", {})
    missing = sorted(set(sources) - set(fetched))
    if missing:
        raise ModelCardError(
            f"the download report lacks the source(s) {missing} that params.yaml lists; rerun the download stage"
        )
    return [
        SourceRow(name, source.url, source.member, fetched[name]["sha256"], fetched[name]["bytes"], fetched[name]["pinned"])
        for name, source in sorted(sources.items())
    ]


def settings(arch: Architecture) -> list[tuple[str, str]]:
    vision, text = arch.vision, arch.text
    decoder = "refined (conv 3x3 + two transposed convs)" if arch.use_complex_transposed_convolution else "one transposed conv"
    return [
        ("vision", f"ViT, {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
                   f"{vision.num_attention_heads} heads, patch {vision.patch_size}, trained at {vision.image_size} px"),
        ("text", f"{text.num_hidden_layers} layers, width {text.hidden_size}, {text.num_attention_heads} heads, "
                 f"vocabulary {text.vocab_size}, context {text.max_position_embeddings}"),
        ("projection_dim", str(arch.projection_dim)),
        ("extract_layers", str(list(arch.extract_layers))),
        ("reduce_dim", str(arch.reduce_dim)),
        ("decoder layers", f"{len(arch.extract_layers)} blocks, {arch.decoder_num_attention_heads} heads, "
                    f"feed-forward {arch.decoder_intermediate_size}, conditional layer {arch.conditional_layer}"),
        ("upsampling", decoder),
    ]


def cell(record: Mapping, tolerance: float) -> str:
    """A recorded comparison as a table cell: `within 0.0001` when it passed, else its figure (`NaN or Inf` for None)."""
    if record.get("passed"):
        return f"within {tolerance:g}"
    figure = record.get("max_abs_diff")
    return "NaN or Inf" if figure is None else f"{figure:g}"


def render(card: CardInputs) -> str:
    """The README.md text (metadata block + Markdown)."""
    from huggingface_hub import ModelCard, ModelCardData

    outputs = card.verify.get("outputs", {})
    missing = sorted(set(card.export_outputs) - set(outputs))
    if missing:
        raise ModelCardError(f"the verify report lacks the output(s) {missing}; rerun the verify-outputs stage")
    if not card.verify.get("reference_dtype"):
        raise ModelCardError("the verify report lacks reference_dtype (the reference's precision); rerun the verify-outputs stage")
    # No pipeline_tag: no transformers pipeline runs CLIPSeg (pipeline("image-segmentation") fails on it), so the card
    # claims none, and turns off the Hub's inference widget, which would call one; the usage snippet shows the way.
    license = {"license": "mit"} if card.synthetic else LICENSE
    tags = [*TAGS, "synthetic"] if card.synthetic else TAGS
    data = ModelCardData(library_name="transformers", tags=tags, inference=False, **license)
    published = card.verify.get("published_check") or {}
    model_card = ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        variant=card.variant,
        synthetic=card.synthetic,
        dtype=card.dtype,
        project=PROJECT,
        project_version=card.project_version,
        transformers_version=card.transformers_version,
        project_url=PROJECT_URL,
        paper_url=PAPER_URL,
        snippet_image=SNIPPET_IMAGE,
        snippet_prompts=repr(list(SNIPPET_PROMPTS)),
        settings=settings(card.architecture),
        assumed=", ".join(f"`{name}`" for name in card.assumed),
        image_size=card.image_size,
        image_mean=list(card.image_mean),
        image_std=list(card.image_std),
        sources=card.sources,
        prompts=", ".join(repr(p) for p in card.prompts),
        reference_dtype=card.verify["reference_dtype"],
        diffs=[(name, cell(outputs[name], card.verify.get("tolerance_atol")), cell(exported, card.export_atol))
               for name, exported in card.export_outputs.items()],
        published=[(name, {**r, "cell": cell(r, r.get("tolerance"))}) for name, r in sorted(published.items())],
    )
    # jinja drops the template's final newline; a text file ends with one.
    return model_card.content.rstrip("\n") + "\n"
