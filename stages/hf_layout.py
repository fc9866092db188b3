"""The Hugging Face model's layout without transformers: CLIPSegForImageSegmentation's state dict (every key and shape)
and its config.json, both computed from a variant's architecture.

build-model and export need only these two, and importing transformers' modelling code costs a stage seconds of
start-up; so they are written out here, and tests/test_hf_layout.py holds them to transformers (the meta model's state
dict and CLIPSegConfig's JSON) for every variant in params.yaml. config.json is the template CONFIG_TEMPLATE (what CLIPSegConfig
writes, generated from transformers) with the architecture filled in; after upgrading transformers, regenerate it:

    python -m stages.hf_layout
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

from .errors import PipelineError

CONFIG_TEMPLATE = Path(__file__).with_name("clipseg_config.template.json")
# The weights file of a Hugging Face model folder, the name from_pretrained looks for.
WEIGHTS_FILE = "model.safetensors"

# The published configs carry these text token ids; with eos_token_id == 2 the model pools the text at the argmax of
# the ids, which is what the original does (see ORIGINAL_FORMAT.md, "Text pooling").
TEXT_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


class BuildError(PipelineError):
    """The tensors do not fit the model the architecture describes."""


def config_settings(arch: Mapping) -> dict:
    """What a variant sets in CLIPSegConfig; every other field keeps transformers' default."""
    return {
        "text_config": {**arch["text"], **TEXT_TOKEN_IDS},
        "vision_config": dict(arch["vision"]),
        "projection_dim": arch["projection_dim"],
        "extract_layers": list(arch["extract_layers"]),
        "reduce_dim": arch["reduce_dim"],
        "decoder_num_attention_heads": arch["decoder_num_attention_heads"],
        "decoder_intermediate_size": arch["decoder_intermediate_size"],
        "conditional_layer": arch["conditional_layer"],
        "use_complex_transposed_convolution": arch["use_complex_transposed_convolution"],
        # The decoder layers always use ReLU whatever this says; recording it keeps config.json truthful.
        "decoder_hidden_act": "relu",
    }


def config_dict(arch: Mapping) -> dict:
    """config.json's content for `arch`: the template with the variant's settings filled in."""
    config = json.loads(CONFIG_TEMPLATE.read_text(encoding="utf-8"))
    for key, value in config_settings(arch).items():
        if isinstance(value, dict):
            config[key].update(copy.deepcopy(value))
        else:
            config[key] = copy.deepcopy(value)
    return config


ARCH_FIELDS = {
    "vision": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size"),
    "text": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings"),
    None: ("projection_dim", "extract_layers", "reduce_dim", "decoder_num_attention_heads", "decoder_intermediate_size",
           "conditional_layer", "use_complex_transposed_convolution"),
}


def architecture_of(config: Mapping) -> dict:
    """The architecture (params.yaml's form) a config describes: a config.json's content or CLIPSegConfig.to_dict()."""
    arch = {tower: {key: config[f"{tower}_config"][key] for key in keys} for tower, keys in ARCH_FIELDS.items() if tower}
    arch |= {key: config[key] for key in ARCH_FIELDS[None]}
    arch["extract_layers"] = list(arch["extract_layers"])
    return arch


