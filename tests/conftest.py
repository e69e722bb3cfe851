"""Markers: everything under tests/unit is `unit`; `gpu` tests skip with a reason without CUDA."""

from __future__ import annotations

import pathlib

import pytest

UNIT_DIR = pathlib.Path(__file__).parent / "unit"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA: no GPU on this machine")
    for item in items:
        if UNIT_DIR in pathlib.Path(item.fspath).parents:
            item.add_marker(pytest.mark.unit)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
