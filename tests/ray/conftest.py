"""One local Ray cluster and one Oneiros app for the whole test session (Ray starts in ~9 s here).

Token auth is off for this loopback-only test cluster (RAY_AUTH_MODE=disabled, set deliberately);
`oneiros serve` keeps Ray's default token auth on.
"""

from __future__ import annotations

import os
import pathlib
import time

import pytest

from replicas.cli import free_port

ray = pytest.importorskip("ray")

RAY_DIR = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_DIR in pathlib.Path(item.fspath).parents:
            item.add_marker(pytest.mark.ray)




_DASHBOARD: list[str] = []  # the session cluster's job server address, once it runs


@pytest.fixture(scope="session")
def dashboard(cluster) -> str:
    """Address of the session cluster's job server (Ray's dashboard)."""
    return _DASHBOARD[-1]


@pytest.fixture(scope="session")
def cluster():
    """(config, base_url) of a running app: 2 engine replicas, 3 tiny tenants, on a local Ray."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    from ray import serve

    from cluster.actor import NAMESPACE, find_controller
    from replicas.config import default_config
    from replicas.service.deployments import build_app, serve_start_options

    port, grpc_port, dashboard_port = free_port(), free_port(), free_port()
    config = default_config(http={"port": port, "grpc_port": grpc_port},
                            replicas={"num_replicas": 2, "report_period_s": 0.2})
    # the dashboard runs the job server, as `oneiros serve` starts it; metrics export every second
    ray.init(num_cpus=6, namespace=NAMESPACE, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, logging_level="warning",
             _system_config={"metrics_report_interval_ms": 1000})
    _DASHBOARD.append(f"http://127.0.0.1:{dashboard_port}")
    serve.start(**serve_start_options(config))  # the ingress serves HTTP on `port` itself, as `oneiros serve`
    serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=False)
    controller = find_controller(config.app_name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # every model placed on a replica
        status = ray.get(controller.status.remote(), timeout=10)
        if len(status["tenants"]) == len(config.models):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"models not placed within 60 s: {status}")
    yield config, f"http://127.0.0.1:{port}/v1"
    serve.shutdown()
    ray.kill(controller)
    ray.shutdown()
