"""The OpenAI protocol layer: every bad request becomes the right ApiError, sampling fields map onto
SamplingParams, chat templates render, response dicts pass the official `openai` types, and streamed
stop-string trimming emits exactly what the non-streaming trim returns."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicas.service import openai_api as api
from replicas.engine.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
tokenizers = pytest.importorskip("tokenizers")
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

pytestmark = pytest.mark.unit

WORDS = ["hi", "there", "bye", "you", "are", "kind", "<|user|>", "<|system|>", "<|assistant|>",
         "<|im_start|>user", "<|im_start|>assistant", "<|im_end|>"]
CHATML = ("{{ bos_token }}{% for m in messages %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + ' <|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tokenizer(chat_template: str | None = None) -> Tokenizer:
    """Word level, whitespace split: <unk>=0, <s>=1, </s>=2, then WORDS from 3."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(backend, eos_token_id=2, bos_token_id=1, chat_template=chat_template)


def ids(*words: str) -> list[int]:
    return [WORDS.index(w) + 3 for w in words]


def completion(**overrides) -> dict:
    return {"model": "m", "prompt": "hi there"} | overrides


def chat(**overrides) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}]} | overrides


def refused(fn, *args, **kwargs) -> api.ApiError:
    with pytest.raises(api.ApiError) as info:
        fn(*args, **kwargs)
    return info.value


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("parse, body, param, fragment", [
    (api.parse_completion, b"{not json", None, "could not parse JSON body: "),
    (api.parse_completion, b"\xff\xfe{", None, "could not parse JSON body: "),
    (api.parse_chat, b"[1, 2]", None, "must be a JSON object"),
    (api.parse_completion, {"prompt": "hi"}, "model", "missing required field 'model'"),
    (api.parse_completion, {"model": "m"}, "prompt", "missing required field 'prompt'"),
    (api.parse_chat, {"model": "m"}, "messages", "missing required field 'messages'"),
    (api.parse_chat, chat(messages=[]), "messages", "at least 1"),
    (api.parse_chat, chat(messages=[{"role": "robot", "content": "x"}]), "messages.[0].role", "'user'"),
    (api.parse_chat, chat(messages=[{"role": "user"}]), "messages.[0].content", "missing required field"),
    (api.parse_chat, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages.[0].content", "only text content parts"),
    (api.parse_completion, completion(prompt=["a", "b"]), "prompt", "only one prompt per request"),
    (api.parse_completion, completion(prompt=[[1], [2]]), "prompt", "only one prompt per request"),
    (api.parse_completion, completion(prompt=5), "prompt", "expected str or list[int]"),
    (api.parse_chat, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages.[0].content",
     "needs a 'text' field"),
    (api.parse_completion, completion(n=17), "n", "n must be in [1, 16]"),
    (api.parse_chat, chat(n=0), "n", "n must be in [1, 16]"),
    (api.parse_completion, completion(prompt=[1, True]), "prompt", "expected str or list[int]"),
    (api.parse_completion, completion(echo=True), "echo", "not supported"),
    (api.parse_completion, completion(best_of=2), "best_of", "not supported"),
    (api.parse_chat, chat(tools=[{"type": "function"}]), "tools", "not supported"),
    (api.parse_chat, chat(top_logprobs=3), "top_logprobs", "needs logprobs=true"),
    (api.parse_completion, completion(seed=2**64), "seed", "less than"),
    (api.parse_completion, completion(stop=5), "stop", "expected str or list[str]"),
    (api.parse_completion, completion(temperature="hot"), "temperature", "temperature: "),
])
def test_bad_bodies_are_400s_naming_the_field(parse, body, param, fragment):
    err = refused(parse, body)
    assert (err.status, err.type, err.param) == (400, "invalid_request_error", param)
    assert fragment in err.message
    assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error",
                                    "param": param, "code": None}}


