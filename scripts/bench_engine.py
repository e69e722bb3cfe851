"""Engine speed on this machine against vLLM on the same weights, in one run; TBT per preemption mode.

    python scripts/bench_engine.py --json out/bench_engine.json [--vllm-python ../vllm-venv/bin/python]
                                   [--threads N] [--repeats N] [--quick] [--model FOLDER]
                                   [--engine-thread] [--default-heap]

The model: a mid-size Llama with random weights (MID_LLAMA: hidden 768, 12 layers, 12 query / 4 KV heads
of 64, vocab 32000, tied embeddings, ~100M parameters, fp32), written once as a Hugging Face folder
(config.json + model.safetensors) that both engines load, so both run the same weights. --model names
another folder (e.g. $(oneiros pull): SmolLM2-135M); --quick uses a tiny Llama and short workloads (a
smoke test of the script).

Three workloads (WORKLOADS), greedy, ignore_eos, the same prompts on both sides, each timed from the
submission of its first request to its last token (prefill included):

  decode_b1    1 prompt of 16 tokens -> 128 new tokens        decode_tok_s_b1   = 128 / s
  decode_b16   16 prompts of 32 tokens -> 64 new tokens each   decode_tok_s_b16  = 16 * 64 / s
  prefill      16 prompts of 512 tokens -> 1 new token each    prefill_tok_s_b16 = 16 * 512 / s

Every workload runs once to warm up, then --repeats times (fresh prompts each run, so no cache of an
earlier run's prefix can help). The JSON keeps every run's seconds; the table shows medians and ranges.

  speedup_vs_vllm_decode_b1, _decode_b16, _prefill   vLLM's median seconds over ours (null without --vllm-python)
  vllm_same_output_fraction   per workload, the share of requests whose tokens equal vLLM's (a check that
                              both ran the same weights: on prefill's one token it should be 1.0)
  p99_tbt_s                   per preemption mode on a short three-tenant replay in a pool tight enough to remap

Both engines get --threads CPU threads (default: all): torch.set_num_threads here, and
VLLM_CPU_OMP_THREADS_BIND=0-(N-1) for vLLM, whose default ("auto") keeps one core for its scheduler
process and computes on the rest. No assertion on any number: compare ratios from one run only.

Our engine runs on the main thread, or with --engine-thread on a second thread, as an engine replica
runs it. The script re-executes itself with replicas/engine/heap.py's HEAP_ENV, as an engine replica
starts, unless --default-heap (glibc's defaults, for comparison); `heap_env` in the JSON says which.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from remap import DeviceMemory
from remap.params import slab_num_pages
from replicas.engine import heap
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.models import ModelConfig, dummy_weights
from replicas.engine.models.loader import load_hf_folder
from replicas.engine.models.weights import blocked_for_cpu, split_state_dict
from replicas.engine.sampling import SamplingParams
from replicas.engine.scheduler import PreemptionMode, SchedulerConfig

_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
TINY_LLAMA = _LLAMA | {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                       "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32}
MID_LLAMA = _LLAMA | {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64,
                      "tie_word_embeddings": True}
WEIGHT_STD = 0.1  # random weights: enough spread that greedy decoding does not repeat one token
PAGE = 256 << 10  # the CPU default page (replicas/config.py)
MAX_NUM_BATCHED_TOKENS = 4096  # per step, on both engines
MAX_NUM_SEQS = 64  # on both engines


@dataclass(frozen=True)
class Workload:
    name: str  # the key suffix: decode_b1, decode_b16, prefill
    batch: int  # prompts submitted together
    prompt_tokens: int  # tokens per prompt
    new_tokens: int  # tokens generated per prompt
    counts_prompt: bool  # tokens/s counts prompt tokens (prefill), else generated tokens (decode)

    @property
    def num_tokens(self) -> int:
        return self.batch * (self.prompt_tokens if self.counts_prompt else self.new_tokens)

    @property
    def tok_s_key(self) -> str:
        return f"prefill_tok_s_b{self.batch}" if self.counts_prompt else f"decode_tok_s_b{self.batch}"

    def prompts(self, run: int, vocab_size: int) -> list[list[int]]:
        """Run `run`'s prompts (run 0 warms up): fresh per run, the same on both engines."""
        g = torch.Generator().manual_seed(run * 1_000_003 + self.batch * 1000 + self.prompt_tokens)
        return torch.randint(3, min(vocab_size, 1000), (self.batch, self.prompt_tokens), generator=g).tolist()


