"""Benchmark the pipeline on a full-size (ViT-B/16, 150.7 M parameters) synthetic checkpoint against the old one-shot
conversion script, in one run, every measurement in a fresh process.

    python benchmarks/run.py [--out benchmarks/results/latest.json] [--keep DIR] [--quick]

Steps (see benchmarks/README.md for what each figure means):
 1. a temporary project copy (stages/, dvc.yaml, params.yaml, .dvc/config, git init) and full-size synthetic sources
    in the published formats (benchmarks/sources.py, built on tools.synthetic), pinned in the copy's params.yaml;
 2. the baseline (benchmarks/baseline.py) and the I/O floor (benchmarks/floor.py);
 3. each stage of clipseg-rd64 run as dvc.yaml's cmd, one after the other, outside DVC;
 4. a cold `dvc repro` (fresh cache, sources read in place);
    steps 2-4 are repeated (--repeat, default 3) and each figure is taken from its fastest run, the baseline's as ours:
    the least disturbed by whatever else the machine was doing (every run is kept in the JSON);
 5. no-op `dvc repro`s (rd64, then the three published variants; median of --noop-runs), then
    `dvc repro export@clipseg-rd64` after changing only an export setting, for each --export-change in turn.
Every timed run starts with the page cache written back and --warm-gb of memory touched and freed by another process
(Runner.run says why). Prints the figures, the ratios and the targets' verdicts, and writes everything to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV_BIN = Path(sys.executable).parent
VARIANT = "clipseg-rd64"
PUBLISHED = ("clipseg-rd64", "clipseg-rd16", "clipseg-rd64-refined")
# What the project copy needs to run the stages and DVC (the tests, data and caches are left out).
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore", "pyproject.toml")
# The code: the stages, the library, and the tools (the sources are made with tools.synthetic).
CODE = ("stages", "clipseg_pipeline", "tools")
PROMPTS_IMAGE = "image.jpg"
STAGE_TIMEOUT_S = 300
# Memory touched and freed by a short-lived process before every timed run (Runner.run says why), by default: more
# than any one stage or the baseline allocates (--warm-gb).
WARM_GB = 2.0
# Disk the work folder needs: sources (~1 GB) and per built variant ~2.8 GB of outputs (the DVC cache hardlinks them;
# on a filesystem without links it copies them, doubling this).
NEEDED_GB = {"quick": 6, "full": 12}
# The speed and memory targets: (figure, limit, what it is compared with).
TARGETS = {
    "pipeline_cold": 2.0,  # x baseline end-to-end
    "work_vs_floor": {"remap-weights": 3.0, "build-model": 3.0, "export": 3.0},  # x plain safetensors save
    # x baseline single forward pass; 1.2 since verify-outputs computes its reference after the imports instead of in a
    # forked process beside them: simpler, the reference's vision tower more work (docs/performance.md)
    "work_vs_forward": {"verify-outputs": 1.2},
    "rss_vs_baseline": {"remap-weights": 0.5, "export": 0.5, "build-model": 0.75, "verify-outputs": 0.75},
    "noop_s": 2.0,  # seconds, strictly below
    "export_change": 0.6,  # x baseline end-to-end
    "onnx_fp32_latency": 0.5,  # x baseline forward (1 image x 4 prompts here, the image repeated 4 times there)
    "onnx_q8_latency": 0.6,  # x the float32 file's latency
    "onnx_rss": 2.0,  # export-onnx's peak RSS, x baseline peak
}
# Export-only changes measured by default, in this order: a setting that keeps the float32 export (its tolerance, which
# the report and model card quote), then a dtype change, which writes the bfloat16 file and reads it back to run its
# weights (in float32) through the reference forward pass against verify-outputs' reference outputs.
EXPORT_CHANGES = ("export.atol.float32=0.0002", f"models.{VARIANT}.export.dtype=bfloat16")
# The conversion and its proof, what the baseline (the old one-shot script) does: measured alone every round, and as a
# cold `dvc repro export@<variant>`. The other stages (verify-usage, export-onnx) go beyond it and are measured alone
# once, after the rounds.
CONVERSION = ("download", "remap-weights", "build-model", "verify-outputs", "export")
# The published transformers.js files of a CLIPSeg ViT-B/16 model, in bytes: the ONNX files may be no larger.
PUBLISHED_ONNX_BYTES = {"fp32": 545_000_000, "fp16": 273_000_000, "q8": 139_000_000}
# A stage measured once more per round with one setting changed from params.yaml's default, to show what that
# setting costs: verify-outputs with a float32 reference (half the reference's time; its bytes follow the CPU).
ALTERNATIVE = ("verify-outputs", "verify.reference_dtype", "float32")


# How often TreeRss sums the resident memory of a run's processes: a sample reads /proc, about 0.4 ms of one core
# here, so 2% of a core at this rate; processes that run side by side do so for far longer.
RSS_SAMPLE_S = 0.025


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and shows its stderr's tail."""