def test_unknown_fields_and_unused_defaults_are_accepted():
    req = api.parse_completion(json.dumps(completion(foo=1, echo=False, logit_bias={}, best_of=1)).encode())
    assert req.prompt == "hi there" and req.max_tokens == 16 and req.temperature == 1.0
    assert api.parse_completion(completion(prompt=[[5, 6]])).prompt == [5, 6]
    assert api.parse_completion(completion(prompt=["one"])).prompt == "one"
    assert api.parse_chat(chat(n=None, logprobs=None)).n is None
    msg = api.parse_chat(chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                     {"type": "text", "text": "b"}]}]))
    assert msg.messages[0].content == "a\nb"


def test_error_helpers_carry_status_type_code_and_retry_after():
    nf = api.not_found_model("x", ["b", "a"])
    assert (nf.status, nf.type, nf.param, nf.code) == (404, "not_found_error", "model", "model_not_found")
    assert "'x'" in nf.message and "['a', 'b']" in nf.message
    auth = api.unauthorized()
    assert (auth.status, auth.type, auth.headers()) == (401, "authentication_error", {})
    slow = api.too_many_requests(2.2)
    assert (slow.status, slow.type, slow.retry_after_s, slow.headers()) == (429, "rate_limit_error", 2.2,
                                                                           {"Retry-After": "3"})
    assert api.server_error("boom").body()["error"]["type"] == "server_error"


# ---- sampling ------------------------------------------------------------------------------------

def test_sampling_fields_map_with_openai_defaults():
    p = api.to_sampling_params(api.parse_completion(completion(stop="x", stop_token_ids=[7], top_k=-1, seed=3,
                                                               logprobs=2, ignore_eos=True)))
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed) == (1.0, 1.0, 0, 16, 3)
    assert (p.stop, p.stop_token_ids, p.logprobs, p.ignore_eos) == (("x",), (7,), 2, True)
    assert api.to_sampling_params(api.parse_completion(completion(temperature=0))).greedy
    q = api.to_sampling_params(api.parse_chat(chat(max_completion_tokens=5, logprobs=True, top_logprobs=3)))
    assert (q.max_tokens, q.logprobs) == (5, 3)
    assert api.to_sampling_params(api.parse_chat(chat(logprobs=True))).logprobs == 0
    assert api.to_sampling_params(api.parse_chat(chat())).logprobs is None


def test_a_models_generation_config_replaces_the_defaults_a_request_leaves_unset(tmp_path):
    from replicas.config import ModelSpec

    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.2, "top_p": 0.9, "top_k": None,
                                                                 "do_sample": True, "eos_token_id": 2}))
    defaults = ModelSpec(name="m", path=str(tmp_path)).sampling_defaults()
    assert defaults == {"temperature": 0.2, "top_p": 0.9}
    p = api.to_sampling_params(api.parse_chat(chat()), defaults=defaults)
    assert (p.temperature, p.top_p, p.top_k) == (0.2, 0.9, 0)
    q = api.to_sampling_params(api.parse_chat(chat(temperature=1.0, top_p=0.5)), defaults=defaults)
    assert (q.temperature, q.top_p) == (1.0, 0.5)  # set by the request, even to the API's own default
    assert ModelSpec(name="r", architecture="tiny-llama").sampling_defaults() == {}


@pytest.mark.parametrize("parse, body, param", [
    (api.parse_completion, completion(top_p=0), "top_p"),
    (api.parse_completion, completion(temperature=-1), "temperature"),
    (api.parse_completion, completion(top_k=-3), "top_k"),
    (api.parse_completion, completion(max_tokens=0), "max_tokens"),
    (api.parse_completion, completion(logprobs=21), "logprobs"),
    (api.parse_completion, completion(stop=["ok", ""]), "stop"),
    (api.parse_chat, chat(max_completion_tokens=0), "max_completion_tokens"),
    (api.parse_chat, chat(logprobs=True, top_logprobs=21), "top_logprobs"),
])
def test_engine_rejections_become_400s_naming_the_request_field(parse, body, param):
    err = refused(api.to_sampling_params, parse(body))
    assert (err.status, err.type, err.param) == (400, "invalid_request_error", param)
    assert err.message.startswith(param)


