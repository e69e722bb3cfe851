"""The OPT block: learned absolute positions (table offset 2), LayerNorm, ReLU MLP, biases everywhere.

    pre-LN (all OPT sizes but 350m):  h = h + attn(ln1(h));  h = h + fc2(relu(fc1(ln2(h))))
    post-LN (do_layer_norm_before=False):  h = ln1(h + attn(h));  h = ln2(h + fc2(relu(fc1(h))))

OPT has no grouped KV heads, no RoPE and no sliding window; the lm_head is tied to the embeddings.
"""

from __future__ import annotations

import torch

from replicas.engine.models.attention import PagedAttention
from replicas.engine.models.config import OPT_POSITION_OFFSET, ModelConfig
from replicas.engine.models.ops import (
    ACTIVATIONS,
    Shapes,
    Weights,
    embedding,
    layer_norm,
    linear,
    linears,
    proj_shapes,
    project,
)

Tensor = torch.Tensor
_KVQ = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj")  # in packing order (layer_shapes)


class Opt:
    layer_prefix = "model.decoder.layers."
    embedding = "model.decoder.embed_tokens.weight"
    fused = (_KVQ,)

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self._act = ACTIVATIONS[config.hidden_act]

    # ---- parameter names and shapes ------------------------------------------------------
    def layer_shapes(self) -> Shapes:
        c, d = self.config, self.config.hidden_size
        shapes: Shapes = {}
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes |= proj_shapes(f"self_attn.{name}", d, d, c.qkv_bias)
        shapes |= self._norm("self_attn_layer_norm")
        shapes |= proj_shapes("fc1", c.intermediate_size, d, c.mlp_bias)
        shapes |= proj_shapes("fc2", d, c.intermediate_size, c.mlp_bias)
        shapes |= self._norm("final_layer_norm")
        return shapes

    def base_shapes(self) -> Shapes:
        c = self.config
        shapes: Shapes = {
            "model.decoder.embed_tokens.weight": (c.vocab_size, c.hidden_size),
            "model.decoder.embed_positions.weight": (c.max_position_embeddings + OPT_POSITION_OFFSET, c.hidden_size),
        }
        if c.has_final_norm:
            shapes |= self._norm("model.decoder.final_layer_norm")
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        return shapes

    def _norm(self, name: str) -> Shapes:
        d = self.config.hidden_size
        return {name + ".weight": (d,), name + ".bias": (d,)} if self.config.norm_affine else {}

    # ---- forward -------------------------------------------------------------------------
    def embed(self, base: Weights, input_ids: Tensor, positions: Tensor) -> Tensor:
        tokens = embedding(base[self.embedding], input_ids)
        return tokens + base["model.decoder.embed_positions.weight"][positions + OPT_POSITION_OFFSET]

    def prepare(self, positions: Tensor, dtype: torch.dtype) -> None:
        return None  # positions were added once, at the embedding

    def layer(self, index: int, w: Weights, h: Tensor, attend: PagedAttention, _: None) -> Tensor:
        c, rows = self.config, h.shape[0]
        pre = c.do_layer_norm_before
        x = layer_norm(h, w, "self_attn_layer_norm", c.norm_eps) if pre else h
        # packed k, v, q: one matmul where fused or touching (OPT without biases; see ops.linears)
        d = c.hidden_size
        k, v, q = (t.view(rows, -1, c.head_dim) for t in linears(x, w, _KVQ, (d, d, d)))
        h = h + linear(attend(index, q, k, v).reshape(rows, -1), w, "self_attn.out_proj")
        if not pre:
            h = layer_norm(h, w, "self_attn_layer_norm", c.norm_eps)
        x = layer_norm(h, w, "final_layer_norm", c.norm_eps) if pre else h
        h = h + linear(self._act(linear(x, w, "fc1")), w, "fc2")
        return h if pre else layer_norm(h, w, "final_layer_norm", c.norm_eps)

    def head(self, base: Weights, h: Tensor) -> Tensor:
        """Logits (weights' dtype) of the hidden states `h` [rows, hidden]."""
        if self.config.has_final_norm:
            h = layer_norm(h, base, "model.decoder.final_layer_norm", self.config.norm_eps)
        return project(h, base.get("lm_head.weight", base[self.embedding]))

