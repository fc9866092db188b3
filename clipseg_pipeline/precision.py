"""Weights in another precision: stored float16/bfloat16 widened to float32 (build-model), float32 rounded to float16 or
bfloat16 (export). numpy only: the stages that move weights do not import torch (seconds of start-up); numpy has no
bfloat16, so a bfloat16 tensor travels as its raw 16 bits in uint16. tests/test_precision.py holds every cast to
torch's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import PipelineError
from .tensor_io import LazyTensors, Spec, dtype_name, numpy_dtype, spec_of


class PrecisionError(PipelineError):
    """A weight that cannot be stored in the asked precision."""


# The stored dtypes a weight may come in (safetensors' names); build-model makes each float32.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def to_float32(array: np.ndarray, stored: str) -> np.ndarray:
    """A tensor read with TensorFile "np" as float32: exact from float16 and bfloat16 (whose raw bits are float32's top
    half), no copy when it already is float32."""
    if stored == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if stored not in FLOAT_DTYPES:
        raise PrecisionError(f"a weight stored as {stored} cannot become a float32 weight")
    return array.astype(np.float32, copy=False)


LOW_PRECISION = ("float16", "bfloat16")
# float16's largest value is 65504; from halfway to the next step up (65520) a float32 rounds to inf.
FLOAT16_OVERFLOW = 65520.0
# Elements cast at a time to bfloat16: a chunk and its scratch stay in the CPU's cache through the five passes over it
# (twice as fast as whole-tensor passes at full size).
CAST_CHUNK = 1 << 16
BFLOAT16_NAN = 0x7FC0  # bfloat16's quiet NaN


def to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 values -> bfloat16's raw bits (uint16, as TensorFile "np" reads them back): rounded to the nearest,
    ties to even, as torch rounds; every NaN becomes the quiet NaN of torch's scalar conversion (built weights hold
    none). numpy has no bfloat16; tests hold this to torch."""
    bits = np.ascontiguousarray(array, dtype=np.float32).reshape(-1).view(np.uint32)
    out = np.empty(bits.shape, dtype=np.uint16)
    scratch = np.empty(min(bits.size, CAST_CHUNK), dtype=np.uint32)
    for start in range(0, bits.size, CAST_CHUNK):
        chunk = bits[start : start + CAST_CHUNK]
        rounded = scratch[: chunk.size]
        # Add just under half of the dropped 16 bits' range, plus the kept lowest bit (a tie then rounds to even), and
        # keep the top 16 bits. A carry runs on into the exponent, as it should (the largest floats become inf).
        np.right_shift(chunk, 16, out=rounded)
        rounded &= 1
        rounded += 0x7FFF
        rounded += chunk
        rounded >>= 16
        out[start : start + CAST_CHUNK] = rounded
        nan = np.isnan(chunk.view(np.float32))  # a NaN's payload bits may carry into the sign: NaN is set outright
        if nan.any():
            out[start : start + CAST_CHUNK][nan] = BFLOAT16_NAN
    return out.reshape(np.shape(array))


def cast_array(name: str, array: np.ndarray, dtype: str) -> np.ndarray:
    """One float32 tensor in `dtype` (bfloat16 as its raw bits); refuses a weight that float16 cannot hold (it would
    become inf; bfloat16 has float32's range)."""
    if array.dtype != np.float32:
        raise PrecisionError(f"tensor {name!r} is {array.dtype}; export casts build-model's float32 weights: rerun build-model")
    if dtype == "bfloat16":
        return to_bfloat16_bits(array)
    if dtype == "float16":
        if array.size and max(float(array.max()), -float(array.min())) >= FLOAT16_OVERFLOW:
            raise PrecisionError(
                f"tensor {name!r} does not fit {dtype} (values become inf); set models.<variant>.export.dtype to "
                "bfloat16 or float32 in params.yaml"
            )
        return np.asarray(array.astype(np.float16))
    return np.asarray(array, dtype=numpy_dtype(dtype_name(dtype)))


def cast_tensors(source: Mapping[str, np.ndarray], dtype: str) -> LazyTensors:
    """Every tensor (numpy, e.g. a TensorFile read as "np") in `dtype`, cast one at a time as it is written."""
    return LazyTensors({name: Spec(dtype_name(dtype), spec_of(source, name).shape) for name in source},
                       lambda name: cast_array(name, source[name], dtype))


