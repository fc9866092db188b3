"""The ONNX export's model card: its files, what each was checked against and the measured differences -> README.md
with the Hub metadata transformers.js models carry (library_name: transformers.js, base_model).

Every value comes from params.yaml, the stage's own checks and this project's version, so the same inputs give the
same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .model_card import LICENSE, PAPER_URL, PROJECT, PROJECT_URL, SNIPPET_IMAGE, SNIPPET_PROMPTS, TAGS

CARD_FILE = "README.md"


@dataclass(frozen=True)
class OnnxCardInputs:
    variant: str
    base_model: str | None
    synthetic: bool
    image_size: int
    prompts: Sequence[str]  # what verification ran on
    reference_dtype: str  # verify-outputs' reference precision
    files: Sequence[Mapping]  # per file: dtype, path, bytes, atol, mask_agreement (least), checks (recorded)
    project_version: str


TEMPLATE = """---
{{ card_data }}
---

# {{ variant }}: CLIPSeg in ONNX, for onnxruntime and transformers.js

[CLIPSeg]({{ project_url }}) ([paper]({{ paper_url }})) segments an image by text prompts: one map of logits per
prompt ({{ image_size }}x{{ image_size }}; sigmoid > 0.5 is the mask).
{%- if synthetic %}

**This is a synthetic model, not CLIPSeg's weights**: made by {{ project }}'s generator to test the conversion, it does
not segment real images.
{%- endif %}
Made by {{ project }} {{ project_version }} from the original checkpoints, through its verified `transformers` model.

## Files

| transformers.js dtype | file | bytes |
|---|---|---|
{%- for f in files %}
| `{{ f.dtype }}` | `{{ f.path }}` | {{ f.bytes }} |
{%- endfor %}

One graph: inputs `input_ids` and `attention_mask` [prompts, length <= 77] (int64) and `pixel_values`
[1 or prompts, 3, {{ image_size }}, {{ image_size }}] (float32); output `logits` [prompts, {{ image_size }},
{{ image_size }}]. One image serves every prompt and is encoded once; or give one image per prompt.

## Usage (transformers.js)

```javascript
import { AutoTokenizer, AutoProcessor, CLIPSegForImageSegmentation, RawImage } from '@huggingface/transformers';

const model_id = '{{ repo_hint }}';
const tokenizer = await AutoTokenizer.from_pretrained(model_id);
const processor = await AutoProcessor.from_pretrained(model_id);
const model = await CLIPSegForImageSegmentation.from_pretrained(model_id, { dtype: 'fp32' });  // or 'fp16', 'q8'
const text_inputs = tokenizer({{ snippet_prompts }}, { padding: true, truncation: true });
const image_inputs = await processor(await RawImage.read('{{ snippet_image }}'));
const { logits } = await model({ ...text_inputs, ...image_inputs });  // dims [3, {{ image_size }}, {{ image_size }}]
```

## Verification

onnxruntime (CPU) ran each file on the reference image and prompts {{ prompts }}, both with one image for every prompt
and with the image repeated for each; every logit was compared with an independent implementation of the original
forward pass (run in {{ reference_dtype }}). A file outside its tolerance is not published.

| file | tolerance (max abs diff) | least mask agreement | measured max abs diff | measured mask agreement |
|---|---|---|---|---|
{%- for f in files %}
| `{{ f.path }}` | {{ f.atol }} | {{ f.mask_floor }} | {{ f.measured_diff }} | {{ f.measured_agreement }} |
{%- endfor %}

Mask agreement is the share of pixels on the same side of 0.5 (after sigmoid) as the reference's mask.
{%- if has_fp32 %} The float32 file's difference is float32 rounding noise, which changes in its last bits from one
CPU to another: it is given as its bound.{% endif %}

## License
{% if synthetic %}
Synthetic weights made by {{ project }}, MIT-licensed.
{% else %}
OpenAI's CLIP weights are MIT-licensed; the CLIPSeg authors state that the MIT license does not apply to their decoder
weights and give no other (see [their README]({{ license_link }})). Check both before you use or redistribute this.
{% endif %}"""


def render(card: OnnxCardInputs) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    license = {"license": "mit"} if card.synthetic else LICENSE
    tags = [*TAGS, "onnx", *(["synthetic"] if card.synthetic else [])]
    extra = {"base_model": card.base_model} if card.base_model else {}
    data = ModelCardData(library_name="transformers.js", tags=tags, inference=False, **license, **extra)
    model_card = ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        variant=card.variant,
        synthetic=card.synthetic,
        project=PROJECT,
        project_version=card.project_version,
        project_url=PROJECT_URL,
        paper_url=PAPER_URL,
        license_link=LICENSE["license_link"],
        image_size=card.image_size,
        files=card.files,
        has_fp32=any(f["dtype"] == "fp32" for f in card.files),
        prompts=", ".join(repr(p) for p in card.prompts),
        reference_dtype=card.reference_dtype,
        repo_hint=f"<your Hub id>/{card.variant}-onnx",
        snippet_prompts=repr(list(SNIPPET_PROMPTS)),
        snippet_image=SNIPPET_IMAGE,
    )
    return model_card.content.rstrip("\n") + "\n"
