"""Engine throughput and latency on this machine, against Hugging Face `generate` in the same run.

    python scripts/bench_engine.py --json out/bench_engine.json [--quick] [--vllm-python /path/to/vllm-venv/bin/python]
                                   [--model $(oneiros pull)]

Prints a table and writes JSON with:
  decode_tok_s_b{1,16,64}, prefill_tok_s_b{1,16,64}   tiny Llama (hidden 256, 4 layers, head_dim 32), or the
                        Hugging Face folder --model names (SmolLM2-135M from `oneiros pull`: the real-sized case)
  speedup_vs_hf_b16     our tokens/s over HF generate's, 16 prompts x 32 tokens -> 64 new tokens each
  speedup_vs_vllm_b16   same against vLLM (scripts/vllm_baseline.py) with --vllm-python, else null
  p99_tbt_s             per preemption mode on a short three-tenant replay in a pool tight enough to remap
No assertion on any number: compare ratios from one run only (this machine is noisy).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from remap import DeviceMemory
from remap.params import slab_num_pages
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.models import ModelConfig, dummy_weights
from replicas.engine.models.loader import load_hf_folder
from replicas.engine.models.weights import split_state_dict
from replicas.engine.sampling import SamplingParams
from replicas.engine.scheduler import PreemptionMode, SchedulerConfig

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024, "hidden_size": 256,
    "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
PAGE = 256 << 10


class BenchModel:
    """The model benchmarked: the tiny Llama with random weights (one set per tenant seed), or a folder."""

    def __init__(self, folder: str | None = None) -> None:
        self.folder = folder
        if folder is None:
            self.hf_config, self._state = TINY_LLAMA, None
        else:
            self.hf_config = json.loads((pathlib.Path(folder) / "config.json").read_text())
            self._state = load_hf_folder(folder)[1]
        self.config = ModelConfig.from_hf(self.hf_config)
        layers, base = split_state_dict(self.config, self.weights(0))
        self.param_pages = sum(slab_num_pages(t, PAGE) for t in layers) + slab_num_pages(base, PAGE)

    def weights(self, seed: int) -> dict:
        return dummy_weights(self.config, seed=seed, std=0.05) if self._state is None else self._state

    def kv_pages(self, tokens: int) -> int:
        return -(-tokens // (PAGE // self.config.kv_geometry().bytes_per_token))


def make_engine(model: BenchModel, kv_tokens: int, mode: str = "remap", tenants: int = 1) -> tuple[LLMEngine, dict]:
    """A pool of the tenants' parameters plus room for kv_tokens tokens of KV."""
    num_pages = tenants * model.param_pages + model.kv_pages(kv_tokens)
    engine = LLMEngine(DeviceMemory(num_pages, PAGE), EngineConfig(
        scheduler=SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=64, preemption_mode=PreemptionMode(mode))))
    state = {}
    for i in range(tenants):
        state = model.weights(i)
        engine.add_model(f"t{i}", model.config, state, eos_token_ids=())
    return engine, state


def prompts(batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch * 1000 + length)
    return torch.randint(3, 1000, (batch, length), generator=g).tolist()


