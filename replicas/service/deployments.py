"""Ray Serve wiring: the builder applies `serve.deployment` to plain classes, so those classes stay
importable and testable without Ray.

    OpenAIIngress (FastAPI, one or more replicas)
        -> EngineReplica x N (one per GPU; MemoryAwareRouter picks the replica per request)
    ClusterController (named detached actor) <- reports from every EngineReplica, -> orders

`serve run replicas.service.deployments:app_builder config=path.yaml` and `serve deploy` use `app_builder`;
`oneiros serve` calls `build_app` directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import ray
import torch
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.util import metrics

from cluster.actor import find_controller, get_or_create_controller
from cluster.state import ControllerConfig
from replicas.config import OneirosConfig, default_config
from replicas.engine import heap
from replicas.service.grpc.service import GrpcService
from replicas.service.ingress import DirectHttp, OpenAIFrontend, make_app
from replicas.service.router import MemoryAwareRouter
from replicas.service.server import EngineServer

logger = logging.getLogger(__name__)

POLICY_PATH = "autoscaler.serve_policy:MemoryPressurePolicy"  # Serve imports it in its controller
GRPC_SERVICERS = ["replicas.service.grpc.oneiros_pb2_grpc.add_OneirosLLMServicer_to_server"]  # for serve.start

CONTROLLER_CALL_TIMEOUT_S = 5.0
SLO_WINDOW_S = 10.0  # TTFT SLO misses count for the autoscaler this long
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class _Metrics:
    """Prometheus metrics of one replica, exported through Ray's metrics endpoint."""

    def __init__(self) -> None:
        keys = ("replica", "model")
        self.ttft = metrics.Histogram("oneiros_ttft_seconds", "Time to first token", LATENCY_BUCKETS_S, keys)
        self.tbt = metrics.Histogram("oneiros_tbt_seconds", "Time between tokens", LATENCY_BUCKETS_S, keys)
        self.kv_pages = metrics.Gauge("oneiros_kv_pages", "KV pages held by a tenant", keys)
        self.resident = metrics.Gauge("oneiros_resident_layers", "Layers of a tenant on device", keys)
        self.pool_pages = metrics.Gauge("oneiros_pool_pages", "Pages of the replica's pool by owner (free, param, "
                                        "kv, staging): they add up to the pool", ("replica", "owner"))
        self.lent_pages = metrics.Gauge("oneiros_lent_pages", "Parameter pages lent to the KV cache", ("replica",))
        self.remaps = metrics.Counter("oneiros_remap_events", "Layer reclaims and restores", ("replica", "kind"))
        self._remaps_seen = {"reclaim": 0, "restore": 0}  # totals already counted

    def record(self, server: EngineServer) -> list[float]:
        """Export this period's numbers; returns the TTFT samples drained (for the SLO window)."""
        rid, engine = server.replica_id, server.engine
        drained: list[float] = []
        for model, (ttft, tbt) in engine.drain_latency_samples().items():
            tags = {"replica": rid, "model": model}
            drained += ttft
            for x in ttft:
                self.ttft.observe(x, tags)
            for x in tbt:
                self.tbt.observe(x, tags)
            stats = engine.tenant_stats(model)
            self.kv_pages.set(stats.kv_pages_used, tags)
            self.resident.set(stats.resident_layers, tags)
        memory = engine.memory
        for owner, pages in memory.summary().items():
            self.pool_pages.set(pages, {"replica": rid, "owner": owner})
        self.lent_pages.set(memory.num_lent_pages(), {"replica": rid})
        for kind, total in (("reclaim", memory.num_reclaims), ("restore", memory.num_restores)):
            if total > self._remaps_seen[kind]:
                self.remaps.inc(total - self._remaps_seen[kind], {"replica": rid, "kind": kind})
                self._remaps_seen[kind] = total
        return drained