def test_max_tokens_is_fitted_to_the_context():
    fit = api.to_sampling_params
    assert fit(api.parse_chat(chat()), context_len=100, num_prompt_tokens=30).max_tokens == 70
    assert fit(api.parse_chat(chat()), context_len=None).max_tokens == api.FALLBACK_MAX_TOKENS
    assert fit(api.parse_completion(completion()), context_len=20, num_prompt_tokens=10).max_tokens == 10
    assert fit(api.parse_completion(completion(max_tokens=None)), 20, 4).max_tokens == 16
    err = refused(fit, api.parse_completion(completion(max_tokens=11)), context_len=20, num_prompt_tokens=10)
    assert (err.status, err.param) == (400, "max_tokens") and "context of 20 tokens" in err.message
    err = refused(fit, api.parse_chat(chat(max_completion_tokens=99)), context_len=20, num_prompt_tokens=10)
    assert err.param == "max_completion_tokens"
    assert refused(fit, api.parse_chat(chat()), context_len=20, num_prompt_tokens=20).param == "messages"
    assert refused(fit, api.parse_completion(completion()), context_len=20, num_prompt_tokens=25).param == "prompt"


# ---- prompts -------------------------------------------------------------------------------------

def test_completion_prompts_pass_ids_through_and_need_a_tokenizer_for_text():
    assert api.completion_prompt_ids(api.parse_completion(completion(prompt=[4, 5])), None) == [4, 5]
    assert api.completion_prompt_ids(api.parse_completion(completion()), make_tokenizer()) == ids("hi", "there")
    err = refused(api.completion_prompt_ids, api.parse_completion(completion()), None)
    assert (err.status, err.param, err.message) == (400, "prompt", "model 'm' has no tokenizer; send token ids")
    assert refused(api.completion_prompt_ids, api.parse_completion(completion(prompt=[])), None).param == "prompt"


def test_chat_without_a_template_is_a_400_and_random_models_get_the_role_template():
    req = api.parse_chat(chat(messages=[{"role": "system", "content": "you are kind"},
                                        {"role": "user", "content": "hi"}]))
    text = api.render_chat([m.model_dump() for m in req.messages])  # ROLE_TEMPLATE
    assert text == "<|system|>\nyou are kind\n<|user|>\nhi\n<|assistant|>\n"
    assert api.chat_prompt_ids(req, make_tokenizer(api.ROLE_TEMPLATE)) == ids(
        "<|system|>", "you", "are", "kind", "<|user|>", "hi", "<|assistant|>")
    err = refused(api.chat_prompt_ids, req, make_tokenizer())
    assert (err.status, err.param) == (400, "messages") and "has no chat template" in err.message
    assert refused(api.chat_prompt_ids, req, None).param == "messages"


def test_chat_with_a_jinja_template_renders_it_with_bos_and_generation_prompt():
    req = api.parse_chat(chat(messages=[{"role": "user", "content": "hi there"}]))
    text = api.render_chat([{"role": "user", "content": "hi there"}], CHATML, "<s>", "</s>")
    assert text == "<s><|im_start|>user\nhi there <|im_end|>\n<|im_start|>assistant\n"
    assert api.chat_prompt_ids(req, make_tokenizer(CHATML)) == [1] + ids(
        "<|im_start|>user", "hi", "there", "<|im_end|>", "<|im_start|>assistant")


def test_template_refusals_are_400s_and_broken_templates_500s():
    strict = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}ok"
    err = refused(api.chat_prompt_ids, api.parse_chat(chat()), make_tokenizer(strict))
    assert (err.status, err.param) == (400, "messages") and "system first" in err.message
    for broken in ["{% for %}", "{{ messages[0]['content'] + 1 }}"]:  # does not compile; fails to render
        err = refused(api.chat_prompt_ids, api.parse_chat(chat()), make_tokenizer(broken))
        assert (err.status, err.type) == (500, "server_error")


# ---- responses -----------------------------------------------------------------------------------

def detok(token_ids) -> str:
    return "".join(f"<{t}>" for t in token_ids)


