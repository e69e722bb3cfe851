"""One command that checks and measures the GPU path, for a session that has a GPU for minutes.

    python scripts/gpu_check.py OUT_DIR [--quick] [--skip-scale]

Writes OUT_DIR/gpu_check.json and prints a table. Each part runs on its own and records an error
instead of stopping the rest, so one run always returns everything it could measure:

  tests             the `gpu` tests (pytest -m gpu): copy-stream restore/streaming bit-identical,
                    engine greedy output on CUDA with a remapped layer equals the CPU engine, and
                    the CUDA VMM backend (cuMemMap): a layer restored into other pages, same address
  h2d_gb_per_s      pinned host->device copy bandwidth alone, and while device->host copies run
  restore_*         scripts/bench_remap.py on CUDA, arena and vmm backends: restore bandwidth / raw
                    pinned copy (>= 0.9); vmm maps scattered pages with cuMemMap first
  streaming         forward time of a Llama-shaped model with alpha layers streamed vs none
  multi_tenant      three Llama-3-8B-shaped dummy tenants on one card, remap (arena, vmm) / recompute / swap
                    (skipped with --skip-scale or when the card is too small)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time
import traceback

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def part(results: dict, name: str):
    """Decorator: run a part, store its result or its error under `name`."""
    def wrap(fn):
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - record and go on
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        results[name + "_wall_s"] = round(time.perf_counter() - start, 2)
        return fn
    return wrap


def h2d_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> dict:
    src = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    back_src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    back_dst = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)

    def timed(copy_back: bool) -> float:
        other = torch.cuda.Stream()
        best = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            if copy_back:
                with torch.cuda.stream(other):
                    back_dst.copy_(back_src, non_blocking=True)
            dst.copy_(src, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            best = min(best, time.perf_counter() - start)
            torch.cuda.synchronize()
        return num_bytes / best / 1e9

    return {"h2d_alone_gb_per_s": timed(False), "h2d_with_d2h_gb_per_s": timed(True)}


def streaming(num_layers: int = 32, hidden: int = 4096, batch: int = 64, alphas=(0, 2, 4, 8)) -> dict:
    """Forward time of `num_layers` Llama-sized MLP+attention projections with alpha layers streamed
    through 2 staging slots on the copy stream, against none (compute alone)."""
    from remap import DeviceMemory, KVGeometry, ModelId

    dtype, inter = torch.float16, int(hidden * 3.5)
    g = torch.Generator().manual_seed(0)
    layers = [{"qkvo": torch.randn(4 * hidden, hidden, generator=g).to(dtype) * 0.02,
               "mlp": torch.randn(3 * inter, hidden, generator=g).to(dtype) * 0.02} for _ in range(num_layers)]
    base = {"norm": torch.ones(hidden, dtype=dtype)}
    layer_bytes = sum(t.numel() * 2 for t in layers[0].values())
    page = 2 << 20
    mem = DeviceMemory(num_layers * (layer_bytes // page + 2) + 64, page, device="cuda")
    model = ModelId("m")
    mem.register_model(model, layers, base, KVGeometry(num_layers, 8, 128, dtype))
    x = torch.randn(batch, hidden, device="cuda", dtype=dtype)
    out = {"layer_mb": layer_bytes / 2**20}
    for alpha in alphas:
        remapped = [round((i + 0.5) * num_layers / alpha) for i in range(alpha)] if alpha else []
        for layer in remapped:
            mem.reclaim(model, layer)
        ring = mem.open_stream(model, 2) if remapped else None
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            if ring:
                ring.begin_pass(remapped)
            h = x
            for i in range(num_layers):
                w = ring.acquire(i) if i in remapped else mem.params.tensors(model, i)
                h = h + (h @ w["qkvo"][:hidden].T)
                h = h + (h @ w["mlp"][:hidden].T)
                if i in remapped:
                    ring.release(i)
            if ring:
                ring.finish()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[f"alpha_{alpha}_ms"] = 1e3 * sorted(times)[len(times) // 2]
        if ring:
            mem.close_stream(model)
        for layer in remapped:
            mem.restore(model, layer)
    mem.close()
    return out


def multi_tenant(num_pages: int, steps: int = 200) -> dict:
    """Three Llama-3-8B-shaped dummy tenants (fp16) on one card, one engine per mode (remap on both backends)."""
    from remap import DeviceMemory, make_backend
    from replicas.engine.engine import EngineConfig, LLMEngine
    from replicas.engine.models import ModelConfig, dummy_weights
    from replicas.engine.sampling import SamplingParams
    from replicas.engine.scheduler import PreemptionMode, SchedulerConfig

    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
          "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "float16",
          "bos_token_id": 1, "eos_token_id": 2}
    config = ModelConfig.from_hf(hf)
    state = {k: v.half() for k, v in dummy_weights(config, 0, std=0.02).items()}
    results = {}
    for run in ("remap", "remap-vmm", "recompute", "swap"):
        mode, _, backend = run.partition("-")
        memory = DeviceMemory(num_pages, 2 << 20, device="cuda",
                              backend=make_backend(backend or "arena", num_pages, 2 << 20, "cuda"))
        engine = LLMEngine(memory, EngineConfig(scheduler=SchedulerConfig(2048, 64, PreemptionMode(mode))))
        for name in ("a", "b", "c"):
            engine.add_model(name, config, state, eos_token_ids=())
        g = torch.Generator().manual_seed(0)
        for i in range(48):
            tenant = "a" if i % 4 else ("b" if i % 8 else "c")
            prompt = torch.randint(3, 32000, (int(torch.randint(256, 2048, (), generator=g)),), generator=g).tolist()
            engine.add_request(tenant, prompt, SamplingParams(max_tokens=128, ignore_eos=True))
        start, n = time.perf_counter(), 0
        while engine.has_unfinished() and n < steps:
            engine.step()
            n += 1
        torch.cuda.synchronize()
        tbt = sorted(x for m in engine.models for x in engine.tenant_stats(m).tbt_s)
        results[run] = {"steps": n, "blocks_migrated": memory.num_blocks_migrated, "wall_s": time.perf_counter() - start,
                         "p50_tbt_s": tbt[len(tbt) // 2] if tbt else None,
                         "p99_tbt_s": tbt[int(0.99 * (len(tbt) - 1))] if tbt else None,
                         "preemptions": engine.num_preemptions,
                         "layers_streamed": engine.num_layers_streamed}
        engine.close()
        del engine
        torch.cuda.empty_cache()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--skip-scale", action="store_true", help="skip the 8B-scale multi-tenant run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    results: dict = {"device": props.name, "memory_gib": props.total_memory / 2**30, "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d %H:%M:%S")}

    @part(results, "tests")
    def _tests():
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/unit"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, check=False)
        return {"returncode": proc.returncode, "tail": proc.stdout[-1500:]}

    part(results, "h2d")(lambda: h2d_bandwidth(256 << 20 if args.quick else 1 << 30))

    def restore(backend: str) -> dict:
        path = args.out / f"bench_remap_cuda_{backend}.json"
        proc = subprocess.run([sys.executable, "scripts/bench_remap.py", "--device", "cuda", "--backend", backend,
                               "--json", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        return json.loads(path.read_text()) if path.exists() else {"error": proc.stderr[-1500:]}

    for backend in ("arena", "vmm"):
        part(results, f"restore_{backend}")(lambda backend=backend: restore(backend))

    part(results, "streaming")(lambda: streaming(8 if args.quick else 32, 1024 if args.quick else 4096))
    if not args.skip_scale and props.total_memory > 60 * 2**30:
        part(results, "multi_tenant")(lambda: multi_tenant(int(props.total_memory * 0.85) // (2 << 20)))
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    for key, value in results.items():
        print(f"{key:<20} {json.dumps(value, default=str)[:200]}")
    print(f"wrote {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
