"""replicas.bench: seeded workloads, the open-loop streaming client against an in-process fake OpenAI
server (httpx2.ASGITransport, no sockets), and the report's percentile and goodput arithmetic."""

from __future__ import annotations

import asyncio
import json
import pathlib
import time

import numpy as np
import pytest
from fastapi import FastAPI, Request  # module level: FastAPI resolves the string annotations here
from fastapi.responses import JSONResponse, StreamingResponse

from replicas.bench import report
from replicas.bench import workload as wl
from replicas.bench.client import RequestRecord, RequestResult, SseClient, replay, run_workload
from replicas.cli import main

AZURE_DIR = pathlib.Path(__file__).resolve().parents[3] / "shared/traces/azure-llm-2023"  # ../shared beside the checkout
FIRST_TOKEN_DELAY_S = 0.02


def make_record(index=0, tenant="t0", ok=True, ttft_s=0.1, tbt_s=(0.01, 0.03), start_s=0.0, e2e_s=1.0,
                output_tokens=3) -> RequestRecord:
    return RequestRecord(index, tenant, "m", ok, None if ok else "boom", 0.0, 0.0, start_s, start_s + e2e_s,
                         ttft_s, tuple(tbt_s), (e2e_s - ttft_s) / 2 if ttft_s is not None else None, e2e_s, 8,
                         output_tokens, 3)


# ---- workloads ---------------------------------------------------------------------------------

def test_a_workload_is_a_function_of_its_seed():
    a = wl.zipf_poisson(3, rate_per_s=20, duration_s=10, seed=1)
    assert a == wl.zipf_poisson(3, rate_per_s=20, duration_s=10, seed=1)
    assert a.requests != wl.zipf_poisson(3, rate_per_s=20, duration_s=10, seed=2).requests
    assert wl.gamma(3, 20, 10, cv=3, seed=1) == wl.gamma(3, 20, 10, cv=3, seed=1)


def test_poisson_workload_keeps_its_rate_lengths_and_zipf_order():
    prompt, output = wl.LengthDist("uniform", low=5, high=9), wl.LengthDist("fixed", value=7)
    w = wl.zipf_poisson(4, rate_per_s=50, duration_s=100, zipf_s=1.2, prompt_len=prompt, output_len=output, seed=0)
    arrivals = [r.arrival_s for r in w.requests]
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < 100
    assert len(w.requests) == pytest.approx(5000, rel=0.05)
    assert all(5 <= r.prompt_len <= 9 and r.output_len == 7 for r in w.requests)
    counts = list(wl.tenant_counts(w.requests).values())
    assert counts == sorted(counts, reverse=True) and len(counts) == 4
    share = np.array(counts) / sum(counts)
    assert share == pytest.approx(wl.zipf_weights(4, 1.2), abs=0.02)


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_gaps_have_the_asked_rate_and_coefficient_of_variation(cv):
    w = wl.gamma(2, rate_per_s=100, duration_s=200, cv=cv, seed=3)
    gaps = np.diff([r.arrival_s for r in w.requests])
    assert 1 / gaps.mean() == pytest.approx(100, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_lognormal_lengths_have_the_asked_mean_and_stay_clipped():
    rng = np.random.default_rng(0)
    xs = wl.LengthDist("lognormal", mean=200, sigma=0.5).sample(rng, 20000)
    assert xs.mean() == pytest.approx(200, rel=0.03)
    clipped = wl.LengthDist("lognormal", mean=200, sigma=2.0, max_len=300).sample(rng, 5000)
    assert clipped.min() >= 1 and clipped.max() == 300


def test_length_specs_parse_and_bad_ones_say_why():
    assert wl.LengthDist.parse("uniform:16:128:100") == wl.LengthDist("uniform", low=16, high=128, max_len=100)
    assert wl.LengthDist.parse("lognormal:50:0.8") == wl.LengthDist("lognormal", mean=50.0, sigma=0.8)
    for bad in ("fixed:0", "uniform:9:3", "zipf:3", "fixed", "lognormal:x:1"):
        with pytest.raises(ValueError, match="length"):
            wl.LengthDist.parse(bad)


def write_trace(path: pathlib.Path) -> pathlib.Path:
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n"
                    "2023-11-16 18:15:50.9951690,396,0\n"
                    "2023-11-16 18:15:46.1805900,5000,109\n")
    return path


