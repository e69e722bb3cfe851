"""What differs between /v1/completions and /v1/chat/completions, in one object per endpoint.

The ingress and the gRPC service hold an `Endpoint` and call through it; nothing else asks which
kind of request it serves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from replicas.service.openai_api import prompts, requests, responses


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "completion" | "chat": the gRPC method family and usage_chunk's object name
    id_prefix: str  # of response ids: "cmpl" | "chatcmpl"
    parse: Callable[[Any], Any]  # body -> request model (ApiError when bad)
    prompt_ids: Callable[[Any, Any], list[int]]  # (request, tokenizer) -> prompt token ids
    response: Callable[..., dict]  # the whole (non-streamed) body
    chunk: Callable[..., dict]  # one streamed chunk
    logprobs: Callable[..., dict]  # the logprobs object of some tokens
    role_first: bool  # the first chunk of each choice carries the assistant role (chat)

    def new_request_id(self) -> str:
        return responses.new_request_id(self.id_prefix)


COMPLETION = Endpoint("completion", "cmpl", requests.parse_completion, prompts.completion_prompt_ids,
                      responses.completion_response, responses.completion_chunk, responses.completion_logprobs,
                      role_first=False)
CHAT = Endpoint("chat", "chatcmpl", requests.parse_chat, prompts.chat_prompt_ids, responses.chat_response,
                responses.chat_chunk, responses.chat_logprobs, role_first=True)
ENDPOINTS = {e.kind: e for e in (COMPLETION, CHAT)}
