"""Load through the full Ray Serve path against the same workload driven into the engines directly.

    python scripts/bench_serve.py --json out/bench_serve.json [--requests 200] [--concurrency 32] [--seed 0]
                                  [--max-tokens 32] [--rounds 3] [--base-url http://host:port/v1]

`--rounds` rounds (default 3), each the two paths back to back, Serve then direct; the two ratios in
the JSON (`serve_vs_direct_ttft_p50`, `serve_vs_direct_throughput`) are the medians of the rounds',
each round's are under `rounds`, and the other figures are the median round's (by TTFT ratio). The
box's speed drifts by up to 30% over minutes, so only a pair measured back to back makes a ratio.
Each round, one seeded workload (`make_workload`): every request picks a tenant among the
config's models with skewed popularity (60 / 30 / 10 %), sends a token-id prompt of 16..128 ids and
asks for exactly `max_tokens` tokens (greedy, `ignore_eos`). `concurrency` closed-loop clients each
take the next request as soon as their last one ends.

  serve   a lean OpenAI-API client (`SseClient`, which parses events as vLLM's benchmark client does)
          streaming /v1/completions to the OpenAIIngress's own HTTP server, the memory-aware router
          and the EngineReplicas. Without --base-url the script starts its own loopback-only local Ray
          cluster (token auth off) on a free port and shuts it down at the end, also on errors and Ctrl-C.
  direct  one `EngineServer` per Serve replica, in this process, hosting the models that replica hosted,
          each request sent to the replica that served it through Serve; the SamplingParams are built
          from the same request body by the ingress's own code (`replicas.service.openai_api`).

What is measured, per request, on the client side (time.perf_counter):
  TTFT  request sent -> first streamed piece that carries >= 1 token.
  TBT   gaps between successive token-carrying pieces (one piece per engine step, i.e. one token here;
        a piece with k tokens counts as one gap, as vLLM's inter-token latency does).
Requests ask for `logprobs=0` on both paths so that every engine step's token becomes its own SSE
chunk: without it the ingress holds back tokens that decode to "" (special ids, half a UTF-8
character - common with random weights), which would merge chunks and bias TBT. Tokens are counted
from the chunks' logprobs and checked against the usage chunk (`stream_options.include_usage`).

"None lost": a request is ok only if it ends with finish_reason "length" and exactly `max_tokens`
tokens (and, through Serve, a usage chunk saying so); every other outcome is printed and counted.

Both paths share this machine's cores: during `serve` Ray's own processes (GCS, raylet, Serve
controller, HTTP proxy) and the client run beside the replicas; during `direct` the client and all
engines run in this one process (one GIL). Prints a table and writes JSON; asserts no timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pathlib
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

# the stream timing, result checks and percentiles are shared with `oneiros bench` (replicas/bench)
from replicas.bench.client import (
    REQUEST_TIMEOUT_S,
    TOKEN_ID_RANGE,
    TRACE_STAGES,
    RequestResult,
    SseClient,
    StreamTimer,
    check_result,
    completion_body,
    stream_completion,
)
from replicas.bench.report import percentile
from replicas.cli import free_port

POPULARITY = (0.6, 0.3, 0.1)  # share of requests per tenant, in the config's model order
PROMPT_LEN_RANGE = (16, 128)  # prompt length in tokens, both ends included
TTFT_TARGET_RATIO = 2.0  # goal (issue 13): serve p50 TTFT <= 2x the engines' driven directly
THROUGHPUT_TARGET_RATIO = 0.8  # goal: serve keeps >= 80 % of the direct path's output tokens per second
PLACEMENT_TIMEOUT_S = 120.0  # models placed on replicas after the app starts
SETTLE_TIMEOUT_S = 60.0  # loads ordered during the warm-up land


# ---- the workload (pure) -----------------------------------------------------------------------

@dataclass(frozen=True)
class BenchRequest:
    index: int  # position in the workload; the same request on both paths
    model: str  # tenant name
    prompt_ids: tuple[int, ...]  # token ids sent as the prompt
    max_tokens: int  # tokens to generate (exactly: ignore_eos)


def make_workload(num_requests: int, models: Sequence[str], seed: int, max_tokens: int,
                  popularity: Sequence[float] = POPULARITY, prompt_len_range: tuple[int, int] = PROMPT_LEN_RANGE,
                  token_id_range: tuple[int, int] = TOKEN_ID_RANGE) -> list[BenchRequest]:
    """The seeded request list; `popularity[i]` weighs `models[i]` (missing weights count as 0)."""
    if not models or len(popularity) < len(models):
        raise ValueError(f"need one popularity weight per model: {list(models)} vs {list(popularity)}")
    rng = random.Random(seed)
    weights = list(popularity[:len(models)])
    out = []
    for i in range(num_requests):
        model = rng.choices(list(models), weights=weights)[0]
        length = rng.randint(*prompt_len_range)
        prompt = tuple(rng.randint(*token_id_range) for _ in range(length))
        out.append(BenchRequest(i, model, prompt, max_tokens))
    return out


def request_body(req: BenchRequest) -> dict[str, Any]:
    """The /v1/completions body of `req` (the direct path parses the same body)."""
    return completion_body(req.model, req.prompt_ids, req.max_tokens)


# ---- results and statistics (pure) -------------------------------------------------------------

def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def summarize(results: Sequence[RequestResult], max_tokens: int, need_usage: bool) -> dict[str, Any]:
    """Latency percentiles (ms), throughput and failures of one path's run."""
    failures = {r.index: why for r in results if (why := check_result(r, max_tokens, need_usage)) is not None}
    ok = [r for r in results if r.index not in failures]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tbt = [x for r in ok for x in r.tbt_s]
    wall_s = (max(r.end_s for r in results) - min(r.start_s for r in results)) if results else 0.0
    tokens = sum(r.num_tokens for r in ok)
    by_model = {}
    for model in sorted({r.model for r in results}):
        mine = [r.ttft_s for r in ok if r.model == model and r.ttft_s is not None]
        by_model[model] = {"num_ok": len(mine), "p50_ttft_ms": _ms(percentile(mine, 50))}
    return {
        **{f"p{q}_ttft_ms": _ms(percentile(ttft, q)) for q in (50, 90, 99)},
        **{f"p{q}_tbt_ms": _ms(percentile(tbt, q)) for q in (50, 90, 99)},
        "tok_s": tokens / wall_s if wall_s > 0 else None,
        "num_ok": len(ok), "num_failed": len(failures), "wall_s": wall_s, "num_tokens": tokens,
        "by_model": by_model,
        "by_replica": dict(sorted(Counter(f"{r.replica}/{r.model}" for r in results).items())),
        "failures": {str(i): why for i, why in sorted(failures.items())},
    }


