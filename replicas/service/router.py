"""MemoryAwareRouter: a Ray Serve request router that sends a request where its model lives best.

Ranks, from the cluster controller's published RoutingView: the replicas hosting the request's
model in groups of equal residency, most resident first (`RoutingView.host_groups`), then those
loading it; replicas that do not host it come last (they load it on demand). Within a group, the
host with the fewest requests per page of KV room comes first (`RouteEntry.load_per_room`: the
requests are this router's live counts, the room the view's), and Serve sends the request to the
first host with room. Equal rooms make that the shortest queue, so a burst spreads over equally good
hosts; a replica hosting more busy tenants, whose parameters leave less room for KV, gets fewer
requests instead of as many that then wait for pages. A full host spills to the next.

No actor call per request: the view is refreshed in the background at most every `refresh_s`. When
it is older than `stale_after_s` (controller down or restarting), or it does not know the model,
routing falls back to Serve's power of two choices.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

from cluster.actor import NAMESPACE, controller_name
from cluster.messages import RoutingView

logger = logging.getLogger(__name__)

VIEW_CALL_TIMEOUT_S = 2.0
FIRST_VIEW_WAIT_S = 2.0  # a router with no view yet waits this long once, instead of routing blind


def model_of(pending_request: PendingRequest | None) -> str | None:
    """The model a request is for: the first argument of `EngineReplica.generate`."""
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    return first if isinstance(first, str) else None


def avoided_by(pending_request: PendingRequest | None) -> frozenset[str]:
    """Replica ids that told the ingress they can never load this request's model (`avoid=`)."""
    if pending_request is None:
        return frozenset()
    return frozenset(pending_request.kwargs.get("avoid", ()))


def rank_replicas(view: RoutingView, model: str, candidates: list[RunningReplica],
                  requests: Mapping[str, int | None] | None = None) -> list[list[RunningReplica]]:
    """The view's host groups of `model` (RoutingView.host_groups), then the rest. A group whose
    hosts' `requests` (replica id -> requests it has now) are all known is split into one group per
    host, fewest requests per page of KV room first; Serve sends the request to the first with room.
    Otherwise Serve picks the shortest queue within the group (8 chats at once went 7 to 1 when each
    host was a group of its own, ranked by the view alone)."""
    by_id = {r.replica_id.unique_id: r for r in candidates}
    requests = requests or {}
    groups: list[list[RunningReplica]] = []
    for group in view.host_groups(model):
        entries = [e for e in group if e.replica_id in by_id]
        if len(entries) > 1 and all(requests.get(e.replica_id) is not None for e in entries):
            entries.sort(key=lambda e: e.load_per_room(requests[e.replica_id]))  # stable: ties keep the view's order
            groups += [[by_id.pop(e.replica_id)] for e in entries]
        elif entries:
            groups.append([by_id.pop(e.replica_id) for e in entries])
    if not groups:
        return []
    rest = list(by_id.values())
    return groups + ([rest] if rest else [])


def route(view: RoutingView | None, model: str | None, avoid: frozenset[str],
          candidates: list[RunningReplica],
          requests: Mapping[str, int | None] | None = None) -> list[list[RunningReplica]] | None:
    """The groups Serve tries in turn (it takes the shortest queue with room in the first group that
    has any, and backs off and asks again when none has), or None for Serve's power of two choices.
    A replica that refused the model for good is offered only when every replica has: offered last
    behind full usable ones, it took a burst's overflow and refused it again (a 503)."""
    usable = [r for r in candidates if r.replica_id.unique_id not in avoid]
    if not usable:  # every replica refused for good: one of them answers again, and the ingress stops
        return [candidates]
    if view is not None and model is not None:
        ranks = rank_replicas(view, model, usable, requests)
        if ranks:
            return ranks
    return [usable] if avoid else None  # Serve's power of two choices draws from every replica


class MemoryAwareRouter(PowerOfTwoChoicesRequestRouter):
    def initialize_state(self, app_name: str = "oneiros", refresh_s: float = 0.5, stale_after_s: float = 5.0,
                         **kwargs: Any) -> None:
        self._controller_name = controller_name(app_name)
        self._refresh_s, self._stale_after_s = refresh_s, stale_after_s
        self._view: RoutingView | None = None
        self._view_at = 0.0  # monotonic time the view was received
        self._refreshing: asyncio.Task | None = None
        self._last_try = 0.0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        self._maybe_refresh()
        if self._view is None and self._refreshing is not None:  # the very first requests: wait for a view
            await asyncio.wait([self._refreshing], timeout=FIRST_VIEW_WAIT_S)
        view = self._view if time.monotonic() - self._view_at <= self._stale_after_s else None
        cache = self.replica_queue_len_cache  # Serve's live count per replica: + on send, - on completion
        requests = {r.replica_id.unique_id: cache.get(r.replica_id) for r in candidate_replicas}
        ranks = route(view, model_of(pending_request), avoided_by(pending_request), candidate_replicas, requests)
        if ranks is not None:
            return ranks
        return await super().choose_replicas(candidate_replicas, pending_request)

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._last_try < self._refresh_s or (self._refreshing and not self._refreshing.done()):
            return
        self._last_try = now
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            actor = ray.get_actor(self._controller_name, namespace=NAMESPACE)
            view = await asyncio.wait_for(actor.routing_view.remote(), VIEW_CALL_TIMEOUT_S)
        except Exception as exc:  # controller down or restarting: keep the last view until it is stale
            logger.debug("routing view refresh failed: %s", exc)
            return
        if view is not None:
            self._view, self._view_at = view, time.monotonic()
