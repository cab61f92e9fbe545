"""Builder paths that run without TensorRT: the child-process wrapper, the CLI, the dependency error.

Tests marked ``tensorrt`` build the tiny geometry engine for real and compare it with ONNX Runtime.
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import operator
import os
import signal
import time

import pytest

from vidllm_edge.engines import builder as B
from vidllm_edge.engines.cli import add_build_parser, cmd_build
from vidllm_edge.errors import DependencyError, InputError
from vidllm_edge.optional import available, require

NO_TRT = pytest.mark.skipif(available("tensorrt"), reason="checks the error raised when TensorRT is absent")


# -- the child-process wrapper -----------------------------------------------------------------------

def test_child_result_and_output_come_back():
    log = io.StringIO()
    assert B.build_in_child(builtins.print, "hello from the child", timeout=60, log=log) is None
    assert "hello from the child" in log.getvalue()


def test_child_result_bigger_than_a_pipe_buffer_does_not_block():
    assert B.build_in_child(bytes, 1 << 20, timeout=60, log=io.StringIO()) == bytes(1 << 20)


def test_child_exception_becomes_build_error():
    with pytest.raises(B.BuildError) as info:
        B.build_in_child(operator.truediv, 1, 0, timeout=60, log=io.StringIO())
    text = str(info.value)
    assert "Build step: truediv | raised ZeroDivisionError: division by zero." in text
    assert "Last lines of the build log:" in text and "Traceback" in text and "Full log: " in text


def test_child_typed_error_keeps_its_type_and_message():
    with pytest.raises(DependencyError) as info:
        B.build_in_child(require, "vidllm_no_such_package", "a test", timeout=60, log=io.StringIO())
    assert str(info.value).startswith("Python package: vidllm_no_such_package | cannot be imported")
    assert "pip install vidllm_no_such_package" in str(info.value)


def test_child_exit_code_is_reported():
    with pytest.raises(B.BuildError, match=r"_exit \| the build process exited with code 3 without a result\. "
                                           r"The build log is empty\."):
        B.build_in_child(os._exit, 3, timeout=60, log=io.StringIO())


@pytest.mark.parametrize("sig, note", [(signal.SIGABRT, "A crash inside TensorRT"),
                                       (signal.SIGKILL, "out-of-memory killer")])
def test_child_killed_by_a_signal_is_reported(sig, note):
    with pytest.raises(B.BuildError) as info:
        B.build_in_child(signal.raise_signal, sig, timeout=60, log=io.StringIO())
    assert f"the build process was killed by {sig.name}." in str(info.value)
    assert note in str(info.value)


def test_child_past_its_timeout_is_stopped():
    start = time.monotonic()
    with pytest.raises(B.BuildError, match="took longer than 0.5 s and was stopped"):
        B.build_in_child(time.sleep, 30, timeout=0.5, log=io.StringIO())
    assert time.monotonic() - start < 10


# -- without TensorRT ----------------------------------------------------------------------------------

def _parse(*argv):
    parser = argparse.ArgumentParser(prog="vidllm-edge")
    add_build_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["build", *argv])


def test_parser_defaults_come_from_the_builder(tmp_path):
    args = _parse("--export", str(tmp_path), "--out", str(tmp_path / "e"), "--units", "geometry,box_head", "perception")
    assert args.precision == B.DEFAULT_PRECISION and args.workspace_mb == B.DEFAULT_WORKSPACE_MB
    assert args.timeout_s == B.DEFAULT_TIMEOUT_S and args.frames is None and args.func is cmd_build
    with pytest.raises(SystemExit):
        _parse("--export", str(tmp_path), "--out", str(tmp_path), "--precision", "int4")


@NO_TRT
def test_build_without_tensorrt_is_a_dependency_error(tmp_path):
    with pytest.raises(DependencyError) as info:
        B.build_all(tmp_path / "export", tmp_path / "engines", "fp16", (1, 2, 4))
    assert str(info.value).startswith("Python package: tensorrt | cannot be imported")
    assert "needed for building TensorRT engines (vidllm-edge build)" in str(info.value)
    assert "pip install tensorrt-cu12 or tensorrt-cu13" in str(info.value)
    assert not (tmp_path / "engines").exists()  # nothing half-made


@NO_TRT
def test_cmd_build_without_tensorrt_exits_2_with_the_hint(tmp_path, capsys):
    code = cmd_build(_parse("--export", str(tmp_path), "--frames", "1:8:32", "--out", str(tmp_path / "e")))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: Python package: tensorrt | cannot be imported")
    assert "\nNote: Install TensorRT 10 for your CUDA version" in err


def test_cmd_build_bad_arguments_exit_2(tmp_path, capsys):
    assert cmd_build(_parse("--export", str(tmp_path), "--frames", "8:1:32", "--out", str(tmp_path))) == 2
    assert "--frames 8:1:32 | must satisfy 1 <= MIN <= OPT <= MAX" in capsys.readouterr().err
    with pytest.raises(InputError, match="--workspace-mb 0 | must be a positive"):
        B.build_all(tmp_path, tmp_path, "fp16", None, workspace_mb=0)


def test_dummy_feed_is_seeded_and_shaped():
    from vidllm_edge import units as U

    shapes = {"t_geom": ((1, 30, 64), (2, 30, 64), (4, 30, 64))}
    a, b = B.dummy_feed(U.GEOMETRY, shapes, 1), B.dummy_feed(U.GEOMETRY, shapes, 1)
    assert a["t_geom"].shape == (2, 30, 64) and (a["t_geom"] == b["t_geom"]).all()
    images = B.dummy_feed(U.PERCEPTION, {"images": ((1, 3, 70, 84),) * 3}, 0)["images"]
    assert 0 <= images.min() and images.max() <= 1


# -- build_all's bookkeeping, with the TensorRT calls replaced -----------------------------------------

def _fake_export(folder):
    """A minimal export folder: geometry and box_head graphs (placeholder bytes) and their manifest."""
    from vidllm_edge import manifest as M

    (folder / "onnx").mkdir(parents=True)
    units = {}
    for name, inputs, dyn, prof in (("geometry", [["t_geom", ["S", "P", "C"]]], "S", [1, 2, 4]),
                                    ("box_head", [["hidden", ["N", "D"]]], "N", [1, 1, 16])):
        path = folder / "onnx" / f"{name}.onnx"
        path.write_bytes(name.encode() * 10)
        units[name] = {"file": f"onnx/{name}.onnx", "files": {f"onnx/{name}.onnx": M.sha256(path)},
                       "inputs": [{"name": n, "dtype": "float32", "shape": sh} for n, sh in inputs],
                       "outputs": [], "dynamic": {dyn: "x"}, "profile": {dyn: prof}}
    config = {"vggt": {"aggregator": {"patch_size": 14, "embed_dim": 64}}, "llm": {"hf_config": {"hidden_size": 64}},
              "metric_depth": {"max_frames": 4}}
    manifest = {"format": M.FORMAT, "version": M.VERSION, "image_hw": [70, 84], "precision": "fp32",
                "frames": {"min": 1, "opt": 2, "max": 4}, "config": config, "units": units}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture()
def fake_trt(monkeypatch):
    """build_all with the TensorRT-facing calls replaced: records builds, reports given latencies/cosines."""
    import types

    from vidllm_edge.runtime import trt_backend

    calls, speed = [], {"fp16": (5.0, 0.9999), "int8": (3.0, 0.999)}
    monkeypatch.setattr(B, "require_tensorrt", lambda: types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(trt_backend, "gpu_compute_capability", lambda: "8.7")

    def build_engine(onnx_path, key, workspace_mb, cache, log=None, *, shapes, out_dir, strongly_typed=None):
        calls.append((key.unit, key.precision, dict(shapes), strongly_typed))
        path = out_dir / key.file_name()
        path.write_bytes(b"plan-" + key.precision.encode())
        return {"path": str(path), "seconds": 0.1, "size": path.stat().st_size, "strongly_typed": bool(strongly_typed),
                "pinned_fp32": 0}

    def check(self, unit, entry, prof, key, info):
        ms, cos = speed[key.precision]
        return {"parity": [], "min_cosine": cos, "latency_ms": ms}

    monkeypatch.setattr(B, "build_engine", build_engine)
    monkeypatch.setattr(B._Session, "_check", check)
    return calls, speed


def test_build_all_records_entries_and_skips_up_to_date_engines(tmp_path, fake_trt):
    from vidllm_edge.engines.manifest import read_engines

    calls, _ = fake_trt
    export, out, log = _fake_export(tmp_path / "export"), tmp_path / "engines", io.StringIO()
    results = B.build_all(export, out, "fp16", (1, 8, 32), units=["geometry", "box_head"], log=log, isolate=False)
    assert {u: r.status for u, r in results.items()} == {"geometry": "built", "box_head": "built"}
    assert calls[0][2] == {"t_geom": ((1, 30, 64), (8, 30, 64), (32, 30, 64))} and calls[0][3] is False
    assert calls[1][2] == {"hidden": ((1, 64), (1, 64), (16, 64))}
    entry = read_engines(out)["engines"]["geometry"]
    assert entry["file"] == "geometry.fp16.S1-8-32.70x84.trt10.3.sm87." + entry["onnx_sha256"][:12] + ".engine"
    assert entry["build"]["frames"] == [1, 8, 32] and entry["beyond_export"] == {
        "S": {"built": [1, 8, 32], "validated": [1, 2, 4]}}
    assert "goes beyond the range the export was validated at [1, 2, 4]" in log.getvalue()
    again = B.build_all(export, out, "fp16", (1, 8, 32), log=log, isolate=False)
    assert {r.status for r in again.values()} == {"up to date"} and len(calls) == 2
    B.build_all(export, out, "fp16", (1, 4, 8), units=["geometry"], log=log, isolate=False)
    files = sorted(p.name for p in out.glob("geometry.*.engine"))
    assert files == [read_engines(out)["engines"]["geometry"]["file"]]  # the replaced engine is gone
    assert "S1-4-8" in files[0]


@pytest.mark.parametrize("int8_cosine, chosen", [(0.999, "int8"), (0.95, "fp16")])
def test_best_keeps_the_faster_engine_within_the_gate(tmp_path, fake_trt, int8_cosine, chosen):
    from vidllm_edge.engines.manifest import read_engines

    calls, speed = fake_trt
    speed["int8"] = (3.0, int8_cosine)
    export, out = _fake_export(tmp_path / "export"), tmp_path / "engines"
    (export / "onnx" / "geometry.int8.onnx").write_bytes(b"qdq")
    log = io.StringIO()
    B.build_all(export, out, "best", None, units=["geometry"], log=log, isolate=False)
    assert [c[1] for c in calls] == ["fp16", "int8"] and calls[1][3] is True  # int8: strongly typed
    entry = read_engines(out)["engines"]["geometry"]
    assert entry["precision"] == chosen and entry["build"]["precision"] == "best"
    assert entry["report"]["candidates"] == {"fp16": 5.0, "int8": 3.0}
    assert [p.name for p in out.glob("*.engine")] == [entry["file"]]
    assert f"geometry: best = {chosen}" in log.getvalue()
    B.build_all(export, out, "best", None, units=["geometry"], log=log, isolate=False)
    assert len(calls) == 2  # up to date


def test_build_all_refusals_and_partial_failure(tmp_path, fake_trt, monkeypatch):
    from vidllm_edge.engines.manifest import read_engines

    export, out = _fake_export(tmp_path / "export"), tmp_path / "engines"
    with pytest.raises(InputError, match=r"names the LLM units \['llm_decode'\]"):
        B.build_all(export, out, units=["geometry", "llm_decode"], isolate=False)
    with pytest.raises(InputError, match=r"does not have: \['perception'\].*\nNote: Choose from geometry, box_head"):
        B.build_all(export, out, units=["perception"], isolate=False)
    with pytest.raises(InputError, match=r"has no INT8 graph for geometry, box_head \(geometry.int8.onnx, "
                                         r"box_head.int8.onnx in onnx/\)"):
        B.build_all(export, out, "int8", isolate=False, log=io.StringIO())
    real = B.build_engine

    def fail_geometry(onnx_path, key, *args, **kwargs):
        if key.unit == "geometry":
            raise B.BuildError(f"Unit: {key.unit}", "TensorRT found no engine within a 1024 MiB workspace.", "x")
        return real(onnx_path, key, *args, **kwargs)

    monkeypatch.setattr(B, "build_engine", fail_geometry)
    log = io.StringIO()
    with pytest.raises(B.BuildError, match=r"1 of 2 unit\(s\) failed: geometry: Unit: geometry \| TensorRT found no"):
        B.build_all(export, out, log=log, isolate=False)
    assert "FAILED: Unit: geometry" in log.getvalue()
    assert list(read_engines(out)["engines"]) == ["box_head"]  # the unit that built is recorded


# -- with TensorRT and a GPU ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def geometry_export(tmp_path_factory):
    from vidllm_edge.export.exporter import FrameProfile, export_model
    from vidllm_edge.models.model import build_model

    out = tmp_path_factory.mktemp("export")
    export_model(build_model("tiny"), out, frames=FrameProfile(1, 2, 4), image_hw=(70, 84),
                 units=("geometry", "box_head"), validate=False, log=io.StringIO())
    return out


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tiny_geometry_engine_matches_onnx_runtime(geometry_export, tmp_path):
    import torch

    from vidllm_edge import units as U
    from vidllm_edge.engines.manifest import read_engines
    from vidllm_edge.export.validate import metrics, run_onnx
    from vidllm_edge.runtime.trt_backend import TrtUnit

    log = io.StringIO()
    out = tmp_path / "engines"
    results = B.build_all(geometry_export, out, "fp16", (1, 2, 4), units=["geometry"], log=log)
    assert results["geometry"].status == "built"
    text = log.getvalue()
    assert "[1/1] geometry: building fp16 engine (S 1-2-4, 70x84" in text and "parity vs ONNX Runtime CPU" in text
    entry = read_engines(out)["engines"]["geometry"]
    assert (out / entry["file"]).stat().st_size == entry["size"] and entry["build"]["frames"] == [1, 2, 4]
    assert list(out.glob("timing.trt*.sm*.cache")), "the timing cache was saved"
    unit = TrtUnit(U.GEOMETRY, out / entry["file"], entry, {"P": 30, "C": 64, "H": 70, "W": 84})
    feed = {"t_geom": torch.randn(3, 30, 64, generator=torch.Generator().manual_seed(1))}
    ref = run_onnx(geometry_export / "onnx" / "geometry.onnx", feed)
    got = unit({"t_geom": feed["t_geom"].cuda()})
    for name, value in got.items():
        assert value.is_cuda and value.dtype == torch.float32
        _, rel, cos = metrics(ref[name], value.cpu().numpy())
        assert cos > 0.999 and rel < 3e-2, (name, rel, cos)
    graphed = TrtUnit(U.GEOMETRY, out / entry["file"], entry, {"P": 30, "C": 64, "H": 70, "W": 84}, cuda_graph=True)
    for _ in range(2):  # capture, then replay
        again = graphed({"t_geom": feed["t_geom"].cuda()})
    torch.testing.assert_close(again["depth"], got["depth"], rtol=1e-3, atol=1e-3)
    assert B.build_all(geometry_export, out, "fp16", (1, 2, 4), units=["geometry"],
                       log=io.StringIO())["geometry"].status == "up to date"


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_from_another_tensorrt_is_refused_before_loading(geometry_export, tmp_path):
    import torch

    from vidllm_edge import units as U
    from vidllm_edge.engines.keys import EngineMismatchError
    from vidllm_edge.engines.manifest import read_engines
    from vidllm_edge.runtime.trt_backend import TrtUnit

    out = tmp_path / "engines"
    B.build_all(geometry_export, out, "fp16", (1, 2, 4), units=["geometry"], log=io.StringIO())
    entry = read_engines(out)["engines"]["geometry"]
    bound = {"P": 30, "C": 64, "H": 70, "W": 84}
    with pytest.raises(EngineMismatchError, match="TensorRT version: built with 9.0.0"):
        TrtUnit(U.GEOMETRY, out / entry["file"], dict(entry, trt_version="9.0.0"), bound)
    unit = TrtUnit(U.GEOMETRY, out / entry["file"], entry, bound)
    with pytest.raises(InputError, match="S=5 \\(frames\\), outside the engine's optimization profile S in \\[1, 4\\]"):
        unit({"t_geom": torch.randn(5, 30, 64, device="cuda")})
    assert json.loads((out / "engines.json").read_text())["engines"]["geometry"]["report"]["parity"]
