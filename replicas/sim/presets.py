"""The paper's experiments as named presets: which models share the device and which workloads run.

    c1   OPT-13B, Llama-2-13B, Llama-3-8B  (the paper's three-tenant mix)
    c2   OPT-30B, OPT-6.7B                 (one big, one small tenant)

Each preset has three workloads, named `<preset>` (the Azure LLM code trace, 2023),
`<preset>-rate` (a sweep of Zipf-Poisson arrival rates) and `<preset>-input` (a sweep of prompt
lengths at a fixed rate), plus `tiny` for tests. Tenants t0, t1, ... are the models in the order
listed (t0 the most popular). Sweep points (rates, lengths, output length) are our choices, not
the paper's exact values; lengths are clipped to the shortest context of the mix.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass

from replicas.bench.workload import LengthDist, Request, azure_trace, zipf_poisson
from replicas.engine.models import ModelConfig
from replicas.sim.cost import llama2_13b, llama3_8b, opt_6_7b, opt_13b, opt_30b
from replicas.sim.devices import GH200, H100_PCIE, DeviceProfile

DEFAULT_TRACE = (pathlib.Path(__file__).resolve().parents[2] / ".." / "shared" / "traces" / "azure-llm-2023"
                 / "AzureLLMInferenceTrace_code.csv").resolve()
DEVICES: dict[str, DeviceProfile] = {"gh200": GH200, "h100-pcie": H100_PCIE}
RATES_PER_S = (0.5, 1.0, 2.0, 4.0)  # rate sweep
PROMPT_LENS = (256, 512, 1024, 1536)  # input-length sweep, at SWEEP_RATE_PER_S
SWEEP_RATE_PER_S = 1.0
SWEEP_OUTPUT = LengthDist("uniform", low=64, high=256)
MAX_OUTPUT_LEN = 256  # Azure code trace outputs are short; clipped so prompt + output fit the context

Workloads = list[tuple[str, list[Request]]]  # (sweep point label, requests)


@dataclass(frozen=True)
class Preset:
    name: str
    models: Callable[[], dict[str, ModelConfig]]  # model name -> config, most popular first
    workloads: Callable[[float, int, str | None], Workloads]  # (duration_s, seed, trace path) -> points
    default_duration_s: float  # of arrivals


def _c1() -> dict[str, ModelConfig]:
    return {"opt-13b": opt_13b(), "llama-2-13b": llama2_13b(), "llama-3-8b": llama3_8b()}


def _c2() -> dict[str, ModelConfig]:
    return {"opt-30b": opt_30b(), "opt-6.7b": opt_6_7b()}


def _max_prompt(models: dict[str, ModelConfig], output_len: int) -> int:
    return min(c.max_position_embeddings for c in models.values()) - output_len


def resolve_trace(path: str | None) -> pathlib.Path:
    trace = pathlib.Path(path) if path else DEFAULT_TRACE
    if not trace.is_file():
        raise FileNotFoundError(f"Azure trace not found at {trace}: pass --trace PATH to "
                                "AzureLLMInferenceTrace_code.csv (github.com/Azure/AzurePublicDataset)")
    return trace


def _azure(models: Callable[[], dict[str, ModelConfig]]):
    def build(duration_s: float, seed: int, trace: str | None) -> Workloads:
        ms = models()
        wl = azure_trace(resolve_trace(trace), tenants=len(ms), seed=seed, max_output_len=MAX_OUTPUT_LEN,
                         max_prompt_len=_max_prompt(ms, MAX_OUTPUT_LEN))
        return [("azure-code", [r for r in wl.requests if r.arrival_s < duration_s])]
    return build


def _rate_sweep(models: Callable[[], dict[str, ModelConfig]]):
    def build(duration_s: float, seed: int, trace: str | None) -> Workloads:
        ms = models()
        prompt = LengthDist("lognormal", mean=1024, sigma=0.6, max_len=_max_prompt(ms, SWEEP_OUTPUT.high))
        return [(f"rate={rate:g}/s", list(zipf_poisson(len(ms), rate, duration_s, prompt_len=prompt,
                                                        output_len=SWEEP_OUTPUT, seed=seed).requests))
                for rate in RATES_PER_S]
    return build


def _input_sweep(models: Callable[[], dict[str, ModelConfig]]):
    def build(duration_s: float, seed: int, trace: str | None) -> Workloads:
        ms = models()
        return [(f"prompt={n}", list(zipf_poisson(len(ms), SWEEP_RATE_PER_S, duration_s,
                                                  prompt_len=LengthDist("fixed", value=n),
                                                  output_len=SWEEP_OUTPUT, seed=seed).requests))
                for n in PROMPT_LENS]
    return build


def tiny_models() -> dict[str, ModelConfig]:
    """Two small OPT-architecture models (a few MB of meta weights; a few pages each)."""
    from replicas.engine.models import ModelConfig as MC

    def opt(hidden: int, layers: int) -> ModelConfig:
        return MC.from_hf({
            "architectures": ["OPTForCausalLM"], "hidden_size": hidden, "ffn_dim": 4 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 8, "vocab_size": 1000,
            "max_position_embeddings": 1024, "torch_dtype": "float16", "activation_function": "relu",
            "do_layer_norm_before": True, "word_embed_proj_dim": hidden, "enable_bias": True,
            "bos_token_id": 2, "eos_token_id": 2})
    return {"small-a": opt(512, 6), "small-b": opt(384, 4)}


def _tiny(duration_s: float, seed: int, trace: str | None) -> Workloads:
    wl = zipf_poisson(2, 40.0, duration_s, prompt_len=LengthDist("uniform", low=64, high=512),
                      output_len=LengthDist("uniform", low=32, high=128), seed=seed)
    return [("tiny", list(wl.requests))]


PRESETS: dict[str, Preset] = {}
for _name, _models in (("c1", _c1), ("c2", _c2)):
    PRESETS[_name] = Preset(_name, _models, _azure(_models), 3600.0)
    PRESETS[f"{_name}-rate"] = Preset(f"{_name}-rate", _models, _rate_sweep(_models), 600.0)
    PRESETS[f"{_name}-input"] = Preset(f"{_name}-input", _models, _input_sweep(_models), 600.0)
PRESETS["tiny"] = Preset("tiny", tiny_models, _tiny, 2.0)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]


def get_device(name: str) -> DeviceProfile:
    key = name.lower()
    if key not in DEVICES:
        raise KeyError(f"unknown device {name!r}; available: {sorted(DEVICES)}")
    return DEVICES[key]
