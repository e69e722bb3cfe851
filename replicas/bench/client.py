"""The OpenAI-API load driver: streams completions and times every token-carrying piece.

Owns what one streamed request looks like on the client side (`RequestResult`, timed by `StreamTimer`),
the body every benchmark sends (`completion_body`), and the open-loop replay of a `Workload`:
request i is sent at `arrival_s` after the run starts whatever the server's state (the load does not
slow down when the server does), with at most `concurrency` streams open at once; a request that waits
for a free slot records the wait as `queue_s` and its latencies count from the moment it is sent.

What is measured, per request (time.perf_counter):
  TTFT  sent -> first streamed piece that carries >= 1 token.
  TBT   gaps between successive token-carrying pieces (a piece with k tokens is one gap, as vLLM counts).
  TPOT  (E2E - TTFT) / (tokens - 1), vLLM's time per output token; None with fewer than 2 tokens.
  E2E   sent -> stream ended.
Bodies ask for `logprobs=0` so that every engine step's token is its own SSE chunk (tokens that decode to
"" would otherwise be merged) and are counted from the chunks' logprobs; `ignore_eos` makes every request
produce exactly its `output_len` tokens, and anything else counts as a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from replicas.bench.workload import Request

TOKEN_ID_RANGE = (3, 250)  # prompt token ids, both ends included (0-2 are the byte tokenizer's specials)
REQUEST_TIMEOUT_S = 300.0  # one streamed request, end to end
PROGRESS_PERIOD_S = 1.0  # at most one progress line per period


# ---- one streamed request ----------------------------------------------------------------------

@dataclass
class RequestResult:
    index: int  # position in the workload
    model: str  # model name sent
    replica: str | None = None  # replica that served it (Oneiros's system_fingerprint), if known
    ttft_s: float | None = None  # sent -> first token-carrying piece
    tbt_s: list[float] = field(default_factory=list)  # gaps between token-carrying pieces
    num_tokens: int = 0  # tokens counted from the stream
    usage_tokens: int | None = None  # completion_tokens of the usage chunk, if one came
    finish_reason: str | None = None
    error: str | None = None  # exception or protocol problem; None if the stream ended normally
    start_s: float = 0.0  # perf_counter when sent
    end_s: float = 0.0  # perf_counter when the stream ended
    trace: dict[str, float] | None = None  # traced requests: wall-clock time of each stage (TRACE_STAGES)
    moved: bool = False  # its chunks came from more than one replica (it moved off a dead one)


def check_result(result: RequestResult, max_tokens: int, need_usage: bool) -> str | None:
    """Why `result` counts as failed (lost or wrong), or None if it is complete."""
    if result.error is not None:
        return result.error
    if result.finish_reason != "length":
        return f"finish_reason {result.finish_reason!r}, expected 'length'"
    if result.num_tokens != max_tokens:
        return f"{result.num_tokens} tokens streamed, expected {max_tokens}"
    if need_usage and result.usage_tokens != max_tokens:
        return f"usage says {result.usage_tokens} completion tokens, expected {max_tokens}"
    return None


class StreamTimer:
    """Timestamps of one request's stream: TTFT on the first token-carrying piece, TBT after."""

    def __init__(self, index: int, model: str) -> None:
        self.result = RequestResult(index, model, start_s=time.perf_counter())
        self._last_s: float | None = None

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self._last_s is None:
            self.result.ttft_s = now - self.result.start_s
        else:
            self.result.tbt_s.append(now - self._last_s)
        self._last_s = now
        self.result.num_tokens += n

    def end(self) -> RequestResult:
        self.result.end_s = time.perf_counter()
        return self.result


