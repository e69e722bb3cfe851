"""cluster: the controller's decisions (pure, no Ray) and the messages replicas and routers share."""

from cluster.messages import ReplicaOrders, ReplicaReport, RouteEntry, RoutingView, TenantReport
from cluster.state import ClusterState, ControllerConfig, Decision, spare_pages

__all__ = [
    "ClusterState",
    "ControllerConfig",
    "Decision",
    "ReplicaOrders",
    "ReplicaReport",
    "RouteEntry",
    "RoutingView",
    "TenantReport",
    "spare_pages",
]
