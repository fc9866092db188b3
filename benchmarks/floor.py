"""The I/O floor: a plain `safetensors.torch.save_file` of the full float32 state dict (about 600 MB).

    python benchmarks/floor.py --checkpoint original-rd64.pth --out floor.safetensors --report floor.json

Loads the full original model's state dict, drops the `model.*` keys (they share storage with `clip_model.visual.*`,
which safetensors refuses), and times only the save. The time to fsync the file afterwards is reported separately
(`fsync_s`); neither the stages nor this save sync what they write.
"""

import argparse
import json
import os
import resource
import sys
import time

import torch
from safetensors.torch import save_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--report", required=True)
    args = parser.parse_args(argv)
    state = torch.load(args.checkpoint, map_location="cpu")
    tensors = {name: tensor.contiguous() for name, tensor in state.items() if not name.startswith("model.")}
    started = time.perf_counter()
    save_file(tensors, args.out)
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    fd = os.open(args.out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_s = time.perf_counter() - started
    report = {
        "save_s": save_s,
        "fsync_s": fsync_s,
        "tensors": len(tensors),
        "bytes": os.path.getsize(args.out),
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    with open(args.report, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
