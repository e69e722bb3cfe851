"""The fleet simulation: autoscaling policies on simulated devices, on virtual time."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autoscaler.policy import ScalingConfig
from replicas.bench.workload import LengthDist, Request, zipf_poisson
from replicas.sim import GH200
from replicas.sim.fleet import FleetSettings, simulate_fleet
from replicas.sim.presets import tiny_models
from replicas.sim.run import SimSettings

SMALL = SimSettings(num_pages=300, page_size_bytes=256 << 10, max_num_batched_tokens=512, max_num_seqs=32)


def burst_then_quiet():
    """A minute of heavy traffic, then a trickle: a fleet should grow, then shrink."""
    heavy = zipf_poisson(2, 30.0, 60.0, prompt_len=LengthDist("uniform", low=256, high=768),
                         output_len=LengthDist("uniform", low=64, high=256), seed=1).requests
    quiet = [r for r in zipf_poisson(2, 0.2, 1200.0, prompt_len=LengthDist("fixed", value=64),
                                     output_len=LengthDist("fixed", value=16), seed=2).requests]
    return list(heavy) + [type(r)(r.arrival_s + 60.0, r.tenant, r.prompt_len, r.output_len) for r in quiet]


@pytest.fixture(scope="module")
def runs():
    scaling = ScalingConfig(min_replicas=1, max_replicas=4, upscale_delay_s=10, downscale_delay_s=120, cooldown_s=60)
    out = {}
    for policy in ("memory", "queue"):
        fleet = FleetSettings(policy=policy, scaling=scaling, tick_s=5.0, startup_s=20.0, target_ongoing_requests=16)
        out[policy] = simulate_fleet(burst_then_quiet(), tiny_models(), GH200, fleet, SMALL)
    return out


def test_every_request_completes_under_both_policies(runs):
    n = len(burst_then_quiet())
    for policy, result in runs.items():
        assert len(result.records) == n and result.summary["num_rejected"] == 0, policy


def test_the_memory_policy_scales_up_under_the_burst_and_back_down_after(runs):
    timeline = runs["memory"].timeline
    assert runs["memory"].max_replicas > 1
    assert timeline[-1][1] == 1  # back to the minimum in the quiet tail
    assert runs["memory"].gpu_hours > 0


def test_gpu_hours_integrate_the_fleet_size(runs):
    for result in runs.values():
        span_h = (max(r.arrival_s + r.completion_s for r in result.records) - result.records[0].arrival_s) / 3600
        assert span_h * 1 <= result.gpu_hours * 1.0001 <= span_h * result.max_replicas + 1e-6


def test_the_queue_policy_times_serves_upscale_delay_from_the_first_scale_up_decision_whatever_the_count():
    """A queue that grows every tick asks for more replicas at every tick (2, 4, 5, 6, 7, 9, 10 at
    target 8). Serve (`_apply_delay_logic`, ray/serve/autoscaling_policy.py) scales once its 30 s
    upscale delay has passed since the first of the run of scale-up decisions, to the count decided
    then; restarting the delay whenever the count changed never scaled at all."""
    workload = [Request(i * 0.25, f"t{i % 2}", 64, 400) for i in range(152)]  # 4 req/s for 38 s
    fleet = FleetSettings(policy="queue", scaling=ScalingConfig(min_replicas=1, max_replicas=20), tick_s=5.0,
                          startup_s=20.0, target_ongoing_requests=8)
    result = simulate_fleet(workload, tiny_models(), GH200, fleet, replace(SMALL, max_num_seqs=2))
    assert len(result.records) == len(workload) and result.summary["num_rejected"] == 0
    ups = [(t, n) for t, n in result.timeline if n > 1]
    assert ups, "never scaled up"
    assert ups[0][0] == pytest.approx(5.0 + 30.0) and ups[0][1] > 2  # the first tick's decision + Serve's 30 s
