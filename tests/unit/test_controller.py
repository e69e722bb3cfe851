"""RemapController: victim order, cap, alpha budget, uniform layer choice, over-budget restore, reversion."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remap.controller import (
    MemorySnapshot,
    RemapConfig,
    RemapController,
    RemapPlan,
    TenantSnapshot,
    VictimOrder,
    layers_to_add,
    layers_to_restore,
    num_staging_slots,
    uniform_layers,
)

pytestmark = pytest.mark.unit

LAYER_BYTES = 1_000_000
LINK_BYTES_PER_S = 1e9  # one layer copies in 1 ms


def make_tenant(**overrides) -> TenantSnapshot:
    fields = dict(model="a", num_layers=8, remapped_layers=frozenset(), layer_pages=4, layer_bytes=LAYER_BYTES,
                  num_running=0, num_waiting=0, kv_pages_needed=0, last_active_s=0.0, predicted_compute_s=0.0)
    fields.update(overrides)
    fields["remapped_layers"] = frozenset(fields["remapped_layers"])
    return TenantSnapshot(**fields)


def make_active(**overrides) -> TenantSnapshot:
    """A running tenant; predicted_compute_s=0.002 gives an alpha budget of 2 at LINK_BYTES_PER_S."""
    return make_tenant(**{"num_running": 1, "predicted_compute_s": 0.002, **overrides})


def make_snapshot(*tenants: TenantSnapshot, **overrides) -> MemorySnapshot:
    fields = dict(now_s=100.0, num_free_pages=0, link_bytes_per_s=LINK_BYTES_PER_S, tenants=tenants)
    fields.update(overrides)
    return MemorySnapshot(**fields)


def make_controller(**overrides) -> RemapController:
    return RemapController(RemapConfig(**overrides))


def layers_of(actions, model: str) -> tuple[int, ...]:
    return tuple(a.layer for a in actions if a.model == model)


# -- no-op, victims, cap --------------------------------------------------------------------------


def test_plan_is_noop_when_memory_is_plentiful_and_nothing_is_remapped():
    snap = make_snapshot(make_active(model="a", kv_pages_needed=10), make_tenant(model="b"), num_free_pages=100)
    plan = make_controller().plan(snap)
    assert plan.is_noop and plan.stream == () and plan.num_pages_short == 0


@pytest.mark.parametrize(("order", "victim"), [(VictimOrder.MRU, "recent"), (VictimOrder.LRU, "old")])
def test_victim_order_picks_the_inactive_tenant_it_names(order, victim):
    snap = make_snapshot(make_tenant(model="old", last_active_s=10.0), make_tenant(model="recent", last_active_s=20.0),
                         make_active(model="busy", kv_pages_needed=8))
    plan = make_controller(victim_order=order).plan(snap)
    assert {a.model for a in plan.reclaim} == {victim}
    assert len(plan.reclaim) == 2 and plan.num_pages_short == 0
    assert order.value.upper() in plan.reclaim[0].reason


def test_victim_ties_are_broken_by_model_name():
    snap = make_snapshot(make_tenant(model="b", last_active_s=5.0), make_tenant(model="a", last_active_s=5.0),
                         make_active(model="z", kv_pages_needed=4))
    assert [a.model for a in make_controller().plan(snap).reclaim] == ["a"]


def test_reclaim_takes_only_as_many_layers_as_cover_the_deficit():
    snap = make_snapshot(make_tenant(model="idle"), make_active(model="busy", kv_pages_needed=9), num_free_pages=2)
    plan = make_controller().plan(snap)
    assert len(plan.reclaim) == 2  # deficit 7 pages, 4 pages a layer
    assert plan.num_pages_short == 0


def test_reclaim_moves_to_the_next_victim_once_the_first_is_at_its_cap():
    snap = make_snapshot(make_tenant(model="old", last_active_s=1.0), make_tenant(model="recent", last_active_s=2.0),
                         make_active(model="busy", kv_pages_needed=30))
    plan = make_controller().plan(snap)
    assert len(layers_of(plan.reclaim, "recent")) == 6  # cap of 8 layers at 0.75
    assert len(layers_of(plan.reclaim, "old")) == 2
    assert [a.model for a in plan.reclaim] == ["recent"] * 6 + ["old"] * 2


@pytest.mark.parametrize(("fraction", "num_layers", "cap"), [(0.75, 40, 30), (0.29, 100, 29), (0.99, 4, 3),
                                                            (0.99, 1, 0), (0.0, 8, 0)])
def test_cap_is_the_floor_of_the_fraction_and_leaves_a_layer_resident(fraction, num_layers, cap):
    controller = make_controller(max_remapped_fraction=fraction)
    tenant = make_tenant(num_layers=num_layers, layer_pages=1)
    assert controller.cap(tenant) == cap
    plan = controller.plan(make_snapshot(tenant, make_active(model="z", kv_pages_needed=1000)))
    assert len(plan.reclaim) == cap
    assert plan.num_pages_short == 1000 - cap


def test_reclaim_never_takes_a_running_models_last_layer():
    # With a one-slot ring an active layer pays for itself from the second one on.
    controller = make_controller(max_remapped_fraction=0.9, max_staging_slots=1)
    snap = make_snapshot(make_active(model="a", num_layers=4, predicted_compute_s=1.0),
                         make_active(model="b", kv_pages_needed=100, predicted_compute_s=0.0))
    plan = controller.plan(snap)
    assert len(layers_of(plan.reclaim, "a")) == 3
    assert plan.stream[0].alpha == 3 and plan.num_pages_short > 0


# -- alpha budget and staging ----------------------------------------------------------------------


@pytest.mark.parametrize(("compute_s", "budget"), [(0.0, 0), (0.0029, 2), (0.003, 3), (1.0, 6)])
def test_alpha_budget_is_what_the_link_hides_under_compute_clipped_to_the_cap(compute_s, budget):
    tenant = make_active(predicted_compute_s=compute_s)
    assert make_controller().alpha_budget(tenant, LINK_BYTES_PER_S) == budget


def test_alpha_budget_of_an_inactive_tenant_is_the_cap():
    assert make_controller().alpha_budget(make_tenant(num_layers=40), 0.0) == 30


def test_where_copies_run_inline_an_active_tenant_lends_nothing_and_an_idle_one_its_cap():
    controller = make_controller()
    busy = make_active(model="a", predicted_compute_s=1.0)  # would hide the cap's copies if they overlapped
    assert controller.alpha_budget(busy, LINK_BYTES_PER_S) == 6
    assert controller.alpha_budget(busy, LINK_BYTES_PER_S, copies_overlap=False) == 0
    assert controller.alpha_budget(make_tenant(num_layers=40), LINK_BYTES_PER_S, copies_overlap=False) == 30
    plan = controller.plan(make_snapshot(busy, make_tenant(model="b", num_layers=8),
                                         make_active(model="c", kv_pages_needed=10, predicted_compute_s=1.0),
                                         copies_overlap=False))
    assert {a.model for a in plan.reclaim} == {"b"} and not plan.stream  # only the idle tenant lends


def test_staging_slots_are_alpha_plus_one_then_plus_two_from_the_double_buffer_threshold():
    config = RemapConfig(double_buffer_min_alpha=9, max_staging_slots=None)  # the paper's ring
    assert [num_staging_slots(a, config) for a in (0, 1, 8, 9, 12)] == [0, 2, 9, 11, 14]


def test_by_default_the_ring_is_two_slots_or_three_when_double_buffering():
    config = RemapConfig(double_buffer_min_alpha=9)
    assert [num_staging_slots(a, config) for a in (0, 1, 2, 8, 9, 12)] == [0, 2, 2, 2, 3, 3]
    assert num_staging_slots(12, RemapConfig(max_staging_slots=3)) == 4


def test_active_layers_are_not_reclaimed_when_their_staging_costs_what_they_free():
    snap = make_snapshot(make_active(model="a", predicted_compute_s=1.0), make_active(model="b", kv_pages_needed=12))
    plan = make_controller(max_staging_slots=None).plan(snap)  # the paper's alpha+1 ring
    assert plan.reclaim == () and plan.num_pages_short == 12
    assert "SHORT by 12 pages" in plan.reason


def test_active_reclaim_takes_the_most_unused_budget_first_and_stays_within_it():
    controller = make_controller(max_staging_slots=2)
    snap = make_snapshot(make_active(model="big", predicted_compute_s=1.0), make_active(model="small"),
                         make_active(model="needy", kv_pages_needed=4, predicted_compute_s=0.0))
    plan = controller.plan(snap)
    assert layers_of(plan.reclaim, "big") == uniform_layers(8, 3)  # 3 layers - 2 slots = 4 pages
    assert layers_of(plan.reclaim, "small") == ()
    (stream,) = plan.stream
    assert (stream.model, stream.alpha, stream.alpha_budget, stream.num_staging_slots) == ("big", 3, 6, 2)


def test_inactive_tenants_are_reclaimed_before_active_ones():
    controller = make_controller(max_staging_slots=1)
    snap = make_snapshot(make_active(model="a", predicted_compute_s=1.0), make_tenant(model="idle"),
                         make_active(model="b", kv_pages_needed=8, predicted_compute_s=0.0))
    assert {a.model for a in controller.plan(snap).reclaim} == {"idle"}


# -- which layers ----------------------------------------------------------------------------------


def test_uniform_layers_are_the_centres_of_equal_bins():
    assert uniform_layers(40, 4) == (5, 15, 25, 35)
    assert uniform_layers(8, 2) == (2, 6)
    assert uniform_layers(5, 0) == ()
    for n in range(1, 50):
        for k in range(1, n + 1):
            ids = uniform_layers(n, k)
            gaps = {b - a for a, b in zip(ids, ids[1:])}
            assert len(set(ids)) == k and 0 <= ids[0] and ids[-1] < n
            assert gaps <= {n // k, -(-n // k)}


def test_a_fresh_model_gives_up_uniformly_spaced_layers():
    snap = make_snapshot(make_tenant(model="idle", num_layers=40, layer_pages=1),
                         make_active(model="z", kv_pages_needed=4))
    assert layers_of(make_controller().plan(snap).reclaim, "idle") == (5, 15, 25, 35)


def test_adding_layers_fills_the_uniform_targets_missing_members_farthest_first():
    assert layers_to_add(40, frozenset({20}), 1) == (10,)
    assert layers_to_add(40, frozenset({10, 30}), 2) == (5, 15)  # target (5, 15, 25, 35), ties to the lower id
    assert set(layers_to_add(40, frozenset(), 4)) == set(uniform_layers(40, 4))


def test_restoring_keeps_the_remaining_layers_closest_to_uniform():
    assert layers_to_restore(8, frozenset(uniform_layers(8, 6)), 4) == (0, 3, 4, 7)
    assert layers_to_restore(40, frozenset({5, 15, 25, 35}), 1) == (25,)  # keep the nearest to (6, 20, 33)


# -- over budget -----------------------------------------------------------------------------------


def test_an_over_budget_active_model_is_restored_down_to_its_budget():
    tenant = make_active(remapped_layers=uniform_layers(8, 6))  # budget 2
    plan = make_controller(max_staging_slots=None).plan(make_snapshot(tenant, num_free_pages=28))  # 7-slot ring
    assert layers_of(plan.restore, "a") == (0, 3, 4, 7)
    (stream,) = plan.stream
    assert (stream.layers, stream.alpha, stream.alpha_budget, stream.num_staging_slots) == ((2, 6), 2, 2, 3)
    assert plan.num_pages_short == 0 and "over budget" in plan.restore[0].reason


def test_over_budget_restore_never_takes_pages_another_tenants_kv_needs():
    # A two-slot ring (8 pages) is held either way, so each restore costs a full 4-page layer.
    controller = make_controller(max_staging_slots=2)
    woken = make_active(model="a", remapped_layers=uniform_layers(8, 6))
    other = make_active(model="b", kv_pages_needed=8, predicted_compute_s=0.0)
    plan = controller.plan(make_snapshot(woken, other, num_free_pages=8 + 8 + 8))
    assert layers_of(plan.restore, "a") == (2, 6)  # 8 spare pages: two layers, not more
    assert plan.num_pages_short == 0
    (stream,) = plan.stream
    assert stream.alpha == 4 and stream.alpha_budget == 2 and "OVER BUDGET" in stream.reason


@pytest.mark.parametrize(("first", "restored", "spare"), [(True, (0, 3, 4, 7), -8), (False, (2, 6), 0)])
def test_a_streaming_model_over_budget_gets_its_layers_back_before_waiting_requests_are_admitted(
        first, restored, spare):
    # b's 8 pages would admit waiting requests. Every step of a streams 4 layers where its compute hides
    # 2, so (by default) its restores come first and the admissions wait; the paper's back-off does not.
    controller = make_controller(max_staging_slots=2, restore_before_admitting=first)
    woken = make_active(model="a", remapped_layers=uniform_layers(8, 6))
    other = make_active(model="b", kv_pages_needed=8, kv_pages_admitting=8, predicted_compute_s=0.0)
    plan = controller.plan(make_snapshot(woken, other, num_free_pages=8 + 8 + 8))
    assert layers_of(plan.restore, "a") == restored
    assert plan.num_pages_short == 0  # admissions that wait for restores are not short: nothing is urgent
    assert f"= spare {spare} pages" in plan.reason
    assert ("admissions wait for 8 pages" in plan.reason) == first


@pytest.mark.parametrize(("first", "num_restored"), [(True, 2), (False, 1)])
def test_restores_before_admissions_never_take_pages_of_running_requests(first, num_restored):
    controller = make_controller(max_staging_slots=2, restore_before_admitting=first)
    woken = make_active(model="a", remapped_layers=uniform_layers(8, 6))
    other = make_active(model="b", kv_pages_needed=8 + 4, kv_pages_admitting=4, predicted_compute_s=0.0)
    plan = controller.plan(make_snapshot(woken, other, num_free_pages=8 + 8 + 8))
    # 24 free - 8 of ring - 12 needed = 4 spare pages: one 4-page layer; two with the 4 of admissions
    assert len(layers_of(plan.restore, "a")) == num_restored


def test_an_over_budget_model_still_streams_when_no_pages_allow_a_restore():
    controller = make_controller(max_staging_slots=2)  # an 8-page ring whatever alpha is
    plan = controller.plan(make_snapshot(make_active(remapped_layers=uniform_layers(8, 6))))
    assert plan.restore == () and plan.num_pages_short == 8
    (stream,) = plan.stream
    assert stream.alpha == 6 and "OVER BUDGET" in stream.reason and "SHORT by 8" in plan.reason


def test_over_budget_restores_that_shrink_the_ring_as_much_as_they_cost_happen_even_when_short():
    controller = make_controller(max_staging_slots=None)  # the paper's alpha+1 ring
    plan = controller.plan(make_snapshot(make_active(remapped_layers=uniform_layers(8, 6))))
    assert layers_of(plan.restore, "a") == (0, 3, 4, 7)  # 4 layers back, 4 slots fewer: 0 pages net
    assert plan.num_pages_short == 28


def test_reclaims_from_inactive_tenants_fund_an_over_budget_restore():
    controller = make_controller(max_staging_slots=2)
    snap = make_snapshot(make_active(model="a", remapped_layers=uniform_layers(8, 6)), make_tenant(model="idle"),
                         num_free_pages=8)  # the ring
    plan = controller.plan(snap)
    assert len(layers_of(plan.reclaim, "idle")) == 4 and len(layers_of(plan.restore, "a")) == 4
    assert plan.num_pages_short == 0 and plan.stream[0].alpha == 2


# -- reversion -------------------------------------------------------------------------------------


def make_reversion_snapshot(num_free_pages: int) -> MemorySnapshot:
    """Three tenants with two remapped layers each; the active one holds a 3-slot (12-page) ring."""
    two = uniform_layers(8, 2)
    return make_snapshot(make_active(model="a", remapped_layers=two, predicted_compute_s=1.0),
                         make_tenant(model="older", remapped_layers=two, last_active_s=10.0),
                         make_tenant(model="newer", remapped_layers=two, last_active_s=20.0),
                         num_free_pages=num_free_pages)


@pytest.mark.parametrize(("order", "second"), [(VictimOrder.MRU, "older"), (VictimOrder.LRU, "newer")])
def test_reversion_restores_active_models_first_then_inactive_in_reverse_victim_order(order, second):
    plan = make_controller(victim_order=order).plan(make_reversion_snapshot(num_free_pages=17))
    assert [a.model for a in plan.restore] == ["a", "a", second, second]
    assert plan.stream == () and plan.num_pages_short == 0
    assert "reversion: spare 9 pages" in plan.restore[2].reason


def test_reversion_keeps_the_headroom_pages_free():
    snap = make_reversion_snapshot(num_free_pages=21)  # 9 spare pages, 13 once the ring is gone
    assert [a.model for a in make_controller().plan(snap).restore] == ["a", "a", "older", "older", "newer"]
    kept = make_controller(revert_headroom_pages=2).plan(snap)
    assert [a.model for a in kept.restore] == ["a", "a", "older", "older"]  # 5 spare - 2 headroom < 4
    assert make_controller(revert_headroom_pages=6).plan(make_reversion_snapshot(num_free_pages=17)).is_noop


# -- input checks, determinism, describe -----------------------------------------------------------


@pytest.mark.parametrize(("build", "message"), [
    (lambda: make_tenant(kv_pages_needed=-1), "kv_pages_needed=-1"),
    (lambda: make_tenant(layer_pages=0), "layer_pages=0"),
    (lambda: make_tenant(kv_pages_needed=2, kv_pages_admitting=3), "kv_pages_admitting 3 > kv_pages_needed 2"),
    (lambda: make_tenant(num_layers=4, remapped_layers={1, 4, -1}), r"\[-1, 4\] outside \[0, 4\)"),
    (lambda: make_tenant(num_layers=2, remapped_layers={0, 1}), "2 of 2 layers remapped"),
    (lambda: make_snapshot(make_tenant(), num_free_pages=-3), "num_free_pages=-3"),
    (lambda: make_snapshot(make_tenant(model="x"), make_tenant(model="x")), r"duplicate model names \['x'\]"),
    (lambda: RemapConfig(max_remapped_fraction=1.0), "max_remapped_fraction=1.0"),
    (lambda: RemapConfig(max_remapped_fraction=-0.1), "max_remapped_fraction=-0.1"),
    (lambda: RemapConfig(double_buffer_min_alpha=-1), "double_buffer_min_alpha=-1"),
    (lambda: RemapConfig(victim_order="fifo"), "victim_order='fifo'"),
])
def test_bad_input_raises_with_the_numbers(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_same_snapshot_gives_the_same_plan_whatever_the_tenant_order():
    tenants = (make_tenant(model="x", last_active_s=3.0), make_tenant(model="y", last_active_s=3.0),
               make_active(model="z", kv_pages_needed=30, remapped_layers={1, 5}))
    controller = make_controller()
    plan = controller.plan(make_snapshot(*tenants))
    assert plan == controller.plan(make_snapshot(*tenants))
    assert plan == controller.plan(make_snapshot(*reversed(tenants)))


def test_describe_gives_one_line_per_decision():
    snap = make_snapshot(make_tenant(model="old", last_active_s=1.0), make_tenant(model="recent", last_active_s=2.0),
                         make_active(model="busy", kv_pages_needed=30, remapped_layers={2}))
    lines = make_controller().plan(snap).describe()
    assert [line.split(" layers ")[0] for line in lines[:3]] == ["reclaim recent", "reclaim old", "stream busy"]
    assert len(lines) == 4 and lines[-1].startswith("ledger: free 0")


# -- every plan keeps the invariants ---------------------------------------------------------------


@st.composite
def snapshots(draw) -> MemorySnapshot:
    names = draw(st.lists(st.sampled_from("abcde"), min_size=1, max_size=4, unique=True))
    tenants = []
    for name in names:
        num_layers = draw(st.integers(1, 12))
        remapped = draw(st.sets(st.integers(0, num_layers - 1), max_size=num_layers - 1))
        tenants.append(make_tenant(
            model=name, num_layers=num_layers, remapped_layers=remapped, layer_pages=draw(st.integers(1, 5)),
            layer_bytes=draw(st.integers(1, 1000)), num_running=draw(st.integers(0, 2)),
            num_waiting=draw(st.integers(0, 1)), kv_pages_needed=(need := draw(st.integers(0, 40))),
            kv_pages_admitting=draw(st.integers(0, need)),
            last_active_s=float(draw(st.integers(0, 3))), predicted_compute_s=draw(st.sampled_from([0.0, 0.01, 0.1]))))
    return make_snapshot(*tenants, num_free_pages=draw(st.integers(0, 80)),
                         link_bytes_per_s=draw(st.sampled_from([0.0, 1e3, 1e4, 1e5])),
                         copies_overlap=draw(st.booleans()))


configs = st.builds(RemapConfig, victim_order=st.sampled_from(VictimOrder),
                    max_remapped_fraction=st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]),
                    double_buffer_min_alpha=st.integers(0, 10), revert_headroom_pages=st.integers(0, 5),
                    max_staging_slots=st.sampled_from([None, 1, 2, 3]), restore_before_admitting=st.booleans())


def check_plan(controller: RemapController, snap: MemorySnapshot, plan: RemapPlan) -> None:
    by_name = {t.model: t for t in snap.tenants}
    reclaimed = [(a.model, a.layer) for a in plan.reclaim]
    restored = [(a.model, a.layer) for a in plan.restore]
    assert len(set(reclaimed)) == len(reclaimed) and len(set(restored)) == len(restored)
    assert {m for m, _ in reclaimed}.isdisjoint({m for m, _ in restored})  # one direction per model
    after, spare = {}, snap.num_free_pages - sum(t.kv_pages_needed for t in snap.tenants)
    for t in snap.tenants:
        mine_r = {i for m, i in reclaimed if m == t.model}
        mine_s = {i for m, i in restored if m == t.model}
        assert mine_r.isdisjoint(t.remapped_layers)  # reclaimed layers were resident
        assert mine_s <= t.remapped_layers  # restored layers were remapped
        post = after[t.model] = (t.remapped_layers | mine_r) - mine_s
        cap, budget = controller.cap(t), controller.alpha_budget(t, snap.link_bytes_per_s, snap.copies_overlap)
        assert len(post) <= max(cap, len(t.remapped_layers)) and len(post) < t.num_layers
        if mine_r:
            assert len(post) <= budget <= cap <= t.num_layers - 1
        spare += t.layer_pages * (len(mine_r) - len(mine_s))
        if t.is_active:
            spare -= num_staging_slots(len(post), controller.config) * t.layer_pages
    admitting = sum(t.kv_pages_admitting for t in snap.tenants) if controller.config.restore_before_admitting else 0
    if admitting:  # restores may leave admissions waiting, for up to their pages, and that is not short
        assert plan.num_pages_short <= max(0, -spare) and spare >= -(plan.num_pages_short + admitting)
    else:
        assert plan.num_pages_short == max(0, -spare)
    over = any(len(after[t.model]) > controller.alpha_budget(t, snap.link_bytes_per_s, snap.copies_overlap) for t in snap.tenants)
    if plan.reclaim and not over:  # only as many layers as cover the deficit
        assert spare < max(by_name[m].layer_pages for m, _ in reclaimed)
    expected = [m for m in sorted(after) if by_name[m].is_active and after[m]]
    assert [s.model for s in plan.stream] == expected
    for s in plan.stream:
        t = by_name[s.model]
        hidden = math.floor(t.predicted_compute_s * snap.link_bytes_per_s / t.layer_bytes + 1e-9) if snap.copies_overlap else 0
        assert s.alpha_budget == min(hidden, controller.cap(t))
        assert s.layers == tuple(sorted(after[s.model])) and s.alpha == len(s.layers)
        assert s.num_staging_slots == num_staging_slots(s.alpha, controller.config)
        assert ("OVER BUDGET" in s.reason) == (s.alpha > s.alpha_budget)


@settings(max_examples=300, deadline=None)
@given(snap=snapshots(), config=configs)
def test_every_plan_keeps_cap_residency_and_page_accounting(snap, config):
    controller = RemapController(config)
    plan = controller.plan(snap)
    check_plan(controller, snap, plan)
    assert plan == controller.plan(make_snapshot(*reversed(snap.tenants), num_free_pages=snap.num_free_pages,
                                                 link_bytes_per_s=snap.link_bytes_per_s,
                                                 copies_overlap=snap.copies_overlap))


def test_cluster_cold_tenants_lend_first_and_warming_ones_last():
    idle = (make_tenant(model="recent", last_active_s=90.0), make_tenant(model="cold", last_active_s=10.0, cold=True),
            make_tenant(model="warm", last_active_s=95.0, warming=True))
    # MRU alone would take "warm" (95) first, then "recent" (90), then "cold" (10)
    plan = make_controller().plan(make_snapshot(*idle, make_active(model="busy", kv_pages_needed=30,
                                                                     predicted_compute_s=0.0)))
    assert list(dict.fromkeys(a.model for a in plan.reclaim)) == ["cold", "recent"]  # 24 + 6 pages
    assert "warm" not in {a.model for a in plan.reclaim}
