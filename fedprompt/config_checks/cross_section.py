"""``CrossSectionChecks``, which ``RunConfig`` (``fedprompt.config``) inherits: it runs the checks of
one section against another (``rounds``, ``privacy``, ``local_training``, ``task_parts``) in a fixed
order once every section is valid, so a configuration that breaks several gets the same first error
every time. Each check raises ``ValueError`` naming the fields and the fix, which pydantic reports as
the configuration's error before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self

from pydantic import model_validator

from fedprompt.config_base import StrictModel
from fedprompt.config_checks import local_training, privacy, rounds, task_parts

CHECKS: tuple[Callable[[Any], None], ...] = (
    rounds.round_sizes_fit,
    privacy.secure_aggregation_fits,
    local_training.personal_fits,
    local_training.gradient_steps_fit,
    local_training.zoo_pfl_fits,
    task_parts.few_shot_fits,
    rounds.acceptance_fits,
    privacy.drift_state_unclipped,
    privacy.privacy_fits,
    task_parts.parts_fit_the_backbone,
    task_parts.clip_class_sets,
    task_parts.language_model_fits,
    task_parts.domains_fit,
    local_training.black_box_fits,
    local_training.head_pull_fits,
)
"""The cross-section checks in the order they run; the first to fail is the error reported."""


class CrossSectionChecks(StrictModel):
    """The cross-section checks ``RunConfig`` inherits; it owns no field (``RunConfig`` declares the
    sections these read)."""

    @model_validator(mode="after")
    def _sections_fit_each_other(self) -> Self:
        for check in CHECKS:
            check(self)
        return self

    def paper_departures(self) -> list[str]:
        """The settings given explicitly that depart from the strategy's paper (its
        ``optimizer_defaults``), one sentence each, which a run states at start and records."""
        return local_training.paper_departures(self)
