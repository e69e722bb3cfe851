"""Autoscaling policies compared in the fleet simulator: GPU-hours against P99 TTFT.

    python scripts/sim_autoscaling.py --trace ../shared/traces/azure-llm-2023/AzureLLMInferenceTrace_code.csv \
        --json out/sim_autoscaling.json [--device gh200] [--duration 3600] [--max-replicas 6]

The mix C1 models on simulated devices (replicas/sim/fleet.py); `memory` is our policy
(autoscaler/policy.py), `queue` is Ray Serve's default (ongoing requests per replica, with Serve's
default delays). Prints a markdown table and writes JSON; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from autoscaler.policy import ScalingConfig
from replicas.sim.fleet import FleetSettings, simulate_fleet
from replicas.sim.presets import DEVICES, get_preset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", required=True, help="AzureLLMInferenceTrace_code.csv")
    ap.add_argument("--device", default="gh200", choices=sorted(DEVICES))
    ap.add_argument("--duration", type=float, default=3600.0, help="seconds of the trace to replay")
    ap.add_argument("--max-replicas", type=int, default=6)
    ap.add_argument("--target-ongoing", default="32,8,2",
                    help="the queue policy's per-replica targets to try, comma-separated")
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args(argv)
    if not pathlib.Path(args.trace).is_file():
        print(f"sim_autoscaling: no trace at {args.trace}", file=sys.stderr)
        return 2
    preset = get_preset("c1")
    (name, workload), = preset.workloads(args.duration, 0, args.trace)[:1]
    models, device = preset.models(), DEVICES[args.device]
    scaling = ScalingConfig(min_replicas=1, max_replicas=args.max_replicas)
    rows = {}
    runs = [("memory", "memory", 32.0)] + [(f"queue (target {t:g})", "queue", t)
                                           for t in map(float, args.target_ongoing.split(","))]
    for label, policy, target in runs:
        start = time.perf_counter()
        result = simulate_fleet(workload, models, device, FleetSettings(policy=policy, scaling=scaling,
                                                                         target_ongoing_requests=target))
        rows[label] = {"gpu_hours": result.gpu_hours, "max_replicas": result.max_replicas,
                        "p99_ttft_s": result.summary["p99_ttft_s"], "p50_ttft_s": result.summary["p50_ttft_s"],
                        "p99_tbt_s": result.summary["p99_tbt_s"], "num_requests": result.summary["num_requests"],
                        "wall_s": time.perf_counter() - start}
    print(f"{name} (mix C1) on {device.name}, {args.duration:.0f} s of the trace, max {args.max_replicas} replicas\n")
    print("| policy | GPU-hours | max replicas | P50 TTFT s | P99 TTFT s | P99 TBT s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for policy, r in rows.items():
        print(f"| {policy} | {r['gpu_hours']:.2f} | {r['max_replicas']} | {r['p50_ttft_s']:.2f} | "
              f"{r['p99_ttft_s']:.2f} | {r['p99_tbt_s']:.3f} | {r['wall_s']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device.name, "duration_s": args.duration, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
