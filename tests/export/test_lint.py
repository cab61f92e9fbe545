"""The TensorRT 10 ONNX lint: small hand-built graphs for each check, one real dynamo export, error paths."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from vidllm_edge.errors import VidLLMError  # noqa: E402
from vidllm_edge.export import trt_support  # noqa: E402
from vidllm_edge.export.lint import Finding, LintError, LintReport, OnnxFileError, check_lint, lint_onnx  # noqa: E402

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def _vi(name, dtype=F32, shape=(2, 8)):
    return helper.make_tensor_value_info(name, dtype, list(shape))  # str dims are symbolic


def _model(nodes, inputs, outputs, inits=(), opset=18, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    return helper.make_model(graph, opset_imports=opsets)


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _codes(report, severity=None):
    return [f.code for f in report.findings if severity is None or f.severity == severity]


def test_table_records_its_source_and_covers_the_matrix():
    assert trt_support.TRT_VERSION == "10.15"
    assert "onnx/onnx-tensorrt docs/operators.md @ fa5aa9f61e7781d2ca8f5351d42c1f19525a6124" in trt_support.SOURCE
    ops = trt_support.SUPPORTED_OPS
    assert len(ops) == 200 and sum(r.supported for r in ops.values()) == 158
    assert ops["LayerNormalization"].supported and not ops["Unique"].supported
    assert "half_pixel" in ops["Resize"].restrictions and ops["Attention"].since == "10.14"
    assert trt_support.lookup("Gelu", "com.microsoft") is None and trt_support.lookup("Gelu") is ops["Gelu"]


def test_clean_transformer_graph_is_ok():
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
         helper.make_node("LayerNormalization", ["h", "g", "b"], ["n"], name="ln", axis=-1),
         helper.make_node("Softmax", ["n"], ["y"], name="sm", axis=-1)],
        [_vi("x")], [_vi("y")],
        [_init("w", np.ones((8, 8), np.float32)), _init("g", np.ones(8, np.float32)),
         _init("b", np.zeros(8, np.float32))],
    )
    report = lint_onnx(model)
    assert report.ok and report.findings == []
    assert report.op_counts == {"MatMul": 1, "LayerNormalization": 1, "Softmax": 1} and report.opset == 18
    table = report.table()
    assert "LayerNormalization      1  ok" in table and table.endswith("0 errors, 0 warnings, 0 info")
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


def test_custom_domain_op_is_an_error_but_a_known_plugin_only_warns():
    model = _model(
        [helper.make_node("FastGelu", ["x"], ["h"], name="gelu", domain="com.microsoft"),
         helper.make_node("EfficientNMS_TRT", ["h"], ["y"], name="nms", domain="trt.plugins")],
        [_vi("x")], [_vi("y", shape=("k",))], extra_opsets=[("com.microsoft", 1), ("trt.plugins", 1)],
    )
    report = lint_onnx(model)
    assert not report.ok
    errors = [(f.code, f.node, f.op_type) for f in report.errors]
    assert errors == [("custom-domain", "gelu", "com.microsoft::FastGelu")]
    assert ("trt-plugin", "trt.plugins::EfficientNMS_TRT") in [(f.code, f.op_type) for f in report.warnings]
    assert "ERROR: custom-domain" in report.table()


def test_nonzero_is_flagged_as_data_dependent():
    model = _model([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [_vi("x")], [_vi("y", I64, (2, "k"))])
    report = lint_onnx(model)
    assert report.ok and _codes(report, "warning") == ["data-dependent-shape"]
    assert "IOutputAllocator" in report.warnings[0].message


def test_unique_is_unsupported():
    unique = helper.make_node("Unique", ["x"], ["y"], name="u")
    model = _model([unique], [_vi("x", shape=(8,))], [_vi("y", shape=("k",))])
    report = lint_onnx(model)
    assert [(f.code, f.op_type) for f in report.errors] == [("unsupported-op", "Unique")]


def test_decomposed_layernorm_is_a_warning():
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], name="mean"),
        helper.make_node("Sub", ["x", "mean"], ["d"], name="sub"),
        helper.make_node("Pow", ["d", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"], name="var"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
        helper.make_node("Div", ["d", "sd"], ["y"], name="div"),
    ]
    inits = [_init("axes", np.array([-1], np.int64)), _init("two", np.float32(2.0)), _init("eps", np.float32(1e-5))]
    report = lint_onnx(_model(nodes, [_vi("x")], [_vi("y")], inits))
    assert report.ok and _codes(report, "warning") == ["decomposed-layernorm"]
    assert report.warnings[0].node == "div" and "opset >= 17" in report.warnings[0].message


def test_int64_initializer_outside_int32_range_warns_but_slice_sentinels_do_not():
    big = np.array([2**40, 1], np.int64)
    nodes = [
        helper.make_node("Add", ["i", "big"], ["s"], name="add_big"),
        helper.make_node("Slice", ["x", "starts", "ends", "axes1"], ["y"], name="slice"),
    ]
    inits = [_init("big", big), _init("starts", np.array([1], np.int64)),
             _init("ends", np.array([2**63 - 1], np.int64)), _init("axes1", np.array([1], np.int64))]
    model = _model(nodes, [_vi("i", I64, (2,)), _vi("x")], [_vi("s", I64, (2,)), _vi("y", shape=(2, 1))], inits)
    report = lint_onnx(model)
    out_of_range = [f for f in report.findings if f.code == "int64-out-of-range"]
    assert [(f.severity, f.node) for f in out_of_range] == [("warning", "add_big")]
    assert "'big'" in out_of_range[0].message and "max 1099511627776" in out_of_range[0].message
    assert "int64-initializers" in _codes(report, "info")


def _loop_model(trip: str):
    """A Loop with one state value and one scan output; ``trip`` is "input", "constant" or "none"."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["x_in", "one"], ["x_out"]),
         helper.make_node("Identity", ["x_out"], ["scan"])],
        "body",
        [_vi("it", I64, ()), _vi("cond_in", TensorProto.BOOL, ()), _vi("x_in", shape=(2,))],
        [_vi("cond_out", TensorProto.BOOL, ()), _vi("x_out", shape=(2,)), _vi("scan", shape=(2,))],
        initializer=[_init("one", np.ones(2, np.float32))],
    )
    loop = helper.make_node("Loop", ["" if trip == "none" else "n", "cond", "x0"], ["x_final", "scans"], name="loop",
                            body=body)
    inputs = [_vi("x0", shape=(2,))] + ([_vi("n", I64, ())] if trip == "input" else [])
    inits = [_init("cond", np.array(True))] + ([_init("n", np.array(4, np.int64))] if trip == "constant" else [])
    return _model([loop], inputs, [_vi("x_final", shape=(2,)), _vi("scans", shape=("t", 2))], inits)


