"""export: the built model + tokenizer files + stage reports -> a Hugging Face model folder, ready to load and publish.

Writes model.safetensors (in the variant's export dtype), config.json, preprocessor_config.json (the published
processor: 352x352, bilinear, ImageNet mean/std), vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json, README.md (the model card: sources, settings, verification, usage) and manifest.json (every
other file's size and sha256). The same inputs give the same bytes. A float16 or bfloat16 export's weights are cast
(numpy, rounded as torch rounds) and written by a forked process while the stage imports its libraries (stages.forked).

What is checked before the folder is moved into place: its tokenizer, loaded by transformers' CLIPTokenizer, gives
verify-outputs' token ids for its prompts; config.json describes exactly the tensors in model.safetensors. A float32
export holds the verified weights themselves, so verify-outputs' comparison is its own; the weights of a float16 or
bfloat16 export are read back from its model.safetensors, mapped to the original layout (remap-weights' rules run
backwards) and run through the reference forward pass in float32 on verify-outputs' inputs, within the dtype's
tolerance of the reference outputs (check_outputs says why float32). Only that case imports torch; no export imports
transformers' modelling code (seconds of start-up): verify-outputs ran the converted model's own forward pass on these
weights before their rounding, and tests/test_export.py loads every dtype's export with from_pretrained and runs it.
The image processor settings in preprocessor_config.json are loaded by transformers' CLIPSegProcessor there too
(importing it costs about 6 s).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from . import model_card
from . import params as params_mod
from .build_model import weights_metadata
from .errors import PipelineError, exit_now, run_stage
from .forked import Forked
from .hf_layout import WEIGHTS_FILE, architecture_of, check_shapes, state_dict_shapes
from .inputs import CONTEXT_LENGTH, RESAMPLE_BILINEAR, token_ids
from .original import clip_shapes, decoder_shapes
from .recording import OUTPUTS, print_figures, recorded
from .remap_weights import OriginalLayout
from .tensor_io import FileHash, LazyTensors, Spec, TensorFile, atomic_output, dtype_name, link_or_copy, numpy_dtype, sha256_file, spec_of, write_json, write_safetensors

STAGE = "export"
MANIFEST = "manifest.json"
CARD = "README.md"
# What from_pretrained, the Hub's widgets and AutoModel read to pick the class; build-model's config leaves it empty.
ARCHITECTURES = ["CLIPSegForImageSegmentation"]
SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}


class ExportError(PipelineError):
    """The exported folder does not load or does not compute what was verified."""


def preprocessor_config(size: int, mean: list[float], std: list[float]) -> dict:
    return {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": mean,
        "image_processor_type": "ViTImageProcessor",
        "image_std": std,
        "processor_class": "CLIPSegProcessor",
        "resample": RESAMPLE_BILINEAR,
        "rescale_factor": 1 / 255,
        "size": {"height": size, "width": size},
    }


def tokenizer_config() -> dict:
    return {
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": CONTEXT_LENGTH,
        "processor_class": "CLIPSegProcessor",
        "tokenizer_class": "CLIPTokenizer",
        **SPECIAL_TOKENS,
    }


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
        raise ExportError(f"tensor {name!r} is {array.dtype}; export casts build-model's float32 weights: rerun build-model")
    if dtype == "bfloat16":
        return to_bfloat16_bits(array)
    if dtype == "float16":
        if array.size and max(float(array.max()), -float(array.min())) >= FLOAT16_OVERFLOW:
            raise ExportError(
                f"tensor {name!r} does not fit {dtype} (values become inf); set models.<variant>.export.dtype to "
                "bfloat16 or float32 in params.yaml"
            )
        return np.asarray(array.astype(np.float16))
    return np.asarray(array, dtype=numpy_dtype(dtype_name(dtype)))


def cast_tensors(source: Mapping[str, np.ndarray], dtype: str) -> LazyTensors:
    """Every tensor (numpy, e.g. a TensorFile read as "np") in `dtype`, cast one at a time as it is written."""
    return LazyTensors({name: Spec(dtype_name(dtype), spec_of(source, name).shape) for name in source},
                       lambda name: cast_array(name, source[name], dtype))


def write_cast_weights(source_path: Path, path: Path, dtype: str, metadata: Mapping[str, str]) -> str:
    """model.safetensors at `path`: the tensors of `source_path` cast to `dtype`; returns its sha256."""
    return write_safetensors(path, cast_tensors(TensorFile(source_path, framework="np"), dtype), metadata, sha256=True)


def export_config(config: Mapping, dtype: str) -> dict:
    return {**config, "architectures": ARCHITECTURES, "dtype": dtype}


def weights_job(model_dir: Path, out: Path, dtype: str, variant: str) -> tuple[Path, Path, str, dict]:
    """What write_weights writes: (the built file, the folder's file, the dtype, the folder's file's metadata)."""
    source_path = model_dir / WEIGHTS_FILE
    metadata = weights_metadata(variant, dtype, TensorFile(source_path).metadata.get("source_sha256", ""))
    return source_path, out / WEIGHTS_FILE, dtype, metadata


def write_weights(model_dir: Path, out: Path, dtype: str, variant: str, built_hash: FileHash | None = None,
                  background: Forked | None = None) -> tuple[dict, str]:
    """model.safetensors and config.json in `dtype`; returns the config written and model.safetensors' sha256.

    When the built file already is what this export would write (float32, this variant's metadata), it is passed on
    as it is, hard-linked where the filesystem allows: the same bytes, without writing 600 MB again, and their sha256
    from `built_hash` (taken while the stage imported its libraries) when that is the same file. Other dtypes are
    hashed as they are written: by `background` when it is write_cast_weights of this very file, else here.
    """
    job = source_path, path, _, metadata = weights_job(model_dir, out, dtype, variant)
    source = TensorFile(source_path)
    if source.metadata == metadata and all(spec.dtype == dtype_name(dtype) for spec in source.specs.values()):
        link_or_copy(source_path, path)
        digest = (built_hash and built_hash.of(path)) or sha256_file(path)
    elif background is not None and background.call == (write_cast_weights, job):
        digest = background.result()
    else:
        digest = write_cast_weights(*job)
    config = export_config(json.loads((model_dir / "config.json").read_text(encoding="utf-8")), dtype)
    write_json(out / "config.json", config)
    return config, digest


def write_manifest(out: Path, known: Mapping[str, str]) -> dict:
    """manifest.json: every other file's size and sha256; `known` gives the sha256 of files hashed as they were
    written, the others are read and hashed here."""
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"files": {p.name: {"bytes": p.stat().st_size, "sha256": known.get(p.name) or sha256_file(p)} for p in files}}
    write_json(out / MANIFEST, manifest)
    return manifest


