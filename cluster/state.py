"""ClusterState: the cluster controller's decisions, as a plain object the Ray actor wraps.

It owns the latest report of every replica and turns them, on each `decide(now_s)`, into orders for
every live replica (cold, warming, load) and one routing view. Central invariant: a decision is a
function of the live reports plus the loads ordered and not yet seen in a report, so a restarted
controller rebuilds the same decisions from new reports alone (it only forgets the loads in flight,
which costs at worst one extra host).

Clocks. Reports carry the replica's wall clock; `now_s` is the controller's. Liveness uses the time
a report was received (`ingest`'s `now_s`), and a tenant's last activity is moved onto the
controller's clock by the report's own age (received_at - (sent_at - last_active)), so a replica
whose clock is off by seconds is neither dropped nor called cold for it. Versions are
max(previous + 1, now in ms), so they still increase across a controller restart, and replicas
(which ignore older orders) obey a restarted controller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from cluster.messages import ReplicaOrders, ReplicaReport, RouteEntry, RoutingView, TenantReport


@dataclass(frozen=True)
class ControllerConfig:
    # A replica whose last report was received longer ago than this is considered gone.
    report_timeout_s: float = 10.0
    # A tenant with no running or waiting sequence on any live replica and no activity for this
    # long is cold cluster-wide: every host may lend its layers first.
    cold_after_s: float = 30.0
    # Requests per second on one replica above which a tenant with lent-out layers there is
    # warming (restore ahead of demand); a rate above it anywhere also keeps a tenant from cold.
    warming_rate_per_s: float = 0.05
    # Average queue (waiting + running sequences) per host above which a model gets one more host.
    max_queue_per_host: float = 8.0
    # model -> minimum number of hosts, from the deployment config.
    desired_models: dict[str, int] = field(default_factory=dict)
    # A load ordered this long ago and still not in the replica's report is given up; the model
    # may then be placed again (on the best replica at that time).
    load_timeout_s: float = 120.0

    def __post_init__(self):
        for name in ("report_timeout_s", "cold_after_s", "load_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ControllerConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.warming_rate_per_s < 0 or self.max_queue_per_host <= 0:
            raise ValueError(f"ControllerConfig: warming_rate_per_s must be >= 0 and max_queue_per_host > 0, "
                             f"got {self.warming_rate_per_s} and {self.max_queue_per_host}")
        bad = {m: n for m, n in self.desired_models.items() if n < 0}
        if bad:
            raise ValueError(f"ControllerConfig.desired_models: host counts must be >= 0, got {bad}")
        object.__setattr__(self, "desired_models", dict(self.desired_models))  # our own copy


@dataclass(frozen=True)
class Decision:
    orders: dict[str, ReplicaOrders]  # replica id -> its orders; one per live replica
    view: RoutingView  # what routers read; one entry per (live replica, hosted model)
    reasons: tuple[str, ...]  # one line per decision (tenant, replica, pages, why), for INFO logs


class _Received(NamedTuple):
    report: ReplicaReport
    received_at_s: float  # controller clock


class _Line(NamedTuple):
    """One decision: `kind` in ("cold", "warming", "load"); replica_id None when nowhere fits."""

    kind: str
    replica_id: str | None
    model: str
    reason: str


def spare_pages(report: ReplicaReport) -> int:
    """Pages a new sequence or model could get on the replica now: free plus reclaimable."""
    return report.free_pages + report.reclaimable_pages


def kv_pages(report: ReplicaReport) -> int:
    """KV pages the replica's tenants hold."""
    return sum(t.kv_pages_used for t in report.tenants)


