"""Fleet simulation: a scaled set of simulated devices behind a router, for autoscaling policies.

Each replica is one simulated device (its own engine, remap policy `ours`, every model loaded) on
its own virtual clock; a discrete-event loop takes the earliest of: the next arrival, the next
autoscaler tick, or the busiest-behind replica's next step. Requests go to the ready replica with
the shortest queue (ties: the most spare pages). Every `tick_s` the scaling policy looks at the
fleet; a new replica serves after `startup_s` (a GPU pod plus model loading), a removed one drains.

Policies:
    memory   autoscaler.policy.decide on KV pressure, queueing delay and TTFT SLO misses (ours)
    queue    Ray Serve's default: ceil(ongoing requests / target_ongoing_requests) replicas, applied
             after Serve's default delays (30 s up, 600 s down), timed as Serve times them: from the
             first of an unbroken run of scale-up (scale-down) decisions, whatever count each asked for

GPU-hours integrate the replicas provisioned (starting, serving or draining) over the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from autoscaler.policy import ClusterLoad, PolicyState, ScalingConfig, decide
from cluster.messages import RouteEntry, RoutingView
from replicas.bench.workload import Request
from replicas.engine.models import ModelConfig
from replicas.engine.sampling import InvalidRequest, SamplingParams
from replicas.sim.devices import DeviceProfile
from replicas.sim.report import summarize
from replicas.sim.run import (
    TOKEN_ID,
    RequestRecord,
    SimSettings,
    build_engine,
    device_pages,
    engine_config,
    request_record,
)

SERVE_UPSCALE_DELAY_S, SERVE_DOWNSCALE_DELAY_S = 30.0, 600.0  # Ray Serve's autoscaling defaults


@dataclass(frozen=True)
class FleetSettings:
    policy: str = "memory"  # "memory" or "queue"
    scaling: ScalingConfig = field(default_factory=lambda: ScalingConfig(min_replicas=1, max_replicas=6))
    tick_s: float = 10.0  # how often the policy decides
    startup_s: float = 60.0  # a new replica's delay before it serves
    target_ongoing_requests: float = 32.0  # the queue policy's per-replica target
    ttft_slo_s: float = 5.0  # TTFT above this is an SLO miss (memory policy input)


@dataclass
class _Replica:
    engine: object
    clock: object
    ready_at_s: float
    started_at_s: float
    draining: bool = False
    live: dict = field(default_factory=dict)  # seq id -> (request, Sequence)

    def busy(self) -> bool:
        return self.engine.has_unfinished()

    def queue(self) -> int:
        return self.engine.num_unfinished()


@dataclass
class FleetResult:
    policy: str
    records: list[RequestRecord]
    summary: dict[str, float]
    gpu_hours: float
    max_replicas: int
    timeline: list[tuple[float, int]]  # (time, replicas provisioned) at every change


def simulate_fleet(workload: Seq[Request], models: Mapping[str, ModelConfig], device: DeviceProfile,
                   fleet: FleetSettings, settings: SimSettings | None = None,
                   tenant_models: Mapping[str, str] | None = None) -> FleetResult:
    settings = settings or SimSettings()
    model_of = dict(tenant_models or {f"t{i}": m for i, m in enumerate(models)})
    requests = sorted(workload, key=lambda r: r.arrival_s)
    pages = device_pages(device, settings)

    def new_replica(now: float, ready: float) -> _Replica:
        engine, sim = build_engine(device, models, engine_config("ours", settings, models=models), pages, settings)
        sim.clock.advance_to(now)
        return _Replica(engine, sim.clock, ready, now)

    start = requests[0].arrival_s if requests else 0.0
    replicas = [new_replica(start, start) for _ in range(fleet.scaling.min_replicas)]
    records: list[RequestRecord] = []
    state, pending_since = PolicyState(), None
    timeline, gpu_s, last_t = [(start, len(replicas))], 0.0, start
    next_tick, i, now = start + fleet.tick_s, 0, start
    recent_ttft: list[tuple[float, float]] = []
    while i < len(requests) or any(r.busy() for r in replicas):
        busy = [r for r in replicas if r.busy()]
        t_step = min((r.clock.now() for r in busy), default=math.inf)
        t_arrival = requests[i].arrival_s if i < len(requests) else math.inf
        now = min(t_step, t_arrival, next_tick)
        gpu_s += len(replicas) * (now - last_t)
        last_t = now
        if now == t_arrival:
            _route(requests[i], replicas, now, model_of, records)
            i += 1
        elif now == next_tick:
            next_tick += fleet.tick_s
            target, state, pending_since = _scale(replicas, now, fleet, state, pending_since, recent_ttft)
            replicas = _resize(replicas, target, now, fleet, new_replica)
            if timeline[-1][1] != len(replicas):
                timeline.append((now, len(replicas)))
        else:
            replica = min(busy, key=lambda r: r.clock.now())
            for out in replica.engine.step():
                if out.finished:
                    request, seq = replica.live.pop(out.seq_id)
                    records.append(request_record(request, seq))
                    recent_ttft.append((replica.clock.now(), records[-1].ttft_s))
            replicas = [r for r in replicas if not (r.draining and not r.busy())]
    records.sort(key=lambda r: r.arrival_s)
    return FleetResult(fleet.policy, records, summarize(records), gpu_s / 3600.0,
                       max(n for _, n in timeline), timeline)


def _route(request: Request, replicas: list[_Replica], now: float, model_of, records) -> None:
    ready = [r for r in replicas if r.ready_at_s <= now and not r.draining] or \
        [min(replicas, key=lambda r: r.ready_at_s)]  # nothing ready yet: queue at the first to start
    model = model_of[request.tenant]
    view = RoutingView(0, now, tuple(_route_entry(str(i), r.engine, model) for i, r in enumerate(ready)))
    # the production router's choice (replicas/service/router.py): in the first group of equally
    # resident hosts, the fewest requests in flight per page of KV room
    best = min(view.host_groups(model)[0], key=lambda e: e.load_per_room(ready[int(e.replica_id)].queue()))
    target = ready[int(best.replica_id)]
    if not target.busy():
        target.clock.advance_to(max(now, target.ready_at_s))
    params = SamplingParams(max_tokens=request.output_len, ignore_eos=True)
    try:
        sid = target.engine.add_request(model, [TOKEN_ID] * request.prompt_len, params)
    except InvalidRequest as exc:
        records.append(RequestRecord(request.tenant, request.arrival_s, None, None, 0, (), 0, str(exc)))
        return
    target.live[sid] = (request, target.engine.sequence(sid))


def _route_entry(replica_id: str, engine, model: str) -> RouteEntry:
    """What a replica's report tells the controller's routing view about one of its tenants."""
    params = engine.memory.params
    return RouteEntry(replica_id, model, len(params.resident_layers(model)) / params.num_layers(model),
                      engine.capacity().spare_pages, engine.num_unfinished(model),
                      sum(engine.memory.kv[m].num_pages_used for m in engine.models))


def _scale(replicas, now, fleet: FleetSettings, state, pending_since, recent_ttft):
    n = len([r for r in replicas if not r.draining])
    starting = len([r for r in replicas if r.ready_at_s > now])
    if fleet.policy == "queue":
        ongoing = sum(r.queue() for r in replicas)
        desired, pending_since = _serve_delay(math.ceil(ongoing / fleet.target_ongoing_requests), n, now,
                                              pending_since)
        # Serve bounds the policy's decision afterwards (AutoscalingState.apply_bounds)
        return min(max(desired, fleet.scaling.min_replicas), fleet.scaling.max_replicas), state, pending_since
    # stats come from the replicas that serve, as Serve's do (a starting replica reports nothing yet:
    # counting its spare pages hid a burst's pressure for the minute it takes to start)
    engines = [r.engine for r in replicas if not r.draining and r.ready_at_s <= now]
    recent_ttft[:] = [(t, x) for t, x in recent_ttft if t >= now - fleet.tick_s]
    load = ClusterLoad(
        now_s=now, num_replicas=n,
        kv_pages_demanded=sum(e.kv_pages_demanded() for e in engines),
        spare_pages=sum(e.capacity().spare_pages for e in engines),
        pages_per_replica=max((e.capacity().max_kv_pages for e in engines), default=1),
        queue_delay_s=max((e.queue_delay_s(now) for e in engines), default=0.0),
        ttft_slo_misses=sum(1 for _, x in recent_ttft if x > fleet.ttft_slo_s),
        num_starting=starting,
    )
    decision = decide(load, fleet.scaling, state)
    return decision.num_replicas, decision.state, pending_since


def _serve_delay(desired: int, target: int, now: float, pending: tuple[int, float] | None):
    """Ray Serve's `_apply_delay_logic` (ray/serve/autoscaling_policy.py, Ray 2.60), on the default
    policy's decision (upscaling/downscaling factor 1, so the decision is ceil(ongoing / target)).

    A decision above the current target is a scale-up decision, below it a scale-down one. Serve notes
    the time of the first of an unbroken run of decisions in one direction and, once the direction's
    delay has passed since then, applies the count decided at that tick, whatever counts the earlier
    decisions in the run asked for. A decision for the current target, or one the other way, ends the
    run. Scaling down goes no lower than 1 unless the target is 1 (scale to zero, which the bounds
    then clip). `pending` is (direction +1/-1, time of the run's first decision) or None; returns the
    count to apply and the new `pending`.
    """
    if desired == target:
        return target, None
    direction = 1 if desired > target else -1
    since = pending[1] if pending is not None and pending[0] == direction else now
    delay = SERVE_UPSCALE_DELAY_S if direction > 0 else SERVE_DOWNSCALE_DELAY_S
    if now - since + 1e-6 < delay:  # Serve's _DELAY_ELAPSED_EPS_S
        return target, (direction, since)
    return (desired if direction > 0 or target == 1 else max(1, desired)), None


def _resize(replicas, target, now, fleet: FleetSettings, new_replica):
    active = [r for r in replicas if not r.draining]
    for _ in range(target - len(active)):
        replicas.append(new_replica(now, now + fleet.startup_s))
    for _ in range(len(active) - target):
        victim = min((r for r in replicas if not r.draining), key=lambda r: (r.queue(), -r.started_at_s))
        victim.draining = True
    return [r for r in replicas if not (r.draining and not r.busy())]