def test_azure_reader_sorts_by_time_scales_gaps_and_clips_lengths(tmp_path):
    w = wl.azure_trace(write_trace(tmp_path / "t.csv"), tenants=2, seed=0, time_scale=0.5, max_prompt_len=4096)
    assert [r.arrival_s for r in w.requests] == pytest.approx([0.0, 0.25, 2.4072895])
    assert [(r.prompt_len, r.output_len) for r in w.requests] == [(4096, 109), (374, 44), (396, 1)]
    assert {r.tenant for r in w.requests} <= {"t0", "t1"}
    assert len(wl.azure_trace(tmp_path / "t.csv", tenants=2, max_requests=2).requests) == 2


def test_azure_reader_names_a_file_that_is_not_a_trace(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        wl.azure_trace(tmp_path / "x.csv", tenants=2)


@pytest.mark.skipif(not AZURE_DIR.is_dir(), reason=f"no Azure trace at {AZURE_DIR}")
def test_azure_reader_reads_the_real_code_trace():
    w = wl.azure_trace(AZURE_DIR / "AzureLLMInferenceTrace_code.csv", tenants=3, seed=0, max_requests=2000)
    assert len(w.requests) == 2000 and w.requests[0].arrival_s == 0.0
    assert all(r.prompt_len >= 1 and r.output_len >= 1 for r in w.requests)
    counts = list(wl.tenant_counts(w.requests).values())
    assert counts == sorted(counts, reverse=True)


def test_save_load_round_trip_keeps_requests_parameters_and_seed(tmp_path):
    w = wl.gamma(3, 5, 10, cv=2, output_len=wl.LengthDist("lognormal", mean=30, sigma=1), seed=7)
    wl.save(w, tmp_path / "w.json")
    back = wl.load(tmp_path / "w.json")
    assert back == w and back.params["cv"] == 2 and back.seed == 7
    (tmp_path / "result.json").write_text(json.dumps({"summary": {}, "workload": wl.to_json(w)}))
    assert wl.load(tmp_path / "result.json") == w


# ---- report arithmetic -------------------------------------------------------------------------

def test_percentile_interpolates_between_ranks():
    assert [report.percentile([5.0, 1.0, 4.0, 2.0, 3.0], q) for q in (0, 25, 50, 90, 100)] == [1, 2, 3, 4.6, 5]
    assert report.percentile([], 50) is None


def test_goodput_counts_ok_requests_within_both_slos():
    records = [make_record(0, "t0", ttft_s=0.1, tbt_s=(0.01, 0.03)),  # good
               make_record(1, "t0", ttft_s=0.6, tbt_s=(0.01, 0.01)),  # TTFT over
               make_record(2, "t1", ttft_s=0.1, tbt_s=(0.01, 0.09)),  # mean TBT 0.05 over
               make_record(3, "t1", ok=False, ttft_s=None, tbt_s=(), output_tokens=0),
               make_record(4, "t1", ttft_s=0.2, tbt_s=(), start_s=3.0, output_tokens=1)]  # good, no TBT
    s = report.summarize(records, slo_ttft_s=0.5, slo_tbt_s=0.04)
    assert s["wall_s"] == 4.0
    o = s["overall"]
    assert (o["num_requests"], o["num_ok"], o["num_good"]) == (5, 4, 2)
    assert o["good_fraction"] == 0.4 and o["goodput_req_s"] == 0.5 and o["output_tok_s"] == 10 / 4
    # TTFT of the ok ones: .1 .6 .1 .2 -> p50 .15; pooled TBT .01 x4, .03, .09 -> p99 = .03 + .95 * .06
    assert o["p50_ttft_ms"] == pytest.approx(150.0) and o["p99_tbt_ms"] == pytest.approx(87.0)
    assert s["by_tenant"]["t0"]["num_good"] == 1 and s["by_tenant"]["t1"]["good_fraction"] == pytest.approx(1 / 3)
    assert s["failures"] == {"3": "boom"}
    table = report.format_markdown(s, {"t0": "llama"})
    assert "| t0 (llama) |" in table and "| all |" in table and "40.0%" in table


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path):
    notes = []
    records = [make_record()]
    paths = report.write_plots(records, report.summarize(records, 1, 1), tmp_path, note=notes.append)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert paths == [] and "matplotlib" in notes[0]
    else:
        assert all(p.exists() for p in paths)


