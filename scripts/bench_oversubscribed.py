"""Oversubscribed memory (issue 11): more model parameters than the cluster's pools hold, through Serve.

    python scripts/bench_oversubscribed.py --json out/bench_oversubscribed.json
                                           [--duration 40] [--rate 3] [--seed 0] [--ratios 1.5,2.0]

Owns the sizing of one point per oversubscription ratio and its measurement; the client, workload and
statistics are `oneiros bench`'s (replicas/bench), the local cluster is scripts/bench_serve.py's.

  tenants   `--models` tiny random-weight tenants cycling Llama / OPT / Qwen2 (distinct seeds), `--layers`
            deep. Each one's parameter pages are counted once in-process (LLMEngine.add_model).
  a point   2 replicas whose `memory.num_pages` make sum(parameter pages) / (2 * num_pages) ~ ratio,
            so the cluster can only host every tenant by lending idle tenants' layers. Every replica
            still holds the largest tenant plus the KV of the longest request (checked at start).
  workload  one seeded Zipf-Poisson list (`--rate` req/s for `--duration` s, prompts 16..128 tokens,
            `--max-tokens` out, greedy, ignore_eos), the same for every point, replayed open-loop.

Per point: completed_fraction (requests that streamed exactly max_tokens / all; 1.0 when the system
works), num_503 (HTTP 503 responses, counted by a response hook on the client's HTTP pool, apart from
other errors), p99 TTFT / TBT over completed requests, output tokens/s. A point that fails (the cluster
does not start, a request hook breaks) is recorded with its error; the JSON is always written.
Each point gets a fresh loopback-only local Ray cluster. Prints a table and writes JSON; asserts no timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pathlib
import sys
import time
from collections import Counter
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_serve import LocalCluster  # noqa: E402 - the script folder is not a package

from replicas.bench import report  # noqa: E402
from replicas.bench import workload as wl  # noqa: E402
from replicas.bench.client import SseClient, http_pool, run_workload  # noqa: E402
from replicas.cli import free_port  # noqa: E402
from replicas.config import TINY_MODELS, ModelSpec, OneirosConfig  # noqa: E402

logger = logging.getLogger(__name__)

ARCHITECTURES = ("tiny-llama", "tiny-opt", "tiny-qwen2")  # cycled over the tenants
NUM_REPLICAS = 2
PAGE_SIZE_BYTES = 256 << 10
PROMPT_LEN = wl.LengthDist("uniform", low=16, high=128)
PLACEMENT_WAIT_S = 45.0  # placement may stop short when oversubscribed: that is what a point measures
SLO_TTFT_S, SLO_TBT_S = 1.0, 0.1  # report.summarize's goodput (kept in the JSON, not in the table)


def tenant_specs(num_models: int, num_layers: int) -> list[ModelSpec]:
    """Tiny architectures made `num_layers` deep: like real models (30-80 layers), a tenant's layers
    then outweigh its embeddings, which are never lent."""
    return [ModelSpec(name=f"{arch.removeprefix('tiny-')}-{i}", seed=i + 1,
                      hf_config=dict(TINY_MODELS[arch], num_hidden_layers=num_layers))
            for i, arch in ((i, ARCHITECTURES[i % len(ARCHITECTURES)]) for i in range(num_models))]


def measure_pages(specs: list[ModelSpec], max_request_tokens: int) -> dict[str, dict[str, int]]:
    """Per tenant: pages its parameters take, and KV pages of the longest request, in 256 KiB pages."""
    from remap import DeviceMemory
    from replicas.engine.engine import EngineConfig, LLMEngine
    from replicas.service.server import load_model

    out = {}
    for spec in specs:
        memory = DeviceMemory(1024, PAGE_SIZE_BYTES)
        engine = LLMEngine(memory, EngineConfig(link_bytes_per_s=1e10))  # no link measurement: pages only
        model_config, state, tokenizer = load_model(spec)
        engine.add_model(spec.name, model_config, state, tokenizer=tokenizer)
        out[spec.name] = {"param_pages": memory.pool.num_pages - memory.pool.num_free,
                          "request_kv_pages": memory.kv[spec.name].num_blocks_for(max_request_tokens)}
    return out


def size_point(ratio: float, pages: dict[str, dict[str, int]]) -> dict[str, Any]:
    """num_pages per replica for `ratio`; ValueError when a replica could not serve the largest tenant."""
    total = sum(p["param_pages"] for p in pages.values())
    num_pages = max(1, round(total / (NUM_REPLICAS * ratio)))
    need = max(p["param_pages"] + p["request_kv_pages"] for p in pages.values())
    if num_pages < need:
        raise ValueError(f"ratio {ratio}: {num_pages} pages per replica < {need} (largest tenant + one request's "
                         f"KV); use more --models or a lower ratio")
    return {"ratio_target": ratio, "num_pages": num_pages, "cluster_pages": NUM_REPLICAS * num_pages,
            "param_pages": total, "oversubscription": total / (NUM_REPLICAS * num_pages),
            "largest_need_pages": need}


class TolerantCluster(LocalCluster):
    """bench_serve's cluster, whose start-up waits log a shortfall instead of failing: with more parameters
    than pools, some tenants may be placed only on demand (or never)."""

    def _wait(self, done, timeout_s: float, what: str) -> None:
        try:
            super()._wait(done, min(timeout_s, PLACEMENT_WAIT_S), what)
        except TimeoutError as exc:
            logger.warning("going on without it: %s", str(exc)[:300])

    def resident(self) -> dict[str, dict[str, str]]:
        """model -> {replica (short): "resident/num_layers"}, from the controller's status."""
        tenants = self.status()["tenants"]
        rids = sorted({rid for t in tenants.values() for rid in t["resident_layers"]})
        short = {rid: f"r{i}" for i, rid in enumerate(rids)}
        return {m: {short[rid]: f"{n}/{t['num_layers']}" for rid, n in sorted(t["resident_layers"].items())}
                for m, t in sorted(tenants.items())}


