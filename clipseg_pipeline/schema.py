"""Checks for hand-written settings (params.yaml, an architecture): mappings with exactly the allowed keys, values of
the right kind and range. A failure is a SchemaError naming the dotted key; the caller says which file it is in."""

from __future__ import annotations

from typing import Any

from .errors import PipelineError

TOP_LEVEL = "(top level)"  # how messages name a file's outermost mapping


class SchemaError(PipelineError):
    """A setting is missing, unknown, or of the wrong kind or range."""


def check_mapping(data: Any, where: str, required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict:
    """`data` as a mapping with exactly the allowed keys, each of the right kind."""
    optional = optional or {}
    if not isinstance(data, dict):
        raise SchemaError(f"`{where}` must be a mapping, found {type(data).__name__}")
    allowed = {**required, **optional}
    unknown = sorted(set(data) - set(allowed), key=str)
    if unknown:
        raise SchemaError(f"unknown key(s) {unknown} in `{where}`; allowed: {sorted(allowed)}")
    missing = sorted(set(required) - set(data))
    if missing:
        raise SchemaError(f"`{where}` lacks {missing}")
    for key, kind in allowed.items():
        if key in data and not is_kind(data[key], kind):
            name = key if where == TOP_LEVEL else f"{where}.{key}"
            raise SchemaError(f"`{name}` must be {kind_name(kind)}, found {data[key]!r} ({type(data[key]).__name__})")
    return data


def is_kind(value: Any, kind: Any) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(kind, tuple):
        return any(is_kind(value, k) for k in kind)
    if kind is None:
        return value is None
    return isinstance(value, kind)


def kind_name(kind: Any) -> str:
    if isinstance(kind, tuple):
        return " or ".join(kind_name(k) for k in kind)
    return {None: "null", float: "a number", int: "an integer", str: "a string", bool: "true/false", list: "a list",
            dict: "a mapping"}[kind]


def at_least(value: float, minimum: float, where: str, what: str = "") -> None:
    if value < minimum:
        bound = {0: "0 or more", 1: "1 or more"}.get(minimum, f"at least {minimum}")
        raise SchemaError(f"`{where}` must be {what or bound}, found {value!r}")
