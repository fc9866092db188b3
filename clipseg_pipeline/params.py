"""params.yaml -> validated, frozen settings. Every stage reads its settings through `load()`, so a wrong key, type or
variant name is reported once, here, before any work, with the allowed values."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .architecture import Architecture
from .errors import PipelineError
from .schema import TOP_LEVEL, SchemaError, at_least, check_mapping, is_kind

PARAMS_FILE = Path("params.yaml")
SOURCE_NAMES_REQUIRED = ("image",)
# The weights come either as OpenAI's CLIP file + a decoder file, or as one whole original model's state_dict()
# (`checkpoint`: CLIP under `clip_model.`, the decoder beside it).
WEIGHT_SOURCES = (("clip", "decoder"), ("checkpoint",))
# Tokenizer files come either as Hugging Face's vocab.json + merges.txt, or as CLIP's bpe_simple_vocab_16e6.txt.gz.
TOKENIZER_SOURCES = (("vocab", "merges"), ("bpe",))
DTYPES = ("float32", "float16", "bfloat16")
# The reference's working precision in verify-outputs. float64: its outputs and pictures are the same bytes on every
# CPU. float32: half the reference's time, but their last bits then follow the CPU's instruction set (see README).
REFERENCE_DTYPES = ("float64", "float32")
# The ONNX export's files by transformers.js's dtype names (its `dtype` option): float32, float16, 8-bit weights.
ONNX_DTYPES = ("fp32", "fp16", "q8")
# The lower-precision ones, whose tolerances params.yaml sets (float32's is verify.atol).
ONNX_ROUNDED = ("fp16", "q8")
# The settings a checkpoint's tensors cannot tell (clipseg_pipeline.inference): a variant lists under `assumed` those
# it took from the original code's defaults rather than from its author, and its reports and model card name them.
ASSUMABLE = ("decoder_num_attention_heads", "extract_layers", "conditional_layer")


class ParamsError(PipelineError):
    """params.yaml does not describe a valid run."""


@dataclass(frozen=True)
class Source:
    name: str
    url: str
    sha256: str | None
    member: str | None  # the file inside a zip archive, for archives


@dataclass(frozen=True)
class Expected:
    """Check values published with a model and the inputs they were computed from."""

    prompts: tuple[str, ...]
    padding: str  # "max_length" or "longest"
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    atol: float
    logits: tuple[tuple[float, ...], ...]  # logits[0, :n, :n]
    conditional_embeddings: tuple[float, ...]  # [0, :n]
    pooled_output: tuple[float, ...]  # [0, :n]


@dataclass(frozen=True)
class Model:
    variant: str
    architecture: Architecture
    sources: dict[str, Source]
    prompts: tuple[str, ...]
    # Image prompts: boxes (left, top, right, bottom) in pixels of the reference image, each crop a condition.
    image_prompts: tuple[tuple[int, int, int, int], ...]
    expected: Expected | None
    dtype: str
    synthetic: bool  # weights made by this project's generator, not a model to publish as one
    base_model: str | None  # the Hub model the ONNX export's card names as its base (None: none, e.g. synthetic)
    assumed: tuple[str, ...] = ()  # architecture settings taken from the original code's defaults (ASSUMABLE)


@dataclass(frozen=True)
class Download:
    timeout_s: float
    retries: int
    max_bytes: int
    max_member_bytes: int


@dataclass(frozen=True)
class Processor:
    """The published image processor: what verify-outputs feeds the models and what export writes."""

    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]


@dataclass(frozen=True)
class Verify:
    atol: float  # the outputs' bound (float32)
    rtol: float  # intermediates may differ by atol + rtol * their scale
    threads: int  # torch's thread count for the forward passes: fixed, so their last bits do not follow the core count
    reference_dtype: str  # one of REFERENCE_DTYPES


@dataclass(frozen=True)
class Onnx:
    files: tuple[str, ...]  # the ONNX_DTYPES to build, in that order
    atol: dict[str, float]  # every logit vs the reference, per ONNX_ROUNDED dtype
    mask_agreement: dict[str, float]  # the least share of mask pixels that agree with the reference's, likewise


@dataclass(frozen=True)
class Params:
    variants: tuple[str, ...]
    download: Download
    processor: Processor
    verify: Verify
    export_atol: dict[str, float]  # the exported model's bound against the reference, per dtype
    onnx: Onnx
    models: dict[str, Model]

    def model(self, variant: str) -> Model:
        if variant not in self.models:
            raise ParamsError(f"params.yaml: unknown variant {variant!r}; the variants under `models` are {sorted(self.models)}")
        return self.models[variant]


def _numbers(data: Any, where: str, length: int | None = None) -> tuple[float, ...]:
    """A non-empty list of numbers (of `length` items when given)."""
    if not isinstance(data, list) or not data or not all(is_kind(v, float) for v in data) or length not in (None, len(data)):
        count = f"{length} numbers" if length else "a non-empty list of numbers"
        raise SchemaError(f"`{where}` must be {count}, found {data!r}")
    return tuple(data)


def _source(name: str, data: Any, where: str) -> Source:
    src = check_mapping(data, where, {"url": str, "sha256": (str, None)}, {"member": (str, None)})
    if not src["url"].strip():
        raise SchemaError(f"`{where}.url` is empty; give a URL, or a path relative to the repository root")
    sha = src["sha256"]
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise SchemaError(f"`{where}.sha256` must be 64 lowercase hex digits or null, found {sha!r}")
    member = src.get("member")
    # The member is found by its file name wherever it sits in the zip; a path here could only mislead.
    if member is not None and (not member or member in (".", "..") or any(c in member for c in "/\\:\0")):
        raise SchemaError(
            f"`{where}.member` must be a plain file name inside the zip (like rd64-uni.pth, no folders), "
            f"found {member!r}"
        )
    return Source(name=name, url=src["url"], sha256=sha, member=member)


def _sources(data: Any, where: str) -> dict[str, Source]:
    if not isinstance(data, dict):
        raise SchemaError(f"`{where}` must be a mapping of source name to {{url, sha256}}")
    allowed = set(SOURCE_NAMES_REQUIRED) | {n for groups in (WEIGHT_SOURCES, TOKENIZER_SOURCES) for g in groups for n in g}
    unknown = sorted(set(data) - allowed, key=str)
    if unknown:
        raise SchemaError(f"unknown source(s) {unknown} in `{where}`; allowed: {sorted(allowed)}")
    missing = [n for n in SOURCE_NAMES_REQUIRED if n not in data]
    if missing:
        raise SchemaError(f"`{where}` lacks the source(s) {missing}")
    weights = [group for group in WEIGHT_SOURCES if any(n in data for n in group)]
    if len(weights) != 1 or not all(n in data for n in weights[0]):
        found = sorted(n for group in WEIGHT_SOURCES for n in group if n in data)
        raise SchemaError(
            f"`{where}` needs the weights in one form: either `clip` and `decoder` (OpenAI's CLIP file and a decoder "
            f"file), or `checkpoint` (a whole original model's state_dict()); found {found or 'neither'}"
        )
    if not any(all(n in data for n in group) for group in TOKENIZER_SOURCES):
        raise SchemaError(f"`{where}` needs tokenizer files: either `vocab` and `merges`, or `bpe`")
    return {name: _source(name, value, f"{where}.{name}") for name, value in sorted(data.items())}


def _expected(data: Any, where: str) -> Expected | None:
    if data is None:
        return None
    exp = check_mapping(
        data,
        where,
        {
            "prompts": list,
            "padding": str,
            "image_mean": list,
            "image_std": list,
            "atol": float,
            "logits": list,
            "conditional_embeddings": list,
            "pooled_output": list,
        },
    )
    if exp["padding"] not in ("max_length", "longest"):
        raise SchemaError(f"`{where}.padding` must be 'max_length' or 'longest', found {exp['padding']!r}")
    at_least(exp["atol"], 0, f"{where}.atol")
    logits = exp["logits"]
    if not logits or not all(isinstance(row, list) and len(row) == len(logits) for row in logits):
        raise SchemaError(
            f"`{where}.logits` must be a square list of rows (logits[0, :n, :n]), found {logits!r}"
        )
    return Expected(
        prompts=_prompts(exp["prompts"], f"{where}.prompts"),
        padding=exp["padding"],
        image_mean=_numbers(exp["image_mean"], f"{where}.image_mean", 3),
        image_std=_std(exp["image_std"], f"{where}.image_std"),
        atol=float(exp["atol"]),
        logits=tuple(_numbers(row, f"{where}.logits[{i}]") for i, row in enumerate(logits)),
        conditional_embeddings=_numbers(exp["conditional_embeddings"], f"{where}.conditional_embeddings"),
        pooled_output=_numbers(exp["pooled_output"], f"{where}.pooled_output"),
    )


def _std(data: Any, where: str) -> tuple[float, ...]:
    std = _numbers(data, where, 3)
    if not all(v > 0 for v in std):
        raise SchemaError(f"`{where}` must be three positive numbers (R, G, B), found {data!r}")
    return std


def _prompts(data: Any, where: str) -> tuple[str, ...]:
    if not isinstance(data, list) or not data:
        raise SchemaError(f"`{where}` must be a non-empty list of prompt texts")
    for prompt in data:
        if not isinstance(prompt, str) or not prompt.strip():
            raise SchemaError(f"`{where}` holds {prompt!r}; every prompt must be a non-empty string")
    return tuple(data)


def _boxes(data: list, where: str) -> tuple[tuple[int, int, int, int], ...]:
    """Crop boxes [left, top, right, bottom] in pixels, each at least one pixel wide and high (may be none)."""
    for box in data:
        if not (isinstance(box, list) and len(box) == 4 and all(is_kind(v, int) and v >= 0 for v in box)
                and box[0] < box[2] and box[1] < box[3]):
            raise SchemaError(f"`{where}` holds {box!r}; every image prompt is a box [left, top, right, bottom] of whole "
                              "pixels in the reference image, left < right and top < bottom")
    return tuple(tuple(box) for box in data)


def _assumed(data: Any, where: str) -> tuple[str, ...]:
    if not isinstance(data, list) or any(name not in ASSUMABLE for name in data) or len(set(data)) != len(data):
        raise SchemaError(
            f"`{where}` must list, once each, the settings taken from the original code's defaults, among "
            f"{list(ASSUMABLE)} ([] when every setting is known), found {data!r}"
        )
    return tuple(data)


def _model(variant: str, data: Any) -> Model:
    where = f"models.{variant}"
    model = check_mapping(data, where, {
        "architecture": dict, "sources": dict, "assumed": list, "verify": dict, "expected": (dict, None), "export": dict,
        "onnx": dict,
    })
    verify = check_mapping(model["verify"], f"{where}.verify", {"prompts": list, "image_prompts": list})
    export = check_mapping(model["export"], f"{where}.export", {"dtype": str, "synthetic": bool})
    if export["dtype"] not in DTYPES:
        raise SchemaError(f"`{where}.export.dtype` is {export['dtype']!r}; allowed: {list(DTYPES)}")
    onnx = check_mapping(model["onnx"], f"{where}.onnx", {"base_model": (str, None)})
    if onnx["base_model"] is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", onnx["base_model"]):
        raise SchemaError(f"`{where}.onnx.base_model` must be a Hub model id like CIDAS/clipseg-rd64, or null; found "
                          f"{onnx['base_model']!r}")
    return Model(
        variant=variant,
        architecture=Architecture.from_mapping(model["architecture"], f"{where}.architecture"),
        sources=_sources(model["sources"], f"{where}.sources"),
        prompts=_prompts(verify["prompts"], f"{where}.verify.prompts"),
        image_prompts=_boxes(verify["image_prompts"], f"{where}.verify.image_prompts"),
        expected=_expected(model["expected"], f"{where}.expected"),
        dtype=export["dtype"],
        synthetic=export["synthetic"],
        base_model=onnx["base_model"],
        assumed=_assumed(model["assumed"], f"{where}.assumed"),
    )


def _onnx(data: Any) -> Onnx:
    onnx = check_mapping(data, "onnx", {"files": list, "atol": dict, "mask_agreement": dict})
    files = onnx["files"]
    unknown = [f for f in files if f not in ONNX_DTYPES]
    if unknown or not files or len(set(files)) != len(files):
        raise SchemaError(f"`onnx.files` is {files!r}; list the files to build, each once, from {list(ONNX_DTYPES)}")
    check_mapping(onnx["atol"], "onnx.atol", dict.fromkeys(ONNX_ROUNDED, float))
    check_mapping(onnx["mask_agreement"], "onnx.mask_agreement", dict.fromkeys(ONNX_ROUNDED, float))
    for dtype in ONNX_ROUNDED:
        at_least(onnx["atol"][dtype], 0, f"onnx.atol.{dtype}")
        share = onnx["mask_agreement"][dtype]
        if not 0 <= share <= 1:
            raise SchemaError(f"`onnx.mask_agreement.{dtype}` is {share!r}; give a share of pixels from 0 to 1")
    return Onnx(
        files=tuple(d for d in ONNX_DTYPES if d in files),
        atol={d: float(onnx["atol"][d]) for d in ONNX_ROUNDED},
        mask_agreement={d: float(onnx["mask_agreement"][d]) for d in ONNX_ROUNDED},
    )


def parse(data: Any) -> Params:
    """params.yaml's content as validated settings; a ParamsError names the key and what is allowed."""
    try:
        return _parse(data)
    except SchemaError as exc:
        raise ParamsError(f"params.yaml: {exc}") from exc