async def drive(base_url: str, work: wl.Workload, mapping: dict[str, str], concurrency: int,
                timeout_s: float) -> tuple[list, Counter]:
    """Replay `work`; also returns the HTTP status of every /completions response."""
    statuses: Counter = Counter()

    async def count(response) -> None:  # headers only: the stream's body is left to the client
        if response.request.url.path.endswith("/completions"):
            statuses[response.status_code] += 1

    client = SseClient(base_url, http_client=http_pool(timeout_s, event_hooks={"response": [count]}))
    try:
        records = await run_workload(client, work.requests, mapping, concurrency, seed=work.seed, progress=sys.stderr)
    finally:
        await client.close()
    return records, statuses


def point_result(records: list, statuses: Counter) -> dict[str, Any]:
    summary = report.summarize(records, SLO_TTFT_S, SLO_TBT_S)
    overall = summary["overall"]
    sec = (lambda ms: None if ms is None else ms / 1e3)
    failed = [r for r in records if not r.ok]
    kinds = Counter(r.error.split(" - ")[0][:120] for r in failed)
    return {
        "num_requests": len(records), "num_ok": overall["num_ok"],
        "completed_fraction": overall["num_ok"] / len(records) if records else None,
        "num_503": statuses.get(503, 0), "num_429": statuses.get(429, 0),
        "num_other_errors": overall["num_failed"] - statuses.get(503, 0) - statuses.get(429, 0),
        "http_status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "p50_ttft_s": sec(overall["p50_ttft_ms"]), "p99_ttft_s": sec(overall["p99_ttft_ms"]),
        "p50_tbt_s": sec(overall["p50_tbt_ms"]), "p99_tbt_s": sec(overall["p99_tbt_ms"]),
        "throughput_tok_s": overall["output_tok_s"], "wall_s": summary["wall_s"],
        "error_kinds": dict(kinds.most_common()), "failed_by_model": dict(Counter(r.model for r in failed)),
        "first_error": failed[0].error if failed else None,
        "max_failed_e2e_s": max((r.e2e_s for r in failed), default=None),  # how long a refusal took
        "summary": summary, "records": [report.record_json(r) for r in records],
    }