def check_tokenizer(out: Path, reference: TensorFile, prompts: Sequence[str]) -> None:
    """The folder's tokenizer loads, and gives verify-outputs' token ids for the same prompts."""
    from transformers import CLIPTokenizer  # imported at start-up by main(): here it costs nothing

    ids = token_ids(CLIPTokenizer.from_pretrained(out), prompts, tensors="np")
    for name in ("input_ids", "attention_mask"):
        if not np.array_equal(ids[name], reference[name]):
            raise ExportError(
                f"the tokenizer in {out} gives {name} {ids[name].tolist()} for {list(prompts)}, verify-outputs used "
                f"{reference[name].tolist()}; check tokenizer_config.json and special_tokens_map.json against the tokenizer files"
            )


def check_loadable(out: Path) -> dict:
    """config.json describes a model whose state dict is exactly model.safetensors' tensors, as from_pretrained needs;
    returns the architecture it describes. The config's reading and the state dict's layout come from hf_layout, which
    tests hold to transformers' CLIPSegConfig and model, so the export need not import transformers' modelling code:
    seconds of start-up.

    A float32 export holds the verified model's very bytes (write_weights), so verify-outputs' comparison is this
    folder's: checking that it loads needs no second forward pass.
    """
    exported = TensorFile(out / WEIGHTS_FILE)
    try:
        arch = architecture_of(json.loads((out / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{out / 'config.json'}: not a CLIPSeg config ({exc!r}); rerun build-model") from exc
    check_shapes(state_dict_shapes(arch), {name: spec.shape for name, spec in exported.specs.items()})
    return arch


def check_outputs(out: Path, arch: Mapping, reference: TensorFile, dtype: str, atol: float, threads: int) -> dict:
    """A float16/bfloat16 export (`dtype`) computes the reference outputs within `atol` (the error its weights' rounding
    makes) on verify-outputs' inputs; returns {output: {"max_abs_diff": exact figure, "passed": bool}}.

    Its weights are read back from the folder's model.safetensors, exactly as stored, mapped to the original layout and
    run through the reference forward pass (stages/reference.py) of the architecture `arch` its config.json describes.
    That this layout is what transformers' model computes with, verify-outputs showed by running the converted model
    itself on the same weights before rounding (and tests/test_export.py runs each export with from_pretrained). The
    weights are computed in float32: what this folder holds is its weights, while the arithmetic a user's runtime does
    in float16 or bfloat16 is its own (a GPU's kernels round otherwise than a CPU's), and a CPU without bfloat16
    instructions emulates it about ten times slower.
    """
    import torch

    from .reference import reference_forward

    torch.set_num_threads(threads)  # params verify.threads: a fixed count keeps the last bits the same everywhere
    original = OriginalLayout(TensorFile(out / WEIGHTS_FILE), clip_shapes(arch) | decoder_shapes(arch))
    try:
        with torch.inference_mode():
            got = reference_forward(original, arch, reference["pixel_values"], reference["input_ids"], torch.float32)
    except ValueError as exc:
        raise ExportError(f"the weights in {out / 'model.safetensors'} cannot run as the model its config.json describes "
                          f"({exc}); rerun build-model and export") from exc
    results = {}
    for name in OUTPUTS:
        diff = (got[name] - reference[name]).abs().max().item()
        results[name] = {"max_abs_diff": diff, "passed": diff <= atol}  # NaN compares False: fails
    failed = sorted(name for name, r in results.items() if not r["passed"])
    if failed:
        raise ExportError(
            f"the exported model in {out} (its {dtype} weights) "
            f"differs from the reference in {failed} beyond {atol} "
            f"({ {n: results[n]['max_abs_diff'] for n in failed} }); raise export.atol for this dtype in params.yaml "
            "or export float32"
        )
    return results


def check_export(out: Path, reference_file: Path, prompts: Sequence[str], dtype: str, atol: float, verify_report: Mapping, threads: int) -> dict:
    """Hold the folder to what verify-outputs checked; per output, the comparison with the reference as the report
    records it (see recording.recorded): for float32, verify-outputs' own, the weights being identical; for
    float16/bfloat16, the reference forward pass run on this folder's weights (its exact figures go to stderr)."""
    check_tokenizer(out, TensorFile(reference_file, framework="np"), prompts)
    arch = check_loadable(out)
    if dtype == "float32":
        return {name: {**verify_report["outputs"][name], "checked_by": "verify-outputs (the same float32 weights)"} for name in OUTPUTS}
    results = check_outputs(out, arch, TensorFile(reference_file), dtype, atol, threads)
    print_figures(STAGE, {f"{name} ({dtype})": (r["max_abs_diff"], atol) for name, r in results.items()})
    checked_by = f"the reference forward pass, in float32, on this folder's {dtype} weights"
    return {name: recorded(r["max_abs_diff"], None, r["passed"]) | {"checked_by": checked_by} for name, r in results.items()}


def read_report(path: Path, stage: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: cannot read the {stage} report ({exc}); run `dvc repro` so the {stage} stage writes it") from exc


def main(argv: list[str] | None = None) -> int:
    parser = params_mod.stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="build-model's directory")
    parser.add_argument("--original", type=Path, required=True, help="download's folder (tokenizer files)")
    parser.add_argument("--reference", type=Path, required=True, help="verify-outputs' reference.safetensors")
    parser.add_argument("--download-report", type=Path, required=True, help="download's report (the sources' sha256)")
    parser.add_argument("--verify-report", type=Path, required=True, help="verify-outputs' metrics (for the model card)")
    parser.add_argument("--out", type=Path, required=True, help="the Hugging Face model folder to write")
    parser.add_argument("--report", type=Path, required=True, help="the JSON report to write")
    args = parser.parse_args(argv)
    # Build the folder beside its destination and move it into place only once it loads and checks out, so a killed
    # or failed export never leaves a half-written model folder at the output path.
    staging = args.out.with_name(f".{args.out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # What needs no library starts before the imports, on the other core (bad params are reported by the body, as
    # always): a float32 export passes the built file on and lists its sha256 (600 MB to read and hash at full size),
    # hashed on a second thread; a float16 or bfloat16 export's weights are cast, written and hashed by a forked process.
    try:
        dtype = params_mod.load(args.params).model(args.variant).dtype
    except PipelineError:
        dtype = None
    built_hash = FileHash(args.model / WEIGHTS_FILE) if dtype == "float32" else None
    try:
        job = weights_job(args.model, staging, dtype, args.variant) if dtype in LOW_PRECISION else None
    except PipelineError:  # an unreadable built file: the body says what is wrong with it
        job = None
    background = Forked.start(write_cast_weights, *job) if job else None

    def body() -> None:
        params = params_mod.load(args.params)
        model = params.model(args.variant)
        download_report = read_report(args.download_report, "download")
        verify_report = read_report(args.verify_report, "verify-outputs")
        if verify_report.get("passed") is not True:
            raise ExportError(
                f"{args.verify_report} says the model did not pass verify-outputs (first divergence: "
                f"{verify_report.get('first_divergence')}); an export is only made of a verified model. Fix the "
                "conversion and rerun `dvc repro`"
            )
        atol = params.export_atol[model.dtype]
        proc = params.processor
        config, weights_sha256 = write_weights(args.model, staging, model.dtype, args.variant, built_hash, background)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(args.original / name, staging / name)
        write_json(staging / "preprocessor_config.json", preprocessor_config(proc.image_size, list(proc.image_mean), list(proc.image_std)))
        write_json(staging / "tokenizer_config.json", tokenizer_config())
        write_json(staging / "special_tokens_map.json", SPECIAL_TOKENS)
        results = check_export(staging, args.reference, model.prompts, model.dtype, atol, verify_report, params.verify.threads)
        card = model_card.render(model_card.CardInputs(
            variant=args.variant,
            dtype=model.dtype,
            architecture=model.architecture,
            image_size=proc.image_size,
            image_mean=proc.image_mean,
            image_std=proc.image_std,
            prompts=model.prompts,
            sources=model_card.source_rows(model.sources, download_report),
            verify=verify_report,
            export_atol=atol,
            export_outputs=results,
            transformers_version=config.get("transformers_version", "(unknown)"),
            project_version=model_card.project_version(),
        ))
        with atomic_output(staging / CARD, "w") as handle:
            handle.write(card)
        manifest = write_manifest(staging, {WEIGHTS_FILE: weights_sha256})
        shutil.rmtree(args.out, ignore_errors=True)
        staging.rename(args.out)
        write_json(args.report, {
            "stage": STAGE,
            "variant": args.variant,
            "dtype": model.dtype,
            "tolerance_atol": atol,
            "note": (
                f"outputs: each output against verify-outputs' {verify_report['reference_dtype']} reference, recorded as "
                "passed without its figure (its last bits change with the CPU, and this file must not); a float32 export "
                "is the verified weights themselves, a float16 or bfloat16 one was read back and run through the "
                "reference forward pass (its weights as stored, computed in float32), and export printed its figures on "
                "stderr"
            ),
            "outputs": results,
            "files": len(manifest["files"]),
            "bytes": sum(f["bytes"] for f in manifest["files"].values()),
        })

    try:
        # Imported with the rest of the start-up, not inside the work: every export loads its tokenizer with
        # transformers, and a float16 or bfloat16 export runs the reference forward pass with torch (check_outputs).
        from transformers import CLIPTokenizer  # noqa: F401

        if dtype in LOW_PRECISION:
            import torch  # noqa: F401
        return run_stage(STAGE, args.variant, body)
    finally:
        if background is not None:
            background.close()
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    exit_now(main())
