"""A new variant -> its `models.<name>` section in params.yaml, and its name under `variants`.

The file is rewritten the way DVC rewrites it (`dvc exp run -S`, `dvc exp apply`: ruamel's round trip, through DVC's
own modify_yaml), so its comments and layout stay, and a later change DVC makes to it is still a one-line diff.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .architecture import Architecture
from .errors import PipelineError

# What verification runs a new variant on: the published variants' prompts, which suit the default image (two cats on
# a pink blanket, with two remotes).
DEFAULT_PROMPTS = ("a cat", "a remote", "two cats sitting on a pink blanket")
# The column of the published sections' end-of-line comments.
COMMENT_COLUMN = 27


class ParamsFileError(PipelineError):
    """params.yaml cannot take the new variant."""


def variant_section(
    arch: Architecture, sources: Mapping[str, Mapping[str, Any]], assumed: Sequence[str], prompts: Sequence[str],
    image_size: tuple[int, int],
) -> dict:
    """A complete `models.<name>` section in params.yaml's form, keys in the published sections' order. Its image
    prompt is the middle of the reference image (`image_size`: width, height); no ONNX base model is named (the card
    names one only when it is given)."""
    width, height = image_size
    return {
        "architecture": arch.to_mapping(),
        "sources": {name: dict(source) for name, source in sources.items()},
        "assumed": list(assumed),
        "verify": {"prompts": list(prompts), "image_prompts": [[width // 4, height // 4, 3 * width // 4, 3 * height // 4]]},
        "expected": None,  # no published check values exist for a checkpoint of one's own
        "export": {"dtype": "float32", "synthetic": False},
        "onnx": {"base_model": None},
    }


def add_variant(path: Path, name: str, section: Mapping[str, Any], comment: str) -> None:
    """Add `section` as `models.<name>` (under the comment, after a blank line) and append `name` to `variants`."""
    from dvc.utils.serialize import modify_yaml
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    def commented(value: Any) -> Any:
        if isinstance(value, Mapping):
            return CommentedMap((key, commented(item)) for key, item in value.items())
        if isinstance(value, (list, tuple)):
            return CommentedSeq(commented(item) for item in value)
        return value

    with modify_yaml(path) as data:
        if name in data["models"]:
            raise ParamsFileError(f"{path}: models.{name} exists already; choose another name, or remove that section first")
        new = commented(section)
        new["export"].fa.set_flow_style()  # as the published sections write it: one line for dvc exp show to diff
        new["onnx"].fa.set_flow_style()
        if section["assumed"]:
            new.yaml_add_eol_comment("not in the tensors: the original code's defaults", "assumed", column=COMMENT_COLUMN)
        data["models"][name] = new
        data["models"].yaml_set_comment_before_after_key(name, before="\n" + comment, indent=2)
        if name not in data["variants"]:
            data["variants"].append(name)
