"""The OpenAPI document of the HTTP API: every route's request and response bodies, so that a client
generator or an API fuzzer (tests/ray/test_schema.py runs schemathesis) can use `/openapi.json`.

The routes read their bodies themselves (`replicas/service/openai_api/` parses them, so that errors are
OpenAI error bodies rather than FastAPI's 422s); this module describes what they accept and return:
the request models are the very ones that parse, the response models mirror the builders in
openai_api/responses.py (`completion_response`, `chat_response`, ...), and a test checks the builders' output
against them.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from replicas.service.openai_api import ChatCompletionRequest, CompletionRequest

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str = Field(description="What was wrong, with the numbers.")
    type: str = Field(description="invalid_request_error, not_found_error, authentication_error, ...")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="A machine-readable reason, if any.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = Field(description="tokens, token_logprobs, top_logprobs, text_offset")
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = Field(description="content: one entry per token with its top_logprobs")
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


SSE = {"text/event-stream": {"schema": {"type": "string", "description": "Server-sent events: one JSON chunk "
                                                                          "per `data:` line, then `data: [DONE]`"}}}
ERRORS = {400: "Bad request: the field at fault is named", 401: "Missing or invalid API key",
          404: "Unknown model", 413: "Body too large", 429: "Too many requests (Retry-After)",
          500: "This request failed in the engine (nothing else did)", 503: "No replica can take the request now"}
POSTS = {"/v1/completions": (CompletionRequest, CompletionResponse),
         "/v1/chat/completions": (ChatCompletionRequest, ChatCompletionResponse)}
GETS = {"/v1/models": ModelList, "/health": Health}


def install(app: FastAPI) -> None:
    """Make `app.openapi()` describe every body (called once routes exist)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi


def build(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    models = [(m, "validation") for m, _ in POSTS.values()]
    models += [(m, "serialization") for m in (*[r for _, r in POSTS.values()], *GETS.values(), ErrorResponse)]
    _, defs = models_json_schema(models, ref_template=REF)
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    errors = {str(code): {"description": why, "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
              for code, why in ERRORS.items()}
    for path, (request, response) in POSTS.items():
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
        op["responses"] = {"200": {"description": "The whole answer, or a stream when `stream` is true",
                                   "content": {"application/json": {"schema": _ref(response)}, **SSE}}} | errors
    for path, response in GETS.items():
        ok = {"200": {"description": "OK", "content": {"application/json": {"schema": _ref(response)}}}}
        doc["paths"][path]["get"]["responses"] = ok | ({"401": errors["401"]} if path == "/v1/models" else {})
    return doc


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}
