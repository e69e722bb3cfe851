"""Tensor helpers shared by the architectures: projections, norms and activations over weight dicts.

A layer's weights are a flat mapping from Hugging Face names (prefix stripped) to tensors; a bias
that the checkpoint does not have is simply absent, so one `linear` serves every bias flavour.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Weights = Mapping[str, Tensor]
Shapes = dict[str, tuple[int, ...]]  # parameter name -> shape

ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}  # names as in config.json


def linear(x: Tensor, w: Weights, name: str) -> Tensor:
    """x @ W.T + b for the projection `name` ("self_attn.q_proj"); the bias is optional."""
    return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama RMSNorm: normalise in float32, scale in the weights' dtype (as Transformers does)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def layer_norm(x: Tensor, w: Weights, name: str, eps: float) -> Tensor:
    """LayerNorm `name`; weight and bias are absent when the norm has no affine parameters."""
    return F.layer_norm(x, x.shape[-1:], w.get(name + ".weight"), w.get(name + ".bias"), eps)


def proj_shapes(name: str, out_features: int, in_features: int, bias: bool) -> Shapes:
    """Parameter shapes of a linear projection in Hugging Face layout (weight is [out, in])."""
    shapes: Shapes = {name + ".weight": (out_features, in_features)}
    if bias:
        shapes[name + ".bias"] = (out_features,)
    return shapes
