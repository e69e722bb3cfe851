"""Model definitions: configs, weight splitting and the paged-attention forward pass.

Weights never live in a model object: the engine keeps them in the memory engine's pages and
hands them to `CausalLM.forward` one layer at a time (see causal_lm.py).
"""

from replicas.engine.models.attention import AttentionBatch, PagedAttention
from replicas.engine.models.causal_lm import CausalLM, LayerWeights, ResidentWeights
from replicas.engine.models.config import ARCHITECTURES, ModelConfig, RopeScaling
from replicas.engine.models.loader import load_hf_folder
from replicas.engine.models.weights import blocked_for_cpu, dummy_weights, split_state_dict

__all__ = [
    "ARCHITECTURES", "AttentionBatch", "CausalLM", "LayerWeights", "ModelConfig", "PagedAttention",
    "ResidentWeights", "RopeScaling", "blocked_for_cpu", "dummy_weights", "load_hf_folder", "split_state_dict",
]
