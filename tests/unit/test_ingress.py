"""The OpenAI HTTP API without Ray: the official client against the FastAPI app over ASGI, with a
real EngineServer behind it; greedy output equals the engine's own, errors are OpenAI-shaped 4xx."""

from __future__ import annotations

import asyncio
import json

import pytest

from replicas.config import default_config
from replicas.engine.sampling import SamplingParams
from replicas.service.ingress import OpenAIFrontend, make_app
from replicas.service.server import EngineServer

openai = pytest.importorskip("openai")
httpx2 = pytest.importorskip("httpx2")

KEY = "sk-test-key-1"


@pytest.fixture(scope="module")
def stack():
    config = default_config(api_keys=[{"key": KEY}, {"key": "sk-only-qwen", "models": ["qwen"]}])
    server = EngineServer(config, replica_id="r0")
    app = make_app(OpenAIFrontend(config, server.generate))
    yield server, app
    server.close()


def run(coro):
    return asyncio.run(coro)


def client(app, key=KEY):
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key=key, http_client=http, max_retries=0)


async def raw(app, method, path, body=None, key=KEY):
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as http:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return await http.request(method, path, content=body, headers=headers)


def test_completion_through_http_equals_the_engine_token_for_token(stack):
    server, app = stack
    prompt = [10, 20, 30, 40]

    async def main():
        c = client(app)
        whole = await c.completions.create(model="llama", prompt=prompt, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
        pieces = [ch.choices[0].text async for ch in await c.completions.create(
            model="llama", prompt=prompt, max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True})]
        return whole, pieces

    whole, pieces = run(main())
    direct = server.call(server.engine.generate, "llama", [prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    text = server.tokenizers["llama"].decode(direct)
    assert whole.choices[0].text == text == "".join(pieces)
    assert whole.usage.prompt_tokens == 4 and whole.usage.completion_tokens == 12
    assert whole.choices[0].finish_reason == "length" and whole.system_fingerprint == "oneiros-r0"


def test_chat_streaming_and_not_agree_and_report_usage(stack):
    _, app = stack
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]

    async def main():
        c = client(app)
        whole = await c.chat.completions.create(model="qwen", messages=messages, max_tokens=10, temperature=0)
        chunks = [ch async for ch in await c.chat.completions.create(
            model="qwen", messages=messages, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True})]
        return whole, chunks

    whole, chunks = run(main())
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert whole.choices[0].message.content == streamed and whole.choices[0].message.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("length", "stop")


def test_models_are_listed_per_key(stack):
    _, app = stack

    async def main():
        return ([m.id async for m in client(app).models.list()],
                [m.id async for m in client(app, "sk-only-qwen").models.list()])

    everything, only = run(main())
    assert everything == ["llama", "qwen", "opt"] and only == ["qwen"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", json.dumps({"prompt": [1, 2]}).encode(), 400, "model"),
    ("/v1/completions", json.dumps({"model": "nope", "prompt": [1]}).encode(), 404, "model"),
    ("/v1/completions", json.dumps({"model": "llama", "prompt": [1] * 1020, "max_tokens": 10}).encode(), 400,
     "max_tokens"),
    ("/v1/completions", json.dumps({"model": "llama", "prompt": [1], "temperature": -1}).encode(), 400,
     "temperature"),
    ("/v1/completions", json.dumps({"model": "llama", "prompt": [999]}).encode(), 400, None),
    ("/v1/chat/completions", json.dumps({"model": "llama", "messages": "hi"}).encode(), 400, "messages"),
])
def test_bad_requests_get_openai_error_bodies(stack, path, body, status, param):
    _, app = stack
    response = run(raw(app, "POST", path, body))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


def test_wrong_or_missing_key_is_401_and_a_key_sees_only_its_models(stack):
    _, app = stack
    body = json.dumps({"model": "llama", "prompt": [1, 2], "max_tokens": 2}).encode()
    assert run(raw(app, "POST", "/v1/completions", body, key="sk-wrong-key")).status_code == 401
    assert run(raw(app, "POST", "/v1/completions", body, key=None)).status_code == 401
    assert run(raw(app, "POST", "/v1/completions", body, key="sk-only-qwen")).status_code == 404
    assert run(raw(app, "GET", "/health", key=None)).status_code == 200


