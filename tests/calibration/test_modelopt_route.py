"""`UnitQuantizer(method="modelopt")` where nvidia-modelopt[onnx] is installed. Its [onnx] extra pins onnx,
onnxruntime-gpu and cupy versions that replace this package's, so it lives in an environment of its own
(benchmarks/int8_method_compare.py says how); elsewhere this module is skipped with that reason.

Checked: the export folder is left as it was (modelopt rewrites its input file in place), the graph has
TensorRT's Q/DQ layout with int8 weights, one-node builds for the sensitivity pass quantize that node
only, and the parity against FP32.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from vidllm_edge import manifest as M
from vidllm_edge.calibration.record import record_calibration, state_fingerprint
from vidllm_edge.export.exporter import FrameProfile, export_model
from vidllm_edge.models.model import build_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("modelopt.onnx.quantization",
                    reason="needs nvidia-modelopt[onnx], installed in an environment of its own")

from vidllm_edge.calibration.quantize import INT8_GATE, UnitQuantizer  # noqa: E402

HW = (70, 84)
WEIGHTED = ("MatMul", "Conv", "Gemm")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vidllm_edge.synthetic import write_scene

    root = tmp_path_factory.mktemp("modelopt")
    model = build_model("tiny", seed=0)
    export = root / "export"
    export_model(model, export, frames=FrameProfile(1, 2, 4), image_hw=HW, units=("perception", "box_head"),
                 validate=False, source={"state_sha256": state_fingerprint(model)}, log=io.StringIO())
    video = write_scene(root / "scene", num_frames=16, width=112, height=84)[0]
    record_calibration(model, [video], 4, root / "calib", image_hw=HW, log=io.StringIO())
    return export, root / "calib"


def _quantized(graph) -> list[str]:
    dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in graph.node if n.op_type in WEIGHTED and any(i in dq for i in n.input)]


def test_modelopt_graph_leaves_the_export_intact_in_tensorrt_layout(setup):
    export, calib = setup
    manifest = M.read_manifest(export)
    with UnitQuantizer(export, "perception", calib, method="modelopt") as q:
        path = q.write()
        ev = q.evaluate(path)
    M.verify_files(export, manifest)  # every FP32 graph still has its recorded sha256 (perception's would not)
    assert sorted(p.name for p in (export / "onnx").iterdir()) == [
        "box_head.onnx", "perception.int8.onnx", "perception.onnx"]  # no staging or intermediate files
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert inits[node.input[2]].dtype == np.int8 and not inits[node.input[2]].any(), node.name  # zero point 0
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == 27 and all(inits[n.input[0]].dtype == np.int8 for n in weight_dq)  # dq_only: int8
    assert len(_quantized(graph)) == 27  # attention's activation matmuls stay FP
    # One video x 4 frames misses the photographs' ranges: fully quantized, perception lands just under the gate
    # here with either route (int8_method_compare_tiny.md, thin calibration: cosine 0.99895 for both).
    assert ev.worst("heldout")["cosine"] >= 0.998 and ev.worst("calibration")["cosine"] >= INT8_GATE.cosine


def test_one_node_builds_quantize_that_node_only(setup):
    export, calib = setup
    with UnitQuantizer(export, "box_head", calib, method="modelopt") as q:
        first = q.nodes()[0].name
        assert _quantized(onnx.load(str(q.build(include=[first]))).graph) == [first]
        # modelopt leaves a Gemm with fewer than 16 output features (the 6 box numbers) FP by its own rule
        full = q.build()
        assert len(_quantized(onnx.load(str(full)).graph)) == len(q.nodes()) - 1
        ev = q.evaluate(full)
        assert ev.ok, ev.failures
