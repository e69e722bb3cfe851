"""The OpenAI-compatible protocol: request models, errors, sampling mapping, prompts, responses, SSE.

    errors.py     ApiError and its constructors (every bad request leaves the protocol as one)
    requests.py   request models, limits, parse_completion / parse_chat
    sampling.py   to_sampling_params
    prompts.py    prompt ids; chat templates rendered as Hugging Face does
    responses.py  bodies, chunks, SSE, logprobs
    stops.py      stop-string trimming, whole and streamed
    endpoints.py  COMPLETION and CHAT: what differs between the two endpoints

Pure (pydantic + stdlib + the engine's SamplingParams/Tokenizer): the HTTP shell parses a body with
`parse_completion` / `parse_chat`, builds prompt ids and SamplingParams here, runs the engine, and
shapes the output with the builders below. Its invariant: every bad request leaves this module as an
`ApiError` (status + OpenAI error body), never as another exception.

A single prompt per request; `n` choices are independent samples (docs/api.md). Known fields that
change the output but are not implemented (echo, suffix, best_of > 1, tools, guided decoding, ...)
are refused with a 400 rather than silently ignored; other unknown fields are ignored.

Chat prompts: the tokenizer's `chat_template` (Jinja, rendered as Hugging Face's apply_chat_template
does: `messages`, `add_generation_prompt=True`, `bos_token`, `eos_token`, `raise_exception`, `tojson`),
encoded without adding special tokens (the template places them). A model without a template gets a
400 saying so; a config can name one (`ModelSpec.chat_template`), and random-weight models default
to ROLE_TEMPLATE: "<|{role}|>" + newline + content + newline per message, then "<|assistant|>" and a
newline. Text content parts of one message are joined with newlines.
"""

from replicas.engine.tokenizer import ROLE_TEMPLATE
from replicas.service.openai_api.endpoints import CHAT, COMPLETION, ENDPOINTS, Endpoint
from replicas.service.openai_api.errors import (ApiError, invalid, not_found_model, server_error, too_many_requests,
                                                unauthorized)
from replicas.service.openai_api.prompts import chat_prompt_ids, completion_prompt_ids, render_chat
from replicas.service.openai_api.requests import (MAX_BODY_BYTES, MAX_CHOICES, MAX_STOP_CHARS, MAX_STOP_STRINGS,
                                                  ChatCompletionRequest, ChatMessage, CompletionRequest,
                                                  ContentPart, StreamOptions, from_validation_error, parse_chat,
                                                  parse_completion)
from replicas.service.openai_api.responses import (LOGPROB_FLOOR, SSE_DONE, chat_chunk, chat_logprobs, chat_response,
                                                   completion_chunk, completion_logprobs, completion_response,
                                                   merge_choices, new_request_id, sse, usage, usage_chunk)
from replicas.service.openai_api.sampling import FALLBACK_MAX_TOKENS, to_sampling_params
from replicas.service.openai_api.stops import StopTrimmer, trim_stop

__all__ = [
    "ApiError", "CHAT", "COMPLETION", "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "ContentPart",
    "ENDPOINTS", "Endpoint", "FALLBACK_MAX_TOKENS", "LOGPROB_FLOOR", "MAX_BODY_BYTES", "MAX_CHOICES",
    "MAX_STOP_CHARS", "MAX_STOP_STRINGS", "ROLE_TEMPLATE", "SSE_DONE", "StopTrimmer", "StreamOptions",
    "chat_chunk", "chat_logprobs", "chat_prompt_ids", "chat_response", "completion_chunk", "completion_logprobs",
    "completion_prompt_ids", "completion_response", "from_validation_error", "invalid", "merge_choices",
    "new_request_id", "not_found_model", "parse_chat", "parse_completion", "render_chat", "server_error", "sse",
    "to_sampling_params", "too_many_requests", "trim_stop", "unauthorized", "usage", "usage_chunk",
]
