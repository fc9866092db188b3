"""The baseline: transformers' old one-shot CLIPSeg conversion (convert_clipseg_original_pytorch_to_hf.py), offline.

    python benchmarks/baseline.py --checkpoint original-rd64.pth --vocab vocab.json --merges merges.txt
        --image image.jpg --out DIR --report baseline.json

As the old script did: torch.load the full original state dict, construct CLIPSegForImageSegmentation with its random
initialisation, drop the `model.*` duplicates, rename keys with chained string replaces and slice the in_proj
tensors, load_state_dict(strict=False), run the processor and one forward pass on 4 prompts at 352x352, and
save_pretrained the model and the processor. Differences, forced by running offline on transformers 5: the tokenizer
is built from local vocab.json/merges.txt instead of the Hub, the position_ids buffers are no longer missing keys
(they are non-persistent), and the published check values are not compared (the weights are synthetic).

Writes its phase timings (imports, load, construct, convert, forward, save) to --report; the benchmark measures the
process's wall time and peak RSS from outside.
"""

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPTokenizer,
)
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil  # noqa: E402

IMPORTS_DONE = time.perf_counter()
PROMPTS = ["a glass", "something to fill", "wood", "a jar"]


def get_clipseg_config(model_name: str) -> CLIPSegConfig:
    # As the old script: default text config, ViT-B/16 vision config, rd16 / refined from the name.
    use_complex_transposed_convolution = "refined" in model_name
    reduce_dim = 16 if "rd16" in model_name else 64
    return CLIPSegConfig(
        text_config={},
        vision_config={"patch_size": 16},
        use_complex_transposed_convolution=use_complex_transposed_convolution,
        reduce_dim=reduce_dim,
    )


def rename_key(name: str) -> str:
    # update prefixes
    if "clip_model" in name:
        name = name.replace("clip_model", "clip")
    if "transformer" in name:
        if "visual" in name:
            name = name.replace("visual.transformer", "vision_model")
        else:
            name = name.replace("transformer", "text_model")
    if "resblocks" in name:
        name = name.replace("resblocks", "encoder.layers")
    if "ln_1" in name:
        name = name.replace("ln_1", "layer_norm1")
    if "ln_2" in name:
        name = name.replace("ln_2", "layer_norm2")
    if "c_fc" in name:
        name = name.replace("c_fc", "fc1")
    if "c_proj" in name:
        name = name.replace("c_proj", "fc2")
    if "attn" in name and "self" not in name:
        name = name.replace("attn", "self_attn")
    # text encoder
    if "token_embedding" in name:
        name = name.replace("token_embedding", "text_model.embeddings.token_embedding")
    if "positional_embedding" in name and "visual" not in name:
        name = name.replace("positional_embedding", "text_model.embeddings.position_embedding.weight")
    if "ln_final" in name:
        name = name.replace("ln_final", "text_model.final_layer_norm")
    # vision encoder
    if "visual.class_embedding" in name:
        name = name.replace("visual.class_embedding", "vision_model.embeddings.class_embedding")
    if "visual.conv1" in name:
        name = name.replace("visual.conv1", "vision_model.embeddings.patch_embedding")
    if "visual.positional_embedding" in name:
        name = name.replace("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight")
    if "visual.ln_pre" in name:
        name = name.replace("visual.ln_pre", "vision_model.pre_layrnorm")
    if "visual.ln_post" in name:
        name = name.replace("visual.ln_post", "vision_model.post_layernorm")
    # projection layers
    if "visual.proj" in name:
        name = name.replace("visual.proj", "visual_projection.weight")
    if "text_projection" in name:
        name = name.replace("text_projection", "text_projection.weight")
    # decoder
    if "trans_conv" in name:
        name = name.replace("trans_conv", "transposed_convolution")
    if "film_mul" in name or "film_add" in name or "reduce" in name or "transposed_convolution" in name:
        name = "decoder." + name
    if "blocks" in name:
        name = name.replace("blocks", "decoder.layers")
    if "linear1" in name:
        name = name.replace("linear1", "mlp.fc1")
    if "linear2" in name:
        name = name.replace("linear2", "mlp.fc2")
    if "norm1" in name and "layer_" not in name:
        name = name.replace("norm1", "layer_norm1")
    if "norm2" in name and "layer_" not in name:
        name = name.replace("norm2", "layer_norm2")
    return name


