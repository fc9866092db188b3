"""export-onnx on the tiny pipeline's model: the folder transformers.js loads, the graph's interface and both input
forms run by onnxruntime, the same bytes from the same inputs, and every way the stage refuses to leave a file; and
on a variant with the plain upsampling the tiny default no longer has."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from clipseg_pipeline import onnx_export as ox
from clipseg_pipeline.params import ONNX_DTYPES
from clipseg_pipeline.tensor_io import TensorFile, sha256_file
from stages import export_onnx
from tests.pipeline_fixture import edited_params, tiny_pipeline  # noqa: F401  (a fixture)

FOLDER_FILES = {"README.md", "config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                *ox.FILES.values()}


def reference(run) -> dict[str, np.ndarray]:
    stored = TensorFile(run.reference, framework="np")
    return {name: stored[name] for name in stored}


def test_the_file_names_are_transformers_js_dtypes():
    assert tuple(ox.FILES) == ONNX_DTYPES


def test_the_folder_holds_what_transformers_js_reads(tiny_pipeline):
    files = {p.relative_to(tiny_pipeline.onnx).as_posix() for p in tiny_pipeline.onnx.rglob("*") if p.is_file()}
    assert files == FOLDER_FILES
    report = json.loads(tiny_pipeline.report("onnx").read_text())
    assert [f["dtype"] for f in report["files"]] == list(ONNX_DTYPES)
    assert all(check["passed"] for f in report["files"] for check in f["checks"].values())
    assert json.loads(tiny_pipeline.report("onnx").with_name("onnx.metrics.json").read_text()) == {
        "passed": True, "files": 3, "bytes": sum(f["bytes"] for f in report["files"])}
    assert json.loads((tiny_pipeline.onnx / "config.json").read_text())["dtype"] == "float32"
    card = (tiny_pipeline.onnx / "README.md").read_text()
    assert "library_name: transformers.js" in card and "onnx/model_quantized.onnx" in card


def test_the_graph_takes_ids_mask_pixels_and_gives_logits_with_dynamic_prompts_and_images(tiny_pipeline):
    graph = onnx.load(tiny_pipeline.onnx / ox.FILES["fp32"], load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
    assert dims == {"input_ids": ["prompts", "length"], "attention_mask": ["prompts", "length"],
                    "pixel_values": ["images", 3, 352, 352], "logits": ["prompts", 352, 352]}
    # Only what the logits need: the vision tower's post-norm and projection are not in the graph.
    names = [i.name for i in graph.initializer]
    assert not [n for n in names if "post_layernorm" in n or "visual_projection" in n]


@pytest.mark.parametrize("dtype", ONNX_DTYPES)
def test_every_file_runs_one_prompt_and_prompts_of_77_tokens(tiny_pipeline, dtype):
    sess = ox.session(tiny_pipeline.onnx / ox.FILES[dtype], 1)
    ref = reference(tiny_pipeline)
    one = {"input_ids": ref["input_ids"][:1], "attention_mask": ref["attention_mask"][:1], "pixel_values": ref["pixel_values"]}
    (logits,) = sess.run(["logits"], one)
    (all_prompts,) = sess.run(["logits"], {name: ref[name] for name in ox.INPUTS})
    assert logits.shape == (1, 352, 352)
    # Rows are computed independently and the padding beyond a prompt's end is masked; but q8 quantizes activations
    # with one scale for the whole batch, so its rows move within its tolerance when the batch changes.
    atol = {"fp32": 1e-5, "fp16": 1e-2, "q8": 1.0}[dtype]
    np.testing.assert_allclose(logits[0], all_prompts[0], atol=atol)
    ids = np.zeros((2, 77), dtype=np.int64)
    ids[:, : ref["input_ids"].shape[1]] = ref["input_ids"][:2]
    mask = np.zeros_like(ids)
    mask[:, : ref["attention_mask"].shape[1]] = ref["attention_mask"][:2]
    (padded,) = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask, "pixel_values": ref["pixel_values"]})
    np.testing.assert_allclose(padded, all_prompts[:2], atol=atol)


def test_float16_keeps_float32_inputs_and_output(tiny_pipeline):
    sess = ox.session(tiny_pipeline.onnx / ox.FILES["fp16"], 1)
    ox.check_interface(sess, tiny_pipeline.onnx / ox.FILES["fp16"])
    initializers = onnx.load(tiny_pipeline.onnx / ox.FILES["fp16"]).graph.initializer
    assert {onnx.TensorProto.FLOAT16} <= {i.data_type for i in initializers}


def test_quantized_weights_are_8_bit(tiny_pipeline):
    graph = onnx.load(tiny_pipeline.onnx / ox.FILES["q8"]).graph
    assert "MatMulInteger" in {n.op_type for n in graph.node}
    embedding = [i for i in graph.initializer if "token_embedding" in i.name]
    assert embedding and all(i.data_type == onnx.TensorProto.UINT8 for i in embedding if i.name.endswith("_quantized"))
    # The products' weights are int8, and only products with a constant weight are quantized: attention's
    # activation-by-activation products stay float32 (quantized too, they ran no faster than float32).
    weights = {i.name: i.data_type for i in graph.initializer if i.name.endswith("_quantized")}
    integer = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert integer and all(weights.get(n.input[1]) == onnx.TensorProto.INT8 for n in integer)
    assert any(n.op_type == "MatMul" for n in graph.node)


def test_the_same_inputs_give_the_same_bytes(tiny_pipeline, tmp_path):
    out = tmp_path / "onnx"
    assert export_onnx.main(tiny_pipeline.onnx_argv(out, tmp_path / "report.json")) == 0
    ours = {p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()}
    theirs = {p.relative_to(tiny_pipeline.onnx): sha256_file(p) for p in tiny_pipeline.onnx.rglob("*") if p.is_file()}
    assert ours == theirs
    assert (tmp_path / "report.json").read_bytes() == tiny_pipeline.report("onnx").read_bytes()


def test_a_file_outside_its_tolerance_fails_the_stage_and_leaves_nothing(tiny_pipeline, tmp_path, capsys):
    params = edited_params(tiny_pipeline.params, lambda d: d["onnx"]["atol"].update(q8=1e-6), tmp_path / "params.yaml")
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "stale").write_text("an earlier run's file")
    assert export_onnx.main(tiny_pipeline.onnx_argv(out, tmp_path / "report.json", params)) == 1
    error = capsys.readouterr().err
    assert "q8 (one image): max abs diff" in error and "No file was kept" in error and "onnx.atol" in error
    assert not (tmp_path / ".onnx.staging").exists() and not (tmp_path / "report.json").exists()
    assert (out / "stale").exists()  # the previous output is left as it was


def test_only_the_files_asked_for_are_built(tiny_pipeline, tmp_path):
    params = edited_params(tiny_pipeline.params, lambda d: d["onnx"].update(files=["q8"]), tmp_path / "params.yaml")
    out = tmp_path / "onnx"
    assert export_onnx.main(tiny_pipeline.onnx_argv(out, tmp_path / "report.json", params)) == 0
    assert sorted(p.relative_to(out).as_posix() for p in (out / "onnx").iterdir()) == ["onnx/model_quantized.onnx"]
    assert sha256_file(out / ox.FILES["q8"]) == sha256_file(tiny_pipeline.onnx / ox.FILES["q8"])


def test_an_unverified_model_is_not_exported(tiny_pipeline, tmp_path, capsys):
    report = json.loads(tiny_pipeline.report("verify").read_text()) | {"passed": False}
    (tmp_path / "verify.json").write_text(json.dumps(report))
    argv = tiny_pipeline.onnx_argv(tmp_path / "onnx", tmp_path / "report.json")
    argv[argv.index("--verify-report") + 1] = str(tmp_path / "verify.json")
    assert export_onnx.main(argv) == 1
    assert "did not pass verify-outputs" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()


def test_compare_logits_counts_mask_pixels_and_reports_nan_as_inf():
    want = np.array([[[1.0, -1.0], [2.0, -2.0]]], dtype=np.float32)
    diff, agreement = ox.compare_logits(want * np.array([1, -1], dtype=np.float32), want)
    assert diff == 4.0 and agreement == 0.5
    assert ox.compare_logits(np.full_like(want, np.nan), want)[0] == np.inf
    with pytest.raises(ox.OnnxExportError, match=r"logits of shape \[2, 2\], the reference's are \[1, 2, 2\]"):
        ox.compare_logits(want[0], want)


def readme_snippet(language: str) -> str:
    """The README's ONNX section's code block in `language`."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## ONNX for onnxruntime and transformers.js", 1)[1].split("\n## ", 1)[0]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_readme_python_snippet_runs_as_written(tiny_pipeline, monkeypatch):
    monkeypatch.chdir(tiny_pipeline.root)  # the snippet's paths are the pipeline's, from the repository root
    namespace: dict = {}
    exec(compile(readme_snippet("python"), "README.md", "exec"), namespace)
    assert namespace["masks"].shape == (2, 352, 352)


