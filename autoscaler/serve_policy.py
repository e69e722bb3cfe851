"""Ray Serve glue for the memory-pressure policy: `autoscaling_config.policy` points here.

Every engine replica records autoscaling stats (EngineReplica.record_autoscaling_stats): KV pages
demanded, spare (free + reclaimable) pages, pages one replica adds, the oldest wait, TTFT SLO
misses, and whether it is the only host of a warm model. Serve aggregates them per replica over its
look-back window and calls the policy; the decision is the pure `autoscaler.policy.decide`, its
state kept in Serve's policy_state. KubeRay's in-tree autoscaler then adds or removes the worker
pods those replicas need.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from typing import Any

from autoscaler.policy import ClusterLoad, PolicyState, ScalingConfig, decide

logger = logging.getLogger(__name__)

STAT_NAMES = ("kv_pages_demanded", "spare_pages", "pages_per_replica", "queue_delay_s", "ttft_slo_misses", "pinned")


def load_from_metrics(metrics: dict[str, dict[Any, float]], num_replicas: int, now_s: float) -> ClusterLoad:
    """The cluster's load from per-replica stats ({stat: {replica: value}})."""
    def column(name: str) -> list[float]:
        return list((metrics or {}).get(name, {}).values())

    return ClusterLoad(
        now_s=now_s,
        num_replicas=num_replicas,
        kv_pages_demanded=int(sum(column("kv_pages_demanded"))),
        spare_pages=int(sum(column("spare_pages"))),
        pages_per_replica=int(max(column("pages_per_replica"), default=1)),
        queue_delay_s=max(column("queue_delay_s"), default=0.0),
        ttft_slo_misses=int(sum(column("ttft_slo_misses"))),
        pinned_replicas=sum(1 for v in column("pinned") if v >= 0.5),
    )


class MemoryPressurePolicy:
    """`policy_function` for Serve: called with an AutoscalingContext, returns (replicas, state)."""

    def __init__(self, **config: Any) -> None:
        self.config = ScalingConfig(**config)

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        now = ctx.current_time if ctx.current_time is not None else time.time()
        # Decide on the target Serve already holds, not on the running count: returning the running
        # count while a new replica starts would cancel it (observed: 1 -> 2 -> 1 every second).
        target = max(ctx.target_num_replicas, ctx.current_num_replicas)
        load = replace(load_from_metrics(metrics, target, now),
                       num_starting=max(0, target - ctx.current_num_replicas))
        config = ScalingConfig(**{**asdict(self.config), "min_replicas": max(1, ctx.capacity_adjusted_min_replicas),
                                  "max_replicas": max(1, ctx.capacity_adjusted_max_replicas)})
        state = PolicyState(**(ctx.policy_state or {}).get("oneiros", {}))
        decision = decide(load, config, state)
        if decision.num_replicas != target:
            logger.info("autoscale %s: %s", ctx.deployment_name, decision.reason)
        return decision.num_replicas, {"oneiros": asdict(decision.state), "reason": decision.reason}
