"""build-model: remapped tensors -> a CLIPSegForImageSegmentation checkpoint (model.safetensors + config.json).

The model is constructed on the meta device and the tensors are assigned to it, so there is no random initialisation
to throw away, and every key is accounted for: a missing, unexpected or misshapen tensor stops the stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import params as params_mod
from .errors import run_stage
from .tensor_io import TensorFile, atomic_output, write_json, write_safetensors

STAGE = "build-model"
# The working precision of the converted model; export may store it in another dtype.
BUILD_DTYPE = torch.float32


def main(argv: list[str] | None = None) -> int:
    parser = params_mod.stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--remapped", type=Path, required=True, help="remap-weights' safetensors file")
    parser.add_argument("--out", type=Path, required=True, help="the model directory to write")
    parser.add_argument("--report", type=Path, required=True, help="the JSON report to write")
    args = parser.parse_args(argv)

    def body() -> None:
        from .hf_model import build_model, config_from_architecture

        model_params = params_mod.load(args.params).model(args.variant)
        source = TensorFile(args.remapped)
        tensors = {name: source[name].to(BUILD_DTYPE) for name in source}
        config = config_from_architecture(model_params.architecture)
        model = build_model(config, tensors)
        state = model.state_dict()
        metadata = {"format": "pt", "stage": STAGE, "variant": args.variant, "source_sha256": source.metadata.get("source_sha256", "")}
        write_safetensors(args.out / "model.safetensors", state, metadata)
        with atomic_output(args.out / "config.json", "w") as handle:
            handle.write(config.to_json_string(use_diff=False))
        write_json(args.report, {
            "stage": STAGE,
            "variant": args.variant,
            "parameters": sum(t.numel() for t in state.values()),
            "tensors": len(state),
            "dtype": str(BUILD_DTYPE).removeprefix("torch."),
        })

    return run_stage(STAGE, args.variant, body)


if __name__ == "__main__":
    sys.exit(main())
