"""Summaries of a bench run: latency percentiles, throughput and goodput, overall and per tenant.

Definitions (all over the requests of one run; latencies reported in ms):
  TTFT, TPOT, E2E  percentiles over the ok requests, one value per request.
  TBT              percentiles over every gap of every ok request, pooled (as vLLM's ITL).
  wall_s           first send -> last stream end, over all requests; per-tenant rates use the same
                   window, so the tenants' rates add up to the overall rate.
  output_tok_s     tokens streamed by ok requests / wall_s.
  goodput          a request is *good* when it is ok, its TTFT <= slo_ttft_s and its mean TBT
                   <= slo_tbt_s (a request with a single token has no TBT and passes that part).
                   `good_fraction` = good / all requests (failures count against it);
                   `goodput_req_s` = good / wall_s.
Percentiles interpolate linearly between ranks (numpy's default). PNG plots need matplotlib; without
it `write_plots` says so and writes nothing.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

from replicas.bench.client import RequestRecord

QUANTILES = (50, 90, 99)
METRICS = ("ttft", "tbt", "tpot", "e2e")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default); None if empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def is_good(r: RequestRecord, slo_ttft_s: float, slo_tbt_s: float) -> bool:
    """ok, TTFT within its SLO and mean TBT within its SLO (see the module docstring)."""
    mean_tbt = r.mean_tbt_s
    return r.ok and r.ttft_s is not None and r.ttft_s <= slo_ttft_s and (mean_tbt is None or mean_tbt <= slo_tbt_s)


def metric_samples(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Seconds per metric over the ok records (TBT pooled over all their gaps)."""
    ok = [r for r in records if r.ok]
    return {"ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
            "tbt": [x for r in ok for x in r.tbt_s],
            "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
            "e2e": [r.e2e_s for r in ok]}


def wall_s(records: Sequence[RequestRecord]) -> float:
    return max(r.end_s for r in records) - min(r.start_s for r in records) if records else 0.0


def summarize_group(records: Sequence[RequestRecord], wall: float, slo_ttft_s: float,
                    slo_tbt_s: float) -> dict[str, Any]:
    samples = metric_samples(records)
    num_ok = sum(r.ok for r in records)
    num_good = sum(is_good(r, slo_ttft_s, slo_tbt_s) for r in records)
    tokens = sum(r.output_tokens for r in records if r.ok)
    rate = (lambda n: n / wall if wall > 0 else None)
    out: dict[str, Any] = {"num_requests": len(records), "num_ok": num_ok, "num_failed": len(records) - num_ok}
    for m in METRICS:
        for q in QUANTILES:
            out[f"p{q}_{m}_ms"] = _ms(percentile(samples[m], q))
    out.update({"output_tokens": tokens, "output_tok_s": rate(tokens), "request_rate_s": rate(len(records)),
                "num_good": num_good, "good_fraction": num_good / len(records) if records else None,
                "goodput_req_s": rate(num_good)})
    return out


def summarize(records: Sequence[RequestRecord], slo_ttft_s: float, slo_tbt_s: float) -> dict[str, Any]:
    """{"overall": ..., "by_tenant": {tenant: ...}, "slo": ..., "wall_s": ..., "failures": {index: why}}."""
    wall = wall_s(records)
    tenants = sorted({r.tenant for r in records}, key=lambda t: (len(t), t))
    return {
        "wall_s": wall,
        "slo": {"ttft_s": slo_ttft_s, "tbt_s": slo_tbt_s,
                "good": "ok and TTFT <= ttft_s and mean TBT <= tbt_s"},
        "overall": summarize_group(records, wall, slo_ttft_s, slo_tbt_s),
        "by_tenant": {t: summarize_group([r for r in records if r.tenant == t], wall, slo_ttft_s, slo_tbt_s)
                      for t in tenants},
        "failures": {str(r.index): r.error for r in records if not r.ok},
    }


