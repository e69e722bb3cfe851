"""load_hf_folder: a Hugging Face model folder (config.json + safetensors) as a config and a state dict.

Reads one `model.safetensors` or the shards named by `model.safetensors.index.json`. Tensors land on
the CPU in the checkpoint's dtype; the engine packs them into pages (split_state_dict) afterwards.
Tokenizers are loaded elsewhere.
"""

from __future__ import annotations

import json
import logging
import pathlib

import torch

from replicas.engine.models.config import ModelConfig

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def load_hf_folder(path: str | pathlib.Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    folder = pathlib.Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json")
    config = ModelConfig.from_hf(json.loads(config_file.read_text()))
    state: dict[str, torch.Tensor] = {}
    for shard in _shards(folder):
        state |= _read_safetensors(shard)
    logger.info(
        "loaded %s from %s: %d tensors, %.1f MiB", config.architecture, folder, len(state),
        sum(t.numel() * t.element_size() for t in state.values()) / 2**20,
    )
    return config, state


def _shards(folder: pathlib.Path) -> list[pathlib.Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        shards = [folder / n for n in names]
    else:
        shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{folder} has no *.safetensors files (other weight formats are not supported)")
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ValueError(f"{index} names shards that are not in {folder}: {missing}")
    return shards


def _read_safetensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # lazily: only the loader needs safetensors

    return load_file(str(path), device="cpu")
