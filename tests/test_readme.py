"""README.md is for users: short, and every command it shows works as written on a fresh clone with the default
params.yaml (the commands that need network or a Hub login are checked as far as they go offline)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline_fixture import tiny_pipeline  # noqa: F401  (a pytest fixture)

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[list[str]]:
    """Every shell command the README shows, split into words (comments and `&&` chains taken apart)."""
    found = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            found += [shlex.split(part) for part in line.split("&&") if part.strip()]
    return found


def test_the_readme_is_short():
    assert len(README.splitlines()) <= 200


def test_it_cites_nothing_outside_the_repository():
    assert "shared/" not in README and not re.search(r"[Ii]ssue #?\d", README)
    for link in re.findall(r"\]\(((?!https?://)[^)#]+)", README):
        assert (REPO / link).exists(), link


def test_every_dvc_repro_target_exists_with_the_default_params():
    stages = {f"{name}@{variant}" for name in STAGES for variant in PARAMS["variants"]}
    targets = [words[2] for words in commands() if words[:2] == ["dvc", "repro"] and len(words) > 2
               and not words[2].startswith("-")]
    assert targets and all(target in stages for target in targets), targets


def test_every_variant_the_readme_builds_is_in_params():
    variants = set(re.findall(r"variants[=:] ?\[([^\]]+)\]", README))
    assert variants and all(name.strip() in PARAMS["models"] for group in variants for name in group.split(","))


@pytest.mark.parametrize("module", sorted({words[2] for words in commands() if words[:2] == ["python", "-m"]}))
def test_every_python_command_runs_and_help_writes_nothing(module, tmp_path):
    if module == "pytest":
        return
    before = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ")
    assert subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout == before


def test_the_segment_command_runs_as_written(tiny_pipeline, tmp_path):  # noqa: F811
    (line,) = [words for words in commands() if words[:3] == ["python", "-m", "tools.segment"]]
    # As written, in a folder laid out like the repository after `dvc repro`.
    done = subprocess.run([sys.executable, *line[1:]], cwd=tiny_pipeline.root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, timeout=300)
    try:
        assert done.returncode == 0, done.stderr
        assert (tiny_pipeline.root / "masks" / "contact-sheet.png").is_file()
    finally:
        shutil.rmtree(tiny_pipeline.root / "masks", ignore_errors=True)  # the shared run's folder stays as it was


def test_the_python_snippet_runs_as_written(tiny_pipeline):  # noqa: F811
    (snippet,) = [block for block in code_blocks("python") if "CLIPSegForImageSegmentation" in block]
    done = subprocess.run([sys.executable, "-c", snippet + "\nprint(type(model).__name__, type(processor).__name__)"],
                          cwd=tiny_pipeline.root, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["CLIPSegForImageSegmentation", "CLIPSegProcessor"]


# --- "Convert your own checkpoint": its commands, as written ----------------------------------------

OWN_SECTION = "## Convert your own checkpoint"
# The published tokenizer files and image, the command's defaults, cannot be fetched offline: the tests' stand-in for
# the installed `clipseg-variant` runs tools.variant with those defaults pointed at local synthetic copies, and the
# section's $CLIP, $DECODER and $OTHER_DECODER are set to synthetic checkpoints. The commands run as written.
STAND_IN = (
    "clipseg-variant() { python -c 'import sys; from tools import variant; variant.PUBLISHED_SIDE_SOURCES.update("
    'vocab="files/vocab.json", merges="files/merges.txt", image="files/image.jpg"); '
    "sys.exit(variant.main(sys.argv[1:]))' \"$@\"; }\nset -e\n"
)


def own_checkpoint_block() -> str:
    section = README.split(OWN_SECTION, 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return block


def write_own_checkpoints(root: Path) -> dict[str, str]:
    """Two fine-tuned decoders sharing one plain CLIP state dict, the side files, in `root`/files: the section's
    variables (CLIP is a path here; the slow test serves it over HTTP)."""
    from tests.test_variant import arch
    from tools import synthetic

    a = arch(patch=16, reduce_dim=16)
    files = root / "files"
    synthetic.write_state_dict(synthetic.plain_clip_state_dict(a, 0), files / "clip.pth")
    synthetic.write_state_dict(synthetic.decoder_state_dict(a, 1), files / "rd16-mine.pth")
    synthetic.write_state_dict(synthetic.decoder_state_dict(a, 2), files / "rd16-other.pth")
    synthetic.write_tokenizer_files(files)
    synthetic.write_image(files / "image.jpg")
    return {"CLIP": "files/clip.pth", "DECODER": "files/rd16-mine.pth", "OTHER_DECODER": "files/rd16-other.pth"}


def test_the_own_checkpoint_section_adds_its_variants_as_written(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    variables = write_own_checkpoints(tmp_path)
    adds = "\n".join(line for line in own_checkpoint_block().splitlines() if line.startswith("clipseg-variant "))
    done = subprocess.run(["bash", "-c", STAND_IN + adds], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **variables, "PYTHONPATH": str(REPO),
                               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])})
    assert done.returncode == 0, done.stderr
    added = yaml.safe_load((tmp_path / "params.yaml").read_text(encoding="utf-8"))
    assert added["variants"] == [*PARAMS["variants"], "my-decoder", "my-other-decoder"]
    first, second = (added["models"][name] for name in ("my-decoder", "my-other-decoder"))
    assert first["sources"]["clip"] == second["sources"]["clip"] and first["sources"]["decoder"] != second["sources"]["decoder"]
    assert first["architecture"]["reduce_dim"] == 16 and first["assumed"] == second["assumed"] != []
    assert done.stdout.count("Build it:  dvc repro") == 2