def run_point(sizing: dict[str, Any], specs: list[ModelSpec], work: wl.Workload, args) -> dict[str, Any]:
    """One point on a fresh local cluster; errors become the point's `error`, never an exception."""
    config = OneirosConfig.model_validate({
        "models": [s.model_dump() for s in specs], "replicas": {"num_replicas": NUM_REPLICAS},
        "memory": {"num_pages": sizing["num_pages"], "page_size_bytes": PAGE_SIZE_BYTES},
        "http": {"port": free_port()}})
    mapping = {wl.tenant_name(i): s.name for i, s in enumerate(specs)}
    point: dict[str, Any] = {**sizing, "error": None}
    cluster = TolerantCluster(config)
    started = time.perf_counter()
    try:
        base_url = cluster.start()
        point["placed_before_s"] = time.perf_counter() - started
        point["resident_before"] = cluster.resident()
        records, statuses = asyncio.run(drive(base_url, work, mapping, args.concurrency, args.request_timeout))
        point.update(point_result(records, statuses))
        point["resident_after"] = cluster.resident()
        point["decisions"] = cluster.status()["reasons"][-10:]
    except Exception as exc:  # noqa: BLE001 - a failed point is a result; the next point still runs
        logger.exception("point %.2fx failed", sizing["ratio_target"])
        point["error"] = f"{type(exc).__name__}: {exc}"[:1000]
    finally:
        try:
            cluster.shutdown()
        except Exception as exc:  # noqa: BLE001 - shut down what we can; say so
            logger.warning("shutdown after point %.2fx: %r", sizing["ratio_target"], exc)
    return point


COLUMNS = [("oversubscription", "params/pools", ".2f"), ("num_pages", "pages/rep", "d"),
           ("num_requests", "reqs", "d"), ("completed_fraction", "completed", ".1%"), ("num_503", "503", "d"),
           ("num_other_errors", "other err", "d"), ("p99_ttft_s", "TTFT p99 s", ".3f"),
           ("p99_tbt_s", "TBT p99 s", ".3f"), ("throughput_tok_s", "tok/s", ".1f")]


def format_table(points: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    for p in points:
        cells = ["-" if p.get(k) is None else format(p[k], f) for k, _, f in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |" + (f"  point failed: {p['error'][:160]}" if p["error"] else ""))
    return "\n".join(lines)


def print_failures(points: list[dict[str, Any]]) -> None:
    for p in points:
        if p.get("failed_by_model"):
            print(f"  {p['oversubscription']:.2f}x: failed by model {p['failed_by_model']} (slowest after "
                  f"{p['max_failed_e2e_s']:.1f} s); kinds {p['error_kinds']}; first: {p['first_error'][:300]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=pathlib.Path, required=True)
    ap.add_argument("--ratios", default="1.5,2.0", help="sum(parameter pages) / cluster pages, one point each")
    ap.add_argument("--models", type=int, default=6, help="tenants (cycling llama, opt, qwen2)")
    ap.add_argument("--layers", type=int, default=12, help="transformer layers of each tenant")
    ap.add_argument("--rate", type=float, default=3.0, help="requests per second, all tenants")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per point")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request (exactly: ignore_eos)")
    ap.add_argument("--zipf-s", type=float, default=1.0, help="tenant popularity ~ 1/rank^s")
    ap.add_argument("--concurrency", type=int, default=64, help="most streams open at once")
    ap.add_argument("--request-timeout", type=float, default=60.0, help="client timeout per request, s")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    specs = tenant_specs(args.models, args.layers)
    pages = measure_pages(specs, PROMPT_LEN.high + args.max_tokens)
    try:
        sizings = [size_point(float(r), pages) for r in args.ratios.split(",")]
    except ValueError as exc:
        ap.error(str(exc))
    work = wl.zipf_poisson(len(specs), args.rate, args.duration, args.zipf_s, PROMPT_LEN,
                           wl.LengthDist("fixed", value=args.max_tokens), seed=args.seed)
    print(f"{len(specs)} tenants, parameter pages {({n: p['param_pages'] for n, p in pages.items()})}; "
          f"{len(work.requests)} requests {wl.tenant_counts(work.requests)}, seed {args.seed}", flush=True)
    points = []
    for sizing in sizings:
        print(f"point {sizing['oversubscription']:.2f}x: {NUM_REPLICAS} replicas x {sizing['num_pages']} pages "
              f"for {sizing['param_pages']} parameter pages", flush=True)
        points.append(run_point(sizing, specs, work, args))
    print()
    print(format_table(points))
    print_failures(points)
    print(f"note: {os.cpu_count()} cores shared by Ray, {NUM_REPLICAS} replicas and the client; "
          f"p99s over completed requests only")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "cpu_count": os.cpu_count(),
        "num_replicas": NUM_REPLICAS, "page_size_bytes": PAGE_SIZE_BYTES, "pages": pages,
        "models": {wl.tenant_name(i): s.model_dump() for i, s in enumerate(specs)},
        "workload": wl.to_json(work), "points": points}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
