"""publish: an export folder -> a model repository on the Hugging Face Hub, uploaded in one commit.

    python -m tools.publish --variant clipseg-rd64 --repo-id ORG/NAME [--private] [--create-pr] [--dry-run]

Not a DVC stage: it changes the world outside the repository, so it runs only when asked. The folder (default
outputs/<variant>/hf, or --folder) is first re-checked against its manifest.json: every file listed with its size and
sha256, nothing unlisted, model.safetensors and config.json present; anything else is refused. --dry-run stops there
and prints what would be uploaded, with no network and no token. The token is the usual Hugging Face login
(`hf auth login`, or the HF_TOKEN environment variable); it is never read from params.yaml nor printed.
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from clipseg_pipeline.errors import PipelineError
from clipseg_pipeline.runner import exit_now, run_stage
from clipseg_pipeline.hf_layout import WEIGHTS_FILE
from clipseg_pipeline.tensor_io import sha256_file

STAGE = "publish"
MANIFEST = "manifest.json"
# A folder without these is no model, whatever its manifest says.
REQUIRED_FILES = (WEIGHTS_FILE, "config.json")
REPO = Path(__file__).resolve().parents[1]


class PublishError(PipelineError):
    """The folder cannot be published as it is, or the Hub refused it."""


@dataclass(frozen=True)
class FileEntry:
    name: str
    bytes: int
    sha256: str


def default_folder(variant: str) -> Path:
    return Path("outputs") / variant / "hf"


def read_manifest(folder: Path) -> tuple[list[FileEntry], bool]:
    """The files the manifest lists, and whether it says the weights are synthetic."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files, synthetic = manifest["files"], manifest["synthetic"]
        if not isinstance(synthetic, bool):
            raise TypeError(f"synthetic is {synthetic!r}, not true or false")
        return [FileEntry(name, int(f["bytes"]), str(f["sha256"])) for name, f in sorted(files.items())], synthetic
    except FileNotFoundError as exc:
        raise PublishError(f"{path}: no manifest; this is not an export folder, run the export stage to make one") from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PublishError(f"{path}: not a readable export manifest ({exc!r}); export the folder again") from exc


def check_folder(folder: Path, allow_synthetic: bool = False) -> list[FileEntry]:
    """The files to upload (the manifest's entries, then manifest.json itself), once the folder matches its manifest
    and, when its weights are synthetic, only if that was allowed."""
    if not folder.is_dir():
        raise PublishError(f"{folder}: no such export folder; run `dvc repro` to export the variant, or pass --folder")
    listed, synthetic = read_manifest(folder)
    if synthetic and not allow_synthetic:
        raise PublishError(
            f"{folder} holds a synthetic model (made by this project's generator to test the conversion, not CLIPSeg's "
            "weights: it segments no real images). Publish a converted published variant, or pass --allow-synthetic "
            "if you mean to upload this one (to try publishing, say)"
        )
    names = {entry.name for entry in listed}
    missing_required = [name for name in REQUIRED_FILES if name not in names or not (folder / name).is_file()]
    if missing_required:
        raise PublishError(f"{folder}: lacks {missing_required}; a model repository needs them. Export the folder again")
    present = {p.name for p in folder.iterdir()} - {MANIFEST}
    unlisted = sorted(present - names)
    absent = sorted(names - present)
    changed = sorted(
        entry.name
        for entry in listed
        if entry.name in present
        and not (
            (folder / entry.name).is_file()
            and (folder / entry.name).stat().st_size == entry.bytes
            and sha256_file(folder / entry.name) == entry.sha256
        )
    )
    if unlisted or absent or changed:
        raise PublishError(
            f"{folder} does not match its {MANIFEST}: unlisted {unlisted}, missing {absent}, changed {changed}. "
            "Refusing to publish; export the folder again (or remove what does not belong there)"
        )
    manifest = folder / MANIFEST
    return [*listed, FileEntry(MANIFEST, manifest.stat().st_size, sha256_file(manifest))]


