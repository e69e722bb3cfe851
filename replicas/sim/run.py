"""simulate(): replay a workload on ONE simulated device under one memory policy, on a virtual clock.

The driver owns time between steps: when the engine is idle the clock jumps to the next arrival;
when it is busy the engine steps and every request whose arrival time has passed is added before
the next step. Latencies are measured from each request's *trace* arrival (a request that arrives
mid-step is only seen by the engine after the step, and that wait counts), not from the engine's
own add time, so `tenant_stats` (engine-side, bounded) is not used here.

Policies (all the same engine and scheduler; only memory handling differs):

    recompute  preemption by recompute (vLLM's default)
    swap       preemption by swapping KV to host (vLLM swap, Pie)
    oneiros    remap with the paper's settings: MRU victims, cap 0.75, alpha+1 (alpha+2) staging slots
    ours       remap with our defaults (2-slot staging ring) and the victim order (MRU or LRU) picked
               from the workload's first PILOT_FRACTION of arrivals only (see choose_victim_order)
    static     how vLLM is deployed today: one engine per model, each with its own parameters plus 1/N of
               the device's KV pages (recompute mode), time-slicing the device: engines take turns one
               step at a time on one clock. The paper's "vLLM" baseline.
    static-prop  the same with each engine's KV share proportional to its model's token demand (prompt +
               output tokens of the workload), the split an operator who knows the load would choose

Every policy runs under either scheduler (`SimSettings.scheduler`): `chunked` (ours, the default:
2048-token steps of decodes and prefill chunks, 64 sequences per tenant) or `vllm-v0` (vLLM v0.7.3 as
the paper ran it: whole prefills first, no decodes in a prefill step, a budget of max(max_model_len,
2048) tokens per model, 256 sequences).
    oracle     recompute mode with a pool big enough that KV never runs out (an upper bound)

Invariant: the virtual clock only moves forward, and only by modeled step time or idle jumps to
the next arrival; `wall_s` is the only real time measured.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field


from remap import ModelId, RemapConfig
from remap.controller import VictimOrder
from replicas.bench.workload import Request
from replicas.engine.models import ModelConfig
from replicas.sim.clock import VirtualClock
from replicas.sim.cost import layer_param_bytes
from replicas.sim.devices import DeviceProfile
from replicas.sim.executor import make_sim_engine, meta_weights
from replicas.sim.report import summarize

logger = logging.getLogger(__name__)

class Policy(str, enum.Enum):
    """The memory policies the simulator compares (docs/benchmarks.md)."""

    RECOMPUTE = "recompute"  # one shared pool, preempt by recomputation (vLLM's default)
    SWAP = "swap"  # one shared pool, preempt by swapping KV to host
    ONEIROS = "oneiros"  # parameter remapping as the paper configures it
    OURS = "ours"  # parameter remapping with this project's defaults and a victim order per workload
    STATIC = "static"  # one engine per model, equal KV shares
    STATIC_PROP = "static-prop"  # one engine per model, KV shares proportional to each model's token demand
    ORACLE = "oracle"  # a pool as large as the whole workload needs: no memory pressure


POLICIES = tuple(p.value for p in Policy)
# policy -> the engine's preemption mode and remap settings (None: the defaults); the one mapping
_ENGINE = {
    Policy.RECOMPUTE: ("recompute", None), Policy.SWAP: ("swap", None), Policy.STATIC: ("recompute", None),
    Policy.STATIC_PROP: ("recompute", None), Policy.ORACLE: ("recompute", None), Policy.OURS: ("remap", None),
    # the paper: MRU, cap 0.75, a ring of alpha+1 slots (alpha+2 once alpha >= 9)
    Policy.ONEIROS: ("remap", RemapConfig(victim_order=VictimOrder.MRU, max_remapped_fraction=0.75,
                                          max_staging_slots=None, budget_on_decode=False,
                                          restore_before_admitting=False)),
}
PILOT_FRACTION = 0.1  # share of arrivals `ours` may look at to choose its victim order
TOKEN_ID = 7  # every prompt token; the SimExecutor samples token 0 (neither is an eos of the paper's models)


SCHEDULERS = ("chunked", "vllm-v0")
V0_MIN_BUDGET, V0_MAX_NUM_SEQS = 2048, 256  # vLLM v0.7.3, chunked prefill off: max(max_model_len, 2048) tokens


@dataclass(frozen=True)
class SimSettings:
    scheduler: str = "chunked"  # the engine's scheduling policy: chunked | vllm-v0
    max_num_batched_tokens: int | None = None  # tokens per step; None: 2048 (chunked), max(context, 2048) (vllm-v0)
    max_num_seqs: int | None = None  # running sequences per tenant; None: 64 (chunked), 256 (vllm-v0)
    page_size_bytes: int = 2 << 20  # the CUDA VMM granularity
    reserved_fraction: float = 0.1  # device memory kept for activations and the runtime: 1 - vLLM's
    # gpu_memory_utilization (0.9, its default)
    num_pages: int | None = None  # pool size override (tests); None = from the device's memory
    max_steps: int = 50_000_000  # a runaway guard, per engine


@dataclass(frozen=True)
class RequestRecord:
    tenant: str  # workload tenant name
    arrival_s: float  # trace arrival, virtual seconds
    ttft_s: float | None  # first token time - arrival; None if rejected
    completion_s: float | None  # last token time - arrival
    num_tokens: int  # output tokens produced
    tbt_s: tuple[float, ...]  # gaps between consecutive output tokens
    num_preemptions: int  # times this request was preempted
    rejected: str | None = None  # why the engine refused it (too long for the pool / context)


@dataclass
class SimResult:
    policy: str
    device: str
    records: list[RequestRecord]
    summary: dict[str, float]  # see summarize()
    wall_s: float  # real seconds the simulation took
    num_steps: int = 0
    num_preemptions: int = 0
    notes: dict[str, str] = field(default_factory=dict)  # policy choices made at run time (e.g. victim order)


# ---- the replay loop ----------------------------------------------------------------------------
def _replay(engines: Mapping[str, object], clock: VirtualClock, requests: Seq[Request], model_of: Mapping[str, str],
            max_steps: int) -> list[RequestRecord]:
    """Replay `requests` on `engines` (model name -> the engine serving it; one engine may serve
    several models). Engines share `clock` and one device: they take turns, one step at a time, in
    round robin among those with work, the way separate processes time-slice one GPU."""
    from replicas.engine.sampling import InvalidRequest, SamplingParams

    distinct = list({id(e): e for e in engines.values()}.values())
    live: dict = {}  # (engine index, seq id) -> (request, Sequence)
    index_of = {id(e): k for k, e in enumerate(distinct)}
    records: list[RequestRecord] = []
    i, n, steps, turn = 0, len(requests), 0, 0
    stalled: set[int] = set()  # engines whose last step could not run, since the clock last moved
    while (unfinished := any(e.has_unfinished() for e in distinct)) or i < n:
        if not unfinished:
            clock.advance_to(requests[i].arrival_s)  # idle: jump
        while i < n and requests[i].arrival_s <= clock.now():
            r = requests[i]
            i += 1
            model = model_of[r.tenant]
            engine = engines[model]
            params = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
            try:
                sid = engine.add_request(model, [TOKEN_ID] * r.prompt_len, params)
            except InvalidRequest as exc:
                records.append(RequestRecord(r.tenant, r.arrival_s, None, None, 0, (), 0, str(exc)))
                continue
            live[(index_of[id(engine)], sid)] = (r, engine.sequence(sid))
        busy = [k for k, e in enumerate(distinct) if e.has_unfinished()]
        if not busy:
            continue
        k = min(busy, key=lambda b: (b - turn) % len(distinct))  # the next engine with work after the last one
        turn = k + 1
        before = clock.now()
        for out in distinct[k].step():
            if out.finished:
                r, seq = live.pop((k, out.seq_id))
                records.append(request_record(r, seq))
        steps += 1
        if steps > max_steps:
            raise RuntimeError(f"replay not done after {max_steps} steps ({len(live)} requests live)")
        if clock.now() > before:
            stalled.clear()
        else:
            stalled.add(k)
            if stalled >= {b for b, e in enumerate(distinct) if e.has_unfinished()}:
                if i >= n:  # found on C2 under vllm-v0 (b7e53ed): 50M empty steps at one instant
                    raise RuntimeError(f"no engine can run a step and no request is left to arrive "
                                       f"({len(live)} requests live, t={clock.now():.3f} s): the engine livelocks")
                clock.advance_to(requests[i].arrival_s)  # no step could run: nothing to do until the next arrival
                stalled.clear()
    return records


def request_record(r: Request, seq) -> RequestRecord:
    times = seq.token_times_s
    gaps = tuple(float(b - a) for a, b in itertools.pairwise(times))
    return RequestRecord(r.tenant, r.arrival_s, times[0] - r.arrival_s, times[-1] - r.arrival_s, len(times),
                         gaps, seq.num_preemptions)


# ---- engines per policy -------------------------------------------------------------------------
def engine_config(policy: str, settings: SimSettings, victim_order: VictimOrder = VictimOrder.MRU,
                  models: Mapping[str, ModelConfig] | None = None):
    """The engine settings of a policy (ValueError for an unknown one); `victim_order` is ours; `models`
    give vllm-v0 its per-model budgets."""
    from replicas.engine.engine import EngineConfig
    from replicas.engine.scheduler import SchedulerConfig, SchedulingPolicy

    policy = Policy(policy)
    mode, remap = _ENGINE[policy]
    remap = RemapConfig(victim_order=victim_order) if policy is Policy.OURS else remap or RemapConfig()
    v0 = SchedulingPolicy(settings.scheduler) is SchedulingPolicy.VLLM_V0
    budgets = {}
    if v0 and settings.max_num_batched_tokens is None:
        budgets = {name: max(c.max_position_embeddings, V0_MIN_BUDGET) for name, c in (models or {}).items()}
    sched = SchedulerConfig(
        max_num_batched_tokens=settings.max_num_batched_tokens or (max(budgets.values(), default=V0_MIN_BUDGET)
                                                                   if v0 else 2048),
        max_num_seqs=settings.max_num_seqs or (V0_MAX_NUM_SEQS if v0 else 64),
        preemption_mode=mode, policy=settings.scheduler, model_budgets=budgets)
    return EngineConfig(scheduler=sched, remap=remap)


def _probe(models: Mapping[str, ModelConfig], device: DeviceProfile, settings: SimSettings):
    """An engine with room for everything, to read exact page counts (parameters, KV blocks) off the
    real ParamStore and KV managers instead of re-deriving their rounding here."""
    big = sum(c.num_layers * (-(-layer_param_bytes(c) // settings.page_size_bytes) + 8) for c in models.values())
    engine, _ = build_engine(device, models, engine_config("recompute", settings, models=models), 4 * big + 4096,
                             settings)
    return engine


def param_pages(models: Mapping[str, ModelConfig], device: DeviceProfile, settings: SimSettings) -> dict[str, int]:
    """Pages each model's parameters take in the pool (layer slabs plus the base slab)."""
    out = {}
    for name, config in models.items():
        engine = _probe({name: config}, device, settings)
        out[name] = engine.memory.pool.num_pages - engine.memory.pool.num_free
    return out


