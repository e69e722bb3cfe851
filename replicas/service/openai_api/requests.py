"""Request models and parsing: the OpenAI fields, limits, and the known fields refused with a 400."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from replicas.service.openai_api.errors import ApiError, invalid

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
    logprobs_param: ClassVar[str] = "logprobs"  # the field to name in an error about logprobs

    @property
    def max_param(self) -> str:
        """The field that bounds the output (named in errors about it)."""
        return "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token to return logprobs of; None = no logprobs."""
        return self.logprobs

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
    logprobs_param: ClassVar[str] = "top_logprobs"

    @property
    def max_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

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