def ttft_ratio(serve: dict[str, Any], direct: dict[str, Any]) -> float | None:
    """serve p50 TTFT / direct p50 TTFT, or None when either is missing."""
    s, d = serve.get("p50_ttft_ms"), direct.get("p50_ttft_ms")
    return s / d if s is not None and d else None


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    cols = [("p50_ttft_ms", "TTFT p50"), ("p90_ttft_ms", "p90"), ("p99_ttft_ms", "p99"),
            ("p50_tbt_ms", "ITL p50"), ("p90_tbt_ms", "p90"), ("p99_tbt_ms", "p99"), ("tok_s", "tok/s")]
    head = f"{'path':<8}" + "".join(f"{title:>10}" for _, title in cols) + f"{'ok':>6}{'failed':>8}"
    lines = [head + "   (latencies in ms)"]
    for name, s in summaries.items():
        cells = "".join(f"{'-':>10}" if s[k] is None else f"{s[k]:>10.1f}" for k, _ in cols)
        lines.append(f"{name:<8}{cells}{s['num_ok']:>6}{s['num_failed']:>8}")
    return "\n".join(lines)


# ---- driving a path ----------------------------------------------------------------------------

async def drive(workload: Sequence[BenchRequest], concurrency: int,
                one: Callable[[BenchRequest], Awaitable[RequestResult]]) -> list[RequestResult]:
    """`concurrency` closed-loop clients; each takes the next request when its last one ends."""
    pending = iter(workload)
    results: list[RequestResult] = []

    async def client() -> None:
        for req in pending:  # a shared iterator: no two clients take the same request
            try:
                results.append(await asyncio.wait_for(one(req), REQUEST_TIMEOUT_S))
            except Exception as exc:  # noqa: BLE001 - a failed request is a result, never a crash
                results.append(RequestResult(req.index, req.model, error=f"{type(exc).__name__}: {exc}"[:500]))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return sorted(results, key=lambda r: r.index)


