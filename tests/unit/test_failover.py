"""A replica dies, the stream goes on (issue 19), without Ray: two real EngineServers behind the real
OpenAI frontend, and a seam in `generate` that makes the first replica's stream die after k tokens
the way a killed actor's does (an exception from the stream). Each continued stream is compared with
the same request run where nothing failed."""

from __future__ import annotations

import asyncio
import json

import httpx2
import openai
import pytest

from replicas.config import default_config
from replicas.engine.sampling import SamplingParams
from replicas.service.ingress import MAX_MOVES, OpenAIFrontend, make_app
from replicas.service.server import EngineServer


class ReplicaDied(RuntimeError):
    """What the ingress sees when a replica's process is gone (Ray raises ActorDiedError)."""


class Replicas:
    """Two engine replicas; `die_after[rid] = k` kills rid's next stream after k tokens (once per entry)."""

    def __init__(self) -> None:
        config = default_config()
        self.servers = {rid: EngineServer(config, replica_id=rid, models=["llama", "qwen"]) for rid in ("r0", "r1")}
        self.die_after: dict[str, list[int]] = {}
        self.frontend = OpenAIFrontend(config, self.generate)

    async def generate(self, model, prompt, params, avoid=()):
        rid = next(r for r in self.servers if r not in avoid)
        deaths = self.die_after.get(rid)
        limit = deaths.pop(0) if deaths else None
        sent, stream = 0, self.servers[rid].generate(model, prompt, params)
        async for item in stream:
            if limit is not None and sent + len(item.token_ids) > limit:
                await stream.aclose()  # its requests go with the replica
                raise ReplicaDied(f"replica {rid} died")
            sent += len(item.token_ids)
            yield item

    def alone(self, model, prompt, params) -> list[int]:
        server = self.servers["r1"]
        return server.call(server.engine.generate, model, [prompt], params)[0]

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


@pytest.fixture(scope="module")
def replicas():
    r = Replicas()
    yield r
    r.close()


def client(app):
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0)


async def stream_text(app, **kw) -> tuple[list[str], object, str | None]:
    """(text pieces, usage, finish reason) of one streamed completion."""
    pieces, usage, reason = [], None, None
    async for chunk in await client(app).completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            reason = choice.finish_reason or reason
    return pieces, usage, reason


@pytest.mark.parametrize("die_after", [0, 1, 7, 23])
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_a_stream_whose_replica_dies_goes_on_with_the_same_tokens(replicas, die_after, sampling):
    prompt = [5, 9, 13, 17]
    knobs = {"temperature": 0} if sampling == "greedy" else {"temperature": 1.0, "top_p": 0.9, "seed": 11}
    params = SamplingParams(max_tokens=24, ignore_eos=True, presence_penalty=0.5, **knobs)
    want = replicas.alone("llama", prompt, params)
    replicas.die_after = {"r0": [die_after]}
    moves = replicas.frontend.num_moves
    app = make_app(replicas.frontend)
    pieces, usage, reason = asyncio.run(stream_text(
        app, model="llama", prompt=prompt, max_tokens=24, extra_body={"ignore_eos": True}, presence_penalty=0.5,
        **knobs))
    text = replicas.servers["r1"].tokenizers["llama"].decode(want)
    assert "".join(pieces) == text and reason == "length"
    assert usage.prompt_tokens == len(prompt) and usage.completion_tokens == 24  # counted once
    assert replicas.frontend.num_moves == moves + 1


