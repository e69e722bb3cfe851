"""ModelConfig: what the engine needs to know about a checkpoint, parsed once from its config.json.

Two families of decoder-only transformers are supported:

    family  Hugging Face architectures                                   block
    llama   LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM       RMSNorm, RoPE, GQA, SwiGLU
    opt     OPTForCausalLM                                               LayerNorm, learned positions, ReLU

Both the Transformers 4.x layout of config.json (`rope_theta` + `rope_scaling`, `torch_dtype`) and the
5.x layout (`rope_parameters`, `dtype`) are read. Anything the forward pass would get silently wrong
(an unknown architecture, RoPE type or activation, OPT's projected embeddings) raises ValueError here,
at the edge, so a bad checkpoint never reaches a running replica.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from remap.kv import KVGeometry
from replicas.engine.models.ops import ACTIVATIONS

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "OPTForCausalLM": "opt",
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ROPE_TYPES = ("default", "llama3")
OPT_POSITION_OFFSET = 2  # OPT's learned position table starts at row 2 (rows 0-1 are a fairseq leftover)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, a smooth ramp in between."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int  # context length the model was pretrained at, in tokens


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # Hugging Face class name, e.g. "Qwen2ForCausalLM"
    family: str  # "llama" or "opt": which forward pass runs it
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # MLP width (OPT: ffn_dim)
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (< num_heads: grouped-query attention)
    head_dim: int
    max_position_embeddings: int  # longest context, in tokens, the forward pass accepts
    norm_eps: float  # RMSNorm / LayerNorm epsilon
    hidden_act: str  # one of ACTIVATIONS
    dtype: torch.dtype  # dtype of the checkpoint's weights (compute runs in the weights' dtype)
    tie_word_embeddings: bool  # lm_head reuses the input embedding matrix (no lm_head tensor)
    qkv_bias: bool  # q/k/v projections have biases (Qwen2; Llama with attention_bias)
    o_bias: bool  # output projection has a bias (Llama with attention_bias; OPT)
    mlp_bias: bool  # MLP projections have biases (Llama mlp_bias; OPT)
    layer_windows: tuple[int | None, ...]  # per layer: sliding window in tokens, None = full causal attention
    rope_theta: float = 10000.0  # RoPE base (llama family)
    rope_scaling: RopeScaling | None = None  # None = plain RoPE
    do_layer_norm_before: bool = True  # OPT: pre-LN (True) or post-LN (False, opt-350m style)
    has_final_norm: bool = True  # a norm after the last layer (OPT post-LN has none)
    norm_affine: bool = True  # norms carry weight (and LayerNorm bias) tensors
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # any of these ends a sequence

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Parse a Hugging Face config.json dict; ValueError for anything unsupported."""
        arch = _architecture(hf)
        family = ARCHITECTURES[arch]
        common = dict(
            architecture=arch,
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            max_position_embeddings=int(hf["max_position_embeddings"]),
            dtype=_dtype(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_token_ids(hf.get("eos_token_id")),
        )
        extra = _llama_fields(hf, arch) if family == "llama" else _opt_fields(hf)
        config = cls(**common, **extra)
        config._validate()
        return config

    def kv_geometry(self) -> KVGeometry:
        """The memory engine's view of this model's KV cache."""
        return KVGeometry(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    def _validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"activation {self.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(f"{len(self.layer_windows)} layer attention types for {self.num_layers} layers")


_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "opt": "OPTForCausalLM"}  # for config.json files that name no architecture (some converters)


def _architecture(hf: Mapping[str, Any]) -> str:
    archs = hf.get("architectures") or ([_BY_MODEL_TYPE[hf["model_type"]]] if hf.get("model_type") in _BY_MODEL_TYPE
                                        else [])
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {archs or hf.get('model_type')!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    return archs[0]


def _llama_fields(hf: Mapping[str, Any], arch: str) -> dict[str, Any]:
    num_heads = int(hf["num_attention_heads"])
    attention_bias = bool(hf.get("attention_bias", False))
    is_qwen2 = arch == "Qwen2ForCausalLM"
    theta, scaling = _rope(hf)
    return dict(
        intermediate_size=int(hf["intermediate_size"]),
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // num_heads),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        hidden_act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=is_qwen2 or attention_bias,  # Qwen2 always has q/k/v biases and no o_proj bias
        o_bias=not is_qwen2 and attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        layer_windows=_layer_windows(hf, arch),
        rope_theta=theta,
        rope_scaling=scaling,
    )


def _opt_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    hidden, num_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    proj = int(hf.get("word_embed_proj_dim") or hidden)
    if proj != hidden:
        raise ValueError(
            f"OPT with word_embed_proj_dim {proj} != hidden_size {hidden} (project_in/project_out, e.g. "
            "opt-350m) is not supported"
        )
    if hidden % num_heads:
        raise ValueError(f"OPT hidden_size {hidden} is not a multiple of num_attention_heads {num_heads}")
    pre_ln = bool(hf.get("do_layer_norm_before", True))
    bias = bool(hf.get("enable_bias", True))
    return dict(
        intermediate_size=int(hf["ffn_dim"]),
        num_kv_heads=num_heads,
        head_dim=hidden // num_heads,
        norm_eps=1e-5,  # torch.nn.LayerNorm's default; OPT's config does not carry one
        hidden_act=hf.get("activation_function", "relu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        layer_windows=(None,) * int(hf["num_hidden_layers"]),
        do_layer_norm_before=pre_ln,
        has_final_norm=pre_ln and not hf.get("_remove_final_layer_norm", False),
        norm_affine=bool(hf.get("layer_norm_elementwise_affine", True)),
    )


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from either `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        raise ValueError(f"llama3 RoPE scaling lacks {missing}")
    original = params.get("original_max_position_embeddings") or hf["max_position_embeddings"]
    scaling = RopeScaling(
        float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"]), int(original)
    )
    return theta, scaling


def _layer_windows(hf: Mapping[str, Any], arch: str) -> tuple[int | None, ...]:
    """Sliding window per layer, mirroring how Transformers decides which layers slide."""
    num_layers = int(hf["num_hidden_layers"])
    window = hf.get("sliding_window")
    if arch == "MistralForCausalLM":
        return (int(window) if window else None,) * num_layers
    if arch != "Qwen2ForCausalLM" or not hf.get("use_sliding_window", False) or not window:
        return (None,) * num_layers
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= int(hf.get("max_window_layers", 28)) else "full_attention"
        for i in range(num_layers)
    ]
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"weight dtype {name!r} is not supported (supported: {', '.join(_DTYPES)})")
    return _DTYPES[name]


def _token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)
