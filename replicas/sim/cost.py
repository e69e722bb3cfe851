"""CostModel: the modeled time of one engine step of one model's batch, from FLOPs and bytes.

Per transformer layer, every kernel is a roofline, max(FLOPs / achieved FLOP/s, bytes / achieved
HBM bytes/s, kernel floor):

    linear  (qkv, o, mlp up/gate, down)  2 * params * tokens FLOPs; weights read once per step
    attention                           decode: KV of the whole context read; prefill: causal FLOPs
    elementwise (norms, rope, act, add) activation bytes only

plus lm_head for the sampled rows and a fixed per-step overhead. Achieved rates are the datasheet
peaks times efficiencies fitted to Vidur's measured H100 operator times (`fit_vidur`; the fitted
numbers in H100_FIT). Host traffic is added on top: streamed (remapped) layers overlap compute when
the ring has >= 2 slots, so the step takes max(compute, transfer) (the paper's budget rule: only
the excess is exposed); with one slot copy and compute serialize. Swaps and restores are blocking
copies, as in the engine. Recompute needs no term of its own: a preempted sequence's prompt is
scheduled again and costs what any prefill costs (`prefill_s`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from replicas.engine.models import ModelConfig
from replicas.sim.devices import H100_SXM, DeviceProfile


@dataclass(frozen=True)
class CostParams:
    flops_efficiency: float  # achieved / peak dense FLOP/s of large GEMMs
    hbm_efficiency: float  # achieved / peak HBM bytes/s of bandwidth-bound kernels
    kernel_floor_s: float  # no kernel takes less (launch + tail); counted per kernel
    step_overhead_s: float = 2e-3  # per step: scheduling, sampling, input prep (vLLM-like, no CUDA graphs)
    seq_overhead_s: float = 0.0  # per sequence in the step: its block table, positions, sampling (host side)
    attention_efficiency: float = 1.0  # achieved / HBM bandwidth of paged-KV reads (a gather, not a stream)
    seq_layer_overhead_s: float = 0.0  # per sequence per layer beyond the roofline (small-batch CPU ops)
    copies_overlap: bool = True  # streamed layers copy beside compute (a GPU's copy engine); False: inline,
    # on the cores that compute (the CPU engine's SyncTransferEngine), so every copy adds to the step
    stream_layer_overhead_s: float = 0.0  # per layer computed from a staging slot, beyond its copy: on the
    # CPU the step around a streamed layer runs slower than the same step resident (measured by
    # scripts/sim_vs_real.py's probe; 0 on a GPU, where it has not been measured)
    switch_layer_overhead_s: float = 0.0  # per layer of a step whose model is not the previous step's: on
    # the CPU a small model's weights stay in the caches while it runs alone, and the next tenant's step
    # finds them cold (measured by scripts/sim_vs_real.py's probe; 0 on a GPU, where it has not been measured)


# fit_vidur() on Vidur's H100 TP=1 linear-operator medians (Llama-2-7b/70b, CodeLlama-34b, Qwen-72B,
# internlm-20b, phi-2; 1..4096 tokens, 6,264 rows): |pred/measured - 1| median 8.4%, p90 28% (the
# misses are mid-size token counts where cuBLAS tile quantization makes the measured curve a staircase).
# Re-fitted by tests/unit/test_sim.py::test_vidur_fit_reproduces_h100_fit.
H100_FIT = CostParams(flops_efficiency=0.66, hbm_efficiency=0.72, kernel_floor_s=20e-6)


class BatchShape(NamedTuple):
    num_new_tokens: tuple[int, ...]  # per sequence: tokens computed this step
    num_cached_tokens: tuple[int, ...]  # per sequence: tokens already in the KV cache
    num_sampled: int  # rows that go through lm_head

    @classmethod
    def decode(cls, batch_size: int, context_tokens: int) -> BatchShape:
        return cls((1,) * batch_size, (context_tokens - 1,) * batch_size, batch_size)

    @classmethod
    def prefill(cls, num_tokens: int, num_seqs: int = 1) -> BatchShape:
        return cls((num_tokens,) * num_seqs, (0,) * num_seqs, num_seqs)


class StepCost(NamedTuple):
    compute_s: float  # layers + lm_head + fixed overhead
    transfer_s: float  # streamed layers' host->device copies
    exposed_transfer_s: float  # the part of transfer_s compute does not hide
    blocking_s: float  # swaps and restores, which the step waits for
    total_s: float  # what the clock advances by


class CostModel:
    def __init__(self, device: DeviceProfile, params: CostParams = H100_FIT) -> None:
        self.device, self.params = device, params
        self._flops = device.peak_flops * params.flops_efficiency
        self._bytes = device.hbm_bytes_per_s * params.hbm_efficiency

    def kernel_s(self, flops: float, num_bytes: float) -> float:
        return max(flops / self._flops, num_bytes / self._bytes, self.params.kernel_floor_s)

    # ---- compute -------------------------------------------------------------------------
    def layer_s(self, config: ModelConfig, batch: BatchShape) -> float:
        """One transformer layer over the whole batch."""
        tokens, item = sum(batch.num_new_tokens), _itemsize(config)
        linear = sum(self.kernel_s(2 * i * o * tokens, (i * o + tokens * (i + o)) * item)
                     for i, o in linear_shapes(config))
        return linear + self.attention_s(config, batch) + self.kernel_s(0, tokens * _elementwise_elems(config) * item)

    def attention_s(self, config: ModelConfig, batch: BatchShape) -> float:
        kv_per_token = 2 * config.num_kv_heads * config.head_dim * _itemsize(config)
        pairs = sum(n * c + n * (n + 1) // 2 for n, c in zip(batch.num_new_tokens, batch.num_cached_tokens))
        flops = 4 * config.num_heads * config.head_dim * pairs
        kv_bytes = sum(c + 2 * n for n, c in zip(batch.num_new_tokens, batch.num_cached_tokens)) * kv_per_token
        return self.kernel_s(flops, kv_bytes / self.params.attention_efficiency)

    def head_s(self, config: ModelConfig, batch: BatchShape) -> float:
        rows, h, v = batch.num_sampled, config.hidden_size, config.vocab_size
        return self.kernel_s(2 * rows * h * v, (h * v + rows * (h + v)) * _itemsize(config)) if rows else 0.0

    def compute_s(self, config: ModelConfig, batch: BatchShape) -> float:
        num_seqs = len(batch.num_new_tokens)
        return (config.num_layers * (self.layer_s(config, batch) + self.params.seq_layer_overhead_s * num_seqs)
                + self.head_s(config, batch) + self.params.step_overhead_s + self.params.seq_overhead_s * num_seqs)

    def prefill_s(self, config: ModelConfig, num_tokens: int) -> float:
        """One prompt computed in one step: also what a recompute-preempted sequence pays again."""
        return self.compute_s(config, BatchShape.prefill(num_tokens))

    def decode_s(self, config: ModelConfig, batch_size: int, context_tokens: int) -> float:
        return self.compute_s(config, BatchShape.decode(batch_size, context_tokens))

    # ---- host traffic --------------------------------------------------------------------
    def link_s(self, num_bytes: float, mixed: bool = False) -> float:
        rate = self.device.link_mixed_bytes_per_s if mixed else self.device.link_bytes_per_s
        return num_bytes / rate

    def step(self, config: ModelConfig, batch: BatchShape, *, streamed_bytes: float = 0.0, num_slots: int = 2,
             swap_out_bytes: float = 0.0, swap_in_bytes: float = 0.0, restore_bytes: float = 0.0,
             migrate_bytes: float = 0.0, num_streamed: int = 0, switched: bool = False) -> StepCost:
        """`switched`: the previous step ran another model."""
        compute = (self.compute_s(config, batch) + num_streamed * self.params.stream_layer_overhead_s
                   + switched * config.num_layers * self.params.switch_layer_overhead_s)
        mixed = swap_out_bytes > 0  # d2h swap traffic shares the link's step
        transfer = self.link_s(streamed_bytes, mixed)
        exposed = max(0.0, transfer - compute) if num_slots >= 2 and self.params.copies_overlap else transfer
        blocking = (self.link_s(swap_out_bytes + swap_in_bytes + restore_bytes, mixed)
                    + (2 * migrate_bytes / self._bytes if migrate_bytes else 0.0))
        return StepCost(compute, transfer, exposed, blocking, compute + exposed + blocking)


# ---- the paper's models (public Hugging Face config.json values, typed in) ----------------------------
def _opt(hidden: int, ffn: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig.from_hf({
        "architectures": ["OPTForCausalLM"], "hidden_size": hidden, "ffn_dim": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "vocab_size": 50272, "max_position_embeddings": 2048, "torch_dtype": "float16",
        "activation_function": "relu", "do_layer_norm_before": True, "word_embed_proj_dim": hidden,
        "enable_bias": True, "bos_token_id": 2, "eos_token_id": 2,
    })


def _llama(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int, max_pos: int,
           dtype: str, theta: float, bos: int, eos: int) -> ModelConfig:
    return ModelConfig.from_hf({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "vocab_size": vocab, "max_position_embeddings": max_pos, "torch_dtype": dtype, "rms_norm_eps": 1e-5,
        "rope_theta": theta, "hidden_act": "silu", "bos_token_id": bos, "eos_token_id": eos,
    })


def opt_6_7b() -> ModelConfig:  # facebook/opt-6.7b
    return _opt(4096, 16384, 32, 32)


def opt_13b() -> ModelConfig:  # facebook/opt-13b
    return _opt(5120, 20480, 40, 40)


def opt_30b() -> ModelConfig:  # facebook/opt-30b
    return _opt(7168, 28672, 48, 56)


def llama2_13b() -> ModelConfig:  # meta-llama/Llama-2-13b-hf
    return _llama(5120, 13824, 40, 40, 40, 32000, 4096, "float16", 10000.0, 1, 2)


def llama3_8b() -> ModelConfig:  # meta-llama/Meta-Llama-3-8B
    return _llama(4096, 14336, 32, 32, 8, 128256, 8192, "bfloat16", 500000.0, 128000, 128001)


PAPER_MODELS = {"opt-6.7b": opt_6_7b, "opt-13b": opt_13b, "opt-30b": opt_30b,
                "llama-2-13b": llama2_13b, "llama-3-8b": llama3_8b}


def linear_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) features of each GEMM of one layer, in Vidur's operator order: qkv, o, up(+gate), down."""
    h, i, hd = config.hidden_size, config.intermediate_size, config.head_dim
    up = 2 * i if config.family == "llama" else i  # SwiGLU fuses gate and up
    return [(h, (config.num_heads + 2 * config.num_kv_heads) * hd), (config.num_heads * hd, h), (h, up), (i, h)]


