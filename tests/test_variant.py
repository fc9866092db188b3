"""Tests for tools/variant.py (clipseg-variant) and the library it stands on (clipseg_pipeline.inference, .params_file):
checkpoint files in every form the original code and OpenAI's loader produce -> a params.yaml section whose
architecture is the generator's, pinned, in DVC's layout; then through the five stages to a verified export that names
its assumed settings. Every refusal leaves params.yaml as it was, with one clear message.

Checkpoints are made by the project's generator (tools.synthetic) in a temporary project folder: widths are multiples
of 64 because OpenAI's loader derives each CLIP tower's heads as width // 64.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from clipseg_pipeline import inference, params
from clipseg_pipeline.inference import InferenceError
from stages import build_model, download, export, remap_weights, verify_outputs
from tests.http_server import serve
from tools import synthetic, variant

REPO = Path(__file__).resolve().parents[1]
SEED = 3
ALL_ASSUMED = ["decoder_num_attention_heads", "extract_layers", "conditional_layer"]


def arch(*, patch: int = 32, depth: int = 10, reduce_dim: int = 128, refined: bool = False,
         extract_layers: tuple[int, ...] = (3, 6, 9), **changes) -> dict:
    """A small CLIPSeg as the original code makes one (default: its ViT-B/32, reduce_dim-128 defaults), params form."""
    return {
        "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": depth, "num_attention_heads": 1,
                   "patch_size": patch, "image_size": 64},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 1,
                 "vocab_size": synthetic.tokenizer_vocab_size(), "max_position_embeddings": 77},
        "projection_dim": 32, "extract_layers": list(extract_layers), "reduce_dim": reduce_dim,
        "decoder_num_attention_heads": 4, "decoder_intermediate_size": 64, "conditional_layer": 0,
        "use_complex_transposed_convolution": refined, **changes,
    }  # fmt: skip


@dataclass
class Project:
    """A folder laid out like the repository: params.yaml, and the user's files under files/."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def files(self) -> Path:
        return self.root / "files"

    def side_args(self) -> list[str]:
        return ["--vocab", "files/vocab.json", "--merges", "files/merges.txt", "--image", "files/image.jpg"]

    def add(self, name: str, *argv: str, side: bool = True) -> int:
        return variant.main(["add", name, *argv, *(self.side_args() if side else [])])

    def section(self, name: str) -> dict:
        import yaml

        return yaml.safe_load(self.params.read_text(encoding="utf-8"))["models"][name]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Project:
    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    synthetic.write_tokenizer_files(tmp_path / "files")
    synthetic.write_image(tmp_path / "files" / "image.jpg")
    monkeypatch.chdir(tmp_path)  # the stages and the command run from the repository root
    return Project(tmp_path)


def write_pair(project: Project, a: dict, *, clip: str = "plain", decoder: str = "pth") -> list[str]:
    """The CLIP file (plain state dict or TorchScript) and the decoder (bare .pth or inside a zip): the command's args."""
    args = []
    if clip == "plain":
        synthetic.write_state_dict(synthetic.plain_clip_state_dict(a, SEED), project.files / "clip.pth")
        args += ["--clip", "files/clip.pth"]
    else:
        synthetic.write_clip_torchscript(synthetic.clip_state_dict(a, SEED), project.files / "clip.pt")
        args += ["--clip", "files/clip.pt", "--clip-sha256", synthetic.sha256_file(project.files / "clip.pt")]
    if decoder == "pth":
        synthetic.write_state_dict(synthetic.decoder_state_dict(a, SEED), project.files / "mine.pth")
        args += ["--decoder", "files/mine.pth"]
    else:
        synthetic.write_decoder_zip(synthetic.decoder_state_dict(a, SEED), project.files / "weights.zip", "mine.pth")
        args += ["--decoder", "files/weights.zip", "--member", "mine.pth"]
    return args


def write_full(project: Project, a: dict) -> list[str]:
    synthetic.write_state_dict(synthetic.full_model_state_dict(a, SEED), project.files / "full.pth")
    return ["--checkpoint", "files/full.pth"]


# --- the architecture is inferred from every form -------------------------------------------------

FORMS = [
    # id, architecture, how the files are given, options beyond the files
    ("b32-rd128-plain-clip-bare-pth", arch(), ("plain", "pth"), []),
    ("b16-rd64-refined-torchscript-zip", arch(patch=16, reduce_dim=64, refined=True, depth=3, extract_layers=(0, 1, 2)),
     ("torchscript", "zip"), ["--extract-layers", "0,1,2"]),
    ("b16-rd16-plain-full-model", arch(patch=16, reduce_dim=16), "full", []),
    ("b32-rd64-refined-full-model", arch(reduce_dim=64, refined=True), "full", []),
    ("b16-rd16-four-layers-given", arch(patch=16, reduce_dim=16, depth=4, extract_layers=(0, 1, 2, 3)),
     ("plain", "zip"), ["--extract-layers", "0,1,2,3", "--decoder-heads", "2", "--conditional-layer", "1"]),
]


