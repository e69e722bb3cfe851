"""ClusterState: cold, warming, placement, routing view, staleness, restart, versions, reasons."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import ClusterState, ControllerConfig, ReplicaReport, TenantReport

pytestmark = pytest.mark.unit

NOW = 1_000.0  # controller wall clock of the first round


def make_tenant(**overrides) -> TenantReport:
    """A fully resident, busy-free tenant that was active just now."""
    fields = dict(model="a", num_layers=8, resident_layers=8, num_waiting=0, num_running=0, kv_pages_used=0,
                  last_active_s=NOW, arrival_rate_per_s=0.0)
    fields.update(overrides)
    return TenantReport(**fields)


def make_report(replica_id: str, tenants=(), **overrides) -> ReplicaReport:
    fields = dict(replica_id=replica_id, node_id=f"node-{replica_id}", sent_at_s=NOW, num_pages=100,
                  page_size_bytes=2 << 20, free_pages=10, reclaimable_pages=0, link_bytes_per_s=1e10,
                  tenants=tuple(tenants))
    fields.update(overrides)
    return ReplicaReport(**fields)


def make_state(*reports: ReplicaReport, now_s: float = NOW, **config) -> ClusterState:
    state = ClusterState(ControllerConfig(**config))
    for report in reports:
        state.ingest(report, now_s)
    return state


def idle(model: str = "a", **overrides) -> TenantReport:
    """A tenant last active 100 s before NOW: cold at NOW with the default cold_after_s of 30."""
    return make_tenant(model=model, last_active_s=NOW - 100, **overrides)


def loads(decision) -> dict[str, set[str]]:
    return {rid: set(o.load) for rid, o in decision.orders.items() if o.load}


# ---- reports, staleness, restart, versions


def test_ingest_keeps_the_newest_report_and_ignores_an_older_one():
    state = make_state(make_report("r1", free_pages=5, sent_at_s=NOW))
    state.ingest(make_report("r1", free_pages=7, sent_at_s=NOW - 1), NOW + 1)  # delivered late
    assert state.decide(NOW + 1).view.entries == ()  # no tenants either way
    assert state.snapshot()["replicas"][0]["free_pages"] == 5
    state.ingest(make_report("r1", free_pages=9, sent_at_s=NOW + 2), NOW + 2)
    assert state.snapshot()["replicas"][0]["free_pages"] == 9


def test_a_restarted_controller_rebuilds_the_same_decision_from_the_same_reports():
    reports = [make_report("r1", [idle("a"), make_tenant(model="b", resident_layers=2, arrival_rate_per_s=1.0)],
                           free_pages=3, reclaimable_pages=4),
               make_report("r2", [make_tenant(model="b", num_running=3)], free_pages=20)]
    desired = {"a": 1, "b": 2, "c": 1}
    first = make_state(*reports, desired_models=desired).decide(NOW)
    restarted = make_state(*reports, desired_models=desired).decide(NOW)
    assert restarted == first
    assert first.orders["r1"].cold == {"a"} and first.orders["r1"].warming == {"b"}
    assert loads(first) == {"r2": {"c"}}  # c is unhosted: the most spare pages win


def test_a_restart_mid_load_still_gives_the_same_orders_and_view():
    reports = [make_report("r1", [make_tenant(model="a")], free_pages=5), make_report("r2", free_pages=50)]
    running = make_state(*reports, desired_models={"b": 1})
    running.decide(NOW)
    for r in reports:
        running.ingest(r, NOW + 1)
    before = running.decide(NOW + 1)
    after = make_state(*reports, now_s=NOW + 1, desired_models={"b": 1}).decide(NOW + 1)
    assert {rid: (o.cold, o.warming, o.load) for rid, o in before.orders.items()} == \
           {rid: (o.cold, o.warming, o.load) for rid, o in after.orders.items()}
    assert before.view.entries == after.view.entries


def test_versions_increase_with_every_decision_and_across_a_restart():
    state = make_state(make_report("r1", [make_tenant()]))
    versions = [state.decide(NOW).view.version, state.decide(NOW).view.version, state.decide(NOW + 0.0001).view.version]
    assert versions == sorted(set(versions))
    decision = state.decide(NOW + 1)
    assert decision.orders["r1"].version == decision.view.version > versions[-1]
    restarted = make_state(make_report("r1", [make_tenant()], sent_at_s=NOW + 5), now_s=NOW + 5).decide(NOW + 5)
    assert restarted.orders["r1"].version > decision.orders["r1"].version  # replicas obey the new controller


def test_stale_replicas_are_forgotten_and_their_tenants_lose_a_host():
    state = make_state(make_report("r1", [make_tenant(model="a")]), make_report("r2", free_pages=30),
                       desired_models={"a": 1})
    assert loads(state.decide(NOW)) == {}
    state.ingest(make_report("r2", free_pages=30, sent_at_s=NOW + 11), NOW + 11)
    assert state.forget_stale(NOW + 11) == ["r1"]
    decision = state.decide(NOW + 11)
    assert set(decision.orders) == {"r2"}
    assert [e.replica_id for e in decision.view.entries if e.model == "a"] == []
    assert loads(decision) == {"r2": {"a"}}
    assert [(e.replica_id, e.resident_fraction) for e in decision.view.hosts("a")] == [("r2", 0.0)]  # loading it
    assert state.forget_stale(NOW + 11) == []
    lost = state.snapshot()["lost_replicas"]  # `oneiros status` shows the replica that went away
    assert [(x["replica_id"], x["models"], x["forgotten_s"]) for x in lost] == [("r1", ["a"], NOW + 11)]
    from replicas.cli import format_status

    assert "lost: replica r1" in format_status(state.snapshot())


def test_decide_leaves_out_a_stale_replica_even_before_it_is_forgotten():
    state = make_state(make_report("r1", [make_tenant()]), make_report("r2", [make_tenant()]))
    state.ingest(make_report("r2", [make_tenant()], sent_at_s=NOW + 20), NOW + 20)
    decision = state.decide(NOW + 20)
    assert set(decision.orders) == {"r2"} and [e.replica_id for e in decision.view.entries] == ["r2"]


def test_a_replica_at_exactly_the_timeout_is_still_live():
    state = make_state(make_report("r1"), report_timeout_s=10)
    assert state.forget_stale(NOW + 10) == [] and state.forget_stale(NOW + 10.5) == ["r1"]


def test_liveness_uses_receive_time_so_a_replica_with_a_slow_clock_is_not_stale():
    state = make_state(make_report("r1", [make_tenant(last_active_s=NOW - 3600)], sent_at_s=NOW - 3600))
    assert state.forget_stale(NOW + 1) == []
    assert state.decide(NOW + 1).orders["r1"].cold == frozenset()  # active when it reported, on its clock


# ---- cold


def test_a_tenant_idle_everywhere_is_cold_on_every_host():
    state = make_state(make_report("r1", [idle("a"), make_tenant(model="b")]), make_report("r2", [idle("a")]),
                       make_report("r3", [make_tenant(model="b")]))
    decision = state.decide(NOW)
    assert decision.orders["r1"].cold == {"a"} and decision.orders["r2"].cold == {"a"}
    assert decision.orders["r3"].cold == frozenset()


@pytest.mark.parametrize("busy", [dict(num_running=1), dict(num_waiting=1), dict(arrival_rate_per_s=0.5)])
def test_a_tenant_running_waiting_or_arriving_on_any_replica_is_not_cold(busy):
    state = make_state(make_report("r1", [idle("a")]), make_report("r2", [idle("a", **busy)]))
    assert all(not o.cold for o in state.decide(NOW).orders.values())


def test_a_tenant_active_recently_on_one_host_is_not_cold_on_any():
    state = make_state(make_report("r1", [idle("a")]),
                       make_report("r2", [make_tenant(model="a", last_active_s=NOW - 5)]))
    assert all(not o.cold for o in state.decide(NOW).orders.values())


def test_cold_needs_more_than_cold_after_s_of_idleness():
    state = make_state(make_report("r1", [make_tenant(last_active_s=NOW - 30)]), cold_after_s=30)
    assert state.decide(NOW).orders["r1"].cold == frozenset()
    assert state.decide(NOW + 0.5).orders["r1"].cold == {"a"}


def test_cold_idleness_is_measured_on_the_controller_clock():
    # r1's clock runs 500 s ahead: its tenant was active 5 s before the report, not 495 s after NOW
    ahead = make_report("r1", [make_tenant(last_active_s=NOW + 495)], sent_at_s=NOW + 500)
    state = make_state(ahead)
    assert state.decide(NOW).orders["r1"].cold == frozenset()
    state.ingest(make_report("r1", [make_tenant(last_active_s=NOW + 495)], sent_at_s=NOW + 530), NOW + 30)
    assert state.decide(NOW + 30).orders["r1"].cold == {"a"}  # 35 s idle on our clock


# ---- warming


def test_a_tenant_with_arrivals_is_warming_where_its_layers_are_lent_out_and_only_there():
    state = make_state(make_report("r1", [make_tenant(resident_layers=3, arrival_rate_per_s=0.2)]),
                       make_report("r2", [make_tenant(resident_layers=8, arrival_rate_per_s=0.2)]),
                       make_report("r3", [make_tenant(resident_layers=3, arrival_rate_per_s=0.01)]))
    decision = state.decide(NOW)
    assert {rid for rid, o in decision.orders.items() if o.warming} == {"r1"}
    assert decision.orders["r1"].warming == {"a"}


def test_waiting_sequences_make_a_tenant_warming_without_arrivals():
    state = make_state(make_report("r1", [make_tenant(resident_layers=7, num_waiting=2)]))
    assert state.decide(NOW).orders["r1"].warming == {"a"}


def test_an_arrival_rate_at_the_threshold_is_not_warming():
    state = make_state(make_report("r1", [make_tenant(resident_layers=0, arrival_rate_per_s=0.05)]))
    assert state.decide(NOW).orders["r1"].warming == frozenset()


# ---- placement


def test_a_desired_model_no_replica_hosts_gets_the_replica_with_most_spare_pages():
    state = make_state(make_report("r1", free_pages=30), make_report("r2", free_pages=10, reclaimable_pages=25),
                       make_report("r3", free_pages=5), desired_models={"a": 1})
    decision = state.decide(NOW)
    assert loads(decision) == {"r2": {"a"}}
    assert "35 spare pages" in decision.orders["r2"].reasons[0]


def test_spare_page_ties_go_to_the_lowest_replica_id():
    state = make_state(make_report("r2", free_pages=10), make_report("r1", free_pages=10), desired_models={"a": 1})
    assert loads(state.decide(NOW)) == {"r1": {"a"}}


def test_a_model_short_of_its_minimum_gets_at_most_one_new_host_per_round():
    reports = [make_report(f"r{i}", free_pages=10 * i) for i in range(1, 5)]
    state = make_state(*reports, desired_models={"a": 3})
    assert loads(state.decide(NOW)) == {"r4": {"a"}}
    # r4 still loading (not in its report yet): re-issued, and one more new host
    assert loads(state.decide(NOW + 1)) == {"r4": {"a"}, "r3": {"a"}}
    assert loads(state.decide(NOW + 2)) == {"r4": {"a"}, "r3": {"a"}, "r2": {"a"}}
    assert loads(state.decide(NOW + 3)) == {"r4": {"a"}, "r3": {"a"}, "r2": {"a"}}  # 3 reached: no fourth


def test_a_model_whose_queue_per_host_is_over_the_limit_gets_one_more_host():
    hot = [make_report("r1", [make_tenant(num_waiting=10, num_running=8)]),
           make_report("r2", [make_tenant(num_running=2)]), make_report("r3", free_pages=40),
           make_report("r4", free_pages=20)]
    decision = make_state(*hot, max_queue_per_host=8).decide(NOW)
    assert loads(decision) == {"r3": {"a"}}
    assert "queue 20 over 2 hosts = 10.0 per host > 8" in decision.orders["r3"].reasons[0]


def test_a_queue_per_host_at_the_limit_adds_no_host():
    state = make_state(make_report("r1", [make_tenant(num_waiting=8, num_running=8)]),
                       make_report("r2", [make_tenant(num_running=0)]), make_report("r3", free_pages=40))
    assert loads(state.decide(NOW)) == {}


def test_no_load_onto_a_full_replica():
    state = make_state(make_report("r1", free_pages=0, reclaimable_pages=0),
                       make_report("r2", [make_tenant(num_waiting=50)], free_pages=0), desired_models={"b": 1})
    decision = state.decide(NOW)
    assert loads(decision) == {}
    assert any("b needs a host" in r and "no live replica" in r for r in decision.reasons)
    assert any("a needs a host" in r for r in decision.reasons)


def test_reclaimable_pages_alone_make_a_replica_fit_for_a_load():
    state = make_state(make_report("r1", free_pages=0, reclaimable_pages=6), desired_models={"a": 1})
    assert loads(state.decide(NOW)) == {"r1": {"a"}}


def test_a_load_in_flight_is_reissued_until_the_replica_reports_the_model():
    state = make_state(make_report("r1", free_pages=50), make_report("r2", free_pages=10), desired_models={"a": 1})
    assert loads(state.decide(NOW)) == {"r1": {"a"}}
    # r1's spare pages fall while it loads; r2 now looks better, but no second host is ordered
    state.ingest(make_report("r1", free_pages=5, sent_at_s=NOW + 1), NOW + 1)
    again = state.decide(NOW + 1)
    assert loads(again) == {"r1": {"a"}} and "still loading" in again.orders["r1"].reasons[0]
    state.ingest(make_report("r1", [make_tenant(resident_layers=8)], free_pages=5, sent_at_s=NOW + 2), NOW + 2)
    assert loads(state.decide(NOW + 2)) == {}
    assert state.snapshot()["loading"] == []


def test_a_load_that_never_lands_is_given_up_after_load_timeout_s():
    state = make_state(make_report("r1", free_pages=50), make_report("r2", free_pages=10),
                       desired_models={"a": 1}, load_timeout_s=60)
    assert loads(state.decide(NOW)) == {"r1": {"a"}}
    state.ingest(make_report("r1", free_pages=5, sent_at_s=NOW + 61), NOW + 61)
    state.ingest(make_report("r2", free_pages=10, sent_at_s=NOW + 61), NOW + 61)
    assert loads(state.decide(NOW + 61)) == {"r2": {"a"}}


def test_a_replica_loads_one_model_at_a_time():
    state = make_state(make_report("r1", free_pages=50), make_report("r2", free_pages=10),
                       desired_models={"a": 1, "b": 1, "c": 1})
    assert loads(state.decide(NOW)) == {"r1": {"a"}, "r2": {"b"}}
    decision = state.decide(NOW + 1)
    assert loads(decision) == {"r1": {"a"}, "r2": {"b"}}
    assert any("c needs a host" in r for r in decision.reasons)


def test_a_load_onto_a_replica_that_goes_away_is_placed_again_elsewhere():
    state = make_state(make_report("r1", free_pages=50), make_report("r2", free_pages=10), desired_models={"a": 1})
    assert loads(state.decide(NOW)) == {"r1": {"a"}}
    state.ingest(make_report("r2", free_pages=10, sent_at_s=NOW + 11), NOW + 11)
    assert loads(state.decide(NOW + 11)) == {"r2": {"a"}}


def test_an_unhosted_model_is_placed_before_a_hot_one():
    state = make_state(make_report("r1", [make_tenant(model="a", num_waiting=40)]), make_report("r2", free_pages=30),
                       desired_models={"b": 1})
    assert loads(state.decide(NOW)) == {"r2": {"b"}}


# ---- routing view


def test_routing_view_has_one_entry_per_hosted_tenant_with_fraction_spare_pages_and_queue():
    state = make_state(make_report("r1", [make_tenant(model="a", resident_layers=2, num_waiting=1, num_running=3),
                                          make_tenant(model="b")], free_pages=4, reclaimable_pages=6))
    view = state.decide(NOW).view
    assert view.made_at_s == NOW
    a = view.hosts("a")
    assert len(view.entries) == 2 and len(a) == 1
    assert (a[0].resident_fraction, a[0].spare_pages, a[0].queue) == (0.25, 10, 4)
    assert view.hosts("b")[0].resident_fraction == 1.0


def test_view_hosts_puts_most_resident_first_then_most_spare_pages_then_shortest_queue():
    state = make_state(
        make_report("r1", [make_tenant(resident_layers=4)], free_pages=99),
        make_report("r2", [make_tenant(resident_layers=8, num_running=5)], free_pages=10),
        make_report("r3", [make_tenant(resident_layers=8, num_running=1)], free_pages=10),
        make_report("r4", [make_tenant(resident_layers=8, num_running=9)], free_pages=20))
    assert [e.replica_id for e in state.decide(NOW).view.hosts("a")] == ["r4", "r3", "r2", "r1"]


def test_the_router_groups_equally_resident_hosts_so_serve_picks_the_shortest_queue_among_them():
    from types import SimpleNamespace

    from cluster.messages import RouteEntry, RoutingView
    from replicas.service.router import rank_replicas

    def entry(rid, frac, spare, model="a"):
        return RouteEntry(rid, model, frac, spare, 0)

    view = RoutingView(1, NOW, entries=(entry("r1", 1.0, 50), entry("r2", 1.0, 10), entry("r3", 0.5, 99),
                                        entry("r4", 1.0, 5, model="b")), loading=(entry("r5", 0.0, 80),))
    replicas = {rid: SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid)) for rid in ("r1", "r2", "r3", "r4", "r5")}
    ranks = rank_replicas(view, "a", list(replicas.values()))
    assert [[r.replica_id.unique_id for r in group] for group in ranks] == [["r1", "r2"], ["r3"], ["r5"], ["r4"]]
    assert rank_replicas(view, "c", list(replicas.values())) == []  # no host: Serve's own choice


def test_within_a_group_the_router_puts_first_the_host_with_the_fewest_requests_per_page_of_kv_room():
    """A replica hosting three busy tenants has less KV room than one hosting two; at equal queues its
    requests waited for pages (TTFT tail). Equal rooms stay the shortest queue; unknown counts leave
    the group to Serve."""
    from types import SimpleNamespace

    from cluster.messages import RouteEntry, RoutingView
    from replicas.service.router import rank_replicas

    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid)) for rid in ("r0", "r1", "r2")]
    # r0: 2 spare + 17 KV pages of room; r1: 20 + 14 (one tenant fewer); r2 hosts only model b
    view = RoutingView(1, NOW, entries=(RouteEntry("r0", "a", 1.0, 2, 9, 17), RouteEntry("r1", "a", 1.0, 20, 7, 14),
                                        RouteEntry("r2", "b", 1.0, 40, 0, 0)))

    def ids(requests):
        return [[r.replica_id.unique_id for r in g] for g in rank_replicas(view, "a", replicas, requests)]

    assert ids({"r0": 16, "r1": 16}) == [["r1"], ["r0"], ["r2"]]  # as many requests, more room
    assert ids({"r0": 9, "r1": 18}) == [["r0"], ["r1"], ["r2"]]  # 10/19 < 19/34: r1 has taken its share
    assert ids({"r0": 16, "r1": None}) == [["r1", "r0"], ["r2"]]  # a count unknown: Serve's shortest queue
    assert ids(None) == [["r1", "r0"], ["r2"]]
    equal = RoutingView(1, NOW, entries=(RouteEntry("r0", "a", 1.0, 10, 0, 10), RouteEntry("r1", "a", 1.0, 10, 0, 10)))
    assert [[r.replica_id.unique_id for r in g] for g in rank_replicas(equal, "a", replicas[:2], {"r0": 3, "r1": 2})] \
        == [["r1"], ["r0"]]  # equal rooms: the shortest queue

    # a burst between two views spreads in proportion to room: each request counts on the host it went to
    counts = {"r0": 0, "r1": 0}
    for _ in range(53):
        counts[ids(counts)[0][0]] += 1
    assert counts == {"r0": 19, "r1": 34}


def test_the_router_never_offers_a_replica_that_refused_the_model_for_good_while_another_exists():
    """CI saw a burst's overflow spill onto the replica that had refused the model (offered last, behind
    a full one): it refused again and the ingress answered 503. Serve waits for room instead."""
    from types import SimpleNamespace

    from cluster.messages import RouteEntry, RoutingView
    from replicas.service.router import route

    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid)) for rid in ("r1", "r2", "r3")]
    view = RoutingView(1, NOW, entries=(RouteEntry("r1", "a", 1.0, 50, 0), RouteEntry("r2", "b", 1.0, 5, 0)),
                       loading=(RouteEntry("r3", "a", 0.0, 80, 0),))

    def ids(groups):
        return None if groups is None else [[r.replica_id.unique_id for r in g] for g in groups]

    assert ids(route(view, "a", frozenset(), replicas)) == [["r1"], ["r3"], ["r2"]]
    assert ids(route(view, "a", frozenset({"r1"}), replicas)) == [["r3"], ["r2"]]
    assert ids(route(view, "c", frozenset({"r2"}), replicas)) == [["r1", "r3"]]  # no host known
    assert ids(route(None, "a", frozenset({"r1", "r3"}), replicas)) == [["r2"]]  # no view
    assert ids(route(None, "a", frozenset(), replicas)) is None  # Serve's power of two choices
    assert ids(route(view, "a", frozenset({"r1", "r2", "r3"}), replicas)) == [["r1", "r2", "r3"]]  # one refuses again


RIDS = [f"r{i}" for i in range(6)]


@settings(max_examples=200, deadline=None)
@given(candidates=st.lists(st.sampled_from(RIDS), min_size=1, unique=True), avoid=st.sets(st.sampled_from(RIDS)),
       hosts=st.lists(st.tuples(st.sampled_from(RIDS), st.sampled_from(["a", "b"]), st.sampled_from([0.5, 1.0])),
                      unique_by=lambda h: (h[0], h[1])),
       loading=st.sets(st.sampled_from(RIDS)), model=st.sampled_from(["a", "b", None]), has_view=st.booleans(),
       counts=st.lists(st.integers(-1, 300), min_size=len(RIDS), max_size=len(RIDS)),
       rooms=st.lists(st.integers(0, 200), min_size=len(RIDS), max_size=len(RIDS)))
def test_the_router_offers_only_candidates_and_an_avoided_one_only_when_all_are(candidates, avoid, hosts, loading,
                                                                                 model, has_view, counts, rooms):
    from types import SimpleNamespace

    from cluster.messages import RouteEntry, RoutingView
    from replicas.service.router import route

    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid)) for rid in candidates]
    room = dict(zip(RIDS, rooms))  # spare pages; the KV pages held, half as many
    requests = {rid: None if n < 0 else n for rid, n in zip(RIDS, counts)}  # -1: a count Serve does not know
    entries = tuple(RouteEntry(r, m, f, room[r], 0, room[r] // 2) for r, m, f in hosts)
    loads = tuple(RouteEntry(r, "a", 0.0, room[r], 0) for r in sorted(loading))
    view = RoutingView(1, NOW, entries=entries, loading=loads) if has_view else None
    groups = route(view, model, frozenset(avoid), replicas, requests)
    usable = set(candidates) - avoid
    if groups is None:  # Serve's own choice over every candidate: only when nothing is avoided
        assert not avoid
        return
    offered = [r.replica_id.unique_id for g in groups for r in g]
    assert len(offered) == len(set(offered)) and set(offered) <= set(candidates) and all(groups)
    assert set(offered) == (usable or set(candidates))  # every usable one offered; an avoided one never beside it
    first = [e for e in (view.host_groups(model)[:1][0] if view and model and view.host_groups(model) else [])
             if e.replica_id in usable]
    if len(first) > 1 and all(requests.get(e.replica_id) is not None for e in first):  # the least loaded per room
        best = min(e.load_per_room(requests[e.replica_id]) for e in first)
        assert len(groups[0]) == 1
        assert next(e for e in first if e.replica_id == offered[0]).load_per_room(requests[offered[0]]) == best


def test_every_live_replica_gets_orders_even_with_nothing_to_do():
    decision = make_state(make_report("r1"), make_report("r2", [make_tenant()])).decide(NOW)
    assert set(decision.orders) == {"r1", "r2"}
    assert decision.orders["r1"].reasons == () and decision.reasons == ()


# ---- reasons and status


def test_reasons_name_the_tenant_the_replica_and_the_pages():
    state = make_state(make_report("r1", [idle("a")], reclaimable_pages=12),
                       make_report("r2", [make_tenant(model="b", resident_layers=1, arrival_rate_per_s=3.0)],
                                   free_pages=7),
                       desired_models={"c": 1})
    decision = state.decide(NOW)
    by_kind = {line.split(":")[0]: line for line in decision.reasons}
    assert set(by_kind) == {"cold", "warming", "load"}
    assert "a on r1" in by_kind["cold"] and "12 reclaimable pages" in by_kind["cold"]
    assert "b on r2" in by_kind["warming"] and "7 free pages" in by_kind["warming"]
    assert "c onto r1" in by_kind["load"] and "22 spare pages" in by_kind["load"]
    assert decision.reasons == decision.orders["r1"].reasons[:1] + decision.orders["r2"].reasons + \
        decision.orders["r1"].reasons[1:]


def test_snapshot_is_json_able_and_shows_pages_tenants_and_last_reasons():
    state = make_state(make_report("r1", [make_tenant(resident_layers=6, kv_pages_used=30)], free_pages=20),
                       desired_models={"b": 1})
    assert state.snapshot()["reasons"] == []
    decision = state.decide(NOW)
    snap = json.loads(json.dumps(state.snapshot()))
    replica = snap["replicas"][0]
    assert (replica["free_pages"], replica["kv_pages"], replica["param_pages"]) == (20, 30, 50)
    assert snap["tenants"]["a"]["resident_layers"] == {"r1": 6}
    assert snap["orders"]["r1"]["load"] == ["b"] and snap["reasons"] == list(decision.reasons)
    assert snap["loading"] == [{"replica_id": "r1", "model": "b", "ordered_at_s": NOW}]


@pytest.mark.parametrize("bad", [dict(report_timeout_s=0), dict(cold_after_s=-1), dict(max_queue_per_host=0),
                                 dict(warming_rate_per_s=-0.1), dict(desired_models={"a": -1})])
def test_a_bad_config_raises_a_clear_error(bad):
    with pytest.raises(ValueError, match="ControllerConfig"):
        ControllerConfig(**bad)


def test_the_config_keeps_its_own_copy_of_desired_models():
    desired = {"a": 1}
    config = ControllerConfig(desired_models=desired)
    desired["b"] = 2
    assert config.desired_models == {"a": 1}


# ---- randomized rounds


tenant_st = st.builds(
    make_tenant, model=st.sampled_from("abcd"), resident_layers=st.integers(0, 8),
    num_waiting=st.integers(0, 12), num_running=st.integers(0, 12),
    last_active_s=st.floats(NOW - 100, NOW), arrival_rate_per_s=st.sampled_from([0.0, 0.01, 1.0]))


@st.composite
def report_st(draw, sent_at_s):
    tenants = {t.model: t for t in draw(st.lists(tenant_st, max_size=3))}
    return make_report(draw(st.sampled_from(["r1", "r2", "r3", "r4"])), list(tenants.values()),
                       free_pages=draw(st.integers(0, 20)), reclaimable_pages=draw(st.integers(0, 5)),
                       sent_at_s=sent_at_s)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_rounds_keep_every_rule(data):
    state = ClusterState(ControllerConfig(desired_models={"a": 2, "d": 1}, max_queue_per_host=6))
    last_version, loading = 0, set()
    for step in range(8):
        now = NOW + 3 * step
        for report in data.draw(st.lists(report_st(now), max_size=3)):
            state.ingest(report, now)
        state.forget_stale(now)
        live = {r["replica_id"]: r for r in state.snapshot()["replicas"]}
        decision = state.decide(now)
        assert set(decision.orders) == set(live)
        assert all(o.version == decision.view.version > last_version for o in decision.orders.values())
        last_version = decision.view.version
        new = {(rid, m) for rid, o in decision.orders.items() for m in o.load} - loading
        assert len({m for _, m in new}) == len(new)  # at most one new host per model
        for rid, model in new:
            replica = live[rid]
            assert replica["free_pages"] + replica["reclaimable_pages"] > 0
            assert model not in {t["model"] for t in replica["tenants"]}
        loading = {(x["replica_id"], x["model"]) for x in state.snapshot()["loading"]}
        for rid, o in decision.orders.items():
            assert not (o.cold & o.warming), (rid, o)
        entries = [(e.replica_id, e.model) for e in decision.view.entries]
        assert sorted(entries) == sorted((rid, t["model"]) for rid, r in live.items() for t in r["tenants"])


def test_the_only_host_of_a_warm_model_is_pinned_and_a_cold_models_host_is_not():
    state = ClusterState(ControllerConfig(cold_after_s=30.0))
    now = 1000.0
    state.ingest(make_report("r1", tenants=(make_tenant(model="a", num_running=1, last_active_s=now),)), now)
    state.ingest(make_report("r2", tenants=(make_tenant(model="b", last_active_s=now - 500),)), now)
    state.ingest(make_report("r3", tenants=(make_tenant(model="a", last_active_s=now),)), now)
    orders = state.decide(now).orders
    assert not orders["r1"].pinned and not orders["r3"].pinned  # "a" has two hosts
    assert not orders["r2"].pinned  # "b" is cold
    state.ingest(make_report("r2", tenants=(make_tenant(model="b", num_waiting=1, last_active_s=now),)), now + 1)
    assert state.decide(now + 1).orders["r2"].pinned
