"""onnxruntime latency of an ONNX export: one image and four prompts at 352 px, as transformers.js's documented usage
runs it (the image tower once for all prompts), for each file in the folder; and the files' sizes.

    python benchmarks/onnx_latency.py --folder outputs/clipseg-rd64/onnx --reference outputs/clipseg-rd64/verify/reference.safetensors --report out.json

Each file: a session on `--threads` threads (verify.threads), one untimed run, then the fastest of `--runs` runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from clipseg_pipeline.onnx_export import FILES
from clipseg_pipeline.tensor_io import TensorFile

PROMPTS = 4  # what the baseline's forward pass runs (with the image repeated four times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True, help="verify-outputs' reference.safetensors (the inputs)")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    stored = TensorFile(args.reference, framework="np")
    rows = [i % len(stored["input_ids"]) for i in range(PROMPTS)]
    feeds = {"input_ids": stored["input_ids"][rows].astype(np.int64),
             "attention_mask": stored["attention_mask"][rows].astype(np.int64),
             "pixel_values": stored["pixel_values"]}
    results = {}
    for dtype, name in FILES.items():
        path = args.folder / name
        if not path.is_file():
            continue
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(["logits"], feeds)
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            session.run(["logits"], feeds)
            times.append(time.perf_counter() - started)
        results[dtype] = {"bytes": path.stat().st_size, "latency_s": min(times), "runs_s": times}
        del session
    args.report.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
