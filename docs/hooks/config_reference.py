"""MkDocs hook: the configuration reference, generated from the pydantic models at build time.

`docs/configuration.md` holds a marker line; this hook replaces it with Markdown tables made
from `fedprompt.config.RunConfig`, walked recursively through `model_fields`: one section per
top-level field, one table per kind of a tagged union (the `kind` field), nested models as
subsections, with each field's type, allowed values, default and description, and each class's
docstring. Nothing here is written by hand, so the reference cannot drift from the code.

It relies only on `from fedprompt.config import RunConfig` and pydantic's public API
(`model_fields`, `FieldInfo.annotation/description/default/default_factory/metadata/discriminator`):
the modules behind `fedprompt.config` may move without this file changing.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, Union, get_args, get_origin

MARKER = "<!-- config-reference -->"
HEADING_LEVEL = 3  # top-level sections are h3, under the page's "Reference" heading
_REPO = Path(__file__).resolve().parents[2]
_DOUBLE_BACKTICKS = re.compile(r"``([^`]+)``")


# --------------------------------------------------------------------------- MkDocs entry points


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill the marker of the page that asks for the reference (docs/configuration.md)."""
    if MARKER not in markdown:
        return markdown
    root = load_run_config()
    reference = render_reference(root)
    missing = [f"`{name}`" for name in root.model_fields if f"`{name}`" not in reference]
    missing += [f"{path}: {kind}" for path, kind in iter_kinds(root) if f"`{kind}`" not in reference]
    if missing:  # a kind the walk did not reach: fail rather than publish a partial reference
        from mkdocs.exceptions import PluginError

        raise PluginError(f"the configuration reference leaves out {', '.join(missing)}")
    return markdown.replace(MARKER, reference)


def load_run_config() -> type:
    """`fedprompt.config.RunConfig` of the checkout being built (the installed package otherwise)."""
    if (_REPO / "fedprompt" / "config.py").is_file() and str(_REPO) not in sys.path:
        sys.path.insert(0, str(_REPO))  # document this checkout's code, whatever else is installed
    try:
        module = importlib.import_module("fedprompt.config")
    except ImportError as exc:  # fail the build: an empty reference must never be published
        from mkdocs.exceptions import PluginError

        raise PluginError(
            f"the configuration reference needs fedprompt.config ({exc}); "
            'run `pip install -e ".[docs]"` in the repository'
        ) from exc
    return module.RunConfig


# --------------------------------------------------------------------------- reading annotations


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and hasattr(tp, "model_fields")


