"""INT8 Q/DQ graphs made from an opset-23 export (the ONNX Runtime CUDA form, fused attention) load and run.

ONNX Runtime's extended graph rewrites insert a QuantizeLinear with ``output_dtype`` into such graphs and then
reject it (microsoft/onnxruntime#25526); `OrtUnit(..., basic_optimizations=True)` is how they are loaded, and
the benchmark's `ort_units` chooses it for Q/DQ graphs at opset >= 21 (found by a dry run of the H100 plan).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidllm_edge import manifest as M
from vidllm_edge import units as U
from vidllm_edge.calibration.quantize import quantize_graph_ort
from vidllm_edge.export.exporter import FrameProfile, export_model
from vidllm_edge.export.validate import real_frames
from vidllm_edge.models.model import build_model
from vidllm_edge.runtime.ort_backend import OrtUnit


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    model = build_model("tiny", seed=0)
    folder = tmp_path_factory.mktemp("o23")
    export_model(model, folder, "fp32", FrameProfile(1, 2, 4), units=("perception",), validate=False, opset=23)
    fp32 = folder / M.read_manifest(folder)["units"]["perception"]["file"]
    images = real_frames(4, (70, 84))
    target = fp32.with_name("perception.int8.onnx")
    quantize_graph_ort(fp32, target, [{"images": images[:2].numpy()}])
    return fp32, target, images


def test_opset23_qdq_graph_runs_with_basic_rewrites(qdq):
    fp32, target, images = qdq
    bound = {"H": 70, "W": 84}
    ref = OrtUnit(U.PERCEPTION, fp32, ["CPUExecutionProvider"], bound)({"images": images})
    got = OrtUnit(U.PERCEPTION, target, ["CPUExecutionProvider"], bound, basic_optimizations=True)({"images": images})
    for name, value in ref.items():
        cos = float(torch.nn.functional.cosine_similarity(value.flatten(), got[name].flatten(), dim=0))
        assert cos > 0.99, f"{name}: INT8 vs FP32 cosine {cos:.4f}"
        assert np.isfinite(got[name].numpy()).all()
