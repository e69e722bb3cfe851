"""Faults on real local Ray: a replica killed mid-stream, the controller killed, a client that
disconnects mid-stream. Each test waits for the cluster to re-converge before it ends, so the
session cluster is whole again for the tests after it."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse

import pytest
import ray

from cluster.actor import find_controller

openai = pytest.importorskip("openai")

CONVERGE_TIMEOUT_S = 90


def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)


def status(config) -> dict:
    return ray.get(find_controller(config.app_name).status.remote(), timeout=10)


def wait_until(predicate, timeout_s=CONVERGE_TIMEOUT_S, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - the controller may be restarting
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} not reached within {timeout_s} s")


def converged(config) -> bool:
    """Every replica reports and the published routing view has a host for every model."""
    s = status(config)
    view = ray.get(find_controller(config.app_name).routing_view.remote(), timeout=10)
    live = {r["replica_id"] for r in s["replicas"]}
    return (len(live) == config.replicas.num_replicas and view is not None
            and all(hosts_of(view, m.name) for m in config.models) and {e.replica_id for e in view.entries} <= live)


def hosts_of(view, model: str) -> frozenset[str]:
    """Replicas that host the model (not those only loading it)."""
    return frozenset(e.replica_id for e in view.entries if e.model == model)


def placement(config) -> dict[str, frozenset[str]]:
    view = ray.get(find_controller(config.app_name).routing_view.remote(), timeout=10)
    return {m: hosts_of(view, m) for m in ("llama", "qwen", "opt")}


def test_a_replica_killed_mid_stream_fails_its_streams_clearly_and_loses_nothing_else(cluster):
    config, base = cluster
    wait_until(lambda: converged(config), what="a converged cluster")
    c = client(base)

    def start(model: str, max_tokens: int):
        stream = c.completions.create(model=model, prompt=[5, 6, 7], max_tokens=max_tokens, temperature=0,
                                      stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        first = next(chunks)
        return stream, chunks, first.system_fingerprint.removeprefix("oneiros-")

    doomed, chunks, victim = start("llama", 1000)  # the replica it runs on is the victim
    survivor = None
    for model in ("qwen", "opt", "llama") * 3:  # a request in flight on another replica
        stream, rest, rid = start(model, 300)
        if rid != victim:
            survivor = (stream, rest)
            break
        stream.close()
    assert survivor is not None, "no request landed on the other replica"
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{config.app_name}#EngineReplica#{victim}", namespace="serve"),
             no_restart=True)
    received = []
    with pytest.raises(openai.APIError, match="replica failed mid-stream"):
        for chunk in chunks:
            received.append(chunk)
    assert len(received) < 999, "the stream finished before the kill"
    survived = [ch for ch in survivor[1]]
    assert survived[-1].choices[0].finish_reason == "length"  # nothing lost on the other replica
    # Serve replaces the replica; the controller forgets the dead one and places its models again
    wait_until(lambda: converged(config) and victim not in {r["replica_id"] for r in status(config)["replicas"]},
               what="re-convergence after the kill")
    assert c.completions.create(model="llama", prompt=[5, 6, 7], max_tokens=4, temperature=0).usage.completion_tokens


def test_routing_survives_a_controller_kill_and_the_restart_rebuilds_state(cluster):
    config, base = cluster
    wait_until(lambda: converged(config), what="a converged cluster")
    before = placement(config)  # which replicas host each model (the first-ranked one moves with spare pages)
    ray.kill(find_controller(config.app_name), no_restart=False)  # Ray restarts it (max_restarts=-1)
    c = client(base)
    for model in before:  # routing keeps working on the routers' last view meanwhile
        assert c.completions.create(model=model, prompt=[1, 2], max_tokens=3, temperature=0).usage.completion_tokens
    wait_until(lambda: converged(config), what="the restarted controller's rebuilt state")
    after = placement(config)
    # Rebuilt from reports alone: every host is still a host, nothing was reloaded. A request sent
    # while the routers' view was stale (the controller restarting) may have added a host on demand.
    assert all(before[m] <= after[m] for m in before), (before, after)


def test_a_client_that_disconnects_mid_stream_frees_its_pages(cluster):
    config, base = cluster
    wait_until(lambda: converged(config), what="a converged cluster")

    def qwen_kv_pages() -> int:
        return sum(t["kv_pages_used"] for r in status(config)["replicas"] for t in r["tenants"] if t["model"] == "qwen")

    def num_aborted() -> int:
        return sum(r["num_aborted"] for r in status(config)["replicas"])

    aborted = num_aborted()
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    body = json.dumps({"model": "qwen", "prompt": [3] * 20, "max_tokens": 1000, "temperature": 0,
                       "stream": True, "ignore_eos": True})
    conn.request("POST", url.path + "/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.readline()  # the first event: the request holds KV pages now
    # Gone at once: the engine steps on without waiting for its consumers, so a 1000-token stream
    # ends within a second or two of its start whether or not anyone reads it.
    conn.close()
    # freed by the abort, not by finishing its 1000 tokens
    wait_until(lambda: num_aborted() == aborted + 1 and qwen_kv_pages() == 0, timeout_s=30,
               what="the request aborted and its pages freed after the disconnect")
