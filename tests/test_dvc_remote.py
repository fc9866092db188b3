"""Reproducible runs and shared artifacts: the same bytes from every cold run, and every output shared
through a DVC remote, a local folder or an S3 API server on 127.0.0.1, so that a fresh clone pulls instead of rebuilding.

The first cold run is the session's reproduced template (see tests/dvc_project.py); this module adds one more cold
run (about a minute) and three round trips through a remote (`dvc pull` from a folder and from S3, `dvc repro --pull`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import yaml

from tests.dvc_project import LOCALHOST, VARIANT, Project, clone, reproduced_template, stage_names

pytestmark = pytest.mark.slow

BUCKET = "clipseg-artifacts"
UP_TO_DATE = "Data and pipelines are up to date."


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    settings: dict[str, str] = field(default_factory=dict)  # `dvc remote modify NAME KEY VALUE`


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Project:
    return reproduced_template(tmp_path_factory)


def s3_client(endpoint: str):
    """A boto3 S3 client for the test server, built with proxies ignored for 127.0.0.1."""
    import boto3

    with pytest.MonkeyPatch.context() as env:
        env.setenv("NO_PROXY", f"{LOCALHOST},localhost")
        env.setenv("no_proxy", f"{LOCALHOST},localhost")
        return boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
        )


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 API server on a free port of 127.0.0.1, with an empty bucket; stopped after the module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=LOCALHOST, port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


def writers(project: Project, paths: list[str]) -> dict[str, str]:
    """The stage that dvc.lock says writes each path (a file or a file inside an output directory)."""
    lock = yaml.safe_load((project.root / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    outs = {out["path"]: stage for stage, entry in lock.items() for out in entry.get("outs", [])}
    return {
        path: next((stage for out, stage in outs.items() if path == out or path.startswith(out + "/")), "(not an output)")
        for path in paths
    }


def assert_same_bytes(template: Project, second: Project) -> None:
    first_files, second_files = template.digests(), second.digests()
    differing = sorted(p for p in first_files.keys() | second_files.keys() if first_files.get(p) != second_files.get(p))
    assert not differing, f"two cold runs wrote different bytes to {differing}, written by {writers(template, differing)}"
    # What CI checks: the committed lock file and reports are reproduced exactly.
    second.git("diff", "--exit-code", "HEAD", "--", "dvc.lock", "metrics/", "reports/")  # HEAD: autostage stages dvc.lock


def test_two_cold_runs_in_two_clones_write_the_same_bytes(template, tmp_path):
    second = clone(template, tmp_path / "second")
    result = second.repro()
    assert result.ran == stage_names(VARIANT), result.output
    assert_same_bytes(template, second)


def test_another_thread_count_writes_the_same_bytes(template, tmp_path):
    import torch

    # Another number of threads than torch's default (one per core), as a machine with another number of cores has:
    # the stages that run forward passes fix their own thread count (params verify.threads), so the bytes hold.
    threads = "1" if torch.get_num_threads() > 1 else "2"
    second = clone(template, tmp_path / "second")
    result = second.repro(env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    assert result.ran == stage_names(VARIANT), result.output
    assert_same_bytes(template, second)


def pushed(template: Project, root, remote: Remote) -> Project:
    """A clone of the template with `remote` committed as its default remote and every cached output pushed there."""
    pusher = clone(template, root, with_cache=True)
    pusher.dvc("remote", "add", "-d", remote.name, remote.url)
    for key, value in remote.settings.items():
        pusher.dvc("remote", "modify", remote.name, key, value)
    pusher.commit(f"share artifacts through {remote.url}")
    pusher.dvc("push")
    return pusher


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_fresh_clone_pulls_every_output_and_has_nothing_to_run(kind, template, tmp_path, request):
    if kind == "local":
        remote = Remote("shared", str(tmp_path / "remote-storage"))
    else:
        remote = Remote("s3remote", f"s3://{BUCKET}/clipseg-pipeline", {"endpointurl": request.getfixturevalue("s3_endpoint")})
    pusher = pushed(template, tmp_path / "pusher", remote)
    if kind == "s3":
        listed = s3_client(remote.settings["endpointurl"]).list_objects_v2(Bucket=BUCKET, Prefix="clipseg-pipeline/")
        assert listed["KeyCount"] > 0

    fresh = clone(pusher, tmp_path / "fresh")
    assert not (fresh.root / "outputs" / VARIANT / "hf").exists()
    fresh.dvc("pull")

    assert fresh.digests() == template.digests()
    assert UP_TO_DATE in fresh.dvc("status")
    assert "in sync" in fresh.dvc("status", "--cloud")
    result = fresh.repro()
    assert result.ran == [] and result.restored == [], result.output
    assert sorted(result.skipped) == sorted(stage_names(VARIANT))


def test_repro_pull_fetches_what_it_does_not_rerun(template, tmp_path):
    pusher = pushed(template, tmp_path / "pusher", Remote("shared", str(tmp_path / "remote-storage")))
    fresh = clone(pusher, tmp_path / "fresh")
    result = fresh.repro("--pull")
    assert result.ran == [] and result.restored == [], result.output
    assert fresh.digests() == template.digests()
