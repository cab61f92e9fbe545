"""`vidllm-edge quantize` with a calibration folder recorded from another model: the exact error, exit code 2,
and the export folder exactly as it was, its previous INT8 graph included (tests/engines/test_bad_input.py
has the engine-side bad inputs)."""

from __future__ import annotations

import copy
import hashlib
import io

import pytest
import torch

from vidllm_edge.calibration.record import record_calibration, state_fingerprint
from vidllm_edge.export.exporter import FrameProfile, export_model
from vidllm_edge.models.model import build_model
from vidllm_edge.runtime.cli import main

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from vidllm_edge.calibration.quantize import quantize_unit  # noqa: E402

HW = (70, 84)


def _snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_calibration_from_another_model_exits_2_and_keeps_the_previous_int8_graph(tmp_path, capsys):
    from vidllm_edge.synthetic import write_scene

    model = build_model("tiny", seed=0)
    export = tmp_path / "export"
    export_model(model, export, frames=FrameProfile(1, 2, 4), image_hw=HW, units=("box_head",), validate=False,
                 source={"state_sha256": state_fingerprint(model)}, log=io.StringIO())
    video = write_scene(tmp_path / "scene", num_frames=8, width=112, height=84)[0]
    record_calibration(model, [video], 2, tmp_path / "calib", image_hw=HW, photos=0, log=io.StringIO())
    previous = quantize_unit(export, "box_head", tmp_path / "calib")  # the good INT8 graph from before
    other = copy.deepcopy(model)
    with torch.no_grad():  # another model: the same architecture with other weights
        for p in other.box_head.parameters():
            p.mul_(1.01)
    info = record_calibration(other, [video], 1, tmp_path / "other", image_hw=HW, photos=0, log=io.StringIO())
    before = _snapshot(export)
    code = main(["quantize", "--export", str(export), "--calib", str(tmp_path / "other"), "--units", "box_head"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.endswith(
        f"error: Calibration folder: {tmp_path / 'other'} | was recorded from model state sha256 "
        f"{info['model']['sha256'][:16]}…; the export {export} was exported from state "
        f"{state_fingerprint(model)[:16]}….\nNote: Record calibration data for this export: vidllm-edge calibrate "
        f"--export {export} --video FILE --frames N --out DIR (or from the checkpoint it was exported from).\n")
    assert _snapshot(export) == before and previous.is_file()  # nothing written, nothing removed, nothing staged
    assert not (export / "quantization_report.json").exists()
