"""The memory-aware router's rule within a group of equally resident hosts, against Serve's shortest queue.

    python scripts/bench_routing.py --json out/bench_routing.json [--rounds 2] [--requests 200]
                                    [--concurrency 32] [--max-tokens 32] [--view-period-s 0.5]

Two replicas' engines run in this process (`EngineServer`, as `bench_serve.py`'s direct path), the
first hosting every tenant of the default config and the second every tenant but the last (the
least popular): the first has less room for KV, as a replica that hosts one more busy tenant does.
Each request of `bench_serve.py`'s seeded workload (32 closed-loop clients, skewed popularity,
prompts of 16..128 ids, exactly `max_tokens` tokens) goes to one of its model's hosts by one of two
rules, both read from the production router's ranking (`replicas.service.router.rank_replicas`) over
a routing view that the production ClusterState makes from the replicas' own reports, refreshed
every `--view-period-s`:

  shortest-queue  the group of equally resident hosts as a whole, then the fewest requests in flight
                  (Serve's choice within a group; the router before requests per room)
  per-room        the fewest requests in flight per page of KV room (RouteEntry.load_per_room)

Each round runs every seed's workload once per rule, the rules alternating. Prints a table (TTFT
percentiles over all the round's requests, output tokens per second, requests per replica) and
writes JSON; asserts no timing. The box's speed drifts: compare rules within a round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import time
from collections import Counter
from types import SimpleNamespace

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_serve import DirectEngines, drive, make_workload  # noqa: E402

from cluster.state import ClusterState  # noqa: E402
from replicas.bench.report import percentile  # noqa: E402
from replicas.config import default_config  # noqa: E402
from replicas.service.router import rank_replicas  # noqa: E402

RULES = ("shortest-queue", "per-room")


class Routed(DirectEngines):
    """DirectEngines whose requests go where `rule` sends them, over a view refreshed in the background."""

    def __init__(self, config, placement: dict[str, list[str]], view_period_s: float) -> None:
        super().__init__(config, placement)
        self.rule = RULES[0]
        self.view_period_s = view_period_s
        self.state = ClusterState()
        self.view = None
        self.replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid)) for rid in self.servers]

    async def refresh(self) -> None:
        """The view from every replica's report, as the controller makes it (reports run on the engine
        threads, so off this loop)."""
        loop = asyncio.get_running_loop()
        while True:
            for server in self.servers.values():
                self.state.ingest(await loop.run_in_executor(None, server.report), time.time())
            self.view = self.state.decide(time.time()).view
            await asyncio.sleep(self.view_period_s)

    def pick(self, model: str, replica: str | None) -> str:
        in_flight = {rid: self._in_flight[rid] for rid in self.servers}
        ranks = rank_replicas(self.view, model, self.replicas, in_flight if self.rule == "per-room" else None)
        first = [r.replica_id.unique_id for r in ranks[0]]  # one host (per-room), or the group as a whole
        return min(first, key=lambda rid: in_flight[rid])  # Serve: the shortest queue in the group


async def run_rule(engines: Routed, rule: str, workload, warmup, concurrency: int) -> dict:
    engines.rule = rule
    refresher = asyncio.create_task(engines.refresh())
    try:
        while engines.view is None:
            await asyncio.sleep(0.01)
        await drive(warmup, concurrency, engines.one)
        start = time.perf_counter()
        results = await drive(workload, concurrency, engines.one)
        wall = time.perf_counter() - start
    finally:
        refresher.cancel()
        engines.view = None
    failed = [r for r in results if r.error or r.ttft_s is None]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed under {rule}: {failed[0].error}")
    return {"ttft_s": [r.ttft_s for r in results], "tokens": sum(r.num_tokens for r in results), "wall_s": wall,
            "by_replica": Counter(f"{r.replica}/{r.model}" for r in results)}


def summary(runs: list[dict]) -> dict:
    ttft = [x for run in runs for x in run["ttft_s"]]
    by_replica = sum((run["by_replica"] for run in runs), Counter())
    return {f"ttft_{name}_ms": round(1000 * percentile(ttft, q), 1)
            for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))} | {
        "tok_s": round(sum(r["tokens"] for r in runs) / sum(r["wall_s"] for r in runs), 1),
        "num_requests": len(ttft), "by_replica": dict(sorted(by_replica.items()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3, help="workloads per rule and round (seeds 0..N-1)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--view-period-s", type=float, default=0.5,
                    help="how often the view is remade (a replica reports every 0.5 s, a router refreshes every 0.5 s)")
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args(argv)

    config = default_config()
    models = [m.name for m in config.models]
    placement = {"r0": models, "r1": models[:-1]}
    engines = Routed(config, placement, args.view_period_s)
    rounds = []
    try:
        for k in range(args.rounds):
            runs: dict[str, list[dict]] = {rule: [] for rule in RULES}
            for seed in range(args.seeds):
                workload = make_workload(args.requests, models, seed, args.max_tokens)
                warmup = make_workload(args.concurrency, models, seed + 1000, args.max_tokens)
                for rule in RULES if (k + seed) % 2 == 0 else RULES[::-1]:
                    runs[rule].append(asyncio.run(run_rule(engines, rule, workload, warmup, args.concurrency)))
            rounds.append({rule: summary(r) for rule, r in runs.items()})
    finally:
        engines.close()

    print(f"placement: {placement}; {args.seeds} workloads of {args.requests} requests per rule and round, "
          f"{args.concurrency} clients, view remade every {args.view_period_s:g} s")
    print(f"{'round':>5}  {'rule':15} {'TTFT p50':>9} {'p90':>7} {'p99':>7} {'max':>7} {'tok/s':>7}  "
          "requests per replica")
    for k, r in enumerate(rounds, 1):
        for rule in RULES:
            s = r[rule]
            per = Counter()
            for key, n in s["by_replica"].items():
                per[key.split("/")[0]] += n
            print(f"{k:>5}  {rule:15} {s['ttft_p50_ms']:9.1f} {s['ttft_p90_ms']:7.1f} {s['ttft_p99_ms']:7.1f} "
                  f"{s['ttft_max_ms']:7.1f} {s['tok_s']:7.1f}  {dict(sorted(per.items()))}")
    print("(ms; TTFT over every request of the round's workloads)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"placement": placement, "seeds": args.seeds, "requests": args.requests,
                                         "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                                         "view_period_s": args.view_period_s, "rounds": rounds}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
