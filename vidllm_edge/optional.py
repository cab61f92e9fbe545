"""Lazy import of heavy optional dependencies (tensorrt, onnxruntime, onnx, cuda bindings).

Every module of the package imports on a CPU-only machine without them; the import happens at the
point of use, through :func:`require`, which fails with the install hint instead of an ImportError.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from vidllm_edge.errors import DependencyError

INSTALL_HINTS = {
    "tensorrt": "Install TensorRT 10 for your CUDA version (on Jetson it comes with JetPack; "
    "on desktop: pip install tensorrt-cu12 or tensorrt-cu13).",
    "onnxruntime": "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA).",
    "onnx": "pip install 'vidllm-edge[onnx]' (onnx, onnxscript, onnxruntime).",
    "onnxscript": "pip install 'vidllm-edge[onnx]' (onnx, onnxscript, onnxruntime).",
    "cuda": "pip install cuda-python.",
    "cv2": "pip install opencv-python-headless.",
    "tokenizers": "pip install tokenizers.",
}


def require(name: str, feature: str = "") -> ModuleType:
    """Import module ``name`` or raise :class:`DependencyError` naming the feature and the install hint."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # the package or one of its shared libraries is missing
        top = name.split(".")[0]
        what = f"needed for {feature}" if feature else "needed here"
        raise DependencyError(
            f"Python package: {name}",
            f"cannot be imported ({exc.__class__.__name__}: {exc}); {what}.",
            INSTALL_HINTS.get(top, f"pip install {top}"),
        ) from exc


def available(name: str) -> bool:
    """True if ``name`` imports (used by `doctor` and by test skips)."""
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken install (missing .so) counts as unavailable too
        return False
    return True
