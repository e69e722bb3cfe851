"""Scaling on memory pressure: how many engine replicas the cluster wants. Pure; time passed in.

Ray Serve's default scales on queue length, which reacts late and ignores the pages that remapping
can still lend. Here the signal is cluster-wide KV pressure:

    pressure = KV pages demanded / (free + reclaimable pages of all replicas)

plus queueing delay and TTFT SLO misses. Scale up only after pressure has lasted `upscale_delay_s`
(a blip is not a trend), by as many replicas as the page deficit needs; scale down one replica at a
time, only after `downscale_delay_s` of calm and `cooldown_s` since the last change, and never below
the replicas that hold the only copy of a warm (not cold) model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ScalingConfig:
    min_replicas: int = 1
    max_replicas: int = 8
    high_pressure: float = 0.9  # demand / spare above this is pressure
    low_pressure: float = 0.3  # below this (and no queueing, no SLO misses) is calm
    max_queue_delay_s: float = 2.0  # oldest waiting request older than this is pressure too
    upscale_delay_s: float = 15.0  # pressure must last this long before adding replicas
    downscale_delay_s: float = 120.0  # calm must last this long before removing one
    cooldown_s: float = 60.0  # no scale-down this soon after any change

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if not 0 <= self.low_pressure < self.high_pressure:
            raise ValueError(f"need 0 <= low_pressure < high_pressure, got {self.low_pressure}, {self.high_pressure}")


@dataclass(frozen=True)
class ClusterLoad:
    now_s: float  # the caller's clock
    num_replicas: int  # replicas asked for (running or starting): the count a decision changes
    kv_pages_demanded: int  # KV pages that running and waiting requests need, summed over replicas
    spare_pages: int  # free + reclaimable pages, summed over replicas
    pages_per_replica: int  # what one more replica would add: the KV pages its pool could hold (Capacity.max_kv_pages)
    queue_delay_s: float = 0.0  # age of the oldest waiting request anywhere
    ttft_slo_misses: int = 0  # requests over the TTFT SLO in the last window
    pinned_replicas: int = 0  # replicas holding the only copy of a warm model: never removed
    num_starting: int = 0  # of num_replicas, not running yet: no further scale-up until they are


@dataclass(frozen=True)
class PolicyState:
    pressure_since_s: float | None = None  # when the current stretch of pressure began
    calm_since_s: float | None = None  # when the current stretch of calm began
    last_change_s: float | None = None  # when the replica count last changed


@dataclass(frozen=True)
class ScalingDecision:
    num_replicas: int  # desired replica count
    state: PolicyState  # to pass back next time
    reason: str  # why, with the numbers


def pressure(load: ClusterLoad) -> float:
    if load.spare_pages <= 0:
        return math.inf if load.kv_pages_demanded > 0 else 0.0
    return load.kv_pages_demanded / load.spare_pages


def decide(load: ClusterLoad, config: ScalingConfig, state: PolicyState) -> ScalingDecision:
    n, now, p = load.num_replicas, load.now_s, pressure(load)
    hot = p > config.high_pressure or load.queue_delay_s > config.max_queue_delay_s or load.ttft_slo_misses > 0
    calm = p < config.low_pressure and load.queue_delay_s == 0 and load.ttft_slo_misses == 0
    state = replace(state, pressure_since_s=(state.pressure_since_s if state.pressure_since_s is not None else now)
                    if hot else None, calm_since_s=(state.calm_since_s if state.calm_since_s is not None else now)
                    if calm else None)
    floor = max(config.min_replicas, load.pinned_replicas)
    why = (f"pressure {p:.2f} ({load.kv_pages_demanded} pages demanded / {load.spare_pages} spare), "
           f"queue delay {load.queue_delay_s:.1f} s, {load.ttft_slo_misses} TTFT SLO misses")
    if n < floor:
        return _change(state, now, floor, f"below the floor {floor} (min {config.min_replicas}, "
                                          f"{load.pinned_replicas} pinned by warm models)")
    if hot and now - state.pressure_since_s >= config.upscale_delay_s and n < config.max_replicas \
            and load.num_starting == 0:  # the replicas already coming will take some of the pressure
        deficit = max(0, load.kv_pages_demanded - int(config.high_pressure * load.spare_pages))
        extra = max(1, math.ceil(deficit / max(1, load.pages_per_replica)))
        target = min(config.max_replicas, n + extra)
        return _change(state, now, target, f"scale up {n}->{target}: {why} for "
                                           f"{now - state.pressure_since_s:.0f} s")
    recently = state.last_change_s is not None and now - state.last_change_s < config.cooldown_s
    if calm and now - state.calm_since_s >= config.downscale_delay_s and not recently and n > floor:
        return _change(state, now, n - 1, f"scale down {n}->{n - 1}: {why} for {now - state.calm_since_s:.0f} s")
    return ScalingDecision(n, state, f"hold {n}: {why}")


def _change(state: PolicyState, now: float, target: int, reason: str) -> ScalingDecision:
    return ScalingDecision(target, replace(state, last_change_s=now, pressure_since_s=None, calm_since_s=None), reason)