async def serve_one(client, req: BenchRequest) -> RequestResult:
    """One streamed completion through the OpenAI API, traced (its first chunk says when it reached
    each stage of the path)."""
    return await stream_completion(client, req.index, request_body(req), trace=True)


def failover_run(args, config, warmup: list[BenchRequest], workload: list[BenchRequest]) -> int:
    """--kill-replica-after: the Serve path with one engine replica killed mid-run (issue 19's load test)."""
    import ray

    cluster = LocalCluster(config)
    try:
        base_url = cluster.start()
        killed: list[str] = []

        def kill() -> None:
            placement = cluster.placement()
            victim = max(placement, key=lambda rid: (len(placement[rid]), rid))
            ray.kill(ray.get_actor(f"SERVE_REPLICA::{config.app_name}#EngineReplica#{victim}", namespace="serve"),
                     no_restart=True)
            killed.append(victim)
            print(f"killed engine replica {victim} (hosting {placement[victim]}) at {args.kill_replica_after:g} s",
                  flush=True)

        async def run():
            loop = asyncio.get_running_loop()

            async def kill_later():
                await asyncio.sleep(args.kill_replica_after)
                await loop.run_in_executor(None, kill)

            killer = None

            def settle():
                nonlocal killer
                cluster.settle()
                killer = asyncio.run_coroutine_threadsafe(kill_later(), loop)

            out = await run_serve(base_url, warmup, workload, args.concurrency, settle, {})
            killer.result(timeout=60)
            return out

        _warm, results = asyncio.run(run())
    finally:
        cluster.shutdown()
    s = summarize(results, args.max_tokens, need_usage=True)
    ok = [r for r in results if check_result(r, args.max_tokens, True) is None]
    moved = [r for r in ok if r.moved]
    p99 = (lambda xs: None if not xs else percentile(xs, 99))
    out = {"requests": len(results), "completed": s["num_ok"], "failed": s["num_failed"], "moved": len(moved),
           "p99_ttft_s": p99([r.ttft_s for r in ok if r.ttft_s is not None]),
           "p99_tbt_s": p99([x for r in ok for x in r.tbt_s]),
           "moved_p99_tbt_s": p99([x for r in moved for x in r.tbt_s]),
           "others_p99_tbt_s": p99([x for r in ok if not r.moved for x in r.tbt_s]),
           "moved_max_gap_s": max((max(r.tbt_s) for r in moved if r.tbt_s), default=None),
           "killed_replica": killed[0] if killed else None, "kill_after_s": args.kill_replica_after,
           "concurrency": args.concurrency, "max_tokens": args.max_tokens, "seed": args.seed, "serve": s}
    print(f"\nfailover: {out['requests']} requests, {out['completed']} completed, {out['failed']} failed, "
          f"{out['moved']} moved off the killed replica")
    for key in ("p99_ttft_s", "p99_tbt_s", "moved_p99_tbt_s", "others_p99_tbt_s", "moved_max_gap_s"):
        print(f"  {key:18} {'-' if out[key] is None else f'{out[key]:.3f}'}")
    print_failures("serve", s)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


def trace_breakdown(results: Sequence[RequestResult]) -> dict[str, dict[str, float]]:
    """Per stage of the first token (TRACE_STAGES): p50 and p90 of its time in ms over traced requests."""
    traced = [r.trace for r in results if r.trace and all(k in r.trace for k, _ in TRACE_STAGES)]
    out = {}
    for (prev, _), (stage, what) in zip(TRACE_STAGES, TRACE_STAGES[1:]):
        spans = [1e3 * (t[stage] - t[prev]) for t in traced]
        out[what] = {"p50_ms": percentile(spans, 50), "p90_ms": percentile(spans, 90), "n": len(spans)}
    return out


