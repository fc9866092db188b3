"""The converted model as transformers runs it: loaded from a model folder, and its three outputs for one image and
several prompts with the image encoded once."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import PipelineError
from .hf_layout import WEIGHTS_FILE


class ModelLoadError(PipelineError):
    """A model folder that does not load as the model its config.json describes."""


def load_model(directory: Path):
    """transformers' CLIPSegForImageSegmentation built from config.json without initialising its weights, then given
    model.safetensors' tensors (memory-mapped, as from_pretrained maps them). A folder whose weights do not fit its
    config.json is refused, every mismatch listed: from_pretrained would fill missing or misshapen weights with random
    values and drop unexpected ones, with only a warning.

    from_pretrained ends in the same model (tests/test_comparison.py holds the two to the same state, attention
    implementation and outputs), but in a fresh process it first compiles the regular expressions of transformers'
    checkpoint conversion tables: 0.1-0.3 s at full size, against 0.03 s for this."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation
    from transformers.initialization import no_init_weights

    try:
        config = CLIPSegConfig.from_pretrained(directory)
        with no_init_weights():  # every weight is replaced below: initialising 600 MB would be wasted
            model = CLIPSegForImageSegmentation(config)
        weights = load_file(directory / WEIGHTS_FILE)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(f"{directory}: the model does not load ({str(exc).splitlines()[0]}); rerun build-model") from exc

    def described(tensor) -> str:  # a float32 weight by its shape alone, as from_pretrained's messages give it
        return f"{list(tensor.shape)}" + ("" if tensor.dtype == torch.float32 else f" {tensor.dtype}")

    wanted = {name: described(t) for name, t in model.state_dict().items()}
    found = {name: described(t) for name, t in weights.items()}
    problems = {
        "missing_keys": sorted(wanted.keys() - found.keys()),
        "unexpected_keys": sorted(found.keys() - wanted.keys()),
        "mismatched_keys": sorted(f"{key}: file {found[key]}, config {wanted[key]}"
                                  for key in wanted.keys() & found.keys() if found[key] != wanted[key]),
    }
    problems = {kind: items for kind, items in problems.items() if items}
    if problems:
        raise ModelLoadError(
            f"{directory}: the weights in model.safetensors do not fit config.json ({problems}); is config.json's "
            "use_complex_transposed_convolution (or reduce_dim, projection_dim, extract_layers) the one the weights were "
            "made for? Rebuild the model with build-model"
        )
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def hf_outputs(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The converted model's three outputs for one image [1, 3, H, W] and P prompts, the image encoded once for all.

    The calls CLIPSegForImageSegmentation.forward makes, without encoding the image again for every prompt (the vision
    tower is most of the cost); tests hold it to the model's own forward.
    """
    with torch.inference_mode():
        vision = model.clip.get_image_features(pixel_values=pixel_values, interpolate_pos_encoding=True, output_hidden_states=True)
        text = model.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        prompts = input_ids.shape[0]
        activations = [vision.hidden_states[i + 1].expand(prompts, -1, -1) for i in model.config.extract_layers]
        decoded = model.decoder(activations, text.pooler_output)
    return {"logits": decoded.logits, "conditional_embeddings": text.pooler_output, "pooled_output": vision.pooler_output.expand(prompts, -1)}