def test_a_variant_with_one_prompt_exports_a_graph_for_any_number_of_prompts(tiny_pipeline):  # noqa: F811
    # torch.export fixes an axis whose example has size 1: verify-outputs' inputs with one prompt must still give a graph
    # that takes several.
    import onnxruntime as ort

    from clipseg_pipeline.converted_model import load_model

    stored = TensorFile(tiny_pipeline.reference, framework="np")
    one = {"input_ids": stored["input_ids"][:1], "attention_mask": stored["attention_mask"][:1],
           "pixel_values": stored["pixel_values"]}
    proto = ox.export_float32(load_model(tiny_pipeline.model), one)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": stored["input_ids"], "attention_mask": stored["attention_mask"], "pixel_values": stored["pixel_values"]}
    (logits,) = session.run(["logits"], feeds)
    assert logits.shape == (len(stored["input_ids"]), 352, 352)
    assert np.abs(logits - stored["logits"]).max() < 1e-4


def test_the_side_files_are_exports_own(tiny_pipeline):  # noqa: F811
    # Written from the same inputs rather than copied: they must come out as export writes them (its config.json with
    # the float32 dtype, as the float32 export's is).
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        assert (tiny_pipeline.onnx / name).read_bytes() == (tiny_pipeline.export / name).read_bytes(), name