class DirectEngines:
    """EngineServers in this process, one per Serve replica, each hosting what that replica hosted."""

    def __init__(self, config, placement: dict[str, list[str]]) -> None:
        import torch

        from replicas.service.server import EngineServer

        torch.set_num_threads(max(1, int(config.replicas.num_cpus)))  # as EngineReplica does
        self.config = config
        self.servers = {rid: EngineServer(config, replica_id=rid, models=models)
                        for rid, models in sorted(placement.items()) if models}
        self._in_flight = Counter()

    def pick(self, model: str, replica: str | None) -> str:
        """The replica Serve used for this request, else the host of `model` with the fewest in flight."""
        if replica in self.servers and model in self.servers[replica].models:
            return replica
        hosts = [rid for rid, s in self.servers.items() if model in s.models]
        if not hosts:
            raise RuntimeError(f"no direct engine hosts {model!r}")
        return min(hosts, key=lambda rid: (self._in_flight[rid], rid))

    async def one(self, req: BenchRequest, replica: str | None = None) -> RequestResult:
        from replicas.service import openai_api as api

        parsed = api.parse_completion(request_body(req))
        params = api.to_sampling_params(parsed, None, len(req.prompt_ids))
        rid = self.pick(req.model, replica)
        stream = StreamTimer(req.index, req.model)
        stream.result.replica = rid
        self._in_flight[rid] += 1
        try:
            async for item in self.servers[rid].generate(req.model, list(req.prompt_ids), params):
                if item.refusal is not None:
                    stream.result.error = f"engine error {item.refusal}"
                    break
                stream.tokens(len(item.token_ids))
                if item.finished:
                    stream.result.finish_reason = item.finish_reason
        except Exception as exc:  # noqa: BLE001
            stream.result.error = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            self._in_flight[rid] -= 1
        return stream.end()

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


# ---- the local cluster -------------------------------------------------------------------------



class LocalCluster:
    """A loopback-only local Ray cluster serving `config`, as `oneiros serve` starts it."""

    def __init__(self, config) -> None:
        self.config = config
        self.started = False

    def start(self) -> str:
        os.environ["RAY_AUTH_MODE"] = "disabled"  # loopback only, as the Ray tests run it
        import ray
        from ray import serve

        from cluster.actor import NAMESPACE
        from replicas.service.deployments import build_app, serve_start_options

        r, http = self.config.replicas, self.config.http
        num_cpus = max(os.cpu_count() or 1, math.ceil(r.num_replicas * r.num_cpus + 1))  # as cli._serve
        ray.init(address="local", num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=False,
                 logging_level="warning", log_to_driver=False)
        self.started = True
        serve.start(**serve_start_options(self.config))
        serve.run(build_app(self.config), name=self.config.app_name, route_prefix="/", blocking=False)
        self._wait(lambda st: len(st["tenants"]) == len(self.config.models), PLACEMENT_TIMEOUT_S, "models placed")
        return f"http://{http.host}:{http.port}/v1"

    def status(self) -> dict:
        import ray

        from cluster.actor import find_controller

        controller = find_controller(self.config.app_name)
        if controller is None:
            raise RuntimeError(f"no controller for app {self.config.app_name!r}")
        return ray.get(controller.status.remote(), timeout=10)

    def settle(self) -> None:
        """Wait until no model load ordered by the controller is still in flight."""
        self._wait(lambda st: not st["loading"], SETTLE_TIMEOUT_S, "loads settled")
        time.sleep(2 * self.config.replicas.report_period_s)  # routers see the new view

    def placement(self) -> dict[str, list[str]]:
        """replica id -> models it hosts, from the controller's status."""
        out: dict[str, list[str]] = {}
        for model, t in self.status()["tenants"].items():
            for rid in t["resident_layers"]:
                out.setdefault(rid, []).append(model)
        return {rid: sorted(models) for rid, models in sorted(out.items())}

    def _wait(self, done: Callable[[dict], bool], timeout_s: float, what: str) -> None:
        deadline, status = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            status = self.status()
            if done(status):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{what}: not within {timeout_s:g} s; controller status: {status}")

    def shutdown(self) -> None:
        if not self.started:
            return
        import ray
        from ray import serve

        from cluster.actor import find_controller

        try:
            serve.shutdown()
        finally:
            controller = find_controller(self.config.app_name)
            if controller is not None:
                ray.kill(controller)  # detached: it would outlive ray.shutdown() otherwise
            ray.shutdown()
            self.started = False


# ---- main --------------------------------------------------------------------------------------

