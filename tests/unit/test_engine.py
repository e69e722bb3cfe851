"""LLMEngine end to end on real tensors: greedy output equals Hugging Face `generate`, token for
token, batched, with tenants interleaved, and across forced reclaim / streaming / restore / KV
migration / swap / recompute in the middle of generation."""

from __future__ import annotations

import json

import pytest
import torch

from remap import DeviceMemory, ModelId, Owner, OwnerKind, make_backend, opaque
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.models import ModelConfig, dummy_weights, ops
from replicas.engine.sampling import InvalidRequest, SamplingParams
from replicas.engine.scheduler import PreemptionMode, SchedulerConfig

transformers = pytest.importorskip("transformers")
from tests.unit.factories import needs_host_vmm  # noqa: E402
from tests.unit.hf_reference import KINDS, hf_greedy, make_config, make_hf_model  # noqa: E402

PAGE = 16 << 10
LLAMA = make_config("llama_gqa", num_hidden_layers=4)
OPT = make_config("opt")
PROMPTS = [[5, 17, 33, 9, 70, 11, 4], [8, 99, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52]]
MAX_TOKENS = 12


def hf_generate(hf_config: dict, state: dict, prompt: list[int], n: int = MAX_TOKENS) -> list[int]:
    return hf_greedy(make_hf_model(hf_config, state), prompt, n)


def make_engine(num_pages: int = 256, mode: str = "remap", backend: str = "arena", copies_overlap: bool | None = None,
                **sched) -> LLMEngine:
    memory = DeviceMemory(num_pages, PAGE, backend=make_backend(backend, num_pages, PAGE))
    config = EngineConfig(scheduler=SchedulerConfig(preemption_mode=PreemptionMode(mode), **sched),
                          link_bytes_per_s=10e9, copies_overlap=copies_overlap)
    return LLMEngine(memory, config)


def add_tenant(engine: LLMEngine, name: str, hf_config: dict, seed: int, tokenizer=None):
    config = ModelConfig.from_hf(hf_config)
    state = dummy_weights(config, seed)
    # no eos: every request runs to max_tokens, a longer exactness check
    engine.add_model(name, config, state, eos_token_ids=(), tokenizer=tokenizer)
    return state


PARAMS = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def reference():
    """HF greedy outputs for each (family, seed, prompt), computed once."""
    cache = {}

    def get(hf_config, state, seed, prompt):
        k = (json.dumps(hf_config, sort_keys=True), seed, tuple(prompt))
        if k not in cache:
            cache[k] = hf_generate(hf_config, state, prompt)
        return cache[k]

    return get


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "opt_post_ln"])  # post-LN OPT repeats one token
def test_batched_greedy_output_equals_hugging_face(kind, reference):
    hf_config = make_config(kind)
    engine = make_engine()
    state = add_tenant(engine, "m", hf_config, seed=3)
    got = engine.generate("m", PROMPTS, PARAMS)
    for prompt, out in zip(PROMPTS, got):
        assert out == reference(hf_config, state, 3, prompt)
        assert len(set(out)) > 2  # wide weights: the output is not one repeated token
    engine.memory.check_integrity()


def test_interleaved_tenants_with_chunked_prefill_equal_hugging_face(reference):
    engine = make_engine(max_num_batched_tokens=8)  # the 13-token prompt is prefilled in 2 chunks
    states = {name: add_tenant(engine, name, cfg, seed) for name, cfg, seed in
              (("a", LLAMA, 3), ("b", OPT, 3), ("c", LLAMA, 4))}
    ids = {name: [engine.add_request(name, p, PARAMS) for p in PROMPTS] for name in states}
    served = []
    while engine.has_unfinished():
        served += {o.model for o in engine.step()}
    assert set(served[:3]) == {"a", "b", "c"}  # round robin across tenants
    for name, cfg, seed in (("a", LLAMA, 3), ("b", OPT, 3), ("c", LLAMA, 4)):
        for prompt, i in zip(PROMPTS, ids[name]):
            want = reference(cfg, states[name], seed, prompt)
            assert engine.sequence(i).output_token_ids == want, name
    engine.memory.check_integrity()


