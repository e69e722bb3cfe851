"""The sampling parameters vLLM users send, each against a reference: Hugging Face's logits
processors where one exists (repetition penalty, min_p, sequence bias, min new tokens), a plain-torch
reference for OpenAI's presence and frequency penalties, and greedy generation end to end against
Hugging Face `generate` with the same processors."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from replicas.engine.sampling import History, SamplingParams, adjust_logits, sample, warp

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as hf  # noqa: E402

from tests.unit.hf_reference import make_config, make_hf_model  # noqa: E402
from tests.unit.test_engine import add_tenant, make_engine  # noqa: E402

V = 50
G = torch.Generator().manual_seed(0)
LOGITS = torch.randn(3, V, generator=G) * 3
PROMPTS = [[1, 2, 3, 3], [7], [4, 4, 9]]
OUTPUTS = [[3, 5, 5, 5], [], [9, 11]]


def histories(stop_ids=()):
    return [History(p, o, stop_ids) for p, o in zip(PROMPTS, OUTPUTS)]


def test_repetition_penalty_equals_hugging_face():
    params = [SamplingParams(repetition_penalty=r) for r in (1.3, 0.7, 2.0)]
    got = adjust_logits(LOGITS, params, histories())
    for i, p in enumerate(params):
        ids = torch.tensor([PROMPTS[i] + OUTPUTS[i]])
        want = hf.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, LOGITS[i:i + 1].clone())
        assert torch.allclose(got[i], want[0])


def test_presence_and_frequency_penalties_equal_openais_formula():
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.3), SamplingParams(frequency_penalty=-1.0),
              SamplingParams(presence_penalty=2.0)]
    got = adjust_logits(LOGITS, params, histories())
    for i, p in enumerate(params):
        counts = torch.bincount(torch.tensor(OUTPUTS[i], dtype=torch.long), minlength=V).float()
        want = LOGITS[i] - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        assert torch.allclose(got[i], want)


def test_logit_bias_equals_hugging_faces_sequence_bias():
    bias = {3: 5.0, 17: -100.0, 40: 0.25}
    got = adjust_logits(LOGITS, [SamplingParams(logit_bias=bias)] * 3, histories())
    proc = hf.SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})
    for i in range(3):
        assert torch.allclose(got[i], proc(torch.tensor([PROMPTS[i] + OUTPUTS[i]]), LOGITS[i:i + 1].clone())[0])


def test_min_tokens_masks_the_stop_ids_like_hugging_faces_min_new_tokens():
    params = [SamplingParams(min_tokens=5, max_tokens=8)] * 3
    got = adjust_logits(LOGITS, params, histories(stop_ids=(2, 7)))
    for i in range(3):
        ids = torch.tensor([PROMPTS[i] + OUTPUTS[i]])
        proc = hf.MinNewTokensLengthLogitsProcessor(len(PROMPTS[i]), 5, eos_token_id=[2, 7])
        assert torch.equal(got[i], proc(ids, LOGITS[i:i + 1].clone())[0])


@pytest.mark.parametrize("min_p", [0.05, 0.3, 1.0])
def test_min_p_keeps_what_hugging_faces_min_p_keeps(min_p):
    for i in range(3):
        got = warp(LOGITS[i], SamplingParams(temperature=0.7, min_p=min_p)).softmax(-1)
        scores = hf.TemperatureLogitsWarper(0.7)(None, LOGITS[i:i + 1].clone())
        want = hf.MinPLogitsWarper(min_p)(None, scores).softmax(-1)[0]
        assert torch.allclose(got, want, atol=1e-6)


def test_untouched_rows_and_defaults_change_nothing():
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.5), SamplingParams()]
    got = adjust_logits(LOGITS, params, histories())
    assert torch.equal(got[0], LOGITS[0]) and torch.equal(got[2], LOGITS[2]) and not torch.equal(got[1], LOGITS[1])
    assert adjust_logits(LOGITS, [SamplingParams()] * 3, histories()) is LOGITS


def test_greedy_with_penalty_and_bias_equals_hugging_face_generate():
    config = make_config("llama_gqa")
    engine = make_engine()
    state = add_tenant(engine, "m", config, seed=3)
    prompt, bias = [5, 17, 33, 9, 70, 11, 4], {7: 2.5, 40: -3.0}
    params = SamplingParams(max_tokens=16, ignore_eos=True, repetition_penalty=1.3, logit_bias=bias)
    got = engine.generate("m", [prompt], params)[0]
    model = make_hf_model(config, state)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                             repetition_penalty=1.3, sequence_bias={(t,): b for t, b in bias.items()})
    assert got == out[0, len(prompt):].tolist()
    plain = engine.generate("m", [prompt], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert got != plain  # the processors did change the output


MIXED = [SamplingParams(temperature=0.8, seed=3), SamplingParams(), SamplingParams(temperature=1.2, top_k=7, seed=4),
         SamplingParams(temperature=0.6, top_p=0.8, min_p=0.02, seed=5), SamplingParams(temperature=1.0)]
READS = {"cpu", "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"}


class RecordOps(TorchFunctionMode):
    """(name, shapes of tensor arguments) of every torch call inside the `with` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        shapes = [tuple(a.shape) for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        self.ops.append((getattr(func, "__name__", str(func)), shapes))
        return func(*args, **(kwargs or {}))


def sample_rows(num_rows: int):
    """Tokens, and the torch calls sample() made, for num_rows rows cycling through MIXED."""
    params = [MIXED[i % len(MIXED)] for i in range(num_rows)]
    logits = torch.randn(num_rows, V, generator=torch.Generator().manual_seed(num_rows)) * 3
    with RecordOps() as record:
        tokens, _, failed = sample(logits, params, [torch.Generator().manual_seed(i) for i in range(num_rows)],
                                   list(range(num_rows)))
    assert failed == {}
    return tokens, record.ops


def test_sampling_runs_the_same_ops_for_five_rows_as_for_sixty_four_and_reads_back_once():
    _, few = sample_rows(len(MIXED))  # every knob once
    _, many = sample_rows(64)

    def over_the_vocabulary(ops):
        return [name for name, shapes in ops if any(s[-1:] == (V,) for s in shapes)]

    def reads(ops):  # a per-row .item() would be one per row; the host generators' scalar draws are 0-dim
        return [name for name, shapes in ops if name in READS and shapes and shapes[0] != ()]

    assert over_the_vocabulary(few) == over_the_vocabulary(many) and len(over_the_vocabulary(few)) < 40
    assert reads(few) == reads(many) and reads(few).count("cpu") == 1


def test_a_seeded_row_draws_the_same_token_alone_or_in_any_batch():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(9)) * 2
    params = [SamplingParams(temperature=1.0, top_p=0.95, seed=21)] + MIXED
    for position in range(20):
        alone, _, _ = sample(logits[:1], params[:1], [torch.Generator()], [position])
        batched, _, _ = sample(logits, params, [torch.Generator() for _ in params], [position] * len(params))
        again, _, _ = sample(logits.flip(0), params[::-1], [None] * len(params), [position] * len(params))
        assert alone[0] == batched[0] == again[-1]
    drawn = {int(sample(logits[:1], params[:1], [torch.Generator()], [p])[0][0]) for p in range(20)}
    assert len(drawn) > 3  # the position does move the draw


def test_a_row_with_non_finite_logits_fails_alone_and_gets_no_token():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(2))
    logits[1, 4] = float("nan")
    tokens, _, failed = sample(logits, [SamplingParams(temperature=0.7, seed=1)] * 3, [None] * 3, [0, 0, 0])
    assert list(failed) == [1] and "non-finite" in failed[1] and tokens[1] == -1
    assert tokens[0] >= 0 and tokens[2] >= 0


def test_bad_values_are_refused_with_the_field_named():
    for kw, fragment in [({"repetition_penalty": 0}, "repetition_penalty"), ({"presence_penalty": 3}, "presence"),
                         ({"min_p": 1.5}, "min_p"), ({"logit_bias": {1: 500}}, "logit_bias"),
                         ({"min_tokens": 20, "max_tokens": 5}, "min_tokens")]:
        with pytest.raises(ValueError, match=fragment):
            SamplingParams(**kw)
