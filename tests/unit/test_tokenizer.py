"""Tokenizer from a model folder, and stop strings in the engine (with a tokenizer the test builds)."""

from __future__ import annotations

import json

import pytest

from replicas.engine.sampling import InvalidRequest, SamplingParams
from replicas.engine.tokenizer import Tokenizer
from tests.unit.test_engine import LLAMA, PROMPTS, add_tenant, make_engine

tokenizers = pytest.importorskip("tokenizers")


def write_word_tokenizer(folder, vocab_size: int = 112) -> None:
    """A word-level tokenizer: token i <-> word 'wi', words separated by spaces; '</s>' is eos."""
    vocab = {f"w{i}": i for i in range(vocab_size)} | {"</s>": 2}
    del vocab["w2"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": "{{ x }}"}))


def test_tokenizer_round_trips_and_reads_special_ids(tmp_path):
    write_word_tokenizer(tmp_path)
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.encode("w5 w17 w33") == [5, 17, 33]
    assert tok.decode([5, 17, 33]) == "w5 w17 w33"
    assert tok.eos_token_id == 2 and tok.chat_template == "{{ x }}"


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_generation_stops_at_the_token_that_completes_a_stop_string(tmp_path):
    write_word_tokenizer(tmp_path)
    tok = Tokenizer.from_folder(tmp_path)
    engine = make_engine()
    add_tenant(engine, "m", LLAMA, seed=3)
    engine_tok = make_engine()
    add_tenant(engine_tok, "m", LLAMA, seed=3, tokenizer=tok)  # same weights, now with a tokenizer
    free_run = engine.generate("m", [PROMPTS[0]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    # stop on the text of output tokens 4..5: generation must end right after token 5
    stop = tok.decode(free_run[4:6])
    seq = engine_tok.add_request("m", PROMPTS[0], SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop]))
    while engine_tok.has_unfinished():
        engine_tok.step()
    out = engine_tok.sequence(seq)
    first = next(i for i in range(len(free_run)) if stop in tok.decode(free_run[: i + 1]))
    assert out.output_token_ids == free_run[: first + 1]
    assert out.finish_reason.value == "stop"


def test_stop_strings_without_a_tokenizer_are_refused():
    engine = make_engine()
    add_tenant(engine, "m", LLAMA, seed=3)
    with pytest.raises(InvalidRequest, match="stop strings need a tokenizer"):
        engine.add_request("m", PROMPTS[0], SamplingParams(stop=["w5"]))


def test_stop_matching_decodes_only_the_tail_a_new_token_can_complete():
    """Byte-level ids; a two-character stop split over tokens is still found, 500 tokens in, and no
    decode call sees more than the tail (the old check decoded the whole output every token)."""
    from replicas.engine.sequence import Sequence

    seen = []

    def decode(ids):
        seen.append(len(ids))
        return bytes(ids).decode("utf-8", errors="replace")

    seq = Sequence(0, "m", [1], SamplingParams(max_tokens=1000, stop=("é!",)), 0.0, (), None, decode)
    text = ("abc" * 200).encode() + "xé!".encode()
    reasons = []
    for i, t in enumerate(text):
        seq.append_token(t, float(i))
        reasons.append(seq.check_stop())
    assert reasons[-1] is not None and all(r is None for r in reasons[:-1])
    assert max(seen) <= 4 * 2 + 4


TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}w10 {{ m['content'] }}"
            "{% else %}w11 {{ m['role'] }} {{ m['content'] | trim }}{% endif %} {{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}w12 assistant{% endif %}")
