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
    """Every replica reports, the published routing view has a host for every model, and the view
    lists exactly what the replicas report hosting (a view decided before a replica's first report to
    a restarted controller lags the status: seen as a host "lost" across the restart)."""
    s = status(config)
    view = ray.get(find_controller(config.app_name).routing_view.remote(), timeout=10)
    live = {r["replica_id"] for r in s["replicas"]}
    reported = {(r["replica_id"], t["model"]) for r in s["replicas"] for t in r["tenants"]}
    return (len(live) == config.replicas.num_replicas and view is not None
            and all(hosts_of(view, m.name) for m in config.models)
            and {(e.replica_id, e.model) for e in view.entries} == reported)


def hosts_of(view, model: str) -> frozenset[str]:
    """Replicas that host the model (not those only loading it)."""
    return frozenset(e.replica_id for e in view.entries if e.model == model)


def placement(config) -> dict[str, frozenset[str]]:
    view = ray.get(find_controller(config.app_name).routing_view.remote(), timeout=10)
    return {m: hosts_of(view, m) for m in ("llama", "qwen", "opt")}


def test_a_replica_killed_mid_stream_loses_no_stream_and_changes_no_token(cluster):
    """Issue 19: greedy and seeded streams of every tenant in flight, the replica serving most of them
    killed; every stream completes, each with the tokens of the same request run where nothing failed."""
    config, base = cluster
    wait_until(lambda: converged(config), what="a converged cluster")
    c = client(base)
    from replicas.engine.tokenizer import Tokenizer

    # only "abcdefgh" may come out: the text is the tokens (random weights' bytes are rarely valid UTF-8)
    letters = {str(t): 100 for t in Tokenizer.byte_level().encode("abcdefgh")}

    def request(model: str, seed: int | None) -> dict:
        sampling = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
        return dict(model=model, prompt=[5, 6, 7], max_tokens=600, logit_bias=letters,
                    extra_body={"ignore_eos": True}, **sampling)

    requests = [request(m, seed) for m in ("llama", "qwen", "opt") for seed in (None, 11)]
    streams, keep = [], []  # keep: a Stream that is garbage collected closes its connection
    for kw in requests:
        keep.append(c.completions.create(stream=True, **kw))
        chunks = iter(keep[-1])
        first = next(chunks)
        streams.append((first, chunks))
    hosts = [first.system_fingerprint.removeprefix("oneiros-") for first, _ in streams]
    victim = max(set(hosts), key=hosts.count)
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{config.app_name}#EngineReplica#{victim}", namespace="serve"),
             no_restart=True)
    got = []
    for first, chunks in streams:
        rest = list(chunks)  # raises if the stream failed
        got.append(("".join(ch.choices[0].text for ch in [first, *rest]), rest[-1].choices[0].finish_reason))
    wait_until(lambda: converged(config) and victim not in {r["replica_id"] for r in status(config)["replicas"]},
               what="re-convergence after the kill")
    for kw, host, (text, reason) in zip(requests, hosts, got):
        alone = c.completions.create(**kw).choices[0].text  # the same request, nothing failing
        assert reason == "length" and text == alone, (kw["model"], kw.get("seed"), host == victim)


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
    hosted = {r["replica_id"]: sorted(t["model"] for t in r["tenants"]) for r in status(config)["replicas"]}
    assert all(before[m] <= after[m] for m in before), (before, after, hosted)


def test_a_client_that_disconnects_mid_stream_frees_its_pages(cluster):
    config, base = cluster
    wait_until(lambda: converged(config), what="a converged cluster")

    def qwen_kv_pages() -> int:
        return sum(t["kv_pages_used"] for r in status(config)["replicas"] for t in r["tenants"] if t["model"] == "qwen")

    def num_aborted() -> int:
        return sum(r["num_aborted"] for r in status(config)["replicas"])

    url = urllib.parse.urlparse(base)
    body = json.dumps({"model": "qwen", "prompt": [3] * 20, "max_tokens": 1000, "temperature": 0,
                       "stream": True, "ignore_eos": True})
    # The engine steps on without waiting for its consumers, so a 1000-token stream may end within a
    # second of its start whether or not anyone reads it: a disconnect that arrives after its last
    # token aborts nothing. Up to three tries; an abort that never works fails every one.
    for _attempt in range(3):
        aborted = num_aborted()
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        conn.request("POST", url.path + "/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        response.readline()  # the first event: the request holds KV pages now
        conn.close()  # gone at once
        wait_until(lambda: qwen_kv_pages() == 0, timeout_s=30, what="pages freed after the disconnect")
        time.sleep(2 * config.replicas.report_period_s)  # the report that saw the pages go also counts aborts
        if num_aborted() == aborted + 1:  # freed by the abort, not by finishing its 1000 tokens
            return
    pytest.fail("three disconnected streams ran to their end: the disconnect never aborted the request")


def test_an_ingress_killed_comes_back_on_the_same_port(cluster):
    """The ingress serves HTTP on the API port itself (http.ingress: direct): a replacement replica
    that Serve starts after a crash binds the same port, and requests succeed again."""
    from ray.util.state import list_actors

    config, base = cluster
    assert config.http.ingress == "direct"
    (ingress,) = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name.endswith(":OpenAIIngress")]
    ray.kill(ray.get_actor(ingress.name, namespace="serve"), no_restart=True)
    c = client(base)
    wait_until(lambda: c.completions.create(model="llama", prompt=[1, 2], max_tokens=3, temperature=0)
               .usage.completion_tokens == 3, what="the API back on its port")
    (again,) = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name.endswith(":OpenAIIngress")]
    assert again.name != ingress.name
