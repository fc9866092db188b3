"""Profile one stage in a project copy kept by `benchmarks/run.py --keep DIR`: cProfile of its run, or its imports.

    python benchmarks/profile_stage.py DIR/project verify-outputs [--variant clipseg-rd64] [--top 25]
    python benchmarks/profile_stage.py DIR/project build-model --imports     # python -X importtime, slowest first

The stage runs with dvc.yaml's cmd's arguments, in a fresh process, its main() under cProfile; the profile is written
to DIR/project/profiles/<stage>.prof (it can be opened later with pstats or snakeviz). Not `python -m cProfile`: a
stage ends its process with os._exit (clipseg_pipeline.runner.exit_now), before cProfile could write anything. It overwrites
that stage's outputs in the copy with the same content. Prints the top functions by cumulative and by own time.
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import VARIANT, VENV_BIN, stage_commands  # noqa: E402

# Run in the project copy: import the stage's module (its imports stay out of the profile: --imports is for them), run
# its main() under cProfile, write the profile, then end the process as the stage itself would.
PROFILED_RUN = """
import cProfile, importlib, sys
from clipseg_pipeline.runner import exit_now
out, module, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
main = importlib.import_module(module).main
profile = cProfile.Profile()
code = profile.runcall(main, argv)
profile.dump_stats(out)
exit_now(code)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path, help="the project copy (DIR/project of a kept benchmark run)")
    parser.add_argument("stage", help="a stage name from dvc.yaml, e.g. verify-outputs")
    parser.add_argument("--variant", default=VARIANT)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--imports", action="store_true", help="list the slowest imports (python -X importtime) instead")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    commands = dict(stage_commands(args.project, args.variant))
    if args.stage not in commands:
        parser.error(f"unknown stage {args.stage!r}; dvc.yaml has {sorted(commands)}")
    argv_stage = shlex.split(commands[args.stage])
    if argv_stage[:2] != ["python", "-m"]:
        parser.error(f"expected a `python -m stages.<name> ...` command, found {commands[args.stage]!r}")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    if args.imports:
        done = subprocess.run([sys.executable, "-X", "importtime", *argv_stage[1:]], cwd=args.project, env=env,
                              capture_output=True, text=True, timeout=args.timeout)
        rows = []
        for line in done.stderr.splitlines():
            match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
            if match:
                rows.append((int(match.group(2)), int(match.group(1)), len(match.group(3)), match.group(4)))
        total = sum(own for _, own, _, _ in rows)
        print(f"{len(rows)} modules, {total / 1e6:.2f} s of imports in all (own times summed); slowest cumulative:")
        for cumulative, own, depth, name in sorted(rows, reverse=True)[: args.top]:
            print(f"  {cumulative / 1e6:7.2f} s cumulative {own / 1e6:6.2f} s own  depth {depth // 2:2d}  {name}")
        return done.returncode
    out = args.project / "profiles" / f"{args.stage}.prof"
    out.parent.mkdir(exist_ok=True)
    out.unlink(missing_ok=True)  # a stage that dies before its end writes none: no stale profile to print instead
    done = subprocess.run([sys.executable, "-c", PROFILED_RUN, str(out), *argv_stage[2:]], cwd=args.project, env=env, timeout=args.timeout)
    if not out.exists():
        print(f"{args.stage}: no profile written (exit code {done.returncode}); its error is above", file=sys.stderr)
        return done.returncode or 1
    stats = pstats.Stats(str(out))
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
