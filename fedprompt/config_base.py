"""What every configuration section shares: a strict pydantic model and the field types several
sections use. Importable without torch, like every ``config`` module of the packages."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

WireDtype = Literal["float32", "float16", "bfloat16"]


class StrictModel(BaseModel):
    """A configuration section: unknown fields are refused (a typo fails at once, naming the
    fields allowed there), and assignments are validated like the fields' first values."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def fields_off_default(self, exclude: tuple[str, ...] = ()) -> list[str]:
        """The names of the fields whose value differs from their default (a dumped, resolved
        configuration sets every field, so "given" can only mean "not the default")."""
        return [
            name
            for name, field in type(self).model_fields.items()
            if name not in exclude and getattr(self, name) != field.get_default(call_default_factory=True)
        ]