def _strip_annotated(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _union_members(tp: Any) -> list[Any]:
    """The members of a union (nested unions flattened), or [tp]."""
    tp = _strip_annotated(tp)
    if get_origin(tp) in (Union, types.UnionType):
        members: list[Any] = []
        for arg in get_args(tp):
            members.extend(_union_members(arg))
        return members
    return [tp]


@dataclass
class Shape:
    """What a field holds, as the reference presents it."""

    models: list[type]  # the models it may hold directly (one: a nested section; several: a tagged union)
    nullable: bool
    discriminator: str


def _models_in(tp: Any) -> list[type]:
    """The models a type holds: itself, a union's members, or the items of a list, tuple or mapping."""
    tp = _strip_annotated(tp)
    if _is_model(tp):
        return [tp]
    models: list[type] = []
    for arg in get_args(tp) if get_origin(tp) is not Literal else ():
        models.extend(m for m in _models_in(arg) if m not in models)
    return models


def field_shape(info: Any) -> Shape:
    members = _union_members(info.annotation)
    models = _models_in(info.annotation)
    discriminator = info.discriminator if isinstance(getattr(info, "discriminator", None), str) else "kind"
    return Shape(models=models, nullable=type(None) in members, discriminator=discriminator)


def kinds_of(model: type, discriminator: str = "kind") -> list[str]:
    """The values of a model's discriminator (several for one class that serves several kinds)."""
    info = model.model_fields.get(discriminator)
    if info is None:
        return []
    tp = _strip_annotated(info.annotation)
    if get_origin(tp) is Literal:
        return [str(value) for value in get_args(tp)]
    return [str(info.default)] if isinstance(info.default, str) else []


def type_text(tp: Any) -> str:
    """A reader's name for a type: `int`, `list of str`, one of `a`, `b`, a section, ..."""
    tp = _strip_annotated(tp)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [m for m in get_args(tp) if m is not type(None)]
        text = " or ".join(type_text(m) for m in members)
        return text + (" or null" if len(members) < len(get_args(tp)) else "")
    if origin is Literal:
        return "one of " + ", ".join(f"`{_scalar(v)}`" for v in get_args(tp))
    if origin in (list, set, frozenset) or (origin is not None and str(origin).endswith("Sequence")):
        (item,) = get_args(tp) or (Any,)
        return f"list of {type_text(item)}"
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_text(args[0])}"
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict or (origin is not None and str(origin).endswith("Mapping")):
        key, value = get_args(tp) or (Any, Any)
        if value is Any:
            return "mapping"
        return f"mapping of {type_text(key)} to {type_text(value)}"
    if tp is Any:
        return "any"
    if _is_model(tp):
        return "section"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(f"`{member.value}`" for member in tp)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return "`path`"
    if isinstance(tp, type):
        return f"`{tp.__name__}`"
    return f"`{tp}`"


def constraints_text(info: Any) -> str:
    """ge/gt/le/lt, lengths and patterns from the field's metadata, e.g. '≥ 1, ≤ 1024'."""
    parts: list[str] = []
    for item in info.metadata:
        for attribute, symbol in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            value = getattr(item, attribute, None)
            if value is not None:
                parts.append(f"{symbol} {_number(value)}")
        if getattr(item, "multiple_of", None) is not None:
            parts.append(f"a multiple of {_number(item.multiple_of)}")
        if getattr(item, "min_length", None) is not None:
            parts.append(f"at least {item.min_length} long")
        if getattr(item, "max_length", None) is not None:
            parts.append(f"at most {item.max_length} long")
        if getattr(item, "pattern", None):
            parts.append(f"matches `{item.pattern}`")
    return ", ".join(parts)