def test_the_plain_upsampling_exports_and_passes_too(tmp_path):
    # clipseg-tiny has the refined upsampling; clipseg-rd64 and rd16 the plain one (one transposed convolution). A plain
    # tiny variant (random weights) taken through verify-outputs, then exported: every file within its tolerances.
    from tests.test_verify_outputs import build, run_verify, tiny_arch

    built = build(tmp_path / "plain", tiny_arch(), "tiny-uni.pth")
    verified = run_verify(built, tmp_path)
    assert verified.code == 0, verified.stderr
    out, report = tmp_path / "onnx", tmp_path / "onnx.json"
    argv = built.stage_argv() + [
        "--model", str(built.model), "--original", str(built.original),
        "--reference", str(tmp_path / "verify" / "reference.safetensors"), "--verify-report", str(tmp_path / "verify.json"),
        "--out", str(out), "--metrics", str(tmp_path / "onnx.metrics.json"), "--report", str(report),
    ]  # fmt: skip
    assert export_onnx.main(argv) == 0
    files = json.loads(report.read_text())["files"]
    assert [f["dtype"] for f in files] == list(ONNX_DTYPES) and all(f["worst"]["passed"] for f in files)
    graph = onnx.load(out / ox.FILES["fp32"])
    assert [node.op_type for node in graph.graph.node].count("ConvTranspose") == 1  # the refined one has two