def merge_placement(*placements: dict[str, list[str]]) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {}
    for p in placements:
        for rid, models in p.items():
            out.setdefault(rid, set()).update(models)
    return {rid: sorted(models) for rid, models in sorted(out.items())}


def served_placement(results: Sequence[RequestResult]) -> dict[str, list[str]]:
    """replica -> models it served, from the fingerprints of the Serve run."""
    return merge_placement(*({r.replica: [r.model]} for r in results if r.replica))


# ---- where the CPU goes (Linux /proc; empty elsewhere) -----------------------------------------

def process_cpu_s() -> dict[int, tuple[str, float]]:
    """pid -> (what it is, user + system CPU seconds so far) for every process this user can read."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    for entry in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry.name)] = (process_kind(cmd), (int(fields[11]) + int(fields[12])) / tick)
    return out


def process_kind(cmd: str) -> str:
    """A Ray or Serve process by its title (Ray sets them), else the program's name."""
    for marker, kind in (("EngineReplica", "engine replicas"), ("OpenAIIngress", "ingress"),
                         ("ProxyActor", "HTTP proxy"), ("ServeController", "Serve controller"),
                         ("ClusterController", "cluster controller"), ("gcs_server", "Ray GCS"),
                         ("raylet", "Ray raylet"), ("bench_serve", "client (this script)")):
        if marker in cmd:
            return kind
    return "Ray other" if "ray" in cmd.lower() else "other"


