"""download: a variant's sources (URLs, mirrors or local copies) -> verified original tensors and side files.

Every source is fetched and checked (clipseg_pipeline.sources) before the first output is written, and each output is
written atomically. Output, in the folder given by --out: `original.safetensors` (every original tensor under its
original name, original dtypes), `vocab.json` + `merges.txt`, and `image` (the reference image's bytes, unchanged).
The only stage that touches the network.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from clipseg_pipeline import params as params_mod
from clipseg_pipeline.fetch import FetchPolicy
from clipseg_pipeline.runner import exit_now, run_stage, stage_parser
from clipseg_pipeline.sources import count_dtypes, fetch_all, original_tensors, side_files
from clipseg_pipeline.tensor_io import atomic_output, write_json, write_safetensors

STAGE = "download"


def _write(content: Path | bytes, dest: Path) -> None:
    with atomic_output(dest) as writer:
        if isinstance(content, bytes):
            writer.write(content)
        else:
            with open(content, "rb") as reader:
                shutil.copyfileobj(reader, writer, 1 << 20)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.download", __doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the variant's original files to")
    parser.add_argument("--cache", type=Path, required=True, help="where fetched files are kept between runs")
    parser.add_argument("--metrics", type=Path, required=True, help="the metrics JSON to write")
    parser.add_argument("--report", type=Path, required=True, help="the JSON report to write")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    def body() -> None:
        params = params_mod.load(args.params)
        model = params.model(args.variant)
        policy = FetchPolicy(
            timeout_s=params.download.timeout_s,
            retries=params.download.retries,
            max_bytes=params.download.max_bytes,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
        fetched = fetch_all(model, policy, args.cache, Path.cwd())
        tensors = original_tensors(model.sources, fetched, args.cache / "extracted" / args.variant, params.download)
        files = side_files(model, fetched, params.download.max_member_bytes)
        # Every source is checked: only now is anything written to the output folder.
        for filename, content in files.items():
            _write(content, args.out / filename)
        hashes = {name: f.sha256 for name, f in fetched.items()}
        metadata = {"stage": STAGE, "variant": args.variant, "source_sha256": " ".join(f"{k}={v}" for k, v in sorted(hashes.items()))}
        write_safetensors(args.out / "original.safetensors", tensors, metadata)
        write_json(args.metrics, {
            "tensors": len(tensors),
            "bytes": sum(f.size for f in fetched.values()),
            "unpinned": sum(not f.pinned for f in fetched.values()),
        })
        write_json(args.report, {
            "stage": STAGE,
            "variant": args.variant,
            "sources": {name: {"sha256": f.sha256, "bytes": f.size, "pinned": f.pinned} for name, f in fetched.items()},
            "tensors": len(tensors),
            "dtypes": {str(d).removeprefix("torch."): n for d, n in sorted(count_dtypes(tensors).items(), key=str)},
        })

    return run_stage(STAGE, args.variant, body)


if __name__ == "__main__":
    exit_now(main())
