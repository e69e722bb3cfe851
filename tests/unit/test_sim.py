"""The simulator: cost model sanity, Vidur calibration, and the real engine on a virtual clock."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from remap import ModelId, RemapConfig
from replicas.engine.engine import EngineConfig
from replicas.engine.sampling import SamplingParams
from replicas.engine.scheduler import SchedulerConfig
from replicas.sim import (
    GH200,
    H100_FIT,
    H100_SXM,
    BatchShape,
    CostModel,
    VirtualClock,
    cpu_profile,
    fit_vidur,
    layer_param_bytes,
    llama3_8b,
    make_sim_engine,
    meta_weights,
    opt_6_7b,
)

VIDUR_H100 = Path(__file__).resolve().parents[3] / "shared/vidur-profiles/profiling/compute/h100"


# ---- cost model -----------------------------------------------------------------------------------------
def test_decode_step_of_llama3_8b_is_within_a_factor_of_the_weight_read_roofline():
    config = llama3_8b()
    weight_bytes = config.num_layers * layer_param_bytes(config)
    table = {}
    for device in (H100_SXM, GH200):
        step_s = CostModel(device).decode_s(config, batch_size=8, context_tokens=1024)
        roofline_s = weight_bytes / device.hbm_bytes_per_s  # every weight read once, nothing else
        table[device.name] = step_s
        assert roofline_s < step_s < 3 * roofline_s  # HBM efficiency, kernel floors, step overhead, (device.name, step_s, roofline_s)
    assert table["GH200"] < table["H100-SXM"]  # same compute, faster HBM


def test_prefill_scales_with_tokens_and_is_compute_bound_when_long():
    config, cost = llama3_8b(), CostModel(H100_SXM)
    t1k, t4k = cost.prefill_s(config, 1024), cost.prefill_s(config, 4096)
    assert 3.0 < t4k / t1k < 5.0  # linear GEMMs x4, causal attention a bit more
    gemm_flops = 2 * config.num_layers * layer_param_bytes(config) // 2 * 4096
    assert t4k > gemm_flops / H100_SXM.peak_flops
    assert cost.prefill_s(config, 64) < t1k


def test_streamed_layers_cost_only_what_compute_does_not_hide():
    config, cost = llama3_8b(), CostModel(H100_SXM)
    batch = BatchShape.decode(8, 512)
    layer = layer_param_bytes(config)
    hidden = cost.step(config, batch, streamed_bytes=1 * layer)  # ~8 ms copy < ~10 ms decode
    exposed = cost.step(config, batch, streamed_bytes=8 * layer)
    assert hidden.exposed_transfer_s == 0 and hidden.total_s == hidden.compute_s
    assert exposed.total_s == pytest.approx(exposed.transfer_s)  # max(compute, transfer)
    serial = cost.step(config, batch, streamed_bytes=1 * layer, num_slots=1)
    assert serial.total_s == pytest.approx(serial.compute_s + serial.transfer_s)
    inline = CostModel(H100_SXM, dataclasses.replace(H100_FIT, copies_overlap=False))  # a CPU's inline copies
    inline_cost = inline.step(config, batch, streamed_bytes=1 * layer)
    assert inline_cost.total_s == pytest.approx(inline_cost.compute_s + inline_cost.transfer_s)
    overhead = CostModel(H100_SXM, dataclasses.replace(H100_FIT, stream_layer_overhead_s=1e-3))  # a CPU's
    streamed = overhead.step(config, batch, streamed_bytes=0, num_streamed=3)  # kept in slots: no copy
    assert streamed.compute_s == pytest.approx(hidden.compute_s + 3e-3) and streamed.transfer_s == 0
    assert cost.step(config, batch, num_streamed=3).compute_s == hidden.compute_s  # 0 on the GPU fit
    cold = CostModel(H100_SXM, dataclasses.replace(H100_FIT, switch_layer_overhead_s=1e-4))  # a CPU's caches
    assert cold.step(config, batch, switched=True).compute_s == pytest.approx(hidden.compute_s + 32 * 1e-4)
    assert cold.step(config, batch).compute_s == hidden.compute_s
    assert cost.step(config, batch, switched=True).compute_s == hidden.compute_s  # 0 on the GPU fit


def test_a_step_after_another_tenants_step_pays_the_switch():
    runs = []
    for overhead in (0.0, 1e-3):
        engine, sim = _make(models=("a", "b"), cost=CostModel(GH200, dataclasses.replace(H100_FIT,
                                                                   switch_layer_overhead_s=overhead)))
        _run(engine, [("a", 64, 6), ("a", 32, 9), ("b", 48, 7)])
        runs.append(sim.stats.steps)
    models = [m for m, _ in runs[1]]
    assert models == [m for m, _ in runs[0]] and len(set(models)) == 2
    switched = [False] + [a != b for a, b in zip(models, models[1:])]
    extra = [cold.compute_s - warm.compute_s for (_, warm), (_, cold) in zip(*runs)]
    assert extra == pytest.approx([32 * 1e-3 * s for s in switched])  # opt-6.7b: 32 layers


def test_a_ring_with_a_slot_per_streamed_layer_copies_them_once():
    # a slot keeps its layer across passes (remap/staging.py): with one lent layer and two slots only
    # the first step copies; with three lent layers every step copies all three
    for lent, copies_per_step in ((1, [1, 0, 0]), (3, [3, 3, 3])):
        engine, sim = _make(mode="recompute", max_num_batched_tokens=512)  # recompute: the layers stay lent
        layer_bytes = engine.memory.params.max_layer_bytes(ModelId("a"))
        engine.add_request("a", [7] * 8, SamplingParams(max_tokens=10))
        for layer in range(1, 1 + lent):
            engine.memory.reclaim(ModelId("a"), 3 * layer)
        copied = []
        for _ in range(3):
            engine.step()
            cost = sim.stats.steps[-1][1]
            copied.append(round(cost.transfer_s / sim.cost.link_s(layer_bytes, False)))
        assert copied == copies_per_step and engine.num_layers_streamed == 3 * lent


def test_cpu_profile_measures_this_machine():
    p = cpu_profile()
    assert p.peak_flops > 1e8 and p.hbm_bytes_per_s > 1e8 and p.memory_bytes > 1 << 28


@pytest.mark.skipif(not VIDUR_H100.is_dir(), reason="vidur profiles not checked out next to the repo")
def test_vidur_fit_reproduces_h100_fit():
    fit = fit_vidur(sorted(VIDUR_H100.glob("*/*/mlp.csv")))
    assert fit.params == H100_FIT
    assert fit.median_abs_err < 0.10 and fit.p90_abs_err < 0.35
    assert max(fit.per_model_median_err.values()) < 0.15


# ---- the engine on a virtual clock ----------------------------------------------------------------------
def _make(mode="recompute", num_extra_pages=400, device=GH200, models=("a",), cost=None, **sched):
    config = opt_6_7b()
    pages_per_model = -(-(config.num_layers * layer_param_bytes(config) + 2 * config.vocab_size * config.hidden_size
                          + (8 << 20)) // (2 << 20)) + 8 * config.num_layers
    engine_config = EngineConfig(scheduler=SchedulerConfig(preemption_mode=mode, **sched), remap=RemapConfig())
    engine, sim = make_sim_engine(device, engine_config, num_pages=pages_per_model * len(models) + num_extra_pages,
                                  cost=cost)
    for m in models:
        engine.add_model(m, config, meta_weights(config))
    return engine, sim


def _run(engine, requests):
    ids = [engine.add_request(m, [7] * n, SamplingParams(max_tokens=k)) for m, n, k in requests]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        engine.memory.check_integrity()
        steps += 1
        assert steps < 5000
    return [engine.sequence(i).output_token_ids for i in ids], steps


def test_sim_executor_drives_the_engine_to_completion_deterministically():
    requests = [("a", 100 + 37 * i, 5 + 3 * i) for i in range(12)]
    runs = []
    for _ in range(2):
        engine, sim = _make(max_num_batched_tokens=512, max_num_seqs=8)
        outputs, steps = _run(engine, requests)
        stats = engine.tenant_stats("a")
        runs.append((outputs, steps, sim.clock.now(), stats.ttft_s, stats.tbt_s))
        assert [len(o) for o in outputs] == [k for _, _, k in requests]
        assert sim.clock.now() == pytest.approx(sim.stats.busy_s)  # all time is modeled step time
        assert sim.stats.num_tokens >= sum(n + k - 1 for _, n, k in requests)
    assert runs[0] == runs[1]
    assert 0.05 < runs[0][2] < 10.0  # virtual seconds, not wall time


def test_remapped_layers_stream_and_expose_transfer_when_it_exceeds_compute():
    # PCIe H100: an OPT-6.7B layer (403 MB) takes ~7 ms to copy. "a"'s prefill steps (~46 ms) give it
    # an alpha budget of ~6 layers when its KV fills the pool; its ~9 ms decode steps cannot hide them.
    engine, sim = _make(mode="remap", num_extra_pages=60, device=H100_SXM, models=("a", "b"),
                        max_num_batched_tokens=2048, max_num_seqs=16)
    _run(engine, [("a", 500, 40)] * 10 + [("b", 200, 30)])
    assert sim.stats.num_streamed_layers > 0
    assert engine.num_layers_streamed == sim.stats.num_streamed_layers
    exposed = [c for _, c in sim.stats.steps if c.transfer_s > c.compute_s]
    # with 2+ slots the copies overlap compute (total = transfer + blocking), with 1 slot they add to it
    assert exposed and all(c.total_s >= c.transfer_s + c.blocking_s - 1e-12 for c in exposed)
    assert all(c.exposed_transfer_s > 0 for c in exposed)
    hidden = [c for _, c in sim.stats.steps if 0 < c.transfer_s <= c.compute_s]
    # hidden behind compute with 2+ slots; a 1-slot ring (no room for two) exposes its whole copy
    assert all(c.exposed_transfer_s == 0 or c.exposed_transfer_s == pytest.approx(c.transfer_s) for c in hidden)
    assert sim.stats.exposed_transfer_s > 0
    assert sim.clock.now() == pytest.approx(sim.stats.busy_s)


def test_virtual_clock_never_goes_back():
    clock = VirtualClock(5.0)
    assert clock() == 5.0 and clock.advance(0.5) == 5.5 and clock.advance_to(1.0) == 5.5
    with pytest.raises(ValueError):
        clock.advance(-1e-3)


def test_alpha_is_budgeted_on_decode_steps_unless_prefill_aware():
    # after one long prefill step and a few decode steps, the decode-only budget predicts a short
    # step (what the next decode takes); the paper's prefill-aware budget still remembers the prefill
    predicted = {}
    for on_decode in (True, False):
        engine, sim = make_sim_engine(GH200, EngineConfig(remap=RemapConfig(budget_on_decode=on_decode)),
                                      num_pages=8000)
        config = opt_6_7b()
        engine.add_model("m", config, meta_weights(config))
        engine.add_request("m", [7] * 1500, SamplingParams(max_tokens=8, ignore_eos=True))
        for _ in range(4):
            engine.step()
        (tenant,) = engine.remap.snapshot(sim.clock()).tenants
        predicted[on_decode] = tenant.predicted_compute_s
    decode_step = sim.stats.steps[-1][1].compute_s
    assert predicted[True] == pytest.approx(decode_step) and predicted[False] > 1.5 * decode_step
