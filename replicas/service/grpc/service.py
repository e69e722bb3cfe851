"""The gRPC operations (replicas/service/grpc/oneiros.proto) over the same frontend as the HTTP API.

A protobuf request becomes the OpenAI JSON body it stands for, so validation, prompts, sampling,
stop strings and errors are exactly the HTTP ones; an ApiError becomes a gRPC status code with the
OpenAI message as details. No Ray here: the Serve ingress deployment delegates its RPC methods.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from replicas.service import openai_api as api
from replicas.service.grpc import oneiros_pb2 as pb
from replicas.service.ingress import OpenAIFrontend, text_pieces

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def openai_body(kind: str, request: Any, stream: bool) -> dict:
    """The OpenAI JSON body of a CompletionRequest or ChatRequest."""
    s = request.sampling
    body: dict[str, Any] = {"model": request.model, "stream": stream, "stop": list(s.stop),
                            "stop_token_ids": list(s.stop_token_ids), "ignore_eos": s.ignore_eos, "top_k": s.top_k}
    if s.max_tokens:
        body["max_tokens"] = s.max_tokens
    for name in ("temperature", "top_p", "seed"):
        if s.HasField(name):
            body[name] = getattr(s, name)
    if kind == "chat":
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        body["prompt"] = list(request.prompt_token_ids) if request.prompt_token_ids else request.prompt
    return body


def _authorization(grpc_context) -> str:
    if grpc_context is None:
        return ""
    metadata = dict(grpc_context.invocation_metadata() or ())
    return metadata.get("authorization", "")


def _fail(grpc_context, exc: api.ApiError) -> None:
    grpc_context.set_code(STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL))
    grpc_context.set_details(exc.message)


class GrpcService:
    def __init__(self, frontend: OpenAIFrontend) -> None:
        self.frontend = frontend

    async def complete(self, kind: str, request: Any, grpc_context) -> pb.CompletionResponse:
        try:
            allowed = self.frontend.authorize(_authorization(grpc_context))
            req, prompt, params, tokenizer, first, stream = await self.frontend.start(
                api.ENDPOINTS[kind], openai_body(kind, request, stream=False), allowed)
            text, ids, reason = "", [], None
            async for piece, item in text_pieces(first, stream, tokenizer, params):
                text, ids, reason = text + piece, ids + list(item.token_ids), item.finish_reason
        except api.ApiError as exc:
            _fail(grpc_context, exc)
            return pb.CompletionResponse()
        return pb.CompletionResponse(
            id=api.ENDPOINTS[kind].new_request_id(), model=req.model, text=text,
            token_ids=ids, finish_reason=reason or "", replica_id=first.replica_id,
            usage=pb.Usage(prompt_tokens=len(prompt), completion_tokens=len(ids)),
        )

    async def stream(self, kind: str, request: Any, grpc_context) -> AsyncIterator[pb.CompletionChunk]:
        try:
            allowed = self.frontend.authorize(_authorization(grpc_context))
            _, _, params, tokenizer, first, stream = await self.frontend.start(
                api.ENDPOINTS[kind], openai_body(kind, request, stream=True), allowed)
            async for piece, item in text_pieces(first, stream, tokenizer, params):
                reason = item.finish_reason if item.finished else ""
                yield pb.CompletionChunk(text=piece, token_ids=item.token_ids, finish_reason=reason or "")
        except api.ApiError as exc:
            _fail(grpc_context, exc)

    def models(self, grpc_context) -> pb.ModelsResponse:
        try:
            allowed = self.frontend.authorize(_authorization(grpc_context))
        except api.ApiError as exc:
            _fail(grpc_context, exc)
            return pb.ModelsResponse()
        return pb.ModelsResponse(models=self.frontend.visible_models(allowed))
