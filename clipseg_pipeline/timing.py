"""How long a stage's start-up and work took and its peak memory: said on stderr, and recorded for the benchmark."""

from __future__ import annotations

import json
import os
import resource
import sys

# Set by the benchmark: a file to which each stage appends one JSON line with its timings.
TIMINGS_ENV = "CLIPSEG_TIMINGS"


def process_age_s() -> float:
    """Seconds since this process started: interpreter start-up plus the imports done so far."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            # starttime is field 22; the command name (field 2) may hold spaces, so count from its closing parenthesis.
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def report(stage: str, variant: str, startup_s: float, work_s: float) -> None:
    """One line on stderr; the same as a JSON line appended to $CLIPSEG_TIMINGS when it is set."""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{stage} {variant}: done in {work_s:.2f} s after {startup_s:.2f} s of start-up and imports; "
          f"peak memory {peak_mb:.0f} MB", file=sys.stderr)
    if path := os.environ.get(TIMINGS_ENV):
        record = {"stage": stage, "variant": variant, "work_s": work_s, "startup_s": startup_s, "peak_rss_mb": peak_mb}
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
