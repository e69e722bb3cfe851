"""One request can never hurt another: each kind of per-request failure (sampling, logprobs, the
stop check) and a failure of the shared step, forced while a long greedy stream of another tenant
runs on the same engine. The bad request gets its error; the stream ends with exactly the tokens it
has alone; the pool's pages return to their owners."""

from __future__ import annotations

import pytest
import torch

from replicas.engine.sampling import SamplingParams
from replicas.engine.sequence import FinishReason

pytest.importorskip("transformers")
from tests.unit.hf_reference import make_config  # noqa: E402
from tests.unit.test_engine import add_tenant, make_engine  # noqa: E402

LONG = SamplingParams(max_tokens=60, ignore_eos=True)
STREAM_PROMPT = [5, 17, 33, 9, 70]


class RaisingDecoder:
    """A tokenizer whose decode raises: a stop check that fails (stop strings need decoding)."""

    def decode(self, ids):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "forced by the test")


def alone() -> list[int]:
    engine = make_engine()
    add_tenant(engine, "stream", make_config("llama_gqa"), seed=3)
    return engine.generate("stream", [STREAM_PROMPT], LONG)[0]


@pytest.fixture(scope="module")
def want():
    return alone()


def make_pair(bad_tokenizer=None):
    engine = make_engine()
    add_tenant(engine, "stream", make_config("llama_gqa"), seed=3)
    add_tenant(engine, "bad", make_config("opt"), seed=4, tokenizer=bad_tokenizer)
    return engine, engine.memory.pool.num_free


@pytest.mark.parametrize("kind", ["sampling", "logprobs", "stop check", "penalty"])
def test_a_request_that_fails_on_its_own_fails_alone(kind, want):
    engine, free = make_pair(RaisingDecoder() if kind == "stop check" else None)
    stream_id = engine.add_request("stream", STREAM_PROMPT, LONG)
    engine.step()
    params = {"sampling": SamplingParams(max_tokens=20, temperature=0.8, seed=1),
              "logprobs": SamplingParams(max_tokens=20, logprobs=5),
              "stop check": SamplingParams(max_tokens=20, stop=("never",)),
              "penalty": SamplingParams(max_tokens=20, logit_bias={3: 1.0})}[kind]
    bad_id = engine.add_request("bad", [8, 99, 3], params)
    seq = engine.sequence(bad_id)
    if kind == "sampling":
        seq.generator = "not a generator"  # torch.multinomial raises for this request only
    if kind == "logprobs":
        object.__setattr__(seq.params, "logprobs", 10_000)  # more than the vocabulary: topk raises
    if kind == "penalty":
        object.__setattr__(seq.params, "logit_bias", ((10_000, 1.0),))  # past the vocabulary: indexing raises
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
        engine.memory.check_integrity()
    bad = engine.sequence(bad_id)
    assert bad.finish_reason is FinishReason.ERROR and {"penalty": "adjustment"}.get(kind, kind.split()[0]) in bad.error
    assert [o.error for o in outputs if o.seq_id == bad_id and o.finished] == [bad.error]
    assert engine.sequence(stream_id).output_token_ids == want
    assert engine.memory.pool.num_free == free  # every page back


def test_a_failed_shared_step_fails_its_batch_alone_and_the_engine_goes_on(want):
    engine, free = make_pair()
    stream_id = engine.add_request("stream", STREAM_PROMPT, LONG)
    engine.step()
    bad_id = engine.add_request("bad", [8, 99, 3], SamplingParams(max_tokens=20))
    real = engine.executor.execute

    def execute(output, seqs, ring):  # the "bad" tenant's first step blows up inside the model
        if output.model == "bad":
            engine.executor.execute = real
            raise RuntimeError("CUDA error: an illegal memory access was encountered (forced)")
        return real(output, seqs, ring)

    engine.executor.execute = execute
    while engine.has_unfinished():
        engine.step()
        engine.memory.check_integrity()
    bad = engine.sequence(bad_id)
    assert bad.finish_reason is FinishReason.ERROR and "illegal memory access" in bad.error
    assert engine.sequence(stream_id).output_token_ids == want
    assert engine.memory.pool.num_free == free
    again = engine.add_request("bad", [8, 99, 3], SamplingParams(max_tokens=5))  # the tenant still serves
    while engine.has_unfinished():
        engine.step()
    assert len(engine.sequence(again).output_token_ids) == 5


@pytest.mark.parametrize("temperature", [1e-39, 1e-6, 5e-324])
def test_a_tiny_temperature_samples_greedily(temperature):
    engine, _ = make_pair()
    tiny = engine.generate("bad", [[8, 99, 3]], SamplingParams(max_tokens=12, temperature=temperature, seed=0))
    greedy = engine.generate("bad", [[8, 99, 3]], SamplingParams(max_tokens=12))
    assert tiny == greedy


def test_sampling_at_a_small_temperature_above_the_floor_stays_finite():
    from replicas.engine.sampling import sample

    logits = torch.tensor([[1e4, -1e4, 0.0, 3.0]])
    params = [SamplingParams(temperature=2e-5, max_tokens=1)]
    tokens, _, failed = sample(logits, params, [torch.Generator().manual_seed(0)])
    assert failed == {} and tokens.tolist() == [0]
