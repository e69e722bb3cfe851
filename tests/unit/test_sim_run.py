"""simulate(): every policy replays the tiny preset deterministically; the CLI writes its table."""

from __future__ import annotations

import json

import pytest

from replicas.bench.workload import Request
from replicas.cli import main
from replicas.sim import GH200
from replicas.sim.presets import get_preset
from replicas.sim.run import POLICIES, SimSettings, choose_victim_order, simulate

# 256 KiB pages keep the tiny models' KV granular; 400 pages = their parameters (220) + ~180 KV pages,
# which the tiny workload overflows (the oracle needs ~1,260).
PRESSURE = SimSettings(num_pages=400, page_size_bytes=256 << 10, max_num_batched_tokens=512, max_num_seqs=32)


def _tiny(duration_s=2.0):
    preset = get_preset("tiny")
    return preset.workloads(duration_s, 0, None)[0][1], preset.models()


@pytest.fixture(scope="module")
def results():
    requests, models = _tiny()
    return {p: simulate(requests, models, GH200, p, PRESSURE) for p in POLICIES}


def test_every_policy_finishes_every_request(results):
    requests, _ = _tiny()
    for policy, res in results.items():
        assert len(res.records) == len(requests), policy
        assert res.summary["num_rejected"] == 0
        assert [r.num_tokens for r in res.records] == [q.output_len for q in requests], policy


def test_replays_are_deterministic(results):
    requests, models = _tiny()
    for policy in ("ours", "static"):
        again = simulate(requests, models, GH200, policy, PRESSURE)
        assert again.records == results[policy].records
        assert again.summary == results[policy].summary


def test_oracle_has_the_best_throughput(results):
    best = results["oracle"].summary["throughput_tok_s"]
    assert results["oracle"].num_preemptions == 0
    assert all(best >= r.summary["throughput_tok_s"] for r in results.values())


def test_remap_preempts_less_than_recompute_under_memory_pressure(results):
    assert results["recompute"].num_preemptions > 0  # the pool really is too small
    assert results["ours"].num_preemptions < results["recompute"].num_preemptions


def test_latencies_are_measured_from_the_trace_arrival():
    # one request arriving while the engine is idle: its TTFT is one prefill step, not the idle gap
    _, models = _tiny()
    res = simulate([Request(5.0, "t0", 100, 4)], models, GH200, "recompute", PRESSURE)
    (rec,) = res.records
    assert 0 < rec.ttft_s < 0.1 and len(rec.tbt_s) == 3 and rec.completion_s >= rec.ttft_s


def test_static_engines_time_slice_one_device():
    # two requests, one per model, arriving together: under `static` they share the device, so the
    # second model's first token waits for the first model's prefill (it would not on its own device)
    _, models = _tiny()
    both = [Request(1.0, "t0", 400, 2), Request(1.0, "t1", 400, 2)]
    alone = simulate(both[1:], models, GH200, "static", PRESSURE).records[0].ttft_s
    shared = {r.tenant: r.ttft_s for r in simulate(both, models, GH200, "static", PRESSURE).records}
    assert shared["t1"] > alone * 1.5 and shared["t0"] < shared["t1"]


def test_victim_order_follows_the_pilot_prefix():
    turn_taking = [Request(float(i), f"t{i % 3}", 10, 1) for i in range(30)]  # round robin: LRU comes back
    assert choose_victim_order(turn_taking, fraction=1.0).value == "mru"
    # t0 asks once, then t1 and t2 take turns: the most recently used of the others comes back
    ping_pong = [Request(float(i), t, 10, 1) for i, t in enumerate(["t0", "t1"] + ["t2", "t1"] * 3 + ["t2"])]
    assert choose_victim_order(ping_pong, fraction=1.0).value == "lru"


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="policy"):
        simulate([], {}, GH200, "magic")