class ClusterState:
    """Latest reports in, orders and a routing view out. Synchronous; time is passed in."""

    def __init__(self, config: ControllerConfig | None = None):
        self.config = config or ControllerConfig()
        self._replicas: dict[str, _Received] = {}
        self._loading: dict[tuple[str, str], float] = {}  # (replica id, model) -> when ordered
        self._version = 0
        self._last: Decision | None = None
        self._lost: list[dict] = []  # the latest LOST_KEPT replicas that stopped reporting, oldest first

    # ---- reports in

    def ingest(self, report: ReplicaReport, now_s: float) -> None:
        """Keep the newest report per replica; one sent before the one we hold is ignored."""
        held = self._replicas.get(report.replica_id)
        if held is not None and report.sent_at_s < held.report.sent_at_s:
            return
        self._replicas[report.replica_id] = _Received(report, now_s)

    def forget_stale(self, now_s: float) -> list[str]:
        """Drop replicas not heard from within report_timeout_s; returns their ids, sorted."""
        gone = sorted(rid for rid, rec in self._replicas.items() if not self._is_live(rec, now_s))
        for rid in gone:
            rec = self._replicas.pop(rid)
            self._lost.append({"replica_id": rid, "node_id": rec.report.node_id, "last_report_s": rec.received_at_s,
                               "forgotten_s": now_s, "models": sorted(t.model for t in rec.report.tenants)})
        del self._lost[:-LOST_KEPT]
        self._loading = {key: t for key, t in self._loading.items() if key[0] not in gone}
        return gone

    # ---- decisions out

    def decide(self, now_s: float) -> Decision:
        live = {rid: self._replicas[rid] for rid in sorted(self._replicas) if self._is_live(self._replicas[rid], now_s)}
        self._version = max(self._version + 1, int(now_s * 1000))
        self._settle_loads(live, now_s)
        lines = self._cold(live, now_s) + self._warming(live) + self._placements(live, now_s)
        orders = {rid: self._orders_for(rid, lines, rid in _sole_warm_hosts(live, lines)) for rid in live}
        entries = tuple(_route_entry(rid, rec.report, t) for rid, rec in live.items() for t in rec.report.tenants)
        loading = tuple(RouteEntry(rid, model, 0.0, spare_pages(live[rid].report), 0,
                                   kv_pages(live[rid].report))
                        for (rid, model) in sorted(self._loading) if rid in live)
        view = RoutingView(version=self._version, made_at_s=now_s,
                           entries=tuple(sorted(entries, key=lambda e: (e.model, e.replica_id))), loading=loading)
        self._last = Decision(orders=orders, view=view, reasons=tuple(line.reason for line in lines))
        return self._last

    def _orders_for(self, rid: str, lines: list[_Line], pinned: bool = False) -> ReplicaOrders:
        mine = [line for line in lines if line.replica_id == rid]
        return ReplicaOrders(
            replica_id=rid, version=self._version, pinned=pinned,
            cold=frozenset(line.model for line in mine if line.kind == "cold"),
            warming=frozenset(line.model for line in mine if line.kind == "warming"),
            load=frozenset(line.model for line in mine if line.kind == "load"),
            reasons=tuple(line.reason for line in mine))

    def _cold(self, live: dict[str, _Received], now_s: float) -> list[_Line]:
        """Tenants idle everywhere: nothing running or waiting, no recent activity, no arrivals."""
        by_model: dict[str, list[tuple[str, _Received, TenantReport]]] = {}
        for rid, rec in live.items():
            for t in rec.report.tenants:
                by_model.setdefault(t.model, []).append((rid, rec, t))
        lines = []
        for model in sorted(by_model):
            hosts = by_model[model]
            if any(t.num_running or t.num_waiting or t.arrival_rate_per_s > self.config.warming_rate_per_s
                   for _, _, t in hosts):
                continue
            idle_s = now_s - max(_active_at(rec, t) for _, rec, t in hosts)
            if idle_s <= self.config.cold_after_s:
                continue
            for rid, rec, t in hosts:
                lines.append(_Line("cold", rid, model, (
                    f"cold: {model} on {rid}: nothing running or waiting on any live replica, idle {idle_s:.1f}s "
                    f"> {self.config.cold_after_s:g}s; lend its {t.resident_layers}/{t.num_layers} resident layers "
                    f"first ({rec.report.reclaimable_pages} reclaimable pages on {rid} now)")))
        return lines

    def _warming(self, live: dict[str, _Received]) -> list[_Line]:
        """Per replica: tenants with demand here (arrivals or a queue) and layers lent out here."""
        lines = []
        for rid, rec in live.items():
            for t in sorted(rec.report.tenants, key=lambda t: t.model):
                demand = t.arrival_rate_per_s > self.config.warming_rate_per_s or t.num_waiting > 0
                if demand and t.resident_layers < t.num_layers:
                    lines.append(_Line("warming", rid, t.model, (
                        f"warming: {t.model} on {rid}: {t.arrival_rate_per_s:.2f} req/s (> "
                        f"{self.config.warming_rate_per_s:g}) and {t.num_waiting} waiting with "
                        f"{t.resident_layers}/{t.num_layers} layers resident; restore ahead of demand "
                        f"({rec.report.free_pages} free pages on {rid})")))
        return lines

    # ---- placement

    def _settle_loads(self, live: dict[str, _Received], now_s: float) -> None:
        """Forget loads that landed (the replica reports the model), failed (the replica says why),
        died or timed out."""
        self._loading = {
            (rid, model): since for (rid, model), since in self._loading.items()
            if rid in live and live[rid].report.tenant(model) is None
            and model not in _failed(live[rid].report) and now_s - since <= self.config.load_timeout_s}

    def _placements(self, live: dict[str, _Received], now_s: float) -> list[_Line]:
        """Re-issue loads in flight, then give each model that needs one at most ONE new host.

        A replica loads one model at a time: while a load is in flight its reported spare pages do
        not show it yet, so a second choice made on them could overcommit the device."""
        lines = [_Line("load", rid, model, f"load: {model} onto {rid}: still loading, ordered {now_s - since:.1f}s "
                                           f"ago ({spare_pages(live[rid].report)} spare pages on {rid} now)")
                 for (rid, model), since in sorted(self._loading.items())]
        for model, why in self._needs(live):
            rid = self._best_new_host(live, model)
            if rid is None:
                refusals = "; ".join(f"{r} refused: {_failed(rec.report)[model]}" for r, rec in live.items()
                                     if model in _failed(rec.report))
                lines.append(_Line("load", None, model, f"load: {model} needs a host ({why}) but no live replica "
                                                        f"without it has spare pages and no load in flight"
                                                        + (f" ({refusals})" if refusals else "")))
                continue
            report = live[rid].report
            self._loading[(rid, model)] = now_s
            lines.append(_Line("load", rid, model, (
                f"load: {model} onto {rid}: {why}; {rid} has {spare_pages(report)} spare pages "
                f"({report.free_pages} free + {report.reclaimable_pages} reclaimable), the most of the replicas "
                f"without it")))
        return lines

    def _needs(self, live: dict[str, _Received]) -> list[tuple[str, str]]:
        """(model, why) for every model short of hosts, unhosted ones first, then the most loaded."""
        hosted: dict[str, list[TenantReport]] = {}
        for rec in live.values():
            for t in rec.report.tenants:
                hosted.setdefault(t.model, []).append(t)
        needs = []
        for model in set(hosted) | set(self.config.desired_models):
            tenants = hosted.get(model, [])
            loading = sum(1 for (_, m) in self._loading if m == model)
            num_hosts = len(tenants) + loading  # a load in flight counts: it will be a host soon
            queue = sum(t.num_waiting + t.num_running for t in tenants)
            minimum = self.config.desired_models.get(model, 0)
            if num_hosts < minimum:
                why = f"desired {minimum} hosts, has {len(tenants)} live (+{loading} loading)"
            elif num_hosts and queue / num_hosts > self.config.max_queue_per_host:
                why = (f"queue {queue} over {num_hosts} hosts = {queue / num_hosts:.1f} per host "
                       f"> {self.config.max_queue_per_host:g}")
            else:
                continue
            needs.append((num_hosts > 0, num_hosts >= minimum, -queue / max(num_hosts, 1), model, why))
        return [(n[3], n[4]) for n in sorted(needs)]

    def _best_new_host(self, live: dict[str, _Received], model: str) -> str | None:
        busy = {rid for (rid, _) in self._loading}
        fits = [(-spare_pages(rec.report), rid) for rid, rec in live.items()
                if rec.report.tenant(model) is None and rid not in busy and spare_pages(rec.report) > 0
                and model not in _failed(rec.report)]  # it just said why it cannot: ask another
        return min(fits)[1] if fits else None

    # ---- helpers and status

    def _is_live(self, rec: _Received, now_s: float) -> bool:
        return now_s - rec.received_at_s <= self.config.report_timeout_s

    def snapshot(self) -> dict:
        """Plain JSON-able state for `oneiros status`: replicas, tenants, loads in flight, last orders."""
        replicas = [_replica_summary(rec) for _, rec in sorted(self._replicas.items())]
        tenants: dict[str, dict] = {}
        for rid, rec in sorted(self._replicas.items()):
            for t in rec.report.tenants:
                entry = tenants.setdefault(t.model, {"num_layers": t.num_layers, "resident_layers": {}, "queue": 0,
                                                     "arrival_rate_per_s": 0.0})
                entry["resident_layers"][rid] = t.resident_layers
                entry["queue"] += t.num_waiting + t.num_running
                entry["arrival_rate_per_s"] += t.arrival_rate_per_s
        last = self._last
        return {
            "version": self._version,
            "replicas": replicas,
            "tenants": tenants,
            "loading": [{"replica_id": rid, "model": m, "ordered_at_s": t}
                        for (rid, m), t in sorted(self._loading.items())],
            "orders": {} if last is None else {
                rid: {"cold": sorted(o.cold), "warming": sorted(o.warming), "load": sorted(o.load)}
                for rid, o in last.orders.items()},
            "reasons": [] if last is None else list(last.reasons),
            "lost_replicas": list(self._lost),
        }


