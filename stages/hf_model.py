"""The Hugging Face side: CLIPSegConfig from a variant's architecture, the model's structure on the meta device (no
memory, no random initialisation), and the strict accounting of a set of tensors against its state dict."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

from .errors import PipelineError

# The published configs carry these text token ids; with eos_token_id == 2 the model pools the text at the argmax of
# the ids, which is what the original does (see ORIGINAL_FORMAT.md, "Text pooling").
TEXT_BOS_TOKEN_ID = 0
TEXT_EOS_TOKEN_ID = 2
TEXT_PAD_TOKEN_ID = 1


class BuildError(PipelineError):
    """The tensors do not fit the model the architecture describes."""


def config_from_architecture(arch: Mapping) -> CLIPSegConfig:
    return CLIPSegConfig(
        text_config={
            **arch["text"],
            "bos_token_id": TEXT_BOS_TOKEN_ID,
            "eos_token_id": TEXT_EOS_TOKEN_ID,
            "pad_token_id": TEXT_PAD_TOKEN_ID,
        },
        vision_config=dict(arch["vision"]),
        projection_dim=arch["projection_dim"],
        extract_layers=list(arch["extract_layers"]),
        reduce_dim=arch["reduce_dim"],
        decoder_num_attention_heads=arch["decoder_num_attention_heads"],
        decoder_intermediate_size=arch["decoder_intermediate_size"],
        conditional_layer=arch["conditional_layer"],
        use_complex_transposed_convolution=arch["use_complex_transposed_convolution"],
        # The decoder layers always use ReLU whatever this says; recording it keeps config.json truthful.
        decoder_hidden_act="relu",
    )


def meta_model(config: CLIPSegConfig) -> CLIPSegForImageSegmentation:
    """The model's structure without memory or a random initialisation."""
    with torch.device("meta"):
        return CLIPSegForImageSegmentation(config)


def check_state_dict(model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Strict accounting: exactly the model's state dict keys, each with the model's shape."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong = sorted(
        f"{name}: model wants {list(expected[name])}, got {list(shapes[name])}"
        for name in expected.keys() & shapes.keys()
        if tuple(shapes[name]) != expected[name]
    )
    if missing or unexpected or wrong:
        problems = [f"{label} {items}" for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong)) if items]
        raise BuildError(
            f"the remapped tensors do not fit CLIPSegForImageSegmentation: {'; '.join(problems)}. "
            "Rerun remap-weights after fixing the variant's architecture"
        )