def plan(repo_id: str, folder: Path, entries: list[FileEntry], private: bool, create_pr: bool, dry_run: bool) -> str:
    """What the upload does, one line per file."""
    width = max(len(e.name) for e in entries)
    where = f"https://huggingface.co/{repo_id} ({'private' if private else 'public'} if created now"
    where += ", as a pull request)" if create_pr else ")"
    lines = [f"{'would upload' if dry_run else 'uploading'} {len(entries)} files, {sum(e.bytes for e in entries):,} bytes, from {folder} to {where} in one commit:"]
    lines += [f"  {e.name:<{width}}  {e.bytes:>12,}  sha256 {e.sha256}" for e in entries]
    return "\n".join(lines)


def git_revision(repo: Path = REPO) -> str | None:
    """This checkout's commit (with a mark when it has uncommitted changes), or None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + (" with uncommitted changes" if status.stdout.strip() else "")


def commit_text(folder: Path, entries: list[FileEntry], revision: str | None) -> tuple[str, str]:
    """The Hub commit's message and description: what was uploaded, and which project checkout uploaded it.

    The git commit goes here rather than into the model card: the export must be byte-identical in every clone, and
    the commit that records an export cannot name itself.
    """
    from clipseg_pipeline.model_card import PROJECT, project_version

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    weights = next(e for e in entries if e.name == WEIGHTS_FILE)
    message = f"Upload CLIPSeg ({config.get('dtype', 'float32')}) exported by {PROJECT} {project_version()}"
    description = "\n".join([
        f"Published from {PROJECT} {project_version()}" + (f", git {revision}" if revision else "") + ".",
        f"{WEIGHTS_FILE} sha256 {weights.sha256}; every file's size and sha256 is in {MANIFEST}.",
    ])
    return message, description


def upload(api, repo_id: str, folder: Path, entries: list[FileEntry], *, private: bool, create_pr: bool, message: str, description: str):
    """Create the repository if needed and upload exactly the checked files in one commit; returns the CommitInfo."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=folder,
            # Only the files just checked: one appearing in the folder since then is not sent.
            allow_patterns=[glob.escape(e.name) for e in entries],
            commit_message=message,
            commit_description=description,
            create_pr=create_pr,
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        hint = {
            401: "log in with `hf auth login` or set HF_TOKEN to a token with write access",
            403: f"your token may not write to {repo_id}: check the organisation and the token's permissions",
        }.get(status, "check the repository id and your connection, then run again")
        raise PublishError(f"the Hub refused the upload to {repo_id} ({exc}); {hint}") from exc
    except (OSError, ValueError) as exc:
        raise PublishError(f"uploading {folder} to {repo_id} failed ({exc}); check your connection and run again") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.publish", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", help="the variant whose export to publish (folder outputs/<variant>/hf)")
    parser.add_argument("--folder", type=Path, help="an export folder to publish instead of the variant's")
    parser.add_argument("--repo-id", required=True, help="the Hub repository, ORG/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps its visibility)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    parser.add_argument("--dry-run", action="store_true", help="check the folder and print what would be uploaded; no network")
    parser.add_argument("--allow-synthetic", action="store_true",
                        help="publish a synthetic model (such as clipseg-tiny) too; refused without this")
    args = parser.parse_args(argv)
    if not args.variant and not args.folder:
        parser.error("pass --variant (to publish outputs/<variant>/hf) or --folder")

    def body() -> None:
        from huggingface_hub import HfApi, get_token
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(args.repo_id)
        except HFValidationError as exc:
            raise PublishError(f"--repo-id {args.repo_id!r} is not a Hub repository id ({exc}); write ORG/NAME") from exc
        folder = args.folder or default_folder(args.variant)
        entries = check_folder(folder, args.allow_synthetic)
        print(plan(args.repo_id, folder, entries, args.private, args.create_pr, args.dry_run))
        if args.dry_run:
            return
        if get_token() is None:
            raise PublishError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN, then run again")
        message, description = commit_text(folder, entries, git_revision())
        info = upload(HfApi(), args.repo_id, folder, entries, private=args.private, create_pr=args.create_pr, message=message, description=description)
        print(f"published: {info.pr_url or info.commit_url}")

    return run_stage(STAGE, args.variant or str(args.folder), body)


if __name__ == "__main__":
    exit_now(main())