def test_loop_is_flagged_per_table():
    dynamic = lint_onnx(_loop_model("input"))
    assert dynamic.ok and _codes(dynamic, "warning") == ["loop-scan-output"]
    assert "scan output length cannot be dynamic" in dynamic.warnings[0].message
    unbounded = lint_onnx(_loop_model("none"))
    assert [(f.code, f.node) for f in unbounded.errors] == [("loop-scan-output", "loop")]
    assert "dummy length of 1024" in unbounded.errors[0].message
    constant = lint_onnx(_loop_model("constant"))
    assert constant.ok and _codes(constant, "warning") == ["control-flow"]
    assert constant.op_counts == {"Loop": 1, "Identity": 2, "Add": 1}  # subgraph nodes are counted and linted


def test_local_functions_are_inlined_before_linting():
    body = [helper.make_node("NonZero", ["a"], ["b"])]
    function = helper.make_function("pkg.custom", "Where0", ["a"], ["b"], body, [helper.make_opsetid("", 18)])
    model = _model([helper.make_node("Where0", ["x"], ["y"], name="call", domain="pkg.custom")],
                   [_vi("x")], [_vi("y", I64, (2, "k"))], extra_opsets=[("pkg.custom", 1)])
    model.functions.append(function)
    report = lint_onnx(model)
    assert report.ok and report.op_counts == {"NonZero": 1}  # no custom-domain error for the call itself
    assert _codes(report) == ["data-dependent-shape", "local-functions"]


def test_external_data_and_load_weights(tmp_path):
    model = _model([helper.make_node("Add", ["i", "big"], ["s"], name="add_big")], [_vi("i", I64, (2,))],
                   [_vi("s", I64, (2,))], [_init("big", np.array([2**40, 1], np.int64))])
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    assert "int64-out-of-range" in _codes(lint_onnx(path))
    light = lint_onnx(path, load_weights=False)  # values in external data are not range-checked
    assert light.ok and _codes(light) == ["external-data-not-loaded", "int64-initializers"]
    proto = onnx.load(str(path), load_external_data=False)  # a proto cannot locate its external data
    assert "onnx-checker-skipped" in _codes(lint_onnx(proto)) and lint_onnx(proto).ok


