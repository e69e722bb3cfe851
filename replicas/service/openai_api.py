"""The OpenAI-compatible protocol: request models, errors, sampling mapping, prompts, responses, SSE.

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

from __future__ import annotations

import functools
import json
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from replicas.engine.sampling import SAMPLING_DEFAULTS, InvalidRequest, SamplingParams
from replicas.engine.tokenizer import ROLE_TEMPLATE, Tokenizer

FALLBACK_MAX_TOKENS = 256  # chat without max_tokens when the caller does not pass the context length
LOGPROB_FLOOR = -9999.0  # -inf is not JSON; vLLM clamps to the same value
SSE_DONE = b"data: [DONE]\n\n"

MAX_BODY_BYTES = 1 << 20  # a request body above this is a 413
MAX_STOP_STRINGS = 16  # stop strings per request (OpenAI allows 4; vLLM has no limit)
MAX_STOP_CHARS = 256  # characters per stop string
MAX_CHOICES = 16  # n: choices per request

# field -> values that mean "not used"; any other value is a 400 (the feature is not implemented).
# The vLLM extensions listed here change the output; accepting and ignoring them would answer a
# different request than the one sent (tests/unit/test_openai_api.py lists them).
_UNSUPPORTED_COMMON = {
    "allowed_token_ids": (None, []), "bad_words": (None, []),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "structured_outputs": (None,), "use_beam_search": (None, False), "length_penalty": (None, 1),
    "prompt_logprobs": (None,), "truncate_prompt_tokens": (None,), "logits_processors": (None, []),
}
_UNSUPPORTED_COMPLETION = _UNSUPPORTED_COMMON | {"echo": (None, False), "suffix": (None, ""), "best_of": (None, 1)}
_UNSUPPORTED_CHAT = _UNSUPPORTED_COMMON | {"tools": (None, []), "functions": (None, []),
                                           "response_format": (None, {"type": "text"})}


# ---- errors ---------------------------------------------------------------------------------------

class ApiError(Exception):
    """A request the server refuses; `body()` is the OpenAI error JSON, `status` the HTTP status."""

    def __init__(self, status: int, type: str, message: str, param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type  # invalid_request_error, not_found_error, authentication_error, ...
        self.message = message
        self.param = param  # the offending request field, dotted ("messages.[0].content")
        self.code = code
        self.retry_after_s = retry_after_s  # 429 only: the shell sends it as Retry-After

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request_error", message, param)


def not_found_model(model: str, available: Sequence[str]) -> ApiError:
    return ApiError(404, "not_found_error", f"model {model!r} does not exist; available: {sorted(available)}",
                    "model", "model_not_found")


def unauthorized() -> ApiError:
    return ApiError(401, "authentication_error", "missing or invalid API key (send 'Authorization: Bearer <key>')",
                    code="invalid_api_key")


def too_many_requests(retry_after_s: float) -> ApiError:
    return ApiError(429, "rate_limit_error", f"too many requests; retry after {retry_after_s:g} s",
                    code="rate_limit_exceeded", retry_after_s=retry_after_s)


def server_error(message: str) -> ApiError:
    return ApiError(500, "server_error", message)


def from_validation_error(err: ValidationError) -> ApiError:
    """A 400 naming the first offending field; for a union field, the message lists the options."""
    errors = [_split(e["loc"]) + (e,) for e in err.errors()]
    param, _, first = errors[0]
    if first["type"] == "missing":
        return invalid(f"missing required field {param!r}", param)
    tags = [tag for p, tag, _ in errors if p == param]
    message = (f"expected {' or '.join(tags)}" if len(tags) > 1 and all(tags)
               else first["msg"].removeprefix("Value error, "))
    return invalid(f"{param}: {message}" if param else message, param or None)


def _split(loc: tuple) -> tuple[str, str | None]:
    """('messages', 0, 'content', 'list[ContentPart]', 1) -> ('messages.[0].content', 'list[ContentPart]')"""
    tag = next((i for i, p in enumerate(loc) if isinstance(p, str) and p not in _FIELDS), len(loc))
    return ".".join(f"[{p}]" if isinstance(p, int) else p for p in loc[:tag]), (loc[tag] if tag < len(loc) else None)


# ---- requests -------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(False, description="Send a last chunk with usage and no choices.")


class _Request(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not know

    model: str = Field(description="Name of the model to run, as listed by /v1/models.")
    temperature: float | None = Field(1.0, description="Sampling temperature; 0 = greedy. null = 1.0.")
    top_p: float | None = Field(None, description="Nucleus mass in (0, 1]; null = 1 (off).")
    top_k: int | None = Field(None, description="vLLM extension: sample from the k most likely; 0, -1 or null = off.")
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="Seed for reproducible sampling.")
    stop: str | list[str] | None = Field(None, description="Stop strings; the output ends before the first one.")
    stop_token_ids: list[int] | None = Field(None, description="vLLM extension: token ids that end generation.")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past the eos token.")
    include_stop_str_in_output: bool = Field(False, description="vLLM extension: keep the stop string that ended "
                                                                "the output (text after it is still dropped).")
    min_tokens: int | None = Field(None, description="vLLM extension: eos, stop ids and stop strings do not end "
                                                     "generation before this many tokens.")
    repetition_penalty: float | None = Field(None, description="vLLM extension, > 0: logits of tokens in the prompt "
                                                               "or output are divided (if > 0) or multiplied by it.")
    presence_penalty: float | None = Field(None, description="In [-2, 2]: subtracted from the logits of tokens "
                                                             "already in the output.")
    frequency_penalty: float | None = Field(None, description="In [-2, 2]: times each token's count in the output, "
                                                              "subtracted from its logit.")
    min_p: float | None = Field(None, description="vLLM extension, in [0, 1]: drop tokens less likely than min_p "
                                                  "times the most likely one.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100], "
                                                                  "added to its logit.")
    n: int | None = Field(1, description=f"Number of choices, 1..{MAX_CHOICES}: independent samples of the prompt "
                                          "(with a seed, choice i draws from seed + i).")
    stream: bool = Field(False, description="Send server-sent events as tokens are generated.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options (include_usage).")
    user: str | None = Field(None, description="End-user id for abuse tracking; recorded, not used.")

    @field_validator("n")
    @classmethod
    def _choices(cls, n: int | None) -> int | None:
        if n is not None and not 1 <= n <= MAX_CHOICES:
            raise ValueError(f"n must be in [1, {MAX_CHOICES}], got {n}")
        return n


class CompletionRequest(_Request):
    prompt: str | list[Annotated[int, Field(strict=True)]] = Field(
        description="One prompt: text or token ids (a list holding exactly one of either is accepted).")
    max_tokens: int | None = Field(16, description="Tokens to generate; null = whatever the context leaves.")
    logprobs: int | None = Field(None, description="Return the top-N logprobs of each token (0..20).")

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) > 1:
                raise ValueError(f"only one prompt per request is supported, got {len(prompt)}")
            return prompt[0]
        return prompt


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = Field(description='Part kind; only "text" is supported.')
    text: str | None = Field(None, description="The text of a text part.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"] = Field(description="Who wrote the message.")
    content: str | list[ContentPart] = Field(description="Text, or a list of text parts.")

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[ContentPart]) -> str:
        if isinstance(content, str):
            return content
        for part in content:
            if part.type != "text":
                raise ValueError(f"only text content parts are supported, got type {part.type!r}")
            if part.text is None:
                raise ValueError("a text content part needs a 'text' field")
        return "\n".join(part.text for part in content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far, oldest first.")
    max_tokens: int | None = Field(None, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, description="Tokens to generate; null = what the context leaves.")
    logprobs: bool | None = Field(False, description="Return the logprob of each output token.")
    top_logprobs: int | None = Field(None, description="With logprobs: also the N most likely tokens (0..20).")

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return top


_FIELDS = {name for m in (CompletionRequest, ChatCompletionRequest, ChatMessage, ContentPart, StreamOptions)
           for name in m.model_fields}


def parse_completion(body: bytes | str | dict) -> CompletionRequest:
    return _parse(body, CompletionRequest, _UNSUPPORTED_COMPLETION)


def parse_chat(body: bytes | str | dict) -> ChatCompletionRequest:
    return _parse(body, ChatCompletionRequest, _UNSUPPORTED_CHAT)


def _parse(body, model: type[BaseModel], unsupported: dict) -> Any:
    if isinstance(body, (bytes, bytearray, str)):
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, "invalid_request_error", f"the request body has {len(body)} bytes; at most "
                           f"{MAX_BODY_BYTES} are accepted")
        try:
            body = json.loads(body)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise invalid(f"could not parse JSON body: {e}") from None
        except RecursionError:
            raise invalid("the JSON body is nested too deeply") from None
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    for name, unused in unsupported.items():
        if name in body and body[name] not in unused:
            raise invalid(f"{name} is not supported by this server", name)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


# ---- sampling -------------------------------------------------------------------------------------

def to_sampling_params(req: CompletionRequest | ChatCompletionRequest, context_len: int | None = None,
                       num_prompt_tokens: int = 0, defaults: Mapping[str, float] | None = None) -> SamplingParams:
    """The engine's SamplingParams for `req`; with `context_len`, max_tokens is fitted to the context
    (null -> what is left; the completions default of 16 is clamped; an explicit value that does not
    fit is a 400, as OpenAI does). `defaults` (the model's generation_config.json, as vLLM reads it)
    replace the API's defaults of the SAMPLING_DEFAULTS fields the request does not set."""
    if defaults:
        req = req.model_copy(update={k: v for k, v in defaults.items() if k not in req.model_fields_set})
    chat = isinstance(req, ChatCompletionRequest)
    max_param = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _fit_context(req, getattr(req, max_param), max_param, context_len, num_prompt_tokens)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or ())
    if "" in stop:
        raise invalid("stop strings must not be empty", "stop")
    if len(stop) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in stop):
        raise invalid(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters each", "stop")
    logprobs = ((req.top_logprobs or 0) if req.logprobs else None) if chat else req.logprobs
    params = {"max_tokens": max_param, "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
              "logprobs": "top_logprobs" if chat else "logprobs", "min_tokens": "min_tokens",
              "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
              "frequency_penalty": "frequency_penalty", "min_p": "min_p", "logit_bias": "logit_bias"}
    try:
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    except ValueError:
        raise invalid("logit_bias keys must be token ids (integers, as strings)", "logit_bias") from None
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            stop=tuple(stop),
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logprobs=logprobs,
            min_tokens=req.min_tokens or 0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            min_p=req.min_p or 0.0,
            logit_bias=tuple(bias.items()),
        )
    except InvalidRequest as e:  # engine messages start with the field name: "top_p must be in (0, 1], ..."
        message = str(e)
        field = params.get(message.split(" ", 1)[0])
        raise invalid(message.replace(message.split(" ", 1)[0], field, 1) if field else message, field) from None


