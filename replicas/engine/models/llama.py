"""The Llama block (also Mistral and Qwen2): pre-RMSNorm, rotary attention with grouped KV heads, SwiGLU.

    h = h + o_proj(attention(rope(q_proj(x)), rope(k_proj(x)), v_proj(x)))   x = input_layernorm(h)
    h = h + down_proj(silu(gate_proj(x)) * up_proj(x))                        x = post_attention_layernorm(h)

Mistral differs only by its sliding window and Qwen2 by its q/k/v biases; both are config flags
(see ModelConfig.layer_windows, qkv_bias), so one block serves all three.

q/k/v and gate/up run as one matmul each where their weights are fused (ops.blocked, for large
float32 weights on the CPU) or touch in the slab (ops.linears): Llama and Mistral without biases; in
Qwen2 each bias is packed after its weight, so its q/k/v run one by one unless blocked (packing the
weights first would fuse them, but `layer_shapes` order is also the order dummy_weights draws in, so
that change would change every test model's weights).
"""

from __future__ import annotations

import torch

from replicas.engine.models.attention import PagedAttention
from replicas.engine.models.config import ModelConfig
from replicas.engine.models.ops import (
    ACTIVATIONS,
    Shapes,
    Weights,
    embedding,
    linear,
    linears,
    proj_shapes,
    project,
    rms_norm,
)
from replicas.engine.models.rope import apply_rotary_qk, cos_sin, inv_frequencies

Tensor = torch.Tensor
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


class Llama:
    layer_prefix = "model.layers."
    fused = (_QKV, _GATE_UP)
    embedding = "model.embed_tokens.weight"

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        kv = config.num_kv_heads * config.head_dim
        self._qkv_sizes = (config.num_heads * config.head_dim, kv, kv)
        self._gate_up_sizes = (config.intermediate_size, config.intermediate_size)
        self._inv_freq = inv_frequencies(config)
        self._act = ACTIVATIONS[config.hidden_act]

    # ---- parameter names and shapes ------------------------------------------------------
    def layer_shapes(self) -> Shapes:
        c = self.config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        shapes: Shapes = {"input_layernorm.weight": (c.hidden_size,)}
        shapes |= proj_shapes("self_attn.q_proj", q, c.hidden_size, c.qkv_bias)
        shapes |= proj_shapes("self_attn.k_proj", kv, c.hidden_size, c.qkv_bias)
        shapes |= proj_shapes("self_attn.v_proj", kv, c.hidden_size, c.qkv_bias)
        shapes |= proj_shapes("self_attn.o_proj", c.hidden_size, q, c.o_bias)
        shapes["post_attention_layernorm.weight"] = (c.hidden_size,)
        shapes |= proj_shapes("mlp.gate_proj", c.intermediate_size, c.hidden_size, c.mlp_bias)
        shapes |= proj_shapes("mlp.up_proj", c.intermediate_size, c.hidden_size, c.mlp_bias)
        shapes |= proj_shapes("mlp.down_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        return shapes

    def base_shapes(self) -> Shapes:
        c = self.config
        shapes: Shapes = {
            "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
            "model.norm.weight": (c.hidden_size,),
        }
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        return shapes

    # ---- forward -------------------------------------------------------------------------
    def embed(self, base: Weights, input_ids: Tensor, positions: Tensor) -> Tensor:
        return embedding(base[self.embedding], input_ids)

    def prepare(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """RoPE cos/sin for this step's rows, shared by every layer."""
        return cos_sin(self._inv_freq, positions, dtype)

    def layer(self, index: int, w: Weights, h: Tensor, attend: PagedAttention, rope: tuple[Tensor, Tensor]) -> Tensor:
        c, rows = self.config, h.shape[0]
        x = rms_norm(h, w["input_layernorm.weight"], c.norm_eps)
        q, k, v = linears(x, w, _QKV, self._qkv_sizes)  # one matmul (ops.linears)
        q, k = apply_rotary_qk(q.view(rows, c.num_heads, c.head_dim), k.view(rows, c.num_kv_heads, c.head_dim), *rope)
        # in place on fresh outputs (the same sums and products): a prefill's temporaries are tens of
        # MB, and on the CPU each new one costs its page faults
        h = linear(attend(index, q, k, v.view(rows, c.num_kv_heads, c.head_dim)).reshape(rows, -1), w,
                   "self_attn.o_proj").add_(h)
        x = rms_norm(h, w["post_attention_layernorm.weight"], c.norm_eps)
        gate, up = linears(x, w, _GATE_UP, self._gate_up_sizes)
        return linear(self._act(gate).mul_(up), w, "mlp.down_proj").add_(h)

    def head(self, base: Weights, h: Tensor) -> Tensor:
        """Logits (weights' dtype) of the hidden states `h` [rows, hidden]."""
        x = rms_norm(h, base["model.norm.weight"], self.config.norm_eps)
        return project(x, base.get("lm_head.weight", base[self.embedding]))

