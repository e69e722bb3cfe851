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
bandwidth (replicas.sim.cpu_profile), then engine steps of probe models of the same family
(`measured_params`): the per-kernel floor, per-step and per-sequence overheads, the attention's share
of the bandwidth, a prefill step's FLOP efficiency, what a streamed layer and a step after another
model's cost beyond the roofline. Both sides plan with the profile's copy rate. Each case is --repeats
pairs made back to back (calibrate, run the real engine, simulate with that calibration), so each ratio
compares runs made at the same speed of this drifting machine; each figure is the median over the
pairs. Prints P50 and P99 TBT, P99 TTFT and throughput of both and their ratio (the target: within
25%); asserts nothing.
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
from replicas.engine.models import AttentionBatch, CausalLM, ModelConfig, dummy_weights
from replicas.engine.models.loader import load_hf_folder
from replicas.engine.models.weights import split_state_dict
from replicas.engine.sampling import SamplingParams
from replicas.engine.scheduler import SchedulerConfig
from replicas.sim import CostModel, cpu_profile, make_sim_engine, meta_weights
from replicas.sim.cost import BatchShape, CostParams, layer_param_bytes, linear_shapes

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024, "hidden_size": 256,
        "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2}
TENANTS = {"a": 4, "b": 4, "c": 2}  # name -> layers
PAGE = 256 << 10
TIGHT_KV_PAGES = 40  # about a third of what the workload would hold at once
PREFILL_SHAPE = (4, 128)  # the prefill probe: prompts x tokens (the workload's are 32-255 tokens)
LONG_CONTEXT = 258  # the attention probe's prompt (the short one is 2 tokens)


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
    num_layers = {m: engine.tenant_stats(m).num_layers for m in engine.models}
    while engine.has_unfinished():
        engine.step()
        # cheap: this loop's time counts on the real engine's clock, not on the simulator's
        reclaimed.update(m for m, n in num_layers.items() if len(engine.memory.params.resident_layers(ModelId(m))) < n)
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


def measured_params(profile, base: dict) -> CostParams:
    """From microbenchmarks, never the workload. Engine steps of models of the same family:
    - decode of 1- and 4-layer models at batch 1 (kernel-floor bound): the difference per layer gives
      the per-kernel floor, the rest of a 1-layer step the fixed per-step overhead; at batch 16, what
      each sequence adds per step and per layer;
    - the attention's share of the bandwidth: the 4-layer decode at batch 16 after a long prompt
      against a short one, over the KV bytes the longer context reads (medians of alternating runs);
    - what a streamed layer costs beyond its copy (`_stream_layer_overhead`), and a step after another
      model's (`_switch_layer_overhead`);
    - the FLOP efficiency that makes the cost model's prefill step of PREFILL_SHAPE equal the
      engine's: on this CPU a prefill also pays its elementwise ops and temporaries, which scale with
      its tokens as its GEMMs do (a decode step's GEMMs of these models are below the kernel floor,
      so the FLOP term matters only in prefills)."""
    step_1, step_4 = (_step_s(base, layers, 1) for layers in (1, 4))  # batch 1
    per_layer = max(0.0, (step_4 - step_1) / 3)
    cfg = ModelConfig.from_hf(base | {"num_hidden_layers": 4})
    kernels_per_layer = len(linear_shapes(cfg)) + 2  # + attention + elementwise
    floor = per_layer / kernels_per_layer
    step_1_b16, step_4_b16 = (_step_s(base, layers, 16) for layers in (1, 4))
    per_seq = max(0.0, (step_1_b16 - step_1) / 15)  # host work per sequence, on a 1-layer model
    # what each extra sequence costs each layer beyond that (small ops that do not reach the roofline)
    per_seq_layer = max(0.0, ((step_4_b16 - step_4) - (step_1_b16 - step_1)) / 3 / 15)
    short, long = _alternated(lambda: _step_s(base, 4, 16), lambda: _step_s(base, 4, 16, LONG_CONTEXT))
    kv_bytes = 16 * (LONG_CONTEXT - 2) * cfg.kv_geometry().bytes_per_token  # every layer's, beyond the short one
    extra_s = max(statistics.median(long) - statistics.median(short), 1e-9)
    params = CostParams(flops_efficiency=1.0, hbm_efficiency=1.0, kernel_floor_s=floor,
                        step_overhead_s=max(0.0, step_1 - per_layer - floor), seq_overhead_s=per_seq,
                        attention_efficiency=min(1.0, kv_bytes / extra_s / profile.hbm_bytes_per_s),
                        seq_layer_overhead_s=per_seq_layer,
                        copies_overlap=False,  # the CPU engine copies inline (SyncTransferEngine)
                        stream_layer_overhead_s=_stream_layer_overhead(profile, base),
                        switch_layer_overhead_s=_switch_layer_overhead(base))
    return _fit_flops_efficiency(profile, params, cfg, _prefill_s(base, cfg))


