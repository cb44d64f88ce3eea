"""A GGUF model run by llama.cpp as the frozen backbone of ``fedprompt serve`` (its second engine,
beside transformers): the model owner serves intrinsic prompts on the quantised kernels.

``LlamaCppBackbone`` holds the engine, the tokenizer (the GGUF's, as transformers reads it) and
the input-embedding table (dequantised from the GGUF as llama.cpp's own lookup does), and answers
what the service asks of a backbone: its public facts, its tokenizer and its embedding table.
``LlamaCppIntrinsicClassifier`` scores populations of z the way ``IntrinsicTextClassifier`` does
on transformers: each candidate's prompt A z + p0 before each input's embeddings, the class logits
of a verbaliser head (the mean next-token logit of each class's label words) from the full
next-token logits llama.cpp computes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prompt_modules.base import Batch, PromptModule, population_cross_entropy
from prompt_modules.embedding_table import gguf_embedding_table
from prompt_modules.hf_text import load_tokenizer, special_affixes
from prompt_modules.intrinsic import IntrinsicPrompt
from prompt_modules.llama_cpp_engine import LlamaCppEngine
from prompt_modules.text_classifier import VerbalizerHead


class LlamaCppBackbone:
    """Owns a llama.cpp engine on one GGUF file, its tokenizer and its input-embedding table; the
    facts the inference service publishes (a decoder with an LM head; ``max_length`` tokens an input)."""

    is_decoder = True
    has_lm_head = True

    def __init__(
        self, gguf: str | Path, max_length: int = 64, context_length: int = 512, threads: int | None = None
    ):
        gguf = Path(gguf)
        self.engine = LlamaCppEngine(gguf, context_length=context_length, threads=threads)
        self.tokenizer = load_tokenizer(str(gguf.parent), gguf.name)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.embedding_matrix = gguf_embedding_table(gguf)
        self.max_length = max_length
        self.prefix_special_ids, self.suffix_special_ids = special_affixes(self.tokenizer)
        self.path = gguf

    @property
    def hidden_size(self) -> int:
        return self.engine.hidden_size

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def num_bytes(self) -> int:
        """The GGUF file's size: what the model owner keeps (quantised weights)."""
        return self.path.stat().st_size

    def to(self, device: torch.device | str) -> LlamaCppBackbone:
        if torch.device(device).type != "cpu":
            raise ValueError("the llama-cpp engine computes on the CPU here (--device cpu)")
        return self


class LlamaCppIntrinsicClassifier(PromptModule):
    """An intrinsic prompt z scored by a ``LlamaCppBackbone`` through a verbaliser head (a
    ``PopulationModule``, as the service's transformers classifier)."""

    def __init__(self, backbone: LlamaCppBackbone, prompt: IntrinsicPrompt, head: VerbalizerHead) -> None:
        super().__init__(backbone)
        self.prompt = prompt
        self.head = head

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.population_logits(self.prompt.z.detach()[None], batch)[0]

    @torch.inference_mode()
    def population_logits(self, candidates: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Class logits [P, B, C] under each candidate z of ``candidates`` [P, d]."""
        if candidates.dim() != 2:
            raise ValueError(f"candidates must be [P, d], got shape {tuple(candidates.shape)}")
        prompts = self.prompt.project(candidates.cpu())
        table = self.backbone.embedding_matrix
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        inputs = [table[row[keep]] for row, keep in zip(ids, mask, strict=True)]
        arrays = [embedded.float().contiguous().numpy() for embedded in inputs]
        out = torch.empty(prompts.shape[0], len(inputs), self.num_classes)
        for p, prompt in enumerate(prompts):
            logits = self.backbone.engine.prompted_logits(prompt.float().contiguous().numpy(), arrays)
            out[p] = self.head(torch.from_numpy(np.stack(logits)))
        return out

    def population_losses(self, candidates: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy [P] of each candidate z on the batch."""
        return population_cross_entropy(self.population_logits(candidates, batch), batch["labels"].cpu())
