"""End to end: `dvc repro` of two variants in a temporary copy of the project, one of them downloaded over HTTP.

`clipseg-served` is the tiny architecture with its sources served, in the published formats (CLIP TorchScript
archive, decoder weights zip with a member, tokenizer files, JPEG), by a local HTTP server on 127.0.0.1. The tests
check that the exported folder loads with `from_pretrained` and computes what the original computes (the reference
outputs verify-outputs stored), and that DVC reruns exactly the stages a change concerns: nothing when nothing changed,
only `verify-outputs` (and export, whose model card quotes its report) for a verify setting, only the changed variant's
stages for one variant's setting.

The copy's DVC cache links outputs as hardlinks (`cache.type: hardlink,copy`, set locally, as the README recommends
for large artifacts): the reruns then also prove that no stage writes into an existing file in place, which would
corrupt the cached object it shares.

One `dvc repro` sequence is shared by the whole module (each step a module-scoped fixture, run once, in order);
the module takes about three minutes on 2 cores.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.dvc_project import VARIANT, Project, Repro, clone, reproduced_template, stage_names
from tests.http_server import LocalServer, serve

pytestmark = pytest.mark.slow

SERVED = "clipseg-served"
VARIANTS = (VARIANT, SERVED)
SYNTHETIC = Path("data/synthetic") / VARIANT
# Source name -> (file served from the committed synthetic sources, zip member).
SERVED_FILES = {
    "clip": ("clip.pt", None),
    "decoder": ("weights.zip", "tiny-uni.pth"),
    "vocab": ("vocab.json", None),
    "merges": ("merges.txt", None),
    "image": ("image.jpg", None),
}
SERVED_PROMPTS = ["a cat on a sofa", "a remote"]


@dataclass
class Pipeline:
    project: Project
    server: LocalServer


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Pipeline:
    """The reproduced template (clipseg-tiny built) plus `clipseg-served`, whose sources come from a local server."""
    project = clone(reproduced_template(tmp_path_factory), tmp_path_factory.mktemp("e2e") / "repo", with_cache=True)
    project.dvc("config", "--local", "cache.type", "hardlink,copy")
    files = {f"/{name}": (project.root / SYNTHETIC / name).read_bytes() for name, _ in SERVED_FILES.values()}
    with serve(files) as server:

        def add_served_variant(params: dict) -> None:
            served = copy.deepcopy(params["models"][VARIANT])
            served["sources"] = {
                source: {"url": server.url(f"/{name}"), "sha256": hashlib.sha256(files[f"/{name}"]).hexdigest()}
                | ({"member": member} if member else {})
                for source, (name, member) in SERVED_FILES.items()
            }
            served["verify"]["prompts"] = SERVED_PROMPTS
            params["models"][SERVED] = served
            params["variants"] = list(VARIANTS)

        project.edit_params(add_served_variant)
        yield Pipeline(project, server)


@pytest.fixture(scope="module")
def first_repro(pipeline) -> Repro:
    return pipeline.project.repro()


@pytest.fixture(scope="module")
def second_repro(pipeline, first_repro) -> Repro:
    return pipeline.project.repro()


@pytest.fixture(scope="module")
def verify_setting_repro(pipeline, second_repro) -> Repro:
    pipeline.project.edit_params(lambda p: p["verify"].update(rtol=2 * p["verify"]["rtol"]))
    return pipeline.project.repro()


@pytest.fixture(scope="module")
def one_variant_repro(pipeline, verify_setting_repro) -> Repro:
    pipeline.project.edit_params(lambda p: p["models"][SERVED]["verify"].update(prompts=["a remote", "a blanket", "a dog"]))
    return pipeline.project.repro()


def test_served_variant_runs_every_stage_and_fetches_over_http(pipeline, first_repro):
    assert first_repro.ran == stage_names(SERVED), first_repro.output
    assert sorted(first_repro.skipped) == sorted(stage_names(VARIANT)), first_repro.output
    # Every source came over HTTP (a fresh clone has no download cache), checked against its sha256 pin.
    fetched = {seen.path for seen in pipeline.server.requests}
    assert fetched == {f"/{name}" for name, _ in SERVED_FILES.values()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_folder_loads_and_computes_what_the_original_computes(pipeline, first_repro, variant):
    # Held to the reference outputs verify-outputs stored: the original model's, computed by the plain-torch reference
    # on the original tensors, which shares no code with transformers. (A float32 export's weights are the built
    # model's file itself, hard-linked: held to the built model, it would be compared with itself.)
    from PIL import Image
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    from clipseg_pipeline.recording import OUTPUTS
    from clipseg_pipeline.tensor_io import TensorFile

    root = pipeline.project.root
    exported_dir = root / "outputs" / variant / "hf"
    reference = TensorFile(root / "outputs" / variant / "verify" / "reference.safetensors")
    processor = CLIPSegProcessor.from_pretrained(exported_dir)
    exported = CLIPSegForImageSegmentation.from_pretrained(exported_dir).eval()
    params = pipeline.project.params()
    prompts = params["models"][variant]["verify"]["prompts"]
    with Image.open(root / "data" / variant / "image") as image:
        inputs = processor(text=prompts, images=[image.convert("RGB")] * len(prompts), padding=True, return_tensors="pt")
    # The folder's processor prepares what the reference was given.
    assert torch.equal(inputs["pixel_values"], reference["pixel_values"].expand(len(prompts), -1, -1, -1))
    assert torch.equal(inputs["input_ids"], reference["input_ids"])
    with torch.inference_mode():
        got = exported(**inputs)
    assert got.logits.shape == (len(prompts), 352, 352)
    for name in OUTPUTS:
        diff = (getattr(got, name) - reference[name]).abs().max().item()
        assert diff <= params["verify"]["atol"], f"{name}: {diff}"


def test_second_repro_runs_no_stage(pipeline, second_repro):
    assert second_repro.ran == [] and second_repro.restored == [], second_repro.output
    assert sorted(second_repro.skipped) == sorted(stage_names(VARIANT) + stage_names(SERVED))
    assert "Data and pipelines are up to date." in pipeline.project.dvc("status")


def test_verify_setting_reruns_only_verify_outputs(verify_setting_repro):
    # verify.rtol (how intermediates are judged) reruns verify-outputs of every variant; its outputs come out the same
    # bytes, so nothing downstream reruns. (verify.atol would rerun export too: the model card quotes the tolerance.)
    assert sorted(verify_setting_repro.ran) == sorted(stage_names(VARIANT, ("verify-outputs",)) + stage_names(SERVED, ("verify-outputs",))), verify_setting_repro.output
    others = ("download", "remap-weights", "build-model", "verify-usage", "export", "export-onnx")
    assert sorted(verify_setting_repro.skipped) == sorted(stage_names(VARIANT, others) + stage_names(SERVED, others))


def test_one_variants_setting_leaves_the_other_variants_stages_untouched(pipeline, one_variant_repro):
    # The prompts: verify-outputs, verify-usage (its batch takes the first two), export (its card quotes them) and
    # export-onnx (it checks its files on verify-outputs' prompts).
    assert sorted(one_variant_repro.ran) == sorted(stage_names(SERVED, ("verify-outputs", "verify-usage", "export", "export-onnx"))), one_variant_repro.output
    assert set(stage_names(VARIANT)) <= set(one_variant_repro.skipped)
    masks = sorted(p.name for p in (pipeline.project.root / "outputs" / SERVED / "verify" / "masks").iterdir())
    assert len(masks) == 3 and "dog" in masks[-1], masks


def test_the_lock_records_the_last_run(pipeline, one_variant_repro):
    assert "Data and pipelines are up to date." in pipeline.project.dvc("status")


def test_reruns_over_hardlinked_outputs_leave_the_cache_intact(pipeline, one_variant_repro):
    cache = pipeline.project.root / ".dvc" / "cache" / "files" / "md5"
    objects = [p for p in cache.rglob("*") if p.is_file()]
    # An object is named by the md5 of its bytes (directory listings too, with a .dir suffix).
    corrupted = [p for p in objects if hashlib.md5(p.read_bytes()).hexdigest() != p.parent.name + p.name.removesuffix(".dir")]
    assert objects and not corrupted
    for variant in VARIANTS:
        assert (pipeline.project.root / "outputs" / variant / "model" / "model.safetensors").stat().st_nlink >= 2
