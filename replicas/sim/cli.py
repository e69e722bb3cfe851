"""`oneiros sim`: the paper's experiments on the simulator, every policy, one table per sweep point."""

from __future__ import annotations

import json
import pathlib
import sys

from replicas.sim.report import compare, format_table
from replicas.sim.run import POLICIES, SimSettings, simulate_all


def run_sim_cli(args) -> int:
    from replicas.sim.presets import get_device, get_preset

    if args.paper_table:
        return _paper_table(args)
    try:
        if not args.preset:
            raise ValueError("give --preset NAME or --paper-table")
        preset, device = get_preset(args.preset), get_device(args.device)
        policies = tuple(args.policies.split(",")) if args.policies else POLICIES
        bad = set(policies) - set(POLICIES)
        if bad:
            raise KeyError(f"unknown policies {sorted(bad)}; available: {POLICIES}")
        if args.max_batched_tokens is not None and args.max_batched_tokens < 1:
            raise ValueError(f"--max-batched-tokens must be >= 1, got {args.max_batched_tokens}")
        duration = args.duration or preset.default_duration_s
        points = preset.workloads(duration, args.seed, args.trace)
    except (KeyError, FileNotFoundError, ValueError) as exc:
        print(f"oneiros sim: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    models = preset.models()
    settings = SimSettings(scheduler=args.scheduler, max_num_batched_tokens=args.max_batched_tokens)
    out = {"preset": preset.name, "device": device.name, "duration_s": duration, "seed": args.seed,
           "scheduler": settings.scheduler, "max_num_batched_tokens": settings.max_num_batched_tokens,
           "models": list(models), "points": {}}
    for label, requests in points:
        print(f"{preset.name} on {device.name}, {label}: {len(requests)} requests over {duration:g} s", flush=True)
        table = compare(simulate_all(requests, models, device, policies, settings))
        print(format_table(table), flush=True)
        out["points"][label] = table
    if len(points) == 1:
        out["policies"] = next(iter(out["points"].values()))  # the single point's table, at the top level too
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
    if args.plots:
        from replicas.bench.report import write_sweep_plot

        metrics = {"p99_tbt_s": "P99 TBT (s)", "p99_max_tbt_s": "P99 worst stall (s)", "p99_ttft_s": "P99 TTFT (s)",
                   "throughput_tok_s": "throughput (tok/s)"}
        png = write_sweep_plot(out["points"], metrics, pathlib.Path(args.plots) / f"sim_{preset.name}_{args.device}.png",
                               f"{preset.name} on {device.name}")
        if png:
            print(f"wrote {png}")
    return 0


def _paper_table(args) -> int:
    from replicas.sim.paper import format_paper_table, paper_table
    from replicas.sim.presets import get_device, resolve_trace

    try:
        device = get_device(args.device)
        trace = str(resolve_trace(args.trace))
    except (KeyError, FileNotFoundError) as exc:
        print(f"oneiros sim: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    table = paper_table(device, args.duration, args.seed, trace, args.workers, progress=lambda s: print(s, flush=True))
    print(format_paper_table(table), flush=True)
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1))
    return 0
