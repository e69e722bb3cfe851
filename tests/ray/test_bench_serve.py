"""The pure parts of scripts/bench_serve.py: the seeded workload, percentiles, what counts as lost.
No Ray is started here (the `cluster` fixture is not used); the load run itself is the script."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

from replicas.service import openai_api as api

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_serve.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_serve", None)


MODELS = ["llama", "qwen", "opt"]


def test_workload_is_a_function_of_its_seed(bench):
    a = bench.make_workload(50, MODELS, seed=0, max_tokens=32)
    assert a == bench.make_workload(50, MODELS, seed=0, max_tokens=32)
    assert a != bench.make_workload(50, MODELS, seed=1, max_tokens=32)
    assert [r.index for r in a] == list(range(50))


def test_workload_stays_in_its_ranges_and_favours_the_first_tenant(bench):
    reqs = bench.make_workload(3000, MODELS, seed=0, max_tokens=7)
    lo_len, hi_len = bench.PROMPT_LEN_RANGE
    lo_id, hi_id = bench.TOKEN_ID_RANGE
    assert all(lo_len <= len(r.prompt_ids) <= hi_len and r.max_tokens == 7 for r in reqs)
    assert all(lo_id <= t <= hi_id for r in reqs for t in r.prompt_ids)
    counts = [sum(r.model == m for r in reqs) for m in MODELS]
    assert counts[0] > counts[1] > counts[2] > 0


def test_request_body_means_greedy_exactly_max_tokens_with_one_chunk_per_token(bench):
    req = bench.make_workload(1, MODELS, seed=3, max_tokens=9)[0]
    parsed = api.parse_completion(bench.request_body(req))
    params = api.to_sampling_params(parsed, 1024, len(req.prompt_ids))
    assert (params.max_tokens, params.temperature, params.ignore_eos, params.logprobs) == (9, 0.0, True, 0)
    assert parsed.stream and parsed.stream_options.include_usage and parsed.prompt == list(req.prompt_ids)


def test_percentile_interpolates_between_ranks(bench):
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [bench.percentile(xs, q) for q in (0, 25, 50, 100)] == [1.0, 2.0, 3.0, 5.0]
    assert bench.percentile([1.0, 2.0], 50) == 1.5
    assert bench.percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert bench.percentile([], 50) is None


def test_a_short_or_unfinished_stream_counts_as_failed(bench):
    R = bench.RequestResult
    ok = R(0, "llama", ttft_s=0.01, tbt_s=[0.002, 0.004], num_tokens=3, usage_tokens=3, finish_reason="length",
           start_s=0.0, end_s=1.0)
    short = R(1, "qwen", ttft_s=0.02, num_tokens=2, usage_tokens=2, finish_reason="length", start_s=0.0, end_s=2.0)
    no_usage = R(2, "opt", ttft_s=0.03, num_tokens=3, finish_reason="length", start_s=0.5, end_s=1.0)
    broken = R(3, "opt", error="APIError: boom", start_s=0.5, end_s=0.6)
    assert bench.check_result(ok, 3, need_usage=True) is None
    assert "2 tokens" in bench.check_result(short, 3, need_usage=True)
    assert bench.check_result(no_usage, 3, need_usage=False) is None
    assert "usage" in bench.check_result(no_usage, 3, need_usage=True)
    s = bench.summarize([ok, short, no_usage, broken], 3, need_usage=True)
    assert (s["num_ok"], s["num_failed"], s["num_tokens"]) == (1, 3, 3)
    assert s["p50_ttft_ms"] == pytest.approx(10.0) and s["p50_tbt_ms"] == pytest.approx(3.0)
    assert s["wall_s"] == 2.0 and s["tok_s"] == pytest.approx(1.5)
    assert set(s["failures"]) == {"1", "2", "3"}
    assert bench.ttft_ratio({"p50_ttft_ms": 12.0}, {"p50_ttft_ms": 10.0}) == pytest.approx(1.2)
    assert bench.ttft_ratio({"p50_ttft_ms": 12.0}, {"p50_ttft_ms": None}) is None
