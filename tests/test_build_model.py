"""build-model: strict accounting of the remapped tensors against the model's state dict (clipseg_pipeline.hf_layout), and what it writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import CLIPSegForImageSegmentation

from clipseg_pipeline import name_map
from stages import build_model
from tools import synthetic
from clipseg_pipeline.tensor_io import TensorFile, write_safetensors

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
VARIANT = "clipseg-tiny"


@pytest.fixture(scope="module")
def remapped() -> dict[str, torch.Tensor]:
    # Random tensors of the architecture params.yaml declares for the variant (its token table fits its tokenizer).
    arch = yaml.safe_load(PARAMS.read_text(encoding="utf-8"))["models"][VARIANT]["architecture"]
    original = synthetic.clip_state_dict(arch, seed=0) | synthetic.decoder_state_dict(arch, seed=0)
    target, _ = name_map.remap(original)
    return target


def run(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> tuple[int, Path]:
    write_safetensors(tmp_path / "remapped.safetensors", tensors)
    out = tmp_path / "model"
    code = build_model.main([
        "--params", str(PARAMS), "--variant", VARIANT, "--remapped", str(tmp_path / "remapped.safetensors"),
        "--out", str(out), "--metrics", str(tmp_path / "build.json"),
    ])
    return code, out


def test_builds_a_float32_model_that_loads_with_exactly_the_remapped_values(remapped, tmp_path):
    code, out = run(tmp_path, remapped)
    assert code == 0
    model = CLIPSegForImageSegmentation.from_pretrained(out)
    state = model.state_dict()
    assert sorted(state) == sorted(remapped)
    for name, tensor in remapped.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], tensor.float()), name
    assert TensorFile(out / "model.safetensors").metadata["format"] == "pt"


def test_bfloat16_and_float64_sources_become_exactly_their_float32_values(remapped, tmp_path):
    # build-model reads numpy arrays, and numpy has no bfloat16: its raw bits are widened by hand.
    tensors = {name: t.to(torch.bfloat16 if i % 2 else torch.float64) for i, (name, t) in enumerate(sorted(remapped.items()))}
    code, out = run(tmp_path, tensors)
    assert code == 0
    built = TensorFile(out / "model.safetensors")
    assert {spec.dtype for spec in built.specs.values()} == {"F32"}
    for name, tensor in tensors.items():
        assert torch.equal(built[name], tensor.float()), name


def test_weights_that_are_not_floating_point_are_named_and_nothing_is_written(remapped, tmp_path, capsys):
    tensors = dict(remapped, **{"decoder.film_mul.bias": remapped["decoder.film_mul.bias"].to(torch.int32)})
    code, out = run(tmp_path, tensors)
    assert code == 1
    assert "weights that are not floating point: ['decoder.film_mul.bias (I32)']" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("decoder.film_mul.bias"), r"missing \['decoder\.film_mul\.bias'\]"),
        (lambda t: t.update({"decoder.extra.weight": torch.zeros(2)}), r"unexpected \['decoder\.extra\.weight'\]"),
        (lambda t: t.update({"clip.logit_scale": torch.zeros(2)}), r"wrong shapes \['clip\.logit_scale: model wants \[\], got \[2\]'\]"),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_tensors_that_do_not_fit_the_model_are_named_and_nothing_is_written(remapped, tmp_path, capsys, change, message):
    tensors = dict(remapped)
    change(tensors)
    code, out = run(tmp_path, tensors)
    assert code == 1
    err = capsys.readouterr().err
    assert "build-model clipseg-tiny: error: the remapped tensors do not fit CLIPSegForImageSegmentation" in err
    assert re.search(message, err), err
    assert not (out / "model.safetensors").exists()