def test_cli_writes_json_with_every_policy(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["sim", "--preset", "tiny", "--device", "gh200", "--duration", "0.5", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["policies"]) == set(POLICIES)
    for row in data["policies"].values():
        for key in ("p99_tbt_s", "p99_ttft_s", "throughput_tok_s", "wall_s", "p99_tbt_s_vs_recompute_pct",
                    "p99_ttft_s_vs_recompute_pct", "throughput_tok_s_vs_recompute_pct"):
            assert key in row
    assert "recompute" in capsys.readouterr().out


def test_cli_reports_a_missing_trace(tmp_path, capsys):
    assert main(["sim", "--preset", "c1", "--trace", str(tmp_path / "nope.csv")]) == 2
    assert "trace not found" in capsys.readouterr().err


def test_policies_are_one_enum_and_an_unknown_one_is_an_error_not_a_silent_default():
    from replicas.engine.scheduler import PreemptionMode
    from replicas.sim.run import Policy, engine_config

    settings = SimSettings()
    modes = {p.value: engine_config(p.value, settings).scheduler.preemption_mode for p in Policy}
    assert modes == {"recompute": PreemptionMode.RECOMPUTE, "swap": PreemptionMode.SWAP,
                     "oneiros": PreemptionMode.REMAP, "ours": PreemptionMode.REMAP,
                     "static": PreemptionMode.RECOMPUTE, "static-prop": PreemptionMode.RECOMPUTE,
                     "oracle": PreemptionMode.RECOMPUTE}
    assert engine_config("oneiros", settings).remap.max_remapped_fraction == 0.75
    with pytest.raises(ValueError, match="'remap' is not a valid Policy"):
        engine_config("remap", settings)


def test_vllm_v0_runs_each_model_with_its_own_budget_and_256_sequences():
    from replicas.sim.run import engine_config

    models = get_preset("c1").models()
    sched = engine_config("static", SimSettings(scheduler="vllm-v0"), models=models).scheduler
    assert sched.policy.value == "vllm-v0" and sched.max_num_seqs == 256
    assert {m: sched.budget(m) for m in models} == {"opt-13b": 2048, "llama-2-13b": 4096, "llama-3-8b": 8192}
    chunked = engine_config("static", SimSettings(), models=models).scheduler
    assert chunked.budget("llama-3-8b") == 2048 and chunked.max_num_seqs == 64


def test_static_splits_the_kv_left_at_gpu_memory_utilization_equally_or_by_token_demand():
    from replicas.sim.run import param_pages, static_split

    requests, models = _tiny()
    settings = SimSettings(page_size_bytes=256 << 10, num_pages=400)
    model_of = {"t0": "small-a", "t1": "small-b"}
    params = param_pages(models, GH200, settings)
    equal, said = static_split(requests, models, model_of, GH200, settings, proportional=False)
    prop, said_prop = static_split(requests, models, model_of, GH200, settings, proportional=True)
    kv = {m: equal[m] - params[m] for m in models}
    assert kv["small-a"] == kv["small-b"] and sum(kv.values()) <= 400 - sum(params.values())
    demand = {m: sum(r.prompt_len + r.output_len for r in requests if model_of[r.tenant] == m) for m in models}
    kv_prop = {m: prop[m] - params[m] for m in models}
    assert (kv_prop["small-a"] > kv_prop["small-b"]) == (demand["small-a"] > demand["small-b"])
    assert "split equally" in said and "by token demand" in said_prop and "gpu_memory_utilization 0.9" in said


@pytest.mark.parametrize("scheduler", ["chunked", "vllm-v0"])
def test_every_policy_finishes_under_either_scheduler_and_reports_every_tbt_definition(scheduler):
    requests, models = _tiny(1.0)
    settings = SimSettings(scheduler=scheduler, num_pages=400, page_size_bytes=256 << 10, max_num_seqs=32)
    for policy in ("static", "oneiros", "ours"):
        res = simulate(requests, models, GH200, policy, settings)
        assert [r.num_tokens for r in res.records] == [q.output_len for q in requests], policy
        s = res.summary
        assert s["p99_tpot_s"] <= s["p99_max_tbt_s"] and s["p50_tbt_s"] <= s["p99_tbt_s"] <= s["p99_max_tbt_s"]
        assert res.notes["scheduler"] == scheduler


def test_paper_table_has_every_cell_and_metric_and_checks_signs(tmp_path):
    from replicas.sim.paper import METRICS, format_paper_table, paper_table, reproduces

    table = paper_table(GH200, 0.5, 0, None, workers=1, cells={"c1": "tiny"},
                        settings=SimSettings(num_pages=400, page_size_bytes=256 << 10, max_num_seqs=32))
    assert set(table["cells"]) == {"c1", "pie"} and table["tbt_definition"] == "p99_itl"
    for cell in table["cells"].values():
        assert set(cell) == set(METRICS)
        for entry in cell.values():
            assert {"paper_pct", "oneiros_pct", "ours_pct", "oracle_pct", "oracle_chunked_pct"} <= set(entry)
    assert table["cells"]["c1"]["p99_tbt"]["paper_pct"] == -54.4
    assert "c1" in format_paper_table(table)
    assert reproduces("c1", "p99_tbt", -30.0) and not reproduces("c1", "p99_tbt", -20.0)
    assert not reproduces("c2", "throughput", -5.0) and reproduces("c2", "throughput", 3.4)  # half of +6.6%


def test_cli_without_a_preset_or_the_paper_table_is_a_clear_error(capsys):
    assert main(["sim"]) == 2
    assert "--preset" in capsys.readouterr().err


class _StuckEngine:
    """An engine seam that accepts requests and never runs a step (a livelocked engine)."""

    def __init__(self) -> None:
        self.num = 0

    def add_request(self, model, prompt, params):
        self.num += 1
        return self.num

    def sequence(self, seq_id):
        return seq_id

    def has_unfinished(self) -> bool:
        return self.num > 0

    def step(self):
        return []


def test_a_replay_whose_engines_cannot_step_fails_instead_of_spinning():
    from replicas.sim.clock import VirtualClock
    from replicas.sim.run import _replay

    requests = [Request(0.0, "t0", 4, 4), Request(1.0, "t0", 4, 4)]
    with pytest.raises(RuntimeError, match="livelocks"):
        _replay({"m": _StuckEngine()}, VirtualClock(), requests, {"t0": "m"}, max_steps=1_000_000)
