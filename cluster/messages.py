"""Messages between replicas, the cluster controller and the router. The only thing they share.

Reports go up (replica -> controller) on a short period; orders come down (controller -> replica)
and are applied between engine steps; the routing view is published by the controller and read
by every router without a call per request. All are frozen dataclasses of plain values, so they
pickle across Ray and compare in tests. Times are wall-clock seconds (time.time()): reports cross
machines, so a monotonic clock would not compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TenantReport:
    model: str  # tenant (model) name
    num_layers: int  # transformer layers of the model
    resident_layers: int  # layers whose parameters are on device now
    num_waiting: int  # sequences queued (incl. swapped out)
    num_running: int  # sequences holding KV on device
    kv_pages_used: int  # KV pages it holds
    last_active_s: float  # wall clock of its last request or step
    arrival_rate_per_s: float  # recent request arrival rate on this replica


@dataclass(frozen=True)
class ReplicaReport:
    replica_id: str  # Serve's replica id (unique in the cluster)
    node_id: str  # Ray node the replica runs on
    sent_at_s: float  # wall clock when the replica built the report
    num_pages: int  # pages in the replica's device pool
    page_size_bytes: int
    free_pages: int  # owned by nobody now
    reclaimable_pages: int  # parameter pages of idle tenants that remapping could lend now (within the cap)
    link_bytes_per_s: float  # measured host->device bandwidth
    tenants: tuple[TenantReport, ...]  # every model hosted by the replica
    num_aborted: int = 0  # requests aborted since start (clients gone, cancellations)
    device_memory_used_bytes: int | None = None  # from NVML on GPUs; None elsewhere
    device_memory_total_bytes: int | None = None
    device_utilization_pct: int | None = None
    failed_loads: tuple[tuple[str, str], ...] = ()  # (model, why) of load orders this replica could not carry out

    def tenant(self, model: str) -> TenantReport | None:
        return next((t for t in self.tenants if t.model == model), None)


@dataclass(frozen=True)
class ReplicaOrders:
    """What the controller wants from one replica; idempotent, the latest replaces earlier ones."""

    replica_id: str
    version: int  # increases with every decision round; a replica ignores older orders
    cold: frozenset[str] = frozenset()  # tenants idle cluster-wide: lend their layers first
    warming: frozenset[str] = frozenset()  # tenants about to get traffic here: restore ahead of demand
    load: frozenset[str] = frozenset()  # models this replica should start hosting
    reasons: tuple[str, ...] = ()  # one line per decision, for logs and `oneiros status`
    pinned: bool = False  # the only host of some warm (not cold) model: scaling down must keep it


@dataclass(frozen=True)
class RouteEntry:
    replica_id: str
    model: str
    resident_fraction: float  # resident layers / layers of this model on this replica, 0..1
    spare_pages: int  # free + reclaimable pages of the replica
    queue: int  # waiting + running sequences of this model on the replica
    kv_pages: int = 0  # KV pages the replica's tenants hold (all of them)

    def load_per_room(self, requests: int) -> float:
        """Requests per page of KV room on the replica, counting one more (`requests` are those it
        has now, as the router counts them). The room is what KV holds plus what it could take:
        busy tenants' parameters do not count, so a replica hosting more of them has less."""
        return (requests + 1) / max(1, self.spare_pages + self.kv_pages)


@dataclass(frozen=True)
class RoutingView:
    version: int  # increases with every publication
    made_at_s: float  # wall clock of publication; routers treat an old view as stale
    entries: tuple[RouteEntry, ...] = field(default=())
    # Replicas ordered to load a model and not hosting it yet (chosen for their spare pages): its
    # requests go there meanwhile, after every replica that hosts it already.
    loading: tuple[RouteEntry, ...] = field(default=())

    def hosts(self, model: str) -> list[RouteEntry]:
        """Replicas hosting `model`, best first: most resident layers, then most spare pages, then
        the shortest queue; then those loading it."""
        found = [e for e in self.entries if e.model == model]
        ranked = sorted(found, key=lambda e: (-e.resident_fraction, -e.spare_pages, e.queue, e.replica_id))
        return ranked + [e for e in self.loading if e.model == model]

    def host_groups(self, model: str) -> list[list[RouteEntry]]:
        """hosts(model) in groups of equal residency, most resident first, then those loading it.
        The router hands Serve one group at a time, and Serve sends the request to the shortest
        queue within it: a burst between two views spreads over equally good hosts."""
        loading = {e.replica_id for e in self.loading if e.model == model}
        groups: dict[tuple[bool, float], list[RouteEntry]] = {}  # insertion order = hosts() order
        for e in self.hosts(model):
            groups.setdefault((e.replica_id in loading, e.resident_fraction), []).append(e)
        return list(groups.values())
