"""The ClusterController Ray actor: a thin shell over `ClusterState`.

Named and detached, so every replica and router finds it by name, and restarted by Ray if it dies;
it keeps nothing on disk, because the next round of replica reports rebuilds its whole state.
Replicas call `report(report)` and get their latest orders back; routers call `routing_view()` a
few times a second (never per request). Decisions run at most every `decide_period_s`, triggered
by reports, so there is no background loop to lose in a restart.
"""

from __future__ import annotations

import logging
import time

import ray

from cluster.messages import ReplicaOrders, ReplicaReport, RoutingView
from cluster.state import ClusterState, ControllerConfig, Decision

logger = logging.getLogger(__name__)

NAMESPACE = "oneiros"


def controller_name(app_name: str) -> str:
    return f"{app_name}-controller"


class ClusterController:
    def __init__(self, config: ControllerConfig, decide_period_s: float = 0.5) -> None:
        self._state = ClusterState(config)
        self._decide_period_s = decide_period_s
        self._decision: Decision | None = None
        self._decided_at = 0.0
        logging.basicConfig(level=logging.INFO)
        logger.info("cluster controller up: %s", config)

    def report(self, report: ReplicaReport) -> ReplicaOrders | None:
        now = time.time()
        self._state.ingest(report, now)
        if self._decision is None or now - self._decided_at >= self._decide_period_s:
            self._decide(now)
        return self._decision.orders.get(report.replica_id) if self._decision else None

    def _decide(self, now: float) -> None:
        for rid in self._state.forget_stale(now):
            logger.info("replica %s stopped reporting: forgotten", rid)
        decision = self._state.decide(now)
        if self._decision is None or _gist(decision) != _gist(self._decision):  # log changes, not every round
            for reason in decision.reasons:
                logger.info("decision: %s", reason)
        self._decision, self._decided_at = decision, now

    def routing_view(self) -> RoutingView | None:
        return self._decision.view if self._decision else None

    def status(self) -> dict:
        return self._state.snapshot()

    def ping(self) -> bool:
        return True


def _gist(decision: Decision) -> dict:
    """What a decision orders, without versions and wording (which change every round)."""
    return {rid: (o.cold, o.warming, o.load) for rid, o in decision.orders.items()}


def get_or_create_controller(app_name: str, config: ControllerConfig):
    """The named detached controller of this app, created if it is not running yet."""
    actor = ray.remote(ClusterController).options(
        name=controller_name(app_name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, num_cpus=0,
    )
    return actor.remote(config)


def find_controller(app_name: str):
    """The running controller, or None (never creates one)."""
    try:
        return ray.get_actor(controller_name(app_name), namespace=NAMESPACE)
    except ValueError:
        return None
