"""Device telemetry: NVML read through a stand-in module (a seam fake), and clean fallbacks."""

from __future__ import annotations

from types import SimpleNamespace

from replicas.service.telemetry import read_device


class FakeNvml:
    def __init__(self, fail_init=False, no_pcie=False):
        self.fail_init, self.no_pcie, self.shutdowns = fail_init, no_pcie, 0

    def nvmlInit(self):  # noqa: N802 - NVML's names
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self):  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid):  # noqa: N802
        return int(uuid.removeprefix("GPU-"))  # the fake machine's GPU n has UUID "GPU-n"

    def nvmlDeviceGetMemoryInfo(self, handle):  # noqa: N802
        return SimpleNamespace(used=(30 + handle) << 30, total=80 << 30)

    def nvmlDeviceGetName(self, handle):  # noqa: N802
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, handle):  # noqa: N802
        return SimpleNamespace(gpu=57)

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle):  # noqa: N802
        if self.no_pcie:
            raise RuntimeError("Not Supported")
        return 5

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle):  # noqa: N802
        return 16


def test_nvml_fields_are_read_and_the_library_shut_down():
    nvml = FakeNvml()
    t = read_device(0, nvml)
    assert (t.source, t.name, t.memory_used_bytes, t.memory_total_bytes) == ("nvml", "NVIDIA H100 80GB HBM3",
                                                                              30 << 30, 80 << 30)
    assert (t.utilization_pct, t.pcie_generation, t.pcie_width) == (57, 5, 16) and nvml.shutdowns == 1


def test_no_gpu_or_no_link_info_is_a_clean_unknown_not_an_error():
    assert read_device(0, FakeNvml(fail_init=True)).source.startswith("nvml init failed")
    assert read_device(0, FakeNvml(no_pcie=True)).pcie_generation is None  # e.g. NVLink-C2C on GH200


def test_this_machine_reports_without_raising():
    assert read_device(0).source  # CPU-only here: a reason, whatever is installed


def test_the_device_is_found_by_uuid_not_by_the_process_s_cuda_index():
    # Ray gave this replica the machine's GPU 3 (CUDA_VISIBLE_DEVICES=3): it is CUDA device 0 here,
    # NVML's device 0 is another replica's GPU
    assert read_device(0, FakeNvml(), uuid="GPU-3").memory_used_bytes == 33 << 30
    assert read_device(0, FakeNvml()).memory_used_bytes == 30 << 30  # no UUID known: by index
