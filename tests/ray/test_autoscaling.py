"""The memory-pressure policy scales a real Serve deployment up under load and back down after it.

A second app in the session cluster: one tiny tenant in a pool so small that a burst of long
requests demands more KV pages than the replica has free or reclaimable."""

from __future__ import annotations

import threading
import time

import pytest
import ray
from ray import serve

from cluster.actor import find_controller
from replicas.config import default_config
from replicas.service.deployments import build_app
from replicas.engine.sampling import SamplingParams

APP = "oneiros-as"


def running_replicas() -> int:
    status = serve.status().applications[APP].deployments["EngineReplica"]
    return sum(n for state, n in status.replica_states.items() if str(state).endswith("RUNNING"))


def wait_for(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.5)
    pytest.fail(f"{what} within {timeout_s} s (running replicas: {running_replicas()})")


@pytest.fixture(scope="module")
def scaling_app(cluster):
    config = default_config(
        app_name=APP,
        models=[{"name": "llama", "architecture": "tiny-llama", "seed": 1}],
        replicas={"num_replicas": 1, "num_cpus": 0.5, "report_period_s": 0.2,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1.0,
                                  "downscale_delay_s": 4.0, "cooldown_s": 2.0}},
        memory={"num_pages": 24},  # ~15 pages of parameters: KV room for ~1.1k tokens, plus what remapping lends
        http={"ingress": "proxy"},  # driven through its handle; its ingress stays off the API port
    )
    serve.run(build_app(config), name=APP, route_prefix="/as", blocking=False)
    wait_for(lambda: running_replicas() == 1, 60, "the app to start")
    yield serve.get_deployment_handle("EngineReplica", app_name=APP)
    serve.delete(APP)
    controller = find_controller(APP)
    if controller is not None:
        ray.kill(controller)


def test_memory_pressure_scales_up_under_load_and_down_after(scaling_app):
    stop = threading.Event()
    params = SamplingParams(max_tokens=600, temperature=0, ignore_eos=True)

    def client():
        while not stop.is_set():
            stream = scaling_app.options(stream=True).generate.remote("llama", [7] * 100, params)
            for _ in stream:
                if stop.is_set():
                    stream.cancel()
                    break

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: running_replicas() == 2, 90, "scale up to 2 replicas under KV pressure")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    wait_for(lambda: running_replicas() == 1, 90, "scale back down to 1 replica after the load")
