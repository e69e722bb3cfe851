"""Architecture: what a model family contributes to the forward pass, and which family runs a config.

A family knows its parameter names and shapes and computes its block from weight dicts handed to
it; it holds no weights. CausalLM owns the loop over layers and where the weights come from.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from replicas.engine.models.attention import PagedAttention
from replicas.engine.models.config import ModelConfig
from replicas.engine.models.llama import Llama
from replicas.engine.models.ops import Shapes, Weights
from replicas.engine.models.opt import Opt

Tensor = torch.Tensor


class Architecture(Protocol):
    config: ModelConfig
    layer_prefix: str  # full-name prefix of layer i's tensors is f"{layer_prefix}{i}."
    fused: tuple[tuple[str, ...], ...]  # projections that read one input (ops.linears, ops.blocked)
    embedding: str  # the token embedding's full name (also the lm_head where tie_word_embeddings)

    def layer_shapes(self) -> Shapes:
        """Name (prefix stripped) -> shape of every tensor of one layer, in packing order."""

    def base_shapes(self) -> Shapes:
        """Full name -> shape of every non-layer tensor (embeddings, final norm, untied lm_head)."""

    def embed(self, base: Weights, input_ids: Tensor, positions: Tensor) -> Tensor:
        """Hidden states [rows, hidden] of the step's tokens."""

    def prepare(self, positions: Tensor, dtype: torch.dtype) -> Any:
        """Per-step tensors every layer reuses (RoPE tables); passed back to `layer`."""

    def layer(self, index: int, w: Weights, h: Tensor, attend: PagedAttention, step: Any) -> Tensor:
        """Layer `index` applied to h [rows, hidden], with its weights `w`."""

    def head(self, base: Weights, h: Tensor) -> Tensor:
        """Logits of final hidden states h [rows, hidden] (final norm + lm_head)."""


_FAMILIES: dict[str, type] = {"llama": Llama, "opt": Opt}


def architecture_for(config: ModelConfig) -> Architecture:
    return _FAMILIES[config.family](config)