def test_completion_response_and_chunks_are_valid_openai_objects():
    lp = api.completion_logprobs([5, 6], [{5: -0.1, 9: -2.0}, {6: -math.inf, 5: -0.5}], 2, detok)
    assert lp == {"tokens": ["<5>", "<6>"], "token_logprobs": [-0.1, api.LOGPROB_FLOOR],
                  "top_logprobs": [{"<5>": -0.1, "<9>": -2.0}, {"<5>": -0.5, "<6>": api.LOGPROB_FLOOR}],
                  "text_offset": [0, 3]}
    resp = api.completion_response("m", "<5><6>", "length", 4, 2, lp, created=7)
    parsed = Completion.model_validate(resp)
    assert parsed.id.startswith("cmpl-") and parsed.object == "text_completion" and parsed.created == 7
    assert parsed.usage.total_tokens == 6 and parsed.choices[0].logprobs.text_offset == [0, 3]
    chunk = api.completion_chunk("m", "x", request_id="cmpl-1", created=7)
    assert chunk["choices"][0]["finish_reason"] is None  # the SDK type demands a reason; OpenAI sends null
    Completion.model_validate(api.completion_chunk("m", "", "stop", request_id="cmpl-1", created=7))
    usage = Completion.model_validate(api.usage_chunk("completion", "m", 4, 2, request_id="cmpl-1", created=7))
    assert usage.choices == [] and usage.usage.completion_tokens == 2


def test_chat_response_and_stream_are_valid_openai_objects():
    lp = api.chat_logprobs([5], [{5: -0.1, 9: -2.0, 3: -3.0}], 2, detok)
    resp = ChatCompletion.model_validate(api.chat_response("m", "hello", "stop", 3, 1, lp))
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content == "hello"
    top = resp.choices[0].logprobs.content[0]
    assert (top.token, top.logprob, top.bytes) == ("<5>", -0.1, list(b"<5>"))
    assert [t.token for t in top.top_logprobs] == ["<5>", "<9>"]
    rid, created = api.new_request_id("chatcmpl"), 11
    stream = [api.chat_chunk("m", "", first=True, request_id=rid, created=created),
              api.chat_chunk("m", "hel", request_id=rid, created=created),
              api.chat_chunk("m", "lo", "stop", request_id=rid, created=created),
              api.usage_chunk("chat", "m", 3, 2, request_id=rid, created=created)]
    chunks = [ChatCompletionChunk.model_validate(json.loads(api.sse(c)[6:])) for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:3]) == "hello"
    assert [c.choices[0].finish_reason for c in chunks[:3]] == [None, None, "stop"]
    assert chunks[3].choices == [] and chunks[3].usage.total_tokens == 5
    assert {c.id for c in chunks} == {rid} and all(c.object == "chat.completion.chunk" for c in chunks)


def test_sse_frames():
    assert api.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert api.SSE_DONE == b"data: [DONE]\n\n"


def test_sse_frames_survive_clients_that_split_lines_at_unicode_line_breaks():
    """A random-weight model once generated U+0085 / U+2028 text: raw in the JSON, httpx's aiter_lines
    cut the event there (1 request in 8000 failed in bench_serve). They go escaped."""
    text = "a\x85b\u2028c\u2029d\u00e9\n\r\x1c\x1d\x1e\x0b\x0c"
    frame = api.sse({"text": text}).decode()
    lines = frame.splitlines()
    assert lines == [frame[:-2], ""] and json.loads(lines[0][6:]) == {"text": text} and "é" in frame


# ---- stop strings --------------------------------------------------------------------------------

def test_trim_cuts_at_the_stop_string_that_completes_first():
    assert api.trim_stop("hello world", ["wor"]) == "hello "
    assert api.trim_stop("hello", ["xyz"]) == "hello"
    assert api.trim_stop("abcd", ["abcd", "bc"]) == "a"  # "bc" completes before "abcd" does
    assert api.trim_stop("xabc", ["abc", "bc"]) == "x"  # both end together: the earlier start wins


