"""Device telemetry for replica reports: NVML on NVIDIA GPUs, a clean "unknown" everywhere else.

`read_device(index)` returns a `DeviceTelemetry` with memory used/total, utilization and the
host link (PCIe generation and width, or NVLink-C2C on Grace Hopper, where NVML reports no PCIe
link). Without a GPU or without `nvidia-ml-py` (the `gpu` extra) every field is None and `source`
says why: telemetry never takes a replica down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceTelemetry:
    source: str  # "nvml", or why there is none ("no nvml module", "nvml init failed: ...")
    name: str | None = None  # e.g. "NVIDIA H100 80GB HBM3"
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilization_pct: int | None = None  # GPU busy time over NVML's last sample period
    pcie_generation: int | None = None  # current PCIe link generation (None on NVLink-C2C hosts)
    pcie_width: int | None = None  # current PCIe link width (lanes)


def read_device(index: int = 0, nvml: Any = None, uuid: str | None = None) -> DeviceTelemetry:
    """Telemetry of this process's CUDA device `index`; `nvml` is the pynvml module (injectable for
    tests). NVML numbers the machine's GPUs and ignores CUDA_VISIBLE_DEVICES, which Ray sets per
    replica, so the device is looked up by its UUID (`uuid`, else the one CUDA reports for `index`);
    by index only where no UUID is known."""
    if uuid is None and nvml is None:
        uuid = device_uuid(index)
    if nvml is None:
        try:
            import pynvml as nvml  # the `gpu` extra: nvidia-ml-py
        except ImportError:
            return DeviceTelemetry(source="no nvml module (install the gpu extra)")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # no driver, no GPU
        return DeviceTelemetry(source=f"nvml init failed: {exc}")
    try:
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid) if uuid else nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
        return DeviceTelemetry(
            source="nvml",
            name=name.decode() if isinstance(name, bytes) else str(name),
            memory_used_bytes=int(memory.used),
            memory_total_bytes=int(memory.total),
            utilization_pct=int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            pcie_generation=_optional(nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
            pcie_width=_optional(nvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
        )
    except Exception as exc:  # a driver hiccup: report what failed, keep serving
        logger.warning("nvml query of device %d failed: %s", index, exc)
        return DeviceTelemetry(source=f"nvml query failed: {exc}")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutdown of a half-initialized library
            pass


def device_uuid(index: int) -> str | None:
    """NVML's name ("GPU-<uuid>") of this process's CUDA device `index`, or None without CUDA."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(index).uuid)  # "58ff7e4c-..." as torch prints it
        return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    except Exception:  # noqa: BLE001 - no CUDA, or a torch without the field: look up by index
        return None


def _optional(fn, handle) -> int | None:
    try:
        return int(fn(handle))
    except Exception:  # not supported here (e.g. NVLink-C2C): not an error
        return None