def run_timed(engine: LLMEngine, batch: int, prompt_len: int, max_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for one batch run to completion."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request("t0", p, params) for p in prompts(batch, prompt_len)]
    start = time.perf_counter()
    while any(not engine.sequence(i).output_token_ids for i in ids):
        engine.step()
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return prefill_s, time.perf_counter() - start


def bench_throughput(model: BenchModel, batches: list[int], decode_tokens: int) -> dict:
    out = {}
    engine, _ = make_engine(model, kv_tokens=max(batches) * 300)
    run_timed(engine, 2, 16, 4)  # warm up
    for b in batches:
        prefill_s, _ = run_timed(engine, b, 256, 1)
        out[f"prefill_tok_s_b{b}"] = b * 256 / prefill_s
        _, decode_s = run_timed(engine, b, 32, decode_tokens + 1)
        out[f"decode_tok_s_b{b}"] = b * decode_tokens / decode_s
    return out


def bench_vs_hf(model: BenchModel, batch: int = 16, prompt_len: int = 32, new_tokens: int = 64) -> dict:
    import transformers

    engine, state = make_engine(model, kv_tokens=batch * (prompt_len + new_tokens + 16))
    run_timed(engine, 2, 16, 4)
    prefill_s, decode_s = run_timed(engine, batch, prompt_len, new_tokens)
    ours = batch * new_tokens / (prefill_s + decode_s)
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in model.hf_config.items() if k != "architectures"})
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    hf.load_state_dict(state, strict=False)  # a tied lm_head is the embedding already
    hf.generation_config.eos_token_id = None
    ids = torch.tensor(prompts(batch, prompt_len))
    with torch.inference_mode():
        hf.generate(ids[:2, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm up
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        hf_s = time.perf_counter() - start
    theirs = batch * new_tokens / hf_s
    return {"ours_tok_s_b16": ours, "hf_tok_s_b16": theirs, "speedup_vs_hf_b16": ours / theirs}


def bench_vs_vllm(python: str, model: BenchModel, ours: float, batch: int = 16, prompt_len: int = 32,
                  new_tokens: int = 64) -> dict:
    """vLLM on the same config and prompts, in its own interpreter; {} (and a printed reason) if that fails."""
    script = pathlib.Path(__file__).with_name("vllm_baseline.py")
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "vllm.json"
        cmd = [python, str(script), "--config", json.dumps(model.hf_config), "--batch", str(batch),
               "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens), "--json", str(out)]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
            theirs = json.loads(out.read_text())
        except Exception as e:  # noqa: BLE001 - the baseline is optional
            print(f"vLLM baseline failed ({python}): {e}", file=sys.stderr)
            return {}
    return {"vllm_tok_s_b16": theirs["tok_s"], "speedup_vs_vllm_b16": ours / theirs["tok_s"],
            "vllm_dtype": theirs["dtype"], "vllm_version": theirs["vllm_version"]}


def bench_modes(model: BenchModel, num_requests: int) -> dict:
    """Three tenants, skewed load (70 / 20 / 10 %), a pool where KV runs out without remapping."""
    out = {}
    for mode in ("remap", "recompute", "swap"):
        engine, _ = make_engine(model, kv_tokens=1920, mode=mode, tenants=3)  # ~1.5 of the longest requests
        g = torch.Generator().manual_seed(0)
        for i in range(num_requests):
            r = torch.rand((), generator=g).item()
            tenant = "t0" if r < 0.7 else "t1" if r < 0.9 else "t2"
            length = int(torch.randint(64, 512, (), generator=g))
            engine.add_request(tenant, prompts(1, length)[0], SamplingParams(max_tokens=32, ignore_eos=True))
            engine.step()
        while engine.has_unfinished():
            engine.step()
        tbt = sorted(x for t in engine.models for x in engine.tenant_stats(t).tbt_s)
        out[mode] = {"p99_tbt_s": tbt[int(0.99 * (len(tbt) - 1))], "p50_tbt_s": statistics.median(tbt),
                     "preemptions": engine.num_preemptions}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke test of the script)")
    ap.add_argument("--vllm-python", default=os.environ.get("ONEIROS_VLLM_PYTHON"),
                    help="interpreter with vLLM installed, for speedup_vs_vllm_b16 (default: $ONEIROS_VLLM_PYTHON)")
    ap.add_argument("--model", help="a Hugging Face folder to benchmark instead of the tiny Llama "
                                    "(e.g. $(oneiros pull): SmolLM2-135M-Instruct)")
    args = ap.parse_args(argv)
    model = BenchModel(args.model)
    batches = [1, 16] if args.quick else [1, 16, 64]
    results = {"model": args.model or "tiny-llama"}
    results.update(bench_throughput(model, batches, decode_tokens=8 if args.quick else 32))
    results.update(bench_vs_hf(model, new_tokens=8 if args.quick else 64))
    results["speedup_vs_vllm_b16"] = None  # measured only with --vllm-python (vLLM lives in its own venv)
    if args.vllm_python:
        results.update(bench_vs_vllm(args.vllm_python, model, results["ours_tok_s_b16"],
                                     new_tokens=8 if args.quick else 64))
    results["vllm_installed"] = importlib.util.find_spec("vllm") is not None
    modes = bench_modes(model, num_requests=6 if args.quick else 24)
    results["p99_tbt_s"] = {m: v["p99_tbt_s"] for m, v in modes.items()}
    results["modes"] = modes
    results["torch_threads"] = torch.get_num_threads()
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key:<24} {value:>14,.3f}")
    for mode, v in modes.items():
        print(f"{mode:<10} p50_tbt {v['p50_tbt_s'] * 1e3:8.2f} ms  p99_tbt {v['p99_tbt_s'] * 1e3:8.2f} ms  "
              f"preemptions {v['preemptions']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
