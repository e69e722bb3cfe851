"""Rotary position embeddings (the half-split "rotate_half" layout Hugging Face Llama weights use).

Frequencies come from the config once; each forward step turns its positions into cos/sin tables
[rows, head_dim] that every layer reuses. Llama 3.1 scaling divides the low frequencies (long
wavelengths) by `factor`, keeps the high ones, and ramps smoothly in between:

    wavelength:   < orig/high_freq_factor  |  ramp  |  > orig/low_freq_factor
    inv_freq:     unchanged                |  mix   |  inv_freq / factor
"""

from __future__ import annotations

import math

import torch

from replicas.engine.models.config import ModelConfig

Tensor = torch.Tensor


def inv_frequencies(config: ModelConfig) -> Tensor:
    """float32 [head_dim / 2] rotation speed of each pair of dimensions."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin [rows, 1, head_dim] for `positions` [rows], computed in float32, cast to `dtype`."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [rows, heads, head_dim] by its rows' positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_rotary_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """apply_rotary to q [rows, heads, dim] and k [rows, kv_heads, dim]; in one pass when k's heads
    follow q's in each row of one buffer (the fused qkv projection's output), else one each."""
    rows, heads, dim = q.shape
    row_stride = q.stride(0)
    joint = (q.stride()[1:] == k.stride()[1:] == (dim, 1) and (k.stride(0) == row_stride or rows == 1)
             and k.data_ptr() == q.data_ptr() + heads * dim * q.element_size())  # one row: any row stride
    if not joint:
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    both = apply_rotary(q.as_strided((rows, heads + k.shape[1], dim), (row_stride, dim, 1)), cos, sin)
    return both[:, :heads], both[:, heads:]