class TreeRss:
    """The peak of the summed resident memory of every process in a session (a run and all it starts), sampled on a
    thread every RSS_SAMPLE_S from /proc. os.wait4's ru_maxrss is the largest single process's own peak, which
    understates a run of several processes at once: `dvc repro` and the stage it runs, or a stage with a helper process
    (export writes its weights from a forked process). A sum counts the pages two processes share (a fork's
    copy-on-write memory, a file both map) twice: it is an upper bound. Where /proc is missing it stays 0."""

    def __init__(self, session: int):
        self.session = session
        self.peak_bytes = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-rss", daemon=True)
        self._thread.start()

    def _sum(self) -> int:
        total = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    # Fields after the command name (which may hold spaces): state, ppid, pgrp, session, ...
                    if int(stat.read().rsplit(b")", 1)[1].split()[3]) != self.session:
                        continue
                with open(f"/proc/{entry.name}/statm", "rb") as statm:
                    total += int(statm.read().split()[1]) * self._page
            except (OSError, ValueError, IndexError):  # the process ended meanwhile
                continue
        return total

    def _run(self) -> None:
        if not os.path.isdir("/proc"):
            return
        while not self._stop.wait(RSS_SAMPLE_S):
            self.peak_bytes = max(self.peak_bytes, self._sum())

    def stop(self) -> float:
        """Stop sampling; the peak in MB."""
        self._stop.set()
        self._thread.join()
        return self.peak_bytes / (1 << 20)


@dataclass
class Run:
    """One child process: its wall time (perf_counter around it) and its peak RSS: the larger of os.wait4's (its
    largest process's own peak) and TreeRss's (the sum over the processes it ran, sampled)."""

    name: str
    argv: list[str]
    wall_s: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str
    timings: list[dict] = field(default_factory=list)  # lines the stages appended to $CLIPSEG_TIMINGS
    loadavg: float = 0.0  # the 1-minute load average when the child started: a figure taken on a busy machine is inflated
    flush_s: float = 0.0  # untimed, before the child: writing back the page cache's dirty data (os.sync)
    warm_s: float = 0.0  # untimed, before the child: a process touching and freeing --warm-gb of memory (Runner.run)
    largest_process_rss_mb: float = 0.0  # os.wait4's ru_maxrss
    tree_rss_mb: float = 0.0  # TreeRss's sampled peak of the sum