def test_sweep_plot_draws_every_policy_or_says_why_not(tmp_path):
    notes = []
    points = {f"rate={r}": {"recompute": {"p99_ttft_s": 2.0 * r}, "ours": {"p99_ttft_s": 1.0 * r}} for r in (1, 2)}
    path = report.write_sweep_plot(points, {"p99_ttft_s": "P99 TTFT"}, tmp_path / "sweep.png", "t", note=notes.append)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert path is None and "matplotlib" in notes[0]
    else:
        assert path.stat().st_size > 0


# ---- the client against a fake OpenAI server ---------------------------------------------------

def fake_openai_app() -> FastAPI:
    """/v1/models and streamed /v1/completions: model "short" stops one token early, "boom" answers 500."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "x"}
                                           for m in ("llama", "short")]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        model, n = body["model"], body["max_tokens"]
        if model == "boom":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        n -= model == "short"
        failing = model == "midfail"  # one token, then an error event, as the ingress ends a failed stream

        def chunk(choices, usage=None) -> str:
            return "data: " + json.dumps({"id": "c", "object": "text_completion", "created": 0, "model": model,
                                          "choices": choices, "usage": usage}) + "\n\n"

        async def events():
            await asyncio.sleep(FIRST_TOKEN_DELAY_S)
            for i in range(n):
                logprobs = {"tokens": ["x"], "token_logprobs": [0.0], "top_logprobs": None, "text_offset": [i]}
                yield chunk([{"index": 0, "text": "x", "logprobs": logprobs,
                              "finish_reason": "length" if i == n - 1 else None}])
                if failing:
                    yield "data: " + json.dumps({"error": {"message": "the engine replica failed mid-stream"}}) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
            yield chunk([], {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": 0})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def fake_client():
    import httpx2

    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=fake_openai_app()), base_url="http://fake/v1")
    return SseClient("http://fake/v1", http_client=http)


def test_client_records_ttft_tbt_and_marks_failures():
    reqs = [wl.Request(0.0, "t0", 5, 4), wl.Request(0.01, "t1", 3, 4), wl.Request(0.02, "t2", 3, 2),
            wl.Request(0.03, "t3", 3, 4)]

    async def go():
        client = fake_client()
        try:
            return await run_workload(client, reqs, {"t0": "llama", "t1": "short", "t2": "boom", "t3": "midfail"}, 8,
                                      progress=None)
        finally:
            await client.close()

    good, short, boom, midfail = asyncio.run(go())
    assert good.ok and good.output_tokens == 4 and len(good.tbt_s) == 3 and good.model == "llama"
    assert good.ttft_s >= FIRST_TOKEN_DELAY_S and good.e2e_s >= good.ttft_s and good.tpot_s is not None
    assert not short.ok and "3 tokens streamed, expected 4" in short.error
    assert not boom.ok and "500" in boom.error and boom.ttft_s is None
    assert not midfail.ok and "failed mid-stream" in midfail.error and midfail.output_tokens == 1
    assert [r.tenant for r in (good, short, boom, midfail)] == ["t0", "t1", "t2", "t3"]


def test_sse_lines_break_only_where_sse_does():
    """httpx's aiter_lines cut an event at a raw U+2028 in its JSON (vLLM sends them raw)."""
    from replicas.bench.client import sse_lines

    stream = 'data: {"text":"a\u2028b\x85c\u2029d\u00e9"}\r\n\r\ndata: [DONE]\n\n'.encode()

    async def lines(size):
        async def chunks():
            for i in range(0, len(stream), size):
                yield stream[i:i + size]  # boundaries inside lines, CRLFs and UTF-8 sequences
        return [line async for line in sse_lines(chunks())]

    for size in (1, 2, 3, 7, len(stream)):
        got = [line for line in asyncio.run(lines(size)) if line]
        assert got == ['data: {"text":"a\u2028b\x85c\u2029d\u00e9"}', "data: [DONE]"], size
        assert json.loads(got[0][5:])["text"] == "a\u2028b\x85c\u2029d\u00e9"


