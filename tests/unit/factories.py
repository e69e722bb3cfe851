"""Small factories for memory-engine tests: pools, random layer tensors, registered models."""

from __future__ import annotations

import torch

from remap import DeviceMemory, KVGeometry, ModelId

PAGE = 4096  # bytes; small pages keep tests fast and make slabs span several pages


def make_layers(num_layers: int = 4, hidden: int = 32, seed: int = 0, dtype=torch.float32):
    """Per-layer tensors with a wide spread (std 0.1) plus a base slab, like a tiny transformer."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).to(dtype)

    layers = [
        {"wq": rand(hidden, hidden), "wo": rand(hidden, hidden), "norm": rand(hidden), "bias": rand(3)}
        for _ in range(num_layers)
    ]
    base = {"embed": rand(64, hidden), "final_norm": rand(hidden)}
    return layers, base


def make_memory(num_pages: int = 64, page_size_bytes: int = PAGE, **kw) -> DeviceMemory:
    return DeviceMemory(num_pages, page_size_bytes, **kw)


def add_model(mem: DeviceMemory, name: str = "m0", num_layers: int = 4, hidden: int = 32, seed: int = 0):
    layers, base = make_layers(num_layers, hidden, seed)
    kv = mem.register_model(ModelId(name), layers, base, KVGeometry(num_layers, 2, 16, torch.float32))
    return kv, layers, base
