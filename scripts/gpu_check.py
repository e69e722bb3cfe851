"""One command that checks and measures the GPU path, for a session that has a GPU for minutes.

    PYTHONPATH=$PWD python3 scripts/gpu_check.py OUT_DIR [--quick] [--skip-scale] [--device cpu]

Needs nothing but what the GPU machine's image has (torch, transformers, cuda-bindings) and pytest
for the tests part; it is run from the checkout, never installed. Writes OUT_DIR/gpu_check.json
after every part (a run cut short keeps what it measured), prints a table, and exits 1 if a part
failed or a check did not hold, 2 without a CUDA device. Each part runs on its own, records an
error instead of stopping the rest, and frees its device memory before the next:

  environment     python, torch, CUDA, driver, cuda-bindings versions; the attention backend
  tests           the `gpu` tests of the modules that import here (a module needing fastapi, openai,
                  ray or pydantic is left out, with why); fails if none ran or any was skipped
  bandwidth       device memory bandwidth (a device-to-device copy); pinned host->device copies
                  alone and while device->host copies run
  decode          decode step of a Llama-3-8B-shaped model (fp16, random weights) at batch 1, 32
                  and 64 with 1k context, against the floor: (weights + KV read) / bandwidth.
                  `decode_step_vs_floor` is the ratio at batch 32 (goal <= 1.5)
  restore_*       scripts/bench_remap.py on CUDA, arena and vmm backends: restore bandwidth against
                  a raw pinned copy
  streaming       the same model's decode step with 0, 2, 4, 8 whole layers streamed through two
                  staging slots (real compute, the engine's LayerSource), against none
  multi_tenant    three 8B-shaped tenants in a pool with KV room for 16k tokens (so remapping has
                  to happen), remap against recompute; checks layers streamed > 0 under remap and
                  preemptions > 0 under recompute (skipped with --skip-scale or on a small card)

--device cpu runs every part that can run without CUDA on a shrunken model: a smoke test of this
script, not a measurement. --quick shrinks the model and the runs (a smoke run on a GPU).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ABSENT_ON_GPU_IMAGE = ("fastapi", "openai", "ray", "pydantic")  # what the GPU machine's image lacks
PAGE = 2 << 20  # bytes: the CUDA VMM granularity, as the engine uses on CUDA
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "float16",
    "bos_token_id": 1, "eos_token_id": 2,
}
SHRUNK = {"vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 2}  # --quick / --device cpu


# ---- running parts -------------------------------------------------------------------------------
class Report:
    """The results so far; each part's outcome lands under its name and the JSON is rewritten."""

    def __init__(self, out: pathlib.Path, device: str) -> None:
        self.out, self.device, self.results = out, device, {}
        self.failed: list[str] = []

    def run(self, name: str, fn: Callable[[], dict]) -> dict | None:
        start = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            result = fn()
            if isinstance(result, dict) and result.get("ok") is False:
                self.failed.append(name)
        except Exception as exc:  # noqa: BLE001 - record and go on
            result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            self.failed.append(name)
        self.results[name] = result
        self.results[name + "_wall_s"] = round(time.perf_counter() - start, 2)
        if self.device == "cuda":
            self.results[name + "_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        free_memory(self.device)
        self.write()
        return result

    def write(self) -> None:
        self.results["failed_parts"] = self.failed
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str))


def free_memory(device: str) -> None:
    """What a finished part left behind goes back before the next part starts."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def child_env() -> dict[str, str]:
    """The environment of every subprocess: this checkout first on PYTHONPATH (nothing is installed)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def timed(fn: Callable[[], object], device: str, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- environment and tests -----------------------------------------------------------------------
def environment(device: str) -> dict:
    from replicas.engine.models.attention import DEFAULT_BACKEND

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cuda_bindings": _package_version("cuda-bindings", "cuda-python"), "driver": _driver_version(),
           "transformers": _package_version("transformers"), "pytest": _package_version("pytest"),
           "attention_backend": DEFAULT_BACKEND,
           "flashinfer_importable": importlib.util.find_spec("flashinfer") is not None,
           "absent_here": [m for m in ABSENT_ON_GPU_IMAGE if importlib.util.find_spec(m) is None],
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}"}
    return env