def _fit_context(req, max_tokens: int | None, max_param: str, context_len: int | None, num_prompt: int) -> int:
    if context_len is None:
        return FALLBACK_MAX_TOKENS if max_tokens is None else max_tokens
    prompt_param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    room = context_len - num_prompt
    if room < 1:
        raise invalid(f"the prompt is {num_prompt} tokens and the model's context is {context_len} tokens: "
                      "no room to generate", prompt_param)
    if max_tokens is None:
        return room
    if max_param not in req.model_fields_set:  # the completions default (16)
        return min(max_tokens, room)
    if max_tokens > room:
        raise invalid(f"{max_param}={max_tokens} plus the {num_prompt}-token prompt exceeds the model's context "
                      f"of {context_len} tokens", max_param)
    return max_tokens


# ---- prompts --------------------------------------------------------------------------------------

def completion_prompt_ids(req: CompletionRequest, tokenizer: Tokenizer | None) -> list[int]:
    if isinstance(req.prompt, list):
        ids = list(req.prompt)
    elif tokenizer is None:
        raise invalid(f"model {req.model!r} has no tokenizer; send token ids", "prompt")
    else:
        ids = tokenizer.encode(req.prompt)
    if not ids:
        raise invalid("the prompt is empty", "prompt")
    return ids