MESSAGES = [{"role": "system", "content": "w20 w21"}, {"role": "user", "content": "w30 w31 "},
            {"role": "assistant", "content": "w40"}, {"role": "user", "content": "w50"}]


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json", "a list of named templates"])
def test_chat_prompts_equal_hugging_faces_apply_chat_template(tmp_path, where):
    transformers = pytest.importorskip("transformers")
    from replicas.service import openai_api as api
    from replicas.config import ModelSpec

    write_word_tokenizer(tmp_path)
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.add_special_tokens(["<s>"])  # as in real folders: bos is an added token of tokenizer.json
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": "</s>", "bos_token": "<s>"}
    if where == "chat_template.jinja":
        (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    elif where == "tokenizer_config.json":
        config["chat_template"] = TEMPLATE
    else:
        config["chat_template"] = [{"name": "tool_use", "template": "w99"}, {"name": "default", "template": TEMPLATE}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ours = ModelSpec(name="m", path=str(tmp_path)).tokenizer()
    req = api.parse_chat({"model": "m", "messages": MESSAGES})
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    want = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert api.chat_prompt_ids(req, ours) == list(want)


def test_a_config_template_overrides_the_folder_and_a_folder_without_one_refuses_chat(tmp_path):
    from replicas.service import openai_api as api
    from replicas.config import ModelSpec

    write_word_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    req = api.parse_chat({"model": "m", "messages": [{"role": "user", "content": "w5"}]})
    with pytest.raises(api.ApiError, match="has no chat template"):
        api.chat_prompt_ids(req, ModelSpec(name="m", path=str(tmp_path)).tokenizer())
    (tmp_path / "mine.jinja").write_text("w7 {{ messages[0]['content'] }}")
    for template in (str(tmp_path / "mine.jinja"), "w7 {{ messages[0]['content'] }}"):
        spec = ModelSpec(name="m", path=str(tmp_path), chat_template=template)
        assert api.chat_prompt_ids(req, spec.tokenizer()) == [7, 5]


def test_a_config_without_architectures_is_read_from_its_model_type():
    from replicas.engine.models import ModelConfig
    from tests.unit.hf_reference import make_config

    hf = make_config("qwen2_tied")
    del hf["architectures"]
    assert ModelConfig.from_hf(hf).architecture == "Qwen2ForCausalLM"


def _metaspace_tokenizer() -> Tokenizer:
    """A SentencePiece-style tokenizer (Metaspace decoder: "▁" is a space, stripped before a call's
    first token) whose pieces include multi-byte characters and byte fallbacks."""
    from tokenizers import Tokenizer as Backend, decoders, models

    pieces = ["<unk>", "▁", "▁the", "▁é", "t", "he", "é", "日本", "▁語", "ab"]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    backend = Backend(models.BPE(vocab={p: i for i, p in enumerate(pieces + bytes_)}, merges=[], byte_fallback=True,
                                 unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    return Tokenizer(backend)


def _smollm2_tokenizer() -> Tokenizer:
    from replicas import pull

    folder = pull.pulled("smollm2")
    if folder is None:
        pytest.skip("SmolLM2 is not pulled here (`oneiros pull smollm2`)")
    return Tokenizer.from_folder(folder)


TOKENIZERS = {"byte-level": Tokenizer.byte_level, "metaspace": _metaspace_tokenizer, "smollm2": _smollm2_tokenizer}


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_incremental_pieces_add_up_to_the_whole_decode(kind):
    """Any ids, pushed in any chunks: the pieces concatenate to decode(all ids), and a piece never
    ends in half a character unless it is the last."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from replicas.engine.tokenizer import IncrementalDetokenizer

    tokenizer = TOKENIZERS[kind]()
    ids = st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=40)

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(ids, st.lists(st.integers(1, 4), min_size=40, max_size=40))
    def check(all_ids, sizes):
        text, pieces, at = IncrementalDetokenizer(tokenizer), [], 0
        for size in sizes:
            chunk, at = all_ids[at:at + size], at + size
            last = at >= len(all_ids)
            pieces.append(text.push(chunk, final=last))
            if last:
                break
        assert "".join(pieces) == tokenizer.decode(all_ids)
        assert not any(p.endswith("\ufffd") for p in pieces[:-1])

    check()


def test_incremental_decoding_reads_a_window_not_the_whole_stream():
    from replicas.engine.tokenizer import IncrementalDetokenizer

    tokenizer = Tokenizer.byte_level()
    lengths = []
    decode = tokenizer.decode
    tokenizer.decode = lambda ids, **kw: lengths.append(len(ids)) or decode(ids, **kw)
    text = IncrementalDetokenizer(tokenizer)
    ids = tokenizer.encode("a long stream of text " * 50)
    assert "".join(text.push([i]) for i in ids) == decode(ids)
    assert max(lengths) <= 2
