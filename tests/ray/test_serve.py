"""The cluster on real local Ray: the official openai client, exact greedy output through HTTP,
memory-aware routing to the replica that hosts the model, and OpenAI-style errors."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
import ray

from cluster.actor import find_controller
from remap import DeviceMemory
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.sampling import SamplingParams
from replicas.service.server import load_model

openai = pytest.importorskip("openai")


def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)


def direct_text(config, model: str, prompt: list[int], max_tokens: int) -> str:
    """What the engine alone generates for this model (greedy), decoded."""
    model_config, state, tokenizer = load_model(config.model(model))
    mem = config.memory
    engine = LLMEngine(DeviceMemory(mem.num_pages, mem.page_size_bytes), EngineConfig(link_bytes_per_s=1e10))
    engine.add_model(model, model_config, state, tokenizer=tokenizer)
    out = engine.generate(model, [prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True))[0]
    return tokenizer.decode(out)


def test_openai_client_gets_completions_and_chat_streaming_and_not(cluster):
    config, base = cluster
    c = client(base)
    whole = c.completions.create(model="llama", prompt="Hello", max_tokens=8, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="llama", prompt="Hello", max_tokens=8, temperature=0, stream=True))
    assert whole.choices[0].text == streamed and whole.usage.completion_tokens >= 1
    chat = c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                     temperature=0)
    chunks = list(c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, temperature=0, stream=True))
    assert chat.choices[0].message.content == "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert [m.id for m in c.models.list()] == [m.name for m in config.models]


@pytest.mark.parametrize("model", ["llama", "qwen", "opt"])
def test_greedy_output_through_http_equals_the_engine_alone(cluster, model):
    config, base = cluster
    prompt = [5, 17, 33, 9, 70, 11, 4]
    got = client(base).completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert got.choices[0].text == direct_text(config, model, prompt, 16)


def test_requests_land_on_the_replica_that_hosts_their_model(cluster):
    config, base = cluster
    controller = find_controller(config.app_name)
    view = ray.get(controller.routing_view.remote(), timeout=10)
    c = client(base)
    for model in ("llama", "qwen", "opt"):
        hosts = {f"oneiros-{e.replica_id}" for e in view.hosts(model)}
        served = {c.completions.create(model=model, prompt=[1, 2, 3], max_tokens=2, temperature=0)
                  .system_fingerprint for _ in range(4)}
        assert served <= hosts, (model, view.hosts(model))  # never a replica that would have to load it


def test_the_ingress_and_engine_replicas_run_at_normal_priority(cluster):
    """Ray starts workers at nice 15; the serving processes ask for 0 (replicas/service/deployments.py).
    The cluster controller, a Ray worker with no request on its path, keeps Ray's default."""
    from ray.util.state import list_actors

    config, _ = cluster
    alive = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    nice = {a.class_name: os.getpriority(os.PRIO_PROCESS, a.pid) for a in alive
            if a.class_name.startswith(f"ServeReplica:{config.app_name}:") or a.class_name == "ClusterController"}
    assert {c.split(":")[-1] for c, n in nice.items() if n == 0} == {"OpenAIIngress", "EngineReplica"}, nice
    assert nice["ClusterController"] > 0, nice


def post(base, path, body: bytes):
    req = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_input_gets_openai_errors_through_serve(cluster):
    _, base = cluster
    status, body = post(base, "/completions", b"{nope")
    assert status == 400 and "could not parse JSON" in body["error"]["message"]
    status, body = post(base, "/completions", json.dumps({"model": "gpt-9", "prompt": "x"}).encode())
    assert status == 404 and body["error"]["param"] == "model"
    status, body = post(base, "/completions", json.dumps({"model": "llama", "prompt": "x", "top_p": 2}).encode())
    assert status == 400 and body["error"]["param"] == "top_p"