class Runner:
    def __init__(self, logs: Path, env: dict[str, str], timeout_scale: float, warm_gb: float = WARM_GB):
        self.logs = logs
        self.env = env
        self.timeout_scale = timeout_scale
        self.warm_bytes = int(warm_gb * (1 << 30))
        self.runs: list[Run] = []

    def run(self, name: str, argv: list[str], cwd: Path, timeout_s: float, timings: bool = False) -> Run:
        """Run `argv` to completion in its own process group; a failure or timeout raises BenchError."""
        safe = re.sub(r"[^\w.-]+", "_", name)
        out_path, err_path = self.logs / f"{safe}.out", self.logs / f"{safe}.err"
        timings_path = self.logs / f"{safe}.timings.jsonl"
        env = dict(self.env)
        if timings:
            timings_path.unlink(missing_ok=True)
            env["CLIPSEG_TIMINGS"] = str(timings_path)
        timeout_s *= self.timeout_scale
        timed_out = threading.Event()
        print(f"  {name} ...", end="", flush=True)
        # Untimed: write back what earlier steps left in the page cache, so that no run pays for its predecessor's
        # writes (with ~2 GB waiting to be written, the kernel throttles every writer: remap-weights and build-model
        # measured 2-3x slower). Every run starts so, the baseline and the floor as the stages.
        flushed = time.perf_counter()
        os.sync()
        flush_s = time.perf_counter() - flushed
        # Untimed: have memory recently used before every run. This VM's kernel reports free memory to the hypervisor
        # (virtio-balloon free page reporting), which takes it back; touching such a page again costs a fault in the
        # host, about 10 us per 4 KB page. A run that finds only reported pages pays that on everything it allocates,
        # page cache included: writing 600 MB measured 1.4-1.6 s after 5 idle seconds, 0.16 s right after another
        # process freed 2 GB. Which state a run met depended on what ran before it (the floor follows the baseline's
        # exit, which frees 1.7 GB; build-model alone followed remap-weights, and removing its output, hard-linked by
        # export and the DVC cache, freed nothing: 1.0 s of work against 0.3 s in `dvc repro`). It took 0.4-5 s a run
        # here; on a machine whose kernel keeps free memory it changes nothing, and --warm-gb 0 turns it off.
        warmed = time.perf_counter()
        self.warm()
        warm_s = time.perf_counter() - warmed
        load = os.getloadavg()[0]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            tree = TreeRss(proc.pid)  # its own session: the session id is its pid

            def kill() -> None:
                timed_out.set()
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the child's own group: it and what it started
                except ProcessLookupError:
                    pass

            timer = threading.Timer(timeout_s, kill)
            timer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                kill()
                proc.wait()
                raise
            finally:
                timer.cancel()
                tree_mb = tree.stop()
            wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: keep Popen from waiting again
        largest_mb = usage.ru_maxrss / 1024
        run = Run(name, list(argv), wall, max(largest_mb, tree_mb), proc.returncode, str(out_path), str(err_path), loadavg=load,
                  flush_s=flush_s, warm_s=warm_s, largest_process_rss_mb=largest_mb, tree_rss_mb=tree_mb)
        if timings and timings_path.exists():
            run.timings = [json.loads(line) for line in timings_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.runs.append(run)
        print(f" {wall:.2f} s, peak RSS {run.peak_rss_mb:.0f} MB (load {load:.1f})", flush=True)
        if timed_out.is_set() or run.returncode != 0:
            why = f"timed out after {timeout_s:.0f} s" if timed_out.is_set() else f"exited with status {run.returncode}"
            raise BenchError(f"{name} {why}\n  command: {shlex.join(argv)}\n  in: {cwd}\n  stderr ({err_path}), last lines:\n{tail(err_path)}")
        return run

    def warm(self) -> None:
        """Touch `warm_bytes` of memory in a short-lived process and free it (see run); never the runner itself, whose
        peak RSS every child would inherit as its own starting ru_maxrss."""
        if self.warm_bytes <= 0:
            return
        code = f"import numpy; numpy.ones({self.warm_bytes // 8})"
        try:
            subprocess.run([sys.executable, "-c", code], check=True, timeout=120 * self.timeout_scale, capture_output=True)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BenchError(f"the memory warm-up before each run failed: {exc}") from exc


def tail(path: Path | str, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"    (cannot read: {exc})"
    # Progress bars rewrite their line with \r: keep only the last state of each line.
    rows = [row.rsplit("\r", 1)[-1] for row in text.splitlines()]
    return "\n".join("    " + row for row in rows[-lines:]) or "    (empty)"


# ---- the project copy ----------------------------------------------------------------------------------------------


def make_project(root: Path, dvc_yaml: Path | None = None) -> None:
    """A fresh git + DVC project holding the repository's pipeline code and settings (no data, lock or cache)."""
    for package in CODE:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in PROJECT_FILES:
        if (REPO / name).exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / name, root / name)
    if dvc_yaml:
        shutil.copyfile(dvc_yaml, root / "dvc.yaml")
    try:
        subprocess.run(["git", "init", "-q"], cwd=root, check=True, timeout=60, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"git init in {root} failed: {exc}") from exc


def write_params(root: Path, sources: Path, manifest: dict, variants: list[str], changes: dict[str, object] | None = None) -> None:
    """The repository's params.yaml with the published variants' sources pointing at the synthetic files, every one
    pinned, no published check values (random weights cannot match them), and `variants` as given."""
    data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    files = manifest["files"]
    for variant in PUBLISHED:
        model = data["models"][variant]
        pinned = {name: {"url": str(sources / file), "sha256": files[file]["sha256"]}
                  for name, file in (("clip", "clip.pt"), ("vocab", "vocab.json"), ("merges", "merges.txt"), ("image", PROMPTS_IMAGE))}
        pinned["decoder"] = {"url": str(sources / "weights.zip"), "sha256": files["weights.zip"]["sha256"],
                             "member": manifest["members"][variant]}
        model["sources"] = dict(sorted(pinned.items()))
        model["expected"] = None
    data["variants"] = list(variants)
    for dotted, value in (changes or {}).items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise BenchError(f"params.yaml has no key {dotted!r} to change (--export-change or ALTERNATIVE)")
        node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False, width=1000), encoding="utf-8")


def resolver(root: Path, variant: str):
    """A function that resolves `${item.variant}` and `${params.key}` in a dvc.yaml string as DVC resolves them."""
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))

    def value(expr: str) -> str:
        if expr == "item.variant":
            return variant
        node = params
        for key in expr.split("."):
            if not isinstance(node, dict) or key not in node:
                raise BenchError(f"dvc.yaml: cannot resolve ${{{expr}}} for the benchmark")
            node = node[key]
        return str(node)

    return lambda text: re.sub(r"\$\{\s*([^}]+?)\s*\}", lambda m: value(m.group(1)), text)


def stage_commands(root: Path, variant: str) -> list[tuple[str, str]]:
    """(stage name, shell command) in dvc.yaml's order, resolved (`resolver`)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    resolve = resolver(root, variant)
    commands = []
    for name, stage in spec["stages"].items():
        cmd = stage["cmd"]
        commands.append((name, resolve(" && ".join(cmd) if isinstance(cmd, list) else cmd)))
    return commands


def stage_outputs(root: Path, variant: str) -> dict[str, list[Path]]:
    """Each stage's outputs (outs, metrics, plots) in dvc.yaml, resolved (`resolver`)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    resolve = resolver(root, variant)
    outputs = {}
    for name, stage in spec["stages"].items():
        entries = [entry for kind in ("outs", "metrics", "plots") for entry in stage.get(kind, [])]
        outputs[name] = [root / resolve(next(iter(entry)) if isinstance(entry, dict) else entry) for entry in entries]
    return outputs