def run_with(engine: LLMEngine, mid_generation, steps_before: int = 4) -> list[list[int]]:
    ids = [engine.add_request("m", p, PARAMS) for p in PROMPTS]
    for _ in range(steps_before):
        engine.step()
    mid_generation(engine)
    engine.memory.check_integrity()
    while engine.has_unfinished():
        engine.step()
    engine.memory.check_integrity()
    return [engine.sequence(i).output_token_ids for i in ids]


def _reclaim_running_layers(engine):
    for layer in (1, 3):
        engine.memory.reclaim(ModelId("m"), layer)


def _restore_after_reclaim(engine):
    _reclaim_running_layers(engine)
    engine.step()  # one step streams layers 1 and 3 through the staging ring
    for layer in (1, 3):
        assert engine.memory.restore(ModelId("m"), layer).restored


def _migrate_all_blocks(engine):
    kv = engine.memory.kv[ModelId("m")]
    for seq in kv.sequences:
        table = list(kv.table(seq))
        dst = engine.memory.pool.alloc(len(table), engine.memory.pool.owner(table[0]))
        kv.migrate(table, dst)


def _swap_out_and_back(engine):
    kv = engine.memory.kv[ModelId("m")]
    for seq in kv.sequences:
        kv.swap_out(seq)
    for seq in [s for s in range(10) if kv.is_swapped(s)]:
        assert kv.swap_in(seq) is not None


def _preempt_by_recompute(engine):
    sched = engine.scheduler
    for seq in list(sched.running[ModelId("m")]):
        sched._preempt(seq)  # noqa: SLF001 - force the recompute path mid-generation


@pytest.fixture(params=["plain", "blocked"])
def weights(request, monkeypatch):
    """How the engine stores these tiny models' matrices on the CPU: as they are (below
    ops.ONEDNN_MIN_WEIGHT), or fused and in oneDNN's blocked layout, as a mid-size model's are."""
    if request.param == "blocked":
        if not opaque.AVAILABLE:
            pytest.skip("this torch cannot store oneDNN's blocked layout in a slab")
        monkeypatch.setattr(ops, "ONEDNN_MIN_WEIGHT", 0)
    return request.param


def _stores_blocked(engine) -> bool:
    return any(t.is_mkldnn for t in engine.memory.params.tensors(ModelId("m"), 0).values())


@pytest.mark.parametrize("event", [_reclaim_running_layers, _restore_after_reclaim, _migrate_all_blocks,
                                   _swap_out_and_back, _preempt_by_recompute],
                         ids=["reclaim+stream", "restore", "migrate", "swap", "recompute"])
def test_greedy_output_is_exact_across_memory_events_mid_generation(event, reference, weights):
    engine = make_engine(mode="recompute")  # no controller: only the forced event moves memory
    state = add_tenant(engine, "m", LLAMA, seed=3)
    assert _stores_blocked(engine) == (weights == "blocked")
    got = run_with(engine, event)
    for prompt, out in zip(PROMPTS, got):
        assert out == reference(LLAMA, state, 3, prompt)


def _restore_into_other_pages(engine):
    """Reclaim, stream one step, then restore while a fence holds the layers' old pages."""
    memory, m = engine.memory, ModelId("m")
    old = [p for layer in (1, 3) for p in memory.params.slab(m, layer).pages]
    _reclaim_running_layers(engine)
    engine.step()  # streams layers 1 and 3 through the staging ring; KV may grow into old pages
    memory.close_stream(m)
    fence = [p for p in old if memory.pool.owner(p).kind is OwnerKind.FREE]
    assert memory.pool.claim(fence, Owner(OwnerKind.STAGING, ModelId("<fence>"), 0))
    for layer in (1, 3):
        outcome = memory.restore(m, layer)
        assert outcome.restored and outcome.num_blocks_migrated == 0
        assert not set(memory.params.slab(m, layer).pages) & set(old)
    memory.pool.free(fence)


