"""Does the simulator predict the real engine? One three-tenant workload, run by the real engine on
this CPU and by the simulator with this CPU's measured profile, in one run.

    python scripts/sim_vs_real.py [--json out/sim_vs_real.json] [--model $(oneiros pull)]

With --model (a Hugging Face folder: SmolLM2-135M-Instruct from `oneiros pull` is the real-sized case)
the three tenants are that model, the real engine runs its weights, and the profile's probes use its
shapes; without it, a tiny Llama family with random weights.

Three cases, each run by both:
- `ample` (recompute, chunked): a pool with room for everything; nothing is remapped or preempted.
  It checks the cost of compute.
- `tight-chunked` and `tight-vllm-v0` (remap mode, each scheduler): a pool whose KV holds about a
  third of the workload's. Layers are reclaimed and streamed, and requests are preempted. It checks
  the cost of copies, waits and the scheduler's decisions. Each case prints the counts that prove it.

The CPU profile comes from microbenchmarks only, never from the workload: matmul FLOP/s and copy
bandwidth (replicas.sim.cpu_profile), a per-kernel floor (the time of a tiny op) and a per-step
overhead (an engine step of a one-layer, one-token model). Both sides plan with the profile's copy
rate. The real engine runs each case --repeats times and the calibration is repeated as often; each
figure is the median. Prints P50 and P99 TBT, P99 TTFT and throughput of both and their ratio (the
target: within 25%); asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

import torch

from remap import BASE_SLAB, DeviceMemory, ModelId, SeqId
from remap.params import slab_num_pages
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.executor import LayerSource
from replicas.engine.models import AttentionBatch, CausalLM, ModelConfig, PagedAttention, dummy_weights
from replicas.engine.models.loader import load_hf_folder
from replicas.engine.models.ops import project
from replicas.engine.models.weights import split_state_dict
from replicas.engine.sampling import SamplingParams
from replicas.engine.scheduler import SchedulerConfig
from replicas.sim import CostModel, cpu_profile, make_sim_engine, meta_weights
from replicas.sim.cost import CostParams, layer_param_bytes, linear_shapes

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024, "hidden_size": 256,
        "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2}
TENANTS = {"a": 4, "b": 4, "c": 2}  # name -> layers
PAGE = 256 << 10
TIGHT_KV_PAGES = 40  # about a third of what the workload would hold at once


def workload(seed: int = 0) -> list[tuple[str, int, int]]:
    """(tenant, prompt_len, output_len): skewed across the three tenants, all arriving at once."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(24):
        tenant = "a" if i % 3 else ("b" if i % 2 else "c")
        out.append((tenant, int(torch.randint(32, 256, (), generator=g)), int(torch.randint(32, 96, (), generator=g))))
    return out


def configs(base: dict, tenants: dict[str, int] = TENANTS) -> dict[str, ModelConfig]:
    return {name: ModelConfig.from_hf(base | {"num_hidden_layers": layers}) for name, layers in tenants.items()}


def pool_pages(cfgs, kv_pages: int) -> int:
    """Pages of these models' parameters plus kv_pages."""
    total = kv_pages
    for cfg in cfgs:
        layers, base = split_state_dict(cfg, meta_weights(cfg))
        total += sum(slab_num_pages(t, PAGE) for t in layers) + slab_num_pages(base, PAGE)
    return total


def run(engine: LLMEngine, clock) -> dict[str, float]:
    ids = [engine.add_request(t, [7] * p, SamplingParams(max_tokens=o, ignore_eos=True)) for t, p, o in workload()]
    start = clock()
    reclaimed: set[str] = set()  # tenants that lent a layer at some point
    while engine.has_unfinished():
        engine.step()
        reclaimed.update(m for m in engine.models
                         if engine.tenant_stats(m).resident_layers < engine.tenant_stats(m).num_layers)
    elapsed = clock() - start
    seqs = [engine.sequence(i) for i in ids]
    tbt = [b - a for s in seqs for a, b in zip(s.token_times_s, s.token_times_s[1:])]
    ttft = [s.first_token_s - s.arrival_s for s in seqs]
    return {"p50_tbt_s": _pct(tbt, 50), "p99_tbt_s": _pct(tbt, 99), "p99_ttft_s": _pct(ttft, 99),
            "throughput_tok_s": sum(len(s.output_token_ids) for s in seqs) / elapsed, "elapsed_s": elapsed,
            "preemptions": engine.num_preemptions, "layers_streamed": engine.num_layers_streamed,
            "reclaimed_tenants": len(reclaimed)}


