"""INT8 Q/DQ of every vision unit of the tiny preset on this CPU machine: calibration, sensitivity, policy.

    python -m vidllm_edge.benchmarks.int8_cpu_report --out benchmarks/results

Exports the tiny preset's vision units (FP32, 70x84 frames), records calibration inputs from two
synthetic room videos (texture seeds 0 and 1, 8 frames each), and quantizes every unit with ONNX
Runtime (symmetric int8, per-channel weights, Q/DQ on MatMul/Conv/Gemm inputs, attention FP). Metrics
are INT8 against the FP32 graph on ONNX Runtime CPU, on the calibration frames and on held-out frames
(the frames halfway between the calibration frames, and six photographs). Also measured: each unit
fully quantized with attention's activation matmuls quantized too, and whether the modelopt route
runs here. Random weights: activation statistics are not a trained model's, so the numbers show the
machinery and its failure modes, not the INT8 accuracy of the real model. No speed is measured: INT8
is judged for speed on the GPU. Writes int8_cpu_tiny.json and int8_cpu_tiny.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import tempfile
import time
from pathlib import Path

import torch

from vidllm_edge import atomic
from vidllm_edge.calibration.quantize import UnitQuantizer, metrics_table, quantize_export
from vidllm_edge.calibration.record import record_calibration, state_fingerprint
from vidllm_edge.errors import DependencyError
from vidllm_edge.export.exporter import FrameProfile, export_model
from vidllm_edge.export.specs import VISION_UNIT_NAMES
from vidllm_edge.models.model import build_model
from vidllm_edge.optional import require
from vidllm_edge.synthetic import write_scene

HW = (70, 84)
MODELOPT_VENV_CHECK = (
    "nvidia-modelopt 0.47.0 (base, no extras) installed into a throwaway venv with this install's constraints: "
    "`import modelopt` works, `import modelopt.onnx.quantization` fails with ModuleNotFoundError: "
    "onnx_graphsurgeon ('Please install optional [onnx] dependencies'). The [onnx] extra pins onnx~=1.21, "
    "onnxruntime-gpu~=1.24 (CUDA 12), cupy-cuda12x, onnxconverter-common~=1.16, polygraphy, lief; installing it "
    "would replace this machine's onnx 1.23 / onnxruntime 1.32, so the modelopt route was not run.")


def _modelopt_attempt(export: Path, calib: Path) -> dict:
    """Try the modelopt route in this environment on the smallest unit; record what happens."""
    try:
        with UnitQuantizer(export, "projector", calib, method="modelopt") as q:
            ev = q.evaluate(q.build())
        return {"ran": True, "projector": ev.splits}
    except DependencyError as exc:
        return {"ran": False, "error": str(exc).splitlines()[0]}


def _attention_variant(export: Path, calib: Path, unit: str) -> dict | None:
    """The unit fully quantized with attention's activation-by-activation MatMuls quantized as well."""
    with UnitQuantizer(export, unit, calib, quantize_attention=True) as q:
        if not any(not n.weight for n in q.nodes()):
            return None
        ev = q.evaluate(q.build())
        return {"nodes": len(q.nodes()), "calibration": ev.worst("calibration"), "heldout": ev.worst("heldout"),
                "ok": ev.ok}


def _depth_spread(export: Path, calib: Path) -> dict:
    """Mean and std of the FP32 depth outputs on held-out frames: how much signal AbsRel/δ can see."""
    out = {}
    for unit, output in (("geometry", "depth"), ("metric_depth", "metric_depth")):
        with UnitQuantizer(export, unit, calib) as q:
            d = q.reference()["heldout"][output]
        out[f"{unit}.{output}"] = {"mean": float(d.mean()), "std": float(d.std()), "min": float(d.min()),
                                   "max": float(d.max())}
    return out


def run(work: Path, log) -> dict:
    model = build_model("tiny", seed=0)
    export = work / "export"
    t0 = time.perf_counter()
    export_model(model, export, frames=FrameProfile(1, 4, 8), image_hw=HW, units=VISION_UNIT_NAMES, validate=False,
                 source={"model": "preset:tiny (random weights, seed 0)", "state_sha256": state_fingerprint(model)},
                 log=log)
    t_export = time.perf_counter() - t0
    videos = [write_scene(work / f"scene{seed}", num_frames=24, width=112, height=84, seed=seed)[0] for seed in (0, 1)]
    # A thin calibration first (one video, 4 frames): its ranges miss the photographs' activations, so the
    # policy has work to do. Then the main one, whose graphs and report are the result.
    record_calibration(model, videos[:1], 4, work / "calib_thin", image_hw=HW, log=log)
    thin = quantize_export(export, work / "calib_thin", log=log)
    t0 = time.perf_counter()
    record_calibration(model, videos, 8, work / "calib", image_hw=HW, log=log)
    t_record = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = quantize_export(export, work / "calib", log=log)
    t_quant = time.perf_counter() - t0
    report["thin_calibration"] = {"clips": thin["data"], "units": thin["units"]}
    report["attention_quantized"] = {u: _attention_variant(export, work / "calib", u) for u in report["units"]}
    report["fp32_depth_heldout"] = _depth_spread(export, work / "calib")
    report["modelopt"] = {"this_environment": _modelopt_attempt(export, work / "calib"),
                          "venv_check": MODELOPT_VENV_CHECK}
    report["seconds"] = {"export": round(t_export, 1), "record": round(t_record, 1), "quantize": round(t_quant, 1)}
    report["date"] = datetime.date.today().isoformat()
    report["versions"] = {"torch": torch.__version__, "onnxruntime": require("onnxruntime", "this report").__version__}
    report["export"] = report["calibration"] = "(temporary folder)"
    return report


