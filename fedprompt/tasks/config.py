"""Settings every task builder shares: how a prompt of token vectors starts (text soft and deep
prompts, CLIP context). The kinds themselves live in ``tasks.text.config`` and ``tasks.clip.config``;
``fedprompt.config`` joins them into the ``backbone`` and ``prompt`` sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedprompt.config_base import StrictModel


class PromptInitConfig(StrictModel):
    """How a prompt of ``num_tokens`` vectors starts: from a phrase's token embeddings, sampled
    vocabulary embeddings, or N(0, init_std²)."""

    num_tokens: int = Field(8, ge=1, le=1024)
    init: Literal["text", "vocab", "random"] = "vocab"
    init_text: str | None = Field(
        None, description="Phrase whose token embeddings start the prompt (init: text)."
    )
    init_std: float = Field(0.02, gt=0, description="Standard deviation of a random init.")

    @model_validator(mode="after")
    def _text_init_needs_text(self) -> PromptInitConfig:
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs `init_text`, the phrase whose embeddings start the prompt")
        return self
