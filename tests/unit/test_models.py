"""The model forward pass against Hugging Face Transformers, token for token, through paged KV.

Every architecture variant gets tiny random weights (dummy_weights) loaded into both our CausalLM and
the Transformers model of the same config (eager attention, float32). Our KV cache is the memory
engine's real strided layout (ArenaBackend.kv_view), filled with NaN first so that reading a slot
nobody wrote shows up, and block tables are random, non-contiguous pages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from remap import BASE_SLAB, ArenaBackend, DeviceMemory, ModelId, SeqId, opaque, pack_layout, slab_views
from replicas.engine.models import (
    AttentionBatch,
    CausalLM,
    ModelConfig,
    ResidentWeights,
    attention,
    blocked_for_cpu,
    dummy_weights,
    load_hf_folder,
    ops,
    split_state_dict,
)
from replicas.engine.models.architecture import architecture_for
from replicas.engine.models.attention import StepMetadata
from replicas.engine.models.ops import linears, stacked

transformers = pytest.importorskip("transformers")
from tests.unit.hf_reference import KINDS, make_config, make_hf_model
from tests.unit.hf_reference import hf_greedy as reference_greedy  # noqa: E402  (needs transformers)

pytestmark = pytest.mark.unit

BLOCK = 4  # tokens per KV block: small, so short prompts span several pages
NUM_PAGES = 64
NUM_NEW = 20  # tokens generated per greedy check


@dataclasses.dataclass
class Setup:
    kind: str
    config: ModelConfig
    layers: list[dict[str, torch.Tensor]]
    base: dict[str, torch.Tensor]
    hf: object  # the Transformers model
    model: CausalLM

    def weights(self) -> ResidentWeights:
        return ResidentWeights(self.layers)


def make_setup(kind: str, seed: int = 0, **overrides) -> Setup:
    hf_config = make_config(kind, **overrides)
    config = ModelConfig.from_hf(hf_config)
    state = dummy_weights(config, seed)
    layers, base = split_state_dict(config, state)
    return Setup(kind, config, layers, base, make_hf_model(hf_config, state), CausalLM(config))


@pytest.fixture(scope="module", params=KINDS)
def setup(request) -> Setup:
    return make_setup(request.param)


def make_kv(config: ModelConfig, num_pages: int = NUM_PAGES, device: str = "cpu") -> torch.Tensor:
    """The memory engine's KV view (page stride > block size), every slot NaN until written."""
    g = config.kv_geometry()
    page_bytes = -(-(BLOCK * g.bytes_per_token + 1) // 256) * 256  # a tail after each block, like real pages
    per_page = (g.num_layers, 2, BLOCK, g.num_kv_heads, g.head_dim)
    view = ArenaBackend(num_pages, page_bytes, device).kv_view(ModelId("m"), per_page, g.dtype)
    return view.fill_(float("nan"))


def random_pages(num_blocks: int, seed: int) -> list[int]:
    """Distinct pages in no particular order (never ascending, so no hidden contiguity assumption)."""
    pages = torch.randperm(NUM_PAGES, generator=torch.Generator().manual_seed(seed))[:num_blocks].tolist()
    return pages[::-1] if pages == sorted(pages) else pages


def make_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 112, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def step(s: Setup, kv, tokens: Sequence[int], cached: int, table: list[int]) -> torch.Tensor:
    """One forward of one sequence; logits of its last token."""
    batch = AttentionBatch((len(tokens),), (cached,), (table,))
    return s.model.forward(torch.tensor(tokens, device=kv.device), batch, kv, s.weights(), s.base)[0]


def greedy(s: Setup, prompt: list[int], num_new: int = NUM_NEW, chunks: Sequence[int] = (), seed: int = 7) -> list[int]:
    """Greedy decoding through paged KV: the prompt in chunks of the given sizes (rest last), then 1 token a step."""
    kv = make_kv(s.config, device=s.base[next(iter(s.base))].device.type)
    table = random_pages(-(-(len(prompt) + num_new) // BLOCK), seed)
    sizes = [*chunks, len(prompt) - sum(chunks)]
    cached = 0
    for size in sizes:
        logits = step(s, kv, prompt[cached : cached + size], cached, table)
        cached += size
    out = [int(logits.argmax())]
    while len(out) < num_new:
        logits = step(s, kv, out[-1:], cached, table)
        cached += 1
        out.append(int(logits.argmax()))
    return out


def hf_greedy(s: Setup, prompt: list[int], num_new: int = NUM_NEW) -> list[int]:
    return reference_greedy(s.hf, prompt, num_new)


def hf_logits(s: Setup, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return s.hf(torch.tensor([tokens])).logits[0]


@pytest.fixture(params=["mkl", "onednn", "onednn_blocked"])
def matmul(request, monkeypatch):
    """The CPU GEMM that ops.project runs for these tiny weights: their own (F.linear, MKL), the one a
    mid-size model's weights take (oneDNN), or oneDNN on weights fused and blocked at load (what the
    engine stores for them on the CPU; `for_matmul` applies it)."""
    if request.param != "mkl":
        if ops._ONEDNN is None or (request.param == "onednn_blocked" and not opaque.AVAILABLE):
            pytest.skip("this torch has no oneDNN linear or no way to store its blocked layout")
        monkeypatch.setattr(ops, "ONEDNN_MIN_WEIGHT", 0)
    return request.param


def for_matmul(s: Setup, matmul: str) -> Setup:
    """The setup with its weights as the engine would store them for `matmul`."""
    if matmul != "onednn_blocked":
        return s
    layers, base = blocked_for_cpu(s.config, s.layers, s.base)
    assert any(t.is_mkldnn for t in layers[0].values()) and any("+" in n for n in layers[0])
    head = architecture_for(s.config).embedding if s.config.tie_word_embeddings else "lm_head.weight"
    assert base[head].is_mkldnn  # a tied head too: the embedding then reads its rows from the blocked bytes
    return dataclasses.replace(s, layers=layers, base=base)


_PLAIN_MAKE_KV = make_kv  # kv_index's "head_rows" swaps make_kv for the next function


def make_kv_of_head_rows(config: ModelConfig, num_pages: int = NUM_PAGES, device: str = "cpu") -> torch.Tensor:
    """make_kv's layout with one head's worth more between pages: a page stride that is a whole number
    of heads but not of tokens (KVRows.split > 1, as SmolLM2's 3 heads in 256 KB pages)."""
    like = _PLAIN_MAKE_KV(config, 1, device)
    per_page, dim = like.stride(0), like.shape[5]
    pages = torch.full((num_pages * (per_page + dim),), float("nan"), dtype=like.dtype, device=device)
    return pages.as_strided((num_pages, *like.shape[1:]), (per_page + dim, *like.stride()[1:]))


@pytest.fixture(params=["sdpa", "matmul"])
def decode_attention(request, monkeypatch):
    """How a decode group attends on the CPU: SDPA, or attention._decode_attention's matmuls (which the
    engine takes for larger groups on more than one thread)."""
    monkeypatch.setattr(attention, "_decode_by_matmul", lambda num_heads: request.param == "matmul")
    return request.param


@pytest.fixture(params=["rows", "head_rows", "pairs"])
def kv_index(request, monkeypatch):
    """How attention reads and writes the paged KV: single rows of its flat view (KVRows, where the
    layout allows, as every test layout does), a few rows of heads per token (a layout whose page
    stride is whole only in heads: split 2 or 4 for these models) or (page, slot) pairs (the
    fallback)."""
    if request.param == "pairs":
        monkeypatch.setattr(attention.KVRows, "of", staticmethod(lambda kv: None))
    if request.param == "head_rows":
        monkeypatch.setitem(globals(), "make_kv", make_kv_of_head_rows)
    return request.param


# ---- (a) prefill ---------------------------------------------------------------------------
def test_prefill_logits_of_every_position_match_transformers(setup, matmul, kv_index):
    setup = for_matmul(setup, matmul)
    prompt = make_prompt(13, seed=1)
    batch = AttentionBatch((13,), (0,), (random_pages(4, seed=2),))
    rows = torch.arange(13)
    ours = setup.model.forward(torch.tensor(prompt), batch, make_kv(setup.config), setup.weights(), setup.base, rows)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, hf_logits(setup, prompt), atol=1e-4, rtol=0)


# ---- (b), (c) greedy generation --------------------------------------------------------------
def test_greedy_decode_through_paged_kv_equals_transformers_generate(setup, matmul, kv_index, decode_attention):
    setup = for_matmul(setup, matmul)
    prompt = make_prompt(9, seed=3)
    assert greedy(setup, prompt) == hf_greedy(setup, prompt)


@pytest.mark.parametrize("chunks", [(5,), (3, 4)], ids=["2 chunks", "3 chunks"])
def test_chunked_prefill_generates_the_same_tokens(setup, chunks):
    prompt = make_prompt(11, seed=4)
    assert greedy(setup, prompt, num_new=8, chunks=chunks) == hf_greedy(setup, prompt, num_new=8)


# ---- (d) one step mixing prefills and decodes ----------------------------------------------------
def test_a_step_mixing_prefill_chunk_and_decodes_matches_each_sequence_alone(setup):
    # (cached tokens before the mixed step, new tokens in it): fresh prompt, decode, second chunk, decode
    shapes = [(0, 7), (5, 1), (6, 4), (10, 1)]
    seqs = [make_prompt(c + n, seed=10 + i) for i, (c, n) in enumerate(shapes)]
    kv = make_kv(setup.config)
    pages = random_pages(sum(-(-len(t) // BLOCK) for t in seqs), seed=5)
    tables, used = [], 0
    for t in seqs:
        nb = -(-len(t) // BLOCK)
        tables.append(pages[used : used + nb])
        used += nb
    for (cached, _), tokens, table in zip(shapes, seqs, tables):
        if cached:
            step(setup, kv, tokens[:cached], 0, table)
    batch = AttentionBatch([n for _, n in shapes], [c for c, _ in shapes], tables)
    new_ids = torch.tensor([tok for (c, _), t in zip(shapes, seqs) for tok in t[c:]])
    mixed = setup.model.forward(new_ids, batch, kv, setup.weights(), setup.base)

    assert mixed.shape == (4, setup.config.vocab_size)
    for i, ((cached, _), tokens, table) in enumerate(zip(shapes, seqs, tables)):
        alone = step(setup, kv, tokens[cached:], cached, table)  # rewrites the same slots
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed[i], hf_logits(setup, tokens)[-1], atol=1e-4, rtol=0)


def mixed_step(s: Setup, shapes: list[tuple[int, int]], seed: int = 5):
    """One forward over sequences of (cached, new) tokens, their cached parts written first; returns the
    step's logits, and each sequence's logits alone (the same step for that sequence only)."""
    seqs = [make_prompt(c + n, seed=10 + i) for i, (c, n) in enumerate(shapes)]
    kv = make_kv(s.config)
    pages = random_pages(sum(-(-len(t) // BLOCK) for t in seqs), seed=seed)
    tables, used = [], 0
    for t in seqs:
        tables.append(pages[used : used + -(-len(t) // BLOCK)])
        used += len(tables[-1])
    for (cached, _), tokens, table in zip(shapes, seqs, tables):
        if cached:
            step(s, kv, tokens[:cached], 0, table)
    batch = AttentionBatch([n for _, n in shapes], [c for c, _ in shapes], tables)
    new_ids = torch.tensor([tok for (c, _), t in zip(shapes, seqs) for tok in t[c:]])
    with CountCalls(*ATTENTION_CALLS) as calls:
        mixed = s.model.forward(new_ids, batch, kv, s.weights(), s.base)
    alone = [step(s, kv, tokens[c:], c, table) for (c, _), tokens, table in zip(shapes, seqs, tables)]
    return mixed, alone, calls.count // s.config.num_layers


class CountCalls(TorchFunctionMode):
    """Counts the calls of torch functions `targets` made inside the `with` block."""

    def __init__(self, *targets) -> None:
        super().__init__()
        self.targets, self.count = targets, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += any(func is t for t in self.targets)
        return func(*args, **(kwargs or {}))


MATMULS = tuple(f for f in (F.linear, ops._ONEDNN) if f is not None)  # what ops.project may call
ATTENTION_CALLS = (F.scaled_dot_product_attention, torch.softmax)  # one per attention call: SDPA, or the
# softmax of attention._decode_attention (decode groups on the CPU)


def test_kv_rows_view_the_pages_as_rows_where_every_stride_is_whole_rows():
    kv = make_kv(ModelConfig.from_hf(make_config("llama_gqa")))
    rows = attention.KVRows.of(kv)
    assert rows is not None and rows.flat.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()
    page, layer, slot = 3, 1, 2
    row = int(rows.token_rows(torch.tensor(page), torch.tensor(slot))) + rows.offsets(layer)[1]  # V
    kv[page, layer, 1, slot] = torch.arange(kv.shape[4] * kv.shape[5], dtype=kv.dtype).view(kv.shape[4:])
    assert torch.equal(rows.flat[row], kv[page, layer, 1, slot].flatten())
    unit, per_page = kv.shape[4] * kv.shape[5], kv[0].numel()
    odd = torch.zeros(kv.shape[0], per_page + 1)[:, :per_page].view(kv.shape)  # a page stride of no whole heads
    assert (per_page + 1) % unit and attention.KVRows.of(odd) is None
    heads = make_kv_of_head_rows(ModelConfig.from_hf(make_config("llama_gqa")))  # whole heads, not tokens
    split = attention.KVRows.of(heads)
    assert split.split == heads.shape[4] > 1 and split.flat.shape[1] == heads.shape[5]
    token = split.token_rows(torch.tensor([page]), torch.tensor([slot]))[0] + split.offsets(layer)[1]
    heads[page, layer, 1, slot] = torch.arange(unit, dtype=kv.dtype).view(kv.shape[4:])
    assert torch.equal(split.flat[token].flatten(), heads[page, layer, 1, slot].flatten())


@pytest.mark.parametrize("setup", ["llama_gqa", "mistral_window", "opt"], indirect=True)
def test_prefills_of_similar_size_share_one_attention_call_and_decodes_another(setup, decode_attention):
    mixed, alone, calls_per_layer = mixed_step(setup, [(0, 6), (2, 5), (0, 7), (4, 1), (9, 1), (1, 1)])
    assert calls_per_layer == 2
    for i, logits in enumerate(alone):
        torch.testing.assert_close(mixed[i], logits, atol=1e-5, rtol=0)


def test_decodes_of_different_lengths_in_one_step_give_transformers_logits(setup, decode_attention):
    shapes = [(5, 1), (9, 1), (2, 1)]  # (cached, new): the shorter contexts are masked in the shared call
    mixed, _, _ = mixed_step(setup, shapes)
    for i, (cached, new) in enumerate(shapes):
        want = hf_logits(setup, make_prompt(cached + new, seed=10 + i))[-1]
        torch.testing.assert_close(mixed[i], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("setup", ["llama_gqa", "mistral_window"], indirect=True)
def test_a_short_prefill_beside_a_long_one_gets_its_own_call_rather_than_padding(setup):
    # 3 x 30 x 30 padded against 30 x 30 + 2 x (2 x 2) real is more than twice the work: the long
    # prompt takes one short one along (2 x 30 x 30 <= 2 x 904), the other short one gets its own call
    mixed, alone, calls_per_layer = mixed_step(setup, [(0, 30), (0, 2), (0, 2), (20, 1)])
    assert calls_per_layer == 3
    for i, logits in enumerate(alone):
        torch.testing.assert_close(mixed[i], logits, atol=1e-5, rtol=0)


def test_a_steps_index_arrays_travel_to_the_device_as_views_of_one_buffer():
    meta = StepMetadata()
    at = [meta.add([3, 1, 4]), meta.add([[1, 5], [9, 2]]), meta.add([])]
    sent = meta.send(torch.device("cpu"))
    assert [t.tolist() for t in (sent[i] for i in at)] == [[3, 1, 4], [[1, 5], [9, 2]], []]
    assert len({t.untyped_storage().data_ptr() for t in sent}) == 1


def test_attention_backends_other_than_torch_are_refused_where_they_cannot_run():
    s = make_setup("llama_gqa")
    batch = AttentionBatch((5,), (0,), (random_pages(2, seed=1),))
    ids = torch.tensor(make_prompt(5, seed=1))
    for backend, why in (("flashinfer", "needs a CUDA device"), ("xformers", "unknown attention backend")):
        with pytest.raises(ValueError, match=why):
            CausalLM(s.config, attention_backend=backend).forward(ids, batch, make_kv(s.config), s.weights(), s.base)


# ---- (e) the checks above prove something -----------------------------------------------------
# Post-LN OPT with tied embeddings collapses on random weights (seeds 0-3: 1, 4, 1, 1 distinct tokens
# of 20); its prefill and mixed-step checks compare logits, so they do not lean on variety.
@pytest.mark.parametrize("setup", [k for k in KINDS if k != "opt_post_ln"], indirect=True)
def test_dummy_weights_make_greedy_output_varied_not_one_repeated_token(setup):
    tokens = hf_greedy(setup, make_prompt(9, seed=3))
    assert len(set(tokens)) >= 3, f"{setup.kind}: degenerate output {tokens}"


def test_dummy_weights_are_deterministic_per_seed_with_norms_near_one():
    config = ModelConfig.from_hf(make_config("llama_gqa"))
    a, b, c = dummy_weights(config, 0), dummy_weights(config, 0), dummy_weights(config, 1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    norm = a["model.layers.0.input_layernorm.weight"]
    assert 0.5 < norm.mean() < 1.5 and norm.std() > 0.05
    tied = ModelConfig.from_hf(make_config("qwen2_tied"))
    assert "lm_head.weight" in a and "lm_head.weight" not in dummy_weights(tied, 0)


# ---- (f) loader ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind,shard", [("qwen2_tied", None), ("llama_gqa", "40KB"), ("opt", None)])
def test_load_hf_folder_round_trip_gives_the_same_logits(tmp_path, kind, shard):
    s = make_setup(kind, seed=3)
    s.hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    config, state = load_hf_folder(tmp_path)
    assert config == s.config
    layers, base = split_state_dict(config, state)
    loaded = dataclasses.replace(s, layers=layers, base=base, model=CausalLM(config))
    prompt, table = make_prompt(10, seed=6), random_pages(3, seed=6)
    want = step(s, make_kv(config), prompt, 0, table)
    torch.testing.assert_close(step(loaded, make_kv(config), prompt, 0, table), want)


# ---- weights come from the provider, one layer at a time -----------------------------------------
class RecordingWeights:
    """A LayerWeights fake that logs every get/release."""

    def __init__(self, layers):
        self.layers, self.log = layers, []

    def get(self, layer):
        self.log.append(("get", layer))
        return self.layers[layer]

    def release(self, layer):
        self.log.append(("release", layer))


def test_forward_fetches_each_layer_only_when_it_reaches_it_and_releases_it_after():
    s = make_setup("llama_gqa")
    weights = RecordingWeights(s.layers)
    batch = AttentionBatch((5,), (0,), (random_pages(2, seed=1),))
    s.model.forward(torch.tensor(make_prompt(5, seed=1)), batch, make_kv(s.config), weights, s.base)
    assert weights.log == [(op, i) for i in range(s.config.num_layers) for op in ("get", "release")]


def test_forward_releases_the_layer_even_when_it_fails():
    s = make_setup("llama_gqa")
    broken = [dict(layer) for layer in s.layers]
    del broken[1]["mlp.up_proj.weight"]
    weights = RecordingWeights(broken)
    batch = AttentionBatch((5,), (0,), (random_pages(2, seed=1),))
    with pytest.raises(KeyError):
        s.model.forward(torch.tensor(make_prompt(5, seed=1)), batch, make_kv(s.config), weights, s.base)
    assert weights.log[-1] == ("release", 1)


class PageWeights:
    """Layers read from the memory engine: resident slabs in place, reclaimed ones via a staging ring."""

    def __init__(self, mem: DeviceMemory, model: ModelId, ring):
        self.mem, self.model, self.ring = mem, model, ring

    def get(self, layer):
        if self.mem.params.is_resident(self.model, layer):
            return self.mem.params.tensors(self.model, layer)
        return self.ring.acquire(layer)

    def release(self, layer):
        if not self.mem.params.is_resident(self.model, layer):
            self.ring.release(layer)


def test_greedy_with_weights_and_kv_in_the_memory_engines_pages_matches_transformers(matmul):
    s = for_matmul(make_setup("llama_gqa"), matmul)
    mem = DeviceMemory(num_pages=160, page_size_bytes=4096)
    name = ModelId("tiny")
    kv_blocks = mem.register_model(name, s.layers, s.base, s.config.kv_geometry())
    mem.reclaim(name, 1)  # layer 1 streams through a staging slot
    ring = mem.open_stream(name, num_slots=1)
    seq, prompt = SeqId(0), make_prompt(9, seed=3)
    assert kv_blocks.alloc(seq, kv_blocks.num_blocks_for(len(prompt) + NUM_NEW)) is not None
    base = mem.params.tensors(name, BASE_SLAB)
    tokens, new, cached = [], prompt, 0
    while len(tokens) < NUM_NEW:
        ring.begin_pass([1])
        batch = AttentionBatch((len(new),), (cached,), (kv_blocks.table(seq),))
        logits = s.model.forward(torch.tensor(new), batch, kv_blocks.view, PageWeights(mem, name, ring), base)
        ring.finish()
        cached += len(new)
        new = [int(logits[0].argmax())]
        tokens += new
    mem.check_integrity()
    assert tokens == hf_greedy(s, prompt)


# per layer: q, k, v, o, gate, up, down; fused: qkv (Llama) and gate_up (both; Qwen2 packs q/k/v biases between)
@pytest.mark.parametrize("kind,matmuls_per_layer", [("llama_gqa", 4), ("qwen2_tied", 6), ("opt", 6)])
def test_projections_that_touch_in_a_slab_run_as_one_matmul_with_the_same_logits(kind, matmuls_per_layer):
    s = make_setup(kind)
    mem = DeviceMemory(num_pages=160, page_size_bytes=4096)
    name = ModelId("tiny")
    kv_blocks = mem.register_model(name, s.layers, s.base, s.config.kv_geometry())
    prompt = make_prompt(9, seed=3)
    kv_blocks.alloc(SeqId(0), kv_blocks.num_blocks_for(len(prompt)))
    batch = AttentionBatch((len(prompt),), (0,), (kv_blocks.table(SeqId(0)),))
    with CountCalls(*MATMULS) as slab_calls:
        got = s.model.forward(torch.tensor(prompt), batch, kv_blocks.view, PageWeights(mem, name, None),
                              mem.params.tensors(name, BASE_SLAB))
    with CountCalls(*MATMULS) as plain_calls:  # separate tensors: nothing to fuse
        want = step(s, make_kv(s.config), prompt, 0, random_pages(3, seed=1))
    per_layer = {"opt": 6}.get(kind, 7)  # and one lm_head
    assert plain_calls.count == s.config.num_layers * per_layer + 1
    assert slab_calls.count == s.config.num_layers * matmuls_per_layer + 1
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)


def test_project_takes_onednn_for_large_float32_weights_and_f_linear_otherwise():
    if ops._ONEDNN is None:
        pytest.skip("this torch has no oneDNN linear")
    rows = ops.ONEDNN_MIN_WEIGHT // 64
    slab = torch.randn(rows * 64 + 64) * 0.1
    weight, bias = slab[64:].view(rows, 64), slab[:rows]  # a view into a slab, as the engine passes it
    x = torch.randn(5, 64)
    for w, b, want in [(weight, bias, ops._ONEDNN), (weight[:-1], None, F.linear), (weight.double(), None, F.linear)]:
        with CountCalls(ops._ONEDNN) as calls:
            got = ops.project(x.to(w.dtype), w, b)
        assert calls.count == (want is ops._ONEDNN)
        torch.testing.assert_close(got, F.linear(x.to(w.dtype), w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1000, 256), (1001, 300), (33, 64)])  # rows padded to oneDNN's blocks too
def test_embedding_reads_rows_of_a_blocked_weight_in_place(shape):
    if ops._ONEDNN is None or not opaque.AVAILABLE:
        pytest.skip("this torch has no oneDNN linear or no way to store its blocked layout")
    plain = torch.randn(shape)
    blocked = ops._reorder(plain)
    ids = torch.tensor([0, shape[0] - 1, 7, 7, shape[0] // 2])
    with pytest.raises(ValueError, match="no verified row layout"):
        ops.embedding(ops._reorder(torch.randn(shape[0] + 64, shape[1])), ids)
    assert ops.blocked_rows(plain, blocked)
    assert torch.equal(ops.embedding(blocked, ids), plain[ids])
    in_slab = opaque.view(opaque.raw_bytes(blocked).clone(), shape, plain.dtype, opaque.describe(blocked))
    assert torch.equal(ops.embedding(in_slab, ids), plain[ids])  # bytes elsewhere, as a slab holds them
    assert not ops.blocked_rows(plain + 1, blocked)  # rows that differ from the plain weight: refused


def test_stacked_is_a_view_of_touching_tensors_and_none_otherwise():
    slab = torch.arange(40.0)
    a, b, c = slab[0:8].view(2, 4), slab[8:20].view(3, 4), slab[24:32].view(2, 4)
    fused = stacked([a, b])
    assert fused.shape == (5, 4) and fused.data_ptr() == a.data_ptr() and torch.equal(fused, slab[:20].view(5, 4))
    assert stacked([a, c]) is None  # a gap between them
    assert stacked([b, a]) is None  # wrong order
    assert stacked([a, slab[8:16].view(4, 2)]) is None  # another row width
    assert stacked([a, slab[8:20].clone().view(3, 4)]) is None  # another storage


def test_fused_projections_are_found_once_per_placement_of_a_slab():
    # rows of 64 floats: each tensor fills whole 256-byte alignment units, so they lie back to back
    tensors = {"q.weight": torch.randn(8, 64), "k.weight": torch.randn(4, 64), "v.weight": torch.randn(4, 64)}
    specs, size = pack_layout(tensors)
    data = torch.zeros(size, dtype=torch.uint8)
    views = slab_views(specs, data)
    for name, t in tensors.items():
        views[name].copy_(t)
    x, names = torch.randn(3, 64), ("q", "k", "v")
    got = linears(x, views, names, (8, 4, 4))
    weight, _ = views.derived[names]  # kept with the views: a slab placed elsewhere gets new ones
    assert weight.untyped_storage().data_ptr() == data.untyped_storage().data_ptr() and weight.shape == (16, 64)
    for out, name in zip(got, names):
        torch.testing.assert_close(out, x @ tensors[name + ".weight"].T)
    with CountCalls(*MATMULS) as calls:  # found again from the cache, still one matmul
        again = linears(x, views, names, (8, 4, 4))
    assert calls.count == 1 and all(torch.equal(a, b) for a, b in zip(got, again))
    assert slab_views(specs, data).derived == {}


# ---- config parsing and errors -----------------------------------------------------------------
def test_config_reads_transformers_4_and_5_layouts_alike():
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
    v4 = make_config("llama_gqa", rope_theta=5e5, rope_scaling=dict(type="llama3", **scaling), torch_dtype="bfloat16")
    v5 = make_config("llama_gqa", rope_parameters=dict(rope_type="llama3", rope_theta=5e5, **scaling), dtype="bfloat16")
    del v5["rope_theta"]
    a, b = ModelConfig.from_hf(v4), ModelConfig.from_hf(v5)
    assert a == b and a.rope_theta == 5e5 and a.rope_scaling.factor == 8.0 and a.dtype == torch.bfloat16


def test_config_fields_per_family():
    qwen = ModelConfig.from_hf(make_config("qwen2_tied", eos_token_id=[2, 5]))
    assert (qwen.qkv_bias, qwen.o_bias, qwen.tie_word_embeddings, qwen.eos_token_ids) == (True, False, True, (2, 5))
    mistral = ModelConfig.from_hf(make_config("mistral_window"))
    assert mistral.layer_windows == (8, 8) and mistral.num_kv_heads == 2
    opt = ModelConfig.from_hf(make_config("opt"))
    assert (opt.family, opt.head_dim, opt.intermediate_size, opt.hidden_act) == ("opt", 16, 128, "relu")
    sliding = make_config("qwen2_tied", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    qwen_sliding = ModelConfig.from_hf(sliding)
    assert qwen_sliding.layer_windows == (None, 8)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        ModelConfig.from_hf(make_config("llama_gqa", architectures=["GPT2LMHeadModel"]))


def test_unknown_rope_type_is_a_clear_error():
    with pytest.raises(ValueError, match="RoPE type 'yarn' is not supported"):
        ModelConfig.from_hf(make_config("llama_gqa", rope_scaling=dict(rope_type="yarn", factor=4.0)))


def test_opt_with_projected_embeddings_is_a_clear_error():
    with pytest.raises(ValueError, match="word_embed_proj_dim 32 != hidden_size 64"):
        ModelConfig.from_hf(make_config("opt", word_embed_proj_dim=32))


def test_split_state_dict_names_a_missing_or_extra_tensor():
    config = ModelConfig.from_hf(make_config("llama_gqa"))
    state = dummy_weights(config, 0)
    layers, base = split_state_dict(config, state)
    assert len(layers) == 3 and "self_attn.q_proj.weight" in layers[0] and "model.norm.weight" in base
    assert list(layers[0]) == list(layers[2]), "every layer packs the same names in the same order"
    with pytest.raises(ValueError, match="lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
        split_state_dict(config, {n: t for n, t in state.items() if n != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match="unexpected tensors.*model.extra"):
        split_state_dict(config, {**state, "model.extra": torch.zeros(1)})


def test_a_block_table_too_short_for_the_batch_is_a_clear_error():
    s = make_setup("opt")
    batch = AttentionBatch((9,), (0,), (random_pages(2, seed=1),))
    with pytest.raises(ValueError, match="9 tokens need 3 blocks of 4, table has 2"):
        s.model.forward(torch.tensor(make_prompt(9, seed=1)), batch, make_kv(s.config), s.weights(), s.base)


# ---- CUDA ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama_gqa", "mistral_window", "qwen2_tied", "opt"])
def test_prefill_and_greedy_on_cuda_match_transformers_on_cpu(kind):
    s = make_setup(kind)
    cuda = dataclasses.replace(
        s,
        layers=[{n: t.cuda() for n, t in layer.items()} for layer in s.layers],
        base={n: t.cuda() for n, t in s.base.items()},
    )
    prompt = make_prompt(9, seed=3)
    batch = AttentionBatch((9,), (0,), (random_pages(3, seed=7),))
    kv = make_kv(s.config, device="cuda")
    rows = torch.arange(9, device="cuda")
    logits = cuda.model.forward(torch.tensor(prompt, device="cuda"), batch, kv, cuda.weights(), cuda.base, rows)
    torch.testing.assert_close(logits.cpu(), hf_logits(s, prompt), atol=1e-3, rtol=0)  # cuBLAS may use TF32
    assert greedy(cuda, prompt) == hf_greedy(s, prompt)


@pytest.mark.parametrize("rows,dim", [(1, 64), (3, 576), (16, 768), (513, 2048)])
def test_rms_norm_in_float32_is_transformers_formula_bit_for_bit(rows, dim):
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(dim)) * 3
    weight = torch.randn(dim, generator=torch.Generator().manual_seed(rows)) * 0.2 + 1
    x32 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)  # LlamaRMSNorm.forward in float32
    assert torch.equal(ops.rms_norm(x, weight, 1e-5), weight * x32)
    assert torch.equal(F.rms_norm(x, (dim,), weight, 1e-5), weight * x32)  # what it takes for few rows
