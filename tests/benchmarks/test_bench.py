"""`vidllm-edge bench` on the CPU, tiny preset, torch + onnxruntime (fp32 and INT8 Q/DQ) at 2 and 4 frames: the
report parses back with every stage, parity rows, skipped backends with their reasons, markdown and plots;
--resume; and every bad input: exact message, exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from vidllm_edge.benchmarks.parity import check_gate, pose_error, token_agreement
from vidllm_edge.benchmarks.report import REPORT_JSON, load_report, write_report
from vidllm_edge.benchmarks.roofline import JETSON
from vidllm_edge.benchmarks.timing import REPORT_STAGES
from vidllm_edge.optional import available
from vidllm_edge.runtime.cli import main

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

ARGS = ["bench", "--preset", "tiny", "--reps", "2", "--warmup", "1", "--answer-tokens", "6"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out, export = root / "out", root / "export"
    code = main(ARGS + ["--backends", "torch,onnxruntime,tensorrt", "--precision", "fp32,int8", "--frames", "2,4",
                        "--export", str(export), "--out", str(out)])
    return {"code": code, "out": out, "export": export, "report": load_report(out / REPORT_JSON)}


def _ok(report):
    return {(r["backend"], r["precision"], r["frames"]): r for r in report["configs"] if r["status"] == "ok"}


def test_report_parses_back_with_every_stage_and_percentile(run):
    assert run["code"] == 0
    report = run["report"]
    assert report["complete"] is True and report["version"] == 1
    rows = _ok(report)
    assert set(rows) == {(b, p, s) for b, p in (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))
                         for s in (2, 4)}
    for key, r in rows.items():
        for stage in REPORT_STAGES:
            host = r["stages"][stage]["host_ms"]
            assert host["n"] == 2 and 0 <= host["p50"] <= host["p90"] <= host["p99"], (key, stage)
            assert r["stages"][stage]["device_ms"] is None  # the CPU has no device time: not faked
        scene = r["scene_ms"]["host_ms"]
        assert scene["p50"] <= scene["p90"] <= scene["p99"] and r["scene_ms"]["device_ms"] is None
        assert r["time_to_first_token_ms"]["p50"] > 0 and r["decode_tokens_per_s"]["p50"] > 0
        assert r["memory"]["peak_gpu_memory_mb"] is None and r["memory"]["peak_host_rss_mb"] > 0
        profile = r["profile"]  # TensorRT Edge-LLM's structure
        assert profile["time_source"] == "host_wall" and "peak_gpu_memory_mb" not in profile
        assert profile["generation"]["generated_tokens"] == 2 * (6 - 1)
        assert profile["multimodal"]["total_images"] == 2 * key[2]
        assert {"stage_id", "total_runs", "total_gpu_time_ms", "average_time_per_run_ms",
                "host_time_stats"} <= set(profile["stages"][0])
        for stage in REPORT_STAGES:
            roof = r["roofline"][stage]
            assert roof["flops"] > 0 and roof["bytes"] > 0 and roof["floor_ms"] > 0 and roof["bound"] in ("compute",
                                                                                                          "memory")
            assert set(roof["projections"]) == {d.name for d in JETSON}
    assert report["peaks"]["matmul_tflops"]["fp32"] > 0 and report["peaks"]["bandwidth_gbs"] > 0
    fit = {(f["preset"], f["precision"], f["frames"]) for f in report["memory_fit"]}
    assert ("edge", "int8", 4) in fit and ("paper", "fp32", 2) in fit


def test_parity_rows_against_the_fp32_reference(run):
    rows = _ok(run["report"])
    for s in (2, 4):
        torch_row, ort, int8 = rows[("torch", "fp32", s)], rows[("onnxruntime", "fp32", s)], rows[("onnxruntime", "int8", s)]
        assert all(m["rel_l2"] == 0.0 for m in torch_row["parity"]["units"].values())  # the reference itself
        assert torch_row["parity"]["scene"]["pose"]["rot_deg_max"] == 0.0
        units = ort["parity"]["units"]
        assert len(units) == 14 and max(m["rel_l2"] for m in units.values()) < 1e-4, units
        assert {"geometry.depth", "metric_depth.metric_depth"} <= {k for k, m in units.items() if "abs_rel" in m}
        assert ort["gate"]["passed"] and ort["vision"]["providers"] == ["CPUExecutionProvider"]
        assert int8["vision"]["int8_fp32_units"] == []  # every unit ran its Q/DQ graph
        assert max(m["rel_l2"] for m in int8["parity"]["units"].values()) > 1e-4  # really quantized
        for r in (ort, int8):
            scene = r["parity"]["scene"]
            assert {"abs_rel", "delta_1_25"} <= set(scene["metric_depth"])
            assert {"rot_deg_max", "trans_m_max"} <= set(scene["pose"])
            assert 0 <= scene["answer_tokens"]["agreement"] <= 1 and scene["answer_tokens"]["tokens"] == 6
            assert r["llm"] == {"decoder": "fast", "dtype": "float32", "compiled": False}
        assert torch_row["llm"]["decoder"] == "reference"


def test_unavailable_rows_are_listed_with_the_reason(run):
    rows = {(r["backend"], r["precision"], r["frames"]): r for r in run["report"]["configs"]}
    assert rows[("tensorrt", "fp32", 2)]["status"] == "skipped"
    assert rows[("tensorrt", "fp32", 2)]["reason"] == "no --engines folder given (vidllm-edge build makes one)"
    assert rows[("torch", "int8", 4)]["reason"].startswith("torch has no INT8 path for the vision units")


def test_markdown_plots_and_nothing_half_written(run):
    out = run["out"]
    md = (out / "report.md").read_text()
    for heading in ("## Scene latency", "## Per stage", "## Parity against the FP32 torch reference",
                    "## Roofline: distance from the floor", "PROJECTIONS", "## Memory fit", "## Not measured"):
        assert heading in md
    plots = run["report"]["plots"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plots["files"] == [] and plots["skipped"].startswith("matplotlib is not installed")
    else:
        assert len(plots["files"]) == 3
        assert all((out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in plots["files"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_plots_are_skipped_with_the_reason_without_matplotlib(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    report = json.loads(json.dumps(run["report"]))
    written = write_report(tmp_path, report)
    assert report["plots"]["files"] == [] and report["plots"]["skipped"].startswith("matplotlib is not installed")
    assert set(written) == {"report.md", "report.json"} and not (tmp_path / "plots").exists()
    assert load_report(tmp_path / REPORT_JSON)["plots"] == report["plots"]


def test_resume_keeps_the_measured_rows(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    code = main(ARGS + ["--backends", "torch", "--frames", "2,4", "--resume", "--out", str(out)])
    assert code == 0
    again = load_report(out / REPORT_JSON)
    before, after = _ok(run["report"]), _ok(again)
    assert set(after) == set(before)
    assert after[("torch", "fp32", 4)]["scene_ms"] == before[("torch", "fp32", 4)]["scene_ms"]  # not run again
    assert len(again["meta"]["history"]) == 1


def test_video_input_and_the_time_budget(tmp_path):
    from vidllm_edge.synthetic import write_scene

    video, _ = write_scene(tmp_path / "scene", num_frames=8, width=112, height=84)
    out = tmp_path / "out"
    assert main(ARGS[:3] + ["--reps", "1", "--warmup", "0", "--answer-tokens", "4", "--backends", "torch", "--frames",
                            "2,4", "--video", str(video), "--max-seconds", "0.001", "--out", str(out)]) == 0
    report = load_report(out / REPORT_JSON)
    assert report["meta"]["run"]["video"] == str(video)
    first, second = report["configs"]
    assert first["status"] == "ok" and first["frames"] == 2  # the first row of a run always runs
    assert second["status"] == "skipped" and second["reason"].startswith("would end past the --max-seconds 0.001 budget")


def test_rows_run_only_the_named_pairs_in_the_frame_order_given(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(ARGS[:3] + ["--reps", "1", "--warmup", "0", "--answer-tokens", "4", "--rows", "torch:fp16,torch:fp32",
                            "--frames", "4,2", "--out", str(out)]) == 0
    report = load_report(out / REPORT_JSON)
    assert report["meta"]["run"]["rows"] == ["torch:fp16", "torch:fp32"]
    assert [(r["backend"], r["precision"], r["frames"], r["status"]) for r in report["configs"]] == [
        ("torch", "fp32", 2, "ok"), ("torch", "fp16", 2, "skipped"), ("torch", "fp32", 4, "ok"),
        ("torch", "fp16", 4, "skipped")]  # the report is sorted; the run went 4 frames first:
    log = capsys.readouterr().err
    assert log.index("torch fp32 at 4 frames ...") < log.index("torch fp32 at 2 frames ...")


@pytest.mark.skipif(available("tensorrt"), reason="checks the reason given when TensorRT is absent")
def test_tensorrt_without_the_package_is_skipped_with_the_reason(run, tmp_path):
    engines = _engines(tmp_path, run["export"] / "fp32")
    out = tmp_path / "out"
    assert main(ARGS + ["--backends", "tensorrt", "--precision", "fp16", "--frames", "2", "--engines", str(engines),
                        "--out", str(out)]) == 0
    (row,) = load_report(out / REPORT_JSON)["configs"]
    assert row["status"] == "skipped"
    assert row["reason"].startswith("Python package: tensorrt | cannot be imported") and "Note: Install TensorRT" in row["reason"]


# ------------------------------------------------------------------------------------------ bad input


def _bad(capsys, argv, out):
    assert main(argv + ["--out", str(out)]) == 2
    assert not out.exists()
    return capsys.readouterr().err


def test_unknown_backend(capsys, tmp_path):
    err = _bad(capsys, ARGS + ["--backends", "torch,torhc"], tmp_path / "out")
    assert err == ("error: Argument: --backends torch,torhc | names an unknown backend 'torhc'.\n"
                   "Note: Choose from torch, torch-compiled, onnxruntime, tensorrt (comma-separated).\n")


def test_bad_numbers_and_gates(capsys, tmp_path):
    out = tmp_path / "out"
    assert _bad(capsys, ARGS + ["--reps", "0"], out) == "error: Argument: --reps 0 | must be at least 1.\n" \
                                                          "Note: Use e.g. --reps 3.\n"
    assert _bad(capsys, ARGS + ["--frames", "4,-2"], out) == ("error: Argument: --frames 4,-2 | must be positive frame "
                                                             "counts.\nNote: Write e.g. --frames 8,16,32.\n")
    err = _bad(capsys, ARGS + ["--gate", "fp16:rel=1e-2"], out)
    assert err.startswith("error: Argument: --gate fp16:rel=1e-2 | is not PRECISION:KEY=VALUE with a known precision "
                          "and key.\nNote: Write PRECISION:KEY=VALUE items")


def test_bad_rows(capsys, tmp_path):
    out = tmp_path / "out"
    err = _bad(capsys, ARGS + ["--rows", "torch:fp32,onnxruntime"], out)
    assert err == ("error: Argument: --rows torch:fp32,onnxruntime | has the entry 'onnxruntime', not BACKEND:PRECISION "
                   "with a known backend and precision.\nNote: Write BACKEND:PRECISION pairs, comma-separated, e.g. "
                   "--rows torch:fp32,onnxruntime:int8 (backends torch, torch-compiled, onnxruntime, tensorrt; "
                   "precisions fp32, fp16, int8).\n")
    err = _bad(capsys, ARGS + ["--rows", "torch:fp32", "--precision", "fp16"], out)
    assert err == ("error: Argument: --rows torch:fp32 | was given with --backends or --precision.\nNote: Give either "
                   "--rows BACKEND:PRECISION,... or --backends and --precision, not both.\n")


def test_frame_count_outside_the_export_profile(run, capsys, tmp_path):
    folder = run["export"] / "fp32"
    err = _bad(capsys, ARGS + ["--frames", "2,8", "--export", str(run["export"])], tmp_path / "out")
    assert err == (f"error: Argument: --frames 2,8 | asks for 8 frames, outside the frame profile S in [1, 4] of the "
                   f"export {folder}.\nNote: Benchmark 1 to 4 frames, or export for more: leave --export out, or use an "
                   "empty --export folder.\n")


def _sha(seed):
    from vidllm_edge.calibration.record import state_fingerprint
    from vidllm_edge.models.model import build_model

    return state_fingerprint(build_model("tiny", seed=seed))


def test_export_from_another_model(run, capsys, tmp_path):
    folder = run["export"] / "fp32"
    err = _bad(capsys, ARGS + ["--seed", "1", "--frames", "2", "--export", str(run["export"])], tmp_path / "out")
    assert err == (f"error: Export folder: {folder} | was made from model state sha256 {_sha(0)[:12]}…; the "
                   f"benchmarked model (preset:tiny (random weights, seed 1)) has {_sha(1)[:12]}….\nNote: Benchmark the "
                   "model it was exported from (same --preset and --seed, or --checkpoint), or leave --export out (a "
                   "temporary export is made) or point it to a folder of this model's exports.\n")


def _engines(tmp_path, export):
    folder = tmp_path / "engines"
    folder.mkdir()
    entry = {"unit": "perception", "precision": "fp16", "profile": {"S": [1, 2, 4]}, "image_hw": [70, 84],
             "file": "perception.engine", "build": {"export": str(export), "precision": "fp16", "frames": [1, 2, 4]}}
    (folder / "engines.json").write_text(json.dumps({"format": "vidllm-edge-engines", "version": 1,
                                                     "export": str(export), "engines": {"perception": entry}}))
    return folder


def test_engines_folder_from_another_model(run, capsys, tmp_path):
    engines = _engines(tmp_path, run["export"] / "fp32")
    err = _bad(capsys, ARGS + ["--seed", "1", "--backends", "tensorrt", "--frames", "2", "--engines", str(engines)],
               tmp_path / "out")
    assert err.startswith(f"error: Engines folder: {engines} | was made from model state sha256 {_sha(0)[:12]}…; the "
                          f"benchmarked model (preset:tiny (random weights, seed 1)) has {_sha(1)[:12]}….\nNote: Build "
                          "engines from an export of this model")


def test_frame_count_outside_the_engines_profile(run, capsys, tmp_path):
    engines = _engines(tmp_path, run["export"] / "fp32")
    err = _bad(capsys, ARGS + ["--backends", "tensorrt", "--frames", "6", "--engines", str(engines)], tmp_path / "out")
    assert err == (f"error: Argument: --frames 6 | asks for 6 frames, outside the frame profile S in [1, 4] of the engine "
                   f"of perception in {engines}.\nNote: Benchmark 1 to 4 frames, or rebuild the engines for more "
                   "(vidllm-edge build ... --frames MIN:OPT:MAX).\n")


# ------------------------------------------------------------------------------------------ helpers


def test_pose_error_and_token_agreement():
    ext = np.zeros((2, 3, 4))
    ext[:, :3, :3] = np.eye(3)
    turned = ext.copy()
    turned[1, :3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]  # 90° about z
    turned[1, :3, 3] = [0, 0, 2]
    err = pose_error(ext, turned)
    assert err["rot_deg_max"] == pytest.approx(90.0) and err["trans_m_max"] == pytest.approx(2.0)
    assert pose_error(ext, ext)["rot_deg_max"] == 0.0
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == {"agreement": 0.75, "first_divergence": 2, "tokens": 4}
    assert token_agreement([1, 2], [1, 2, 3])["first_divergence"] == 2


def test_gate_names_every_failure_and_nan_fails():
    parity = {"units": {"geometry.depth": {"rel_l2": float("nan"), "cosine": 0.99, "abs_rel": 0.1,
                                           "delta_1_25": 0.9}},
              "scene": {"pose": {"rot_deg_max": 3.0}, "answer_tokens": {"agreement": 0.5}}}
    failures = check_gate(parity, {"rel_l2": 1e-2, "cosine": 0.999, "delta_1_25": 0.995, "rot_deg": 1.0})
    assert failures == ["geometry.depth rel_l2 nan > 0.01", "geometry.depth cosine 0.99 < 0.999",
                        "geometry.depth delta_1_25 0.9 < 0.995", "scene pose rot_deg 3 > 1"]


def test_compiled_units_serve_every_frame_count_from_one_compile():
    """torch-compiled rows compile each unit once with the frame axis symbolic (a compile per frame count made
    the H100 run's compiled rows cost minutes each); outputs equal the eager unit's."""
    import torch

    from vidllm_edge.benchmarks.suite import PlacedUnit
    from vidllm_edge.models.config import from_name
    from vidllm_edge.models.model import build_model
    from vidllm_edge.runtime.torch_backend import torch_units

    torch._dynamo.reset()
    model = build_model(from_name("tiny"), seed=0).eval()
    unit = torch_units(model, (70, 84))["perception"]
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = PlacedUnit(unit, torch.device("cpu"), compile_backend=counting)
    eager = PlacedUnit(unit, torch.device("cpu"))
    assert compiled.s_axes == {"images": [0]}
    first = None
    for s in (4, 2, 3):
        images = torch.rand(s, 3, 70, 84, generator=torch.Generator().manual_seed(s))
        got, want = compiled({"images": images}), eager({"images": images})
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
        first = len(graphs) if first is None else first
    assert first >= 1 and len(graphs) == first  # no graph compiled again for 2 or 3 frames


def test_many_compiled_units_never_fall_back_to_eager():
    """All PlacedUnits compile one wrapper's code; past torch._dynamo's per-code limit of 8 graphs the rest ran
    eager with only a warning (the H100 run's compiled geometry at 8 frames). Ten graphs (five units under two
    autocast types) all run compiled."""
    import torch

    from vidllm_edge.benchmarks.exports import VISION_UNITS
    from vidllm_edge.benchmarks.suite import PlacedUnit
    from vidllm_edge.models.config import from_name
    from vidllm_edge.models.model import build_model
    from vidllm_edge.runtime.torch_backend import torch_units

    torch._dynamo.reset()
    runs = []

    def counting(gm, example_inputs):
        def run(*args):
            runs.append(gm)
            return gm.forward(*args)
        return run

    units = torch_units(build_model(from_name("tiny"), seed=0).eval(), (70, 84))
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for name in VISION_UNITS:
            unit = units[name]
            dims = {**unit.bound, "S": 2, "Sm": 2, "M": 5}
            feed = {t.name: torch.rand([dims.get(d, d) for d in t.shape], generator=gen) for t in unit.spec.inputs}
            before = len(runs)
            PlacedUnit(unit, torch.device("cpu"), dtype, compile_backend=counting)(feed)
            assert len(runs) > before, f"{name} under {dtype} ran eager"
