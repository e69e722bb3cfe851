"""A request's engine SamplingParams: defaults, the model's generation config, fitting max_tokens to the context."""

from __future__ import annotations

from collections.abc import Mapping

from replicas.engine.sampling import InvalidRequest, SamplingParams
from replicas.service.openai_api.errors import invalid
from replicas.service.openai_api.requests import (MAX_STOP_CHARS, MAX_STOP_STRINGS, ChatCompletionRequest,
                                                  CompletionRequest)

FALLBACK_MAX_TOKENS = 256  # chat without max_tokens when the caller does not pass the context length


def to_sampling_params(req: CompletionRequest | ChatCompletionRequest, context_len: int | None = None,
                       num_prompt_tokens: int = 0, defaults: Mapping[str, float] | None = None) -> SamplingParams:
    """The engine's SamplingParams for `req`; with `context_len`, max_tokens is fitted to the context
    (null -> what is left; the completions default of 16 is clamped; an explicit value that does not
    fit is a 400, as OpenAI does). `defaults` (the model's generation_config.json, as vLLM reads it)
    replace the API's defaults of the SAMPLING_DEFAULTS fields the request does not set."""
    if defaults:
        req = req.model_copy(update={k: v for k, v in defaults.items() if k not in req.model_fields_set})
    max_param = req.max_param
    max_tokens = _fit_context(req, getattr(req, max_param), max_param, context_len, num_prompt_tokens)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or ())
    if "" in stop:
        raise invalid("stop strings must not be empty", "stop")
    if len(stop) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in stop):
        raise invalid(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters each", "stop")
    params = {"max_tokens": max_param, "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
              "logprobs": req.logprobs_param, "min_tokens": "min_tokens",
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
            logprobs=req.num_logprobs,
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
