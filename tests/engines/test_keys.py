"""Engine keys, profiles from a real export manifest, mismatch messages, engines.json round trip."""

from __future__ import annotations

import io
import json
import os

import pytest

from vidllm_edge import atomic
from vidllm_edge.engines import manifest as EM
from vidllm_edge.engines.keys import (Difference, EngineKey, EngineMismatchError, check_engine, fixed_dims,
                                      format_cc, onnx_digest, profiles_from_manifest, rebuild_command, sm_tag,
                                      trt_tag)
from vidllm_edge.errors import CheckpointError, ConfigError, InputError

SHA = "0123456789abcdef" * 4
KEY = EngineKey("geometry", "fp16", {"S": (1, 8, 32)}, (518, 518), "10.3.0", "8.7", SHA)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A real export folder of the tiny model: geometry and box_head, frames 1:2:4, 70x84 (~10 s)."""
    from vidllm_edge.export.exporter import FrameProfile, export_model
    from vidllm_edge.models.model import build_model

    out = tmp_path_factory.mktemp("export")
    manifest = export_model(build_model("tiny"), out, frames=FrameProfile(1, 2, 4), image_hw=(70, 84),
                            units=("geometry", "box_head"), validate=False, log=io.StringIO())
    return out, manifest


# -- profiles ----------------------------------------------------------------------------------------

def test_profile_from_real_manifest_matches_the_graph(tiny_export):
    folder, manifest = tiny_export
    dims = fixed_dims(manifest)
    assert dims["P"] == (70 // 14) * (84 // 14) and dims["C"] == 64 and dims["D"] == 64 and dims["Sm_cap"] == 4
    prof = profiles_from_manifest(manifest["units"]["geometry"], None, (70, 84), dims)
    assert prof.symbols == {"S": (1, 2, 4)} and prof.beyond_export == ()
    assert prof.shapes == {"t_geom": ((1, 30, 64), (2, 30, 64), (4, 30, 64))}
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(folder / manifest["units"]["geometry"]["file"]), load_external_data=False)
    fixed = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim][1:]
    assert fixed == [30, 64]  # what TensorRT will parse agrees with the manifest-derived sizes


def test_frames_beyond_the_export_are_allowed_and_recorded(tiny_export):
    _, manifest = tiny_export
    prof = profiles_from_manifest(manifest["units"]["geometry"], (1, 8, 32), (70, 84), fixed_dims(manifest))
    assert prof.symbols == {"S": (1, 8, 32)}
    assert prof.shapes["t_geom"] == ((1, 30, 64), (8, 30, 64), (32, 30, 64))
    assert prof.beyond_export == ("S",)
    assert prof.beyond_dict() == {"S": {"built": [1, 8, 32], "validated": [1, 2, 4]}}


def test_rows_keep_the_export_range_whatever_the_frames(tiny_export):
    _, manifest = tiny_export
    prof = profiles_from_manifest(manifest["units"]["box_head"], (1, 8, 32), (70, 84), fixed_dims(manifest))
    assert prof.symbols == {"N": (1, 1, 16)}
    assert prof.shapes == {"hidden": ((1, 64), (1, 64), (16, 64))}


def test_metric_frames_are_capped():
    entry = {"inputs": [{"name": "feat0", "dtype": "float32", "shape": ["Sm", "P", "C"]}],
             "dynamic": {"Sm": "metric-depth frames"}, "profile": {"Sm": [1, 8, 16]}}
    prof = profiles_from_manifest(entry, (1, 8, 32), (518, 518), {"P": 1369, "C": 1024}, metric_frames_cap=16)
    assert prof.symbols == {"Sm": (1, 8, 16)} and prof.shapes["feat0"][2] == (16, 1369, 1024)
    assert prof.beyond_export == ()


def test_frames_accept_a_frame_profile(tiny_export):
    from vidllm_edge.export.exporter import FrameProfile

    _, manifest = tiny_export
    prof = profiles_from_manifest(manifest["units"]["geometry"], FrameProfile.parse("2:3:4"), (70, 84),
                                  fixed_dims(manifest))
    assert prof.symbols == {"S": (2, 3, 4)} and prof.beyond_export == ()


def test_unknown_symbol_and_bad_frames_are_named():
    entry = {"inputs": [{"name": "t_geom", "dtype": "float32", "shape": ["S", "P", "C"]}],
             "dynamic": {"S": "frames"}, "profile": {"S": [1, 2, 4]}}
    with pytest.raises(ConfigError, match="t_geom .*symbol P"):
        profiles_from_manifest(entry, None, (70, 84), {"C": 64})
    with pytest.raises(InputError, match="1 <= min <= opt <= max"):
        profiles_from_manifest(entry, (4, 2, 8), (70, 84), {"P": 30, "C": 64})


# -- keys --------------------------------------------------------------------------------------------

def test_file_name_encodes_what_invalidates_the_engine():
    assert KEY.file_name() == "geometry.fp16.S1-8-32.518x518.trt10.3.sm87.0123456789ab.engine"
    two = EngineKey("metric_depth", "int8", {"Sm": (1, 8, 16), "S": (1, 8, 32)}, (518, 686), "10.13.3.9", (9, 0), SHA)
    assert two.file_name() == "metric_depth.int8.S1-8-32_Sm1-8-16.518x686.trt10.13.sm90.0123456789ab.engine"
    assert EngineKey.from_dict(KEY.to_dict()) == KEY
    assert KEY.to_dict()["profile"] == {"S": [1, 8, 32]} and KEY.to_dict()["file"] == KEY.file_name()
    assert json.loads(json.dumps(KEY.to_dict())) == KEY.to_dict()


def test_every_field_changes_the_name():
    base = dict(unit="geometry", precision="fp16", profile={"S": (1, 8, 32)}, image_hw=(518, 518),
                trt_version="10.3.0", compute_capability="8.7", onnx_sha256=SHA)
    changes = dict(unit="perception", precision="int8", profile={"S": (1, 8, 16)}, image_hw=(518, 686),
                   trt_version="10.4.0", compute_capability="9.0", onnx_sha256="f" * 64)
    names = {EngineKey(**{**base, k: v}).file_name() for k, v in changes.items()}
    assert len(names) == len(changes) and KEY.file_name() not in names


def test_key_rejects_unresolved_or_bad_values():
    with pytest.raises(InputError, match="'best' is resolved by the builder"):
        EngineKey("geometry", "best", {"S": (1, 8, 32)}, (518, 518), "10.3.0", "8.7", SHA)
    with pytest.raises(ConfigError, match="not a version number"):
        EngineKey("geometry", "fp16", {"S": (1, 8, 32)}, (518, 518), "ten", "8.7", SHA)
    with pytest.raises(ConfigError, match="not MAJOR.MINOR"):
        format_cc("sm87")


def test_tags_and_digests():
    assert trt_tag("10.13.3.9") == "trt10.13" and sm_tag((8, 7)) == "sm87" and format_cc([9, 0]) == "9.0"
    assert onnx_digest({"onnx/g.onnx": SHA}) == SHA
    two = onnx_digest({"onnx/g.onnx": SHA, "onnx/g.onnx.data": "f" * 64})
    assert two != SHA and two == onnx_digest({"onnx/g.onnx.data": "f" * 64, "onnx/g.onnx": SHA})


# -- mismatch ----------------------------------------------------------------------------------------

ENTRY = dict(KEY.to_dict(), build={"export": "/data/export", "precision": "fp16", "frames": [1, 8, 32]})
CMD = "vidllm-edge build --export /data/export --precision fp16 --frames 1:8:32 --out /data/engines"


def test_matching_engine_has_no_differences():
    assert check_engine(ENTRY, "10.3.0", (8, 7), SHA) == []
    assert check_engine(ENTRY, "10.3", "8.7", None) == []  # 10.3 == 10.3.0; None: not checked


def test_versions_compare_as_versions_not_strings():
    entry = dict(ENTRY, trt_version="10.10.0")
    assert check_engine(entry, "10.9.0", None, None) == [Difference("trt_version", "10.10.0", "10.9.0")]
    assert check_engine(entry, "10.10", None, None) == []


@pytest.mark.parametrize("installed, cc, sha, text", [
    ("10.7.0", "8.7", SHA, "TensorRT version: built with 10.3.0, installed 10.7.0"),
    ("10.3.0", "9.0", SHA, "GPU compute capability: built for sm87 (8.7), this GPU is sm90 (9.0)"),
    ("10.3.0", "8.7", "f" * 64, "ONNX sha256: built from 0123456789ab…, the export now has ffffffffffff…"),
])
def test_mismatch_message_names_the_field_and_the_rebuild_command(installed, cc, sha, text):
    diffs = check_engine(ENTRY, installed, cc, sha)
    assert len(diffs) == 1
    err = EngineMismatchError("/data/engines/g.engine", diffs, rebuild_command("/data/export", "fp16", (1, 8, 32),
                                                                              "/data/engines"))
    assert str(err) == (f"Engine: /data/engines/g.engine | was built for another setup: {text}.\n"
                        "Note: TensorRT engines only load on the TensorRT version and GPU architecture they were "
                        f"built with, from the same ONNX graph. Rebuild: {CMD}")
    assert err.command == CMD and err.differences == diffs


def test_all_differences_are_listed_at_once():
    diffs = check_engine(ENTRY, "10.7.0", "9.0", "f" * 64)
    assert [d.field for d in diffs] == ["trt_version", "compute_capability", "onnx_sha256"]
    message = str(EngineMismatchError("g.engine", diffs, CMD))
    assert message.count(";") == 2 and "installed 10.7.0" in message and "sm90" in message


# -- engines.json ------------------------------------------------------------------------------------

def test_manifest_round_trip_is_atomic(tmp_path):
    EM.update_entry(tmp_path, "geometry", ENTRY, "/data/export")
    EM.update_entry(tmp_path, "box_head", dict(ENTRY, unit="box_head"))
    data = EM.read_engines(tmp_path)
    assert data["format"] == EM.FORMAT and data["export"] == "/data/export"
    assert data["engines"]["geometry"] == json.loads(json.dumps(ENTRY))
    assert set(data["engines"]) == {"geometry", "box_head"}
    assert sorted(os.listdir(tmp_path)) == ["engines.json"]  # no temp files left


def test_failed_write_keeps_the_previous_manifest_and_engine(tmp_path, monkeypatch):
    engine = tmp_path / KEY.file_name()
    engine.write_bytes(b"plan" * 100)
    EM.update_entry(tmp_path, "geometry", ENTRY)
    before = (tmp_path / "engines.json").read_text()

    def boom(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="No space left"):
        EM.update_entry(tmp_path, "geometry", dict(ENTRY, trt_version="10.7.0"))
    monkeypatch.undo()
    assert (tmp_path / "engines.json").read_text() == before
    assert engine.read_bytes() == b"plan" * 100
    assert sorted(os.listdir(tmp_path)) == sorted(["engines.json", engine.name])


def test_missing_or_foreign_manifest_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="has no engines.json.*\nNote: Build engines: vidllm-edge build"):
        EM.read_engines(tmp_path)
    assert EM.read_engines(tmp_path, missing_ok=True)["engines"] == {}
    (tmp_path / "engines.json").write_text(json.dumps({"format": "other", "version": 1, "engines": {}}))
    with pytest.raises(CheckpointError, match="has format 'other'"):
        EM.read_engines(tmp_path)
    data = EM.empty_manifest("/data/export")
    with pytest.raises(CheckpointError, match="(?s)has no engine for geometry .*--units geometry"):
        EM.get_entry(data, "geometry", tmp_path)


def _engine_entry(path, data):
    import hashlib

    path.write_bytes(data)
    return dict(ENTRY, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def test_truncated_damaged_and_missing_engine_files(tmp_path):
    path = tmp_path / KEY.file_name()
    entry = _engine_entry(path, bytes(range(256)) * 8)
    EM.check_engine_file(path, entry)  # intact
    path.write_bytes((bytes(range(256)) * 8)[:1000])
    with pytest.raises(EM.EngineFileError) as info:
        EM.check_engine_file(path, entry, verify="size")
    assert str(info.value) == (f"Engine file: {path} | is truncated: 1000 bytes, engines.json records 2048 (an "
                               f"interrupted copy or a full disk).\nNote: Rebuild: vidllm-edge build --export "
                               f"/data/export --precision fp16 --frames 1:8:32 --out {tmp_path}")
    path.write_bytes(bytes(2048))
    with pytest.raises(EM.EngineFileError, match="is damaged: its sha256 differs"):
        EM.check_engine_file(path, entry)
    EM.check_engine_file(path, entry, verify="size")  # same size: only the hash catches it
    path.unlink()
    with pytest.raises(EM.EngineFileError, match="is missing"):
        EM.check_engine_file(path, entry)