LOST_KEPT = 20  # replicas that stopped reporting, kept for `oneiros status`


def _sole_warm_hosts(live: dict[str, _Received], lines: list[_Line]) -> set[str]:
    """Replicas that are the only live host of some model not cold this round."""
    cold = {line.model for line in lines if line.kind == "cold"}
    hosts: dict[str, set[str]] = {}
    for rid, rec in live.items():
        for t in rec.report.tenants:
            hosts.setdefault(t.model, set()).add(rid)
    return {next(iter(h)) for model, h in hosts.items() if len(h) == 1 and model not in cold}


def _failed(report: ReplicaReport) -> dict[str, str]:
    """model -> why, for the load orders the replica reports it could not carry out lately."""
    return dict(report.failed_loads)


def _active_at(rec: _Received, t: TenantReport) -> float:
    """The tenant's last activity on the controller's clock (the report's age carries over)."""
    return rec.received_at_s - (rec.report.sent_at_s - t.last_active_s)


def _route_entry(rid: str, report: ReplicaReport, t: TenantReport) -> RouteEntry:
    fraction = t.resident_layers / t.num_layers if t.num_layers > 0 else 0.0
    return RouteEntry(replica_id=rid, model=t.model, resident_fraction=min(1.0, max(0.0, fraction)),
                      spare_pages=spare_pages(report), queue=t.num_waiting + t.num_running,
                      kv_pages=kv_pages(report))


