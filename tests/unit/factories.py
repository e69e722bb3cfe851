"""Small factories for memory-engine tests: pools, random layer tensors, registered models."""

from __future__ import annotations

import mmap
import os

import pytest
import torch

from remap import DeviceMemory, KVGeometry, ModelId, make_backend

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


def host_vmm_skip_reason(page_size_bytes: int = PAGE) -> str | None:
    """The host VMM backend maps whole OS pages (64 KiB on some ARM hosts) with Linux's memfd."""
    if page_size_bytes % mmap.PAGESIZE or not hasattr(os, "memfd_create"):
        return f"host vmm needs Linux and pages of a multiple of {mmap.PAGESIZE} B; this test uses {page_size_bytes} B"
    return None


def needs_host_vmm(page_size_bytes: int = PAGE):
    """Test mark: skip where the host VMM backend cannot run pages of this size."""
    reason = host_vmm_skip_reason(page_size_bytes)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def skip_unless_host_vmm(page_size_bytes: int = PAGE) -> None:
    reason = host_vmm_skip_reason(page_size_bytes)
    if reason:
        pytest.skip(reason)


def make_memory(num_pages: int = 64, page_size_bytes: int = PAGE, backend: str = "arena", **kw) -> DeviceMemory:
    """A DeviceMemory over an `arena` or `vmm` backend (remap.make_backend) on kw's device (cpu)."""
    device = kw.pop("device", "cpu")
    if backend == "vmm" and torch.device(device).type == "cpu":
        skip_unless_host_vmm(page_size_bytes)
    return DeviceMemory(num_pages, page_size_bytes, device,
                        backend=make_backend(backend, num_pages, page_size_bytes, device), **kw)


def add_model(mem: DeviceMemory, name: str = "m0", num_layers: int = 4, hidden: int = 32, seed: int = 0):
    layers, base = make_layers(num_layers, hidden, seed)
    kv = mem.register_model(ModelId(name), layers, base, KVGeometry(num_layers, 2, 16, torch.float32))
    return kv, layers, base
