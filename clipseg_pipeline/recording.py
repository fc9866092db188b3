"""How comparisons with the reference are recorded, shared by verify-outputs and export without importing torch.

A comparison within tolerance is recorded only as passed: its figure is the converted model's float32 rounding noise,
whose last bits change with the CPU, and the recorded files must be the same bytes on every machine. Exact figures go
to stderr. A comparison beyond tolerance is recorded to FIGURE_DIGITS significant digits.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

from .tensor_io import round_figure

# The three outputs that decide pass or fail, as CLIPSegForImageSegmentation names them.
OUTPUTS = ("logits", "conditional_embeddings", "pooled_output")
# A difference beyond its tolerance is real and recorded to this many significant digits.
FIGURE_DIGITS = 2


def recorded(max_abs: float, max_rel: float | None, passed: bool) -> dict:
    """A comparison as the metrics file records it, the same on every machine: within tolerance only that it passed;
    beyond tolerance the figures to FIGURE_DIGITS significant digits, None for NaN or Inf (JSON has no such numbers)."""
    if passed:
        return {"passed": True}
    figures = {"max_abs_diff": max_abs} if max_rel is None else {"max_abs_diff": max_abs, "max_rel_diff": max_rel}
    return {name: round_figure(value, FIGURE_DIGITS) if math.isfinite(value) else None for name, value in figures.items()} | {"passed": False}


def print_figures(stage: str, rows: Mapping[str, tuple[float, float]]) -> None:
    """The exact differences, {name: (max abs diff, tolerance)}, on stderr: for reading, not for the recorded files."""
    for name, (diff, tolerance) in rows.items():
        print(f"{stage}: {name}: max abs diff {diff:.3g} (tolerance {tolerance:g})", file=sys.stderr)
