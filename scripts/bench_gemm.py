"""Which CPU GEMM should the engine's float32 projections use on this machine? One pass over a
model's projection weights at several row counts, with MKL (F.linear), oneDNN on plain weights in
place (what ops.project calls for a large weight the engine was told to keep plain) and oneDNN on
weights reordered to its blocked layout (what ops.blocked stores in the slab, and what vLLM's CPU
backend does at load), interleaved.

    python scripts/bench_gemm.py [--json out/bench_gemm.json] [--threads 2]

The default shapes are bench_engine's mid-size Llama (hidden 768, 12 layers, intermediate 2048, 12 / 4
heads of 64, vocab 32000): per layer the fused qkv, o, fused gate_up and down projections, then the
lm_head. Also prints, per weight size, the row counts where oneDNN in place beats MKL, which is what
ops.ONEDNN_MIN_WEIGHT was set from. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from replicas.engine.models import ops

LAYER = [(1280, 768), (768, 768), (4096, 768), (768, 2048)]  # (out, in): qkv, o, gate_up, down
MODEL = LAYER * 12 + [(32000, 768)]
ROWS = (1, 4, 16, 32)
SIZES = [(256, 128), (512, 256), (576, 576), (768, 512), (1024, 512), (1536, 576), (768, 1024)]


def _pass_ms(fn, weights, xs) -> float:
    start = time.perf_counter()
    for w in weights:
        fn(xs[w.shape[1]], w)
    return (time.perf_counter() - start) * 1e3


def _call_us(fn, x, w, n: int) -> float:
    for _ in range(10):
        fn(x, w)
    start = time.perf_counter()
    for _ in range(n):
        fn(x, w)
    return (time.perf_counter() - start) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if ops._ONEDNN is None:
        sys.exit("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    onednn = lambda x, w: ops._ONEDNN(x, w, None, "none", [], "")  # noqa: E731
    mkl = lambda x, w: F.linear(x, w)  # noqa: E731
    weights = [torch.randn(n, k) * 0.1 for n, k in MODEL]
    blocked = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    kinds = {"mkl": (mkl, weights), "onednn": (onednn, weights), "onednn_blocked": (onednn, blocked)}
    model_mb = sum(w.numel() * 4 for w in weights) / 1e6
    print(f"one pass over {len(weights)} weights ({model_mb:.0f} MB), ms, median of {args.rounds} interleaved rounds")
    print(f"{'rows':>5}" + "".join(f"{k:>16}" for k in kinds))
    passes = {}
    for m in ROWS:
        xs = {k: torch.randn(m, k) for k in {k for _, k in MODEL}}
        times = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for k, (fn, ws) in kinds.items():
                times[k].append(_pass_ms(fn, ws, xs))
        passes[m] = {k: statistics.median(v) for k, v in times.items()}
        print(f"{m:>5}" + "".join(f"{passes[m][k]:>16.1f}" for k in kinds))
    print("\nper call, us (MKL / oneDNN in place), and the rows where oneDNN wins")
    calls = {}
    for n, k in SIZES:
        w = torch.randn(n, k)
        row = {m: (_call_us(mkl, torch.randn(m, k), w, 50 if m > 64 else 300),
                   _call_us(onednn, torch.randn(m, k), w, 50 if m > 64 else 300)) for m in (1, 16, 256)}
        calls[f"{n}x{k}"] = {"elements": n * k, "us": {str(m): v for m, v in row.items()}}
        wins = [m for m, (a, b) in row.items() if b < a]
        print(f"{n:>5} x {k:<5} ({n * k / 1e3:>4.0f}K): "
              + "  ".join(f"M{m} {a:.0f}/{b:.0f}" for m, (a, b) in row.items()) + f"   oneDNN wins at {wins}")
    print(f"\nops.ONEDNN_MIN_WEIGHT = {ops.ONEDNN_MIN_WEIGHT} elements")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "model_mb": model_mb,
                                         "pass_ms": {str(m): v for m, v in passes.items()}, "calls": calls,
                                         "onednn_min_weight": ops.ONEDNN_MIN_WEIGHT}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