def test_a_stop_string_split_across_the_failure_is_still_found(replicas):
    prompt = [40, 41, 42]
    tok = replicas.servers["r1"].tokenizers["llama"]
    # only "abcdef" may come out (random weights otherwise emit bytes that are rarely valid UTF-8)
    letters = {t: 100.0 for t in tok.encode("abcdef")}
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logit_bias=tuple(letters.items()))
    want = replicas.alone("llama", prompt, greedy)
    full = tok.decode(want)

    def straddling(k: int) -> str | None:
        """Two characters each side of the text of the first k tokens, if that is a clean cut."""
        cut = len(tok.decode(want[:k]))
        stop = full[cut - 2:cut + 2]
        clean = full.startswith(tok.decode(want[:k])) and len(stop) == 4 and "\ufffd" not in stop
        return stop if clean and full.index(stop) == cut - 2 else None

    k = next(k for k in range(6, 25) if straddling(k))  # the replica dies after k tokens, mid stop string
    stop = straddling(k)
    replicas.die_after = {"r0": [k]}
    app = make_app(replicas.frontend)
    pieces, _usage, reason = asyncio.run(stream_text(
        app, model="llama", prompt=prompt, max_tokens=30, temperature=0, stop=[stop],
        logit_bias={str(t): b for t, b in letters.items()}, extra_body={"ignore_eos": True}))
    assert reason == "stop" and "".join(pieces) == full[:full.index(stop)]


def test_a_chat_and_n_choices_survive_the_move(replicas):
    app = make_app(replicas.frontend)
    messages = [{"role": "user", "content": "hello there"}]

    async def chat():
        text, reason = [], None
        async for chunk in await client(app).chat.completions.create(
                model="qwen", messages=messages, max_tokens=12, temperature=0, stream=True,
                extra_body={"ignore_eos": True}):
            for c in chunk.choices:
                text.append(c.delta.content or "")
                reason = c.finish_reason or reason
        return "".join(text), reason

    replicas.die_after = {}
    calm = asyncio.run(chat())
    replicas.die_after = {"r0": [4]}
    assert asyncio.run(chat()) == calm and calm[1] == "length"

    async def n_choices():
        return await client(app).completions.create(model="llama", prompt=[7, 8, 9], max_tokens=10, n=2,
                                                    temperature=1.0, seed=3, extra_body={"ignore_eos": True})

    replicas.die_after = {}
    calm_n = asyncio.run(n_choices())
    replicas.die_after = {"r0": [2, 5]}  # both choices start on r0 and lose it at different points
    moved_n = asyncio.run(n_choices())
    assert [c.text for c in moved_n.choices] == [c.text for c in calm_n.choices]
    assert moved_n.usage.completion_tokens == 20


def test_a_request_moves_at_most_max_moves_times_then_ends_with_a_clear_error(replicas):
    replicas.die_after = {"r0": [3] * MAX_MOVES, "r1": [3] * MAX_MOVES}  # every host dies under it

    async def main():
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=make_app(replicas.frontend)),
                                      base_url="http://test") as http:
            body = {"model": "llama", "prompt": [1, 2, 3], "max_tokens": 40, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            r = await http.post("/v1/completions", json=body)
            return r.status_code, [line for line in r.text.splitlines() if line.startswith("data: ")]

    status, events = asyncio.run(main())
    replicas.die_after = {}
    assert status == 200 and events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))
    assert "mid-stream" in error["error"]["message"]
    for server in replicas.servers.values():  # nothing left behind on either replica
        assert not server.call(server.engine.has_unfinished)


@pytest.mark.parametrize("seed", [None, 5])
def test_a_grpc_stream_moves_the_same_way(replicas, seed):
    from replicas.service.grpc import oneiros_pb2 as pb
    from replicas.service.grpc.service import GrpcService

    knobs = {"temperature": 0.0} if seed is None else {"temperature": 1.0, "seed": seed}
    want = replicas.alone("qwen", [4, 8, 15], SamplingParams(max_tokens=20, ignore_eos=True, **knobs))
    request = pb.CompletionRequest(model="qwen", prompt_token_ids=[4, 8, 15],
                                   sampling=pb.Sampling(max_tokens=20, ignore_eos=True, **knobs))
    replicas.die_after = {"r0": [6]}
    moves = replicas.frontend.num_moves

    async def main():
        return [chunk async for chunk in GrpcService(replicas.frontend).stream("completion", request, None)]

    chunks = asyncio.run(main())
    assert [t for c in chunks for t in c.token_ids] == want and chunks[-1].finish_reason == "length"
    assert replicas.frontend.num_moves == moves + 1
