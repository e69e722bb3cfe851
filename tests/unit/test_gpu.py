"""The GPU path on a real CUDA device (skipped with a reason elsewhere): copy-stream restores and
streamed layers are bit-identical, and the engine stays token-exact with remapping on CUDA."""

from __future__ import annotations

import pytest
import torch

from remap import CudaTransferEngine, ModelId, SeqId
from tests.unit.factories import add_model, make_memory

pytestmark = pytest.mark.gpu


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


def test_engine_greedy_output_on_cuda_with_remapping_equals_cpu():
    from tests.unit.test_engine import LLAMA, PARAMS, PROMPTS, add_tenant, make_engine  # noqa: PLC0415
    from remap import DeviceMemory
    from replicas.engine.engine import EngineConfig, LLMEngine
    from replicas.engine.scheduler import PreemptionMode, SchedulerConfig

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