@pytest.mark.parametrize("a, form, options", [f[1:] for f in FORMS], ids=[f[0] for f in FORMS])
def test_the_inferred_architecture_is_the_generators(project, a, form, options):
    if form == "full":
        files = write_full(project, a)
    else:
        files = write_pair(project, a, clip=form[0], decoder=form[1])
    if "--decoder-heads" in options:
        a = {**a, "decoder_num_attention_heads": 2, "conditional_layer": 1}
    assert project.add("mine", *files, *options) == 0
    section = project.section("mine")
    assert section["architecture"] == a
    given = {"--extract-layers": "extract_layers", "--decoder-heads": "decoder_num_attention_heads",
             "--conditional-layer": "conditional_layer"}
    assert section["assumed"] == [name for name in ALL_ASSUMED if name not in {given[o] for o in options if o in given}]
    # Every source pinned to the file it was read from; the whole file still parses, the variant listed to build.
    for name, source in section["sources"].items():
        assert source["sha256"] == synthetic.sha256_file(project.root / source["url"]), name
    parsed = params.load(project.params)
    assert "mine" in parsed.variants and parsed.model("mine").assumed == tuple(section["assumed"])


def test_the_section_keeps_params_yaml_in_dvcs_layout(project):
    from dvc.utils.hydra import apply_overrides

    before = (REPO / "params.yaml").read_text(encoding="utf-8")
    assert project.add("mine", *write_pair(project, arch())) == 0
    after = project.params.read_text(encoding="utf-8")
    # Only additions: every comment and line of the file stays, the section sits at the end of `models`.
    assert [line for line in before.splitlines() if line not in after.splitlines()] == []
    assert "# Added by clipseg-variant from files/clip.pth, files/mine.pth\n  mine:\n" in after
    assert "    export: {dtype: float32, synthetic: false}\n" in after.split("  mine:\n")[1]
    # DVC rewriting the file changes nothing else: a later -S stays a one-line diff.
    apply_overrides(project.params, ["models.mine.export.dtype=float16"])
    changed = [(a, b) for a, b in zip(after.splitlines(), project.params.read_text(encoding="utf-8").splitlines()) if a != b]
    assert changed == [("    export: {dtype: float32, synthetic: false}", "    export: {dtype: float16, synthetic: false}")]


# --- through the pipeline ---------------------------------------------------------------------------


def run_stages(name: str) -> Path:
    """download -> remap-weights -> build-model -> verify-outputs -> export, with dvc.yaml's paths; the reports' folder."""
    data, out, metrics, reports = Path("data") / name, Path("outputs") / name, Path("metrics") / name, Path("reports") / name
    common = ["--variant", name]
    steps = [
        (download, ["--out", str(data), "--cache", "data/downloads", "--metrics", f"{metrics}/download.json",
                    "--report", f"{reports}/download.json", "--no-progress"]),
        (remap_weights, ["--original", f"{data}/original.safetensors", "--out", f"{out}/remapped.safetensors",
                         "--metrics", f"{metrics}/remap.json", "--report", f"{reports}/remap.json"]),
        (build_model, ["--remapped", f"{out}/remapped.safetensors", "--out", f"{out}/model", "--metrics", f"{metrics}/build.json"]),
        (verify_outputs, ["--model", f"{out}/model", "--original", str(data), "--out", f"{out}/verify",
                          "--metrics", f"{metrics}/verify.json", "--checks", f"{metrics}/prompts",
                          "--report", f"{reports}/verify.json"]),
        (export, ["--model", f"{out}/model", "--original", str(data), "--reference", f"{out}/verify/reference.safetensors",
                  "--download-report", f"{reports}/download.json", "--verify-report", f"{reports}/verify.json",
                  "--out", f"{out}/hf", "--metrics", f"{metrics}/export.json", "--report", f"{reports}/export.json"]),
    ]  # fmt: skip
    for stage, argv in steps:
        assert stage.main(common + argv) == 0, stage.__name__
    return reports