COLUMNS = [("num_requests", "reqs", "d"), ("num_failed", "failed", "d"),
           ("p50_ttft_ms", "TTFT p50", ".1f"), ("p90_ttft_ms", "p90", ".1f"), ("p99_ttft_ms", "p99", ".1f"),
           ("p50_tbt_ms", "ITL p50", ".1f"), ("p90_tbt_ms", "p90", ".1f"), ("p99_tbt_ms", "p99", ".1f"),
           ("p50_tpot_ms", "TPOT p50", ".1f"), ("p99_tpot_ms", "p99", ".1f"),
           ("p50_e2e_ms", "E2E p50", ".1f"), ("p99_e2e_ms", "p99", ".1f"),
           ("output_tok_s", "tok/s", ".1f"), ("good_fraction", "good", ".1%"), ("goodput_req_s", "good/s", ".2f")]


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_markdown(summary: dict[str, Any], models: dict[str, str] | None = None) -> str:
    """One row overall and one per tenant; latencies in ms."""
    models = models or {}
    head = "| tenant | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    rows = [("all", summary["overall"])] + [
        (f"{t} ({models[t]})" if t in models else t, s) for t, s in summary["by_tenant"].items()]
    lines = [head, rule] + ["| " + name + " | " + " | ".join(_cell(s[k], f) for k, _, f in COLUMNS) + " |"
                            for name, s in rows]
    slo = summary["slo"]
    lines.append(f"\nLatencies in ms; wall {summary['wall_s']:.1f} s. ITL: every gap between token-carrying "
                 "streamed chunks, pooled over requests (vLLM's client counts it so; a chunk of k tokens is one "
                 "gap); TPOT: (E2E - TTFT) / (tokens - 1) per request. "
                 f"Good = ok, TTFT <= {slo['ttft_s']:g} s and mean gap <= {slo['tbt_s']:g} s.")
    return "\n".join(lines)


def record_json(r: RequestRecord) -> dict[str, Any]:
    return {"index": r.index, "tenant": r.tenant, "model": r.model, "ok": r.ok, "error": r.error,
            "arrival_s": r.arrival_s, "queue_s": r.queue_s, "ttft_s": r.ttft_s, "tpot_s": r.tpot_s,
            "e2e_s": r.e2e_s, "tbt_s": list(r.tbt_s), "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens, "expected_tokens": r.expected_tokens}


def _pyplot(note):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note("matplotlib is not installed (pip install 'oneiros[plots]'); skipping PNG plots")
        return None
    return plt


def write_sweep_plot(points: dict[str, dict[str, dict[str, float]]], metrics: dict[str, str],
                     path: str | pathlib.Path, title: str, note=print) -> pathlib.Path | None:
    """One panel per metric, one line per policy across the sweep points: `points[label][policy][metric]`
    (what `oneiros sim --json` writes under "points"); `metrics` maps keys to axis labels."""
    plt = _pyplot(note)
    if plt is None:
        return None
    labels = list(points)
    policies = list(next(iter(points.values())))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics.items()):
        for policy in policies:
            ax.plot(range(len(labels)), [points[x][policy][key] for x in labels], marker="o", label=policy)
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set(title=label, yscale="log" if "ttft" in key else "linear")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(records: Sequence[RequestRecord], summary: dict[str, Any], out_dir: str | pathlib.Path,
                note=print) -> list[pathlib.Path]:
    """Latency CDFs and per-tenant P50/P99 bars as PNGs; [] (with a note) when matplotlib is missing."""
    plt = _pyplot(note)
    if plt is None:
        return []
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = metric_samples(records)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
    for ax, m in zip(axes, METRICS):
        xs = sorted(x * 1e3 for x in samples[m])
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))])
        ax.set(title=f"{m.upper()} CDF", xlabel="ms", ylabel="fraction")
    paths = [out_dir / "latency_cdf.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    tenants = list(summary["by_tenant"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for ax, m in zip(axes, ("ttft", "tbt", "e2e")):
        for k, q in enumerate((50, 99)):
            vals = [summary["by_tenant"][t][f"p{q}_{m}_ms"] or 0.0 for t in tenants]
            ax.bar([i + 0.4 * k for i in range(len(tenants))], vals, width=0.4, label=f"p{q}")
        ax.set_xticks([i + 0.2 for i in range(len(tenants))], tenants)
        ax.set(title=f"{m.upper()} per tenant", ylabel="ms")
        ax.legend()
    paths.append(out_dir / "per_tenant.png")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
