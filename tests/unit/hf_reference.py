"""Tiny Hugging Face configs of every supported architecture, and the Transformers reference model.

Shared by the model tests and the engine tests: both compare greedy output with `generate` on the
same weights (float32, eager attention).
"""

from __future__ import annotations

import torch
import transformers

_COMMON = dict(vocab_size=112, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
_LLAMA = dict(intermediate_size=128, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
              hidden_act="silu", tie_word_embeddings=False)
_KINDS = {
    "llama_gqa": dict(_LLAMA, architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=3),
    "llama3_rope": dict(
        _LLAMA, architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
    ),
    "mistral_window": dict(_LLAMA, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=8),
    "qwen2_tied": dict(_LLAMA, architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True),
    "opt": dict(architectures=["OPTForCausalLM"], model_type="opt", ffn_dim=128, word_embed_proj_dim=64,
                do_layer_norm_before=True, activation_function="relu", enable_bias=True),
    "opt_post_ln": dict(architectures=["OPTForCausalLM"], model_type="opt", ffn_dim=128, word_embed_proj_dim=64,
                        do_layer_norm_before=False, activation_function="relu"),
}
KINDS = sorted(_KINDS)


def make_config(kind: str, **overrides) -> dict:
    """A Hugging Face config.json dict of a tiny model of this kind."""
    return {**_COMMON, **_KINDS[kind], **overrides}


def make_hf_model(hf_config: dict, state: dict[str, torch.Tensor]):
    """The Transformers reference with exactly these weights (eager attention, float32, eval)."""
    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(hf_config["model_type"], **fields)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    full = dict(state)
    if config.tie_word_embeddings:
        full["lm_head.weight"] = next(t for n, t in state.items() if n.endswith("embed_tokens.weight"))
    model.load_state_dict(full, strict=True)
    model.generation_config.eos_token_id = None  # always generate NUM_NEW tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def hf_greedy(hf_model, prompt: list[int], num_new: int) -> list[int]:
    """Greedy continuation of `prompt` by the reference, exactly num_new tokens."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=num_new, min_new_tokens=num_new,
                                do_sample=False)
    return out[0, len(prompt) :].tolist()