@pytest.mark.parametrize("form", ["pair", "full"])
def test_an_added_variant_builds_verifies_and_exports_naming_what_was_assumed(project, form):
    a = arch(patch=16, reduce_dim=16, depth=10)
    files = write_pair(project, a) if form == "pair" else write_full(project, a)
    assert project.add("mine", *files, "--extract-layers", "2,5,8") == 0
    reports = run_stages("mine")
    verify, exported = (json.loads((reports / f"{s}.json").read_text()) for s in ("verify", "export"))
    assert verify["passed"] is True
    assert verify["assumed"] == exported["assumed"] == ["decoder_num_attention_heads", "conditional_layer"]
    card = (Path("outputs/mine/hf/README.md")).read_text(encoding="utf-8")
    assert "**Assumed settings: `decoder_num_attention_heads`, `conditional_layer`.**" in card
    if form == "full":  # the duplicate vision tower was dropped, with its reason
        dropped = json.loads((reports / "remap.json").read_text())["dropped"]
        assert dropped["model.conv1.weight"].startswith("the original keeps `self.model = clip_model.visual`")


# --- refusals: one clear message, params.yaml untouched ---------------------------------------------


def refused(project: Project, capsys, pattern: str, *argv: str, code: int = 1, side: bool = True) -> None:
    before = project.params.read_bytes()
    assert project.add(*argv, side=side) == code
    assert re.search(pattern, capsys.readouterr().err), pattern
    assert project.params.read_bytes() == before


def test_refuses_files_that_are_not_clipseg(project, capsys):
    torch.save({"layer.weight": torch.zeros(2, 2)}, project.files / "other.pth")
    files = write_pair(project, arch())
    refused(project, capsys, r"not a CLIPSeg decoder: no 'film_mul.weight'", "mine", *files[:2], "--decoder", "files/other.pth")


def test_refuses_a_resnet_clip():
    tensors = {"visual.attnpool.c_proj.weight": torch.zeros(1), "film_mul.weight": torch.zeros(1)}
    with pytest.raises(InferenceError, match=r"the CLIP backbone is a ResNet .*CLIPSeg models take a ViT"):
        inference.infer(tensors)


@pytest.mark.parametrize("extra, option", [
    ({"extra_blocks.0.linear1.weight": torch.zeros(1)}, "extra_blocks"),
    ({"upsample_proj.weight": torch.zeros(1)}, r"upsample=True"),
    ({"shift_vector": torch.zeros(1)}, r"fix_shift=True"),
])
def test_refuses_original_options_transformers_cannot_represent(extra, option):
    tensors = {**synthetic.plain_clip_state_dict(arch(), SEED), **synthetic.decoder_state_dict(arch(), SEED), **extra}
    with pytest.raises(InferenceError, match=rf"trained with the original option {option}.*cannot be converted"):
        inference.infer(tensors)


def test_refuses_reduce_cond(project, capsys):
    decoder = synthetic.decoder_state_dict(arch(), SEED)
    decoder["film_mul.weight"] = torch.zeros(128, 16)
    files = write_pair(project, arch())
    torch.save(decoder, project.files / "mine.pth")
    refused(project, capsys, r"film_mul.weight takes 16-wide conditions .* reduce_cond", "mine", *files)


def test_refuses_a_transposed_convolution_kernel_other_than_the_patch(project, capsys):
    decoder = synthetic.decoder_state_dict(arch(), SEED)
    decoder["trans_conv.weight"] = torch.zeros(128, 1, 16, 16)
    files = write_pair(project, arch())
    torch.save(decoder, project.files / "mine.pth")
    refused(project, capsys, r"transposed convolution has kernel 16 but the patch size is 32", "mine", *files)


def test_refuses_to_guess_which_layers_when_there_are_not_three(project, capsys):
    files = write_pair(project, arch(depth=10, extract_layers=(2, 5, 8, 9)))
    refused(project, capsys, r"original default \[3, 6, 9\] does not fit \(it takes 4 layers\): give the 4 block "
            r"indices .*--extract-layers 0,1,2,3", "mine", *files)


def test_refuses_the_default_layers_on_a_shallow_backbone(project, capsys):
    files = write_pair(project, arch(depth=2, extract_layers=(0, 1, 1)))
    refused(project, capsys, r"does not fit \(the backbone has only 2 layers\)", "mine", *files)


def test_refuses_extract_layers_of_the_wrong_count(project, capsys):
    files = write_pair(project, arch())
    refused(project, capsys, r"the decoder takes 3 extracted layers, but 2 were given", "mine", *files, "--extract-layers", "3,6")


def test_refuses_the_default_heads_when_they_cannot_divide_reduce_dim(project, capsys):
    files = write_pair(project, arch(reduce_dim=6, decoder_num_attention_heads=2))
    refused(project, capsys, r"reduce_dim 6 is not divisible by the original default of 4 decoder heads.*--decoder-heads",
            "mine", *files)


def test_refuses_a_clip_width_openais_loader_cannot_split_into_heads(project, capsys):
    a = arch()
    a["vision"] = {**a["vision"], "hidden_size": 96, "num_attention_heads": 1}
    refused(project, capsys, r"vision tower is 96 wide: OpenAI's loader gives it width // 64", "mine", *write_pair(project, a))


