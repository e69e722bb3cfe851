"""The GPU path on a real CUDA device (skipped with a reason elsewhere): copy-stream restores and
streamed layers are bit-identical, the engine stays token-exact with remapping on CUDA, and seeded
sampling on CUDA draws what it draws on the CPU. One CPU test: scripts/gpu_check.py, which runs
these, says why it cannot run without CUDA and runs its parts on a shrunken model with --device cpu."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch

from remap import CudaTransferEngine, ModelId, SeqId
from tests.unit.factories import add_model, make_memory


@pytest.mark.gpu
def test_copy_stream_restore_and_streaming_are_bit_identical_on_cuda():
    mem = make_memory(num_pages=64, device="cuda")
    assert isinstance(mem.transfer, CudaTransferEngine)
    kv, layers, _ = add_model(mem, num_layers=6)
    for layer in (1, 4):
        mem.reclaim(ModelId("m0"), layer)
    pages = kv.alloc(SeqId(1), mem.pool.num_free - 8)
    for p in pages:
        kv.view[p].fill_(7.0)  # KV overwrites the lent bytes
    ring = mem.open_stream(ModelId("m0"), num_slots=2)
    ring.begin_pass([1, 4])
    for layer in (1, 4):
        got = ring.acquire(layer)
        for name, t in layers[layer].items():
            assert torch.equal(got[name].cpu(), t)
        ring.release(layer)
    ring.finish()
    mem.close_stream(ModelId("m0"))
    kv.free(SeqId(1))
    for layer in (1, 4):
        assert mem.restore(ModelId("m0"), layer).restored
    torch.cuda.synchronize()
    for layer in (1, 4):
        for name, t in layers[layer].items():
            assert torch.equal(mem.params.tensors(ModelId("m0"), layer)[name].cpu(), t)
    mem.check_integrity()


@pytest.mark.gpu
def test_the_device_times_copies_and_the_compute_streams_waits_for_them():
    transfer = CudaTransferEngine(torch.device("cuda"))
    src = torch.ones(64 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    ticket = transfer.submit(dst, src)
    transfer.wait(ticket)  # the compute stream stands still until 64 MiB have crossed the link
    torch.cuda.synchronize()
    waited = transfer.take_device_wait_s()
    assert 0 < waited < 1 and transfer.total_bytes == 64 << 20 and 0 < transfer.total_copy_s < 1
    assert transfer.take_device_wait_s() == 0.0  # each wait is taken once
    assert transfer.measured_bytes_per_s > 1e9


@pytest.mark.gpu
def test_engine_greedy_output_on_cuda_with_remapping_equals_cpu():
    from remap import DeviceMemory
    from replicas.engine.engine import EngineConfig, LLMEngine
    from replicas.engine.scheduler import PreemptionMode, SchedulerConfig
    from tests.unit.test_engine import LLAMA, PARAMS, PROMPTS, add_tenant, make_engine

    cpu = make_engine(mode="recompute")
    add_tenant(cpu, "m", LLAMA, seed=3)
    want = cpu.generate("m", PROMPTS, PARAMS)
    gpu = LLMEngine(DeviceMemory(256, 16 << 10, device="cuda"),
                    EngineConfig(scheduler=SchedulerConfig(preemption_mode=PreemptionMode.RECOMPUTE),
                                 link_bytes_per_s=1e10))
    add_tenant(gpu, "m", LLAMA, seed=3)
    ids = [gpu.add_request("m", p, PARAMS) for p in PROMPTS]
    for _ in range(3):
        gpu.step()
    gpu.memory.reclaim(ModelId("m"), 1)  # streamed from host through the copy stream from now on
    while gpu.has_unfinished():
        gpu.step()
    assert [gpu.sequence(i).output_token_ids for i in ids] == want


@pytest.mark.gpu
def test_sampling_on_cuda_draws_the_tokens_it_draws_on_the_cpu():
    from replicas.engine.sampling import SamplingParams, sample

    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=0.5 + (i % 4) * 0.3, top_k=(0, 20)[i % 2], top_p=(1.0, 0.9, 0.7)[i % 3],
                             min_p=(0.0, 0.05)[i % 2], seed=i) for i in range(64)]
    on_cpu, _, _ = sample(logits, params, [None] * 64, list(range(64)))
    on_cuda, _, failed = sample(logits.cuda(), params, [None] * 64, list(range(64)))
    assert failed == {} and on_cuda.device.type == "cpu"
    assert on_cuda.tolist() == on_cpu.tolist()


@pytest.mark.gpu
def test_seeded_engine_output_on_cuda_equals_the_cpu_engines():
    from remap import DeviceMemory
    from replicas.engine.engine import EngineConfig, LLMEngine
    from replicas.engine.sampling import SamplingParams
    from tests.unit.test_engine import LLAMA, PROMPTS, add_tenant, make_engine

    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=7, ignore_eos=True)
    cpu = make_engine()
    add_tenant(cpu, "m", LLAMA, seed=3)
    gpu = LLMEngine(DeviceMemory(256, 16 << 10, device="cuda"), EngineConfig(link_bytes_per_s=1e10))
    add_tenant(gpu, "m", LLAMA, seed=3)
    assert gpu.generate("m", PROMPTS, params) == cpu.generate("m", PROMPTS, params)


def load_gpu_check():
    path = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_says_why_without_cuda_and_runs_its_parts_on_the_cpu(tmp_path):
    gpu_check = load_gpu_check()
    if not torch.cuda.is_available():
        assert gpu_check.main([str(tmp_path / "cuda")]) == 2
        assert json.loads((tmp_path / "cuda" / "gpu_check.json").read_text())["environment"]["torch"] == torch.__version__
    assert gpu_check.main([str(tmp_path / "cpu"), "--device", "cpu", "--skip-scale"]) == 0
    got = json.loads((tmp_path / "cpu" / "gpu_check.json").read_text())
    assert got["failed_parts"] == [] and got["decode"]["attention_backend"] == "torch"
    assert got["decode"]["b8"]["step_ms"] > 0 and got["streaming"]["alpha_4_ms"] > 0