class EngineReplica(EngineServer):
    """One engine per replica (per GPU). Starts with no model: the controller places models with
    `load` orders, and a request for a model it lacks loads it on demand."""

    async def __init__(self, config: dict[str, Any]) -> None:
        cfg = OneirosConfig.model_validate(config)
        torch.set_num_threads(max(1, int(cfg.replicas.num_cpus)))  # replicas share the host's cores
        context = serve.get_replica_context()
        super().__init__(cfg, replica_id=context.replica_id.unique_id,
                         node_id=ray.get_runtime_context().get_node_id(), models=[])
        self._metrics = _Metrics()
        self._recent_ttft: deque[tuple[float, float]] = deque()  # (monotonic time, TTFT s) of the SLO window
        self._controller = None
        self._report_task = asyncio.get_running_loop().create_task(self._report_loop())

    async def _report_loop(self) -> None:
        period = self.config.replicas.report_period_s
        while True:
            try:
                await self._report_once()
            except Exception as exc:  # controller down or restarting: retry next period
                logger.debug("report to the controller failed: %r", exc)
                self._controller = None
            await asyncio.sleep(period)

    async def _report_once(self) -> None:
        report = await self._run(self._report)
        now = time.monotonic()
        self._recent_ttft.extend((now, x) for x in await self._run(self._metrics.record, self))
        while self._recent_ttft and self._recent_ttft[0][0] < now - SLO_WINDOW_S:
            self._recent_ttft.popleft()
        if self._controller is None:
            self._controller = find_controller(self.config.app_name)
            if self._controller is None:
                return
        orders = await asyncio.wait_for(self._controller.report.remote(report), CONTROLLER_CALL_TIMEOUT_S)
        if orders is not None:
            await self.apply_orders(orders)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Per-replica stats for the memory-pressure autoscaling policy (autoscaler/serve_policy.py)."""
        return await asyncio.wait_for(self._run(self._autoscaling_stats), timeout=10)

    def _autoscaling_stats(self) -> dict[str, float]:
        engine, capacity = self.engine, self.engine.capacity()
        slo = self.config.replicas.autoscaling.ttft_slo_s if self.config.replicas.autoscaling else float("inf")
        misses = sum(1 for _, x in list(self._recent_ttft) if x > slo)  # within the last SLO_WINDOW_S
        pinned = self.last_orders is not None and self.last_orders.pinned
        return {
            "kv_pages_demanded": float(engine.kv_pages_demanded()),
            "spare_pages": float(capacity.spare_pages),
            "pages_per_replica": float(capacity.max_kv_pages),
            "queue_delay_s": engine.queue_delay_s(),
            "ttft_slo_misses": float(misses),
            "pinned": 1.0 if pinned else 0.0,
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve's own periodic stats: the router's view when the controller's is missing."""
        return {"models": self.models, "pending": len(self._queues)}

    async def check_health(self) -> None:
        """Healthy while the engine thread answers; a dead report loop is restarted, not fatal
        (the engine still serves, and the controller only loses this replica's reports)."""
        await asyncio.wait_for(self._run(lambda: None), timeout=20)
        if self._report_task.done():
            logger.warning("report loop of %s ended; restarting it", self.replica_id)
            self._report_task = asyncio.get_running_loop().create_task(self._report_loop())


INGRESS_DRAIN_S = 4.0  # direct HTTP streams get this long to finish when the ingress stops...
INGRESS_SHUTDOWN_S = INGRESS_DRAIN_S + 2.0  # ...within Serve's graceful shutdown of the replica

