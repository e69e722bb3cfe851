"""The OpenAI HTTP API: `make_app(api)` builds the FastAPI app; `OpenAIFrontend` does the work.

The frontend knows the model catalog (names, context lengths, tokenizers) but runs no model: it
turns a request into prompt ids and SamplingParams, calls `generate(model, prompt_ids, params)`
(an EngineServer directly in tests, a Ray Serve handle to the engine replicas in the cluster) and
shapes the token stream into OpenAI responses. Errors before the first token are HTTP 4xx/5xx with
an OpenAI error body; errors after it end the event stream with an error event and [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import pathlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from replicas.config import OneirosConfig, TINY_MODELS
from replicas.engine.models import ModelConfig
from replicas.engine.sampling import SamplingParams
from replicas.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from replicas.service import openai_api as api
from replicas.service.openapi import install as install_openapi
from replicas.service.stream import StreamItem

PLACEMENT_RETRY_S = 0.5  # a request whose replica could not load its model asks again this often
MAX_MOVES = 2  # a request whose replica dies moves to another host at most this often...
MOVE_DEADLINE_S = 60.0  # ...and only this long after its first move (then the stream ends with an error)
# A streamed request sent with this header set to 1 gets, in its first chunk, `oneiros_trace`: the
# wall-clock time (time.time(), seconds) it reached each stage of the path (docs/latency.md)
TRACE_HEADER = "x-oneiros-trace"

logger = logging.getLogger(__name__)

# (model, prompt ids, params, replicas to avoid) -> the engine's stream of items
Generate = Callable[[str, list[int], SamplingParams, tuple[str, ...]], AsyncIterator[StreamItem]]


class _Catalog:
    """What the frontend knows of each model: context length and tokenizer (no weights)."""

    def __init__(self, config: OneirosConfig) -> None:
        self.context_len: dict[str, int] = {}
        self.tokenizers: dict[str, Tokenizer] = {}
        self.sampling_defaults: dict[str, dict[str, float]] = {}  # from each folder's generation_config.json
        for spec in config.models:
            if spec.path is not None:
                hf = json.loads((pathlib.Path(spec.path) / "config.json").read_text())
            else:
                hf = spec.hf_config if spec.hf_config is not None else TINY_MODELS[spec.architecture]
            self.tokenizers[spec.name] = spec.tokenizer()
            self.context_len[spec.name] = spec.context_len(ModelConfig.from_hf(hf))
            self.sampling_defaults[spec.name] = spec.sampling_defaults()


class OpenAIFrontend:
    def __init__(self, config: OneirosConfig, generate: Generate,
                 on_move: Callable[[str], None] | None = None) -> None:
        """`on_move(model)`: called each time a request moves off a dead replica (a metric)."""
        self.config, self._generate, self._on_move = config, generate, on_move
        self.num_moves = 0  # requests' moves off dead replicas since start
        self.catalog = _Catalog(config)
        self._keys = {k.key: (None if k.models is None else set(k.models)) for k in config.api_keys}
        self.created = int(time.time())

    def _moved(self, model: str) -> None:
        self.num_moves += 1
        if self._on_move is not None:
            self._on_move(model)

    # ---- checks --------------------------------------------------------------------------
    def authorize(self, authorization: str) -> set[str] | None:
        """Models the caller of this Authorization header may use (None = all); ApiError 401 for a
        missing or wrong key."""
        if not self._keys:
            return None
        header = authorization or ""
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if key not in self._keys:
            raise api.unauthorized()
        return self._keys[key]

    def check_model(self, model: str, allowed: set[str] | None) -> None:
        visible = self.visible_models(allowed)
        if model not in visible:
            raise api.not_found_model(model, visible)

    def visible_models(self, allowed: set[str] | None) -> list[str]:
        return [m.name for m in self.config.models if allowed is None or m.name in allowed]

    # ---- endpoints -----------------------------------------------------------------------
    def list_models(self, allowed: set[str] | None) -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "oneiros"}
            for name in self.visible_models(allowed)
        ]}

    async def completions(self, body: bytes | dict, allowed: set[str] | None, trace: dict | None = None) -> Response:
        return await self._respond(api.COMPLETION, *(await self.start(api.COMPLETION, body, allowed, trace)),
                                   trace=trace)

    async def chat(self, body: bytes | dict, allowed: set[str] | None, trace: dict | None = None) -> Response:
        return await self._respond(api.CHAT, *(await self.start(api.CHAT, body, allowed, trace)), trace=trace)

    async def start(self, ep: api.Endpoint, body: bytes | dict, allowed: set[str] | None, trace: dict | None = None):
        """Validate a request and start it: (request, prompt ids, params, tokenizer, first item, stream).
        Every refusal before the first token is an ApiError (HTTP and gRPC map it to their codes).
        With n > 1 (HTTP only) the first item and stream are lists, one per choice. `trace` (a
        traced request's wall-clock stamps, see `TRACE_HEADER`) gets the stages up to the first item."""
        req = ep.parse(body)
        self.check_model(req.model, allowed)
        tokenizer = self.catalog.tokenizers[req.model]
        prompt = ep.prompt_ids(req, tokenizer)
        params = api.to_sampling_params(req, self.catalog.context_len[req.model], len(prompt),
                                        self.catalog.sampling_defaults[req.model])
        if (req.n or 1) == 1:
            if trace is not None:
                trace["ingress_dispatched"] = time.time()
            stream, first = await self._place(req.model, prompt, params)
            if trace is not None:
                trace |= dict(first.stamps) | {"ingress_first_item": time.time()}
            return req, prompt, params, tokenizer, first, FailoverStream(self, req.model, prompt, params, stream, first)
        children = [params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                    for i in range(req.n)]  # independent samples; seeded ones reproducible per choice
        placed = await asyncio.gather(*(self._place(req.model, prompt, p) for p in children), return_exceptions=True)
        failed = [x for x in placed if isinstance(x, BaseException)]
        if failed:
            for x in placed:
                if not isinstance(x, BaseException):
                    await _close(x[0])
            raise failed[0]
        streams = [FailoverStream(self, req.model, prompt, p, stream, first)
                   for p, (stream, first) in zip(children, placed)]
        return req, prompt, params, tokenizer, [first for _, first in placed], streams

    async def _place(self, model: str, prompt: list[int], params: SamplingParams, avoid: set[str] | None = None):
        """(stream, first item) of the request on a replica. A replica that cannot load the model is
        answered by asking again until placement_timeout_s: the router then picks the model's host
        once the controller placed it, or another replica. Replicas that can never load it beside
        their tenants are avoided; when the router has none left but them (one refuses twice), and
        for a model larger than a whole pool, the 503 comes at once. A replica that dies before the
        first item is asked around the same way, MAX_MOVES times."""
        deadline = time.monotonic() + self.config.replicas.placement_timeout_s
        avoid = set(avoid or ())
        gone = 0
        while True:
            stream = self._generate(model, prompt, params, tuple(sorted(avoid)))
            try:
                return stream, await _first_item(stream)
            except ReplicaGone:
                gone += 1
                if gone > MAX_MOVES or time.monotonic() >= deadline:
                    raise
                logger.warning("a replica failed before the first token of a %s request; asking again", model)
                self._moved(model)
            except NotPlaced as exc:
                if exc.code == "model_not_here":
                    if exc.replica_id in avoid:
                        raise api.ApiError(503, "server_error", f"{exc.message}; no replica can load it beside the "
                                           "models it hosts", None, exc.code) from None
                    avoid.add(exc.replica_id)
                    continue
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(PLACEMENT_RETRY_S)

    # ---- the token stream ----------------------------------------------------------------
    async def _respond(self, ep: api.Endpoint, req, prompt: list[int], params: SamplingParams,
                       tokenizer: Tokenizer, first, stream, trace: dict | None = None) -> Response:
        firsts, streams = (first, stream) if isinstance(first, list) else ([first], [stream])
        if req.stream:
            return StreamingResponse(self._events(ep, req, prompt, params, tokenizer, firsts, streams, trace),
                                     media_type="text/event-stream")
        choices = await asyncio.gather(*(_drain(f, s) for f, s in zip(firsts, streams)), return_exceptions=True)
        failed = next((c for c in choices if isinstance(c, BaseException)), None)
        if failed is not None:  # the replica died before finishing: a clean error, not a bare 500
            logger.warning("request to %s failed: %r", req.model, failed)
            raise api.ApiError(503, "server_error", f"the engine replica failed: {type(failed).__name__}; "
                               "retry the request") from None
        bodies = [self._whole(ep, req, prompt, params, tokenizer, items) for items in choices]
        return JSONResponse(api.merge_choices(bodies) if len(bodies) > 1 else bodies[0])

    def _whole(self, ep: api.Endpoint, req, prompt, params, tokenizer, items: list[StreamItem]) -> dict:
        ids = [t for item in items for t in item.token_ids]
        lps = [lp for item in items for lp in item.logprobs]
        reason = items[-1].finish_reason
        _raise_if_failed(items[-1])
        text = api.trim_stop(tokenizer.decode(ids), params.stop, params.include_stop_str_in_output)
        logprobs = ep.logprobs(ids, lps, params.logprobs, tokenizer.decode) if params.logprobs is not None else None
        body = ep.response(req.model, text, reason, len(prompt), len(ids), logprobs)
        return body | {"system_fingerprint": _fingerprint(items[0])}

    async def _events(self, ep: api.Endpoint, req, prompt, params, tokenizer, firsts, streams,
                      trace: dict | None = None) -> AsyncIterator[bytes]:
        """Server-sent events of every choice, interleaved as their tokens come (each chunk names
        its choice's index), then usage if asked for, then [DONE]. A traced request's first chunk
        carries its stamps as `oneiros_trace`."""
        rid = ep.new_request_id()
        created, num_tokens = int(time.time()), 0
        fresh = set(range(len(firsts))) if ep.role_first else set()  # choices whose role is not sent yet
        pieces = [text_pieces(f, s, tokenizer, params) for f, s in zip(firsts, streams)]
        merged = _interleave(pieces)
        try:
            async for index, (piece, item) in merged:
                new = item.token_ids
                num_tokens += len(new)
                logprobs = (ep.logprobs(new, item.logprobs, params.logprobs, tokenizer.decode)
                            if params.logprobs is not None and new else None)
                reason = item.finish_reason if item.finished else None
                if piece or reason or logprobs or index in fresh:
                    extra = {"first": True} if index in fresh else {}
                    fresh.discard(index)
                    out = ep.chunk(req.model, piece, reason, logprobs, request_id=rid, created=created, **extra)
                    out["choices"][0]["index"] = index
                    if trace is not None:
                        out["oneiros_trace"], trace = trace | {"ingress_first_chunk": time.time()}, None
                    yield api.sse(out | {"system_fingerprint": _fingerprint(item)})  # after a move, the new host
            if req.stream_options is not None and req.stream_options.include_usage:
                yield api.sse(api.usage_chunk(ep.kind, req.model, len(prompt), num_tokens, request_id=rid,
                                              created=created))
        except api.ApiError as exc:
            yield api.sse(exc.body())
        finally:
            await merged.aclose()
            for p in pieces:
                await p.aclose()  # the other choices stop too (their pages are freed)
        yield api.SSE_DONE


async def _drain(first: StreamItem, stream) -> list[StreamItem]:
    return [first] + [item async for item in stream]


async def _interleave(iterators: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """(index, item) from several async iterators as each produces them; stops at the first error."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    pending = {asyncio.ensure_future(it.__anext__()): i for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: pending[t]):
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(iterators[i].__anext__())] = i
                yield i, item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)  # their iterators are idle again


async def text_pieces(first: StreamItem, stream, tokenizer: Tokenizer,
                      params: SamplingParams) -> AsyncIterator[tuple[str, StreamItem]]:
    """(text to send, stream item) for every item of a token stream, starting with `first`.

    Decodes incrementally (an incomplete multi-byte character waits for its next byte) and trims
    stop strings as OpenAI does. Raises ApiError when the engine or its replica fails; always closes
    the engine stream (which frees the request's pages if it is still running).
    """
    text = IncrementalDetokenizer(tokenizer)
    trimmer = api.StopTrimmer(params.stop, params.include_stop_str_in_output)
    item = first
    try:
        while True:
            piece = trimmer.push(text.push(item.token_ids, final=item.finished))
            if item.finished:
                _raise_if_failed(item)
                yield piece + trimmer.flush(), item
                return
            yield piece, item
            item = await stream.__anext__()
    except api.ApiError:
        raise
    except Exception as exc:  # the replica died mid-stream: say so, do not hang
        logger.warning("stream failed: %r", exc)
        raise api.server_error(f"the engine replica failed mid-stream: {type(exc).__name__}") from None
    finally:
        await _close(stream)


class FailoverStream:
    """One choice's engine stream that outlives its replica.

    When the replica dies or cannot be reached mid-stream, the request is placed again (another
    host, or the replacement the controller places) with every token already streamed appended to
    its prompt, `max_tokens` reduced by as many and `num_generated` saying so: greedy requests go on
    token for token, seeded ones draw what they would have drawn (position-seeded), unseeded ones a
    valid sample. The consumer sees one stream. At most MAX_MOVES moves, within MOVE_DEADLINE_S of
    the first; after that the error ends the stream as before."""

    def __init__(self, frontend: OpenAIFrontend, model: str, prompt: list[int], params: SamplingParams,
                 stream: AsyncIterator[StreamItem], first: StreamItem) -> None:
        self._frontend, self._model, self._prompt, self._params = frontend, model, prompt, params
        self._stream, self._replica = stream, first.replica_id
        self._generated = list(first.token_ids)
        self.moves = 0
        self._deadline: float | None = None

    def __aiter__(self) -> FailoverStream:
        return self

    async def __anext__(self) -> StreamItem:
        try:
            item = await self._stream.__anext__()
        except (StopAsyncIteration, api.ApiError):
            raise
        except Exception as exc:  # the replica died or is unreachable
            item = await self._move(exc)
        self._generated += item.token_ids
        return item

    async def aclose(self) -> None:
        await _close(self._stream)

    async def _move(self, exc: Exception) -> StreamItem:
        now = time.monotonic()
        self._deadline = self._deadline or now + MOVE_DEADLINE_S
        if self.moves >= MAX_MOVES or now > self._deadline:
            raise exc
        self.moves += 1
        self._frontend._moved(self._model)
        done = len(self._generated)
        logger.warning("replica %s failed mid-stream (%r) after %d tokens of a %s request; moving it (move %d)",
                       self._replica, exc, done, self._model, self.moves)
        await _close(self._stream)
        left = self._params.max_tokens - done
        if left <= 0:  # every token came; only the closing item was lost with the replica
            return StreamItem(finished=True, finish_reason="length", replica_id=self._replica)
        params = dataclasses.replace(self._params, max_tokens=left, num_generated=self._params.num_generated + done)
        self._stream, first = await self._frontend._place(self._model, self._prompt + self._generated, params,
                                                          avoid={self._replica})
        self._replica = first.replica_id
        return first


class ReplicaGone(api.ApiError):
    """The engine call failed before its first item: the replica died or cannot be reached."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(503, "server_error", f"no engine replica could take the request: {type(exc).__name__}")


class NotPlaced(api.ApiError):
    """A replica could not load the request's model: not now (`model_not_loaded`), or never beside
    the models it hosts (`model_not_here`). The ingress asks again (see `_place`)."""

    def __init__(self, message: str, code: str, replica_id: str) -> None:
        super().__init__(503, "server_error", message, None, code)
        self.replica_id = replica_id


async def _first_item(stream: AsyncIterator[StreamItem]) -> StreamItem:
    """The stream's first item; an error item becomes an ApiError (so the HTTP status is right)."""
    try:
        item = await stream.__anext__()
    except StopAsyncIteration:
        raise api.server_error("the engine returned nothing") from None
    except api.ApiError:
        raise
    except Exception as exc:
        if _is_backpressure(exc):
            raise api.too_many_requests(1.0) from None
        logger.warning("engine call failed: %r", exc)
        raise ReplicaGone(exc) from None
    err = item.refusal
    if err is not None:
        await _close(stream)
        if err.status == 429:
            raise api.too_many_requests(err.retry_after_s or 1.0)
        if err.status == 404:
            raise api.ApiError(404, "not_found_error", err.message, "model", "model_not_found")
        if err.code in ("model_not_here", "model_not_loaded"):
            raise NotPlaced(err.message, err.code, err.replica_id or "")
        if err.status >= 500:
            raise api.ApiError(err.status, "server_error", err.message, None, err.code)
        raise api.ApiError(err.status, "invalid_request_error", err.message)
    return item


def _raise_if_failed(item: StreamItem) -> None:
    if item.failed:
        raise api.server_error(f"the engine failed this request: {item.error_message or 'no reason given'}")


def _fingerprint(item: StreamItem) -> str:
    return f"oneiros-{item.replica_id}"


def _is_backpressure(exc: BaseException) -> bool:
    return type(exc).__name__ == "BackPressureError"  # Serve's queue is full (max_queued_requests)


async def _close(stream: Any) -> None:
    """Stop the engine side of a stream (frees its pages); never raises: the replica may be dead."""
    close = getattr(stream, "aclose", None) or getattr(stream, "cancel", None)
    if close is None:
        return
    try:
        result = close()
        if hasattr(result, "__await__"):
            await result
    except Exception as exc:  # noqa: BLE001 - closing a stream of a dead replica
        logger.debug("closing a stream failed: %r", exc)


def _trace(request: Request) -> dict | None:
    return {"ingress_received": time.time()} if request.headers.get(TRACE_HEADER) == "1" else None


def make_app(frontend: OpenAIFrontend) -> FastAPI:
    app = FastAPI(title="Oneiros cluster", version="0.1.0")

    @app.exception_handler(api.ApiError)
    async def _api_error(request: Request, exc: api.ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        return frontend.list_models(frontend.authorize(request.headers.get("authorization", "")))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        trace = _trace(request)
        allowed = frontend.authorize(request.headers.get("authorization", ""))
        return await frontend.completions(await request.body(), allowed, trace)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        trace = _trace(request)
        allowed = frontend.authorize(request.headers.get("authorization", ""))
        return await frontend.chat(await request.body(), allowed, trace)

    install_openapi(app)
    return app


class DirectHttp:
    """The app served on host:port from the ingress replica's own event loop (`http.ingress: direct`):
    requests and every streamed chunk skip Serve's HTTP proxy and its actor call (docs/latency.md).
    The socket has SO_REUSEPORT, so a replacement replica on the same node binds while the old one
    drains. A client that disconnects cancels its response task here, which cancels its stream."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        import uvicorn

        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(
                f"the ingress cannot serve HTTP on {host}:{port}: {exc.strerror}. With http.ingress: direct "
                "nothing else may listen there (Serve's own HTTP proxy goes on http.proxy_port); "
                "http.ingress: proxy serves through Serve's proxy instead") from exc
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="off", access_log=False, log_config=None,
                                                    timeout_keep_alive=30))
        self.server.capture_signals = contextlib.nullcontext  # Ray owns the process's signals
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[sock]))
        self.address = f"{host}:{port}"

    def check(self) -> None:
        """RuntimeError if the server has stopped (Serve's health check then replaces the replica)."""
        if self.task.done():
            why = "stopped" if self.task.cancelled() or self.task.exception() is None else repr(self.task.exception())
            raise RuntimeError(f"the ingress's HTTP server on {self.address} is down: {why}")

    async def stop(self, timeout_s: float) -> None:
        """Stop listening, give open streams `timeout_s` to finish, then close them."""
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout_s)
        except TimeoutError:
            self.server.force_exit = True
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self.task, 1.0)