def _lint_summary(units: dict) -> str:
    linted = [u for u, e in units.items() if "lint" in e]
    bad = [u for u in linted if not units[u]["lint"]["ok"]]
    return f"{len(linted) - len(bad)}/{len(linted)} ok" + (f" (fails: {', '.join(bad)})" if bad else "")


def _decisions(units: dict) -> list[str]:
    lines = ["| unit | INT8 | nodes INT8 / candidates | why | full-INT8 worst held-out (cosine, rel-L2) | lint |",
             "|---|---|---:|---|---|---|"]
    for unit, e in units.items():
        full = min(e["metrics"]["full"]["heldout"].items(), key=lambda kv: kv[1]["cosine"]) if e["metrics"]["full"] \
            else None
        worst = f"{full[0]}: {full[1]['cosine']:.5f}, {full[1]['rel_l2']:.3f}" if full else ""
        lint = ("ok" if e["lint"]["ok"] else "FAIL") if "lint" in e else ""
        lines.append(f"| {unit} | {'yes' if e['keep_int8'] else 'no'} | {e['candidates'] - len(e['excluded'])}/"
                     f"{e['candidates']} | {e['reason']} | {worst} | {lint} |")
    return lines


def markdown(r: dict) -> str:
    gate = r["gate"]
    lines = [
        "# INT8 Q/DQ on CPU: tiny preset, every vision unit (random weights)", "",
        f"{r['date']}, torch {r['versions']['torch']}, onnxruntime {r['versions']['onnxruntime']}, frames "
        f"{HW[0]}x{HW[1]}. Calibration: 2 synthetic room videos x 8 frames (pipeline sampling). Held out: the 7 "
        "frames halfway between them per video + 6 photographs (scikit-image). Metrics: INT8 vs the FP32 graph on "
        "ONNX Runtime CPU, pooled over each split.", "",
        f"Quantization ({r['method']}): symmetric int8 activations (zero point 0) and per-channel int8 weights, "
        "Q/DQ on MatMul/Conv/Gemm inputs only, biases FP32, attention's activation matmuls FP (TensorRT 10 "
        f"explicit-quantization layout). TensorRT 10 lint of the kept graphs: {_lint_summary(r['units'])}.", "",
        f"Gate on every output, calibration and held-out: cosine >= {gate['cosine']}, rel-L2 <= {gate['rel_l2']}, "
        f"depth AbsRel <= {gate['depth_abs_rel']}, depth δ<1.25 >= {gate['depth_delta']} (depth = geometry.depth, "
        "metric_depth.metric_depth).", "",
        "## Policy: which units keep INT8", ""] + _decisions(r["units"])
    spread = "; ".join(f"{k} {v['mean']:.3g} ± {v['std']:.2g} (min {v['min']:.3g}, max {v['max']:.3g})"
                       for k, v in r["fp32_depth_heldout"].items())
    lines += ["", "## Parity of the kept graphs (calibration and held-out frames)", "",
              f"Random weights make the depth heads nearly constant (FP32, held-out: {spread}), so depth AbsRel and "
              "δ<1.25 see little signal here; cosine and rel-L2 of every output carry the verdict.", ""]
    lines += metrics_table(r["units"])
    thin = r["thin_calibration"]
    lines += ["", "## The same with a thin calibration (1 video x 4 frames)", "",
              "Held out as above (3 in-between frames + 6 photographs). Four frames of one scene give some activation "
              "ranges narrower than what the held-out frames (the photographs most) produce, so full INT8 clips "
              "those there; where that breaks the gate, the policy keeps the most sensitive nodes in FP.", ""]
    lines += _decisions(thin["units"]) + ["", "Kept graphs:", ""] + metrics_table(
        {u: e for u, e in thin["units"].items() if e["excluded"]})
    lines += ["", "## Attention matmuls quantized too (each unit fully quantized, worst output)", "",
              "| unit | nodes | calibration cosine | held-out cosine | held-out rel-L2 | gate |",
              "|---|---:|---:|---:|---:|---|"]
    for unit, v in r["attention_quantized"].items():
        if v:
            lines.append(f"| {unit} | {v['nodes']} | {v['calibration']['cosine']:.5f} | {v['heldout']['cosine']:.5f} | "
                         f"{v['heldout']['rel_l2']:.3f} | {'pass' if v['ok'] else 'fail'} |")
    lines += ["", "## Most sensitive nodes (each quantized alone; held-out loss = 1 − cosine of the worst output)",
              ""]
    for unit, e in r["units"].items():
        s = e["sensitivity"]
        if s:
            top = ", ".join(f"{x['scope'] or x['node']} ({x['loss']:.1e})" for x in s["rows"][:3])
            lines.append(f"- {unit} ({s['note']}): {top}")
    mo = r["modelopt"]
    lines += ["", "## ORT vs modelopt", "",
              "modelopt could not run here, so there is no comparison: " + mo["venv_check"]
              if not mo["this_environment"]["ran"] else "modelopt ran: see the JSON.",
              f"In this environment: {mo['this_environment'].get('error', 'ran')}", "",
              f"Time on 2 cores: export {r['seconds']['export']} s, recording {r['seconds']['record']} s, "
              f"sensitivity + policy + final graphs {r['seconds']['quantize']} s. Not measured: speed (judged on the "
              "GPU)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        report = run(Path(tmp), log)
    out = atomic.ensure_dir(args.out)
    atomic.write_text(out / "int8_cpu_tiny.json", json.dumps(report, indent=2))
    atomic.write_text(out / "int8_cpu_tiny.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