def _package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _driver_version() -> str | None:
    """The CUDA driver's version, from cuda-bindings if importable, else nvidia-smi; None if neither."""
    try:
        from cuda.bindings import driver  # optional: the GPU image has it

        err, version = driver.cuDriverGetVersion()
        if int(err) == 0:
            return f"{version // 1000}.{version % 1000 // 10} (CUDA driver API)"
    except Exception:  # noqa: BLE001, S110 - try the next source
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - no driver here
        return None


def gpu_test_modules() -> tuple[list[str], dict[str, str]]:
    """(test modules with `gpu` tests that import here, {module left out: why}). Each import is tried
    in its own interpreter, as pytest would, so a missing package shows up before collection."""
    runnable, left_out = [], {}
    for path in sorted((ROOT / "tests" / "unit").glob("test_*.py")):
        if "pytest.mark.gpu" not in path.read_text():
            continue
        module = f"tests.unit.{path.stem}"
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, env=child_env(),
                              capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode == 0:
            runnable.append(str(path.relative_to(ROOT)))
        else:
            left_out[module] = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return runnable, left_out


def gpu_tests(out: pathlib.Path, modules: list[str], left_out: dict[str, str]) -> dict:
    """pytest -m gpu over `modules`; ok only if every selected test ran and passed."""
    if importlib.util.find_spec("pytest") is None:
        return {"ok": False, "error": "pytest is not importable: carry its wheel (and pluggy, iniconfig, packaging) "
                                      "and put it on PYTHONPATH"}
    if not modules:
        return {"ok": False, "error": "no test module with gpu tests imports here", "left_out": left_out}
    xml = out / "gpu_tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu",
                           f"--junitxml={xml}", *modules], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=420, check=False)
    counts = _junit_counts(xml) if xml.exists() else {}
    ok = proc.returncode == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped")
    return {"ok": ok, "modules": modules, "left_out": left_out, "returncode": proc.returncode, **counts,
            "tail": proc.stdout[-3000:]}


def _junit_counts(xml: pathlib.Path) -> dict:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "skipped_tests": []}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        name = f"{case.get('classname')}::{case.get('name')}"
        if "skipped" in kinds:
            counts["skipped"] += 1
            counts["skipped_tests"].append(name)
        elif kinds & {"failure", "error"}:
            counts["failed"] += 1
        else:
            counts["passed"] += 1
    return counts