# The ingress's handle to the engine replicas speaks gRPC (_by_reference=False, below). Its router
# and the ingress's own code run on the replica's one event loop: then cancelling a stream (the
# client went away) cancels the gRPC call on the loop that owns it, and the replica aborts the
# request; with Serve's defaults (a separate router loop) the cancel is lost and the request runs to
# its end. Measured in docs/latency.md.
# Ray starts every worker process at nice 15 (`RAY_worker_niceness`), below its own control plane,
# so that batch tasks yield to it. The ingress and the engine replicas serve requests and run at the
# normal priority, as a server does (vLLM's runs at 0): at 15, every process at 0 beside them (a
# client, an agent, Ray's own) took a core first. Measured in docs/latency.md.
SERVING_PRIORITY = {"RAY_worker_niceness": "0"}
INGRESS_ENV = SERVING_PRIORITY | {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                                  "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
# The engine replicas run `generate` on the loop that owns the gRPC call, too: each request and each
# streamed item then crosses one thread (the engine thread's handoff) instead of two; the engine's
# work never runs on that loop. Measured in docs/latency.md.
ENGINE_ENV = SERVING_PRIORITY | {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def engine_env(num_gpus: float) -> dict[str, str]:
    """An engine replica's environment. One that computes on the CPU also gets heap.HEAP_ENV: a step's
    large temporaries come from a heap that keeps them (replicas/engine/heap.py). On a GPU they are
    device memory, and the host heap keeps glibc's defaults."""
    return ENGINE_ENV | (heap.HEAP_ENV if num_gpus == 0 else {})


@serve.ingress()
class OpenAIIngress:
    """HTTP (FastAPI, built at replica start) and gRPC (the RPC methods below) over one frontend."""

    def __init__(self, engine, config: dict[str, Any]) -> None:
        self._engine = engine
        moves = metrics.Counter("oneiros_failovers", "Requests moved off a replica that died mid-stream", ("model",))
        oneiros = OneirosConfig.model_validate(config)
        self.frontend = OpenAIFrontend(oneiros, self._generate, on_move=lambda model: moves.inc(1, {"model": model}))
        self._grpc = GrpcService(self.frontend)
        self._app = make_app(self.frontend)
        http = oneiros.http
        self._direct = DirectHttp(self._app, http.host, http.port) if http.ingress == "direct" else None

    def _generate(self, model, prompt_ids, params, avoid=()):
        # _by_reference=False: Serve's gRPC transport between the two deployments instead of Ray
        # object references: each streamed item is cheaper (docs/latency.md has the numbers)
        return self._engine.options(stream=True, _by_reference=False).generate.remote(
            model, prompt_ids, params, avoid=avoid)

    def __serve_build_asgi_app__(self):  # what Serve's HTTP proxy forwards to
        return self._app

    def check_health(self) -> None:  # Serve's periodic check: a dead HTTP server fails it
        if self._direct is not None:
            self._direct.check()

    async def __del__(self):  # Serve calls it at shutdown, after its graceful wait for its own requests
        if self._direct is not None:
            await self._direct.stop(timeout_s=INGRESS_DRAIN_S)

    # gRPC: Serve's gRPC proxy calls the method named like the RPC (replicas/service/grpc/oneiros.proto)
    async def Completions(self, request, grpc_context=None):  # noqa: N802 - RPC names
        return await self._grpc.complete("completion", request, grpc_context)

    async def CompletionsStream(self, request, grpc_context=None):  # noqa: N802
        async for chunk in self._grpc.stream("completion", request, grpc_context):
            yield chunk

    async def ChatCompletions(self, request, grpc_context=None):  # noqa: N802
        return await self._grpc.complete("chat", request, grpc_context)

    async def ChatCompletionsStream(self, request, grpc_context=None):  # noqa: N802
        async for chunk in self._grpc.stream("chat", request, grpc_context):
            yield chunk

    def Models(self, request, grpc_context=None):  # noqa: N802
        return self._grpc.models(grpc_context)


def build_app(config: OneirosConfig):
    """The Serve application for this config; also starts the cluster controller if needed."""
    get_or_create_controller(config.app_name, ControllerConfig(
        desired_models={m.name: m.min_replicas for m in config.models},
        report_timeout_s=max(10.0, 10 * config.replicas.report_period_s),
    ))
    r = config.replicas
    if r.autoscaling is None:
        scaling: dict[str, Any] = {"num_replicas": r.num_replicas}
    else:  # our policy keeps its own delays; Serve's would only add to them
        a = r.autoscaling
        scaling = {"autoscaling_config": {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "initial_replicas": min(max(r.num_replicas, a.min_replicas), a.max_replicas),
            "upscale_delay_s": 0, "downscale_delay_s": 0, "metrics_interval_s": 1.0, "look_back_period_s": 2.0,
            "policy": {"policy_function": POLICY_PATH, "policy_kwargs": a.policy_kwargs()},
        }}
    engine = serve.deployment(
        EngineReplica,
        name="EngineReplica",
        **scaling,
        ray_actor_options={"num_cpus": r.num_cpus, "num_gpus": r.num_gpus,
                           "runtime_env": {"env_vars": engine_env(r.num_gpus)}},
        max_ongoing_requests=r.max_pending_requests,
        max_queued_requests=r.max_pending_requests,
        request_router_config=RequestRouterConfig(
            request_router_class=MemoryAwareRouter,
            request_router_kwargs={"app_name": config.app_name},
            request_routing_stats_period_s=max(1.0, r.report_period_s),
        ),
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=5.0,
    )
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0.25, "runtime_env": {"env_vars": INGRESS_ENV}},
                               max_ongoing_requests=4 * r.max_pending_requests,
                               graceful_shutdown_timeout_s=INGRESS_SHUTDOWN_S)
    plain = config.model_dump(mode="json")
    return ingress.bind(engine.bind(plain), plain)


def app_builder(args: dict[str, Any]):
    """For `serve run` / `serve deploy` / KubeRay: args `config: path.yaml`, or the whole Oneiros
    config inline as `oneiros: {...}`, or nothing for the built-in default. There the Serve config's
    http_options own the HTTP port, so the ingress stays behind Serve's proxy (http.ingress: proxy)."""
    if args.get("oneiros"):
        config = OneirosConfig.model_validate(args["oneiros"])
    elif args.get("config"):
        config = OneirosConfig.load(args["config"])
    else:
        config = default_config()
    return build_app(config.model_copy(update={"http": config.http.model_copy(update={"ingress": "proxy"})}))


def serve_start_options(config: OneirosConfig) -> dict[str, Any]:
    """serve.start's arguments for a cluster that `config` is deployed on by `build_app`: Serve's
    HTTP proxy on http.port, or beside it when the ingress serves http.port itself."""
    from replicas.cli import free_port

    http = config.http
    proxy_port = http.port if http.ingress == "proxy" else http.proxy_port or free_port()
    return {"http_options": {"host": http.host, "port": proxy_port},
            "grpc_options": {"port": http.grpc_port, "grpc_servicer_functions": GRPC_SERVICERS}}
