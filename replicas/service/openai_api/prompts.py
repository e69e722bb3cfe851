"""Prompt token ids: text or ids for completions, the model's chat template for chat."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping, Sequence

from replicas.engine.tokenizer import ROLE_TEMPLATE, Tokenizer
from replicas.service.openai_api.errors import invalid, server_error
from replicas.service.openai_api.requests import ChatCompletionRequest, CompletionRequest


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
