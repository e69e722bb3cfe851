"""Checkpoint tensors in the split the memory engine stores: one dict per layer plus a base dict.

    "model.layers.3.self_attn.q_proj.weight"  ->  layers[3]["self_attn.q_proj.weight"]
    "model.norm.weight"                       ->  base["model.norm.weight"]   (full name kept)

Every layer dict has the same names, shapes and order (the packing order of a slab), so a staging
slot sized for the largest layer holds any layer. The family's shape tables are the contract: a
missing, extra or misshapen tensor is a ValueError naming it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from remap import opaque
from replicas.engine.models import ops
from replicas.engine.models.architecture import architecture_for
from replicas.engine.models.config import ModelConfig

Tensor = torch.Tensor
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old Llama checkpoints saved; recomputed here


def split_state_dict(
    config: ModelConfig, state_dict: Mapping[str, Tensor]
) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """(per-layer tensors with the layer prefix stripped, base tensors with full names)."""
    arch = architecture_for(config)
    tensors = {_canonical(name): t for name, t in state_dict.items()}
    tensors = {n: t for n, t in tensors.items() if not n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # Transformers' state_dict repeats the tied matrix
    layers = [
        {name: _take(tensors, f"{arch.layer_prefix}{i}.{name}", shape) for name, shape in arch.layer_shapes().items()}
        for i in range(config.num_layers)
    ]
    base = {name: _take(tensors, name, shape) for name, shape in arch.base_shapes().items()}
    if tensors:
        raise ValueError(f"{len(tensors)} unexpected tensors for {config.architecture}: {sorted(tensors)[:5]}")
    return layers, base


def blocked_for_cpu(
    config: ModelConfig, layers: list[dict[str, Tensor]], base: dict[str, Tensor]
) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """The split tensors with their large float32 projections fused and blocked for oneDNN
    (ops.blocked): each layer's matrices and the lm_head. A tied lm_head is the token embedding, which
    is then read by rows from the blocked bytes (ops.embedding); it stays plain where ops.blocked_rows
    cannot verify that. Unchanged where remap cannot store the blocked layout (remap.opaque.AVAILABLE).

    Blocked, SmolLM2's and the 100M benchmark Llama's tied heads (a fifth and a quarter of their bytes)
    decode 4-8% faster at 16 rows (scripts/bench_engine.py's model, in-process, untied against tied)."""
    if not opaque.AVAILABLE:
        return layers, base
    arch = architecture_for(config)
    name = arch.embedding if config.tie_word_embeddings else "lm_head.weight"
    head = ops.blocked({name: base[name]})
    if config.tie_word_embeddings and head[name].is_mkldnn and not ops.blocked_rows(base[name], head[name]):
        head = {}
    return [ops.blocked(layer, arch.fused) for layer in layers], base | head


def dummy_weights(config: ModelConfig, seed: int, std: float = 0.2) -> dict[str, Tensor]:
    """A full state dict (Hugging Face names, no tied lm_head) of random weights, deterministic per seed.

    Matrices, embeddings and biases are N(0, std^2); norm weights are 1 + N(0, std^2). The spread is
    what keeps greedy decoding of a tiny test model from collapsing into one repeated token: with
    hidden 64, std 0.1 gave 1-4 distinct tokens out of 20 for Qwen2 and OPT (attention is nearly
    flat), std 0.2 gives 5-19. std is absolute, not scaled by fan-in: for hidden sizes in the
    thousands pass about 1 / sqrt(hidden_size) or activations grow by ~std * sqrt(hidden) per matmul.
    """
    arch = architecture_for(config)
    layer = arch.layer_shapes()
    shapes = {f"{arch.layer_prefix}{i}.{n}": s for i in range(config.num_layers) for n, s in layer.items()}
    shapes |= arch.base_shapes()
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen) * std
        if name.endswith("norm.weight"):
            t += 1.0
        state[name] = t.to(config.dtype)
    return state


def _canonical(name: str) -> str:
    """Accept checkpoints saved from the bare decoder ("decoder.layers.0..." in facebook/opt-*)."""
    return name if name.startswith(("model.", "lm_head.")) else "model." + name


def _take(tensors: dict[str, Tensor], name: str, shape: tuple[int, ...]) -> Tensor:
    t = tensors.pop(name, None)
    if t is None:
        raise ValueError(f"checkpoint lacks tensor {name!r} (shape {list(shape)})")
    if tuple(t.shape) != shape:
        raise ValueError(f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
    return t
