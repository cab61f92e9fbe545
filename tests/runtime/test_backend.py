"""The backend interface validates feeds before running (names, dtypes, ranks, bound and symbolic dims)."""

from __future__ import annotations

import pytest
import torch

from vidllm_edge.errors import CheckpointError, InputError
from vidllm_edge.runtime.backend import Backend, validate_feed
from vidllm_edge.units import GEOMETRY, PERCEPTION, METRIC_DEPTH, FEATURE_NAMES


class Echo(Backend):
    name = "echo"

    def _run(self, feed):
        return {"seen": sorted(feed)}


def test_valid_feed_binds_symbols():
    assert validate_feed(PERCEPTION, {"images": torch.zeros(3, 3, 28, 42)}, {}) == {"S": 3, "H": 28, "W": 42}
    assert Echo(GEOMETRY, {"P": 6, "C": 8})({"t_geom": torch.zeros(2, 6, 8)}) == {"seen": ["t_geom"]}


@pytest.mark.parametrize("feed, message", [
    ({"images": torch.zeros(3, 28, 28)}, r"^Input tensor: images \| Received shape \[3, 28, 28\]\.\nNote: Expected images: float32\[S, 3, H, W\]"),
    ({"images": torch.zeros(2, 3, 28, 28, dtype=torch.float64)}, r"^Input tensor: images \| Received dtype float64\."),
    ({"images": torch.zeros(2, 4, 28, 28)}, r"^Input tensor: images \| Received shape \[2, 4, 28, 28\]"),
    ({"images": torch.zeros(2, 3, 28, 56)}, r"Received shape \[2, 3, 28, 56\]\.\nNote: .* with H=28, W=42\."),
    ({"frames": torch.zeros(2, 3, 28, 42)}, r"^Unit: perception \| got inputs \['frames'\]; missing \['images'\], unexpected \['frames'\]"),
    ({"images": [[0.0]]}, r"^Input tensor: images \| Received list, not a tensor"),
])
def test_bad_feeds_are_named(feed, message):
    with pytest.raises(InputError, match=message):
        Echo(PERCEPTION, {"H": 28, "W": 42})(feed)


def test_symbolic_dims_must_agree_across_inputs():
    feed = {n: torch.zeros(2, 6, 8) for n in FEATURE_NAMES}
    feed["feat3"] = torch.zeros(3, 6, 8)
    with pytest.raises(InputError, match=r"^Input tensor: feat3 \| Received shape \[3, 6, 8\]\.\nNote: .*Sm=2"):
        Echo(METRIC_DEPTH, {"P": 6, "C": 8})(feed)


def test_a_provider_that_fails_to_start_is_an_error_not_a_quiet_cpu_run(tmp_path, monkeypatch):
    """ONNX Runtime retries on the CPU and only warns when the CUDA provider fails to start (seen on the H100:
    a GPU benchmark silently ran on the CPU). Both session openers turn that into a DependencyError."""
    import warnings

    import onnxruntime as ort

    from vidllm_edge.errors import DependencyError
    from vidllm_edge.runtime import ort_backend, ort_llm

    class FallingBack:  # what ORT does: warn, then build the session on the CPU
        def __init__(self, path, sess_options=None, providers=None):
            warnings.warn("EP Error libcudnn.so.9: cannot open shared object file when using "
                          "['CUDAExecutionProvider'] Falling back to ['CPUExecutionProvider'] and retrying.")

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", FallingBack)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    path = tmp_path / "unit.onnx"
    with pytest.raises(DependencyError) as err:
        ort_backend.open_session(path, ["CUDAExecutionProvider"])
    text = str(err.value)
    assert text.startswith("ONNX Runtime provider: CUDAExecutionProvider | could not be started for unit.onnx; "
                           "ONNX Runtime fell back to CPUExecutionProvider (EP Error libcudnn.so.9")
    assert "Note: Check the CUDA and cuDNN libraries" in text
    with pytest.raises(DependencyError, match=r"ONNX Runtime provider: CUDAExecutionProvider \| could not be started "
                                              r"for llm_decode.onnx"):
        ort_llm._session(ort, tmp_path / "llm_decode.onnx", ["CUDAExecutionProvider"])
    assert ort_backend.open_session(path, ["CPUExecutionProvider"]).get_providers() == ["CPUExecutionProvider"]


def test_a_device_failure_while_loading_is_not_called_a_damaged_file(tmp_path, monkeypatch):
    """On the H100 a session that could not create its cuBLAS handle (device memory held by other sessions) was
    reported as a damaged ONNX file; it is a DependencyError that says what failed. The CUDA provider is asked
    to grow its memory arena by what is requested, not to the next power of two."""
    import onnxruntime as ort

    from vidllm_edge.errors import DependencyError
    from vidllm_edge.runtime import ort_backend

    asked = []

    class NoMemory:
        def __init__(self, path, sess_options=None, providers=None):
            asked.append(providers)
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: cuda_call.cc:154 "
                               "CudaCall CUBLAS failure 3: the resource allocation failed ; GPU=0 ; "
                               "expr=cublasCreate(&cublas_handle_);")

    monkeypatch.setattr(ort, "InferenceSession", NoMemory)
    with pytest.raises(DependencyError) as err:
        ort_backend.open_session(tmp_path / "geometry.int8.onnx", ["CUDAExecutionProvider"])
    assert str(err.value) == (
        "ONNX Runtime provider: CUDAExecutionProvider | failed while loading geometry.int8.onnx: CUBLAS failure 3: the "
        "resource allocation failed ; GPU=0 ; expr=cublasCreate(&cublas_handle_);.\nNote: The device is out of memory "
        "or its libraries failed: free device memory (other processes, other sessions), or use fewer frames.")
    assert asked == [[("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]]

    class Damaged:
        def __init__(self, path, sess_options=None, providers=None):
            raise RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from unit.onnx failed:Protobuf "
                               "parsing failed.")

    monkeypatch.setattr(ort, "InferenceSession", Damaged)
    with pytest.raises(CheckpointError, match=r"^ONNX file: .*unit.onnx \| cannot be loaded \(\[ONNXRuntimeError\] : 7 : "
                                              r"INVALID_PROTOBUF"):
        ort_backend.open_session(tmp_path / "unit.onnx", ["CUDAExecutionProvider"])


def test_providers_given_with_options_are_checked_by_name(tmp_path, monkeypatch):
    """ONNX Runtime's TensorRT route passes (name, options) pairs (ort_trt_providers); the started-provider check
    compares names, and pairs reach ONNX Runtime unchanged."""
    import onnxruntime as ort

    from vidllm_edge.runtime import ort_backend

    asked = []

    class Started:
        def __init__(self, path, sess_options=None, providers=None):
            asked.append(providers)

        def get_providers(self):
            return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", Started)
    providers = [("TensorrtExecutionProvider", {"trt_fp16_enable": True}), ("CUDAExecutionProvider", {"device_id": 0})]
    ort_backend.open_session(tmp_path / "unit.onnx", providers)
    assert asked == [providers]
