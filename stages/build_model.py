"""build-model: remapped tensors -> a CLIPSegForImageSegmentation checkpoint (model.safetensors + config.json).

The remapped file is held to the state dict of the model the variant's architecture describes (clipseg_pipeline.hf_layout,
which tests hold to transformers' own): a missing, unexpected or misshapen tensor stops the stage. The tensors are then
streamed into model.safetensors in float32, one at a time, and config.json is written. Imports neither transformers
nor torch (seconds of start-up each): it moves numpy arrays; verify-outputs then runs the folder in transformers.
"""

from __future__ import annotations

import math
from pathlib import Path

from clipseg_pipeline import params as params_mod
from clipseg_pipeline.hf_layout import WEIGHTS_FILE, BuildError, check_shapes, config_dict, state_dict_shapes, weights_metadata
from clipseg_pipeline.precision import FLOAT_DTYPES, to_float32
from clipseg_pipeline.runner import exit_now, run_stage, stage_parser
from clipseg_pipeline.tensor_io import LazyTensors, Spec, TensorFile, dtype_name, write_json, write_safetensors

STAGE = "build-model"
# The working precision of the converted model; export may store it in another dtype.
BUILD_DTYPE = "float32"


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.build_model", __doc__.splitlines()[0])
    parser.add_argument("--remapped", type=Path, required=True, help="remap-weights' safetensors file")
    parser.add_argument("--out", type=Path, required=True, help="the model directory to write")
    parser.add_argument("--metrics", type=Path, required=True, help="the metrics JSON to write")
    args = parser.parse_args(argv)

    def body() -> None:
        model_params = params_mod.load(args.params).model(args.variant)
        source = TensorFile(args.remapped, framework="np")
        check_shapes(state_dict_shapes(model_params.architecture), {name: spec.shape for name, spec in source.specs.items()})
        not_float = sorted(f"{name} ({spec.dtype})" for name, spec in source.specs.items() if spec.dtype not in FLOAT_DTYPES)
        if not_float:
            raise BuildError(
                f"{args.remapped}: weights that are not floating point: {not_float}; rerun remap-weights on the original "
                "checkpoint (its weights are float16 or float32)"
            )
        tensors = LazyTensors(
            {name: Spec(dtype_name(BUILD_DTYPE), spec.shape) for name, spec in source.specs.items()},
            lambda name: to_float32(source[name], source.specs[name].dtype),
        )
        metadata = weights_metadata(args.variant, BUILD_DTYPE, source.metadata.get("source_sha256", ""))
        write_safetensors(args.out / WEIGHTS_FILE, tensors, metadata)
        write_json(args.out / "config.json", config_dict(model_params.architecture))
        write_json(args.metrics, {
            "parameters": sum(math.prod(spec.shape) for spec in tensors.specs.values()),
            "tensors": len(tensors),
        })

    return run_stage(STAGE, args.variant, body)


if __name__ == "__main__":
    exit_now(main())
