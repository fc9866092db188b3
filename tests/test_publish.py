"""Tests for stages/publish.py: the folder is checked against its manifest, --dry-run lists exactly its files without
network, and a real run makes exactly the Hub calls expected (HfApi patched: no network here either)."""

from __future__ import annotations

import hashlib
import json
import re

import huggingface_hub
import pytest
from huggingface_hub import CommitInfo, HfApi

from tools import publish
from tests.pipeline_fixture import VARIANT, copy_export, tiny_pipeline  # noqa: F401

FAKE_TOKEN = "hf_fake_token_for_tests_0123456789"


@pytest.fixture()
def folder(tiny_pipeline, tmp_path):  # noqa: F811
    """A private copy of the export, which a test may damage, standing for a converted published variant: its manifest
    does not say synthetic (the tiny export's does)."""
    copied = copy_export(tiny_pipeline, tmp_path / "hf")
    manifest = json.loads((copied / "manifest.json").read_text(encoding="utf-8"))
    (copied / "manifest.json").write_text(json.dumps({**manifest, "synthetic": False}), encoding="utf-8")
    return copied


def test_a_synthetic_export_is_published_only_when_allowed(tiny_pipeline, tmp_path, no_network, capsys):  # noqa: F811
    synthetic = copy_export(tiny_pipeline, tmp_path / "hf")
    assert json.loads((synthetic / "manifest.json").read_text(encoding="utf-8"))["synthetic"] is True
    assert publish.main(["--folder", str(synthetic), "--repo-id", "org/name", "--dry-run"]) == 1
    assert "holds a synthetic model" in capsys.readouterr().err
    assert publish.main(["--folder", str(synthetic), "--repo-id", "org/name", "--dry-run", "--allow-synthetic"]) == 0
    assert capsys.readouterr().out.startswith("would upload")


def test_a_same_size_change_to_the_weights_is_refused(folder, no_network, capsys):
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight: the size is unchanged, only the sha256 tells
    weights.unlink()  # a hard link to the pipeline's file: replace it, never edit it in place
    weights.write_bytes(bytes(data))
    assert publish.main(["--folder", str(folder), "--repo-id", "org/name", "--dry-run"]) == 1
    assert re.search(r"does not match its manifest.json: .*changed \['model.safetensors'\]", capsys.readouterr().err)


def test_a_same_size_change_to_any_other_exported_file_is_refused(folder, no_network, capsys):
    # Every file the manifest lists is held to its sha256, not only the weights: one byte changed in place, the size
    # kept, in each file in turn.
    names = sorted(json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["files"])
    assert "config.json" in names and "README.md" in names
    for name in (n for n in names if n != "model.safetensors"):
        original = (folder / name).read_bytes()
        changed = bytearray(original)
        changed[len(changed) // 2] ^= 0x20  # a letter's case, or a digit or a space made another character
        (folder / name).unlink()
        (folder / name).write_bytes(bytes(changed))
        assert publish.main(["--folder", str(folder), "--repo-id", "org/name", "--dry-run"]) == 1, name
        assert f"changed [{name!r}]" in capsys.readouterr().err, name
        (folder / name).unlink()
        (folder / name).write_bytes(original)
    assert publish.main(["--folder", str(folder), "--repo-id", "org/name", "--dry-run"]) == 0


@pytest.fixture()
def no_network(monkeypatch):
    """Any Hub call fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("no Hub call expected")

    for name in ("create_repo", "upload_folder", "create_commit", "whoami"):
        monkeypatch.setattr(HfApi, name, refuse)


@pytest.fixture()
def recorded_calls(monkeypatch):
    """HfApi.create_repo and upload_folder replaced by recorders; a token in the environment."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", (repo_id,), kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", (), kwargs))
        pr = "https://huggingface.co/org/name/discussions/1" if kwargs.get("create_pr") else None
        return CommitInfo(commit_url="https://huggingface.co/org/name/commit/abc", commit_message=kwargs["commit_message"],
                          commit_description="", oid="abc", pr_url=pr)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    return calls


def listed(stdout: str) -> dict[str, tuple[int, str]]:
    rows = re.findall(r"^  (\S+)\s+([\d,]+)  sha256 ([0-9a-f]{64})$", stdout, flags=re.M)
    return {name: (int(size.replace(",", "")), sha) for name, size, sha in rows}


def test_dry_run_lists_exactly_the_exports_files(folder, no_network, capsys):
    assert publish.main(["--folder", str(folder), "--repo-id", "org/name", "--dry-run"]) == 0
    out = capsys.readouterr().out
    files = listed(out)
    assert set(files) == {p.name for p in folder.iterdir()}
    for name, (size, sha) in files.items():  # hashed here with hashlib itself, not the helper publish uses
        data = (folder / name).read_bytes()
        assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest()), name
    assert out.startswith(f"would upload {len(files)} files") and "https://huggingface.co/org/name" in out