def test_over_capacity_is_429_with_retry_after():
    config = default_config(replicas={"num_replicas": 1, "max_pending_requests": 1})
    server = EngineServer(config, replica_id="small", models=["llama"])
    app = make_app(OpenAIFrontend(config, server.generate))

    async def main():
        hog = server.generate("llama", [5, 6], SamplingParams(max_tokens=200, ignore_eos=True))
        await hog.__anext__()  # one unfinished request: the replica is full
        response = await raw(app, "POST", "/v1/completions", json.dumps({"model": "llama", "prompt": [1]}).encode())
        await hog.aclose()
        return response

    response = run(main())
    server.close()
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_n_choices_are_independent_samples_streamed_and_not(stack):
    """n=3 seeded: choice i is what the engine draws with seed + i; streamed chunks of every choice
    reassemble to the same texts; usage counts the prompt once and every choice's tokens; chat's
    first chunk of each choice carries the role."""
    server, app = stack
    prompt = [10, 20, 30, 40]

    async def main():
        c = client(app)
        kw = dict(model="llama", prompt=prompt, max_tokens=10, temperature=1.0, seed=7, n=3,
                  extra_body={"ignore_eos": True})
        whole = await c.completions.create(**kw)
        chunks = [ch async for ch in await c.completions.create(stream=True, **kw)]
        chat = [ch async for ch in await c.chat.completions.create(
            model="qwen", messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=2, stream=True)]
        return whole, chunks, chat

    whole, chunks, chat = run(main())
    tok = server.tokenizers["llama"]
    want = [tok.decode(server.call(server.engine.generate, "llama", [prompt], SamplingParams(
        max_tokens=10, temperature=1.0, seed=7 + i, ignore_eos=True))[0]) for i in range(3)]
    assert [ch.text for ch in sorted(whole.choices, key=lambda ch: ch.index)] == want
    assert len(set(want)) > 1  # they are different samples
    streamed = ["".join(ch.choices[0].text for ch in chunks if ch.choices[0].index == i) for i in range(3)]
    assert streamed == want
    assert whole.usage.prompt_tokens == 4 and whole.usage.completion_tokens == 30
    roles = [ch.choices[0].index for ch in chat if ch.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    assert not server.call(server.engine.has_unfinished)


def test_a_traced_stream_says_when_its_first_token_reached_each_stage(stack):
    """docs/latency.md's breakdown: the first chunk of a traced stream carries the stamps in path order;
    untraced streams carry none."""
    from replicas.bench.client import TRACE_STAGES, SseClient, completion_body, stream_completion

    _server, app = stack

    async def main():
        c = SseClient("http://test/v1", KEY, httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app)))
        return (await stream_completion(c, 0, completion_body("llama", [5, 6, 7], 6), trace=True),
                await stream_completion(c, 1, completion_body("llama", [5, 6, 7], 6)))

    traced, plain = run(main())
    assert traced.error is None and traced.num_tokens == 6 and plain.trace is None
    stamps = [traced.trace[stage] for stage, _ in TRACE_STAGES]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] < 60, traced.trace


def test_the_ingress_serves_http_on_its_port_shares_it_and_reports_a_stopped_server(stack):
    """DirectHttp (http.ingress: direct) over a real socket: a stream through it equals one through
    the ASGI app in-process; a second server binds the same port (a replacement replica); a stopped
    server fails the health check."""
    from replicas.cli import free_port
    from replicas.service.ingress import DirectHttp

    _, app = stack
    port = free_port()
    body = dict(model="llama", prompt=[5, 6, 7], max_tokens=8, temperature=0, extra_body={"ignore_eos": True})

    async def scenario():
        first, second = DirectHttp(app, "127.0.0.1", port), DirectHttp(app, "127.0.0.1", port)
        while not (first.server.started and second.server.started):
            await asyncio.sleep(0.01)
        over_socket = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        texts = []
        for c in (over_socket, client(app)):
            texts.append("".join([ch.choices[0].text async for ch in await c.completions.create(stream=True, **body)]))
        await over_socket.close()
        first.check()
        await first.stop(timeout_s=2)
        with pytest.raises(RuntimeError, match="is down"):
            first.check()
        second.check()  # still serving the port
        await second.stop(timeout_s=2)
        return texts

    over_socket, in_process = run(scenario())
    assert over_socket == in_process and over_socket
