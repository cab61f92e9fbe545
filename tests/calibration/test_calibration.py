"""INT8 calibration and Q/DQ quantization on the tiny preset: recording real unit inputs, refusing a
calibration folder from another model, TensorRT's Q/DQ layout, parity on held-out frames, per-node
sensitivity and the exclusion policy, and the two CLI commands."""

from __future__ import annotations

import argparse
import copy
import json
import shutil

import numpy as np
import pytest
import torch

from vidllm_edge.calibration.record import (CalibrationMismatchError, check_calibration, load_calibration,
                                            record_calibration, state_fingerprint)
from vidllm_edge.errors import InputError
from vidllm_edge.export.exporter import FrameProfile, export_model
from vidllm_edge.models.model import build_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.quantization")

from vidllm_edge.calibration.quantize import (INT8_GATE, Int8Gate, UnitQuantizer, quantize_unit,  # noqa: E402
                                              quantizable_nodes)

HW = (70, 84)
UNITS = ("perception", "metric_depth")
WEIGHTED = ("MatMul", "Conv", "Gemm")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vidllm_edge.synthetic import write_scene

    root = tmp_path_factory.mktemp("int8")
    model = build_model("tiny", seed=0)
    export = root / "export"
    export_model(model, export, frames=FrameProfile(1, 2, 4), image_hw=HW, units=UNITS, validate=False)
    video = write_scene(root / "scene", num_frames=16, width=112, height=84)[0]
    info = record_calibration(model, [video], 4, root / "calib", image_hw=HW)
    return model, export, video, root / "calib", info


def test_records_every_units_real_inputs(setup):
    model, _, video, calib_dir, info = setup
    from vidllm_edge.runtime.video import preprocess, read_frames

    calib = load_calibration(calib_dir)
    p, c, d = (HW[0] // 14) * (HW[1] // 14), model.cfg.embed_dim, model.dim_llm
    expected = {"perception": {"images": [4, 3, *HW]}, "geometry": {"t_geom": [4, p, c]},
                "metric_depth": {f"feat{i}": [4, p, c] for i in range(4)},
                "lift_project": {"t_lang": [4, p, c], "points": [4, p, 3]}, "box_head": {"hidden": [8, d]}}
    for unit, inputs in expected.items():
        for name, shape in inputs.items():
            array = np.load(calib_dir / unit / f"{name}.npy")
            assert list(array.shape) == shape and array.dtype == np.float32, (unit, name, array.shape)
    tokens = np.load(calib_dir / "projector" / "tokens.npy")  # M pooled voxels, at most max_visual_tokens
    assert tokens.shape[1] == c and 1 <= tokens.shape[0] <= model.cfg.scene.max_visual_tokens
    # The pipeline's own sampling and preprocessing: the recorded images are what it feeds perception.
    frames = read_frames(video, 4)
    ref = preprocess(frames.rgb, model.cfg.image_size, model.cfg.patch_size).numpy()
    assert np.array_equal(np.load(calib_dir / "perception" / "images.npy"), ref)
    # Held out: other frames of the video (never a calibration frame) and photographs when available.
    clips = info["splits"]["heldout"]["clips"]
    assert clips[0]["source"] == str(video) and not set(clips[0]["indices"]) & set(frames.indices)
    assert calib.samples("geometry", "heldout")[0]["t_geom"].shape[0] == clips[0]["frames"]
    assert info["model"] == {"kind": "torch", "sha256": state_fingerprint(model), "source": "torch:tiny"}
    assert info["videos"] == [str(video)] and info["frames"] == 4
    assert len(info["splits"]["calibration"]["data_sha256"]) == 64
    assert info["splits"]["calibration"]["clips"][0]["indices"] == frames.indices


def test_calibration_from_another_model_is_refused(setup, tmp_path):
    _, export, video, calib_dir, info = setup
    model = setup[0]
    changed = copy.deepcopy(model)
    with torch.no_grad():  # another model: the same architecture with other weights
        for p in changed.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    other = record_calibration(changed, [video], 2, tmp_path / "other", image_hw=HW, photos=0)
    assert other["model"]["sha256"] != info["model"]["sha256"]
    with pytest.raises(CalibrationMismatchError) as err:  # no state hash in the manifest: the probe decides
        quantize_unit(export, "metric_depth", tmp_path / "other")
    text = str(err.value)
    assert other["model"]["sha256"][:16] in text and "does not reproduce" in text and "vidllm-edge calibrate" in text
    assert not [p for p in (export / "onnx").iterdir() if p.name.startswith(".")]  # nothing staged was left
    # An export that names its source state is checked by hash alone.
    named = tmp_path / "export"
    shutil.copytree(export, named)
    manifest = json.loads((named / "manifest.json").read_text())
    manifest["source"] = {"state_sha256": "ab" * 32}
    (named / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CalibrationMismatchError, match=f"{info['model']['sha256'][:16]}.*state {'ab' * 8}"):
        check_calibration(load_calibration(calib_dir), named)
    manifest["source"] = {"state_sha256": info["model"]["sha256"]}
    (named / "manifest.json").write_text(json.dumps(manifest))
    check_calibration(load_calibration(calib_dir), named)


def _producers(graph):
    return {o: n for n in graph.node for o in n.output}


def test_qdq_graph_is_tensorrt_layout_and_within_gate(setup):
    _, export, _, calib_dir, _ = setup
    path = quantize_unit(export, "metric_depth", calib_dir)
    assert path == export / "onnx" / "metric_depth.int8.onnx" and path.is_file()
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    producer = _producers(graph)
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert inits[node.input[2]].dtype == np.int8 and not inits[node.input[2]].any(), node.name  # zero point 0
        for i in node.input:  # DequantizeLinear feeds MatMul/Conv/Gemm only
            if i in producer and producer[i].op_type == "DequantizeLinear":
                assert node.op_type in WEIGHTED, (node.name, node.op_type)
    quantized = [n for n in graph.node if n.op_type in WEIGHTED]
    assert quantized and all(producer.get(n.input[0], n).op_type == "DequantizeLinear" for n in quantized)
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_dq and all(inits[n.input[0]].dtype == np.int8 for n in weight_dq)
    assert all(inits[n.input[1]].size == inits[n.input[0]].shape[_axis(n)] > 1 for n in weight_dq)  # per channel
    with UnitQuantizer(export, "metric_depth", calib_dir) as q:  # DQ -> FP ops, as TensorRT computes them
        ev = q.evaluate(path)
        feed = q.samples["heldout"][0]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # ORT's own int8 kernels too
    assert np.isfinite(session.run(None, feed)[0]).all()
    for split in ("calibration", "heldout"):
        m = ev.splits[split]["metric_depth"]
        # INT8_GATE: cosine >= 0.999, rel-L2 <= 0.045, AbsRel <= 0.02, δ<1.25 >= 0.995 (measured ~1e-3 AbsRel)
        assert m["cosine"] >= INT8_GATE.cosine and m["rel_l2"] <= INT8_GATE.rel_l2, (split, m)
        assert m["abs_rel"] <= INT8_GATE.depth_abs_rel and m["delta_1_25"] >= INT8_GATE.depth_delta, (split, m)
    assert ev.ok


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def test_sensitivity_ranks_nodes_and_policy_excludes_the_worst(setup):
    _, export, _, calib_dir, _ = setup
    fp32 = export / "onnx" / "perception.onnx"
    attention = [n.name for n in quantizable_nodes(fp32, quantize_attention=True) if not n.weight]
    assert attention  # activation x activation MatMuls exist and stay FP by default
    with UnitQuantizer(export, "perception", calib_dir) as q:
        ranking = q.sensitivity(top_k=5, max_nodes=12)  # 27 candidates: an even sample of 12, said so
        assert ranking.candidates == len(q.nodes()) > 12 and ranking.measured == len(ranking.rows) == 12
        assert ranking.sampled and "12 of 27" in ranking.to_dict()["note"] and len(ranking.top()) == 5
        losses = [r["loss"] for r in ranking.rows]
        assert losses == sorted(losses, reverse=True) and losses[0] > 10 * losses[-1] > 0
        assert all(r["scope"].startswith("parts.") for r in ranking.rows), ranking.rows[0]
        full = q.evaluate(q.build()).worst("heldout")
        # A gate the full quantization fails: half its held-out loss (rel-L2 not gated here).
        q.gate = Int8Gate(cosine=1 - (1 - full["cosine"]) / 2, rel_l2=1.0)
        decision = q.policy(ranking)
    assert decision.keep_int8 and decision.exclude == [r["node"] for r in ranking.rows[: len(decision.exclude)]]
    assert decision.steps[0]["excluded"] == 0 and not decision.steps[0]["ok"]
    assert decision.steps[-1]["split"] == "heldout" and decision.steps[-1]["worst"]["cosine"] > full["cosine"]
    path = quantize_unit(export, "perception", calib_dir, exclude_nodes=decision.exclude)
    graph = onnx.load(str(path)).graph
    producer = _producers(graph)
    kept_fp = set(decision.exclude) | set(attention)
    for node in graph.node:
        if node.op_type in WEIGHTED:
            dq = any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input)
            assert dq == (node.name not in kept_fp), node.name


