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
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ParamsError(f"params.yaml: unknown key(s) {unknown} in `{where}`; allowed: {sorted(allowed)}")
    missing = sorted(set(required) - set(data))
    if missing:
        raise ParamsError(f"params.yaml: `{where}` lacks {missing}")
    for key, kind in allowed.items():
        if key in data and not _is(data[key], kind):
            raise ParamsError(
                f"params.yaml: `{where}.{key}` must be {_kind_name(kind)}, found {data[key]!r} ({type(data[key]).__name__})"
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


def _kind_name(kind: Any) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_kind_name(k) for k in kind)
    return {None: "null", float: "a number", int: "an integer", str: "a string", bool: "true/false", list: "a list", dict: "a mapping"}[kind]


def _architecture(data: Any, where: str) -> dict[str, Any]:
    arch = _section(data, where, ARCH_TOP)
    _section(arch["vision"], f"{where}.vision", dict.fromkeys(ARCH_VISION, int))
    _section(arch["text"], f"{where}.text", dict.fromkeys(ARCH_TEXT, int))
    layers = arch["extract_layers"]
    depth = arch["vision"]["num_hidden_layers"]
    if not layers or not all(_is(i, int) and 0 <= i < depth for i in layers):
        raise ParamsError(f"params.yaml: `{where}.extract_layers` must list block indices in 0..{depth - 1}, found {layers}")
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
    sha = src["sha256"]
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise ParamsError(f"params.yaml: `{where}.sha256` must be 64 lowercase hex digits or null, found {sha!r}")
    return Source(name=name, url=src["url"], sha256=sha, member=src.get("member"))


def _sources(data: Any, where: str) -> dict[str, Source]:
    if not isinstance(data, dict):
        raise ParamsError(f"params.yaml: `{where}` must be a mapping of source name to {{url, sha256}}")
    allowed = set(SOURCE_NAMES_REQUIRED) | {n for group in TOKENIZER_SOURCES for n in group}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ParamsError(f"params.yaml: unknown source(s) {unknown} in `{where}`; allowed: {sorted(allowed)}")
    missing = [n for n in SOURCE_NAMES_REQUIRED if n not in data]
    if missing:
        raise ParamsError(f"params.yaml: `{where}` lacks the source(s) {missing}")
    if not any(all(n in data for n in group) for group in TOKENIZER_SOURCES):
        raise ParamsError(f"params.yaml: `{where}` needs tokenizer files: either `vocab` and `merges`, or `bpe`")
    sources = {name: _source(name, value, f"{where}.{name}") for name, value in sorted(data.items())}
    if not sources["decoder"].url:
        raise ParamsError(f"params.yaml: `{where}.decoder.url` is empty")
    return sources


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
    return Expected(
        prompts=tuple(exp["prompts"]),
        padding=exp["padding"],
        image_mean=tuple(exp["image_mean"]),
        image_std=tuple(exp["image_std"]),
        atol=float(exp["atol"]),
        logits=tuple(tuple(row) for row in exp["logits"]),
        conditional_embeddings=tuple(exp["conditional_embeddings"]),
        pooled_output=tuple(exp["pooled_output"]),
    )


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
        data, "(top level)", {"variants": list, "download": dict, "processor": dict, "verify": dict, "export": dict, "models": dict}
    )
    down = _section(top["download"], "download", {"timeout_s": float, "retries": int, "max_bytes": int, "max_member_bytes": int})
    proc = _section(top["processor"], "processor", {"image_size": int, "image_mean": list, "image_std": list})
    for name in ("image_mean", "image_std"):
        if len(proc[name]) != 3 or not all(_is(v, float) for v in proc[name]):
            raise ParamsError(f"params.yaml: `processor.{name}` must be three numbers (R, G, B), found {proc[name]!r}")
    ver = _section(top["verify"], "verify", {"atol": float, "rtol": float})
    exp = _section(top["export"], "export", {"atol": dict})
    _section(exp["atol"], "export.atol", dict.fromkeys(DTYPES, float))
    models = {variant: _model(variant, value) for variant, value in top["models"].items()}
    unknown = [v for v in top["variants"] if v not in models]
    if unknown or not top["variants"]:
        raise ParamsError(f"params.yaml: `variants` lists {unknown or 'nothing'}; allowed variants: {sorted(models)}")
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
        verify=Verify(atol=float(ver["atol"]), rtol=float(ver["rtol"])),
        export_atol={k: float(v) for k, v in exp["atol"].items()},
        models=models,
    )


def load(path: Path = PARAMS_FILE) -> Params:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read the params file ({exc.strerror}); run from the repository root") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    return parse(data)


def stage_parser(description: str) -> argparse.ArgumentParser:
    """The command line every stage shares: `python -m stages.<name> --variant V [--params params.yaml]`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--variant", required=True, help="a variant name under `models` in params.yaml")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="the params file (default: params.yaml)")
    return parser