WORKLOADS = (Workload("decode_b1", 1, 16, 128, False), Workload("decode_b16", 16, 32, 64, False),
             Workload("prefill", 16, 512, 1, True))
QUICK_WORKLOADS = (Workload("decode_b1", 1, 16, 8, False), Workload("decode_b16", 16, 16, 8, False),
                   Workload("prefill", 16, 64, 1, True))


class BenchModel:
    """The model benchmarked: a Hugging Face folder, loaded once; every tenant gets its weights."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self.hf_config = json.loads((folder / "config.json").read_text())
        self.config, self.state = load_hf_folder(folder)
        # the pages the engine stores them in (blocked on the CPU)
        layers, base = blocked_for_cpu(self.config, *split_state_dict(self.config, self.state))
        self.param_pages = sum(slab_num_pages(t, PAGE) for t in layers) + slab_num_pages(base, PAGE)
        self.num_params = sum(t.numel() for t in self.state.values())

    def kv_pages(self, tokens: int) -> int:
        return -(-tokens // (PAGE // self.config.kv_geometry().bytes_per_token))


def write_random_folder(folder: pathlib.Path, hf_config: dict) -> pathlib.Path:
    """config.json + model.safetensors of random weights (seed 0): what both engines load."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=1))
    state = dummy_weights(ModelConfig.from_hf(hf_config), seed=0, std=WEIGHT_STD)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def make_engine(model: BenchModel, kv_tokens: int, mode: str = "remap", tenants: int = 1) -> LLMEngine:
    """A pool of the tenants' parameters plus room for kv_tokens tokens of KV."""
    num_pages = tenants * model.param_pages + model.kv_pages(kv_tokens)
    engine = LLMEngine(DeviceMemory(num_pages, PAGE), EngineConfig(scheduler=SchedulerConfig(
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, max_num_seqs=MAX_NUM_SEQS,
        preemption_mode=PreemptionMode(mode))))
    for i in range(tenants):
        engine.add_model(f"t{i}", model.config, model.state, eos_token_ids=())
    return engine