def _replica_summary(rec: _Received) -> dict:
    r = rec.report
    kv = kv_pages(r)
    return {
        "replica_id": r.replica_id, "node_id": r.node_id,
        "sent_at_s": r.sent_at_s, "received_at_s": rec.received_at_s,
        "num_pages": r.num_pages, "page_size_bytes": r.page_size_bytes,
        "free_pages": r.free_pages, "reclaimable_pages": r.reclaimable_pages, "kv_pages": kv,
        # what reports tell of the rest: parameters (and staging slots) of the hosted tenants
        "param_pages": max(0, r.num_pages - r.free_pages - kv),
        "link_bytes_per_s": r.link_bytes_per_s, "num_aborted": r.num_aborted,
        "device_memory_used_bytes": r.device_memory_used_bytes,
        "device_memory_total_bytes": r.device_memory_total_bytes,
        "device_utilization_pct": r.device_utilization_pct,
        "tenants": [{"model": t.model, "resident_layers": t.resident_layers, "num_layers": t.num_layers,
                     "num_waiting": t.num_waiting, "num_running": t.num_running,
                     "kv_pages_used": t.kv_pages_used, "arrival_rate_per_s": t.arrival_rate_per_s}
                    for t in sorted(r.tenants, key=lambda t: t.model)],
    }
