"""Response bodies, stream chunks and server-sent events; logprobs in the completions and chat shapes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

LOGPROB_FLOOR = -9999.0  # -inf is not JSON; vLLM clamps to the same value
SSE_DONE = b"data: [DONE]\n\n"


def new_request_id(kind: Literal["cmpl", "chatcmpl"]) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def merge_choices(bodies: list[dict]) -> dict:
    """One response of n choices from n single-choice ones (choice i from body i): usage adds up
    the completion tokens once per choice, the prompt's once."""
    merged = dict(bodies[0])
    merged["choices"] = [body["choices"][0] | {"index": i} for i, body in enumerate(bodies)]
    completion = sum(body["usage"]["completion_tokens"] for body in bodies)
    merged["usage"] = usage(bodies[0]["usage"]["prompt_tokens"], completion)
    return merged


def completion_response(model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                        logprobs: dict | None = None, *, request_id: str | None = None,
                        created: int | None = None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": _reason(finish_reason)}
    return _envelope(request_id or new_request_id("cmpl"), "text_completion", created, model, [choice]) | {
        "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(model: str, text: str, finish_reason: str | None = None, logprobs: dict | None = None, *,
                     request_id: str, created: int) -> dict:
    """One streamed piece; pass the same request_id and created to every chunk of a stream."""
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": _reason(finish_reason)}
    return _envelope(request_id, "text_completion", created, model, [choice])


def chat_response(model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                  logprobs: dict | None = None, *, request_id: str | None = None, created: int | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
              "finish_reason": _reason(finish_reason)}
    return _envelope(request_id or new_request_id("chatcmpl"), "chat.completion", created, model, [choice]) | {
        "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(model: str, text: str = "", finish_reason: str | None = None, logprobs: dict | None = None, *,
               first: bool = False, request_id: str, created: int) -> dict:
    """A stream's first chunk (first=True) carries the role; its last one carries finish_reason."""
    delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": _reason(finish_reason)}
    return _envelope(request_id, "chat.completion.chunk", created, model, [choice])


def usage_chunk(kind: Literal["completion", "chat"], model: str, prompt_tokens: int, completion_tokens: int, *,
                request_id: str, created: int) -> dict:
    """The stream's last chunk before [DONE] when stream_options.include_usage: no choices, just usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return _envelope(request_id, obj, created, model, []) | {"usage": usage(prompt_tokens, completion_tokens)}


def _envelope(request_id: str, obj: str, created: int | None, model: str, choices: list) -> dict:
    created = int(time.time()) if created is None else created
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices}


def _reason(finish_reason) -> str | None:
    return getattr(finish_reason, "value", finish_reason)  # the engine's FinishReason enum or a plain str


# Characters that JSON leaves raw in a string and that str.splitlines (and clients built on it, such as
# httpx's aiter_lines) take for line breaks: raw, they cut a `data:` line in two. SSE itself breaks
# lines only at CR and LF, which JSON always escapes.
_UNICODE_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(obj: dict) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    if not text.isascii():
        text = text.translate(_UNICODE_LINE_BREAKS)
    return b"data: " + text.encode() + b"\n\n"


# ---- logprobs -------------------------------------------------------------------------------------
# Input per generated token: its id and a {token_id: logprob} dict holding the chosen token and at
# least the top `num_top` alternatives (what the engine returns when logprobs is set).

Detokenize = Callable[[Sequence[int]], str]


def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[Mapping[int, float]], num_top: int,
                        detokenize: Detokenize, text_offset: int = 0) -> dict:
    """The completions shape; `text_offset` is where the first token starts (streams pass the running
    length of the text already sent)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, lps in zip(token_ids, logprobs, strict=True):
        text = detokenize([tid])
        out["tokens"].append(text)
        out["token_logprobs"].append(_finite(lps[tid]))
        out["top_logprobs"].append({detokenize([t]): _finite(lp) for t, lp in _top(lps, num_top)})
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[Mapping[int, float]], num_top: int,
                  detokenize: Detokenize) -> dict:
    def entry(tid: int, lp: float) -> dict:
        text = detokenize([tid])
        return {"token": text, "logprob": _finite(lp), "bytes": list(text.encode())}

    content = [entry(tid, lps[tid]) | {"top_logprobs": [entry(t, lp) for t, lp in _top(lps, num_top)]}
               for tid, lps in zip(token_ids, logprobs, strict=True)]
    return {"content": content, "refusal": None}


def _top(lps: Mapping[int, float], num_top: int) -> list[tuple[int, float]]:
    return sorted(lps.items(), key=lambda kv: (-kv[1], kv[0]))[:num_top]


def _finite(lp: float) -> float:
    return max(float(lp), LOGPROB_FLOOR)
