"""remap-weights: original CLIPSeg tensors (OpenAI CLIP + decoder names) -> CLIPSegForImageSegmentation tensors.

Input: the download stage's original.safetensors. Output: a safetensors file under Hugging Face names (the name map,
clipseg_pipeline.name_map), a metrics file (key counts) and a report of every rule that fired and every key dropped,
with why. Moves numpy arrays, never imports torch.
"""

from __future__ import annotations

from pathlib import Path

from clipseg_pipeline import params as params_mod
from clipseg_pipeline.name_map import FULL_MODEL_PREFIX, check_architecture, normalize, remap, shape_only, stream
from clipseg_pipeline.runner import exit_now, run_stage, stage_parser
from clipseg_pipeline.tensor_io import TensorFile, write_json, write_safetensors

STAGE = "remap-weights"


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.remap_weights", __doc__.splitlines()[0])
    parser.add_argument("--original", type=Path, required=True, help="the download stage's original.safetensors")
    parser.add_argument("--out", type=Path, required=True, help="the remapped safetensors file to write")
    parser.add_argument("--metrics", type=Path, required=True, help="the metrics JSON to write")
    parser.add_argument("--report", type=Path, required=True, help="the JSON report to write")
    args = parser.parse_args(argv)

    def body() -> None:
        model = params_mod.load(args.params).model(args.variant)
        source = TensorFile(args.original, framework="np")
        planned = normalize(shape_only(source))
        check_architecture(planned, model.architecture, args.variant)
        plan, report = remap(planned)
        original_names = {name.removeprefix(FULL_MODEL_PREFIX): name for name in source}
        source_sha256 = source.metadata.get("source_sha256", "")
        metadata = {"stage": STAGE, "variant": args.variant, "source_sha256": source_sha256}
        write_safetensors(args.out, stream(source, original_names, plan, report), metadata)
        counts = {
            "keys_in": len(report.mapped) + len(report.dropped),
            "keys_out": sum(len(targets) for targets in report.mapped.values()),
        }
        write_json(args.metrics, counts)
        write_json(args.report, {
            "stage": STAGE,
            "variant": args.variant,
            "keys_in": counts["keys_in"],
            "keys_out": counts["keys_out"],
            "dropped": report.dropped,
            "rules_fired": report.rules_fired,
            "source_sha256": source_sha256,
        })

    return run_stage(STAGE, args.variant, body)


if __name__ == "__main__":
    exit_now(main())