def _switch_layer_overhead(base: dict, batch: int = 8) -> float:
    """What a 4-layer decode step costs more, per layer, when two models' steps take turns than when one
    model runs alone (its weights no longer wait in the caches); medians of alternating runs."""
    alone, turns = _alternated(lambda: _step_s(base, 4, batch), lambda: _step_s(base, 4, batch, num_models=2))
    return max(0.0, (statistics.median(turns) - statistics.median(alone)) / 4)


def _alternated(first, second, repeats: int = 3) -> tuple[list[float], list[float]]:
    """`repeats` results of each probe, run in turns so that the machine's drift reaches both alike."""
    runs = [(first(), second()) for _ in range(repeats)]
    return [a for a, _ in runs], [b for _, b in runs]


def _prefill_s(base: dict, cfg: ModelConfig, repeats: int = 5) -> float:
    """Median engine step that prefills PREFILL_SHAPE (prompts x tokens) of a 4-layer model."""
    num_seqs, tokens = PREFILL_SHAPE
    engine = LLMEngine(DeviceMemory(pool_pages([cfg], _kv_pages(cfg, num_seqs, tokens + 1)), PAGE),
                       EngineConfig(SchedulerConfig(max_num_batched_tokens=num_seqs * tokens), link_bytes_per_s=1e10))
    engine.add_model("probe", cfg, dummy_weights(cfg, 0), eos_token_ids=())
    times = []
    for _ in range(repeats + 1):  # the first warms up
        for _ in range(num_seqs):
            engine.add_request("probe", [3 + i % 200 for i in range(tokens)], SamplingParams(max_tokens=1))
        times.append(_timed(engine.step))
        while engine.has_unfinished():
            engine.step()
    engine.close()
    return statistics.median(times[1:])


def _fit_flops_efficiency(profile, params: CostParams, cfg: ModelConfig, measured_s: float) -> CostParams:
    """`params` with the FLOP efficiency at which the cost model's PREFILL_SHAPE step takes `measured_s`
    (bisection; the step's time falls as the efficiency rises). The efficiency is against the
    profile's 512^3 matmul, which a prefill's GEMMs may beat, so it may exceed 1."""
    shape = BatchShape.prefill(PREFILL_SHAPE[1], PREFILL_SHAPE[0])
    lo, hi = 0.01, 10.0
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        modelled = CostModel(profile, dataclasses.replace(params, flops_efficiency=mid)).compute_s(cfg, shape)
        lo, hi = (mid, hi) if modelled > measured_s else (lo, mid)
    return dataclasses.replace(params, flops_efficiency=(lo * hi) ** 0.5)


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


def _step_s(base: dict, num_layers: int, batch: int, prompt_len: int = 2, num_models: int = 1) -> float:
    """Median decode step of a model of this family at this batch size over 80 tokens after a prompt
    of `prompt_len`; with `num_models`, as many such models (other weights) whose steps take turns."""
    cfg = ModelConfig.from_hf(base | {"num_hidden_layers": num_layers})
    kv_pages = num_models * _kv_pages(cfg, batch, prompt_len + 80)
    engine = LLMEngine(DeviceMemory(pool_pages([cfg] * num_models, kv_pages), PAGE),
                       EngineConfig(link_bytes_per_s=1e10))
    prompt, ids = [3 + i % 200 for i in range(prompt_len)], []
    for m in range(num_models):
        engine.add_model(f"probe{m}", cfg, dummy_weights(cfg, m), eos_token_ids=())
        ids += [engine.add_request(f"probe{m}", prompt, SamplingParams(max_tokens=80, ignore_eos=True))
                for _ in range(batch)]
    while any(engine.sequence(i).first_token_s is None for i in ids):  # the prefill, not timed
        engine.step()
    times = []
    while engine.has_unfinished():
        times.append(_timed(engine.step))
    engine.close()
    return statistics.median(times)