def chat_prompt_ids(req: ChatCompletionRequest, tokenizer: Tokenizer | None) -> list[int]:
    if tokenizer is None:
        raise invalid(f"model {req.model!r} has no tokenizer, which chat needs; use /v1/completions with "
                      "token ids", "messages")
    if tokenizer.chat_template is None:
        raise invalid(f"model {req.model!r} has no chat template (no chat_template.jinja and none in its "
                      "tokenizer_config.json); name one with `chat_template` in its config entry, or use "
                      "/v1/completions", "messages")
    messages = [{"role": m.role, "content": m.content} for m in req.messages]
    bos, eos = (_special_text(tokenizer, tokenizer.bos_token_id), _special_text(tokenizer, tokenizer.eos_token_id))
    return tokenizer.encode(render_chat(messages, tokenizer.chat_template, bos, eos), add_special_tokens=False)


def render_chat(messages: Sequence[Mapping[str, str]], template: str = ROLE_TEMPLATE,
                bos_token: str = "", eos_token: str = "") -> str:
    """The prompt text of `template` (Jinja) for these messages, with the generation prompt."""
    import jinja2  # lazy: only chat needs it (it ships with torch)

    compiled = _compile_template(template)
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=True,
                               bos_token=bos_token, eos_token=eos_token)
    except jinja2.TemplateError as e:  # raise_exception(...) in the template: the conversation is refused
        raise invalid(f"the model's chat template refused the messages: {e}", "messages") from None
    except Exception as e:  # noqa: BLE001 - a template bug (TypeError, ...): the model's fault, not the request's
        raise server_error(f"the model's chat template failed: {type(e).__name__}: {e}") from None


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    # the same environment Hugging Face's apply_chat_template uses, so templates render identically
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:  # the model's files are broken, not the request
        raise server_error(f"the model's chat template does not compile: {e}") from None


