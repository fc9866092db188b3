"""The verified model -> ONNX files in the layout transformers.js loads (onnx/model.onnx, model_fp16.onnx,
model_quantized.onnx), and the check that holds each file, run by onnxruntime, to verify-outputs' reference outputs.

One graph: inputs `input_ids`, `attention_mask` [prompts, length] and `pixel_values` [images, 3, 352, 352], output
`logits` [prompts, 352, 352]. It takes one image for all prompts (what transformers.js's documented usage feeds it) or
one image per prompt, encodes each image once, and computes only what the logits need (docs/onnx.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PipelineError
from .tensor_io import atomic_output

# transformers.js's dtype names -> the file it loads for each (its `dtype` option picks the file by this suffix).
FILES = {"fp32": "onnx/model.onnx", "fp16": "onnx/model_fp16.onnx", "q8": "onnx/model_quantized.onnx"}
INPUTS = ("input_ids", "attention_mask", "pixel_values")
OUTPUT = "logits"
# ONNX opset 18: what torch's dynamo exporter targets by default, and what onnxruntime 1.17 or later (transformers.js 3
# and 4 ship newer ones) runs.
OPSET = 18
# A logit above 0 is a mask pixel (sigmoid > 0.5).
MASK_THRESHOLD = 0.0


class OnnxExportError(PipelineError):
    """The ONNX export could not be made, or a file does not compute what was verified."""


def segmentation_graph(model):
    """A module around transformers' CLIPSegForImageSegmentation with the graph's interface. Its own forward refuses one
    image for several prompts, and would run the image tower once per prompt."""
    import torch

    class SegmentationGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, pixel_values):
            clip = self.model.clip
            vision = clip.vision_model(pixel_values=pixel_values, output_hidden_states=True, interpolate_pos_encoding=True)
            text = clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            # Prompt i takes image i, or the last image when there are fewer: with one image, every prompt takes it. A
            # minimum of two index ranges, because the exporter cannot yet write a remainder by a dynamic size.
            images = torch.minimum(torch.arange(input_ids.shape[0]), torch.arange(pixel_values.shape[0]).max())
            activations = [vision.hidden_states[i + 1][images] for i in self.model.config.extract_layers]
            return self.model.decoder(activations, text.pooler_output).logits

    return SegmentationGraph().eval()


def export_float32(model, example: Mapping[str, np.ndarray]):
    """The float32 graph as an onnx ModelProto, through torch.onnx.export's dynamo exporter (onnxscript).

    `example` (verify-outputs' inputs) only gives the tracer shapes: the image, and a single prompt, are repeated to
    two rows so that the numbers of images and prompts stay dynamic axes (a size of 1 would be fixed in the graph). Unused outputs (the vision layers
    after the last extracted one, its post-norm and projection) are dropped by the exporter's optimizer."""
    import onnx_ir
    import torch
    from torch.export import Dim

    prompts, length, images = Dim("prompts"), Dim("length", max=model.config.text_config.max_position_embeddings), Dim("images")
    rows = [i % len(example["input_ids"]) for i in range(max(2, len(example["input_ids"])))]
    ids, mask = torch.from_numpy(example["input_ids"][rows]), torch.from_numpy(example["attention_mask"][rows])
    pixels = torch.from_numpy(example["pixel_values"][:1]).expand(2, -1, -1, -1).contiguous()
    with torch.no_grad():
        program = torch.onnx.export(
            segmentation_graph(model), (ids, mask, pixels), dynamo=True, opset_version=OPSET, optimize=True,
            input_names=list(INPUTS), output_names=[OUTPUT], verbose=False,
            dynamic_shapes={"input_ids": {0: prompts, 1: length}, "attention_mask": {0: prompts, 1: length},
                            "pixel_values": {0: images}},
        )  # fmt: skip
    return without_node_metadata(onnx_ir.to_proto(program.model))


def without_node_metadata(proto):
    """The graph without the exporter's per-node notes (the Python stack, module path and FX node of every op): 2.6 MB
    at full size that no runtime reads."""
    for node in proto.graph.node:
        node.ClearField("metadata_props")
        node.ClearField("doc_string")
    return proto


def to_float16(float32_path: Path):
    """The float32 graph written at `float32_path` with float16 weights and arithmetic, its inputs and output kept
    float32: transformers.js feeds every dtype's file the processor's float32 pixel values. onnxruntime's converter,
    which keeps the ops it knows to be unsafe in float16 (and Resize's scales) in float32. Read from the file, so that
    the float32 graph in memory can go first: converting it in memory held three copies at once (3.6 GB at full
    size, against 1.8 GB)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(str(float32_path), keep_io_types=True)


def quantize_q8(float32_path: Path, out: Path, work: Path) -> None:
    """8-bit weights (onnxruntime's dynamic quantization: the weights of the MatMuls, Gemms and Convs and the token
    embedding in int8 or uint8 with per-tensor scales, activations quantized at run time): what transformers.js's
    `dtype: 'q8'` loads. Only products with a constant weight are quantized (MatMulConstBOnly): quantizing attention's
    activation-by-activation products too measured no faster than float32 at full size, this 0.4-0.5x. The token
    embedding is a sixth of the float32 graph (left in float32 the file would be 215 MB at full size); the patch
    embedding's Conv 2.4 MB of float32 (quantized, the file stays under the published 139 MB). Written to `work` first,
    then moved to `out` atomically."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    work.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(float32_path, work, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm", "Gather", "Conv"], extra_options={"MatMulConstBOnly": True})
    with open(work, "rb") as source, atomic_output(out) as target:
        while chunk := source.read(1 << 24):
            target.write(chunk)
    work.unlink()


