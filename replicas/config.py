"""The one configuration file of a deployment: models, replicas, memory, scheduling, remap policy, keys.

`OneirosConfig.load(path)` reads YAML and validates it with pydantic, so a bad file fails at start
with the field named, never inside a replica. `default_config()` is the built-in demo: three tiny
random-weight tenants (a Llama, a Qwen2 and an OPT) on CPU in a pool small enough that remapping
happens under load.

Memory may be oversubscribed: the models' parameters may add up to more than `memory.num_pages`
(per replica) holds. Idle tenants then lend layers (up to `remap.max_remapped_fraction` of each
model's layers) to the KV cache and to models being loaded; every admitted request finishes (the
oldest one runs first); a request whose model is not placed yet waits up to
`replicas.placement_timeout_s` for it. The README's "More models than memory" says the rest.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from remap import RemapConfig, VictimOrder
from replicas.engine.scheduler import PreemptionMode, SchedulerConfig, SchedulingPolicy
from replicas.engine.sampling import SAMPLING_DEFAULTS
from replicas.engine.tokenizer import ROLE_TEMPLATE, Tokenizer

_STRICT = ConfigDict(extra="forbid", frozen=True)

# Tiny architectures for the built-in default and tests (head_dim >= 32, as vLLM's CPU backend needs;
# vocab 259 = the byte-level tokenizer of random-weight models, so every generated id decodes).
TINY_MODELS: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 259, "hidden_size": 128,
        "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    },
    "tiny-qwen2": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 259, "hidden_size": 128,
        "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    },
    "tiny-opt": {
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": 259, "hidden_size": 128,
        "ffn_dim": 344, "num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 1024,
        "do_layer_norm_before": True, "word_embed_proj_dim": 128, "activation_function": "relu",
        "enable_bias": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
    },
}


class ModelSpec(BaseModel):
    model_config = _STRICT

    name: str = Field(description="Tenant name clients send as `model`.")
    path: str | None = Field(None, description="Local Hugging Face folder (config.json, *.safetensors, tokenizer).")
    architecture: str | None = Field(None, description=f"Random weights of a built-in config: {sorted(TINY_MODELS)}.")
    hf_config: dict[str, Any] | None = Field(None, description="Random weights of this config.json dict.")
    seed: int = Field(0, description="Seed of the random weights (dummy load).")
    weight_std: float = Field(0.2, gt=0, description="Spread of the random weights.")
    min_replicas: int = Field(1, ge=0, description="Replicas that host the model at least.")
    max_model_len: int | None = Field(None, ge=1, description="Longest prompt + output served (vLLM's "
                                      "--max-model-len); default the model's context. Lower it where one "
                                      "full-context request needs more KV than a replica can give: a request "
                                      "with no max_tokens is fitted to this.")
    chat_template: str | None = Field(None, description="Chat template (Jinja source, or the path of a .jinja file); "
                                                        "overrides the folder's. Random-weight models default to a "
                                                        "plain role-marker template; a folder with none and no "
                                                        "template here answers chat with a 400.")

    def context_len(self, config) -> int:
        """Longest prompt + output served of this model (its ModelConfig's context, or max_model_len)."""
        return min(config.max_position_embeddings, self.max_model_len or config.max_position_embeddings)

    def sampling_defaults(self) -> dict[str, float]:
        """The SAMPLING_DEFAULTS fields the folder's generation_config.json sets: a request that does not
        name them is sampled with these (as vLLM's `--generation-config auto`)."""
        file = pathlib.Path(self.path) / "generation_config.json" if self.path is not None else None
        if file is None or not file.is_file():
            return {}
        config = json.loads(file.read_text())
        return {k: config[k] for k in SAMPLING_DEFAULTS if isinstance(config.get(k), (int, float))}

    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (its folder's, else byte-level) with the chat template it is served with."""
        if self.path is not None:
            try:
                tokenizer = Tokenizer.from_folder(self.path)
            except FileNotFoundError:
                tokenizer = Tokenizer.byte_level()
        else:
            tokenizer = Tokenizer.byte_level()
            tokenizer.chat_template = ROLE_TEMPLATE
        template = self.chat_template
        if template is not None:
            is_file = template.endswith(".jinja") and "{" not in template
            tokenizer.chat_template = pathlib.Path(template).read_text(encoding="utf-8") if is_file else template
        return tokenizer

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("path", "architecture", "hf_config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"model {self.name!r}: give exactly one of path, architecture, hf_config (got {given})")
        if self.architecture is not None and self.architecture not in TINY_MODELS:
            raise ValueError(f"model {self.name!r}: unknown architecture {self.architecture!r}; "
                             f"built-in: {sorted(TINY_MODELS)}")
        return self


class MemorySettings(BaseModel):
    model_config = _STRICT

    num_pages: int = Field(96, ge=1, description="Pages in each replica's device pool.")
    page_size_bytes: int = Field(256 << 10, ge=256, description="Bytes per page (multiple of 256; 2 MiB on GPU).")
    device: str = Field("cpu", description="torch device of each replica: 'cpu' or 'cuda'.")
    backend: Literal["arena", "vmm"] = Field(
        "arena", description="'arena': one buffer, a layer comes back to its own pages (KV migrates out); 'vmm': "
                             "virtual memory, a layer comes back into any free pages (remap/vmm.py; CUDA needs "
                             "the gpu extra, the page size a multiple of the mapping granularity).")


class AutoscalingSettings(BaseModel):
    """Scaling the engine replicas on memory pressure (autoscaler/policy.py); see ScalingConfig."""

    model_config = _STRICT

    min_replicas: int = Field(1, ge=1, description="Fewest engine replicas.")
    max_replicas: int = Field(4, ge=1, description="Most engine replicas (KubeRay adds GPU workers for them).")
    high_pressure: float = Field(0.9, gt=0, description="KV pages demanded / spare pages above this is pressure.")
    low_pressure: float = Field(0.3, ge=0, description="Below this (no queueing, no SLO misses) is calm.")
    max_queue_delay_s: float = Field(2.0, gt=0, description="A request waiting longer than this is pressure.")
    ttft_slo_s: float = Field(2.0, gt=0, description="TTFT above this counts as an SLO miss.")
    upscale_delay_s: float = Field(15.0, ge=0, description="Pressure must last this long to scale up.")
    downscale_delay_s: float = Field(120.0, ge=0, description="Calm must last this long to scale down.")
    cooldown_s: float = Field(60.0, ge=0, description="No scale-down this soon after a change.")

    def policy_kwargs(self) -> dict[str, float | int]:
        return self.model_dump(exclude={"ttft_slo_s"})


class ReplicaSettings(BaseModel):
    model_config = _STRICT

    num_replicas: int = Field(1, ge=1, description="Engine replicas (one per GPU on a GPU cluster).")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (1 on GPU clusters, 0 on CPU).")
    num_cpus: float = Field(1, gt=0, description="CPUs per replica.")
    max_pending_requests: int = Field(256, ge=1, description="Unfinished requests per replica before 429.")
    report_period_s: float = Field(0.5, gt=0, description="How often a replica reports to the controller.")
    placement_timeout_s: float = Field(
        30.0, ge=0, description="How long a request for a model its replica does not host yet waits for the model "
                                "to be loaded there (idle tenants lend layers for it; KV of requests in flight "
                                "frees as they end) before a 503. A model that can never fit gets a 503 at once.")
    autoscaling: AutoscalingSettings | None = Field(None, description="Scale on memory pressure; null = fixed.")
    stream_batch_ms: float = Field(
        40.0, ge=0, description="Stream batching under load: while more than stream_batch_above streams are in "
                                "flight on a replica, a stream's tokens wait up to this long for the next step's, "
                                "to go out as one chunk (one message through Serve, the ingress and HTTP instead "
                                "of two). A request's first token and its last never wait. 0 = every step's "
                                "tokens at once.")
    stream_batch_above: int = Field(8, ge=0, description="Streams in flight on a replica above which tokens are "
                                                         "batched (stream_batch_ms).")


class SchedulerSettings(BaseModel):
    model_config = _STRICT

    max_num_batched_tokens: int = Field(512, ge=1, description="Tokens computed per engine step.")
    max_num_seqs: int = Field(64, ge=1, description="Running sequences per tenant.")
    preemption_mode: PreemptionMode = Field(PreemptionMode.REMAP, description="remap, swap or recompute.")
    policy: SchedulingPolicy = Field(SchedulingPolicy.CHUNKED, description="chunked (chunked prefill, the oldest "
                                     "request first) or vllm-v0 (vLLM v0.7.3's default: whole prefills first, no "
                                     "decodes in a prefill step; prompt + max_tokens must fit max_num_batched_tokens).")

    def to_engine(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, self.preemption_mode, self.policy)


class RemapSettings(BaseModel):
    model_config = _STRICT

    victim_order: VictimOrder = Field(VictimOrder.MRU, description="Which idle tenant lends first: mru or lru.")
    max_remapped_fraction: float = Field(0.75, ge=0, lt=1, description="Cap on lent layers per model.")
    max_staging_slots: int | None = Field(2, ge=1, description="Staging ring size; null = the paper's alpha+1.")
    revert_headroom_pages: int = Field(0, ge=0, description="Spare pages kept before giving pages back.")

    def to_engine(self) -> RemapConfig:
        return RemapConfig(victim_order=self.victim_order, max_remapped_fraction=self.max_remapped_fraction,
                           max_staging_slots=self.max_staging_slots, revert_headroom_pages=self.revert_headroom_pages)


class ApiKey(BaseModel):
    model_config = _STRICT

    key: str = Field(min_length=8, description="Bearer token clients send in the Authorization header.")
    models: list[str] | None = Field(None, description="Models this key may use; null = all.")


class HttpSettings(BaseModel):
    model_config = _STRICT

    host: str = Field("127.0.0.1", description="Address the HTTP API binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port; the API is under /v1.")
    grpc_port: int = Field(9000, ge=1, le=65535, description="Port of Ray Serve's gRPC proxy.")
    ingress: Literal["direct", "proxy"] = Field("direct", description=(
        "direct: the ingress replica serves HTTP on host:port itself, a hop fewer for every request and "
        "streamed token (docs/latency.md); clients must reach the node that runs it (a one-node cluster, "
        "as `oneiros serve` starts it). Serve's HTTP proxy then listens on proxy_port. "
        "proxy: Serve's HTTP proxy on host:port forwards to the ingress (any node takes requests; KubeRay)."))
    proxy_port: int | None = Field(None, ge=1, le=65535, description=(
        "Port of Serve's HTTP proxy when ingress is direct; null: a free port chosen at start."))


class OneirosConfig(BaseModel):
    model_config = _STRICT

    app_name: str = Field("oneiros", description="Ray Serve application name (and controller actor prefix).")
    models: list[ModelSpec] = Field(description="The tenants: every model the cluster can serve.")
    replicas: ReplicaSettings = Field(default_factory=ReplicaSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    remap: RemapSettings = Field(default_factory=RemapSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    api_keys: list[ApiKey] = Field(default_factory=list, description="Empty = no authentication.")

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in models]
        dups = sorted({n for n in names if names.count(n) > 1})
        if not models or dups:
            raise ValueError(f"models must be non-empty with unique names; duplicates: {dups}")
        return models

    @classmethod
    def load(cls, path: str | pathlib.Path) -> OneirosConfig:
        data = yaml.safe_load(pathlib.Path(path).read_text())
        return cls.model_validate(data or {})

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)


REAL_MODEL = "smollm2"  # the tenant name of the real model `oneiros serve` adds to its default (replicas/pull.py)
# SmolLM2-135M takes 2083 pages of 256 KiB (30 layers of 55, its embedding 433), the tiny tenants ~45: about 270
# pages (~1.3k SmolLM2 tokens) of KV are left before the engine lends parameters, so a few long chats lend and stream.
REAL_MODEL_NUM_PAGES = 2400


def default_config(real_model: str | None = None, **overrides: Any) -> OneirosConfig:
    """The built-in demo: three tiny tenants, two CPU replicas, a pool where remapping happens; with
    `real_model` (the folder `oneiros pull smollm2` wrote), SmolLM2 first, in pools sized for it."""
    data: dict[str, Any] = {
        "models": [
            {"name": "llama", "architecture": "tiny-llama", "seed": 1},
            {"name": "qwen", "architecture": "tiny-qwen2", "seed": 2},
            {"name": "opt", "architecture": "tiny-opt", "seed": 3},
        ],
        "replicas": {"num_replicas": 2},
        "memory": {"num_pages": 64},  # 3 x ~15 pages of parameters: KV runs out at ~2.4k tokens per replica
    }
    if real_model is not None:
        # 2048 tokens (410 pages) fit one request; its 8k context (1639 pages) would not: a chat with no
        # max_tokens is fitted to 2048
        data["models"].insert(0, {"name": REAL_MODEL, "path": str(real_model), "max_model_len": 2048})
        data["memory"] = {"num_pages": REAL_MODEL_NUM_PAGES}
    data.update(overrides)
    return OneirosConfig.model_validate(data)
