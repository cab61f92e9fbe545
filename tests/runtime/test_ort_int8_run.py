"""`vidllm-edge run --backend onnxruntime --int8`: the INT8 Q/DQ graphs `quantize` kept, checked by hash."""

from __future__ import annotations

import io
import json

import pytest

from vidllm_edge.calibration.quantize import quantize_export, write_report
from vidllm_edge.calibration.record import record_calibration, state_fingerprint
from vidllm_edge.errors import CheckpointError
from vidllm_edge.export.exporter import FrameProfile, export_model
from vidllm_edge.models.model import build_model
from vidllm_edge.runtime.cli import main
from vidllm_edge.runtime.ort_backend import load_export

QUANTIZED = ["lift_project", "projector"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from vidllm_edge.synthetic import write_scene

    root = tmp_path_factory.mktemp("int8run")
    model = build_model("tiny", seed=0)
    folder = root / "export"
    export_model(model, folder, frames=FrameProfile(1, 2, 4), validate=False,
                 source={"state_sha256": state_fingerprint(model)}, log=io.StringIO())
    video = write_scene(root / "scene", num_frames=12, width=112, height=84, seed=0)[0]
    record_calibration(model, [video], 4, root / "calib", photos=0, log=io.StringIO())
    write_report(folder, quantize_export(folder, root / "calib", units=QUANTIZED, log=io.StringIO()))
    return folder, video


def test_run_uses_the_kept_int8_graphs(export, tmp_path, capsys):
    folder, video = export
    report = json.loads((folder / "quantization_report.json").read_text())
    kept = sorted(u for u, e in report["units"].items() if e["keep_int8"])
    assert kept, "the policy kept no unit in INT8 on this model; the test needs one"
    assert load_export(folder, int8=True).int8_units == kept
    assert load_export(folder).int8_units == []
    out = tmp_path / "out"
    code = main(["run", "--video", str(video), "--backend", "onnxruntime", "--engines", str(folder), "--int8",
                 "--frames", "4", "--question", "Where is the red box?", "--max-new-tokens", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    answers = json.loads((out / "answers.json").read_text())
    assert "INT8 Q/DQ graphs" in json.dumps(answers) and len(answers["answers"]) == 1


def test_changed_int8_graph_and_missing_report_are_refused(export, tmp_path, capsys):
    folder, video = export
    report = json.loads((folder / "quantization_report.json").read_text())
    unit = next(u for u, e in report["units"].items() if e["keep_int8"])
    graph = folder / report["units"][unit]["file"]
    original = graph.read_bytes()
    try:
        graph.write_bytes(original[:-16])
        with pytest.raises(CheckpointError, match=r"INT8 graph: .* \| is missing or differs from the one "
                                                  r"quantization_report.json records"):
            load_export(folder, int8=True)
    finally:
        graph.write_bytes(original)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in folder.iterdir():  # the same export without its report
        if f.name.startswith("quantization_report"):
            continue
        (bare / f.name).symlink_to(f)
    code = main(["run", "--video", str(video), "--backend", "onnxruntime", "--engines", str(bare), "--int8",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "has no INT8 graphs (no quantization_report.json)" in err and "Note:" in err
    assert not (tmp_path / "o").exists()


def test_int8_flag_needs_the_onnxruntime_backend(tmp_path, capsys):
    code = main(["run", "--video", "x.mp4", "--preset", "tiny", "--int8", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Arguments: --int8 | applies to --backend onnxruntime" in err