def _kv_pages(cfg: ModelConfig, num_seqs: int, tokens: int) -> int:
    """KV pages that `num_seqs` sequences of `tokens` tokens each hold, with a page of slack each."""
    return num_seqs * (-(-tokens // (PAGE // cfg.kv_geometry().bytes_per_token)) + 1)


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


def compare(cfgs, weights, num_pages: int, scheduler: SchedulerConfig, profile, base: dict, repeats: int) -> dict:
    """One case as `repeats` pairs, each made back to back: calibrate the parameters from the probes,
    run the real engine, then the simulator with those parameters (it is deterministic). This
    machine's speed drifts by up to 30% over minutes, so a ratio of two runs made together holds
    still where one calibration set against later runs did not; each figure is the median over the
    pairs."""
    settings = EngineConfig(scheduler=scheduler, link_bytes_per_s=profile.link_bytes_per_s)
    pairs = []
    for _ in range(repeats):
        params = measured_params(profile, base)
        real = LLMEngine(DeviceMemory(num_pages, PAGE), settings)
        for name, cfg in cfgs.items():
            real.add_model(name, cfg, weights[name], eos_token_ids=())
        real_numbers = run(real, time.monotonic)
        real.close()
        sim, executor = make_sim_engine(profile, settings, num_pages=num_pages, page_size_bytes=PAGE,
                                        cost=CostModel(profile, params), token_id=0)
        for name, cfg in cfgs.items():
            sim.add_model(name, cfg, meta_weights(cfg), eos_token_ids=())
        sim_numbers = run(sim, executor.clock)
        pairs.append({"params": dataclasses.asdict(params), "real": real_numbers, "sim": sim_numbers,
                      "ratios": {k: sim_numbers[k] / real_numbers[k] for k in METRICS}})
    median = {side: {k: statistics.median(p[side][k] for p in pairs) for k in pairs[0][side]}
              for side in ("real", "sim", "ratios")}
    return {"num_pages": num_pages, **median, "pairs": pairs,
            "within_25pct": all(abs(r - 1) <= 0.25 for r in median["ratios"].values())}


def describe(params: dict) -> str:
    return (f"{params['flops_efficiency']:.2f} of peak FLOP/s (fitted to a prefill step), kernel floor "
            f"{params['kernel_floor_s'] * 1e6:.1f} us, step overhead {params['step_overhead_s'] * 1e3:.2f} ms, "
            f"per sequence {params['seq_overhead_s'] * 1e6:.0f} us, attention at {params['attention_efficiency']:.3f} "
            f"of the bandwidth, {params['stream_layer_overhead_s'] * 1e3:.2f} ms per streamed layer beyond its copy, "
            f"{params['switch_layer_overhead_s'] * 1e6:.0f} us per layer of a step after another model's")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--model", help="a Hugging Face folder: three tenants of it (e.g. $(oneiros pull))")
    ap.add_argument("--cases", default=None, help="comma-separated subset of ample,tight-chunked,tight-vllm-v0")
    ap.add_argument("--repeats", type=int, default=3, help="pairs per case: calibration, real run, simulation")
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
    print(f"cpu profile: {profile.peak_flops / 1e9:.0f} GFLOP/s peak, {profile.hbm_bytes_per_s / 1e9:.0f} GB/s; "
          f"each pair below calibrates the rest from the probes first")
    chosen = cases(ample_kv, tight_kv)
    names = args.cases.split(",") if args.cases else list(chosen)
    if unknown := set(names) - set(chosen):
        ap.error(f"--cases: unknown {sorted(unknown)}; expected some of {', '.join(chosen)}")
    results = {}
    for name in names:
        kv_pages, scheduler = chosen[name]
        r = results[name] = compare(cfgs, weights, pool_pages(cfgs.values(), kv_pages), scheduler,
                                    profile, base, args.repeats)
        print(f"\n{name}: {r['num_pages']} pages ({kv_pages} beyond the parameters), "
              f"{scheduler.preemption_mode.value}, {scheduler.policy.value}; {args.repeats} pairs, medians")
        for i, pair in enumerate(r["pairs"]):
            print(f"  pair {i + 1}: " + describe(pair["params"]) + "; sim/real "
                  + ", ".join(f"{k} {v:.2f}" for k, v in pair["ratios"].items()))
        print(f"{'':<18}{'real':>12}{'sim':>12}{'sim/real':>10}")
        for key in METRICS:
            print(f"{key:<18}{r['real'][key]:>12.4f}{r['sim'][key]:>12.4f}{r['ratios'][key]:>10.3f}")
        for key in COUNTS:
            print(f"{key:<18}{r['real'][key]:>12}{r['sim'][key]:>12}")
        print(f"within 25%: {r['within_25pct']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cases": results, "repeats": args.repeats,
                                         "within_25pct": all(r["within_25pct"] for r in results.values())},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
