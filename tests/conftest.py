"""Shared test fixtures: the shared oracles folder, thread count, and skip reasons for GPU/TensorRT."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """../shared beside the repository (CI layout), or $VIDLLM_SHARED."""
    return Path(os.environ.get("VIDLLM_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not path.is_dir():
        pytest.skip(f"the shared folder {path} is absent (set VIDLLM_SHARED)")
    return path


def pytest_collection_modifyitems(config, items):
    from vidllm_edge.optional import available

    reasons = {}
    if not torch.cuda.is_available():
        reasons["gpu"] = "needs a CUDA GPU; none is visible to torch"
    if not available("tensorrt"):
        reasons["tensorrt"] = "needs the TensorRT Python package (import tensorrt failed)"
    for item in items:
        for mark, reason in reasons.items():
            if mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