def remove_outputs(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def reset_outputs(root: Path) -> None:
    """Back to a fresh checkout: no outputs, no lock file, no DVC cache."""
    remove_outputs([root / path for path in ("data", "outputs", "metrics", "reports", ".dvc/cache", ".dvc/tmp", "dvc.lock")])


def code_version() -> dict:
    """The repository's commit and the files of the pipeline's code and dvc.yaml/params.yaml that differ from it."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted": git("status", "--short", "--", *CODE, "dvc.yaml", "params.yaml").splitlines()}


# ---- figures -------------------------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def verdict(value: float | None, limit: float, strict: bool = False) -> str:
    if value is None:
        return "n/a"
    return "PASS" if (value < limit if strict else value <= limit) else "FAIL"


def by_stage(records: list[dict]) -> dict[str, dict]:
    return {record["stage"]: record for record in records}


def stage_rows(direct: dict[str, Run]) -> dict[str, dict]:
    rows = {}
    for name, run in direct.items():
        record = run.timings[-1] if run.timings else {}
        rows[name] = {
            "wall_s": run.wall_s,
            "startup_s": record.get("startup_s"),
            "work_s": record.get("work_s"),
            "other_s": run.wall_s - record["startup_s"] - record["work_s"] if record else None,  # shell, exit, teardown
            "peak_rss_mb": run.peak_rss_mb,
            "peak_rss_mb_self_reported": record.get("peak_rss_mb"),
        }
    return rows


def evaluate(results: dict) -> list[dict]:
    base, floor = results["baseline"], results["floor"]
    rows = results["stages"]
    targets = []

    def add(name: str, value: float | None, limit: float, unit: str, strict: bool = False, note: str = "") -> None:
        targets.append({"target": name, "value": value, "limit": limit, "unit": unit, "strict": strict,
                        "verdict": verdict(value, limit, strict), "note": note})

    cold = results["dvc"].get("cold_repro", {})
    add("conversion cold (dvc repro export@rd64) / baseline end-to-end", ratio(cold.get("wall_s"), base["wall_s"]),
        TARGETS["pipeline_cold"], "x")
    for stage, limit in TARGETS["work_vs_floor"].items():
        add(f"{stage} work / I/O floor", ratio(rows.get(stage, {}).get("work_s"), floor["save_s"]), limit, "x")
    for stage, limit in TARGETS["work_vs_forward"].items():
        add(f"{stage} work / baseline forward", ratio(rows.get(stage, {}).get("work_s"), base["forward_s"]), limit, "x")
    alt = results.get("alternative")
    if alt:
        add(f"{alt['stage']} work / baseline forward, with {alt['setting']}", ratio(alt["work_s"], base["forward_s"]),
            TARGETS["work_vs_forward"][alt["stage"]], "x", note="not the default: its bytes follow the CPU")
    for stage, limit in TARGETS["rss_vs_baseline"].items():
        add(f"{stage} peak RSS / baseline peak", ratio(rows.get(stage, {}).get("peak_rss_mb"), base["peak_rss_mb"]), limit, "x")
    noop = results["dvc"].get("noop_published") or results["dvc"].get("noop_rd64") or {}
    add(f"no-op dvc repro ({', '.join(noop.get('variants', [])) or 'not run'})", noop.get("median_s"), TARGETS["noop_s"], "s", strict=True,
        note="" if noop.get("variants") == list(PUBLISHED) else "only rd64 measured; the target is for the three published variants")
    onnx, beyond = results.get("onnx", {}), results.get("beyond", {})
    if onnx:
        add("onnxruntime fp32, 1 image x 4 prompts / baseline forward", ratio(onnx["fp32"]["latency_s"], base["forward_s"]),
            TARGETS["onnx_fp32_latency"], "x")
        add("onnxruntime q8 / fp32 latency", ratio(onnx["q8"]["latency_s"], onnx["fp32"]["latency_s"]), TARGETS["onnx_q8_latency"], "x")
        for dtype, limit in PUBLISHED_ONNX_BYTES.items():
            add(f"ONNX {dtype} file / the published transformers.js file", ratio(onnx[dtype]["bytes"], limit), 1.0, "x")
    if "export-onnx" in beyond:
        add("export-onnx peak RSS / baseline peak", ratio(beyond["export-onnx"]["peak_rss_mb"], base["peak_rss_mb"]),
            TARGETS["onnx_rss"], "x", note=f"wall {beyond['export-onnx']['wall_s']:.1f} s")
    for change in results["dvc"].get("export_changes", []):
        add(f"export-only change ({change['change'].split('.', 1)[-1] if change['change'].startswith('models.') else change['change']})"
            " / baseline end-to-end", ratio(change["wall_s"], base["wall_s"]),
            TARGETS["export_change"], "x")
    return targets


DOCS = HERE.parent / "docs" / "performance.md"
DOCS_START, DOCS_END = "<!-- benchmark table: written by `python benchmarks/run.py --docs` -->", "<!-- end of benchmark table -->"


def docs_table(results: dict) -> str:
    """The latest figures as Markdown, for docs/performance.md: the stages and every target with its verdict."""
    base, floor, rows = results["baseline"], results["floor"], results["stages"]
    lines = [
        f"From one run of `{results['code']['commit'][:7]}`"
        + (" with uncommitted changes" if results["code"]["uncommitted"] else "")
        + f" on {results['machine']['cpus']} CPUs: the baseline (transformers' old one-shot conversion) took "
        f"{base['wall_s']:.2f} s end to end, its forward pass {base['forward_s']:.2f} s, and peaked at "
        f"{base['peak_rss_mb']:.0f} MB; the I/O floor (a plain safetensors save) {floor['save_s']:.2f} s.",
        "",
        "| stage | wall s | start-up s | work s | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {stage} | {fmt(row['wall_s'])} | {fmt(row['startup_s'])} | {fmt(row['work_s'])} | {row['peak_rss_mb']:.0f} |"
              for stage, row in {**rows, **results.get("beyond", {})}.items()]
    if results.get("onnx"):
        lines += ["", "| ONNX file | MB | onnxruntime, 1 image x 4 prompts, s |", "|---|---|---|"]
        lines += [f"| {dtype} | {r['bytes'] / 1e6:.1f} | {r['latency_s']:.3f} |" for dtype, r in results["onnx"].items()]
    lines += ["", "| target | figure | limit | verdict |", "|---|---|---|---|"]
    for t in results["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['target']}{note} | {value} | {'<' if t['strict'] else '<='} {t['limit']}{t['unit']} | {t['verdict']} |")
    return "\n".join(lines)


def write_docs(results: dict, path: Path = DOCS) -> None:
    """Replace the table between the markers in docs/performance.md with this run's."""
    text = path.read_text(encoding="utf-8")
    if DOCS_START not in text or DOCS_END not in text:
        raise BenchError(f"{path} lacks the benchmark table's markers; restore them from git")
    head, rest = text.split(DOCS_START, 1)
    path.write_text(f"{head}{DOCS_START}\n{docs_table(results)}\n{DOCS_END}{rest.split(DOCS_END, 1)[1]}", encoding="utf-8")


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(results: dict) -> None:
    base, floor, rows = results["baseline"], results["floor"], results["stages"]
    print("\n== References ==")
    print(f"baseline (old one-shot script): end-to-end {base['wall_s']:.2f} s, peak RSS {base['peak_rss_mb']:.0f} MB; "
          f"imports {base['imports_s']:.2f} s, construct (random init) {base['construct_s']:.2f} s, torch.load {base['load_s']:.2f} s, "
          f"convert {base['convert_s']:.2f} s, processor {base['processor_s']:.2f} s, forward {base['forward_s']:.2f} s, "
          f"save_pretrained {base['save_s']:.2f} s")
    print(f"I/O floor (safetensors save_file, {floor['bytes'] / 1e6:.0f} MB): {floor['save_s']:.2f} s (+ {floor['fsync_s']:.2f} s to fsync it, not counted)")

    limits_floor, limits_fwd, limits_rss = TARGETS["work_vs_floor"], TARGETS["work_vs_forward"], TARGETS["rss_vs_baseline"]
    print("\n== Stages of clipseg-rd64, each run alone as dvc.yaml's cmd (fresh process) ==")
    head = f"{'stage':<15}{'wall s':>8}{'start s':>8}{'work s':>8}{'other s':>8}{'RSS MB':>8} | {'wall/e2e':>8}{'work/fwd':>9}{'RSS/base':>9}{'work/floor':>11} | targets"
    print(head)
    print("-" * len(head) + "-" * 30)
    for stage, row in rows.items():
        w_e2e, w_fwd = ratio(row["wall_s"], base["wall_s"]), ratio(row["work_s"], base["forward_s"])
        r_base, w_floor = ratio(row["peak_rss_mb"], base["peak_rss_mb"]), ratio(row["work_s"], floor["save_s"])
        checks = []
        if stage in limits_floor:
            checks.append(f"work<={limits_floor[stage]}x floor {verdict(w_floor, limits_floor[stage])}")
        if stage in limits_fwd:
            checks.append(f"work<={limits_fwd[stage]}x fwd {verdict(w_fwd, limits_fwd[stage])}")
        if stage in limits_rss:
            checks.append(f"RSS<={limits_rss[stage]}x {verdict(r_base, limits_rss[stage])}")
        print(f"{stage:<15}{fmt(row['wall_s']):>8}{fmt(row['startup_s']):>8}{fmt(row['work_s']):>8}{fmt(row['other_s']):>8}"
              f"{row['peak_rss_mb']:>8.0f} | {fmt(w_e2e):>8}{fmt(w_fwd):>9}{fmt(r_base):>9}{fmt(w_floor):>11} | {'; '.join(checks)}")
    total = {k: sum(r[k] or 0 for r in rows.values()) for k in ("wall_s", "startup_s", "work_s", "other_s")}
    print(f"{'all five':<15}{total['wall_s']:>8.2f}{total['startup_s']:>8.2f}{total['work_s']:>8.2f}{total['other_s']:>8.2f}"
          f"{max(r['peak_rss_mb'] for r in rows.values()):>8.0f} | {fmt(ratio(total['wall_s'], base['wall_s'])):>8}")

    alt = results.get("alternative")
    if alt:
        print(f"{alt['stage']} with {alt['setting']} (not the default): wall {alt['wall_s']:.2f} s, start {fmt(alt['startup_s'])} s, "
              f"work {fmt(alt['work_s'])} s = {fmt(ratio(alt['work_s'], base['forward_s']))}x baseline forward, "
              f"RSS {alt['peak_rss_mb']:.0f} MB")

    for stage, row in results.get("beyond", {}).items():
        print(f"{stage} (beyond the conversion, alone): wall {row['wall_s']:.2f} s, start {fmt(row['startup_s'])} s, "
              f"work {fmt(row['work_s'])} s, RSS {row['peak_rss_mb']:.0f} MB")
    for dtype, r in results.get("onnx", {}).items():
        print(f"ONNX {dtype}: {r['bytes'] / 1e6:.1f} MB, onnxruntime 1 image x 4 prompts {r['latency_s']:.3f} s")

    print("\n== DVC ==")
    dvc = results["dvc"]
    cold = dvc.get("cold_repro")
    if cold:
        print(f"cold `dvc repro` ({VARIANT}, fresh cache, hashing included): {cold['wall_s']:.2f} s = {fmt(ratio(cold['wall_s'], base['wall_s']))}x baseline; "
              f"stages' start-up {cold['stages_startup_s']:.2f} s + work {cold['stages_work_s']:.2f} s, "
              f"DVC itself (start-up, hashing, caching, lock; and stage exits) {cold['dvc_overhead_s']:.2f} s; peak RSS of the tree {cold['peak_rss_mb']:.0f} MB")
        for stage, rec in cold["stages"].items():
            print(f"    {stage:<15} start-up {rec['startup_s']:.2f} s, work {rec['work_s']:.2f} s, peak {rec['peak_rss_mb']:.0f} MB")
    for key, label in (("noop_rd64", "no-op `dvc repro`, clipseg-rd64"), ("noop_published", "no-op `dvc repro`, the three published variants")):
        if dvc.get(key):
            noop = dvc[key]
            print(f"{label}: median {noop['median_s']:.2f} s (runs: {', '.join(f'{s:.2f}' for s in noop['runs_s'])}); stages run: {noop['stages_run'] or 'none'}")
    if dvc.get("build_other_variants"):
        other = dvc["build_other_variants"]
        print(f"(building clipseg-rd16 + clipseg-rd64-refined for the no-op check: {other['wall_s']:.2f} s)")
    for change in dvc.get("export_changes", []):
        print(f"after changing only {change['change']}: `{change['command']}` {change['wall_s']:.2f} s = {fmt(ratio(change['wall_s'], base['wall_s']))}x baseline; "
              f"stages run: {change['stages_run']}")

    print("\n== Where the time goes ==")
    print(f"baseline: imports {base['imports_s']:.2f} s ({base['imports_s'] / base['wall_s']:.0%} of its {base['wall_s']:.2f} s), "
          f"forward {base['forward_s'] / base['wall_s']:.0%}, random init {base['construct_s'] / base['wall_s']:.0%}")
    print(f"our five stages run alone: start-up/imports {total['startup_s']:.2f} s ({total['startup_s'] / total['wall_s']:.0%}), "
          f"work {total['work_s']:.2f} s ({total['work_s'] / total['wall_s']:.0%}), process exit/shell {total['other_s']:.2f} s")
    if cold:
        print(f"cold dvc repro: stages' start-up {cold['stages_startup_s'] / cold['wall_s']:.0%}, stages' work {cold['stages_work_s'] / cold['wall_s']:.0%}, "
              f"DVC and process exits {cold['dvc_overhead_s'] / cold['wall_s']:.0%}")

    print("\n== Targets ==")
    for t in results["targets"]:
        limit = f"{'<' if t['strict'] else '<='} {t['limit']}{t['unit']}"
        value = "-" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        print(f"  {t['verdict']:<5} {t['target']:<62} {value:>8}  (target {limit}){'  ' + t['note'] if t['note'] else ''}")
    load = results["machine"]
    # The load after counts the benchmark's own runs (about one busy CPU throughout): only the load before says whether
    # something else was running.
    print(f"\nload average before/after: {load['loadavg_before']} / {load['loadavg_after']} on {load['cpus']} CPUs"
          + ("  -- the machine was busy before the benchmark: timings are inflated" if load["loadavg_before"][0] > 0.5 * load["cpus"] else ""))


# ---- the benchmark -------------------------------------------------------------------------------------------------


def dvc_run(runner: Runner, name: str, args: list[str], root: Path, timeout_s: float) -> Run:
    return runner.run(name, [str(VENV_BIN / "dvc"), *args], root, timeout_s, timings=True)


def stages_ran(run: Run) -> list[str]:
    """The stages `dvc repro` says it ran, in order."""
    return re.findall(r"^Running stage '([^']+)'", Path(run.stdout).read_text(encoding="utf-8", errors="replace"), re.MULTILINE)


def dvc_status(root: Path, env: dict[str, str], target: str) -> str:
    """`dvc status` of a target (untimed): why DVC considers its stages changed."""
    try:
        done = subprocess.run([str(VENV_BIN / "dvc"), "status", target], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(dvc status failed: {exc})"
    return done.stdout.strip()


def benchmark(work: Path, args: argparse.Namespace, results: dict) -> dict:
    """Fill `results` step by step (a failure leaves what was measured so far)."""
    logs, sources, root = work / "logs", work / "sources", work / "project"
    logs.mkdir(parents=True)
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` and `dvc` in dvc.yaml's cmds: this venv's
    env["DVC_SITE_CACHE_DIR"] = str(work / "dvc-site-cache")  # DVC's state and index: fresh, and removed with the rest
    env["DVC_NO_ANALYTICS"] = "1"
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"  # everything is local: never wait on the network
    env.pop("CLIPSEG_TIMINGS", None)
    runner = Runner(logs, env, args.timeout_scale, args.warm_gb)
    py = sys.executable
    results |= {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                                 "loadavg_before": [round(x, 2) for x in os.getloadavg()], "warm_gb": args.warm_gb},
                     "variant": VARIANT, "runs": runner.runs}

    results["code"] = code_version()
    print("project copy and full-size synthetic sources")
    make_project(root, args.dvc_yaml)
    runner.run("sources", [py, str(HERE / "sources.py"), "--project", str(root), "--out", str(sources)], work, 600)
    manifest = json.loads((sources / "sources.json").read_text(encoding="utf-8"))
    results["sources"] = manifest
    write_params(root, sources, manifest, [VARIANT])

    results["dvc"] = dvc = {}
    baselines, floors, directs, colds, alternatives = [], [], [], [], []
    for round_ in range(1, args.repeat + 1):
        suffix = f" (round {round_} of {args.repeat})" if args.repeat > 1 else ""
        print(f"references{suffix}")
        base_report, floor_report = logs / f"baseline-{round_}.json", logs / f"floor-{round_}.json"
        run = runner.run("baseline", [py, str(HERE / "baseline.py"), "--checkpoint", str(sources / "original-rd64.pth"),
                                      "--vocab", str(sources / "vocab.json"), "--merges", str(sources / "merges.txt"),
                                      "--image", str(sources / PROMPTS_IMAGE), "--out", str(work / "baseline-out"),
                                      "--report", str(base_report)], work, 600)
        baselines.append({"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb, **json.loads(base_report.read_text(encoding="utf-8"))})
        shutil.rmtree(work / "baseline-out", ignore_errors=True)
        run = runner.run("floor", [py, str(HERE / "floor.py"), "--checkpoint", str(sources / "original-rd64.pth"),
                                   "--out", str(work / "floor.safetensors"), "--report", str(floor_report)], work, 300)
        floors.append({"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb, **json.loads(floor_report.read_text(encoding="utf-8"))})
        (work / "floor.safetensors").unlink(missing_ok=True)

        print(f"stages of {VARIANT}, each alone{suffix}")
        direct = {}
        outputs = stage_outputs(root, VARIANT)
        for stage, cmd in stage_commands(root, VARIANT):
            if stage not in CONVERSION:
                continue
            # As DVC does before it runs a stage (untimed): its outputs are removed, so the stage writes new files
            # rather than replacing the last round's (freeing 600 MB of an old file inside the timed run).
            remove_outputs(outputs[stage])
            direct[stage] = runner.run(f"stage {stage}", ["/bin/sh", "-c", cmd], root, STAGE_TIMEOUT_S, timings=True)
            if not direct[stage].timings:
                raise BenchError(f"stage {stage} reported no timings to $CLIPSEG_TIMINGS (does its main() go through runner.run_stage?)")
        directs.append(stage_rows(direct))
        stage, key, value = ALTERNATIVE
        write_params(root, sources, manifest, [VARIANT], {key: value})
        remove_outputs(outputs[stage])
        cmd = dict(stage_commands(root, VARIANT))[stage]
        alternatives.append(stage_rows({stage: runner.run(f"stage {stage} ({key}={value})", ["/bin/sh", "-c", cmd], root,
                                                          STAGE_TIMEOUT_S, timings=True)})[stage])
        write_params(root, sources, manifest, [VARIANT])

        print(f"dvc repro{suffix}")
        reset_outputs(root)
        run = dvc_run(runner, "dvc repro (cold, the conversion)", ["repro", f"export@{VARIANT}"], root, 900)
        stages = by_stage(run.timings)
        startup, work_s = sum(r["startup_s"] for r in stages.values()), sum(r["work_s"] for r in stages.values())
        colds.append({"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb, "stages": stages,
                      "stages_startup_s": startup, "stages_work_s": work_s, "dvc_overhead_s": run.wall_s - startup - work_s})
    # The fastest run of each: the baseline's end-to-end and its forward pass each from their fastest run.
    results["baseline"] = min(baselines, key=lambda b: b["wall_s"]) | {"forward_s": min(b["forward_s"] for b in baselines)}
    results["floor"] = min(floors, key=lambda f: f["save_s"])
    results["stages"] = {stage: min((rows[stage] for rows in directs), key=lambda r: r["wall_s"]) for stage in directs[0]}
    stage, key, value = ALTERNATIVE
    results["alternative"] = {"stage": stage, "setting": f"{key}={value}"} | min(alternatives, key=lambda r: r["wall_s"])
    dvc["cold_repro"] = min(colds, key=lambda c: c["wall_s"])
    results["rounds"] = {"baseline": baselines, "floor": floors, "stages": directs, "cold_repro": colds, "alternative": alternatives}

    print("the stages beyond the conversion, each alone, once")
    outputs = stage_outputs(root, VARIANT)
    beyond = {}
    for stage, cmd in stage_commands(root, VARIANT):
        if stage not in CONVERSION:
            remove_outputs(outputs[stage])
            beyond[stage] = runner.run(f"stage {stage}", ["/bin/sh", "-c", cmd], root, 3 * STAGE_TIMEOUT_S, timings=True)
    results["beyond"] = stage_rows(beyond)
    latency = work / "onnx-latency.json"
    runner.run("onnx latency", [py, str(HERE / "onnx_latency.py"), "--folder", str(root / "outputs" / VARIANT / "onnx"),
                                "--reference", str(root / "outputs" / VARIANT / "verify" / "reference.safetensors"),
                                "--report", str(latency)], root, 600)
    results["onnx"] = json.loads(latency.read_text(encoding="utf-8"))

    def noop(key: str, variants: list[str]) -> None:
        runs = [dvc_run(runner, f"dvc repro (no-op, {len(variants)} variant(s), #{i + 1})", ["repro"], root, 300) for i in range(args.noop_runs)]
        dvc[key] = {"variants": variants, "runs_s": [r.wall_s for r in runs], "median_s": statistics.median(r.wall_s for r in runs),
                    "peak_rss_mb": max(r.peak_rss_mb for r in runs), "stages_run": sorted({s for r in runs for s in stages_ran(r)})}

    noop("noop_rd64", [VARIANT])
    if not args.quick:
        write_params(root, sources, manifest, list(PUBLISHED))
        run = dvc_run(runner, "dvc repro (build rd16 + refined)", ["repro"], root, 1800)
        dvc["build_other_variants"] = {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb, "stages": by_stage(run.timings)}
        noop("noop_published", list(PUBLISHED))

    dvc["export_changes"] = []
    for change in args.export_change or EXPORT_CHANGES:
        # One change at a time, each from the original params: only that setting differs from what was built.
        key, _, raw = change.partition("=")
        write_params(root, sources, manifest, [VARIANT] if args.quick else list(PUBLISHED), {key: yaml.safe_load(raw)})
        command = ["repro", f"export@{VARIANT}"]
        status = dvc_status(root, env, f"export@{VARIANT}")
        run = dvc_run(runner, f"dvc repro (export setting changed: {change})", command, root, 600)
        dvc["export_changes"].append({"change": change, "command": "dvc " + shlex.join(command), "wall_s": run.wall_s,
                                      "peak_rss_mb": run.peak_rss_mb, "stages_run": stages_ran(run), "stages": by_stage(run.timings),
                                      "dvc_status_before": status})
        if stages_ran(run) != [f"export@{VARIANT}"]:
            print(f"  note: changing only {change} reran {stages_ran(run)}; `dvc status` before said:\n{status}")
    results["dvc_yaml"] = str(args.dvc_yaml or REPO / "dvc.yaml")
    results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = evaluate(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.json", help="the JSON file for every figure")
    parser.add_argument("--keep", type=Path, help="work in this (new or empty) folder and keep it: sources, project copy, logs")
    parser.add_argument("--quick", action="store_true", help="measure the no-op repro for clipseg-rd64 only (skips building rd16 and refined)")
    parser.add_argument("--noop-runs", type=int, default=3, help="no-op `dvc repro` runs to take the median of (default 3)")
    parser.add_argument("--export-change", action="append", help="an export-only params change, KEY=YAML_VALUE; repeat for several "
                        f"(default: {' and '.join(EXPORT_CHANGES)})")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of baseline, floor, stages and cold repro; the fastest of each counts (default 3)")
    parser.add_argument("--dvc-yaml", type=Path, help="benchmark this dvc.yaml instead of the repository's (a pipeline change not yet landed)")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every subprocess timeout (for a slow machine)")
    parser.add_argument("--warm-gb", type=float, default=WARM_GB, help="memory a short-lived process touches and frees before "
                        f"every timed run, so each finds recently used memory (default {WARM_GB:g}; 0: none)")
    parser.add_argument("--docs", action="store_true", help=f"write the figures into {DOCS.relative_to(HERE.parent)}")
    args = parser.parse_args(argv)
    if any("=" not in change for change in args.export_change or ()):
        parser.error("--export-change must be KEY=VALUE")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.keep:
        if args.keep.exists() and any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep}: the folder is not empty")
        args.keep.mkdir(parents=True, exist_ok=True)
        work = args.keep.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="clipseg-bench-"))
    needed = NEEDED_GB["quick" if args.quick else "full"]
    free = shutil.disk_usage(work).free / 1e9
    if free < needed:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        print(f"benchmark: {work} has {free:.1f} GB free, the run needs about {needed} GB; use --keep DIR on a larger disk", file=sys.stderr)
        return 1
    started = time.perf_counter()
    results: dict = {}
    try:
        benchmark(work, args, results)
    except Exception as exc:  # noqa: BLE001 -- whatever failed, report it, keep what was measured, clean up
        if not isinstance(exc, BenchError):
            import traceback

            traceback.print_exc()
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        results["error"] = str(exc)
        results["runs"] = [asdict(r) for r in results.get("runs", [])]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"what was measured before the failure: {args.out}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["benchmark_s"] = time.perf_counter() - started
    results["runs"] = [asdict(r) for r in results["runs"]]
    report(results)
    print(f"\nbenchmark took {results['benchmark_s']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"figures written to {args.out}")
    if args.docs:
        write_docs(results)
        print(f"table written to {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