def run_once(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """(seconds from the first submission to the last token, each request's tokens)."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    ids = [engine.add_request("t0", p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    seconds = time.perf_counter() - start
    return seconds, [list(engine.sequence(i).output_token_ids) for i in ids]


def bench_ours(model: BenchModel, runs: dict[str, list[list[list[int]]]], workloads: tuple[Workload, ...]) -> dict:
    """{workload: {"seconds": [per timed run], "minor_faults": [per timed run, the process's], "token_ids": the
    last run's outputs}}, runs in the order vLLM's are."""
    engine = make_engine(model, kv_tokens=max(w.batch * (w.prompt_tokens + w.new_tokens + 16) for w in workloads))
    out = {w.name: {"seconds": [], "minor_faults": [], "token_ids": []} for w in workloads}
    for run in range(len(runs[workloads[0].name])):
        for w in workloads:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            seconds, tokens = run_once(engine, runs[w.name][run], w.new_tokens)
            if run > 0:  # run 0 warms up
                out[w.name]["seconds"].append(seconds)
                out[w.name]["minor_faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
                out[w.name]["token_ids"] = tokens
    engine.close()
    return out


def bench_vllm(python: str, model: BenchModel, runs: dict, workloads: tuple[Workload, ...], threads: int) -> dict:
    """The same runs under vLLM (scripts/vllm_baseline.py, in its own interpreter); {} and a printed reason
    if that fails."""
    script = pathlib.Path(__file__).with_name("vllm_baseline.py")
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = pathlib.Path(tmp) / "runs.json", pathlib.Path(tmp) / "vllm.json"
        spec.write_text(json.dumps({"workloads": [{"name": w.name, "new_tokens": w.new_tokens, "runs": runs[w.name]}
                                                  for w in workloads]}))
        cmd = [python, str(script), "--model", str(model.folder), "--runs", str(spec), "--json", str(out),
               "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS), "--max-num-seqs", str(MAX_NUM_SEQS)]
        try:
            proc = subprocess.run(cmd, check=False, timeout=1800, env=env)  # vLLM's log goes to our stderr
            if proc.returncode != 0:
                raise RuntimeError(f"exit {proc.returncode} (its log is above)")
            result = json.loads(out.read_text())
        except Exception as e:  # noqa: BLE001 - the baseline is optional
            print(f"vLLM baseline failed ({python}): {e}", file=sys.stderr)
            return {}
    result["omp_threads_bind"] = env["VLLM_CPU_OMP_THREADS_BIND"]
    return result


def summarize(w: Workload, seconds: list[float]) -> dict:
    rates = sorted(w.num_tokens / s for s in seconds)
    return {"seconds": seconds, "tok_s": w.num_tokens / statistics.median(seconds), "tok_s_min": rates[0],
            "tok_s_max": rates[-1]}


def compare(workloads: tuple[Workload, ...], ours: dict, vllm: dict) -> dict:
    """Our medians under the tok/s keys; vLLM's and the speedups beside them (null without vLLM)."""
    out: dict = {"ours": {}, "vllm": {} if vllm else None, "vllm_same_output_fraction": {} if vllm else None}
    for w in workloads:
        mine = out["ours"][w.name] = summarize(w, ours[w.name]["seconds"])
        out[w.tok_s_key] = mine["tok_s"]
        out[f"vllm_{w.tok_s_key}"] = out[f"speedup_vs_vllm_{w.name}"] = None
        if not vllm:
            continue
        theirs = out["vllm"][w.name] = summarize(w, vllm["workloads"][w.name]["seconds"])
        out[f"vllm_{w.tok_s_key}"] = theirs["tok_s"]
        out[f"speedup_vs_vllm_{w.name}"] = mine["tok_s"] / theirs["tok_s"]
        pairs = list(zip(ours[w.name]["token_ids"], vllm["workloads"][w.name]["token_ids"], strict=True))
        out["vllm_same_output_fraction"][w.name] = sum(a == b for a, b in pairs) / len(pairs)
    return out


def bench_modes(model: BenchModel, num_requests: int) -> dict:
    """Three tenants, skewed load (70 / 20 / 10 %), a pool where KV runs out without remapping."""
    out = {}
    for mode in ("remap", "recompute", "swap"):
        engine = make_engine(model, kv_tokens=1920, mode=mode, tenants=3)  # ~1.5 of the longest requests
        g = torch.Generator().manual_seed(0)
        for i in range(num_requests):
            r = torch.rand((), generator=g).item()
            tenant = "t0" if r < 0.7 else "t1" if r < 0.9 else "t2"
            length = int(torch.randint(64, 512, (), generator=g))
            prompt = torch.randint(3, min(model.config.vocab_size, 1000), (length,), generator=g).tolist()
            engine.add_request(tenant, prompt, SamplingParams(max_tokens=32, ignore_eos=True))
            engine.step()
        while engine.has_unfinished():
            engine.step()
        tbt = sorted(x for t in engine.models for x in engine.tenant_stats(t).tbt_s)
        out[mode] = {"p99_tbt_s": tbt[int(0.99 * (len(tbt) - 1))], "p50_tbt_s": statistics.median(tbt),
                     "preemptions": engine.num_preemptions}
        engine.close()
    return out


def _rate_cell(summary: dict | None) -> str:
    return f"{summary['tok_s']:9.1f} ({summary['tok_s_min']:.1f}-{summary['tok_s_max']:.1f})" if summary else "-"


def print_table(workloads: tuple[Workload, ...], results: dict) -> None:
    print(f"{'workload':<12} {'ours tok/s (min-max)':>26} {'vLLM tok/s (min-max)':>26} {'speedup':>8} {'same':>5} "
          f"{'ours faults/run':>16}")
    for w in workloads:
        speedup = results[f"speedup_vs_vllm_{w.name}"]
        same = (results["vllm_same_output_fraction"] or {}).get(w.name)
        print(f"{w.name:<12} {_rate_cell(results['ours'][w.name]):>26} "
              f"{_rate_cell((results['vllm'] or {}).get(w.name)):>26} "
              f"{'-' if speedup is None else f'{speedup:.2f}':>8} {'-' if same is None else f'{same:.2f}':>5} "
              f"{results['ours_minor_faults'][w.name]:>16.0f}")
    print(f"ours: peak RSS {results['ours_peak_rss_mb']:.0f} MB, heap_env {results['heap_env']}, "
          f"engine thread {results['engine_thread']}")
    for mode, v in results["modes"].items():
        print(f"{mode:<10} p50_tbt {v['p50_tbt_s'] * 1e3:8.2f} ms  p99_tbt {v['p99_tbt_s'] * 1e3:8.2f} ms  "
              f"preemptions {v['preemptions']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--quick", action="store_true", help="tiny model, short runs, no repeats (a smoke test)")
    ap.add_argument("--vllm-python", default=os.environ.get("ONEIROS_VLLM_PYTHON"),
                    help="interpreter with vLLM installed, for the speedup_vs_vllm_* keys "
                         "(default: $ONEIROS_VLLM_PYTHON)")
    ap.add_argument("--model", type=pathlib.Path, help="a Hugging Face folder to benchmark instead of the random "
                                                       "mid-size Llama (e.g. $(oneiros pull): SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for each engine")
    ap.add_argument("--repeats", type=int, help="timed runs per workload (default 3; 1 with --quick)")
    ap.add_argument("--engine-thread", action="store_true",
                    help="run our engine on a second thread, as an engine replica does")
    ap.add_argument("--default-heap", action="store_true",
                    help="glibc's default heap instead of heap.HEAP_ENV (read at start: see __main__)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or write_random_folder(pathlib.Path(tmp) / "model",
                                                   TINY_LLAMA if args.quick else MID_LLAMA)
        model = BenchModel(folder)
        runs = {w.name: [w.prompts(r, model.config.vocab_size) for r in range(repeats + 1)] for w in workloads}
        if args.engine_thread:
            with ThreadPoolExecutor(1, thread_name_prefix="engine") as pool:
                ours = pool.submit(bench_ours, model, runs, workloads).result()
        else:
            ours = bench_ours(model, runs, workloads)
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        vllm = bench_vllm(args.vllm_python, model, runs, workloads, args.threads) if args.vllm_python else {}
    results = {"model": str(args.model) if args.model else "tiny-llama" if args.quick else "mid-llama",
               "hf_config": model.hf_config, "num_params": model.num_params,
               "workloads": {w.name: asdict(w) for w in workloads}, "repeats": repeats,
               "torch_threads": torch.get_num_threads(), "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
               "kv_block_tokens": PAGE // model.config.kv_geometry().bytes_per_token,
               "engine_thread": args.engine_thread, "heap_env": heap.started_with_heap_env()}
    results |= compare(workloads, ours, vllm)
    # page faults show what the heap setting changes (heap_env); peak RSS, what it keeps (before vLLM and
    # the modes' engines, which run in other processes or after this is read)
    results["ours_minor_faults"] = {w.name: statistics.median(ours[w.name]["minor_faults"]) for w in workloads}
    results["ours_peak_rss_mb"] = peak_rss_mb
    results |= {"vllm_version": vllm.get("vllm_version"), "vllm_dtype": vllm.get("dtype"),
                "vllm_max_num_batched_tokens": vllm.get("max_num_batched_tokens"),
                "vllm_omp_threads_bind": vllm.get("omp_threads_bind")}
    results["vllm_installed"] = importlib.util.find_spec("vllm") is not None
    results["modes"] = bench_modes(model, num_requests=6 if args.quick else 24)
    results["p99_tbt_s"] = {m: v["p99_tbt_s"] for m, v in results["modes"].items()}
    print_table(workloads, results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    if "--default-heap" not in sys.argv[1:]:
        heap.use_heap_env_here()  # the engines here allocate as an engine replica's do
    sys.exit(main())
