"""What the CLIP prompt modules share: per-part optimiser settings and a memo of text features."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn


def checked_part_settings(
    part_settings: Mapping[str, Mapping[str, float]] | None, parts: Sequence[str]
) -> dict[str, dict[str, float]]:
    """``part_settings`` as plain dicts, refusing parts the module does not have."""
    unknown = sorted(set(part_settings or {}) - set(parts))
    if unknown:
        raise ValueError(f"part_settings has unknown parts {unknown}; the parts are {list(parts)}")
    return {part: dict(values) for part, values in (part_settings or {}).items()}


def part_param_groups(
    members: Mapping[str, Iterable[nn.Module]], settings: Mapping[str, Mapping[str, float]]
) -> list[dict[str, Any]]:
    """One optimiser parameter group per part that has trainable parameters, with its settings."""
    groups = []
    for part, modules in members.items():
        params = [p for module in modules for p in module.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, **settings.get(part, {})})
    return groups


class FeatureMemo:
    """Owns the last features computed without gradients and the key they were computed for (the
    parameters' identities and versions, the device, ...): reused while the key holds, never kept
    when gradients are on."""

    def __init__(self) -> None:
        self._entry: tuple[Any, torch.Tensor] | None = None

    def get(self, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if torch.is_grad_enabled():
            self._entry = None
            return compute()
        if self._entry is None or self._entry[0] != key:
            self._entry = (key, compute())
        return self._entry[1]
