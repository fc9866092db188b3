"""glibc malloc settings for the stages: keep the memory a stage frees for its next tensors.

The stages allocate and free tensors of up to tens of MB, block after block (the reference casts each block's
weights, the models allocate each layer's activations). By default glibc maps every such block on its own and unmaps
it when freed, so each new tensor costs a page fault per 4 KB of it: measured at full size, verify-outputs' work went
from 1.8-2.3 s to 1.6-1.8 s with these settings. The peak resident memory stays what it was (only freed memory is
kept, and it is reused before the heap grows).
"""

from __future__ import annotations

import ctypes

# malloc.h: M_TRIM_THRESHOLD is how much free memory the top of the heap may keep before it is handed back to the
# kernel, M_MMAP_THRESHOLD the size from which a block gets its own mapping, unmapped when freed.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed value
TRIM_THRESHOLD_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse; returns whether it took the settings (False on other C libraries,
    which keep their own defaults)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
