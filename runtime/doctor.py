"""`vidllm-edge doctor`: what is installed and which backends can run here."""

from __future__ import annotations

import platform
from typing import Any

from vidllm_edge.optional import available

PACKAGES = ["torch", "transformers", "safetensors", "tokenizers", "cv2", "numpy", "onnx", "onnxscript",
            "onnxruntime", "tensorrt", "cuda", "modelopt"]


def _version(name: str) -> str | None:
    if not available(name):
        return None
    import importlib

    mod = importlib.import_module(name)
    return str(getattr(mod, "__version__", "installed"))


def collect() -> dict[str, Any]:
    """Gather versions, GPU facts and backend availability (never raises for a missing package)."""
    import torch

    report: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                              "packages": {name: _version(name) for name in PACKAGES}}
    gpu: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu.update(name=props.name, compute_capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1))
    report["gpu"] = gpu
    providers = []
    if report["packages"]["onnxruntime"]:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    report["onnxruntime_providers"] = providers
    report["backends"] = {
        "torch": "ok (cuda)" if gpu["cuda_available"] else "ok (cpu)",
        "onnxruntime": f"ok ({', '.join(providers)})" if providers else "missing: pip install onnxruntime",
        "tensorrt": ("ok" if report["packages"]["tensorrt"] and gpu["cuda_available"]
                     else "missing: TensorRT 10 and a CUDA GPU (JetPack on Jetson; pip install tensorrt-cu12/cu13)"),
    }
    return report


def render(report: dict[str, Any]) -> str:
    """A human-readable table of `collect`'s report."""
    lines = [f"python       {report['python']} ({report['platform']})"]
    for name, version in report["packages"].items():
        lines.append(f"{name:12} {version or '-'}")
    gpu = report["gpu"]
    lines.append(f"gpu          {gpu.get('name', 'none')}" + (f", sm {gpu['compute_capability']}, {gpu['memory_gib']} GiB"
                                                            if gpu.get("name") else f" (torch cuda: {gpu['torch_cuda']})"))
    lines.append("backends:")
    lines += [f"  {name:11} {state}" for name, state in report["backends"].items()]
    return "\n".join(lines)
