"""The one exception family of the pipeline, and how a stage's command line reports it and its cost."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import time
from collections.abc import Callable

# Set by the benchmark: a file to which each stage appends one JSON line with its timings.
TIMINGS_ENV = "CLIPSEG_TIMINGS"


# glibc malloc's settings (malloc.h): M_TRIM_THRESHOLD is how much free memory the top of the heap may keep before it is
# handed back to the kernel, M_MMAP_THRESHOLD the size from which a block gets its own mapping, unmapped when freed.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed value
TRIM_THRESHOLD_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Have glibc keep the memory a stage frees, for its next tensors, instead of returning it to the kernel.

    The stages allocate and free tensors of up to tens of MB, block after block (the reference casts each block's
    weights, the models allocate each layer's activations). By default glibc maps every such block on its own and unmaps
    it when freed, so each new tensor costs a page fault per 4 KB of it: in a virtual machine, a large part of
    verify-outputs' work. Kept, the freed blocks are reused; the peak resident memory stays what it was (only freed
    memory is kept, and it is reused before the heap grows). Returns whether glibc took the settings (False on other C
    libraries, which keep their own defaults)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


class PipelineError(Exception):
    """An expected failure: bad input, bad params, an unreachable source. Its message says what, where and what to do."""


def process_age_s() -> float:
    """Seconds since this process started: interpreter start-up plus the imports done so far."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            # starttime is field 22; the command name (field 2) may hold spaces, so count from its closing parenthesis.
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def run_stage(stage: str, variant: str, body: Callable[[], None]) -> int:
    """Run a stage's body; report a PipelineError as one clear line instead of a traceback, and exit non-zero.

    On success, say on stderr how long the stage's own work took (its imports are done at module level, before the
    body runs) and its peak memory, and append the same to $CLIPSEG_TIMINGS when set.
    """
    startup = process_age_s()
    keep_freed_memory()
    started = time.perf_counter()
    try:
        body()
    except PipelineError as exc:
        print(f"{stage} {variant}: error: {exc}", file=sys.stderr)
        return 1
    work = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{stage} {variant}: done in {work:.2f} s after {startup:.2f} s of start-up and imports; peak memory {peak_mb:.0f} MB", file=sys.stderr)
    if path := os.environ.get(TIMINGS_ENV):
        record = {"stage": stage, "variant": variant, "work_s": work, "startup_s": startup, "peak_rss_mb": peak_mb}
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    return 0


def exit_now(code: int) -> None:
    """End a stage's process at once: with torch and transformers loaded, the interpreter's orderly shutdown takes
    seconds and does nothing a finished stage needs (its outputs are written and closed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
