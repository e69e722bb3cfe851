"""The memory-pressure scaling policy with a fake clock: sustained pressure scales up, a blip does
not; scale-down waits for calm and a cooldown and never drops a warm model's only host."""

from __future__ import annotations

import pytest

from autoscaler.policy import ClusterLoad, PolicyState, ScalingConfig, decide

CONFIG = ScalingConfig(min_replicas=1, max_replicas=6, upscale_delay_s=15, downscale_delay_s=120, cooldown_s=60)


def load(now_s, num_replicas=2, demanded=50, spare=100, **kw) -> ClusterLoad:
    return ClusterLoad(now_s=now_s, num_replicas=num_replicas, kv_pages_demanded=demanded, spare_pages=spare,
                       pages_per_replica=40, **kw)


def run(loads, state=PolicyState(), config=CONFIG):
    """Feed loads in order (their num_replicas is replaced by the policy's last answer)."""
    n, decisions = loads[0].num_replicas, []
    for item in loads:
        d = decide(ClusterLoad(**{**item.__dict__, "num_replicas": n}), config, state)
        n, state = d.num_replicas, d.state
        decisions.append(d)
    return decisions


def test_sustained_pressure_scales_up_by_the_page_deficit():
    decisions = run([load(t, demanded=250, spare=100) for t in range(0, 20, 5)])
    assert [d.num_replicas for d in decisions] == [2, 2, 2, 6]  # at 15 s: deficit 160 pages / 40 = 4 more
    assert "scale up 2->6" in decisions[-1].reason and "250 pages demanded" in decisions[-1].reason


def test_a_blip_of_pressure_does_not_scale():
    loads = [load(0, demanded=250), load(5, demanded=250), load(10, demanded=20), load(15, demanded=250),
             load(20, demanded=250)]
    assert all(d.num_replicas == 2 for d in run(loads))  # the pressure clock restarted at 15 s


def test_queueing_or_slo_misses_are_pressure_even_with_spare_pages():
    decisions = run([load(t, demanded=10, queue_delay_s=5.0) for t in (0, 20)])
    assert decisions[-1].num_replicas == 3
    decisions = run([load(t, demanded=10, ttft_slo_misses=3) for t in (0, 20)])
    assert decisions[-1].num_replicas == 3


def test_scale_down_waits_for_calm_and_the_cooldown_one_replica_at_a_time():
    up = run([load(0, num_replicas=4, demanded=10, spare=200), load(200, num_replicas=4, demanded=10, spare=200)],
             state=PolicyState(last_change_s=-1000))
    assert [d.num_replicas for d in up] == [4, 3]
    # the next step down needs another 120 s of calm and 60 s since the change
    decisions = run([load(t, num_replicas=3, demanded=10, spare=200) for t in (210, 280, 330)], state=up[-1].state)
    assert [d.num_replicas for d in decisions] == [3, 3, 2]


def test_never_below_the_replicas_holding_the_only_copy_of_a_warm_model():
    decisions = run([load(t, num_replicas=3, demanded=0, spare=300, pinned_replicas=3) for t in (0, 500, 1000)],
                    state=PolicyState(last_change_s=-1000))
    assert all(d.num_replicas == 3 for d in decisions)
    assert decide(load(0, num_replicas=1, pinned_replicas=2), CONFIG, PolicyState()).num_replicas == 2


def test_max_replicas_caps_scale_up():
    decisions = run([load(t, num_replicas=5, demanded=10_000, spare=10) for t in (0, 15)])
    assert decisions[-1].num_replicas == 6


@pytest.mark.parametrize("kwargs", [dict(min_replicas=0), dict(min_replicas=5, max_replicas=2),
                                    dict(low_pressure=0.9, high_pressure=0.5)])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        ScalingConfig(**kwargs)