@needs_host_vmm(PAGE)
def test_greedy_output_is_exact_when_layers_come_back_in_other_pages_on_vmm(reference, weights):
    engine = make_engine(mode="recompute", backend="vmm")
    state = add_tenant(engine, "m", LLAMA, seed=3)
    assert _stores_blocked(engine) == (weights == "blocked")
    got = run_with(engine, _restore_into_other_pages)
    for prompt, out in zip(PROMPTS, got):
        assert out == reference(LLAMA, state, 3, prompt)
    engine.close()


def test_seeded_sampling_is_reproducible_and_differs_from_greedy():
    outs = []
    for _ in range(2):
        engine = make_engine()
        add_tenant(engine, "m", LLAMA, seed=3)
        params = SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=7, ignore_eos=True)
        outs.append(engine.generate("m", [PROMPTS[0]], params)[0])
    assert outs[0] == outs[1]
    engine = make_engine()
    add_tenant(engine, "m", LLAMA, seed=3)
    assert engine.generate("m", [PROMPTS[0]], SamplingParams(max_tokens=10, ignore_eos=True))[0] != outs[0]


@pytest.mark.parametrize("kwargs, prompt, match", [
    (dict(), [1] * 120, "exceeds the context length 128"),
    (dict(), [1, 500], r"token ids \[500\] are outside the vocabulary \[0, 112\)"),
    (dict(), [], "prompt is empty"),
])
def test_bad_requests_get_a_clear_error_and_others_are_unaffected(kwargs, prompt, match, reference):
    engine = make_engine()
    state = add_tenant(engine, "m", LLAMA, seed=3)
    good = engine.add_request("m", PROMPTS[1], PARAMS)
    with pytest.raises(InvalidRequest, match=match):
        engine.add_request("m", prompt, SamplingParams(max_tokens=10, **kwargs))
    with pytest.raises(InvalidRequest, match="unknown model 'nope'"):
        engine.add_request("nope", PROMPTS[0], PARAMS)
    while engine.has_unfinished():
        engine.step()
    assert engine.sequence(good).output_token_ids == reference(LLAMA, state, 3, PROMPTS[1])


def test_max_model_len_caps_the_context_a_model_is_served_with():
    engine = make_engine()
    engine.add_model("m", ModelConfig.from_hf(LLAMA), dummy_weights(ModelConfig.from_hf(LLAMA), 3), max_model_len=40)
    with pytest.raises(InvalidRequest, match="exceeds the context length 40 of 'm'"):
        engine.add_request("m", [1] * 31, SamplingParams(max_tokens=10))
    engine.add_request("m", [1] * 30, SamplingParams(max_tokens=10))  # exactly 40 is served


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling_values_are_refused(kwargs, match):
    with pytest.raises(InvalidRequest, match=match):
        SamplingParams(**kwargs)


def test_abort_frees_pages_at_once():
    engine = make_engine()
    add_tenant(engine, "m", LLAMA, seed=3)
    free = engine.memory.pool.num_free
    seq = engine.add_request("m", PROMPTS[2], PARAMS)
    engine.step()
    assert engine.memory.pool.num_free < free
    assert engine.abort(seq) and not engine.abort(seq)
    assert engine.memory.pool.num_free == free and not engine.has_unfinished()
    assert engine.sequence(seq).finish_reason.value == "abort"
    engine.memory.check_integrity()


def param_pages(hf_config: dict) -> int:
    """Pages one tenant's parameters take (measured by registering it in a roomy pool)."""
    engine = make_engine(num_pages=1000)
    add_tenant(engine, "probe", hf_config, seed=0)
    return 1000 - engine.memory.pool.num_free


