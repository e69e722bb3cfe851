"""Two Ray nodes on one machine (ray.cluster_utils.Cluster): one engine replica per node, every model
placed on both (min_replicas 2), a burst served on both. Runs as its own process (tests/ray/test_two_nodes.py),
because a driver joins one Ray cluster at a time. Prints one JSON line; exits non-zero on failure."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

os.environ["RAY_AUTH_MODE"] = "disabled"  # loopback-only test cluster

import openai  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from cluster.actor import NAMESPACE, find_controller  # noqa: E402
from replicas.config import default_config  # noqa: E402
from replicas.service.deployments import build_app  # noqa: E402


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    nodes.add_node(num_cpus=2)
    ray.init(address=nodes.address, namespace=NAMESPACE, logging_level="warning")
    # 1.5 CPUs per replica on 2-CPU nodes: one replica per node; the ingress behind Serve's proxy, as on
    # any multi-node cluster
    # every model on both replicas: with min_replicas 1 the placement is a race (a replica that reports
    # late finds all three models on the other, which is right, and the burst then never reaches it)
    models = [dict(m, min_replicas=2) for m in default_config().model_dump()["models"]]
    config = default_config(models=models, http={"port": port, "ingress": "proxy"},
                            replicas={"num_replicas": 2, "num_cpus": 1.5, "report_period_s": 0.2})
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=False)
        controller = find_controller(config.app_name)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = ray.get(controller.status.remote(), timeout=10)
            hosts = [len(t["resident_layers"]) for t in status["tenants"].values()]
            if len(status["replicas"]) == 2 and hosts == [2, 2, 2]:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"not converged: {status}")
        node_of = {r["replica_id"]: r["node_id"] for r in status["replicas"]}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)

        def node_serving(model: str) -> str:
            out = client.completions.create(model=model, prompt=[1, 2, 3], max_tokens=8, temperature=0)
            return node_of[out.system_fingerprint.removeprefix("oneiros-")]

        with ThreadPoolExecutor(12) as pool:  # a burst: the router spreads it over equally good hosts
            served = list(pool.map(node_serving, ["llama", "qwen", "opt"] * 4))
        summary = {"nodes": len(set(node_of.values())), "served_on_nodes": len(set(served))}
        print(json.dumps(summary))
        return 0 if summary == {"nodes": 2, "served_on_nodes": 2} else 1
    finally:
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()


if __name__ == "__main__":
    sys.exit(main())
