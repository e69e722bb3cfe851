"""DeviceProfile: the few numbers of an accelerator (and its host link) the cost model needs.

Presets are datasheet numbers (dense, no sparsity, in the dtype the paper's models run: BF16/FP16)
except the host links, where the measured number is what matters: the Oneiros paper measured
~427 GB/s host->device over GH200's NVLink-C2C and ~55 GB/s over PCIe Gen5 x16 (H100). `cpu_profile()`
measures this machine instead, so a sim run can be compared with a real CPU run of the same engine.

"mixed" is the host->device rate while device->host traffic flows at the same time (swap-out during
restores / streaming). PCIe and C2C are full duplex, so it is close to the one-way rate; the preset
values below assume a 10% loss (an assumption, not a measurement) until a GPU run measures them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

GB = 1e9


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    peak_flops: float  # dense matmul FLOP/s in the model dtype (BF16/FP16 on GPUs)
    hbm_bytes_per_s: float  # device memory bandwidth
    link_bytes_per_s: float  # host->device, one way, nothing else on the link
    link_mixed_bytes_per_s: float  # host->device while device->host copies run too
    memory_bytes: int  # device memory

    def __post_init__(self) -> None:
        for name in ("peak_flops", "hbm_bytes_per_s", "link_bytes_per_s", "link_mixed_bytes_per_s", "memory_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{self.name}: {name}={getattr(self, name)!r} must be > 0")


# NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOPS BF16 dense (1,979 with sparsity),
# 80 GB HBM3 at 3.35 TB/s; PCIe Gen5 x16 host link (64 GB/s theoretical, ~55 GB/s measured in the paper).
H100_SXM = DeviceProfile("H100-SXM", 989e12, 3.35e12, 55 * GB, 50 * GB, 80 * 10**9)
# H100 PCIe: 756 TFLOPS BF16 dense, 80 GB HBM2e at 2.0 TB/s, same Gen5 host link.
H100_PCIE = DeviceProfile("H100-PCIe", 756e12, 2.0e12, 55 * GB, 50 * GB, 80 * 10**9)
# H200 SXM: the H100 die (989 TFLOPS BF16 dense) with 141 GB HBM3e at 4.8 TB/s; PCIe Gen5 host link.
H200 = DeviceProfile("H200", 989e12, 4.8e12, 55 * GB, 50 * GB, 141 * 10**9)
# GH200 Grace Hopper (96 GB HBM3 version, the paper's machine): H100 compute (989 TFLOPS BF16 dense),
# 4.0 TB/s HBM3; NVLink-C2C is 900 GB/s bidirectional (450 GB/s each way), the paper measured ~427 GB/s
# host->device.
GH200 = DeviceProfile("GH200", 989e12, 4.0e12, 427 * GB, 385 * GB, 96 * 10**9)

PRESETS = {p.name: p for p in (H100_SXM, H100_PCIE, H200, GH200)}


def cpu_profile(matmul_n: int = 512, copy_bytes: int = 32 << 20, repeats: int = 3) -> DeviceProfile:
    """This machine as a device, from a ~0.1 s microbenchmark: fp32 matmul FLOP/s (best of `repeats`)
    and memory copy bandwidth (bytes read + written per second). On a CPU the "host link" is the same
    memory, so a copy is the link rate too, mixed or not."""
    a = torch.randn(matmul_n, matmul_n)
    b = torch.randn(matmul_n, matmul_n)
    torch.mm(a, b)  # warm up (thread pool, allocator)
    best_mm = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    src = torch.ones(copy_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best_copy = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    copy_rate = copy_bytes / best_copy  # the host->device analogue: bytes landed per second
    return DeviceProfile(
        name="cpu",
        peak_flops=2 * matmul_n**3 / best_mm,
        hbm_bytes_per_s=2 * copy_rate,  # a copy reads and writes every byte
        link_bytes_per_s=copy_rate,
        link_mixed_bytes_per_s=copy_rate,
        memory_bytes=_physical_memory_bytes(),
    )


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return max(time.perf_counter() - start, 1e-9)


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30  # platforms without sysconf: a modest guess, only used for sizing pools
