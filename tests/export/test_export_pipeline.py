"""The whole export: every unit validated at three frame counts, the pipeline on ONNX Runtime equal to the
torch reference, FP16 islands, and every bad input (exit 2, nothing half written)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from vidllm_edge.errors import CheckpointError, InputError
from vidllm_edge.export.exporter import FrameProfile, export_model
from vidllm_edge.models.model import build_model
from vidllm_edge.runtime.cli import main
from vidllm_edge.runtime.pipeline import Pipeline

pytest.importorskip("onnxruntime")

SIZES = (1, 2, 4)


def _real_margins(model):
    with torch.no_grad():  # larger LLM weights give real logit margins, so greedy tokens are distinct
        for p in model.llm.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.35, generator=torch.Generator().manual_seed(p.numel()))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _real_margins(build_model("tiny", seed=0))
    folder = tmp_path_factory.mktemp("export")
    manifest = export_model(model, folder, frames=FrameProfile(*SIZES), image_hw=(70, 84))
    return model, folder, manifest


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from vidllm_edge.synthetic import write_scene

    return write_scene(tmp_path_factory.mktemp("scene"), num_frames=8, width=112, height=84)[0]


def test_every_unit_within_1e_4_at_three_frame_counts(exported):
    _, folder, manifest = exported
    vision = ["perception", "geometry", "metric_depth", "lift_project", "projector", "box_head"]
    assert set(manifest["units"]) == set(vision) | {"llm_prefill", "llm_decode"}
    for unit in vision:
        rows = manifest["units"][unit]["validation"]
        assert {r["size"] for r in rows} == set(SIZES), unit
        for r in rows:
            assert r["ok"] and r["rel_l2"] <= 1e-4 and r["cosine"] >= 0.99999, (unit, r)
        assert manifest["units"][unit]["lint"]["ok"], unit
    for rel, digest in manifest["units"]["geometry"]["files"].items():
        assert (folder / rel).is_file() and len(digest) == 64
    assert manifest["opset"] == 18 and manifest["units"]["perception"]["profile"] == {"S": [1, 2, 4]}
    assert not [p for p in folder.rglob(".*") if p.name != ".gitignore"]  # no staging leftovers


def test_pipeline_on_onnxruntime_equals_torch(exported, video):
    model, folder, _ = exported
    ref = Pipeline(model, num_frames=4).encode(video)
    ort = Pipeline.from_export(folder, num_frames=4).encode(video)
    for name in ("depth", "world_points", "metric_depth"):
        a, b = getattr(ref.geometry, name).double(), getattr(ort.geometry, name).double()
        assert float((a - b).norm() / a.norm()) <= 1e-4, name
    assert abs(ref.geometry.scale - ort.geometry.scale) <= 1e-4 * ref.geometry.scale
    from vidllm_edge.models.llm import GenerationConfig

    gen = GenerationConfig(max_new_tokens=32)
    for scene in (ref, ort):
        scene.decoder.eos_ids = set()
    for question in ("Where is the red box?", "How many boxes are there?"):
        a, b = ref.ask(question, gen), ort.ask(question, gen)
        assert len(a.token_ids) == 32 and a.token_ids == b.token_ids, question
        assert len(set(a.token_ids)) > 3  # real margins: not one repeated token


def test_fp16_keeps_layernorm_softmax_and_activations_in_fp32(exported, tmp_path):
    import onnx

    model, _, _ = exported
    manifest = export_model(model, tmp_path, precision="fp16", frames=FrameProfile(1, 2, 3), image_hw=(70, 84),
                            units=("geometry",))
    assert all(r["ok"] for r in manifest["units"]["geometry"]["validation"])
    graph = onnx.load(str(tmp_path / "onnx" / "geometry.onnx")).graph
    floats = {t.name: t.data_type for t in graph.initializer}
    ln_scales = [n.input[1] for n in graph.node if n.op_type == "LayerNormalization"]
    assert ln_scales and all(floats.get(s, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for s in ln_scales)
    matmul_weights = [n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in floats]
    assert matmul_weights and all(floats[w] == onnx.TensorProto.FLOAT16 for w in matmul_weights)
    produced = [o for n in graph.node for o in n.output]
    assert len(produced) == len(set(produced))  # SSA form: the converter's duplicate casts were removed


def test_wrong_shape_and_dtype_at_run_time(exported):
    from vidllm_edge.runtime.ort_backend import load_export

    units = load_export(exported[1]).units_for((70, 84))
    with pytest.raises(InputError, match=r"^Input tensor: images \| Received shape \[2, 3, 70, 70\]\.\nNote: Expected "
                                         r"images: float32\[S, 3, H, W\] with H=70, W=84\."):
        units["perception"]({"images": torch.zeros(2, 3, 70, 70)})
    with pytest.raises(InputError, match=r"^Input tensor: t_geom \| Received dtype float64\."):
        units["geometry"]({"t_geom": torch.zeros(2, 30, 64, dtype=torch.float64)})


def test_corrupted_onnx_is_named(exported, tmp_path):
    from vidllm_edge.runtime.ort_backend import open_session

    bad = tmp_path / "box_head.onnx"
    bad.write_bytes((exported[1] / "onnx" / "box_head.onnx").read_bytes()[:300])
    with pytest.raises(CheckpointError, match=rf"^ONNX file: {bad} \| cannot be loaded"):
        open_session(bad, ["CPUExecutionProvider"])


def test_manifest_hash_mismatch_exits_2(exported, video, tmp_path, capsys):
    copy = tmp_path / "export"
    shutil.copytree(exported[1], copy)
    path = copy / "onnx" / "projector.onnx"
    path.write_bytes(path.read_bytes()[:-10])  # a truncated copy
    out = tmp_path / "out"
    code = main(["run", "--video", str(video), "--backend", "onnxruntime", "--engines", str(copy), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"Export folder: {copy} | does not match its manifest: onnx/projector.onnx has sha256" in err
    assert not out.exists() or not any(out.iterdir())


def test_frame_size_other_than_the_export_is_refused(exported, tmp_path, capsys):
    from vidllm_edge.synthetic import write_scene

    square = write_scene(tmp_path / "sq", num_frames=4, width=96, height=96)[0]
    code = main(["run", "--video", str(square), "--backend", "onnxruntime", "--engines", str(exported[1]),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "the compiled units take 84x70" in err and "--image-hw 70x70" in err


@pytest.mark.parametrize("argv, message", [
    (["export", "--checkpoint", "{tmp}/missing", "--out", "{tmp}/o"], "Checkpoint folder: {tmp}/missing | does not exist"),
    (["export", "--preset", "tiny", "--out", "{tmp}/file/o"], "Export folder: {tmp}/file/o | cannot be created"),
    (["export", "--preset", "tiny", "--out", "{tmp}/o", "--frames", "4:2:1"], "Argument: --frames 4:2:1 | must satisfy"),
    (["export", "--preset", "tiny", "--out", "{tmp}/o", "--image-hw", "70x80"], "Argument: --image-hw 70x80 | needs H and W"),
    (["export", "--preset", "tiny", "--out", "{tmp}/o", "--units", "geometry,nope"], "names unknown units ['nope']"),
    (["run", "--video", "x.mp4", "--backend", "onnxruntime", "--engines", "{tmp}/none", "--out", "{tmp}/o"],
     "Export folder: {tmp}/none | does not exist"),
    (["run", "--video", "x.mp4", "--backend", "onnxruntime", "--preset", "tiny", "--out", "{tmp}/o"],
     "Arguments: --backend onnxruntime | needs --engines DIR"),
    (["run", "--video", "x.mp4", "--backend", "tensorrt", "--engines", "{tmp}", "--out", "{tmp}/o"],
     "Engines folder: {tmp} | has no engines.json"),
])
def test_export_and_run_bad_arguments_exit_2(argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message.format(tmp=tmp_path) in err and "Note:" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_opset_23_uses_the_attention_op_and_validates(exported, tmp_path):
    import onnx

    model = exported[0]
    manifest = export_model(model, tmp_path, frames=FrameProfile(1, 2, 3), image_hw=(70, 84), units=("geometry",),
                            opset=23)
    assert manifest["opset"] == 23 and all(r["ok"] for r in manifest["units"]["geometry"]["validation"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "onnx" / "geometry.onnx")).graph.node}
    assert "Attention" in ops and "Softmax" not in ops
