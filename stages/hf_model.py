"""The Hugging Face side, through transformers itself: CLIPSegConfig from a variant's architecture, the model's structure
on the meta device (no memory, no random initialisation), and the strict accounting of a set of tensors against its
state dict. build-model uses the transformers-free equivalents in hf_layout, which tests hold to these."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

from .hf_layout import check_shapes, config_settings


def config_from_architecture(arch: Mapping) -> CLIPSegConfig:
    return CLIPSegConfig(**config_settings(arch))


def meta_model(config: CLIPSegConfig) -> CLIPSegForImageSegmentation:
    """The model's structure without memory or a random initialisation."""
    with torch.device("meta"):
        return CLIPSegForImageSegmentation(config)


def check_state_dict(model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Strict accounting: exactly the model's state dict keys, each with the model's shape."""
    check_shapes({name: tuple(t.shape) for name, t in model.state_dict().items()}, shapes)