def convert_state_dict(orig_state_dict: dict, config: CLIPSegConfig) -> dict:
    for key in orig_state_dict.copy():
        val = orig_state_dict.pop(key)
        if key.startswith("clip_model") and "attn.in_proj" in key:
            key_split = key.split(".")
            if "visual" in key:
                layer_num = int(key_split[4])
                dim = config.vision_config.hidden_size
                prefix = "vision_model"
            else:
                layer_num = int(key_split[3])
                dim = config.text_config.hidden_size
                prefix = "text_model"
            kind = "weight" if "weight" in key else "bias"
            base = f"clip.{prefix}.encoder.layers.{layer_num}.self_attn"
            orig_state_dict[f"{base}.q_proj.{kind}"] = val[:dim]
            orig_state_dict[f"{base}.k_proj.{kind}"] = val[dim : dim * 2]
            orig_state_dict[f"{base}.v_proj.{kind}"] = val[-dim:]
        elif "self_attn" in key and "out_proj" not in key:
            key_split = key.split(".")
            layer_num = int(key_split[1])
            dim = config.reduce_dim
            kind = "weight" if "weight" in key else "bias"
            base = f"decoder.layers.{layer_num}.self_attn"
            orig_state_dict[f"{base}.q_proj.{kind}"] = val[:dim]
            orig_state_dict[f"{base}.k_proj.{kind}"] = val[dim : dim * 2]
            orig_state_dict[f"{base}.v_proj.{kind}"] = val[-dim:]
        else:
            new_name = rename_key(key)
            if "visual_projection" in new_name or "text_projection" in new_name:
                val = val.T
            orig_state_dict[new_name] = val
    return orig_state_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="clipseg-rd64")
    parser.add_argument("--checkpoint", required=True, help="the full original model's state dict (torch.save)")
    parser.add_argument("--vocab", required=True)
    parser.add_argument("--merges", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--out", required=True, help="where save_pretrained writes")
    parser.add_argument("--report", required=True, help="a JSON file for the phase timings")
    args = parser.parse_args(argv)
    phases = {"imports_s": IMPORTS_DONE - STARTED}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = now - clock
        clock = now

    config = get_clipseg_config(args.model_name)
    model = CLIPSegForImageSegmentation(config)  # random initialisation, as the old script
    model.eval()
    lap("construct_s")

    state_dict = torch.load(args.checkpoint, map_location="cpu")
    lap("load_s")

    for key in state_dict.copy():
        if key.startswith("model"):
            state_dict.pop(key, None)
    state_dict = convert_state_dict(state_dict, config)
    missing_keys, unexpected_keys = model.load_state_dict(state_dict, strict=False)
    # The old script expected the position_ids buffers as missing keys; on transformers 5 they are non-persistent.
    if [k for k in missing_keys if not k.endswith("position_ids")]:
        raise ValueError(f"Missing keys that are not expected: {missing_keys}")
    if unexpected_keys != ["decoder.reduce.weight", "decoder.reduce.bias"]:
        raise ValueError(f"Unexpected keys: {unexpected_keys}")
    lap("convert_s")

    image_processor = ViTImageProcessorPil(size={"height": 352, "width": 352}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    tokenizer = CLIPTokenizer(vocab=args.vocab, merges=args.merges, model_max_length=77)
    processor = CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)
    image = Image.open(args.image).convert("RGB")
    inputs = processor(text=PROMPTS, images=[image] * len(PROMPTS), padding="max_length", return_tensors="pt")
    lap("processor_s")

    with torch.no_grad():
        outputs = model(**inputs)
    lap("forward_s")
    if tuple(outputs.logits.shape) != (len(PROMPTS), 352, 352) or not bool(torch.isfinite(outputs.logits).all()):
        raise ValueError(f"unexpected logits: {tuple(outputs.logits.shape)}")

    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    lap("save_s")

    phases["in_process_s"] = time.perf_counter() - STARTED
    report = {**phases, "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "missing_keys": missing_keys, "unexpected_keys": unexpected_keys, "torch_threads": torch.get_num_threads()}
    with open(args.report, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