def _parse(data: Any) -> Params:
    top = check_mapping(
        data, TOP_LEVEL,
        {"variants": list, "download": dict, "processor": dict, "verify": dict, "export": dict, "onnx": dict, "models": dict},
    )
    down = check_mapping(top["download"], "download", {"timeout_s": float, "retries": int, "max_bytes": int, "max_member_bytes": int})
    at_least(down["timeout_s"], 1e-3, "download.timeout_s", "a positive number of seconds")
    at_least(down["retries"], 0, "download.retries")
    at_least(down["max_bytes"], 1, "download.max_bytes")
    at_least(down["max_member_bytes"], 1, "download.max_member_bytes")
    proc = check_mapping(top["processor"], "processor", {"image_size": int, "image_mean": list, "image_std": list})
    at_least(proc["image_size"], 1, "processor.image_size")
    _numbers(proc["image_mean"], "processor.image_mean", 3)
    _std(proc["image_std"], "processor.image_std")
    ver = check_mapping(top["verify"], "verify", {"atol": float, "rtol": float, "threads": int, "reference_dtype": str})
    at_least(ver["atol"], 0, "verify.atol")
    at_least(ver["rtol"], 0, "verify.rtol")
    at_least(ver["threads"], 1, "verify.threads")
    if ver["reference_dtype"] not in REFERENCE_DTYPES:
        raise SchemaError(
            f"`verify.reference_dtype` is {ver['reference_dtype']!r}; allowed: {list(REFERENCE_DTYPES)} "
            "(float64 keeps verify-outputs' files the same bytes on every CPU)"
        )
    exp = check_mapping(top["export"], "export", {"atol": dict})
    check_mapping(exp["atol"], "export.atol", dict.fromkeys(DTYPES, float))
    for dtype in DTYPES:
        at_least(exp["atol"][dtype], 0, f"export.atol.{dtype}")
    onnx = _onnx(top["onnx"])
    if not top["models"]:
        raise SchemaError("`models` is empty; describe at least one variant there")
    models = {variant: _model(variant, value) for variant, value in top["models"].items()}
    unknown = [v for v in top["variants"] if not isinstance(v, str) or v not in models]
    if unknown or not top["variants"]:
        raise SchemaError(
            f"`variants` lists {unknown or 'nothing'}; allowed variants: {sorted(models, key=str)}"
        )
    repeated = sorted({v for v in top["variants"] if top["variants"].count(v) > 1})
    if repeated:
        raise SchemaError(f"`variants` lists {repeated} more than once; list each variant once")
    return Params(
        variants=tuple(top["variants"]),
        download=Download(
            timeout_s=float(down["timeout_s"]),
            retries=down["retries"],
            max_bytes=down["max_bytes"],
            max_member_bytes=down["max_member_bytes"],
        ),
        processor=Processor(
            image_size=proc["image_size"], image_mean=tuple(proc["image_mean"]), image_std=tuple(proc["image_std"])
        ),
        verify=Verify(
            atol=float(ver["atol"]), rtol=float(ver["rtol"]), threads=ver["threads"], reference_dtype=ver["reference_dtype"]
        ),
        export_atol={k: float(v) for k, v in exp["atol"].items()},
        onnx=onnx,
        models=models,
    )


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser: 8x faster when present
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one mapping; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: Path = PARAMS_FILE) -> Params:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read the params file ({exc.strerror}); run from the repository root") from exc
    except UnicodeDecodeError as exc:
        raise ParamsError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the params file as UTF-8"
        ) from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        raise ParamsError(f"{path}: the params file is empty; restore it from the repository")
    return parse(data)