def test_dry_run_finds_the_variants_folder_by_default(folder, no_network, monkeypatch, tmp_path, capsys):
    (tmp_path / "outputs" / VARIANT).mkdir(parents=True)
    folder.rename(tmp_path / "outputs" / VARIANT / "hf")
    monkeypatch.chdir(tmp_path)
    assert publish.main(["--variant", VARIANT, "--repo-id", "org/name", "--dry-run"]) == 0
    assert f"from outputs/{VARIANT}/hf to" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "config.json").write_text("{}", encoding="utf-8"), r"does not match its manifest.json: unlisted \[\], missing \[\], changed \['config.json'\]\. Refusing to "
                                                                             r"publish; export the folder again \(or remove what does not belong there\)$"),
        (lambda f: (f / "notes.txt").write_text("x", encoding="utf-8"), r"unlisted \['notes.txt'\]"),
        (lambda f: (f / "vocab.json").unlink(), r"missing \['vocab.json'\]"),
        (lambda f: (f / "manifest.json").unlink(), r"manifest.json: no manifest; this is not an export folder"),
        (lambda f: (f / "manifest.json").write_text("[]", encoding="utf-8"), r"manifest.json: not a readable export manifest"),
    ],
)
def test_a_folder_that_does_not_match_its_manifest_is_refused(folder, no_network, capsys, damage, message):
    damage(folder)
    assert publish.main(["--folder", str(folder), "--repo-id", "org/name", "--dry-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(message, err), err


def test_a_folder_without_weights_is_refused_even_if_its_manifest_agrees(folder, no_network):
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    del manifest["files"]["model.safetensors"]
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (folder / "model.safetensors").unlink()
    with pytest.raises(publish.PublishError, match=r"lacks \['model.safetensors'\]; a model repository needs them"):
        publish.check_folder(folder)


def test_missing_folder_and_bad_repo_id_are_clear_errors(tmp_path, no_network, capsys):
    assert publish.main(["--folder", str(tmp_path / "absent"), "--repo-id", "org/name", "--dry-run"]) == 1
    assert "absent: no such export folder; run `dvc repro`" in capsys.readouterr().err
    assert publish.main(["--folder", str(tmp_path), "--repo-id", "not a/repo/id", "--dry-run"]) == 1
    assert "--repo-id 'not a/repo/id' is not a Hub repository id" in capsys.readouterr().err


def test_publish_creates_the_repo_and_uploads_the_checked_files_in_one_commit(folder, recorded_calls, capsys):
    assert publish.main(["--folder", str(folder), "--repo-id", "org/name", "--private", "--create-pr"]) == 0
    assert [call[0] for call in recorded_calls] == ["create_repo", "upload_folder"]
    _, args, kwargs = recorded_calls[0]
    assert args == ("org/name",) and kwargs == {"repo_type": "model", "private": True, "exist_ok": True}
    _, _, kwargs = recorded_calls[1]
    assert kwargs.pop("commit_message").startswith("Upload CLIPSeg (float32) exported by clipseg-pipeline ")
    description = kwargs.pop("commit_description")
    model_sha = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["files"]["model.safetensors"]["sha256"]
    assert model_sha in description
    assert sorted(kwargs.pop("allow_patterns")) == sorted(p.name for p in folder.iterdir())
    assert kwargs == {"repo_id": "org/name", "repo_type": "model", "folder_path": folder, "create_pr": True}
    captured = capsys.readouterr()
    assert "published: https://huggingface.co/org/name/discussions/1" in captured.out
    assert FAKE_TOKEN not in captured.out + captured.err


def test_publish_defaults_to_a_public_commit_on_main(folder, recorded_calls, capsys):
    assert publish.main(["--folder", str(folder), "--repo-id", "org/name"]) == 0
    assert recorded_calls[0][2]["private"] is False and recorded_calls[1][2]["create_pr"] is False
    assert "published: https://huggingface.co/org/name/commit/abc" in capsys.readouterr().out


def test_publish_without_a_token_stops_before_any_call(folder, no_network, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert publish.main(["--folder", str(folder), "--repo-id", "org/name"]) == 1
    assert "no Hugging Face token: log in with `hf auth login` or set HF_TOKEN" in capsys.readouterr().err


def test_a_refused_upload_says_how_to_fix_it(folder, recorded_calls, monkeypatch, capsys):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    def unauthorized(self, repo_id, **kwargs):
        response = httpx2.Response(401, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
        raise HfHubHTTPError("401 Unauthorized", response=response)

    monkeypatch.setattr(HfApi, "create_repo", unauthorized)
    assert publish.main(["--folder", str(folder), "--repo-id", "org/name"]) == 1
    err = capsys.readouterr().err
    assert "the Hub refused the upload to org/name" in err and "hf auth login" in err and FAKE_TOKEN not in err


def git(repo, *args: str) -> None:
    import subprocess

    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", *identity, "-C", str(repo), *args], check=True, capture_output=True)


def test_the_commit_names_the_project_checkout_not_the_export(folder, tmp_path, monkeypatch):
    # The export itself never holds the git commit (it must be identical in every clone); the Hub commit does. Held to
    # a checkout made here, its commit read from the repository's own files rather than asked of git.
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # tmp_path itself is in no checkout
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    git(checkout, "init", "-q", "-b", "main")
    (checkout / "tracked.txt").write_text("one\n", encoding="utf-8")
    git(checkout, "add", "tracked.txt")
    git(checkout, "commit", "-q", "-m", "one")
    head = (checkout / ".git" / "refs" / "heads" / "main").read_text(encoding="utf-8").strip()
    assert re.fullmatch(r"[0-9a-f]{40}", head)
    assert publish.git_revision(checkout) == head
    (checkout / "untracked.txt").write_text("not part of the checkout\n", encoding="utf-8")
    assert publish.git_revision(checkout) == head
    (checkout / "tracked.txt").write_text("two\n", encoding="utf-8")
    assert publish.git_revision(checkout) == f"{head} with uncommitted changes"
    assert publish.git_revision(tmp_path) is None
    from clipseg_pipeline.model_card import PROJECT, project_version

    entries = publish.check_folder(folder)
    published_from = f"Published from {PROJECT} {project_version()}"
    with_revision = publish.commit_text(folder, entries, publish.git_revision(checkout))[1]
    assert with_revision.splitlines()[0] == f"{published_from}, git {head} with uncommitted changes."
    assert publish.commit_text(folder, entries, None)[1].splitlines()[0] == f"{published_from}."


def test_a_listed_required_file_missing_on_disk_is_named_as_required(folder, no_network):
    # The manifest still lists the weights; the file is gone: refused for lacking what a model repository needs.
    (folder / "model.safetensors").unlink()
    with pytest.raises(publish.PublishError, match=r": lacks \['model.safetensors'\]; a model repository needs them"):
        publish.check_folder(folder)


def test_a_synthetic_export_is_refused_by_default_and_the_manifest_flag_must_be_a_boolean(tiny_pipeline, tmp_path):  # noqa: F811
    synthetic = copy_export(tiny_pipeline, tmp_path / "hf")
    with pytest.raises(publish.PublishError, match=r"holds a synthetic model .* or pass --allow-synthetic if you mean to "
                                                    r"upload this one \(to try publishing, say\)$"):
        publish.check_folder(synthetic)
    manifest = json.loads((synthetic / "manifest.json").read_text(encoding="utf-8"))
    (synthetic / "manifest.json").write_text(json.dumps({**manifest, "synthetic": "yes"}), encoding="utf-8")
    with pytest.raises(publish.PublishError, match=r"not a readable export manifest \(TypeError\(\"synthetic is 'yes', "
                                                    r"not true or false\"\)\); export the folder again"):
        publish.check_folder(synthetic, allow_synthetic=True)