def _pct(xs: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(xs, dtype=torch.float64), q / 100))


def calibrated(profile, base: dict, repeats: int) -> CostParams:
    """measured_params taken `repeats` times, each field the median: one probe's steps vary by up to
    half on this machine, and the per-layer floor is a difference of two of them."""
    runs = [dataclasses.asdict(measured_params(profile, base)) for _ in range(repeats)]
    return CostParams(**{k: statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k]
                         for k in runs[0]})


def measured_params(profile, base: dict) -> CostParams:
    """From microbenchmarks, never the workload: GEMM efficiency at a decode-sized shape, then engine
    steps of 1- and 4-layer models of the same family at batch 1 (kernel-floor bound): the difference
    per layer gives the per-kernel floor, the rest of a 1-layer step the fixed per-step overhead."""
    a, w = torch.randn(16, base["hidden_size"]), torch.randn(base["intermediate_size"], base["hidden_size"])
    gemm_s = min(_timed(lambda: project(a, w)) for _ in range(200))  # the GEMM the engine picks for this shape
    efficiency = min(1.0, 2 * a.shape[0] * w.numel() / gemm_s / profile.peak_flops)
    step_1, step_4 = (_step_s(base, layers, 1) for layers in (1, 4))  # batch 1
    per_layer = max(0.0, (step_4 - step_1) / 3)
    kernels_per_layer = len(linear_shapes(ModelConfig.from_hf(base))) + 2  # + attention + elementwise
    floor = per_layer / kernels_per_layer
    step_1_b16, step_4_b16 = (_step_s(base, layers, 16) for layers in (1, 4))
    per_seq = max(0.0, (step_1_b16 - step_1) / 15)  # host work per sequence, on a 1-layer model
    # what each extra sequence costs each layer beyond that (small ops that do not reach the roofline)
    per_seq_layer = max(0.0, ((step_4_b16 - step_4) - (step_1_b16 - step_1)) / 3 / 15)
    return CostParams(flops_efficiency=efficiency, hbm_efficiency=1.0, kernel_floor_s=floor,
                      step_overhead_s=max(0.0, step_1 - per_layer - floor), seq_overhead_s=per_seq,
                      attention_efficiency=_attention_efficiency(profile, base), seq_layer_overhead_s=per_seq_layer,
                      copies_overlap=False,  # the CPU engine copies inline (SyncTransferEngine)
                      stream_layer_overhead_s=_stream_layer_overhead(profile, base))


def _stream_layer_overhead(profile, base: dict, batch: int = 16, context: int = 100) -> float:
    """What a layer computed from a staging slot costs beyond its copy at the profile's link rate: one
    decode forward of a 4-layer model with layers 1-3 streamed through a two-slot ring, against the same
    forward with every layer resident (same batch, same KV), per streamed layer."""
    cfg = ModelConfig.from_hf(base | {"num_hidden_layers": 4})
    layers, base_tensors = split_state_dict(cfg, dummy_weights(cfg, 0))
    model, streamed = ModelId("probe"), (1, 2, 3)

    def forward_s(reclaim: tuple[int, ...]) -> float:
        mem = DeviceMemory(pool_pages([cfg], 4 * batch), PAGE)
        kv = mem.register_model(model, layers, base_tensors, cfg.kv_geometry())
        for layer in reclaim:
            mem.reclaim(model, layer)
        ring = mem.open_stream(model, num_slots=2) if reclaim else None
        tables = []
        for i in range(batch):
            kv.alloc(SeqId(i), kv.num_blocks_for(context + 1))
            tables.append(kv.table(SeqId(i)))
        lm, ids = CausalLM(cfg), torch.full((batch,), 5)
        attention = AttentionBatch((1,) * batch, (context,) * batch, tuple(tables))
        weights = LayerSource(mem, model, ring)  # what the engine's executor hands a forward

        def once() -> None:
            if ring:
                ring.begin_pass(list(reclaim))
            lm.forward(ids, attention, kv.view, weights, mem.params.tensors(model, BASE_SLAB))
            if ring:
                ring.finish()
        once()
        return statistics.median(_timed(once) for _ in range(20))

    extra = (forward_s(streamed) - forward_s(())) / len(streamed)
    copy = layer_param_bytes(cfg) / profile.link_bytes_per_s
    return max(0.0, extra - copy)


