"""build-model: remapped tensors -> a CLIPSegForImageSegmentation checkpoint (model.safetensors + config.json).

The remapped file is held to the state dict of the model the variant's config describes: a missing, unexpected or
misshapen tensor stops the stage. The tensors are then streamed into model.safetensors in the model's working
precision, one at a time, and config.json is written. Both the state dict's layout and config.json come from
stages.hf_layout, which tests hold to transformers' own, so this stage need not import transformers, nor torch: it
moves numpy arrays (each import costs seconds of start-up); verify-outputs then loads the folder into transformers'
CLIPSegForImageSegmentation and runs it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import params as params_mod
from .errors import exit_now, run_stage
from .hf_layout import WEIGHTS_FILE, BuildError, check_shapes, config_dict, state_dict_shapes
from .tensor_io import LazyTensors, Spec, TensorFile, dtype_name, write_json, write_safetensors

STAGE = "build-model"
# The working precision of the converted model; export may store it in another dtype.
BUILD_DTYPE = "float32"


def weights_metadata(variant: str, dtype: str, source_sha256: str) -> dict[str, str]:
    """model.safetensors' metadata, as build-model and export write it: `format: pt` for transformers, the variant,
    the dtype ("float32", "bfloat16", ...) and the sha256 of the original files the weights come from."""
    return {"format": "pt", "variant": variant, "dtype": dtype, "source_sha256": source_sha256}


# The stored dtypes a weight may come in (safetensors' names); build-model makes each float32.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def to_float32(array: np.ndarray, stored: str) -> np.ndarray:
    """A tensor read with TensorFile "np" as float32: exact from float16 and bfloat16 (whose raw bits are float32's top
    half), no copy when it already is float32."""
    if stored == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if stored not in FLOAT_DTYPES:
        raise BuildError(f"a weight stored as {stored} cannot become a float32 weight")
    return array.astype(np.float32, copy=False)


def main(argv: list[str] | None = None) -> int:
    parser = params_mod.stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--remapped", type=Path, required=True, help="remap-weights' safetensors file")
    parser.add_argument("--out", type=Path, required=True, help="the model directory to write")
    parser.add_argument("--report", type=Path, required=True, help="the JSON report to write")
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
        # The metadata an export in this dtype carries too, so that export can pass this very file on (export.py).
        metadata = weights_metadata(args.variant, BUILD_DTYPE, source.metadata.get("source_sha256", ""))
        write_safetensors(args.out / WEIGHTS_FILE, tensors, metadata)
        write_json(args.out / "config.json", config_dict(model_params.architecture))
        write_json(args.report, {
            "stage": STAGE,
            "variant": args.variant,
            "parameters": sum(math.prod(spec.shape) for spec in tensors.specs.values()),
            "tensors": len(tensors),
            "dtype": BUILD_DTYPE,
        })

    return run_stage(STAGE, args.variant, body)


if __name__ == "__main__":
    exit_now(main())
