"""export: the built model + tokenizer files + stage reports -> a Hugging Face model folder, ready to load and publish.

Writes model.safetensors (in the variant's export dtype), config.json, preprocessor_config.json (the published
processor: 352x352, bilinear, ImageNet mean/std), vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json, README.md (the model card: sources, settings, verification, usage) and manifest.json (every
other file's size and sha256), then checks the folder (clipseg_pipeline.hf_export): its tokenizer gives verify-outputs'
token ids, config.json describes exactly its tensors, and float16/bfloat16 weights compute the reference outputs within
`export.atol`. The folder is assembled beside its destination and moved into place only once it checks out. The same
inputs give the same bytes.

The weights (a float32 export links build-model's verified file; another dtype casts it) are written and hashed in a
forked process while the stage imports transformers (clipseg_pipeline.background).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from clipseg_pipeline import model_card
from clipseg_pipeline import params as params_mod
from clipseg_pipeline.background import Background
from clipseg_pipeline.hf_export import (
    CARD, SPECIAL_TOKENS, ExportError, check_export, export_config, preprocessor_config, read_report, tokenizer_config,
    write_manifest, write_weights,
)  # fmt: skip
from clipseg_pipeline.hf_layout import WEIGHTS_FILE
from clipseg_pipeline.runner import exit_now, run_stage, stage_parser
from clipseg_pipeline.tensor_io import atomic_output, write_json

STAGE = "export"


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.export", __doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="build-model's directory")
    parser.add_argument("--original", type=Path, required=True, help="download's folder (tokenizer files)")
    parser.add_argument("--reference", type=Path, required=True, help="verify-outputs' reference.safetensors")
    parser.add_argument("--download-report", type=Path, required=True, help="download's report (the sources' sha256)")
    parser.add_argument("--verify-report", type=Path, required=True, help="verify-outputs' report (for the model card)")
    parser.add_argument("--out", type=Path, required=True, help="the Hugging Face model folder to write")
    parser.add_argument("--metrics", type=Path, required=True, help="the metrics JSON to write")
    parser.add_argument("--report", type=Path, required=True, help="the JSON report to write")
    args = parser.parse_args(argv)
    # Built beside its destination and moved into place only once it checks out: a killed or failed export never
    # leaves a half-written model folder at the output path.
    staging = args.out.with_name(f".{args.out.name}.staging")
    writing: list[Background] = []  # the weights' writer, waited for before the staging folder is removed

    def start() -> params_mod.Params:
        params = params_mod.load(args.params)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        writing.append(Background(write_weights, args.model, staging, params.model(args.variant).dtype, args.variant))
        return params

    def body(params: params_mod.Params) -> None:
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
        weights_sha256 = writing[0].result()
        config = export_config(json.loads((args.model / "config.json").read_text(encoding="utf-8")), model.dtype)
        write_json(staging / "config.json", config)
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
            synthetic=model.synthetic,
            assumed=model.assumed,
        ))
        with atomic_output(staging / CARD, "w") as handle:
            handle.write(card)
        manifest = write_manifest(staging, {WEIGHTS_FILE: weights_sha256}, model.synthetic)
        shutil.rmtree(args.out, ignore_errors=True)
        staging.rename(args.out)
        write_json(args.report, {
            "stage": STAGE,
            "variant": args.variant,
            "dtype": model.dtype,
            "assumed": list(model.assumed),
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
        write_json(args.metrics, {"passed": True, "atol": atol, "files": len(manifest["files"]),
                                  "bytes": sum(f["bytes"] for f in manifest["files"].values())})
        print(f"{STAGE} {args.variant}: the model folder is {args.out}/ (try it: python -m tools.segment --model "
              f"{args.out} --image IMAGE --prompt TEXT --out DIR)", file=sys.stderr)

    try:
        # Every export loads its tokenizer with transformers (check_tokenizer): imported while the weights are written.
        return run_stage(STAGE, args.variant, body, start=start, imports=("transformers.models.clip.tokenization_clip",))
    finally:
        for job in writing:
            job.close()
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    exit_now(main())