def _special_text(tokenizer: Tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tokenizer.decode([token_id], skip_special_tokens=False)


# ---- responses ------------------------------------------------------------------------------------

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


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


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


# ---- stop strings ---------------------------------------------------------------------------------
# Generation ends when a stop string is *completed*, so the cut is at the occurrence that ends first
# (ties: the one that starts first), and neither it nor anything after it is returned.

def _first_stop(text: str, stops: Sequence[str], start: int = 0, include: bool = False) -> int | None:
    """Where the output is cut: before the stop string that ends first, or after it with `include`."""
    hits = [(i + len(s), i) for s in stops if s and (i := text.find(s, start)) >= 0]
    return None if not hits else min(hits)[0 if include else 1]


def trim_stop(text: str, stops: Sequence[str], include: bool = False) -> str:
    """The text OpenAI returns for the whole output `text` (non-streaming)."""
    cut = _first_stop(text, stops, include=include)
    return text if cut is None else text[:cut]


class StopTrimmer:
    """Streaming stop strings: `push(delta)` returns only text that can no longer turn into a stop
    string; a suffix that could be one's start is held back until disambiguated or `flush()`ed.

        text:  |--- emitted ---|-- held: a prefix of some stop --|
                               ^ every stop occurrence starts here or later
    """

    def __init__(self, stops: Sequence[str], include: bool = False) -> None:
        self._stops = [s for s in stops if s]
        self._include = include  # the stop string itself is emitted (include_stop_str_in_output)
        self._text = ""
        self._num_emitted = 0  # chars of _text already returned
        self.stopped = False  # a stop string was seen; everything after it is dropped

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        self._text += delta
        cut = _first_stop(self._text, self._stops, self._num_emitted, self._include)
        if cut is not None:
            self.stopped = True
            return self._emit(cut)
        return self._emit(len(self._text) - self._held_len())

    def flush(self) -> str:
        """At the end of generation: the held-back text was not a stop string after all."""
        return "" if self.stopped else self._emit(len(self._text))

    def _held_len(self) -> int:
        longest = max((len(s) for s in self._stops), default=1)
        for k in range(min(longest - 1, len(self._text) - self._num_emitted), 0, -1):
            if any(s.startswith(self._text[-k:]) for s in self._stops):
                return k
        return 0

    def _emit(self, end: int) -> str:
        piece = self._text[self._num_emitted:end]
        self._num_emitted = end
        return piece