def layer_param_bytes(config: ModelConfig) -> int:
    return sum(i * o for i, o in linear_shapes(config)) * _itemsize(config)


def _elementwise_elems(config: ModelConfig) -> int:
    """Activation elements read + written per token per layer outside GEMMs and attention: two norms
    (2h each), two residual adds (3h each), rope on q and k, the MLP activation (SwiGLU 3i, ReLU 2i)."""
    h, i = config.hidden_size, config.intermediate_size
    rope = 2 * (config.num_heads + config.num_kv_heads) * config.head_dim if config.family == "llama" else 0
    return 10 * h + rope + (3 * i if config.family == "llama" else 2 * i)


def _itemsize(config: ModelConfig) -> int:
    return config.dtype.itemsize


# ---- calibration against Vidur's measured H100 operator times ------------------------------------------
class VidurFit(NamedTuple):
    params: CostParams
    median_abs_err: float  # over all (model, tokens, op) rows, |pred / measured - 1|
    p90_abs_err: float
    per_model_median_err: dict[str, float]
    num_rows: int


_VIDUR_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")


def load_vidur_linear(paths: Iterable[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(flops, bytes, measured seconds, model per row) of the four GEMMs at TP=1, FP16."""
    flops, nbytes, seconds, names = [], [], [], []
    for path in paths:
        with open(path) as f:
            for row in csv.DictReader(f):
                if row["num_tensor_parallel_workers"] != "1":
                    continue
                nh, nkv, h, i = (int(row[k]) for k in ("n_head", "n_kv_head", "n_embd", "n_expanded_embd"))
                hd, t = h // nh, int(row["num_tokens"])
                up = 2 * i if row["use_gated_mlp"] == "True" else i
                for op, (fin, fout) in zip(_VIDUR_OPS, [(h, (nh + 2 * nkv) * hd), (h, h), (h, up), (i, h)]):
                    flops.append(2 * fin * fout * t)
                    nbytes.append(2 * (fin * fout + t * (fin + fout)))
                    seconds.append(float(row[f"time_stats.{op}.median"]) * 1e-3)
                    names.append(Path(path).parent.name)
    return np.array(flops, float), np.array(nbytes, float), np.array(seconds), names


def fit_vidur(paths: Sequence[Path], device: DeviceProfile = H100_SXM) -> VidurFit:
    """Grid-fit (flops_efficiency, hbm_efficiency, kernel_floor_s) minimizing mean |log(pred/measured)|."""
    flops, nbytes, seconds, names = load_vidur_linear(paths)
    best = (math.inf, None)
    for floor in np.arange(0, 41e-6, 4e-6):
        for fe in np.arange(0.40, 1.001, 0.02):
            compute = flops / (device.peak_flops * fe)
            for he in np.arange(0.40, 1.001, 0.02):
                pred = np.maximum(np.maximum(compute, nbytes / (device.hbm_bytes_per_s * he)), floor)
                loss = float(np.mean(np.abs(np.log(pred / seconds))))
                if loss < best[0]:
                    best = (loss, (round(float(fe), 2), round(float(he), 2), float(floor)), pred)
    fe, he, floor = best[1][0], best[1][1], round(best[1][2], 9)
    err = np.abs(best[2] / seconds - 1)
    model_names = np.array(names)
    per_model = {m: float(np.median(err[model_names == m])) for m in sorted(set(names))}
    return VidurFit(CostParams(fe, he, floor), float(np.median(err)), float(np.percentile(err, 90)), per_model, len(err))