def device_pages(device: DeviceProfile, settings: SimSettings) -> int:
    if settings.num_pages is not None:
        return settings.num_pages
    return int(device.memory_bytes * (1 - settings.reserved_fraction)) // settings.page_size_bytes


def build_engine(device: DeviceProfile, models: Mapping[str, ModelConfig], engine_config, num_pages: int,
           settings: SimSettings, clock: VirtualClock | None = None):
    engine, sim = make_sim_engine(device, engine_config, num_pages=num_pages, page_size_bytes=settings.page_size_bytes,
                                  token_id=0, clock=clock)
    for name, config in models.items():
        engine.add_model(name, config, meta_weights(config))
    return engine, sim


def _shared_run(policy, workload, models, model_of, device, settings, num_pages, victim_order=VictimOrder.MRU):
    engine, sim = build_engine(device, models, engine_config(policy, settings, victim_order, models), num_pages,
                               settings)
    records = _replay(dict.fromkeys(models, engine), sim.clock, workload, model_of, settings.max_steps)
    return records, sim.stats.num_steps, engine.num_preemptions


def static_split(workload, models, model_of, device, settings, proportional: bool) -> tuple[dict[str, int], str]:
    """Each engine's KV pages as vLLM would get them on one device: the device's memory times
    gpu_memory_utilization (1 - reserved_fraction), less every model's parameters, split equally or in
    proportion to each model's token demand (prompt + output tokens). Also the sentence that says so."""
    total = device_pages(device, settings)
    params = param_pages(models, device, settings)
    kv_total = total - sum(params.values())
    if kv_total < len(models):
        raise ValueError(f"{device.name}: the models' parameters ({sum(params.values())} pages) fill the pool "
                         f"({total} pages)")
    demand = dict.fromkeys(models, 0)
    for r in workload:
        demand[model_of[r.tenant]] += r.prompt_len + r.output_len
    weights = demand if proportional and sum(demand.values()) else dict.fromkeys(models, 1)
    shares = {m: max(1, kv_total * w // sum(weights.values())) for m, w in weights.items()}
    gb = settings.page_size_bytes / 1e9
    said = (f"{device.memory_bytes / 1e9:.0f} GB x gpu_memory_utilization {1 - settings.reserved_fraction:g} = "
            f"{total * gb:.1f} GB; parameters " + ", ".join(f"{m} {params[m] * gb:.1f}" for m in models)
            + f" GB; KV {kv_total * gb:.1f} GB split {'by token demand' if proportional else 'equally'}: "
            + ", ".join(f"{m} {shares[m] * gb:.1f} GB" for m in models))
    return {m: params[m] + shares[m] for m in models}, said


def _static_run(workload, models, model_of, device, settings, proportional: bool = False):
    """How vLLM is deployed today: one engine per model, each with its own parameters plus a fixed share
    of the KV pages (recompute mode), all time-slicing one device on one clock."""
    pages, said = static_split(workload, models, model_of, device, settings, proportional)
    clock, engines, sims = VirtualClock(), {}, []
    for name, config in models.items():
        engine, sim = build_engine(device, {name: config}, engine_config("static", settings, models={name: config}),
                                   pages[name], settings, clock)
        engines[name] = engine
        sims.append(sim)
    records = _replay(engines, clock, workload, model_of, settings.max_steps)
    return (records, sum(s.stats.num_steps for s in sims),
            sum(e.num_preemptions for e in engines.values()), said)


def _oracle_pages(workload, models, model_of, device, settings) -> int:
    """Parameters plus KV for every tenant's max_num_seqs longest requests at once: nothing is ever preempted."""
    engine = _probe(models, device, settings)
    pages = engine.memory.pool.num_pages - engine.memory.pool.num_free
    lens: dict[str, list[int]] = {m: [] for m in models}
    for r in workload:
        lens[model_of[r.tenant]].append(r.prompt_len + r.output_len)
    for name, ns in lens.items():
        kv = engine.memory.kv[ModelId(name)]
        pages += sum(kv.num_blocks_for(n) for n in sorted(ns, reverse=True)[: settings.max_num_seqs])
    return pages + 64  # staging slots and rounding


# ---- victim order for `ours` ---------------------------------------------------------------------
def choose_victim_order(workload: Seq[Request], fraction: float = PILOT_FRACTION) -> VictimOrder:
    """MRU or LRU from the first `fraction` of arrivals only: whenever a tenant other than the last
    one arrives, was it the most or the least recently used of the others? Lend the layers of the
    kind that comes back less often (the paper's MRU argument is turn-taking; Zipf traffic with a
    dominant tenant favours LRU instead). Ties keep the paper's MRU."""
    pilot = workload[: max(1, int(len(workload) * fraction))]
    last_use: dict[str, int] = {}
    mru_hits = lru_hits = 0
    prev = None
    for k, r in enumerate(pilot):
        others = {t: s for t, s in last_use.items() if t != prev}
        if r.tenant != prev and len(others) >= 2 and r.tenant in others:
            ordered = sorted(others, key=others.get)
            mru_hits += r.tenant == ordered[-1]
            lru_hits += r.tenant == ordered[0]
        last_use[r.tenant] = k
        prev = r.tenant
    return VictimOrder.LRU if mru_hits > lru_hits else VictimOrder.MRU


# ---- the entry point ------------------------------------------------------------------------------
def simulate(workload: Seq[Request], models: Mapping[str, ModelConfig], device: DeviceProfile, policy: str,
             settings: SimSettings | None = None, tenant_models: Mapping[str, str] | None = None) -> SimResult:
    """Replay `workload` (sorted by arrival) on one `device` under `policy`.

    `models` maps model names to configs; `tenant_models` maps the workload's tenants (t0, t1, ...)
    to model names, by default t_i -> the i-th model."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}: expected one of {POLICIES}")
    settings = settings or SimSettings()
    names = list(models)
    model_of = dict(tenant_models or {f"t{i}": m for i, m in enumerate(names)})
    unknown = {r.tenant for r in workload} - model_of.keys()
    if unknown:
        raise ValueError(f"tenants {sorted(unknown)} map to no model; models: {names}")
    workload = sorted(workload, key=lambda r: r.arrival_s)
    notes: dict[str, str] = {}
    start = time.perf_counter()
    if settings.scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler {settings.scheduler!r}: expected one of {SCHEDULERS}")
    notes["scheduler"] = settings.scheduler
    if policy in ("static", "static-prop"):
        records, steps, preempted, notes["memory"] = _static_run(workload, models, model_of, device, settings,
                                                                 proportional=policy == "static-prop")
    elif policy == "oracle":
        pages = max(device_pages(device, settings), _oracle_pages(workload, models, model_of, device, settings))
        notes["num_pages"] = str(pages)
        records, steps, preempted = _shared_run(policy, workload, models, model_of, device, settings, pages)
    else:
        order = choose_victim_order(workload) if policy == "ours" else VictimOrder.MRU
        if policy == "ours":
            notes["victim_order"] = order.value
        records, steps, preempted = _shared_run(policy, workload, models, model_of, device, settings,
                                                device_pages(device, settings), order)
    wall_s = time.perf_counter() - start
    records.sort(key=lambda rec: rec.arrival_s)
    return SimResult(policy, device.name, records, summarize(records), wall_s, steps, preempted, notes)


def simulate_all(workload, models, device, policies: Seq[str] = POLICIES, settings: SimSettings | None = None,
                 progress: Callable[[SimResult], None] | None = None) -> dict[str, SimResult]:
    out = {}
    for policy in policies:
        out[policy] = simulate(workload, models, device, policy, settings)
        if progress:
            progress(out[policy])
    return out