def _attention_efficiency(profile, base: dict, batch: int = 16, context: int = 512) -> float:
    """The real paged decode attention of one layer (a gather of every key and value) against the
    profile's memory bandwidth."""
    cfg = ModelConfig.from_hf(base | {"num_hidden_layers": 4})
    block = PAGE // cfg.kv_geometry().bytes_per_token
    pages = batch * -(-context // block)
    kv = torch.randn(pages, cfg.num_layers, 2, block, cfg.num_kv_heads, cfg.head_dim)
    tables = [list(range(i * (pages // batch), (i + 1) * (pages // batch))) for i in range(batch)]
    attend = PagedAttention(AttentionBatch([1] * batch, [context - 1] * batch, tables), kv, [None] * cfg.num_layers,
                            cfg.head_dim**-0.5)
    q = torch.randn(batch, cfg.num_heads, cfg.head_dim)
    k = v = torch.randn(batch, cfg.num_kv_heads, cfg.head_dim)
    seconds = statistics.median(_timed(lambda: attend(0, q, k, v)) for _ in range(30))
    kv_bytes = batch * context * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    return min(1.0, kv_bytes / seconds / profile.hbm_bytes_per_s)


def _step_s(base: dict, num_layers: int, batch: int) -> float:
    """Median decode step of a model of this family at this batch size, short contexts."""
    cfg = ModelConfig.from_hf(base | {"num_hidden_layers": num_layers})
    engine = LLMEngine(DeviceMemory(pool_pages([cfg], 64), PAGE), EngineConfig(link_bytes_per_s=1e10))
    engine.add_model("probe", cfg, dummy_weights(cfg, 0), eos_token_ids=())
    for _ in range(batch):
        engine.add_request("probe", [3, 4], SamplingParams(max_tokens=80, ignore_eos=True))
    engine.step()
    times = []
    while engine.has_unfinished():
        times.append(_timed(engine.step))
    return statistics.median(times)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


METRICS = ("p50_tbt_s", "p99_tbt_s", "p99_ttft_s", "throughput_tok_s")
COUNTS = ("preemptions", "layers_streamed", "reclaimed_tenants")


def cases(ample_kv: int, tight_kv: int) -> dict[str, tuple[int, SchedulerConfig]]:
    """name -> (KV pages, scheduler settings)."""
    def sched(mode: str, policy: str) -> SchedulerConfig:
        return SchedulerConfig(max_num_batched_tokens=1024, max_num_seqs=32, preemption_mode=mode, policy=policy)
    return {"ample": (ample_kv, sched("recompute", "chunked")),
            "tight-chunked": (tight_kv, sched("remap", "chunked")),
            "tight-vllm-v0": (tight_kv, sched("remap", "vllm-v0"))}


def compare(cfgs, weights, num_pages: int, scheduler: SchedulerConfig, profile, params, repeats: int) -> dict:
    """One case: the real engine `repeats` times (each metric the median of the runs), then the
    simulator once (it is deterministic), on the same pool, workload and settings."""
    settings = EngineConfig(scheduler=scheduler, link_bytes_per_s=profile.link_bytes_per_s)
    real_runs = []
    for _ in range(repeats):
        real = LLMEngine(DeviceMemory(num_pages, PAGE), settings)
        for name, cfg in cfgs.items():
            real.add_model(name, cfg, weights[name], eos_token_ids=())
        real_runs.append(run(real, time.monotonic))
        real.close()
    real_numbers = {k: statistics.median(r[k] for r in real_runs) for k in real_runs[0]}
    sim, executor = make_sim_engine(profile, settings, num_pages=num_pages, page_size_bytes=PAGE,
                                    cost=CostModel(profile, params), token_id=0)
    for name, cfg in cfgs.items():
        sim.add_model(name, cfg, meta_weights(cfg), eos_token_ids=())
    sim_numbers = run(sim, executor.clock)
    ratios = {k: sim_numbers[k] / real_numbers[k] for k in METRICS}
    return {"num_pages": num_pages, "real": real_numbers, "real_runs": real_runs, "sim": sim_numbers, "ratios": ratios,
            "within_25pct": all(abs(r - 1) <= 0.25 for r in ratios.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--model", help="a Hugging Face folder: three tenants of it (e.g. $(oneiros pull))")
    ap.add_argument("--cases", default=None, help="comma-separated subset of ample,tight-chunked,tight-vllm-v0")
    ap.add_argument("--repeats", type=int, default=3, help="real runs per case and calibrations (medians taken)")
    args = ap.parse_args(argv)
    if args.model:
        base = json.loads((pathlib.Path(args.model) / "config.json").read_text())
        cfgs = configs(base, {name: base["num_hidden_layers"] for name in TENANTS})
        state = load_hf_folder(args.model)[1]
        weights = {name: state for name in cfgs}
        ample_kv, tight_kv = 1000, 300  # ~5k and ~1.5k SmolLM2 tokens for the 24 requests' ~8k
    else:
        base, cfgs = BASE, configs(BASE)
        weights = {name: dummy_weights(cfg, 1) for name, cfg in cfgs.items()}
        ample_kv, tight_kv = 400 - pool_pages(cfgs.values(), 0), TIGHT_KV_PAGES
    profile = cpu_profile()
    params = calibrated(profile, base, args.repeats)
    print(f"cpu profile: {profile.peak_flops / 1e9:.0f} GFLOP/s peak x {params.flops_efficiency:.2f} at decode "
          f"shapes, {profile.hbm_bytes_per_s / 1e9:.0f} GB/s; kernel floor {params.kernel_floor_s * 1e6:.1f} us, "
          f"step overhead {params.step_overhead_s * 1e3:.2f} ms, per sequence {params.seq_overhead_s * 1e6:.0f} us, "
          f"attention at {params.attention_efficiency:.3f} of the bandwidth, "
          f"{params.stream_layer_overhead_s * 1e3:.2f} ms per streamed layer beyond its copy")
    chosen = cases(ample_kv, tight_kv)
    names = args.cases.split(",") if args.cases else list(chosen)
    if unknown := set(names) - set(chosen):
        ap.error(f"--cases: unknown {sorted(unknown)}; expected some of {', '.join(chosen)}")
    results = {}
    for name in names:
        kv_pages, scheduler = chosen[name]
        r = results[name] = compare(cfgs, weights, pool_pages(cfgs.values(), kv_pages), scheduler,
                                    profile, params, args.repeats)
        print(f"\n{name}: {r['num_pages']} pages ({kv_pages} beyond the parameters), "
              f"{scheduler.preemption_mode.value}, {scheduler.policy.value}")
        print(f"{'':<18}{'real':>12}{'sim':>12}{'sim/real':>10}")
        for key in METRICS:
            print(f"{key:<18}{r['real'][key]:>12.4f}{r['sim'][key]:>12.4f}{r['ratios'][key]:>10.3f}")
        for key in COUNTS:
            print(f"{key:<18}{r['real'][key]:>12}{r['sim'][key]:>12}")
        print(f"within 25%: {r['within_25pct']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cases": results, "params": dataclasses.asdict(params),
                                         "within_25pct": all(r["within_25pct"] for r in results.values())},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
