"""Shared test fixtures: the shared oracles folder, thread count, and skip reasons for GPU/TensorRT."""

from __future__ import annotations

import os
import signal
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


@pytest.fixture(autouse=True)
def deadline(request):
    """A test module that sets ``TEST_DEADLINE_S`` gets each test ended with TimeoutError past that many seconds
    (live-stream tests must never hang CI)."""
    seconds = getattr(request.module, "TEST_DEADLINE_S", None)
    if seconds is None:
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"test ran over its {seconds} s deadline")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


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
