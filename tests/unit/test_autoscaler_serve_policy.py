"""The Serve glue of the scaling policy, with a stand-in AutoscalingContext (a seam fake)."""

from __future__ import annotations

from dataclasses import dataclass, field

from autoscaler.serve_policy import MemoryPressurePolicy, load_from_metrics


@dataclass
class FakeContext:
    current_num_replicas: int  # running
    current_time: float
    aggregated_metrics: dict
    policy_state: dict = field(default_factory=dict)
    target_num_replicas: int = 0  # asked for (0: same as running)
    capacity_adjusted_min_replicas: int = 1
    capacity_adjusted_max_replicas: int = 4
    deployment_name: str = "EngineReplica"


def metrics(demanded, spare, pinned=(0, 0)):
    return {"kv_pages_demanded": {"r1": demanded / 2, "r2": demanded / 2}, "spare_pages": {"r1": spare / 2, "r2": spare / 2},
            "pages_per_replica": {"r1": 64, "r2": 64}, "queue_delay_s": {"r1": 0.0, "r2": 0.0},
            "ttft_slo_misses": {"r1": 0, "r2": 0}, "pinned": {"r1": pinned[0], "r2": pinned[1]}}


def test_load_sums_replicas_and_counts_pinned_ones():
    load = load_from_metrics(metrics(100, 40, pinned=(1, 0)), num_replicas=2, now_s=5.0)
    assert (load.kv_pages_demanded, load.spare_pages, load.pages_per_replica, load.pinned_replicas) == (100, 40, 64, 1)


def test_the_policy_keeps_its_state_in_serves_policy_state_and_scales_after_the_delay():
    policy = MemoryPressurePolicy(upscale_delay_s=2.0, downscale_delay_s=5.0, cooldown_s=1.0)
    state, n = {}, 2
    for t in (0.0, 1.0, 2.5):
        n, state = policy(FakeContext(n, t, metrics(200, 40), state))
    assert n == 4 and "scale up 2->4" in state["reason"]  # capped by capacity_adjusted_max_replicas
    for t in (10.0, 16.0):
        n, state = policy(FakeContext(n, t, metrics(0, 200), state))
    assert n == 3


def test_a_replica_still_starting_is_neither_cancelled_nor_followed_by_another_scale_up():
    policy = MemoryPressurePolicy(upscale_delay_s=0.0, downscale_delay_s=5.0, cooldown_s=1.0)
    n, state = policy(FakeContext(1, 0.0, metrics(200, 40), {}, capacity_adjusted_max_replicas=8))
    assert n > 1
    for t in (0.5, 1.0, 3.0):  # still one running, the rest starting: keep the target, add nothing
        again, state = policy(FakeContext(1, t, metrics(200, 40), state, target_num_replicas=n,
                                          capacity_adjusted_max_replicas=8))
        assert again == n