def _attention(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        shapes |= {f"{prefix}.{proj}.weight": (width, width), f"{prefix}.{proj}.bias": (width,)}
    return shapes


def _layer(prefix: str, width: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    """One encoder layer, CLIP's or the decoder's: attention, two LayerNorms, a two-layer MLP."""
    return {
        **_attention(f"{prefix}.self_attn", width),
        f"{prefix}.layer_norm1.weight": (width,),               f"{prefix}.layer_norm1.bias": (width,),
        f"{prefix}.mlp.fc1.weight": (intermediate, width),      f"{prefix}.mlp.fc1.bias": (intermediate,),
        f"{prefix}.mlp.fc2.weight": (width, intermediate),      f"{prefix}.mlp.fc2.bias": (width,),
        f"{prefix}.layer_norm2.weight": (width,),               f"{prefix}.layer_norm2.bias": (width,),
    }  # fmt: skip


def _norm(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def state_dict_shapes(arch: Mapping) -> dict[str, tuple[int, ...]]:
    """Every key of CLIPSegForImageSegmentation's state dict for `arch`, with its shape."""
    text, vision, proj, d = arch["text"], arch["vision"], arch["projection_dim"], arch["reduce_dim"]
    wt, wv, patch = text["hidden_size"], vision["hidden_size"], vision["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "clip.logit_scale": (),
        "clip.text_model.embeddings.token_embedding.weight": (text["vocab_size"], wt),
        "clip.text_model.embeddings.position_embedding.weight": (text["max_position_embeddings"], wt),
        **_norm("clip.text_model.final_layer_norm", wt),
        "clip.vision_model.embeddings.class_embedding": (wv,),
        "clip.vision_model.embeddings.patch_embedding.weight": (wv, 3, patch, patch),
        "clip.vision_model.embeddings.position_embedding.weight": ((vision["image_size"] // patch) ** 2 + 1, wv),
        **_norm("clip.vision_model.pre_layrnorm", wv),
        **_norm("clip.vision_model.post_layernorm", wv),
        "clip.visual_projection.weight": (proj, wv),
        "clip.text_projection.weight": (proj, wt),
        "decoder.film_mul.weight": (d, proj), "decoder.film_mul.bias": (d,),
        "decoder.film_add.weight": (d, proj), "decoder.film_add.bias": (d,),
    }  # fmt: skip
    for k in range(text["num_hidden_layers"]):
        shapes |= _layer(f"clip.text_model.encoder.layers.{k}", wt, text["intermediate_size"])
    for k in range(vision["num_hidden_layers"]):
        shapes |= _layer(f"clip.vision_model.encoder.layers.{k}", wv, vision["intermediate_size"])
    for i in range(len(arch["extract_layers"])):
        shapes |= {f"decoder.reduces.{i}.weight": (d, wv), f"decoder.reduces.{i}.bias": (d,)}
        shapes |= _layer(f"decoder.layers.{i}", d, arch["decoder_intermediate_size"])
    if arch["use_complex_transposed_convolution"]:
        # Conv2d 3x3, ReLU, ConvTranspose2d, ReLU, ConvTranspose2d (kernel = stride = patch // 4).
        k = patch // 4
        shapes |= {
            "decoder.transposed_convolution.0.weight": (d, d, 3, 3),       "decoder.transposed_convolution.0.bias": (d,),
            "decoder.transposed_convolution.2.weight": (d, d // 2, k, k),  "decoder.transposed_convolution.2.bias": (d // 2,),
            "decoder.transposed_convolution.4.weight": (d // 2, 1, k, k),  "decoder.transposed_convolution.4.bias": (1,),
        }  # fmt: skip
    else:
        shapes |= {"decoder.transposed_convolution.weight": (d, 1, patch, patch), "decoder.transposed_convolution.bias": (1,)}
    return shapes


def check_shapes(expected: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Strict accounting: exactly the `expected` state dict keys, each with its shape."""
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong = sorted(
        f"{name}: model wants {list(expected[name])}, got {list(shapes[name])}"
        for name in expected.keys() & shapes.keys()
        if tuple(shapes[name]) != tuple(expected[name])
    )
    if missing or unexpected or wrong:
        problems = [f"{label} {items}" for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong)) if items]
        raise BuildError(
            f"the remapped tensors do not fit CLIPSegForImageSegmentation: {'; '.join(problems)}. "
            "Rerun remap-weights after fixing the variant's architecture"
        )


def write_template(path: Path = CONFIG_TEMPLATE) -> None:
    """Regenerate the template from the installed transformers: CLIPSegConfig's full JSON with this project's fixed
    settings (the text token ids, ReLU) and transformers' defaults everywhere else."""
    from transformers import CLIPSegConfig

    fixed = {"text_config": dict(TEXT_TOKEN_IDS), "decoder_hidden_act": "relu"}
    path.write_text(CLIPSegConfig(**fixed).to_json_string(use_diff=False), encoding="utf-8")


if __name__ == "__main__":
    write_template()
    print(f"wrote {CONFIG_TEMPLATE}")
