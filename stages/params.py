"""params.yaml -> validated, frozen settings. Every stage reads its settings through `load()`, so a wrong key, type or
variant name is reported once, here, before any work, with the allowed values."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import PipelineError

PARAMS_FILE = Path("params.yaml")
SOURCE_NAMES_REQUIRED = ("clip", "decoder", "image")
# Tokenizer files come either as Hugging Face's vocab.json + merges.txt, or as CLIP's bpe_simple_vocab_16e6.txt.gz.
TOKENIZER_SOURCES = (("vocab", "merges"), ("bpe",))
DTYPES = ("float32", "float16", "bfloat16")
# The reference's working precision in verify-outputs. float64: its outputs and pictures are the same bytes on every
# CPU. float32: half the reference's time, but their last bits then follow the CPU's instruction set (see README).
REFERENCE_DTYPES = ("float64", "float32")
TOP_LEVEL = "(top level)"  # how messages name the file's outermost mapping


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
    architecture: dict[str, Any]
    sources: dict[str, Source]
    prompts: tuple[str, ...]
    expected: Expected | None
    dtype: str


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
class Params:
    variants: tuple[str, ...]
    download: Download
    processor: Processor
    verify: Verify
    export_atol: dict[str, float]  # the exported model's bound against the reference, per dtype
    models: dict[str, Model]

    def model(self, variant: str) -> Model:
        if variant not in self.models:
            raise ParamsError(f"params.yaml: unknown variant {variant!r}; the variants under `models` are {sorted(self.models)}")
        return self.models[variant]


ARCH_VISION = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size")
ARCH_TEXT = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings")
ARCH_TOP = {
    "vision": dict,
    "text": dict,
    "projection_dim": int,
    "extract_layers": list,
    "reduce_dim": int,
    "decoder_num_attention_heads": int,
    "decoder_intermediate_size": int,
    "conditional_layer": int,
    "use_complex_transposed_convolution": bool,
}


def _section(data: Any, where: str, required: dict[str, type], optional: dict[str, type] | None = None) -> dict:
    """Check that `data` is a mapping with exactly the allowed keys, each of the right type."""
    optional = optional or {}
    if not isinstance(data, dict):
        raise ParamsError(f"params.yaml: `{where}` must be a mapping, found {type(data).__name__}")
    allowed = {**required, **optional}
    unknown = sorted(set(data) - set(allowed), key=str)
    if unknown:
        raise ParamsError(f"params.yaml: unknown key(s) {unknown} in `{where}`; allowed: {sorted(allowed)}")
    missing = sorted(set(required) - set(data))
    if missing:
        raise ParamsError(f"params.yaml: `{where}` lacks {missing}")
    for key, kind in allowed.items():
        if key in data and not _is(data[key], kind):
            name = key if where == TOP_LEVEL else f"{where}.{key}"
            raise ParamsError(
                f"params.yaml: `{name}` must be {_kind_name(kind)}, found {data[key]!r} ({type(data[key]).__name__})"
            )
    return data


def _is(value: Any, kind: Any) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(kind, tuple):
        return any(_is(value, k) for k in kind)
    if kind is None:
        return value is None
    return isinstance(value, kind)


def _at_least(value: float, minimum: float, where: str, what: str = "") -> None:
    if value < minimum:
        bound = {0: "0 or more", 1: "1 or more"}.get(minimum, f"at least {minimum}")
        raise ParamsError(f"params.yaml: `{where}` must be {what or bound}, found {value!r}")


def _numbers(data: Any, where: str, length: int | None = None) -> tuple[float, ...]:
    """A non-empty list of numbers (of `length` items when given)."""
    if not isinstance(data, list) or not data or not all(_is(v, float) for v in data) or length not in (None, len(data)):
        count = f"{length} numbers" if length else "a non-empty list of numbers"
        raise ParamsError(f"params.yaml: `{where}` must be {count}, found {data!r}")
    return tuple(data)


def _kind_name(kind: Any) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_kind_name(k) for k in kind)
    return {None: "null", float: "a number", int: "an integer", str: "a string", bool: "true/false", list: "a list", dict: "a mapping"}[kind]


def _architecture(data: Any, where: str) -> dict[str, Any]:
    arch = _section(data, where, ARCH_TOP)
    for tower, keys in (("vision", ARCH_VISION), ("text", ARCH_TEXT)):
        _section(arch[tower], f"{where}.{tower}", dict.fromkeys(keys, int))
        for key in keys:
            _at_least(arch[tower][key], 1, f"{where}.{tower}.{key}")
    for key in ("projection_dim", "reduce_dim", "decoder_num_attention_heads", "decoder_intermediate_size"):
        _at_least(arch[key], 1, f"{where}.{key}")
    layers = arch["extract_layers"]
    depth = arch["vision"]["num_hidden_layers"]
    if not layers or not all(_is(i, int) and 0 <= i < depth for i in layers):
        raise ParamsError(f"params.yaml: `{where}.extract_layers` must list block indices in 0..{depth - 1}, found {layers}")
    if not 0 <= arch["conditional_layer"] < len(layers):
        raise ParamsError(
            f"params.yaml: `{where}.conditional_layer` must index extract_layers (0..{len(layers) - 1}), "
            f"found {arch['conditional_layer']}"
        )
    vision = arch["vision"]
    if vision["image_size"] % vision["patch_size"]:
        raise ParamsError(
            f"params.yaml: `{where}.vision.image_size` ({vision['image_size']}) must be a multiple of patch_size "
            f"({vision['patch_size']})"
        )
    if arch["use_complex_transposed_convolution"] and (vision["patch_size"] % 4 or arch["reduce_dim"] % 2):
        raise ParamsError(
            f"params.yaml: `{where}`: the refined decoder (use_complex_transposed_convolution) needs a patch_size divisible "
            f"by 4 and an even reduce_dim, found {vision['patch_size']} and {arch['reduce_dim']}"
        )
    for name, width, heads in (
        ("vision", arch["vision"]["hidden_size"], arch["vision"]["num_attention_heads"]),
        ("text", arch["text"]["hidden_size"], arch["text"]["num_attention_heads"]),
        ("decoder", arch["reduce_dim"], arch["decoder_num_attention_heads"]),
    ):
        if heads <= 0 or width % heads:
            raise ParamsError(f"params.yaml: `{where}`: the {name} width {width} is not divisible by its {heads} attention heads")
    return arch


def _source(name: str, data: Any, where: str) -> Source:
    src = _section(data, where, {"url": str, "sha256": (str, None)}, {"member": (str, None)})
    if not src["url"].strip():
        raise ParamsError(f"params.yaml: `{where}.url` is empty; give a URL, or a path relative to the repository root")
    sha = src["sha256"]
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise ParamsError(f"params.yaml: `{where}.sha256` must be 64 lowercase hex digits or null, found {sha!r}")
    member = src.get("member")
    # The member is found by its file name wherever it sits in the zip; a path here could only mislead.
    if member is not None and (not member or member in (".", "..") or any(c in member for c in "/\\:\0")):
        raise ParamsError(
            f"params.yaml: `{where}.member` must be a plain file name inside the zip (like rd64-uni.pth, no folders), "
            f"found {member!r}"
        )
    return Source(name=name, url=src["url"], sha256=sha, member=member)


def _sources(data: Any, where: str) -> dict[str, Source]:
    if not isinstance(data, dict):
        raise ParamsError(f"params.yaml: `{where}` must be a mapping of source name to {{url, sha256}}")
    allowed = set(SOURCE_NAMES_REQUIRED) | {n for group in TOKENIZER_SOURCES for n in group}
    unknown = sorted(set(data) - allowed, key=str)
    if unknown:
        raise ParamsError(f"params.yaml: unknown source(s) {unknown} in `{where}`; allowed: {sorted(allowed)}")
    missing = [n for n in SOURCE_NAMES_REQUIRED if n not in data]
    if missing:
        raise ParamsError(f"params.yaml: `{where}` lacks the source(s) {missing}")
    if not any(all(n in data for n in group) for group in TOKENIZER_SOURCES):
        raise ParamsError(f"params.yaml: `{where}` needs tokenizer files: either `vocab` and `merges`, or `bpe`")
    return {name: _source(name, value, f"{where}.{name}") for name, value in sorted(data.items())}


def _expected(data: Any, where: str) -> Expected | None:
    if data is None:
        return None
    exp = _section(
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
        raise ParamsError(f"params.yaml: `{where}.padding` must be 'max_length' or 'longest', found {exp['padding']!r}")
    _at_least(exp["atol"], 0, f"{where}.atol")
    logits = exp["logits"]
    if not logits or not all(isinstance(row, list) and len(row) == len(logits) for row in logits):
        raise ParamsError(
            f"params.yaml: `{where}.logits` must be a square list of rows (logits[0, :n, :n]), found {logits!r}"
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
        raise ParamsError(f"params.yaml: `{where}` must be three positive numbers (R, G, B), found {data!r}")
    return std


def _prompts(data: Any, where: str) -> tuple[str, ...]:
    if not isinstance(data, list) or not data:
        raise ParamsError(f"params.yaml: `{where}` must be a non-empty list of prompt texts")
    for prompt in data:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ParamsError(f"params.yaml: `{where}` holds {prompt!r}; every prompt must be a non-empty string")
    return tuple(data)


def _model(variant: str, data: Any) -> Model:
    where = f"models.{variant}"
    model = _section(data, where, {"architecture": dict, "sources": dict, "verify": dict, "expected": (dict, None), "export": dict})
    verify = _section(model["verify"], f"{where}.verify", {"prompts": list})
    export = _section(model["export"], f"{where}.export", {"dtype": str})
    if export["dtype"] not in DTYPES:
        raise ParamsError(f"params.yaml: `{where}.export.dtype` is {export['dtype']!r}; allowed: {list(DTYPES)}")
    return Model(
        variant=variant,
        architecture=_architecture(model["architecture"], f"{where}.architecture"),
        sources=_sources(model["sources"], f"{where}.sources"),
        prompts=_prompts(verify["prompts"], f"{where}.verify.prompts"),
        expected=_expected(model["expected"], f"{where}.expected"),
        dtype=export["dtype"],
    )


def parse(data: Any) -> Params:
    top = _section(
        data, TOP_LEVEL, {"variants": list, "download": dict, "processor": dict, "verify": dict, "export": dict, "models": dict}
    )
    down = _section(top["download"], "download", {"timeout_s": float, "retries": int, "max_bytes": int, "max_member_bytes": int})
    _at_least(down["timeout_s"], 1e-3, "download.timeout_s", "a positive number of seconds")
    _at_least(down["retries"], 0, "download.retries")
    _at_least(down["max_bytes"], 1, "download.max_bytes")
    _at_least(down["max_member_bytes"], 1, "download.max_member_bytes")
    proc = _section(top["processor"], "processor", {"image_size": int, "image_mean": list, "image_std": list})
    _at_least(proc["image_size"], 1, "processor.image_size")
    _numbers(proc["image_mean"], "processor.image_mean", 3)
    _std(proc["image_std"], "processor.image_std")
    ver = _section(top["verify"], "verify", {"atol": float, "rtol": float, "threads": int, "reference_dtype": str})
    _at_least(ver["atol"], 0, "verify.atol")
    _at_least(ver["rtol"], 0, "verify.rtol")
    _at_least(ver["threads"], 1, "verify.threads")
    if ver["reference_dtype"] not in REFERENCE_DTYPES:
        raise ParamsError(
            f"params.yaml: `verify.reference_dtype` is {ver['reference_dtype']!r}; allowed: {list(REFERENCE_DTYPES)} "
            "(float64 keeps verify-outputs' files the same bytes on every CPU)"
        )
    exp = _section(top["export"], "export", {"atol": dict})
    _section(exp["atol"], "export.atol", dict.fromkeys(DTYPES, float))
    for dtype in DTYPES:
        _at_least(exp["atol"][dtype], 0, f"export.atol.{dtype}")
    if not top["models"]:
        raise ParamsError("params.yaml: `models` is empty; describe at least one variant there")
    models = {variant: _model(variant, value) for variant, value in top["models"].items()}
    unknown = [v for v in top["variants"] if not isinstance(v, str) or v not in models]
    if unknown or not top["variants"]:
        raise ParamsError(
            f"params.yaml: `variants` lists {unknown or 'nothing'}; allowed variants: {sorted(models, key=str)}"
        )
    repeated = sorted({v for v in top["variants"] if top["variants"].count(v) > 1})
    if repeated:
        raise ParamsError(f"params.yaml: `variants` lists {repeated} more than once; list each variant once")
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


def stage_parser(description: str) -> argparse.ArgumentParser:
    """The command line every stage shares: `python -m stages.<name> --variant V [--params params.yaml]`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--variant", required=True, help="a variant name under `models` in params.yaml")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="the params file (default: params.yaml)")
    return parser