def cpu_by_kind(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    spent: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        spent[kind] = spent.get(kind, 0.0) + cpu - before.get(pid, (kind, 0.0))[1]
    return dict(sorted(((k, round(v, 2)) for k, v in spent.items() if v >= 0.01), key=lambda kv: -kv[1]))


async def run_serve(base_url: str, warmup: list[BenchRequest], workload: list[BenchRequest], concurrency: int,
                    settle: Callable[[], None] | None, cpu: dict[str, float]
                    ) -> tuple[list[RequestResult], list[RequestResult]]:
    """Warm-up, then the measured run; `cpu` gets the CPU seconds each kind of process spent in it."""
    client = SseClient(base_url)
    try:
        warm = await drive(warmup, concurrency, lambda r: serve_one(client, r))
        if settle is not None:
            await asyncio.get_running_loop().run_in_executor(None, settle)
        before = process_cpu_s()
        results = await drive(workload, concurrency, lambda r: serve_one(client, r))
        cpu.update(cpu_by_kind(before, process_cpu_s()))
        return warm, results
    finally:
        await client.close()


async def run_direct(engines: DirectEngines, warmup: list[BenchRequest], workload: list[BenchRequest],
                     concurrency: int, served_by: dict[int, str], cpu: dict[str, float]
                     ) -> tuple[list[RequestResult], list[RequestResult]]:
    """Warm-up, then the measured run; `cpu` gets this process's CPU seconds in it (engines and client)."""
    warm = await drive(warmup, concurrency, engines.one)
    before = time.process_time()
    results = await drive(workload, concurrency, lambda r: engines.one(r, served_by.get(r.index)))
    cpu["engines and client (this process)"] = round(time.process_time() - before, 2)
    return warm, results


def print_failures(name: str, summary: dict[str, Any], limit: int = 20) -> None:
    for i, (index, why) in enumerate(summary["failures"].items()):
        if i == limit:
            print(f"  ... and {len(summary['failures']) - limit} more")
            break
        print(f"  {name} request {index} failed: {why}")


ROUND_DETAIL = ("by_model", "by_replica", "failures")  # kept for the median round only


def _median(xs: Sequence[float | None]) -> float | None:
    known = [x for x in xs if x is not None]
    return statistics.median(known) if known else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def one_round(args, config, models: list[str], warmup: list[BenchRequest], workload: list[BenchRequest]) -> dict:
    """The workload through Serve (a fresh local cluster unless --base-url), then into the same engines
    directly; prints the round's table and returns its summaries, ratios, stages and CPU seconds."""
    cluster = None if args.base_url else LocalCluster(config)
    try:
        base_url = args.base_url or cluster.start()
        print(f"serve: {base_url}", flush=True)
        settle = cluster.settle if cluster is not None else None
        serve_cpu: dict[str, float] = {}
        serve_warm, serve_res = asyncio.run(run_serve(base_url, warmup, workload, args.concurrency, settle, serve_cpu))
        placement = merge_placement(served_placement(serve_warm), served_placement(serve_res),
                                    cluster.placement() if cluster is not None else {})
    finally:
        if cluster is not None:
            cluster.shutdown()
    if not placement:  # nothing came back through Serve: spread the models round-robin
        placement = merge_placement(*({f"r{i % config.replicas.num_replicas}": [m]} for i, m in enumerate(models)))
    short = {rid: f"r{i}" for i, rid in enumerate(placement)}
    print("placement (direct engines copy it): "
          + ", ".join(f"{short[rid]}={models}" for rid, models in placement.items()), flush=True)

    engines = DirectEngines(config, placement)
    try:
        served_by = {r.index: r.replica for r in serve_res if r.replica}
        direct_cpu: dict[str, float] = {}
        direct_warm, direct_res = asyncio.run(run_direct(engines, warmup, workload, args.concurrency, served_by,
                                                         direct_cpu))
    finally:
        engines.close()

    summaries = {"serve": summarize(serve_res, args.max_tokens, need_usage=True),
                 "direct": summarize(direct_res, args.max_tokens, need_usage=False)}
    for s in summaries.values():
        s["by_replica"] = {short.get(k.split("/")[0], k.split("/")[0]) + "/" + k.split("/")[1]: v
                           for k, v in s["by_replica"].items()}
    ratio = ttft_ratio(summaries["serve"], summaries["direct"])
    tput = summaries["serve"]["tok_s"] / summaries["direct"]["tok_s"] if summaries["direct"]["tok_s"] else None
    print()
    print(format_table(summaries))
    for name, s in summaries.items():
        print_failures(name, s)
    warm_failed = sum(check_result(r, args.max_tokens, False) is not None for r in serve_warm + direct_warm)
    if warm_failed:
        print(f"warm-up: {warm_failed} requests failed (not counted above)")
    print(f"this round: serve p50 TTFT / direct p50 TTFT = {_fmt(ratio)}, serve tok/s / direct tok/s = {_fmt(tput)}")
    breakdown = trace_breakdown(serve_res)
    if breakdown:
        print("first token through Serve, by stage (wall-clock stamps, ms):  p50 / p90")
        for what, b in breakdown.items():
            print(f"  {what:55} {b['p50_ms']:7.1f} / {b['p90_ms']:7.1f}")
    for name, cpu in (("serve", serve_cpu), ("direct", direct_cpu)):
        if cpu and summaries[name]["num_tokens"]:
            total, wall, tokens = sum(cpu.values()), summaries[name]["wall_s"], summaries[name]["num_tokens"]
            print(f"CPU seconds during the {name} run ({wall:.1f} s wall, {total:.1f} s CPU on "
                  f"{os.cpu_count()} cores), per token: "
                  + ", ".join(f"{k} {v:.1f} s ({1e3 * v / tokens:.2f} ms)" for k, v in cpu.items()))
    print(f"note: both paths share this machine's {os.cpu_count()} cores; serve also runs Ray's processes and "
          f"the HTTP client beside its replicas; direct runs after Ray is shut down, with the client and "
          f"{len(engines.servers)} engines in one process")
    return {"summaries": summaries, "ratio": ratio, "tput": tput, "stages": breakdown, "serve_cpu": serve_cpu,
            "direct_cpu": direct_cpu, "placement": {short[rid]: hosted for rid, hosted in placement.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request (exactly: ignore_eos)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the workload (the warm-up uses seed + 1)")
    ap.add_argument("--warmup", type=int, help="requests before each measured run (default: --concurrency)")
    ap.add_argument("--base-url", help="drive this OpenAI endpoint (built-in default config) instead of a local cluster")
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--rounds", type=int, default=3,
                    help="Serve-then-direct rounds; the ratios are the medians of the rounds' (this box drifts "
                         "by up to 30%% over minutes, so a pair measured back to back is what a ratio needs)")
    ap.add_argument("--kill-replica-after", type=float, metavar="S",
                    help="failover run: S seconds into the measured run, kill the engine replica hosting the most "
                         "models; report what was lost and moved (Serve path only)")
    ap.add_argument("--stream-batch-ms", type=float, metavar="MS",
                    help="replicas.stream_batch_ms of both paths (default: the config's; 0 = every step's "
                         "tokens in their own message)")
    args = ap.parse_args(argv)
    if min(args.requests, args.concurrency, args.max_tokens, args.rounds) < 1:
        ap.error("--requests, --concurrency, --max-tokens and --rounds must be >= 1")
    from replicas.config import default_config

    config = default_config(http={"port": free_port()})
    if args.stream_batch_ms is not None:
        data = config.model_dump()
        data["replicas"]["stream_batch_ms"] = args.stream_batch_ms
        try:
            config = type(config).model_validate(data)
        except ValueError as exc:
            ap.error(f"--stream-batch-ms: {exc}")
    models = [m.name for m in config.models]
    workload = make_workload(args.requests, models, args.seed, args.max_tokens)
    warmup = make_workload(args.concurrency if args.warmup is None else args.warmup, models, args.seed + 1,
                           args.max_tokens)
    print(f"workload: {len(workload)} requests ({dict(Counter(r.model for r in workload))}), "
          f"{args.concurrency} clients, {args.max_tokens} tokens each, prompts {PROMPT_LEN_RANGE} tokens, "
          f"seed {args.seed}; warm-up {len(warmup)} requests per path", flush=True)

    if args.kill_replica_after is not None:
        if args.base_url:
            ap.error("--kill-replica-after needs the script's own local cluster (no --base-url)")
        return failover_run(args, config, warmup, workload)
    rounds = []
    for number in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"\n---- round {number} of {args.rounds}", flush=True)
        rounds.append(one_round(args, config, models, warmup, workload))
    by_ttft = sorted(range(len(rounds)), key=lambda i: (rounds[i]["ratio"] is None, rounds[i]["ratio"] or 0.0))
    median = rounds[by_ttft[(len(by_ttft) - 1) // 2]]  # the round whose TTFT ratio is the median (lower one if even)
    ratio = _median([r["ratio"] for r in rounds])
    tput = _median([r["tput"] for r in rounds])
    meets = ratio is not None and ratio <= TTFT_TARGET_RATIO
    if args.rounds > 1:
        print(f"\n---- {args.rounds} rounds, each Serve then direct; ratios per round:")
        for i, r in enumerate(rounds, 1):
            print(f"  round {i}: TTFT p50 ratio {_fmt(r['ratio'])}, throughput ratio {_fmt(r['tput'])}")
        print(f"the median round (round {rounds.index(median) + 1}):")
        print(format_table(median["summaries"]))
    print(f"serve p50 TTFT / direct p50 TTFT = {_fmt(ratio)}{' (median of the rounds)' if args.rounds > 1 else ''} "
          f"(target <= {TTFT_TARGET_RATIO}: {'met' if meets else 'NOT met'})")
    print(f"serve tok/s / direct tok/s = {_fmt(tput)}{' (median of the rounds)' if args.rounds > 1 else ''} "
          f"(target >= {THROUGHPUT_TARGET_RATIO})")
    if args.json:
        out = {"config": {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                          "warmup": len(warmup), "base_url": args.base_url, "models": models, "rounds": args.rounds,
                          "popularity": list(POPULARITY[:len(models)]), "prompt_len_range": list(PROMPT_LEN_RANGE),
                          "token_id_range": list(TOKEN_ID_RANGE), "oneiros": config.model_dump(mode="json")},
               "seed": args.seed, "cpu_count": os.cpu_count(),
               "placement": median["placement"], **median["summaries"],
               "serve_vs_direct_ttft_p50": ratio, "serve_vs_direct_throughput": tput,
               "ttft_target_ratio": TTFT_TARGET_RATIO, "throughput_target_ratio": THROUGHPUT_TARGET_RATIO,
               "meets_ttft_target": meets, "serve_cpu_s": median["serve_cpu"], "direct_cpu_s": median["direct_cpu"],
               "serve_first_token_stages": median["stages"],
               "rounds": [{"serve_vs_direct_ttft_p50": r["ratio"], "serve_vs_direct_throughput": r["tput"],
                           **{path: {k: v for k, v in summary.items() if k not in ROUND_DETAIL}
                              for path, summary in r["summaries"].items()}} for r in rounds]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
