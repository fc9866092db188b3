"""clipseg_pipeline.hf_layout, which build-model uses instead of transformers, against transformers itself: the state dict of the
meta-constructed CLIPSegForImageSegmentation and CLIPSegConfig's JSON, for every variant in params.yaml and for a few
changed architectures; and the committed config template against a fresh one from the installed transformers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

from clipseg_pipeline import hf_layout
from clipseg_pipeline.architecture import Architecture

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
MODELS = yaml.safe_load(PARAMS.read_text(encoding="utf-8"))["models"]


def config_from_architecture(arch: Architecture) -> CLIPSegConfig:
    return CLIPSegConfig(**arch.config_settings())


def meta_model(config: CLIPSegConfig) -> CLIPSegForImageSegmentation:
    """transformers' own model, constructed without memory or a random initialisation."""
    with torch.device("meta"):
        return CLIPSegForImageSegmentation(config)


def changed(variant: str, change) -> Architecture:
    arch = copy.deepcopy(MODELS[variant]["architecture"])
    change(arch)
    return Architecture.from_mapping(arch)


ARCHS = {variant: Architecture.from_mapping(model["architecture"]) for variant, model in MODELS.items()} | {
    "tiny, two extract layers": changed("clipseg-tiny", lambda a: a.update(extract_layers=[1, 3])),
    "tiny, refined, reduce_dim 8": changed("clipseg-tiny", lambda a: a.update(reduce_dim=8, use_complex_transposed_convolution=True)),
    "tiny, patch 8 at 64 px": changed("clipseg-tiny", lambda a: a["vision"].update(patch_size=8, image_size=64)),
    "tiny, other widths": changed("clipseg-tiny", lambda a: (a["text"].update(hidden_size=24, intermediate_size=40),
                                                             a.update(projection_dim=12, decoder_intermediate_size=20))),
}


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
def test_state_dict_shapes_are_the_meta_models(arch):
    model = meta_model(config_from_architecture(arch))
    assert hf_layout.state_dict_shapes(arch) == {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
def test_config_is_what_clipsegconfig_writes(arch):
    expected = json.loads(config_from_architecture(arch).to_json_string(use_diff=False))
    assert hf_layout.config_dict(arch) == expected


def test_the_committed_template_is_the_installed_transformers_one(tmp_path):
    fresh = tmp_path / "template.json"
    hf_layout.write_template(fresh)
    assert fresh.read_text(encoding="utf-8") == hf_layout.CONFIG_TEMPLATE.read_text(encoding="utf-8"), (
        "transformers changed its CLIPSegConfig defaults: run `python -m clipseg_pipeline.hf_layout --write-template` and commit the template"
    )


def test_a_misfit_names_every_problem():
    arch = ARCHS["clipseg-tiny"]
    shapes = dict(hf_layout.state_dict_shapes(arch))
    shapes.pop("decoder.film_add.bias")
    shapes["clip.logit_scale"] = (1,)
    shapes["decoder.extra"] = (2,)
    with pytest.raises(hf_layout.BuildError, match=r"missing \['decoder\.film_add\.bias'\]; unexpected \['decoder\.extra'\]; "
                                                   r"wrong shapes \['clip\.logit_scale: model wants \[\], got \[1\]'\]"):
        hf_layout.check_shapes(hf_layout.state_dict_shapes(arch), shapes)


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
def test_a_config_gives_back_its_architecture(arch):
    assert Architecture.from_config(hf_layout.config_dict(arch)) == arch
    assert Architecture.from_config(config_from_architecture(arch).to_dict()) == arch


def test_help_writes_nothing(tmp_path, monkeypatch, capsys):
    written = []
    monkeypatch.setattr(hf_layout, "write_template", lambda *args: written.append(args))
    assert hf_layout.main([]) == 0 and written == []
    with pytest.raises(SystemExit) as exit_info:
        hf_layout.main(["--help"])
    assert exit_info.value.code == 0 and written == [] and "--write-template" in capsys.readouterr().out
    assert hf_layout.main(["--write-template"]) == 0 and len(written) == 1
