"""The one exception family of the pipeline, and how a stage's command line reports it."""

from __future__ import annotations

import sys
from collections.abc import Callable


class PipelineError(Exception):
    """An expected failure: bad input, bad params, an unreachable source. Its message says what, where and what to do."""


def run_stage(stage: str, variant: str, body: Callable[[], None]) -> int:
    """Run a stage's body; report a PipelineError as one clear line instead of a traceback, and exit non-zero."""
    try:
        body()
    except PipelineError as exc:
        print(f"{stage} {variant}: error: {exc}", file=sys.stderr)
        return 1
    return 0
