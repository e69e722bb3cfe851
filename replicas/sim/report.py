"""The simulator's numbers: a run's summary, the comparison of policies against the baselines, and
its table (what `oneiros sim` prints and writes)."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from replicas.sim.run import RequestRecord, SimResult


def summarize(records: Seq[RequestRecord]) -> dict[str, float]:
    done = [r for r in records if r.ttft_s is not None]
    ttft = np.array([r.ttft_s for r in done]) if done else np.zeros(1)
    tbt = np.concatenate([np.asarray(r.tbt_s) for r in done if r.tbt_s] or [np.zeros(1)])
    worst = np.array([max(r.tbt_s) for r in done if r.tbt_s] or [0.0])
    tpot = np.array([sum(r.tbt_s) / len(r.tbt_s) for r in done if r.tbt_s] or [0.0])
    tokens = sum(r.num_tokens for r in done)
    span = (max(r.arrival_s + r.completion_s for r in done) - min(r.arrival_s for r in done)) if done else 0.0
    return {
        "num_requests": len(records),
        "num_rejected": len(records) - len(done),
        "num_tokens": tokens,
        "p50_ttft_s": float(np.percentile(ttft, 50)),
        "p99_ttft_s": float(np.percentile(ttft, 99)),
        "p50_tbt_s": float(np.percentile(tbt, 50)),
        "p99_tbt_s": float(np.percentile(tbt, 99)),  # every gap of every request, pooled: vLLM's P99 ITL
        "p99_tpot_s": float(np.percentile(tpot, 99)),  # each request's mean gap (vLLM's TPOT), P99 over requests
        "p99_max_tbt_s": float(np.percentile(worst, 99)),  # each request's longest stall, P99 over requests
        "throughput_tok_s": tokens / span if span > 0 else 0.0,  # output tokens over first arrival..last token
        "makespan_s": span,
    }


BASELINES = ("recompute", "static")  # the baseline, and the paper's (vLLM as deployed: a split per model)
HEADLINE = ("p99_tbt_s", "p99_max_tbt_s", "p99_ttft_s", "throughput_tok_s")


def compare(results: Mapping[str, SimResult], baselines: Seq[str] = BASELINES) -> dict[str, dict[str, float]]:
    """Per policy: the headline numbers, their change in % against each baseline run, and wall_s."""
    table = {}
    for policy, res in results.items():
        row = {k: res.summary[k] for k in HEADLINE} | {
            "p50_tbt_s": res.summary["p50_tbt_s"], "p50_ttft_s": res.summary["p50_ttft_s"],
            "p99_tpot_s": res.summary["p99_tpot_s"],
            "num_preemptions": res.num_preemptions, "num_rejected": res.summary["num_rejected"],
            "wall_s": res.wall_s}
        for baseline in baselines:
            if baseline not in results:
                continue
            for k in HEADLINE:
                b = results[baseline].summary[k]
                row[f"{k}_vs_{baseline}_pct"] = 100.0 * (res.summary[k] - b) / b if b else float("nan")
        row.update(res.notes)
        table[policy] = row
    return table


def format_table(table: Mapping[str, Mapping[str, float]]) -> str:
    """One line per policy: each headline number, then its change against each baseline that ran."""
    baselines = [b for b in BASELINES if f"p99_tbt_s_vs_{b}_pct" in next(iter(table.values()), {})]
    short = {"p99_tbt_s": "tbt99", "p99_max_tbt_s": "stall99", "p99_ttft_s": "ttft99", "throughput_tok_s": "tok/s"}
    head = f"{'policy':<10}" + "".join(f" {short[k]:>9}" for k in HEADLINE)
    head += "".join(f" {short[k][:5] + ' vs ' + b[:4]:>15}" for b in baselines for k in HEADLINE)
    lines = [head + f" {'preempt':>8} {'reject':>6} {'wall_s':>7}"]
    for policy, row in table.items():
        line = f"{policy:<10}" + "".join(f" {row[k]:>9.4g}" for k in HEADLINE)
        line += "".join(f" {row[f'{k}_vs_{b}_pct']:>+14.1f}%" for b in baselines for k in HEADLINE)
        lines.append(line + f" {row['num_preemptions']:>8d} {row['num_rejected']:>6d} {row['wall_s']:>7.2f}")
    return "\n".join(lines)