def test_replay_is_open_loop_and_queues_beyond_the_concurrency_cap():
    reqs = [wl.Request(0.0, "t0", 1, 1), wl.Request(0.0, "t0", 1, 1), wl.Request(0.08, "t0", 1, 1)]

    async def send(i, req):
        result = RequestResult(i, "m", ttft_s=0.0, num_tokens=1, finish_reason="length", start_s=time.perf_counter())
        await asyncio.sleep(0.05)
        result.end_s = time.perf_counter()
        return result

    records = asyncio.run(replay(reqs, send, concurrency=1))
    t0 = records[0].start_s
    assert all(r.ok for r in records)
    assert records[1].queue_s >= 0.04  # waited for the only slot
    assert records[2].start_s - t0 >= 0.075 and records[2].queue_s < 0.03  # sent at its arrival, not before


def test_cli_bench_fails_clearly_on_bad_input(tmp_path, capsys):
    assert main(["bench", "--base-url", "http://127.0.0.1:9/v1", "--workload", "azure",
                 "--trace", str(tmp_path / "missing.csv")]) == 2
    assert "trace file not found" in capsys.readouterr().err
    assert main(["bench", "--base-url", "http://127.0.0.1:9/v1", "--rate", "0"]) == 2
    assert "--rate must be > 0" in capsys.readouterr().err
    assert main(["bench", "--base-url", "http://127.0.0.1:9/v1", "--quiet"]) == 1  # nothing listens on port 9
    assert "cannot reach" in capsys.readouterr().err


def test_one_endpoint_per_model():
    from replicas.bench import parse_endpoints

    assert parse_endpoints("http://h:1/v1") is None
    assert parse_endpoints("a=http://h:1/v1,b=http://h:2/v1") == {"a": "http://h:1/v1", "b": "http://h:2/v1"}
    for bad in ("a=h:1", "a=http://x/v1,a=http://y/v1", "=http://x/v1"):
        with pytest.raises(ValueError, match="--base-url"):
            parse_endpoints(bad)
    reqs = [wl.Request(0.0, "t0", 5, 4), wl.Request(0.0, "t1", 5, 4)]

    async def go():
        clients = {"llama": fake_client(), "other": fake_client()}
        try:
            return await run_workload(clients, reqs, {"t0": "llama", "t1": "other"}, 8, progress=None)
        finally:
            for c in clients.values():
                await c.close()

    first, second = asyncio.run(go())
    assert first.ok and first.model == "llama" and second.ok and second.model == "other"


