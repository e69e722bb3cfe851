"""Microbenchmarks of the memory engine: reclaim bookkeeping, restore bandwidth, KV block ops.

    python scripts/bench_remap.py --json out/bench_remap.json [--device cpu] [--layers 32] [--hidden 1024]

Prints a table and writes JSON with:
  reclaim_us_per_layer    time to reclaim one layer (bookkeeping only: no bytes move)
  restore_vs_copy_ratio   restore bandwidth / bandwidth of a plain torch copy of the same bytes
                          (host -> device), both measured in this run, median of the repetitions
  kv_block_ops_per_s      KV block operations per second: every block allocated (one at a time, as
                          decode grows a sequence) and every block freed (a whole sequence at once)
                          counts as one operation
Numbers are measurements of this machine at this moment; compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import torch

from remap import BACKEND_KINDS, DeviceMemory, KVGeometry, ModelId, SeqId, make_backend


def make_model(num_layers: int, hidden: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    layers = [{f"w{j}": torch.randn(hidden, hidden, generator=g) * 0.1 for j in range(4)} for _ in range(num_layers)]
    return layers, {"embed": torch.randn(1024, hidden, generator=g) * 0.1}


def bench_reclaim_restore(mem: DeviceMemory, model: ModelId, num_layers: int, reps: int) -> dict[str, float]:
    reclaim_s, restore_s, copy_s = [], [], []
    for rep in range(reps):
        start = time.perf_counter()
        for layer in range(num_layers):
            mem.reclaim(model, layer)
        reclaim_s.append((time.perf_counter() - start) / num_layers)
        for layer in range(num_layers):
            # Alternate which of the pair goes first: the second one finds the bytes warm in cache.
            if (rep + layer) % 2:
                restore_s.append(_time_restore(mem, model, layer))
                copy_s.append(_time_plain_copy(mem, model, layer))
            else:
                copy_s.append(_time_plain_copy(mem, model, layer))
                restore_s.append(_time_restore(mem, model, layer))
    nbytes = mem.params.slab(model, 0).num_bytes
    restore_bw, copy_bw = nbytes / statistics.median(restore_s), nbytes / statistics.median(copy_s)
    return {
        "layer_bytes": nbytes,
        "reclaim_us_per_layer": statistics.median(reclaim_s) * 1e6,
        "restore_gb_per_s": restore_bw / 1e9,
        "copy_gb_per_s": copy_bw / 1e9,
        "restore_vs_copy_ratio": restore_bw / copy_bw,
    }


def _time_restore(mem: DeviceMemory, model: ModelId, layer: int) -> float:
    if mem.params.is_resident(model, layer):
        mem.reclaim(model, layer)
    start = time.perf_counter()
    assert mem.restore(model, layer).restored
    _sync(mem.device)
    return time.perf_counter() - start


def _time_plain_copy(mem: DeviceMemory, model: ModelId, layer: int) -> float:
    """The baseline: the same host bytes into the same device bytes, with no bookkeeping."""
    if not mem.params.is_resident(model, layer):  # a vmm slab range has no pages behind it while reclaimed
        assert mem.restore(model, layer).restored
    slab = mem.params.slab(model, layer)
    dst = mem.params.slab_bytes(model, layer)
    _sync(mem.device)
    start = time.perf_counter()
    dst.copy_(slab.host)
    _sync(mem.device)
    return time.perf_counter() - start


def bench_kv_ops(mem: DeviceMemory, model: ModelId, num_seqs: int, blocks_per_seq: int, rounds: int) -> float:
    kv = mem.kv[model]
    ops = 0
    start = time.perf_counter()
    for r in range(rounds):
        seqs = [SeqId(r * num_seqs + i) for i in range(num_seqs)]
        for _ in range(blocks_per_seq):  # decode: every sequence grows by one block
            for seq in seqs:
                kv.alloc(seq, 1)
        for seq in seqs:
            kv.free(seq)
        ops += 2 * num_seqs * blocks_per_seq
    return ops / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=pathlib.Path, help="write results here")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="arena", choices=BACKEND_KINDS, help="remap/vmm.py for vmm")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024, help="layer = 4 hidden x hidden fp32 matrices")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # the copy baseline and the restore use the same threads
    layers, base = make_model(args.layers, args.hidden)
    page = 2 << 20
    layer_pages = -(-4 * args.hidden * args.hidden * 4 // page)
    kv_pages = 1024
    num_pages = args.layers * layer_pages + 4 + kv_pages
    mem = DeviceMemory(num_pages, page, device=args.device,
                       backend=make_backend(args.backend, num_pages, page, args.device))
    model = ModelId("bench")
    mem.register_model(model, layers, base, KVGeometry(32, 8, 128, torch.float16))

    results = bench_reclaim_restore(mem, model, args.layers, args.reps)
    results["kv_block_ops_per_s"] = bench_kv_ops(mem, model, num_seqs=256, blocks_per_seq=16, rounds=20)
    mem.check_integrity()
    results.update(device=str(mem.device), backend=args.backend, machine=platform.machine(), torch=torch.__version__,
                   num_layers=args.layers, page_size_bytes=page)

    print(f"{'metric':<24} {'value':>14}   target")
    print(f"{'reclaim_us_per_layer':<24} {results['reclaim_us_per_layer']:>14.2f}   bookkeeping only")
    print(f"{'restore_gb_per_s':<24} {results['restore_gb_per_s']:>14.2f}")
    print(f"{'copy_gb_per_s':<24} {results['copy_gb_per_s']:>14.2f}   plain torch copy, same bytes")
    print(f"{'restore_vs_copy_ratio':<24} {results['restore_vs_copy_ratio']:>14.3f}   >= 0.9")
    print(f"{'kv_block_ops_per_s':<24} {results['kv_block_ops_per_s']:>14,.0f}   >= 500,000")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    mem.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