def test_old_opset_warns():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x")], [_vi("y")], opset=13)
    report = lint_onnx(model)
    assert report.ok and report.opset == 13 and _codes(report) == ["old-opset"]
    assert "warning  old-opset: Opset 13 < 17" in report.table()


def test_resize_restrictions_are_checked():
    resize = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="cubic",
                              coordinate_transformation_mode="tf_crop_and_resize")
    model = _model([resize], [_vi("x", shape=(1, 3, 4, 4))], [_vi("y", shape=(1, 3, 8, 8))],
                   [_init("scales", np.array([1, 1, 2, 2], np.float32))])
    messages = [f.message for f in lint_onnx(model).errors]
    assert len(messages) == 2
    assert "mode='cubic'" in messages[0] and "coordinate_transformation_mode='tf_crop_and_resize'" in messages[1]


def test_target_version_gates_newer_operators():
    model = _model([helper.make_node("RMSNormalization", ["x", "s"], ["y"], name="rms")], [_vi("x")], [_vi("y")],
                   [_init("s", np.ones(8, np.float32))], opset=23)
    assert lint_onnx(model).ok
    old = lint_onnx(model, trt_version="10.3")
    assert [f.message for f in old.errors] == ["RMSNormalization needs TensorRT >= 10.15; the target is 10.3."]


def test_check_lint_message_lists_every_error():
    report = LintReport(model="m.onnx", opset=18, trt_version="10.15", findings=[
        Finding("error", "custom-domain", "gelu", "com.microsoft::FastGelu", "Not parsable."),
        Finding("warning", "old-opset", "", "", "Ignored: not an error."),
        Finding("error", "opset-range", "", "", "Opset 7 is too old."),
    ])
    with pytest.raises(LintError) as info:
        check_lint(report, allow_unsupported=False, subject="m.onnx")
    assert str(info.value) == (
        "ONNX model: m.onnx | 2 errors from the TensorRT 10.15 lint:\n"
        "  - custom-domain at gelu (com.microsoft::FastGelu): Not parsable.\n"
        "  - opset-range: Opset 7 is too old.\n"
        "Note: Change the export so that TensorRT can parse these nodes (opset, export wrapper, or a TensorRT "
        "plugin), or pass --allow-unsupported to export anyway (the engine build is then expected to fail)."
    )
    assert isinstance(info.value, VidLLMError)
    assert check_lint(report, allow_unsupported=True, subject="m.onnx") is None
    assert check_lint(LintReport("ok.onnx", 18, "10.15"), allow_unsupported=False, subject="ok.onnx") is None


def test_corrupted_or_missing_file_raises_a_typed_error(tmp_path):
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x")], [_vi("y")])
    data = model.SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxFileError, match=rf"^ONNX file: {path} \| cannot be parsed \(.*\)\.\nNote: .*re-export"):
        lint_onnx(path)
    with pytest.raises(OnnxFileError, match=r"missing\.onnx \| does not exist"):
        lint_onnx(tmp_path / "missing.onnx")


def test_modules_import_without_onnx():
    code = (
        "import sys; sys.modules['onnx'] = None\n"
        "import vidllm_edge.export.lint as lint, vidllm_edge.export.trt_support\n"
        "from vidllm_edge.errors import DependencyError\n"
        "try:\n    lint.lint_onnx('x.onnx')\nexcept DependencyError as e:\n    print('DependencyError', e.subject)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "DependencyError Python package: onnx"


def test_real_dynamo_export_with_layernorm_and_sdpa_is_ok(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, dim: int = 32, heads: int = 4) -> None:
            super().__init__()
            self.norm, self.qkv, self.out = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.heads = heads

        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, D/H]
            return x + self.out(y.transpose(1, 2).reshape(b, n, d))

    path = tmp_path / "block.onnx"
    torch.onnx.export(Block().eval(), (torch.randn(2, 8, 32),), str(path), dynamo=True, opset_version=18)
    report = lint_onnx(path)
    assert report.ok, report.table()
    assert report.opset == 18 and report.op_counts.get("LayerNormalization") == 1
    assert "decomposed-layernorm" not in _codes(report)
    assert lint_onnx(path, load_weights=False).ok