# --------------------------------------------------------------------------- values and text


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value)) if abs(value) >= 1e6 else repr(value)
    return repr(value) if isinstance(value, float) else str(value)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float)):
        return _number(value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def default_text(info: Any, shape: Shape) -> str:
    """The field's default as YAML would write it ('required' when it has none)."""
    if info.default_factory is not None:
        try:
            value = info.default_factory()
        except TypeError:  # a factory that needs the validated data
            return "computed"
    else:
        value = info.default
        if type(value).__name__ == "PydanticUndefinedType":
            return "required"
    if _is_model(type(value)):
        kind = getattr(value, shape.discriminator, None)
        return f"kind `{kind}`" if len(shape.models) > 1 and kind is not None else "its defaults"
    return _yaml(value)


def _yaml(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(_scalar(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items()) + "}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value == "" or value.strip() != value else f"`{value}`"
    if isinstance(value, PurePath):
        return f"`{value}`"
    return f"`{_scalar(value)}`"


def cell(text: str) -> str:
    """Text made safe for one table cell: one line; pipes, < and > escaped outside code spans."""
    text = " ".join(text.split())
    pieces = text.split("`")
    for index in range(0, len(pieces), 2):  # outside code spans (inside, MkDocs keeps | and < as they are)
        pieces[index] = pieces[index].replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return "`".join(pieces)


def docstring(model: type) -> str:
    """The class's own docstring (not an inherited one), with ``rst`` literals as Markdown code."""
    doc = model.__dict__.get("__doc__")
    if not doc:
        return ""
    text = _DOUBLE_BACKTICKS.sub(r"`\1`", inspect.cleandoc(doc))
    pieces = text.split("`")
    for index in range(0, len(pieces), 2):  # outside code spans
        pieces[index] = pieces[index].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(pieces)


def slug(path: str) -> str:
    return "cfg-" + re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")


# --------------------------------------------------------------------------- rendering


@dataclass
class Target:
    """Where a section (or a tagged union of sections) is documented."""

    anchor: str
    label: str


class Renderer:
    """Walks the models once, in field order. A model (or union of models) met a second time, e.g.
    the CoOp context inside a twin prompt, links to the table where it first appeared."""

    def __init__(self, level: int) -> None:
        self.level = level  # the heading level of the top-level sections
        self.documented: dict[tuple[type, ...], Target] = {}

    def render(self, root: type) -> str:
        lines = ["#" * self.level + " Top level { #cfg-top-level }", ""]
        intro = docstring(root)
        if intro:
            lines += [intro, ""]
        claimed = self._claim(root, "", root.model_fields)
        others = [name for name in root.model_fields if name not in claimed]  # scalars, and links
        lines += self._table(root, "", others)
        lines.append("")
        for name, (info, shape) in claimed.items():
            lines += self._field(name, info, shape, level=self.level)
        return "\n".join(lines).rstrip() + "\n"

    def _claim(self, model: type, path: str, names: Any) -> dict[str, tuple[Any, Shape]]:
        """The section fields of `model` documented under it (the others link to earlier tables)."""
        claimed: dict[str, tuple[Any, Shape]] = {}
        for name in names:
            info = model.model_fields[name]
            shape = field_shape(info)
            key = tuple(shape.models)
            if not shape.models or key in self.documented:
                continue
            full = f"{path}.{name}" if path else name
            self.documented[key] = Target(slug(full), f"`{full}`")
            if len(shape.models) > 1:  # each member's own table, so later fields can link to it
                for member in shape.models:
                    kinds = kinds_of(member, shape.discriminator)
                    first = kinds[0] if kinds else member.__name__
                    target = Target(slug(f"{full}-{first}"), f"`{full}` kind `{first}`")
                    self.documented.setdefault((member,), target)
            claimed[name] = (info, shape)
        return claimed

    def _field(self, path: str, info: Any, shape: Shape, level: int) -> list[str]:
        """The heading(s) and table(s) of a field that holds a section or a tagged union of sections."""
        if len(shape.models) == 1:
            section = Section(path, shape.models[0], level, kinds=[], nullable=shape.nullable)
            return self._section(section, description=info.description)
        heading = "#" * min(level, 6)
        default_kind = _default_kind(info, shape)
        members = []
        for model in shape.models:
            kinds = kinds_of(model, shape.discriminator)
            anchor = slug(f"{path}-{kinds[0] if kinds else model.__name__}")
            members.append((model, kinds, anchor))
        choices = ", ".join(f"[`{kind}`](#{anchor})" for _, kinds, anchor in members for kind in kinds)
        text = (info.description + " ") if info.description else ""
        text += f"A tagged union: `{shape.discriminator}` picks one of {choices}"
        if default_kind:
            text += f"; a section given without `{shape.discriminator}` is `{default_kind}`."
        else:
            text += "."
        if shape.nullable:
            text += " It may also be `null`."
        lines = [f"{heading} `{path}` {{ #{slug(path)} }}", "", cell(text), ""]
        for model, kinds, _ in members:
            section = Section(
                path,
                model,
                level + 1,
                kinds=kinds,
                default_kind=default_kind in kinds,
                discriminator=shape.discriminator,
            )
            lines += self._section(section)
        return lines

    def _section(self, section: Section, description: str | None = None) -> list[str]:
        model, path = section.model, section.path
        heading = "#" * min(section.level, 6)
        if section.kinds:
            title = f"`{path}` kind " + ", ".join(f"`{k}`" for k in section.kinds)
            anchor = slug(f"{path}-{section.kinds[0]}")
        else:
            title, anchor = f"`{path}`", slug(path)
        lines = [f"{heading} {title} {{ #{anchor} }}", ""]
        doc = docstring(model)
        if doc:
            lines += [doc, ""]
        notes = []
        if section.default_kind:
            notes.append("The default kind.")
        if section.nullable:
            notes.append("Optional: `null` leaves it out.")
        if description:
            notes.append(cell(description))
        if notes:
            lines += [" ".join(notes), ""]
        skip = section.discriminator if section.kinds else None
        names = [name for name in model.model_fields if name != skip]
        claimed = self._claim(model, path, names)
        if names:
            lines += self._table(model, path, names)
        else:
            lines.append("No fields besides its kind.")
        lines.append("")
        for name, (info, shape) in claimed.items():
            lines += self._field(f"{path}.{name}", info, shape, section.level + 1)
        return lines

    def _table(self, model: type, path: str, names: list[str]) -> list[str]:
        lines = ["| field | type and allowed values | default | description |", "| --- | --- | --- | --- |"]
        for name in names:
            info = model.model_fields[name]
            shape = field_shape(info)
            if shape.models:
                target = self.documented[tuple(shape.models)]
                full = f"{path}.{name}" if path else name
                what = {"list": "a list of sections", "mapping": "a mapping of names to sections"}.get(
                    _container(info.annotation), "a section"
                )
                if len(shape.models) > 1:
                    what = "one of several sections"
                relation = "see" if target.anchor == slug(full) else "the fields of"
                type_cell = f"{what}, {relation} [{target.label}](#{target.anchor})"
                if shape.nullable:
                    type_cell += ", or null"
            else:
                type_cell = type_text(info.annotation)
                limits = constraints_text(info)
                if limits:
                    type_cell += f"; {limits}"
            default = default_text(info, shape)
            row = [f"`{name}`", cell(type_cell), cell(default), cell(info.description or "")]
            lines.append("| " + " | ".join(row) + " |")
        return lines


@dataclass
class Section:
    """One table: the fields of `model` found at `path` (e.g. prompt.text), for `kinds` if tagged."""

    path: str
    model: type
    level: int
    kinds: list[str]
    default_kind: bool = False
    nullable: bool = False
    discriminator: str = "kind"


def render_reference(root: type, level: int = HEADING_LEVEL) -> str:
    return Renderer(level).render(root)


def _default_kind(info: Any, shape: Shape) -> str | None:
    if info.default_factory is None:
        value = info.default
    else:
        try:
            value = info.default_factory()
        except TypeError:
            return None
    kind = getattr(value, shape.discriminator, None)
    return str(kind) if kind is not None else None


def _container(annotation: Any) -> str | None:
    """'list' or 'mapping' when the field holds its sections in one, else None."""
    for member in _union_members(annotation):
        origin = get_origin(_strip_annotated(member))
        if origin in (list, tuple, set, frozenset):
            return "list"
        if origin is dict:
            return "mapping"
    return None


def iter_kinds(root: type) -> Iterator[tuple[str, str]]:
    """(path, kind) for every tagged union reachable from `root` (used by the checks of this page)."""

    def walk(model: type, path: str, seen: tuple[type, ...]) -> Iterator[tuple[str, str]]:
        for name, info in model.model_fields.items():
            shape = field_shape(info)
            full = f"{path}.{name}" if path else name
            if len(shape.models) > 1:
                for member in shape.models:
                    for kind in kinds_of(member, shape.discriminator):
                        yield full, kind
            for member in shape.models:
                if member not in seen:
                    yield from walk(member, full, (*seen, member))

    yield from walk(root, "", (root,))


if __name__ == "__main__":  # python docs/hooks/config_reference.py: print the generated Markdown
    print(render_reference(load_run_config()))
