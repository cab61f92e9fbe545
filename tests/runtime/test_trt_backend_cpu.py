"""The TensorRT backend's checks that run without TensorRT: imports, profile ranges, damaged engine files,
the order of checks (file before TensorRT), the ONNX Runtime TensorRT provider options."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from vidllm_edge import units as U
from vidllm_edge.engines.keys import EngineKey
from vidllm_edge.engines.manifest import EngineFileError
from vidllm_edge.errors import CheckpointError, DependencyError, InputError
from vidllm_edge.optional import available
from vidllm_edge.runtime import trt_backend as T

SHA = "ab" * 32
KEY = EngineKey("geometry", "fp16", {"S": (1, 2, 4)}, (70, 84), "10.3.0", "8.7", SHA)
ENTRY = dict(KEY.to_dict(), build={"export": "/data/export", "precision": "fp16", "frames": [1, 2, 4]})
BOX = dict(EngineKey("box_head", "fp16", {"N": (1, 1, 16)}, (70, 84), "10.3.0", "8.7", SHA).to_dict(),
           build={"export": "/data/export", "precision": "fp16", "frames": [1, 2, 4]})
NO_TRT = pytest.mark.skipif(available("tensorrt"), reason="checks the error raised when TensorRT is absent")


def test_importing_the_backend_does_not_import_tensorrt():
    """(tests/test_imports.py imports every module with tensorrt masked; this checks nothing imports it eagerly.)"""
    code = ("import sys\n"
            "import vidllm_edge.runtime.trt_backend, vidllm_edge.engines.builder, vidllm_edge.engines.cli\n"
            "assert 'tensorrt' not in sys.modules and 'onnx' not in sys.modules, sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_frames_outside_the_profile_name_the_input_and_the_rebuild():
    T.check_profile(U.GEOMETRY, {"S": 4, "P": 30}, KEY.profile_dict, ENTRY, "/data/engines")  # inside
    with pytest.raises(InputError) as info:
        T.check_profile(U.GEOMETRY, {"S": 5, "P": 30}, KEY.profile_dict, ENTRY, "/data/engines")
    assert str(info.value) == (
        "Input tensor: t_geom | has S=5 (frames), outside the engine's optimization profile S in [1, 4] (built "
        "for 2).\nNote: Feed 1 to 4 frames, or rebuild the engines for more: vidllm-edge build --export "
        "/data/export --precision fp16 --frames 1:2:5 --out /data/engines")


def test_rows_outside_the_profile_suggest_splitting():
    with pytest.raises(InputError, match=r"(?s)hidden \| has N=20 \(rows\).*\[1, 16\].*chunks of at most 16"):
        T.check_profile(U.BOX_HEAD, {"N": 20, "D": 64}, {"N": (1, 1, 16)}, BOX, "/data/engines")


def _engine(tmp_path, data=b"\x00plan" * 64):
    path = tmp_path / KEY.file_name()
    path.write_bytes(data)
    return path, dict(ENTRY, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def test_truncated_engine_is_named_before_tensorrt_is_imported(tmp_path):
    path, entry = _engine(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(EngineFileError) as info:
        T.TrtUnit(U.GEOMETRY, path, entry, {"P": 30, "C": 64, "H": 70, "W": 84})
    assert str(info.value) == (
        f"Engine file: {path} | is truncated: 100 bytes, engines.json records 320 (an interrupted copy or a full "
        f"disk).\nNote: Rebuild: vidllm-edge build --export /data/export --precision fp16 --frames 1:2:4 --out "
        f"{tmp_path}")


@NO_TRT
def test_intact_engine_without_tensorrt_is_a_dependency_error(tmp_path):
    path, entry = _engine(tmp_path)
    with pytest.raises(DependencyError, match=r"tensorrt \| cannot be imported .*needed for the TensorRT backend"):
        T.TrtUnit(U.GEOMETRY, path, entry, {"P": 30, "C": 64, "H": 70, "W": 84})


def test_engines_folder_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="has no engines.json"):
        T.load_engines(tmp_path)
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text(json.dumps({"format": "vidllm-edge-export", "version": 1,
                                                      "image_hw": [70, 84], "units": {}}))
    engines = tmp_path / "engines"
    engines.mkdir()
    data = {"format": "vidllm-edge-engines", "version": 1, "export": str(export),
            "engines": {"llm_decode": dict(ENTRY, unit="llm_decode")}}
    (engines / "engines.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"has engines for \['llm_decode'\], which this runtime does not run"):
        T.load_engines(engines)
    with pytest.raises(InputError, match="missing='cpu'"):
        T.load_engines(engines, missing="cpu")
    if not available("tensorrt"):
        data["engines"] = {"geometry": ENTRY}
        (engines / "engines.json").write_text(json.dumps(data))
        with pytest.raises(DependencyError, match="tensorrt"):  # no silent fallback to ONNX Runtime
            T.load_engines(engines)


@pytest.mark.skipif(not available("onnxruntime"), reason="needs onnxruntime")
def test_ort_tensorrt_provider_options(tmp_path):
    providers = T.ort_trt_providers(tmp_path, workspace_mb=512)
    (name, options), (cuda, _) = providers
    assert name == "TensorrtExecutionProvider" and cuda == "CUDAExecutionProvider"
    assert options["trt_engine_cache_enable"] is True and options["trt_timing_cache_enable"] is True
    assert options["trt_fp16_enable"] is True and options["trt_max_workspace_size"] == 512 << 20
    folder = options["trt_engine_cache_path"]
    assert folder == options["trt_timing_cache_path"] and folder.startswith(str(tmp_path / "ort-trt.ort"))
    assert (tmp_path / folder).is_dir()