def test_refuses_an_unpinned_torchscript_clip(project, capsys):
    files = write_pair(project, arch(), clip="torchscript")
    files = files[:2] + files[4:]  # without --clip-sha256
    refused(project, capsys, r"is a TorchScript archive, which is only loaded when its sha256 matches a pin you give .*: "
            r"pass --clip-sha256", "mine", *files)


def test_refuses_a_wrong_pin(project, capsys):
    files = write_pair(project, arch(), clip="torchscript")
    files[3] = "0" * 64
    refused(project, capsys, r"sha256 mismatch", "mine", *files)


def test_refuses_a_whole_model_given_as_clip_naming_the_checkpoint_option(project, capsys):
    write_full(project, arch())
    synthetic.write_state_dict(synthetic.decoder_state_dict(arch(), SEED), project.files / "mine.pth")
    refused(project, capsys, r"whole CLIPSeg model's state_dict\(\).*`checkpoint`", "mine", "--clip", "files/full.pth",
            "--decoder", "files/mine.pth")


def test_refuses_a_decoder_alone_given_as_checkpoint(project, capsys):
    files = write_pair(project, arch())
    refused(project, capsys, r"not a whole CLIPSeg model's state_dict\(\).*decoder alone", "mine", "--checkpoint", files[3])


def test_refuses_a_zip_without_member(project, capsys):
    files = write_pair(project, arch(), decoder="zip")
    refused(project, capsys, r"weights.zip is a zip archive with members .*pass --member", "mine", *files[:4])


def test_refuses_a_tokenizer_that_does_not_fit_the_token_table(project, capsys):
    refused(project, capsys, r"the tokenizer has \d+ tokens but models.mine.architecture.text.vocab_size is 700",
            "mine", *write_pair(project, arch(text={**arch()["text"], "vocab_size": 700})))


def test_refuses_a_name_taken_or_malformed(project, capsys):
    files = write_pair(project, arch())
    refused(project, capsys, r"models.clipseg-tiny exists already", "clipseg-tiny", *files)
    refused(project, capsys, r"the name '../x' must be letters", "../x", *files, code=2)


def test_a_default_that_cannot_be_fetched_says_which_option_to_pass(project, capsys, monkeypatch):
    files = write_pair(project, arch())
    with serve({}) as server:  # answers 404 for everything
        monkeypatch.setattr(variant, "PUBLISHED_SIDE_SOURCES", {
            name: server.url(f"/{name}") for name in variant.PUBLISHED_SIDE_SOURCES})
        refused(project, capsys, r"cannot fetch the default image \(http://127.0.0.1:\d+/image\): .*Pass --image",
                "mine", *files, side=False)


# --- the command's packaging ------------------------------------------------------------------------


def test_the_published_side_sources_are_params_yamls():
    import yaml

    published = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["models"]["clipseg-rd64"]["sources"]
    assert variant.PUBLISHED_SIDE_SOURCES == {name: published[name]["url"] for name in variant.PUBLISHED_SIDE_SOURCES}


def test_the_console_script_is_installed_as_clipseg_variant():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    module, function = scripts["clipseg-variant"].split(":")
    assert (module, function) == ("tools.variant", "main")
    assert callable(getattr(variant, function))


def test_help_names_the_defaults_and_the_extract_layers_option(capsys):
    with pytest.raises(SystemExit) as done:
        variant.main(["add", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "extract_layers [3, 6, 9]" in text and "--extract-layers" in text and "assumed" in text


def test_infer_is_a_pure_function_of_the_tensors():
    a = arch()
    tensors = {**synthetic.plain_clip_state_dict(a, SEED), **synthetic.decoder_state_dict(a, SEED)}
    inferred = inference.infer(tensors)
    assert inferred.architecture.to_mapping() == a and inferred.assumed == tuple(ALL_ASSUMED)
    assert inference.infer(tensors, {"extract_layers": (1, 2, 3)}).assumed == ("decoder_num_attention_heads", "conditional_layer")


def test_a_file_another_variant_pinned_keeps_its_pin(project):
    files = write_pair(project, arch(), clip="torchscript")
    assert project.add("first", *files) == 0
    # The second decoder shares the TorchScript CLIP: its pin in params.yaml is the one given for the first.
    synthetic.write_state_dict(synthetic.decoder_state_dict(arch(), SEED + 1), project.files / "other.pth")
    assert project.add("second", "--clip", "files/clip.pt", "--decoder", "files/other.pth") == 0
    assert project.section("second")["sources"]["clip"] == project.section("first")["sources"]["clip"]