def _cli():
    from vidllm_edge.calibration.cli import add_calibrate_parser, add_quantize_parser, cmd_calibrate, cmd_quantize

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_calibrate_parser(sub)
    add_quantize_parser(sub)
    return parser, {"calibrate": cmd_calibrate, "quantize": cmd_quantize}


def test_cli_calibrate_and_quantize(setup, tmp_path, capsys):
    _, export, video, _, info = setup
    parser, commands = _cli()
    args = parser.parse_args(["calibrate", "--preset", "tiny", "--video", str(video), "--frames", "2", "--out",
                              str(tmp_path / "calib"), "--image-hw", "70x84", "--photos", "0"])
    assert commands["calibrate"](args) == 0
    recorded = load_calibration(tmp_path / "calib").info
    assert recorded["model"]["sha256"] == info["model"]["sha256"]  # same preset and seed: the same state
    assert recorded["splits"]["calibration"]["units"]["perception"]["inputs"]["images"]["shape"] == [2, 3, *HW]
    args = parser.parse_args(["quantize", "--export", str(export), "--calib", str(tmp_path / "calib"),
                              "--units", "metric_depth"])
    assert commands["quantize"](args) == 0
    report = json.loads((export / "quantization_report.json").read_text())
    entry = report["units"]["metric_depth"]
    assert set(report["units"]) == {"metric_depth"} and entry["keep_int8"] == bool(entry.get("file"))
    assert entry["sensitivity"]["rows"] and entry["metrics"]["full"]["heldout"]["metric_depth"]["abs_rel"] >= 0
    assert (export / "quantization_report.md").read_text().startswith("# INT8 Q/DQ report")
    assert "metric_depth" in capsys.readouterr().out
    with pytest.raises(InputError, match="not a vision unit"):
        commands["quantize"](parser.parse_args(["quantize", "--export", str(export), "--calib",
                                                str(tmp_path / "calib"), "--units", "llm_decode"]))
