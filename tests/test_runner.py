"""runner.run_stage: what every stage's process does around its body."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process: allocate a 16 MB tensor (under glibc's largest mmap threshold, over its first one) inside a
# stage's body or outside any, and print how many bytes malloc holds in blocks mapped on their own (mallinfo2's hblkhd).
MAPPED_BYTES = """
import ctypes, sys
import numpy as np
from clipseg_pipeline.runner import run_stage

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2

def body():
    tensor = np.ones(16 << 20, np.uint8)
    print(mallinfo2().hblkhd)

if sys.argv[1] == "stage":
    run_stage("test", "none", body)
else:
    body()
"""


def mapped_bytes(how: str) -> int:
    done = subprocess.run([sys.executable, "-c", MAPPED_BYTES, how], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc 2.33 or newer only")
def test_a_stage_keeps_freed_memory_for_its_next_tensors():
    # glibc's default maps a 16 MB block on its own (and unmaps it when freed: a page fault per 4 KB for the next one);
    # inside a stage's body it comes from the heap, where freed memory is reused.
    assert mapped_bytes("plain") >= 16 << 20
    assert mapped_bytes("stage") < 16 << 20