# ---- bandwidth -----------------------------------------------------------------------------------
def bandwidth(num_bytes: int, repeats: int = 5) -> dict:
    """Device memory bandwidth (read + write of a device copy) and pinned host->device copy rates."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    device_s = timed(lambda: dst.copy_(src), "cuda", repeats)
    host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    back = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    other = torch.cuda.Stream()

    def h2d(copy_back: bool) -> None:
        if copy_back:
            with torch.cuda.stream(other):
                back.copy_(src, non_blocking=True)
        dst.copy_(host, non_blocking=True)
        torch.cuda.current_stream().synchronize()

    alone_s = timed(lambda: h2d(False), "cuda", repeats)
    both_s = timed(lambda: h2d(True), "cuda", repeats)
    return {"device_gb_per_s": 2 * num_bytes / device_s / 1e9, "h2d_alone_gb_per_s": num_bytes / alone_s / 1e9,
            "h2d_with_d2h_gb_per_s": num_bytes / both_s / 1e9}


# ---- the 8B-shaped model -------------------------------------------------------------------------
class ShapedModel:
    """A Llama-3-8B-shaped config (shrunk for --quick / --device cpu) and its random weights, made once."""

    def __init__(self, shrink: bool, dtype: torch.dtype) -> None:
        from replicas.engine.models import ModelConfig

        hf = LLAMA_8B | (SHRUNK if shrink else {})
        hf["torch_dtype"] = {torch.float16: "float16", torch.float32: "float32"}[dtype]
        self.config = ModelConfig.from_hf(hf)
        self._state: dict | None = None

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """Uniform weights of std ~0.02 (norms 1): values do not matter to timing, and uniform_ fills
        16 GB in seconds where randn would take minutes."""
        if self._state is None:
            from replicas.engine.models.architecture import architecture_for

            arch = architecture_for(self.config)
            shapes = {f"{arch.layer_prefix}{i}.{n}": s for i in range(self.config.num_layers)
                      for n, s in arch.layer_shapes().items()} | arch.base_shapes()
            bound = 0.02 * 3**0.5
            self._state = {name: torch.ones(shape, dtype=self.config.dtype) if name.endswith("norm.weight")
                           else torch.empty(shape, dtype=self.config.dtype).uniform_(-bound, bound)
                           for name, shape in shapes.items()}
        return self._state

    def param_pages(self) -> int:
        from remap.params import slab_num_pages
        from replicas.engine.models import split_state_dict

        layers, base = split_state_dict(self.config, self.state)
        return sum(slab_num_pages(t, PAGE) for t in layers) + slab_num_pages(base, PAGE)

    def kv_pages(self, num_seqs: int, tokens_each: int) -> int:
        block = PAGE // self.config.kv_geometry().bytes_per_token
        return num_seqs * -(-tokens_each // block)


class Resident:
    """One shaped model registered alone in a pool sized for it, `kv_tokens` of KV and two staging slots."""

    def __init__(self, model: ShapedModel, device: str, num_seqs: int, tokens_each: int) -> None:
        from remap import BASE_SLAB, DeviceMemory, ModelId
        from remap.params import slab_num_pages
        from replicas.engine.models import CausalLM, split_state_dict

        self.model, self.name = model, ModelId("m")
        layers, base = split_state_dict(model.config, model.state)
        slot_pages = max(slab_num_pages(t, PAGE) for t in layers)
        num_pages = model.param_pages() + model.kv_pages(num_seqs, tokens_each) + 2 * slot_pages + 8
        self.memory = DeviceMemory(num_pages, PAGE, device=device)
        self.kv = self.memory.register_model(self.name, layers, base, model.config.kv_geometry())
        self.base = self.memory.params.tensors(self.name, BASE_SLAB)
        self.lm = CausalLM(model.config)
        self.weight_bytes = sum(t.numel() * t.element_size() for layer in layers for t in layer.values())
        self.weight_bytes += sum(t.numel() * t.element_size() for n, t in base.items() if "embed" not in n)

    def decode_step(self, num_seqs: int, context: int, ring=None) -> Callable[[], object]:
        """fn() running one decode step of num_seqs sequences at `context` tokens (KV allocated here)."""
        from remap import SeqId
        from replicas.engine.executor import LayerSource
        from replicas.engine.models import AttentionBatch

        seqs = [SeqId(i) for i in range(num_seqs)]
        for s in seqs:
            if self.kv.alloc(s, self.kv.num_blocks_for(context)) is None:
                raise RuntimeError(f"no KV room for {num_seqs} x {context} tokens")
        batch = AttentionBatch([1] * num_seqs, [context - 1] * num_seqs, [self.kv.table(s) for s in seqs])
        ids = torch.randint(3, 1000, (num_seqs,), device=self.memory.device)
        remapped = sorted(set(range(self.model.config.num_layers)) - set(self.memory.params.resident_layers(self.name)))

        def step() -> None:
            with torch.inference_mode():
                if ring is not None:
                    ring.begin_pass(remapped)
                self.lm.forward(ids, batch, self.kv.view, LayerSource(self.memory, self.name, ring), self.base)
                if ring is not None:
                    ring.finish()
        return step

    def free_seqs(self) -> None:
        for seq in self.kv.sequences:
            self.kv.free(seq)

    def close(self) -> None:
        self.memory.close()


def decode(model: ShapedModel, device: str, batches: tuple[int, ...], context: int, bytes_per_s: float,
           repeats: int) -> dict:
    """Decode step time against the floor: the bytes a step must read (weights bar the embedding,
    every sequence's KV) at the measured device bandwidth."""
    resident = Resident(model, device, max(batches), context)
    kv_bytes_per_token = model.config.kv_geometry().bytes_per_token
    out: dict = {"attention_backend": resident.lm.attention_backend, "context": context,
                 "weight_gib": round(resident.weight_bytes / 2**30, 2), "bandwidth_gb_per_s": bytes_per_s / 1e9}
    try:
        for b in batches:
            step_s = timed(resident.decode_step(b, context), device, repeats)
            floor_s = (resident.weight_bytes + b * context * kv_bytes_per_token) / bytes_per_s
            out[f"b{b}"] = {"step_ms": 1e3 * step_s, "floor_ms": 1e3 * floor_s, "vs_floor": step_s / floor_s}
            resident.free_seqs()
        key = "b32" if "b32" in out else f"b{batches[-1]}"
        out["decode_step_vs_floor"] = out[key]["vs_floor"]
        out["meets_goal"] = out["decode_step_vs_floor"] <= 1.5  # a goal, not a check: it fails nothing
    finally:
        resident.close()
    return out


def streaming(model: ShapedModel, device: str, alphas: tuple[int, ...], batch: int, context: int,
              repeats: int) -> dict:
    """The decode step with alpha whole layers streamed through two staging slots, against none."""
    resident = Resident(model, device, batch, context)
    num_layers, out = model.config.num_layers, {"batch": batch, "context": context}
    try:
        for alpha in alphas:
            remapped = [int((i + 0.5) * num_layers / alpha) for i in range(alpha)]  # spread, distinct
            for layer in remapped:
                resident.memory.reclaim(resident.name, layer)
            ring = resident.memory.open_stream(resident.name, 2) if remapped else None
            if remapped and ring is None:
                raise RuntimeError("no room for two staging slots")
            out[f"alpha_{alpha}_ms"] = 1e3 * timed(resident.decode_step(batch, context, ring), device, repeats)
            resident.free_seqs()
            if ring is not None:
                resident.memory.close_stream(resident.name)
            for layer in remapped:
                resident.memory.restore(resident.name, layer)
        for alpha in alphas[1:]:
            out[f"alpha_{alpha}_overhead"] = out[f"alpha_{alpha}_ms"] / out[f"alpha_{alphas[0]}_ms"] - 1
    finally:
        resident.close()
    return out


def multi_tenant(model: ShapedModel, device: str, kv_tokens: int, num_requests: int, steps: int) -> dict:
    """Three tenants of the shaped model in a pool with room for all parameters and kv_tokens of KV
    (less than the requests need), remap against recompute, one engine at a time."""
    from remap import DeviceMemory
    from replicas.engine.engine import EngineConfig, LLMEngine
    from replicas.engine.sampling import SamplingParams
    from replicas.engine.scheduler import PreemptionMode, SchedulerConfig

    num_pages = 3 * model.param_pages() + model.kv_pages(1, kv_tokens)
    max_prompt = min(2048, kv_tokens // 2)  # every request fits the KV alone, so recompute can finish it
    results: dict = {"num_pages": num_pages, "kv_tokens": kv_tokens}
    for mode in ("remap", "recompute"):
        memory = DeviceMemory(num_pages, PAGE, device=device)
        engine = LLMEngine(memory, EngineConfig(scheduler=SchedulerConfig(
            max_num_batched_tokens=2048, max_num_seqs=64, preemption_mode=PreemptionMode(mode))))
        try:
            for name in ("a", "b", "c"):
                engine.add_model(name, model.config, model.state, eos_token_ids=())
            g = torch.Generator().manual_seed(0)
            ids = []
            for i in range(num_requests):
                tenant = "a" if i % 4 else ("b" if i % 8 else "c")
                length = int(torch.randint(256, max_prompt, (), generator=g))
                prompt = torch.randint(3, min(32000, model.config.vocab_size), (length,), generator=g).tolist()
                ids.append(engine.add_request(tenant, prompt, SamplingParams(max_tokens=128, ignore_eos=True)))
            start, n = time.perf_counter(), 0
            while engine.has_unfinished() and n < steps:
                engine.step()
                n += 1
            if device == "cuda":
                torch.cuda.synchronize()
            wall_s = time.perf_counter() - start
            tbt = sorted(x for m in engine.models for x in engine.tenant_stats(m).tbt_s)
            generated = sum(len(engine.sequence(i).output_token_ids) for i in ids)
            results[mode] = {"steps": n, "wall_s": wall_s, "tokens_generated": generated,
                             "tok_s": generated / wall_s, "blocks_migrated": memory.num_blocks_migrated,
                             "p50_tbt_s": tbt[len(tbt) // 2] if tbt else None,
                             "p99_tbt_s": tbt[int(0.99 * (len(tbt) - 1))] if tbt else None,
                             "preemptions": engine.num_preemptions, "layers_streamed": engine.num_layers_streamed}
        finally:
            engine.close()
            del engine, memory
            free_memory(device)
    remap, recompute = results["remap"], results["recompute"]
    results["remap_vs_recompute_tok_s"] = remap["tok_s"] / recompute["tok_s"] if recompute["tok_s"] else None
    results["remapping_happened"] = remap["layers_streamed"] > 0
    results["recompute_preempted"] = recompute["preemptions"] > 0
    results["ok"] = results["remapping_happened"] and results["recompute_preempted"]
    return results


def restore(out: pathlib.Path, backend: str) -> dict:
    path = out / f"bench_remap_cuda_{backend}.json"
    proc = subprocess.run([sys.executable, "scripts/bench_remap.py", "--device", "cuda", "--backend", backend,
                           "--json", str(path)], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    if not path.exists():
        return {"ok": False, "error": proc.stderr[-3000:] or f"exit {proc.returncode}"}
    return json.loads(path.read_text())


# ---- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=pathlib.Path, help="folder for gpu_check.json and the parts' own files")
    ap.add_argument("--quick", action="store_true", help="a shrunken model and short runs (a smoke run)")
    ap.add_argument("--skip-scale", action="store_true", help="skip the three-tenant run")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: run what runs without CUDA on a shrunken model (tests this script, measures nothing)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device, cuda = args.device, torch.cuda.is_available()
    report = Report(args.out, "cuda" if device == "cuda" and cuda else "cpu")
    report.run("environment", lambda: environment(report.device))
    if device == "cuda" and not cuda:
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              f"wrote the environment to {args.out / 'gpu_check.json'}. Run it on the GPU machine, or with "
              "--device cpu to smoke-test this script.", file=sys.stderr)
        return 2
    shrink = args.quick or device == "cpu"
    model = ShapedModel(shrink, torch.float16 if device == "cuda" else torch.float32)
    context, batches = (256, (1, 8)) if shrink else (1024, (1, 32, 64))
    repeats = 3 if shrink else 10
    if device == "cuda":
        modules, left_out = gpu_test_modules()
        report.run("tests", lambda: gpu_tests(args.out, modules, left_out))
        bw = report.run("bandwidth", lambda: bandwidth(256 << 20 if args.quick else 1 << 30))
        bytes_per_s = bw.get("device_gb_per_s", 0) * 1e9 if isinstance(bw, dict) else 0
    else:
        bytes_per_s = 20e9  # a nominal figure: on the CPU the ratio means nothing
    bytes_per_s = bytes_per_s or 3e12
    report.run("decode", lambda: decode(model, device, batches, context, bytes_per_s, repeats))
    if device == "cuda":
        for backend in ("arena", "vmm"):
            report.run(f"restore_{backend}", lambda backend=backend: restore(args.out, backend))
    report.run("streaming", lambda: streaming(model, device, (0, 2, 4) if shrink else (0, 2, 4, 8),
                                              8 if shrink else 32, context, repeats))
    big_enough = device != "cuda" or torch.cuda.get_device_properties(0).total_memory > 60 * 2**30 or shrink
    if not args.skip_scale and big_enough:
        report.run("multi_tenant", lambda: multi_tenant(model, device, 1024 if shrink else 16384,
                                                        12 if shrink else 48, 30 if shrink else 200))
    for key, value in report.results.items():
        print(f"{key:<24} {json.dumps(value, default=str)[:200]}")
    print(f"wrote {args.out / 'gpu_check.json'}; failed parts: {report.failed or 'none'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
