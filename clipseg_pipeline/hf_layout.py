"""The Hugging Face model's layout without transformers: CLIPSegForImageSegmentation's state dict (every key and shape)
and its config.json, both computed from a variant's architecture.

build-model and export need only these two, and importing transformers' modelling code costs a stage seconds of
start-up; so they are computed here: the state dict is the architecture's original weights run through the name map,
and config.json is the template CONFIG_TEMPLATE (what CLIPSegConfig writes, generated from transformers) with the
architecture's settings filled in. tests/test_hf_layout.py holds both to transformers (the meta model's state dict and
CLIPSegConfig's JSON) for every variant in params.yaml; after upgrading transformers, regenerate the template:

    python -m clipseg_pipeline.hf_layout --write-template
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Mapping
from pathlib import Path

from .architecture import TEXT_TOKEN_IDS, Architecture
from .errors import PipelineError
from .name_map import converted_shapes

CONFIG_TEMPLATE = Path(__file__).with_name("clipseg_config.template.json")
# The weights file of a Hugging Face model folder, the name from_pretrained looks for.
WEIGHTS_FILE = "model.safetensors"


def weights_metadata(variant: str, dtype: str, source_sha256: str) -> dict[str, str]:
    """model.safetensors' metadata, as build-model and export write it: `format: pt` for transformers, the variant,
    the dtype ("float32", "bfloat16", ...) and the sha256 of the original files the weights come from. A float32
    export carries the same as build-model's file, so that export can pass that very file on."""
    return {"format": "pt", "variant": variant, "dtype": dtype, "source_sha256": source_sha256}


class BuildError(PipelineError):
    """The tensors do not fit the model the architecture describes."""


def config_dict(arch: Architecture) -> dict:
    """config.json's content for `arch`: the template with the variant's settings filled in."""
    config = json.loads(CONFIG_TEMPLATE.read_text(encoding="utf-8"))
    for key, value in arch.config_settings().items():
        if isinstance(value, dict):
            config[key].update(copy.deepcopy(value))
        else:
            config[key] = copy.deepcopy(value)
    return config


def state_dict_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every key of CLIPSegForImageSegmentation's state dict for `arch`, with its shape."""
    return converted_shapes(arch)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipseg_pipeline.hf_layout", description=(
        "Regenerate the config.json template from the installed transformers (after upgrading it; "
        "tests/test_hf_layout.py says when)."))
    parser.add_argument("--write-template", action="store_true", help=f"write {CONFIG_TEMPLATE.name}")
    args = parser.parse_args(argv)
    if not args.write_template:
        parser.print_help()
        return 0
    write_template()
    print(f"wrote {CONFIG_TEMPLATE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