def completion_body(model: str, prompt_ids: Sequence[int], max_tokens: int) -> dict[str, Any]:
    """The streamed, greedy, exactly-`max_tokens` /v1/completions body every benchmark sends."""
    return {"model": model, "prompt": list(prompt_ids), "max_tokens": max_tokens, "temperature": 0,
            "logprobs": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


# The stages of a traced request's first token, in order, as Oneiros stamps them (wall clock); the
# client adds the first and the last. Each stage's time is its stamp minus the previous one's.
TRACE_STAGES = (
    ("client_sent", ""),
    ("ingress_received", "client -> ingress (HTTP; via Serve's proxy if ingress: proxy)"),
    ("ingress_dispatched", "ingress: body read, parse, tokenize"),
    ("replica_received", "ingress -> router -> engine replica (gRPC)"),
    ("engine_added", "replica: to the engine thread, request added"),
    ("replica_first_token", "engine: prefill step, handoff to the replica's loop"),
    ("ingress_first_item", "engine replica -> ingress (gRPC)"),
    ("ingress_first_chunk", "ingress: detokenize, SSE chunk"),
    ("client_first_token", "ingress -> client (HTTP)"),
)
TRACE_HEADER = "X-Oneiros-Trace"  # replicas/service/ingress.py


class ApiError(Exception):
    """The server answered with an error: an HTTP status other than 200, or an error event mid-stream."""


class Unreachable(ApiError):
    """Nothing answered at the base URL (refused, reset, timed out)."""


def http_pool(timeout_s: float = REQUEST_TIMEOUT_S, **kwargs):
    """SseClient's default httpx2 pool; kwargs (event_hooks, ...) go to httpx2.AsyncClient. As many
    connections as streams: every concurrent request holds one for its whole stream."""
    import httpx2

    return httpx2.AsyncClient(timeout=timeout_s, limits=httpx2.Limits(max_connections=1000,
                                                                      max_keepalive_connections=100), **kwargs)


class SseClient:
    """The OpenAI API's streamed completions and model list over httpx2 (the transport of the `openai`
    SDK), each server-sent event parsed by one `json.loads`, as vLLM's benchmark client does. The SDK
    builds pydantic objects for every chunk: 0.24-0.29 ms of CPU per streamed token against 0.06 here
    (32 streams of 32 tokens from a local server, docs/latency.md), CPU that a benchmark on a 2-core
    box takes from the server it measures. `http_client` (an httpx2.AsyncClient, e.g. over an ASGI
    app in tests) replaces the default pool."""

    def __init__(self, base_url: str, api_key: str = "unused", http_client=None,
                 timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._http = http_client or http_pool(timeout_s)

    async def models(self) -> list[str]:
        """The server's model ids (GET /models)."""
        async with self._request("GET", "/models") as response:
            await _raise_for_status(response)
            return [m["id"] for m in json.loads(await response.aread())["data"]]

    async def completions(self, body: dict[str, Any], headers: Mapping[str, str] | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        """The events of a streamed POST /completions, until [DONE]."""
        async with self._request("POST", "/completions", body, headers) as response:
            await _raise_for_status(response)
            async for line in sse_lines(response.aiter_bytes()):
                if not line.startswith("data:"):
                    continue  # blank separators, comments
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ApiError(f"error event: {event['error'].get('message', event['error'])}")
                yield event

    @contextlib.asynccontextmanager
    async def _request(self, method: str, path: str, body: dict | None = None,
                       headers: Mapping[str, str] | None = None):
        import httpx2

        try:
            async with self._http.stream(method, self.base_url + path, json=body,
                                         headers=self._headers | dict(headers or {})) as response:
                yield response
        except httpx2.TransportError as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self._http.aclose()


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The lines of a server-sent event stream, broken where SSE breaks them: at CR, LF or CRLF only.
    httpx's aiter_lines also breaks at U+0085, U+2028 and U+2029 (str.splitlines), which a JSON
    string may hold raw (vLLM sends them so): it cut an event in two."""
    pending = b""
    async for chunk in chunks:
        lines = (pending + chunk).splitlines(keepends=True)  # bytes.splitlines: CR, LF and CRLF only
        pending = lines.pop() if lines and not lines[-1].endswith((b"\n", b"\r")) else b""
        for line in lines:
            yield line.rstrip(b"\r\n").decode()
    if pending:
        yield pending.decode()


async def _raise_for_status(response) -> None:
    if response.status_code != 200:
        text = (await response.aread()).decode(errors="replace")
        raise ApiError(f"HTTP {response.status_code}: {text[:300]}")


async def stream_completion(client: SseClient, index: int, body: dict[str, Any], trace: bool = False) -> RequestResult:
    """One streamed completion of `body`; errors are recorded. With `trace`, asks Oneiros for its stage
    stamps and keeps them in `result.trace`."""
    stream = StreamTimer(index, body["model"])
    sent = time.time()
    try:
        async for chunk in client.completions(body, {TRACE_HEADER: "1"} if trace else None):
            if trace and stream.result.trace is None and (stamps := chunk.get("oneiros_trace")):
                stream.result.trace = {"client_sent": sent, **stamps, "client_first_token": time.time()}
            if fingerprint := chunk.get("system_fingerprint"):
                replica = fingerprint.removeprefix("oneiros-")
                stream.result.moved |= stream.result.replica not in (None, replica)
                stream.result.replica = replica
            if usage := chunk.get("usage"):
                stream.result.usage_tokens = usage.get("completion_tokens")
            for choice in chunk.get("choices") or ():
                logprobs = choice.get("logprobs")
                stream.tokens(len(logprobs.get("tokens") or ()) if logprobs else 0)
                if choice.get("finish_reason") is not None:
                    stream.result.finish_reason = choice["finish_reason"]
    except Exception as exc:  # noqa: BLE001 - recorded, counted and printed as a failure
        stream.result.error = f"{type(exc).__name__}: {exc}"[:500]
    return stream.end()


# ---- the per-request record of a replay --------------------------------------------------------

@dataclass(frozen=True)
class RequestRecord:
    index: int  # position in the workload
    tenant: str  # Request.tenant
    model: str  # model name it was sent to
    ok: bool  # ended with finish_reason "length" and exactly output_len tokens
    error: str | None  # why not ok; None when ok
    arrival_s: float  # scheduled send time, seconds after the run started
    queue_s: float  # waited for a free concurrency slot after arrival_s
    start_s: float  # perf_counter when sent
    end_s: float  # perf_counter when the stream ended
    ttft_s: float | None  # sent -> first token
    tbt_s: tuple[float, ...]  # gaps between token-carrying pieces, seconds
    tpot_s: float | None  # (e2e - ttft) / (tokens - 1); None with < 2 tokens
    e2e_s: float  # sent -> stream ended
    prompt_tokens: int  # prompt length sent
    output_tokens: int  # tokens streamed back
    expected_tokens: int  # Request.output_len

    @property
    def mean_tbt_s(self) -> float | None:
        return sum(self.tbt_s) / len(self.tbt_s) if self.tbt_s else None


def to_record(req: Request, result: RequestResult, arrival_s: float, queue_s: float) -> RequestRecord:
    why = check_result(result, req.output_len, need_usage=result.usage_tokens is not None)
    e2e = result.end_s - result.start_s
    tpot = ((e2e - result.ttft_s) / (result.num_tokens - 1)
            if result.ttft_s is not None and result.num_tokens > 1 else None)
    return RequestRecord(result.index, req.tenant, result.model, why is None, why, arrival_s, queue_s,
                         result.start_s, result.end_s, result.ttft_s, tuple(result.tbt_s), tpot, e2e,
                         req.prompt_len, result.num_tokens, req.output_len)


def prompt_ids(seed: int, index: int, length: int) -> list[int]:
    """The prompt of request `index`: random ids (no shared prefixes to cache), a function of (seed, index)."""
    rng = random.Random(seed * 1_000_003 + index)
    return [rng.randint(*TOKEN_ID_RANGE) for _ in range(length)]


# ---- open-loop replay --------------------------------------------------------------------------

class Progress:
    """One plain-text line per PROGRESS_PERIOD_S: sent, done, failed, elapsed (carriage return on a tty)."""

    def __init__(self, total: int, out: TextIO | None) -> None:
        self.total, self.out = total, out
        self.sent = self.done = self.failed = 0
        self._t0 = self._last = time.perf_counter()

    def update(self, final: bool = False) -> None:
        now = time.perf_counter()
        if self.out is None or (not final and now - self._last < PROGRESS_PERIOD_S):
            return
        self._last = now
        tty = self.out.isatty()
        line = (f"bench: {self.done}/{self.total} done, {self.sent - self.done} in flight, {self.failed} failed, "
                f"{now - self._t0:.1f} s")
        self.out.write(("\r" + line + ("\n" if final else "")) if tty else line + "\n")
        self.out.flush()


async def replay(requests: Sequence[Request], send: Callable[[int, Request], Awaitable[RequestResult]],
                 concurrency: int, progress: TextIO | None = None) -> list[RequestRecord]:
    """Send each request at its arrival time (open loop), at most `concurrency` in flight; records by index."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    slots = asyncio.Semaphore(concurrency)
    shown = Progress(len(requests), progress)
    t0 = time.perf_counter()

    async def one(i: int, req: Request) -> RequestRecord:
        async with slots:
            queue_s = max(0.0, time.perf_counter() - t0 - req.arrival_s)
            shown.sent += 1
            try:
                result = await asyncio.wait_for(send(i, req), REQUEST_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a failed request is a record, never a crash
                now = time.perf_counter()
                result = RequestResult(i, req.tenant, error=f"{type(exc).__name__}: {exc}"[:500], start_s=now,
                                       end_s=now)
        record = to_record(req, result, req.arrival_s, queue_s)
        shown.done += 1
        shown.failed += not record.ok
        shown.update()
        return record

    tasks = []
    for i, req in enumerate(requests):
        delay = t0 + req.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, req)))
    records = await asyncio.gather(*tasks)
    shown.update(final=True)
    return list(records)


async def run_workload(client, requests: Sequence[Request], models: Mapping[str, str], concurrency: int,
                       seed: int = 0, progress: TextIO | None = sys.stderr) -> list[RequestRecord]:
    """Replay `requests` through `client`, tenant t sent as model `models[t]` (t itself when unmapped).
    `client` is one client, or a mapping model -> client (one endpoint per model)."""

    def send(i: int, req: Request) -> Awaitable[RequestResult]:
        model = models.get(req.tenant, req.tenant)
        body = completion_body(model, prompt_ids(seed, i, req.prompt_len), req.output_len)
        return stream_completion(client[model] if isinstance(client, Mapping) else client, i, body)

    return await replay(requests, send, concurrency, progress)