def test_under_kv_exhaustion_remap_admits_more_sequences_than_swap_and_recompute():
    """Three tenants fill most of the pool with parameters; one of them gets a burst."""
    results = {}
    prompts = [[(7 * i + j) % 120 + 3 for j in range(40)] for i in range(8)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    for mode in ("remap", "swap", "recompute"):
        engine = make_engine(num_pages=3 * param_pages(LLAMA) + 15, mode=mode)
        for name, seed in (("hot", 3), ("idle1", 4), ("idle2", 5)):
            add_tenant(engine, name, LLAMA, seed)
        assert engine.memory.pool.num_free == 15
        engine.generate("idle1", [PROMPTS[0]], SamplingParams(max_tokens=2))  # tenants with a past
        engine.generate("idle2", [PROMPTS[0]], SamplingParams(max_tokens=2))
        ids = [engine.add_request("hot", p, params) for p in prompts]
        peak = 0
        for _ in range(10_000):
            if not engine.has_unfinished():
                break
            engine.step()
            peak = max(peak, len(engine.scheduler.running[ModelId("hot")]))
            engine.memory.check_integrity()
        assert not engine.has_unfinished(), f"{mode}: stuck"
        results[mode] = (peak, [engine.sequence(i).output_token_ids for i in ids])
    assert results["remap"][0] > results["swap"][0] and results["remap"][0] > results["recompute"][0], results
    assert results["remap"][1] == results["swap"][1] == results["recompute"][1]  # nothing lost, all exact
    assert all(len(out) == 24 for out in results["remap"][1])


@pytest.mark.parametrize("mode", ["remap", "swap", "recompute"])
def test_under_vllm_v0_scheduling_greedy_output_equals_hugging_face_through_preemption_and_remap(mode, reference):
    """vLLM v0's policy (whole prefills, no decodes in a prefill step, the last admitted preempted) on
    a pool where KV runs out: every output is Hugging Face's, as under `chunked`."""
    prompts = [[(7 * i + j) % 120 + 3 for j in range(20 + i)] for i in range(6)]
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    engine = make_engine(num_pages=3 * param_pages(LLAMA) + 6, mode=mode, policy="vllm-v0",
                         max_num_batched_tokens=64)
    states = {name: add_tenant(engine, name, LLAMA, seed) for name, seed in (("hot", 3), ("idle1", 4), ("idle2", 5))}
    engine.generate("idle1", [PROMPTS[0]], SamplingParams(max_tokens=2))  # tenants with a past: remap lends them
    engine.generate("idle2", [PROMPTS[0]], SamplingParams(max_tokens=2))
    ids = [engine.add_request("hot", p, params) for p in prompts]
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        engine.step()
        engine.memory.check_integrity()
    assert not engine.has_unfinished()
    assert engine.num_preemptions > 0 or engine.memory.num_reclaims > 0  # KV ran short
    for prompt, i in zip(prompts, ids):
        assert engine.sequence(i).output_token_ids == reference(LLAMA, states["hot"], 3, prompt)
    with pytest.raises(InvalidRequest, match="step budget 64"):  # prefilled whole: longer ones cannot run
        engine.add_request("hot", [5] * 60, params)


@pytest.mark.parametrize("copies_overlap", [True, False], ids=["copies overlap (GPU)", "inline copies (CPU)"])
def test_a_reactivated_tenant_streams_its_lent_layers_and_reversion_restores_them(reference, copies_overlap):
    # Where copies overlap compute, the woken tenant streams its lent layers within its alpha budget.
    # Where they run inline (this CPU's SyncTransferEngine) none hide: it takes them back instead.
    engine = make_engine(num_pages=3 * param_pages(LLAMA) + 15, mode="remap", copies_overlap=copies_overlap)
    assert engine.remap.copies_overlap is copies_overlap
    states = {name: add_tenant(engine, name, LLAMA, seed) for name, seed in (("hot", 3), ("idle1", 4), ("idle2", 5))}
    engine.generate("idle1", [PROMPTS[0]], SamplingParams(max_tokens=2))
    prompts = [[(7 * i + j) % 100 + 3 for j in range(40)] for i in range(8)]
    for p in prompts:
        engine.add_request("hot", p, SamplingParams(max_tokens=24, ignore_eos=True))
    for _ in range(3):
        engine.step()
    lent = engine.memory.params.num_layers(ModelId("idle1")) - engine.tenant_stats("idle1").resident_layers
    assert lent > 0  # the burst borrowed idle1's layers
    woken = engine.add_request("idle1", PROMPTS[2], PARAMS)  # idle1 wakes up with layers lent out
    while engine.has_unfinished():
        engine.step()
        engine.memory.check_integrity()
    assert (engine.num_layers_streamed > 0) is copies_overlap
    assert engine.sequence(woken).output_token_ids == reference(LLAMA, states["idle1"], 4, PROMPTS[2])
    engine.step()  # idle: demand has fallen, the controller gives every page back to parameters
    for name in states:
        stats = engine.tenant_stats(name)
        assert stats.resident_layers == stats.num_layers, name
    engine.memory.check_integrity()


def test_the_cpus_inline_copies_hide_under_no_compute():
    assert make_engine().remap.copies_overlap is False  # DeviceMemory on the CPU copies inline
    assert make_engine(copies_overlap=True).remap.copies_overlap is True


def test_logprobs_of_greedy_tokens_match_the_reference_distribution():
    engine = make_engine()
    state = add_tenant(engine, "m", LLAMA, seed=3)
    seq = engine.add_request("m", PROMPTS[0], SamplingParams(max_tokens=5, logprobs=3, ignore_eos=True))
    streamed = []
    while engine.has_unfinished():
        streamed += [lp for o in engine.step() for lp in o.logprobs]
    out = engine.sequence(seq)
    assert streamed == out.output_logprobs and len(streamed) == 5
    hf = make_hf_model(LLAMA, state)
    for i, (token, entry) in enumerate(zip(out.output_token_ids, out.output_logprobs)):
        with torch.no_grad():
            ref = hf(torch.tensor([PROMPTS[0] + out.output_token_ids[:i]])).logits[0, -1].log_softmax(-1)
        assert len(entry) == 3 and entry[token] == max(entry.values())  # greedy: the chosen is the top one
        for t, lp in entry.items():
            assert abs(lp - float(ref[t])) < 1e-4


def test_a_second_staging_slot_is_worth_a_preemption(reference):
    # room for one slot only: one slot would serialize copies with compute, so the engine preempts
    # (recompute) to open two, and the outputs stay exact
    engine = make_engine(mode="recompute")  # no plans: the two reclaimed layers stay lent
    state = add_tenant(engine, "m", LLAMA, seed=3)
    ids = [engine.add_request("m", p, PARAMS) for p in PROMPTS]
    engine.step()
    m = ModelId("m")
    for layer in (1, 2):
        engine.memory.reclaim(m, layer)
    slot = engine.memory.params.max_layer_pages(m)
    latest = max(engine.scheduler.running[m], key=lambda s: s.arrival_s)
    engine.memory.kv[m].alloc(latest.seq_id, engine.memory.pool.num_free - slot)  # one slot's pages left
    engine.step()
    ring = engine.memory.ring(m)
    assert ring is not None and ring.num_slots == 2 and engine.scheduler.num_preemptions == 1
    while engine.has_unfinished():
        engine.step()
    for prompt, i in zip(PROMPTS, ids):
        assert engine.sequence(i).output_token_ids == reference(LLAMA, state, 3, prompt)
    engine.memory.check_integrity()


def test_no_room_for_a_staging_slot_preempts_instead_of_failing(reference):
    engine = make_engine(mode="recompute")
    state = add_tenant(engine, "m", LLAMA, seed=3)
    ids = [engine.add_request("m", p, PARAMS) for p in PROMPTS]
    engine.step()
    engine.memory.reclaim(ModelId("m"), 2)
    first = engine.scheduler.running[ModelId("m")][0]
    engine.memory.kv[ModelId("m")].alloc(first.seq_id, engine.memory.pool.num_free)  # KV takes every page
    assert engine.memory.pool.num_free == 0
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.num_preemptions >= 1 and engine.num_layers_streamed > 0
    for prompt, i in zip(PROMPTS, ids):
        assert engine.sequence(i).output_token_ids == reference(LLAMA, state, 3, prompt)
    engine.memory.check_integrity()
