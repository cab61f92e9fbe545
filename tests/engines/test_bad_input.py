"""Issue 4's bad inputs through the command line, on CPU: an engine from another TensorRT or GPU, a truncated
engine, a frame count outside the profile, a workspace too small for the build. Each one: the exact error,
exit code 2, TensorRT never asked to deserialise or run what our own checks refuse, and the previous good
engines and engines.json left as they were.

TensorRT cannot be installed here, so a stand-in ``tensorrt`` package (FAKE_TRT below, written to a temporary
folder on ``sys.path``) provides just enough of the TensorRT 10 Python API for our code around it to run,
in this process and in the spawned build child. It decides nothing we test: its "ONNX" files and engines
are JSON naming the tensors, and, like TensorRT when no tactic fits, its builder returns no plan below a
64 MiB workspace. It records every deserialisation and execution, so the tests can check that a refusal
came before them. (The calibration folder from another model: tests/calibration/test_quantize_bad_input.py.)
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import sys

import pytest

from vidllm_edge import units as U
from vidllm_edge.engines import builder as B
from vidllm_edge.engines.manifest import read_engines
from vidllm_edge.runtime import trt_backend as T
from vidllm_edge.runtime.cli import main

HW = (70, 84)
FRAMES = "1:2:4"
DYNAMIC = {"perception": ("S", "frames", [1, 2, 4]), "geometry": ("S", "frames", [1, 2, 4]),
           "metric_depth": ("Sm", "metric-depth frames", [1, 2, 4]), "lift_project": ("S", "frames", [1, 2, 4]),
           "projector": ("M", "visual tokens", [1, 16, 32]), "box_head": ("N", "rows", [1, 1, 16])}

FAKE_TRT = '''"""Stand-in for the tensorrt package (tests/engines/test_bad_input.py). Not TensorRT."""
import enum
import json

__version__ = "10.3.0"
MIN_WORKSPACE = 64 << 20
CALLS = []


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self):
        pass


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 5


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    OBEY_PRECISION_CONSTRAINTS = 1


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0


def init_libnvinfer_plugins(logger, namespace):
    return True


class _Tensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, tuple(shape)


class _Network:
    num_layers = 0

    def __init__(self):
        self.inputs, self.outputs = [], []

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class OnnxParser:
    num_errors = 0

    def __init__(self, network, logger):
        self.network = network

    def parse_from_file(self, path):
        graph = json.loads(open(path).read())
        self.network.inputs = [_Tensor(n, s) for n, s in graph["inputs"]]
        self.network.outputs = list(graph["outputs"])
        return True


class _Cache:
    def serialize(self):
        return b"timing-cache"

    def combine(self, other, ignore_mismatch):
        return True


class _Config:
    def __init__(self):
        self.workspace, self.cache = None, None

    def set_memory_pool_limit(self, pool, size):
        self.workspace = size

    def set_flag(self, flag):
        pass

    def add_optimization_profile(self, profile):
        pass

    def create_timing_cache(self, data):
        return _Cache()

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class _Profile:
    def set_shape(self, name, lo, opt, hi):
        pass


class Builder:
    def __init__(self, logger):
        self.logger = logger
        CALLS.append(("builder",))

    def create_network(self, flags):
        return _Network()

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        if config.workspace < MIN_WORKSPACE:
            self.logger.log(ILogger.Severity.ERROR, "[fake] no implementation fits the workspace")
            return None
        return json.dumps({"inputs": [t.name for t in network.inputs], "outputs": network.outputs}).encode()


class _Context:
    def set_input_shape(self, name, shape):
        CALLS.append(("set_input_shape", name))
        return True

    def execute_async_v3(self, stream):
        CALLS.append(("execute",))
        return True


class _Engine:
    def __init__(self, plan):
        self.inputs, self.outputs = plan["inputs"], plan["outputs"]
        self.names = self.inputs + self.outputs

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return DataType.FLOAT

    def create_execution_context(self):
        return _Context()


class Runtime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, data):
        CALLS.append(("deserialize", len(data)))
        return _Engine(json.loads(data))
'''


def _graph(unit: str, dims: dict[str, int]) -> dict:
    """The fake "ONNX" file of a unit: its tensors, dynamic dims as -1."""
    spec = U.VISION_UNITS[unit]
    shape = [[-1 if d == DYNAMIC[unit][0] else (d if isinstance(d, int) else dims[d]) for d in t.shape]
             for t in spec.inputs]
    return {"inputs": [[t.name, s] for t, s in zip(spec.inputs, shape)], "outputs": [t.name for t in spec.outputs]}


@pytest.fixture(scope="module")
def model():
    from vidllm_edge.models.model import build_model

    return build_model("tiny")


@pytest.fixture()
def fake_trt(tmp_path, monkeypatch):
    """The stand-in tensorrt importable here and in spawned children; this GPU is sm87."""
    folder = tmp_path / "fake_trt" / "tensorrt"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(FAKE_TRT)
    spec = importlib.util.spec_from_file_location("tensorrt", folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "tensorrt", module)  # removed again after the test
    monkeypatch.syspath_prepend(str(folder.parent))  # the build child imports it from here
    monkeypatch.setattr(T, "gpu_compute_capability", lambda: "8.7")
    monkeypatch.setattr(T, "_LOGGER", None)  # the process-wide logger would subclass the fake's ILogger
    monkeypatch.setattr(B._Session, "_check", lambda *a: {"parity": [], "min_cosine": None, "latency_ms": 1.0})
    return module


@pytest.fixture()
def built(tmp_path, model, fake_trt):
    """A fake export of the six vision units (real config and tokenizer) and its engines, built by build_all."""
    from vidllm_edge import manifest as M
    from vidllm_edge.engines.keys import fixed_dims
    from vidllm_edge.models.tokenizer import save_tokenizer
    from vidllm_edge.synthetic import write_scene

    export, engines = tmp_path / "export", tmp_path / "engines"
    (export / "onnx").mkdir(parents=True)
    config = model.portable_config().to_dict()
    manifest = {"format": M.FORMAT, "version": M.VERSION, "image_hw": list(HW), "precision": "fp32",
                "frames": {"min": 1, "opt": 2, "max": 4}, "config": config, "units": {}}
    dims = fixed_dims(manifest)
    for unit, (sym, what, prof) in DYNAMIC.items():
        path = export / "onnx" / f"{unit}.onnx"
        path.write_text(json.dumps(_graph(unit, dims)))
        spec = U.VISION_UNITS[unit]
        manifest["units"][unit] = {
            "file": f"onnx/{unit}.onnx", "files": {f"onnx/{unit}.onnx": M.sha256(path)},
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.outputs],
            "dynamic": {sym: what}, "profile": {sym: prof}}
    (export / "manifest.json").write_text(json.dumps(manifest))
    (export / "config.json").write_text(json.dumps(config))
    save_tokenizer(model.tokenizer, export)
    results = B.build_all(export, engines, "fp16", (1, 2, 4), log=io.StringIO(), isolate=False)  # in process: fast
    assert {r.status for r in results.values()} == {"built"}
    fake_trt.CALLS.clear()
    video = write_scene(tmp_path / "scene", num_frames=12, width=112, height=84)[0]
    return export, engines, video


def _snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _run(engines, video, out, *extra):
    return main(["run", "--video", str(video), "--backend", "tensorrt", "--engines", str(engines), "--out", str(out),
                 "--question", "Where is the red box?", *extra])


@pytest.mark.parametrize("field, value, text", [
    ("trt_version", "10.7.0", "TensorRT version: built with 10.3.0, installed 10.7.0"),
    ("compute_capability", "9.0", "GPU compute capability: built for sm87 (8.7), this GPU is sm90 (9.0)"),
])
def test_engines_from_another_tensorrt_or_gpu_exit_2_before_deserialising(built, fake_trt, monkeypatch, capsys,
                                                                          tmp_path, field, value, text):
    export, engines, video = built
    if field == "trt_version":
        monkeypatch.setattr(fake_trt, "__version__", value)
    else:
        monkeypatch.setattr(T, "gpu_compute_capability", lambda: value)
    before = _snapshot(engines)
    assert _run(engines, video, tmp_path / "out") == 2
    err = capsys.readouterr().err
    units = ", ".join(u for u in U.VISION_UNITS)
    assert err == (f"error: Engine: {units} in {engines} | was built for another setup: {text}.\nNote: TensorRT "
                   "engines only load on the TensorRT version and GPU architecture they were built with, from the "
                   f"same ONNX graph. Rebuild: vidllm-edge build --export {export.resolve()} --precision fp16 "
                   f"--frames {FRAMES} --out {engines}\n")
    assert fake_trt.CALLS == []  # refused from engines.json alone: nothing was deserialised
    assert _snapshot(engines) == before and not (tmp_path / "out").exists()


def test_truncated_engine_exits_2_before_deserialising(built, fake_trt, capsys, tmp_path):
    export, engines, video = built
    entry = read_engines(engines)["engines"]["perception"]
    path = engines / entry["file"]
    path.write_bytes(path.read_bytes()[:10])
    before = _snapshot(engines)
    assert _run(engines, video, tmp_path / "out", "--frames", "2") == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: Engine file: {path} | is truncated: 10 bytes, engines.json records {entry['size']} "
                        f"(an interrupted copy or a full disk).\nNote: Rebuild: vidllm-edge build --export "
                        f"{export.resolve()} --precision fp16 --frames {FRAMES} --out {engines}\n")
    assert ("deserialize", 10) not in fake_trt.CALLS and fake_trt.CALLS == []
    assert _snapshot(engines) == before
    assert not any((tmp_path / "out").rglob("*"))  # no answers.json, geometry or depth written


def test_frames_outside_the_profile_exit_2_before_tensorrt_runs(built, fake_trt, monkeypatch, capsys, tmp_path):
    import torch

    export, engines, video = built
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # TrtUnit places its stream on the GPU
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    assert _run(engines, video, tmp_path / "out", "--frames", "5") == 2
    err = capsys.readouterr().err
    assert err.endswith("error: Input tensor: images | has S=5 (frames), outside the engine's optimization profile S "
                        "in [1, 4] (built for 2).\nNote: Feed 1 to 4 frames, or rebuild the engines for more: "
                        f"vidllm-edge build --export {export.resolve()} --precision fp16 --frames 1:2:5 "
                        f"--out {engines}\n")
    calls = [c[0] for c in fake_trt.CALLS]  # the six engines loaded; none given a shape or run
    assert calls == ["deserialize"] * len(U.VISION_UNITS), calls
    assert not any((tmp_path / "out").rglob("*"))


def test_workspace_too_small_fails_in_the_child_and_keeps_the_previous_engine(built, fake_trt, capsys):
    export, engines, _ = built
    before = _snapshot(engines)
    code = main(["build", "--export", str(export), "--out", str(engines), "--units", "geometry", "--frames", FRAMES,
                 "--workspace-mb", "16", "--force"])
    captured = capsys.readouterr()
    assert code == 2
    assert "geometry: building fp16 engine (S 1-2-4, 70x84, workspace 16 MiB)" in captured.err
    assert "[TensorRT ERROR] [fake] no implementation fits the workspace" in captured.err  # the child's log, forwarded
    error = captured.err[captured.err.index("error: "):]
    assert error == (f"error: Engines folder: {engines} | 1 of 1 unit(s) failed: geometry: Unit: geometry "
                     "(geometry.onnx, fp16) | TensorRT found no engine within a 16 MiB workspace ([TensorRT ERROR] "
                     "[fake] no implementation fits the workspace).\nNote: The messages above say why; engines that "
                     "built are in place and in engines.json.\n")
    assert "FAILED: Unit: geometry (geometry.onnx, fp16) | TensorRT found no engine within a 16 MiB workspace" in \
        captured.err and "Note: The workspace may be too small: try --workspace-mb 32" in captured.err
    assert _snapshot(engines) == before  # the previous geometry engine and engines.json are untouched
    assert fake_trt.CALLS == []  # the builder ran in the child process, not here


def test_the_same_build_with_enough_workspace_replaces_the_engine(built, fake_trt, capsys):
    """The control for the test above: only the workspace differs, and the child builds."""
    export, engines, _ = built
    old = read_engines(engines)["engines"]["geometry"]["build"]["built"]
    code = main(["build", "--export", str(export), "--out", str(engines), "--units", "geometry", "--frames", FRAMES,
                 "--workspace-mb", "64", "--force"])
    assert code == 0, capsys.readouterr().err
    entry = read_engines(engines)["engines"]["geometry"]
    assert entry["build"]["workspace_mb"] == 64 and (engines / entry["file"]).is_file()
    assert entry["build"]["built"] >= old and fake_trt.CALLS == []  # built in the child