def test_bench_job_defaults_to_the_head_proxy_and_fails_clearly():
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "scripts"))
    try:
        from bench_job import DEFAULT_BASE_URL, bench_argv
    finally:
        sys.path.pop(0)
    assert bench_argv(["--rate", "2"]) == ["bench", "--base-url", DEFAULT_BASE_URL, "--rate", "2"]
    assert bench_argv(["--base-url=http://x/v1"]) == ["bench", "--base-url=http://x/v1"]
    done = subprocess.run([sys.executable, str(root / "scripts" / "bench_job.py"), "--base-url", "http://127.0.0.1:9/v1",
                           "--duration", "1", "--quiet"], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "cannot reach http://127.0.0.1:9/v1" in done.stderr


# ---- scripts/bench_engine.py -------------------------------------------------------------------

def _bench_engine():
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
    try:
        import bench_engine
    finally:
        sys.path.pop(0)
    return bench_engine


def test_bench_engine_prompts_are_fresh_per_run_and_the_same_for_both_engines():
    w = _bench_engine().Workload("prefill", 4, 8, 1, True)
    assert w.prompts(1, 1024) == w.prompts(1, 1024) != w.prompts(2, 1024)
    assert all(3 <= t < 64 for p in w.prompts(0, 64) for t in p) and len(w.prompts(0, 64)) == 4
    assert w.num_tokens == 32 and w.tok_s_key == "prefill_tok_s_b4"


def test_bench_engine_speedup_is_vllms_median_seconds_over_ours():
    be = _bench_engine()
    workloads = (be.Workload("decode_b1", 1, 4, 8, False), be.Workload("prefill", 2, 16, 1, True))
    ours = {"decode_b1": {"seconds": [1.0, 2.0, 9.0], "token_ids": [[5, 6]]},
            "prefill": {"seconds": [0.5], "token_ids": [[7], [8]]}}
    vllm = {"workloads": {"decode_b1": {"seconds": [4.0, 3.0, 3.0], "token_ids": [[5, 6]]},
                          "prefill": {"seconds": [0.25], "token_ids": [[7], [9]]}}}
    out = be.compare(workloads, ours, vllm)
    assert out["decode_tok_s_b1"] == 4.0 and out["vllm_decode_tok_s_b1"] == 8 / 3
    assert out["speedup_vs_vllm_decode_b1"] == 1.5 and out["speedup_vs_vllm_prefill"] == 0.5
    assert out["ours"]["decode_b1"]["tok_s_min"] == 8 / 9 and out["ours"]["decode_b1"]["tok_s_max"] == 8.0
    assert out["vllm_same_output_fraction"] == {"decode_b1": 1.0, "prefill": 0.5}
    without = be.compare(workloads, ours, {})
    assert without["speedup_vs_vllm_decode_b1"] is None and without["vllm"] is None
    assert without["prefill_tok_s_b2"] == 64.0


def test_bench_engine_quick_runs_without_vllm_and_writes_null_speedups(tmp_path):
    import torch

    out, threads = tmp_path / "bench.json", torch.get_num_threads()
    try:
        assert _bench_engine().main(["--quick", "--threads", "1", "--engine-thread", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets the process's threads, as a script may
    results = json.loads(out.read_text())
    assert {k: results[k] for k in results if k.startswith("speedup")} == {
        "speedup_vs_vllm_decode_b1": None, "speedup_vs_vllm_decode_b16": None, "speedup_vs_vllm_prefill": None}
    assert all(results[k] > 0 for k in ("decode_tok_s_b1", "decode_tok_s_b16", "prefill_tok_s_b16"))
    assert set(results["p99_tbt_s"]) == {"remap", "recompute", "swap"}
    assert results["engine_thread"] and results["heap_env"] is False  # pytest did not start with HEAP_ENV
    assert set(results["ours_minor_faults"]) == set(results["ours"]) and results["ours_peak_rss_mb"] > 0


# ---- scripts/bench_routing.py ------------------------------------------------------------------

def test_bench_routing_runs_both_rules_over_the_production_ranking_and_writes_json(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
    try:
        import bench_routing
    finally:
        sys.path.pop(0)
    out = tmp_path / "routing.json"
    assert bench_routing.main(["--rounds", "1", "--seeds", "1", "--requests", "8", "--concurrency", "4",
                               "--max-tokens", "3", "--view-period-s", "0.05", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["placement"] == {"r0": ["llama", "qwen", "opt"], "r1": ["llama", "qwen"]}
    for rule in bench_routing.RULES:
        s = data["rounds"][0][rule]
        assert s["num_requests"] == 8 and sum(s["by_replica"].values()) == 8
        assert all(not k.startswith("r1/opt") for k in s["by_replica"])  # only hosts get requests
        assert 0 < s["ttft_p50_ms"] <= s["ttft_p99_ms"] <= s["ttft_max_ms"]
    assert "per-room" in capsys.readouterr().out
