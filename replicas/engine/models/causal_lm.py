"""CausalLM: one forward step of a decoder-only model whose weights live outside it.

The model holds no tensors. Base tensors (embeddings, final norm, lm_head) come as a mapping; each
layer's tensors come from a `LayerWeights` provider at the moment the loop reaches that layer and
are released right after, so a provider can stream remapped layers through a few staging slots:

    for i in layers:   w = weights.get(i)   ->   h = layer(i, w, h)   ->   weights.release(i)

`release` runs even if the layer raises, so a staging slot is never left held.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from replicas.engine.models.architecture import architecture_for
from replicas.engine.models.attention import DEFAULT_BACKEND, AttentionBatch, plan_attention
from replicas.engine.models.config import ModelConfig

Tensor = torch.Tensor


class LayerWeights(Protocol):
    """Where a forward pass gets each layer's tensors (resident pages, a staging slot, plain dicts)."""

    def get(self, layer: int) -> Mapping[str, Tensor]:
        """Layer `layer`'s tensors by name ("self_attn.q_proj.weight"), ready to compute with."""

    def release(self, layer: int) -> None:
        """The pass is done with `layer`'s tensors (its slot may take the next layer)."""


class ResidentWeights:
    """LayerWeights over tensors that stay in place for the whole pass; release is a no-op."""

    def __init__(self, layers: Sequence[Mapping[str, Tensor]]) -> None:
        self.layers = layers

    def get(self, layer: int) -> Mapping[str, Tensor]:
        return self.layers[layer]

    def release(self, layer: int) -> None:
        pass


class CausalLM:
    def __init__(self, config: ModelConfig, attention_backend: str = DEFAULT_BACKEND) -> None:
        self.config = config
        self.arch = architecture_for(config)
        self.attention_backend = attention_backend  # checked against the KV's device at each step

    def forward(
        self,
        input_ids: Tensor,
        batch: AttentionBatch,
        kv: Tensor,
        weights: LayerWeights,
        base: Mapping[str, Tensor],
        logits_for: Tensor | None = None,
    ) -> Tensor:
        """float32 logits [len(logits_for) or num_seqs, vocab] of one step.

        input_ids: long [batch.num_tokens], every sequence's new tokens, concatenated in batch order;
          their positions follow from the batch (num_cached_tokens onwards), so none are passed.
        kv: the model's KV view [pages, layers, 2, block_size, kv_heads, head_dim] in the weights'
          dtype; this step's K/V are written into it.
        logits_for: rows of the flat batch to compute logits for; default: each sequence's last row.
        """
        self._check(input_ids, batch, kv, base)
        attend = plan_attention(self.attention_backend, batch, kv, self.config.layer_windows,
                                self.config.head_dim**-0.5)
        h = self.arch.embed(base, input_ids, attend.positions)
        step = self.arch.prepare(attend.positions, h.dtype)
        for i in range(self.config.num_layers):
            w = weights.get(i)
            try:
                h = self.arch.layer(i, w, h, attend, step)
            finally:
                weights.release(i)
        if logits_for is None:
            logits_for = attend.last_rows
        return self.arch.head(base, h[logits_for]).float()

    def _check(self, input_ids: Tensor, batch: AttentionBatch, kv: Tensor, base: Mapping[str, Tensor]) -> None:
        c = self.config
        if input_ids.shape != (batch.num_tokens,):
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; the batch has {batch.num_tokens} tokens")
        want = (c.num_layers, 2, c.num_kv_heads, c.head_dim)
        got = (kv.shape[1], kv.shape[2], kv.shape[4], kv.shape[5]) if kv.dim() == 6 else tuple(kv.shape)
        if got != want:
            raise ValueError(f"kv has shape {tuple(kv.shape)}; want [pages, {want[0]}, 2, block, {want[2]}, {want[3]}]")
        dtype = next(iter(base.values())).dtype
        if kv.dtype != dtype:
            raise ValueError(f"kv is {kv.dtype} but the weights are {dtype}")
        longest = max(batch.context_lens(), default=0)
        if longest > c.max_position_embeddings:
            raise ValueError(f"a sequence reaches {longest} tokens; the model allows {c.max_position_embeddings}")