def test_streaming_holds_back_a_possible_stop_prefix_across_chunks():
    t = api.StopTrimmer(["</end>"])
    assert t.push("foo </") == "foo "
    assert t.push("en") == ""
    assert t.push("x more") == "</enx more"
    assert t.push(" </e") == " "
    assert t.push("nd> tail") == "" and t.stopped
    assert t.push("late") == "" and t.flush() == ""
    u = api.StopTrimmer(["</end>"])
    assert u.push("done </e") == "done " and u.flush() == "</e" and not u.stopped


def test_include_stop_str_in_output_keeps_the_stop_string_and_drops_what_follows():
    assert api.trim_stop("hello world!", ["wor"], include=True) == "hello wor"
    assert api.trim_stop("abcd", ["abcd", "bc"], include=True) == "abc"


@settings(max_examples=300, deadline=None)
@given(text=st.text("abc", max_size=30), stops=st.lists(st.text("abc", max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8), include=st.booleans())
def test_streamed_pieces_concatenate_to_the_non_streaming_trim(text, stops, cuts, include):
    bounds = [0, *sorted(cuts), len(text)]
    trimmer = api.StopTrimmer(stops, include)
    pieces = [trimmer.push(text[a:b]) for a, b in itertools.pairwise(bounds)]
    out = "".join(pieces) + trimmer.flush()
    assert out == api.trim_stop(text, stops, include)
    assert trimmer.stopped == any(s and s in text for s in stops)  # empty stop strings are ignored
    if not include:
        assert not any(s and s in out for s in stops)


# What vLLM users send that would change the output and is not implemented: a 400 naming it, never
# a 200 answering another request than the one sent.
REFUSED_FIELDS = {
    "allowed_token_ids": [5],
    "bad_words": ["x"], "guided_json": {"type": "object"}, "guided_regex": "a+", "guided_choice": ["a"],
    "guided_grammar": "root ::= 'a'", "structured_outputs": {"json": {}}, "use_beam_search": True,
    "length_penalty": 2.0, "prompt_logprobs": 1, "truncate_prompt_tokens": 8, "logits_processors": ["x"],
}


@pytest.mark.parametrize("field", sorted(REFUSED_FIELDS))
@pytest.mark.parametrize("parse, body", [(api.parse_completion, completion), (api.parse_chat, chat)])
def test_fields_that_would_change_the_output_and_are_not_implemented_are_400s(field, parse, body):
    err = refused(parse, body(**{field: REFUSED_FIELDS[field]}))
    assert (err.status, err.param) == (400, field) and "not supported" in err.message
    parse(body(**{field: None}))  # null, like the default, is fine


def test_request_size_nesting_and_stop_strings_are_bounded():
    assert refused(api.parse_completion, b" " * (api.MAX_BODY_BYTES + 1)).status == 413
    deep = b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # 200 kB: under the size limit
    err = refused(api.parse_completion, deep)
    assert err.status == 400 and "nested too deeply" in err.message
    for stop in (["x"] * (api.MAX_STOP_STRINGS + 1), ["y" * (api.MAX_STOP_CHARS + 1)]):
        with pytest.raises(api.ApiError, match="stop strings"):
            api.to_sampling_params(api.parse_completion(completion(stop=stop)))


def test_the_response_builders_conform_to_the_published_schema():
    from replicas.service import openapi

    lp = {"tokens": ["a"], "token_logprobs": [-0.5], "top_logprobs": [{"a": -0.5}], "text_offset": [0]}
    openapi.CompletionResponse.model_validate(api.completion_response("m", "hi", "length", 3, 2, lp))
    openapi.ChatCompletionResponse.model_validate(api.chat_response("m", "hi", "stop", 3, 2))
    openapi.ErrorResponse.model_validate(api.invalid("bad", "stop").body())
    doc = openapi.build(make_app_for_schema())
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert body.rsplit("/", 1)[1] in doc["components"]["schemas"]


def make_app_for_schema():
    from replicas.config import default_config
    from replicas.service.ingress import OpenAIFrontend, make_app

    return make_app(OpenAIFrontend(default_config(), lambda *args, **kwargs: None))
