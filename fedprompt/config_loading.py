"""Configurations as users write them: YAML files, ``key=value`` overrides, and pydantic's
validation errors turned into one line per field (naming the fields allowed where a name is
unknown). Generic over the root model, so an app's own configuration reads the same way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fedprompt.errors import ConfigError


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML (numbers, booleans, lists)."""
    out = yaml.safe_load(yaml.safe_dump(raw, sort_keys=False))  # deep copy of plain data, order kept
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. federation.rounds=3)")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: not valid YAML: {yaml_problem(exc)}") from None
    return out


def format_validation_error(error: ValidationError, root: type[BaseModel]) -> str:
    """A pydantic error as ``invalid configuration: <field>: <problem>`` lines; an unknown field's
    line lists the fields allowed there, found by walking ``root`` (the model validated)."""
    lines = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "is not a known field" + _allowed_fields_hint(err["loc"], root)
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
        lines.append(f"{where or '<root>'}: {msg}")
    if len(lines) == 1:
        return f"invalid configuration: {lines[0]}"
    return "invalid configuration:\n" + "\n".join(f"  {line}" for line in lines)


def _allowed_fields_hint(loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    """Walk an error location through the models (and tagged unions) to list the allowed fields."""
    model = root
    parts = list(loc[:-1])
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            return ""
        annotation = field.annotation
        if getattr(annotation, "__origin__", None) is dict and parts:  # a mapping: the next part is a key
            annotation = annotation.__args__[1]
            parts.pop(0)
        members = _models_in(annotation)
        if len(members) > 1 and parts:  # tagged union: the next location part is the tag
            tag = parts.pop(0)
            members = [m for m in members if tag in _models_in_kind(m)]
        if len(members) != 1:
            return ""
        model = members[0]
    return "; allowed: " + ", ".join(model.model_fields)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    args = getattr(annotation, "__args__", (annotation,))
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _models_in_kind(model: type[BaseModel]) -> tuple[Any, ...]:
    kind = model.model_fields.get("kind")
    return getattr(kind.annotation, "__args__", ()) if kind is not None else ()


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML parse error on one line: where, and what the parser expected there."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return " ".join(str(error).split())
    mark = error.context_mark or error.problem_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    parts = [part for part in (error.context, error.problem) if part]
    return where + ": ".join(parts)