def write_model(proto, path: Path) -> None:
    """An onnx ModelProto, serialized deterministically (the same graph gives the same bytes), written atomically."""
    data = proto.SerializeToString(deterministic=True)
    if len(data) >= 2**31:
        raise OnnxExportError(f"{path}: the graph is {len(data)} bytes, over protobuf's 2 GB; this export writes one file")
    with atomic_output(path) as handle:
        handle.write(data)


@dataclass(frozen=True)
class Tolerance:
    atol: float  # every logit within this of the reference's
    mask_agreement: float  # at least this share of mask pixels (logit > 0) the same as the reference's


@dataclass(frozen=True)
class FileCheck:
    dtype: str
    form: str  # "one image" or "one image per prompt"
    max_abs_diff: float  # inf for NaN or Inf
    mask_agreement: float
    passed: bool


def forms(reference: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The graph's two input forms, from verify-outputs' inputs: one image for every prompt, and the image repeated
    for each prompt."""
    text = {"input_ids": reference["input_ids"], "attention_mask": reference["attention_mask"]}
    prompts = reference["input_ids"].shape[0]
    return {
        "one image": text | {"pixel_values": reference["pixel_values"]},
        "one image per prompt": text | {"pixel_values": np.repeat(reference["pixel_values"], prompts, axis=0)},
    }


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # A fixed thread count, as torch's in verify (params verify.threads); one inter-op thread: the graph is one chain.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own unexported exception classes
        raise OnnxExportError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from exc


def check_interface(sess, path: Path) -> None:
    inputs, outputs = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    if sorted(inputs) != sorted(INPUTS) or outputs != [OUTPUT]:
        raise OnnxExportError(f"{path}: inputs {inputs}, outputs {outputs}; transformers.js feeds {list(INPUTS)} and "
                              f"reads [{OUTPUT!r}]")
    types = {i.name: i.type for i in sess.get_inputs()} | {o.name: o.type for o in sess.get_outputs()}
    wanted = {"input_ids": "tensor(int64)", "attention_mask": "tensor(int64)", "pixel_values": "tensor(float)", OUTPUT: "tensor(float)"}
    if types != wanted:
        raise OnnxExportError(f"{path}: input and output types {types}, transformers.js feeds and reads {wanted}")


def compare_logits(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max |got - want|, share of pixels on the same side of the mask threshold); inf for NaN or Inf."""
    if got.shape != want.shape:
        raise OnnxExportError(f"logits of shape {list(got.shape)}, the reference's are {list(want.shape)}")
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    agreement = float(np.mean((got > MASK_THRESHOLD) == (want > MASK_THRESHOLD)))
    return (diff if math.isfinite(diff) else math.inf), agreement


def check_file(path: Path, dtype: str, reference: Mapping[str, np.ndarray], tolerance: Tolerance, threads: int) -> list[FileCheck]:
    """onnxruntime runs the file on both input forms; every logit is compared with the reference's."""
    sess = session(path, threads)
    check_interface(sess, path)
    checks = []
    for form, feed in forms(reference).items():
        (logits,) = sess.run([OUTPUT], feed)
        diff, agreement = compare_logits(logits, reference["logits"])
        passed = diff <= tolerance.atol and agreement >= tolerance.mask_agreement
        checks.append(FileCheck(dtype, form, diff, agreement, passed))
    return checks


def failure_message(checks: list[FileCheck], tolerances: Mapping[str, Tolerance]) -> str | None:
    failed = [c for c in checks if not c.passed]
    if not failed:
        return None
    details = "; ".join(
        f"{c.dtype} ({c.form}): max abs diff {c.max_abs_diff:.3g} (tolerance {tolerances[c.dtype].atol:g}), mask "
        f"agreement {c.mask_agreement:.4%} (at least {tolerances[c.dtype].mask_agreement:.4%})" for c in failed
    )
    return (f"the ONNX export differs from verify-outputs' reference: {details}. No file was kept. For float32 this is a "
            "fault in the graph; for fp16 or q8, raise onnx.atol or lower onnx.mask_agreement in params.yaml only after "
            "measuring (docs/onnx.md), or leave that file out of onnx.files")


def tokenizer_json(tok) -> str:
    """tokenizer.json, the fast tokenizer transformers.js reads, from the tokenizer verify-outputs used (built from
    vocab.json and merges.txt)."""
    return tok.backend_tokenizer.to_str(pretty=True) + "\n"


def check_tokenizer(folder: Path, reference: Mapping[str, np.ndarray], prompts: list[str]) -> None:
    """The folder's tokenizer.json, loaded by transformers as a user would, gives verify-outputs' token ids."""
    from transformers import CLIPTokenizer

    from .inputs import token_ids

    ids = token_ids(CLIPTokenizer.from_pretrained(folder), prompts, tensors="np")
    for name in ("input_ids", "attention_mask"):
        if not np.array_equal(ids[name], reference[name]):
            raise OnnxExportError(f"{folder / 'tokenizer.json'} gives {name} {ids[name].tolist()} for {prompts}, "
                                  f"verify-outputs used {reference[name].tolist()}; rebuild it from vocab.json and merges.txt")
