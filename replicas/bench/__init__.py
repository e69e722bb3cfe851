"""`oneiros bench`: replay a seeded multi-tenant workload against any OpenAI-compatible endpoint.

    workload.py  seeded request lists (Zipf tenants; Poisson, Gamma or Azure-trace arrivals), save / load
    client.py    the open-loop streaming driver and its per-request records
    report.py    percentiles, throughput, goodput under SLOs; markdown, JSON, PNG plots

`run_bench(args)` is the CLI glue: build or load the workload, check the server, replay, report. Bad input
(numbers, a missing trace, an unreachable URL) is a one-line message and exit status 2 or 1, never a
stack trace. No Ray here: the bench is a client.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys

from replicas.bench import workload as wl


def _fail(message: str, code: int = 2) -> int:
    print(f"oneiros bench: {message}", file=sys.stderr)
    return code


def _check_numbers(args) -> str | None:
    positive = {"--rate": args.rate, "--duration": args.duration, "--slo-ttft-s": args.slo_ttft_s,
                "--slo-tbt-s": args.slo_tbt_s, "--time-scale": args.time_scale, "--cv": args.cv}
    for name, value in positive.items():
        if not value > 0:  # also catches nan
            return f"{name} must be > 0, got {value}"
    if args.concurrency < 1:
        return f"--concurrency must be >= 1, got {args.concurrency}"
    if args.max_requests is not None and args.max_requests < 1:
        return f"--max-requests must be >= 1, got {args.max_requests}"
    if args.zipf_s < 0:
        return f"--zipf-s must be >= 0, got {args.zipf_s}"
    return None


def build_workload(args, num_tenants: int) -> wl.Workload:
    """The workload the arguments ask for; ValueError / OSError on bad input."""
    if args.workload_file:
        return wl.load(args.workload_file)
    prompt, output = wl.LengthDist.parse(args.prompt_len), wl.LengthDist.parse(args.output_len)
    if args.workload == "azure":
        if not args.trace:
            raise ValueError("--workload azure needs --trace PATH (an AzureLLMInferenceTrace_*.csv)")
        if not pathlib.Path(args.trace).is_file():
            raise FileNotFoundError(f"trace file not found: {args.trace}")
        return wl.azure_trace(args.trace, num_tenants, args.seed, args.max_requests, args.time_scale, args.zipf_s,
                              max_prompt_len=prompt.max_len, max_output_len=output.max_len)
    common = {"rate_per_s": args.rate, "duration_s": args.duration, "zipf_s": args.zipf_s,
              "prompt_len": prompt, "output_len": output, "seed": args.seed}
    if args.workload == "gamma":
        return wl.gamma(num_tenants, cv=args.cv, **common)
    return wl.zipf_poisson(num_tenants, **common)


def parse_endpoints(base_url: str) -> dict[str, str] | None:
    """`MODEL=URL,MODEL=URL` -> {model: url} in order; None for a single URL. ValueError if malformed."""
    if "=" not in base_url:
        return None
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in base_url.split(","))):
        model, sep, url = part.partition("=")
        if not sep or not model or not url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url {part!r}: expected MODEL=http://host:port/v1")
        if model in out:
            raise ValueError(f"--base-url names model {model!r} twice")
        out[model] = url
    return out


async def _run(args, models: list[str] | None) -> tuple[wl.Workload, dict[str, str], list] | int:
    """Check the server(s), build the workload for the tenants, replay it; an exit status on failure."""
    from replicas.bench.client import ApiError, SseClient, Unreachable, run_workload

    endpoints = parse_endpoints(args.base_url) or {None: args.base_url}
    clients = {model: SseClient(url) for model, url in endpoints.items()}
    try:
        served = []
        for model, client in clients.items():
            try:
                served += await client.models()
            except Unreachable as exc:
                return _fail(f"cannot reach {endpoints[model]}: {exc}", 1)
            except ApiError as exc:  # no /models route: trust --models
                if not models and model is None:
                    return _fail(f"GET {args.base_url}/models failed ({exc}); pass --models", 1)
        if None not in clients:  # one endpoint per model: the endpoints name the tenants
            models = models or list(clients)
            if missing := sorted(set(models) - clients.keys()):
                return _fail(f"--models {missing} have no endpoint in --base-url")
        models = models or served
        if not models:
            return _fail(f"{args.base_url} serves no models", 1)
        work = build_workload(args, len(models))
        mapping = {wl.tenant_name(i): m for i, m in enumerate(models)}
        print(f"bench: {len(work.requests)} requests ({work.generator}, seed {work.seed}), tenants "
              f"{wl.tenant_counts(work.requests)} -> {mapping}, concurrency {args.concurrency}", flush=True)
        records = await run_workload(clients.get(None) or clients, work.requests, mapping, args.concurrency,
                                     seed=work.seed, progress=None if args.quiet else sys.stderr)
        return work, mapping, records
    finally:
        for client in clients.values():
            await client.close()


def run_bench(args) -> int:
    from replicas.bench import report

    if (why := _check_numbers(args)) is not None:
        return _fail(why)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    errors: list[str] = []
    try:  # validate the workload before touching the network (a missing trace needs no server)
        parse_endpoints(args.base_url)
        build_workload(args, len(models) if models else 1)
    except (OSError, ValueError, KeyError) as exc:
        return _fail(str(exc))
    out = asyncio.run(_run(args, models))
    if isinstance(out, int):
        return out
    work, mapping, records = out
    summary = report.summarize(records, args.slo_ttft_s, args.slo_tbt_s)
    table = report.format_markdown(summary, mapping)
    print(table)
    for index, why in list(summary["failures"].items())[:10]:
        errors.append(f"  request {index} failed: {why}")
    print("\n".join(errors + ([f"  ... {len(summary['failures']) - 10} more"] if len(summary["failures"]) > 10
                              else [])) or "bench: no request failed")
    if args.json:
        result = {"base_url": args.base_url, "models": mapping, "concurrency": args.concurrency,
                  "summary": summary, "workload": wl.to_json(work),
                  "records": [report.record_json(r) for r in records]}
        _write(args.json, json.dumps(result, indent=1))
    if args.markdown:
        _write(args.markdown, table + "\n")
    if args.plots:
        for path in report.write_plots(records, summary, args.plots):
            print(f"wrote {path}")
    return 0


def _write(path: str, text: str) -> None:
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    print(f"wrote {p}")
