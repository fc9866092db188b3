"""What every stage's and tool's process does around its work: one command line shape, errors as one clear line,
timings, and a quick exit."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .allocator import keep_freed_memory
from .errors import PipelineError
from .params import PARAMS_FILE
from .timing import process_age_s, report


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line every stage shares: `python -m stages.<name> --variant V [--params params.yaml]`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--variant", required=True, help="a variant name under `models` in params.yaml")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="the params file (default: params.yaml)")
    return parser


def run_stage(stage: str, variant: str, body: Callable[..., None], *, start: Callable[[], Any] | None = None,
              imports: Iterable[str] = ()) -> int:
    """Run a stage's work; report a PipelineError as one clear line instead of a traceback, and exit non-zero.

    `start`, when given, runs first and what it returns is passed to `body`: work begun in the background before the
    modules `imports` are imported (torch and transformers cost seconds of one core's interpreter work; see
    background.Background). Then `body` runs: the stage's work, whose time and peak memory are said on stderr.
    """
    keep_freed_memory()  # before anything is forked: a forked process inherits the settings
    try:
        started = start() if start else None
        for module in imports:
            importlib.import_module(module)
        startup = process_age_s()
        begun = time.perf_counter()
        body(*(() if start is None else (started,)))
    except PipelineError as exc:
        print(f"{stage} {variant}: error: {exc}", file=sys.stderr)
        return 1
    report(stage, variant, startup, time.perf_counter() - begun)
    return 0


def exit_now(code: int) -> None:
    """End a stage's process at once: with torch and transformers loaded, the interpreter's orderly shutdown takes
    seconds and does nothing a finished stage needs (its outputs are written and closed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
