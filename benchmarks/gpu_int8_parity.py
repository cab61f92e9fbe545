"""INT8 Q/DQ and FP16 graphs of the `edge` preset's vision units on ONNX Runtime CUDA vs torch CUDA (issue 4).

One whole measurement for the lent GPU (onnxruntime-gpu on the path), per unit:

    python -m vidllm_edge.benchmarks.gpu_int8_parity --units perception --frames 8,32 --out DIR

1. export the unit's FP32 graph (opset 18: the TensorRT-destined form; `--opset 23` for ONNX Runtime's fused
   attention), convert a copy to FP16 (`export.onnx_export.to_fp16`);
2. INT8 Q/DQ with `calibration.quantize.quantize_graph_ort` (TensorRT 10's explicit-quantization layout):
   activation ranges from one clip of ``--calib-frames`` real frames (photographs + the synthetic room),
   checked on a held-out clip of other frames;
3. parity and latency at each S of ``--frames``: the FP16 and INT8 graphs on the CUDA provider against the
   FP32 torch reference on CUDA (cosine, rel-L2, max-abs per output); latency warm-up excluded,
   CUDA-synchronised wall time per call with inputs and outputs on the GPU (I/O binding), p50/p90.

Weights are random (seed 0); the preset's LLM is replaced by the tiny one (these units never touch it).
What ONNX Runtime's CUDA provider does with Q/DQ: it has no INT8 GEMM for them, so each DequantizeLinear
runs and the MatMul runs in float; the INT8 rows check the graphs TensorRT will be given run and keep
parity on the GPU. Their speed is TensorRT's to deliver (not installable here).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from vidllm_edge import atomic
from vidllm_edge.benchmarks.gpu_onnx_parity import _timed, edge_model
from vidllm_edge.export.validate import metrics, real_frames


def _log(start: float, msg: str) -> None:
    print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)


def build_graphs(model, unit: str, hw, work: Path, opset: int, calib: dict, start: float) -> dict[str, Path]:
    """FP32 export, FP16 copy, INT8 Q/DQ; returns {precision: path}."""
    import shutil

    from vidllm_edge.calibration.quantize import quantize_graph_ort, quantizable_nodes
    from vidllm_edge.export.onnx_export import export_unit, to_fp16
    from vidllm_edge.export.specs import SPECS

    spec = dataclasses.replace(SPECS[unit], opset=opset)
    paths = {p: work / p / f"{unit}.onnx" for p in ("fp32", "fp16", "int8")}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    files = export_unit(spec, model, hw, paths["fp32"], "fp32", example_size=2)
    external = len(files) > 1
    _log(start, f"{unit}: FP32 graph exported ({sum(f.stat().st_size for f in files) / 1e6:.0f} MB)")
    for f in files:
        shutil.copyfile(f, paths["fp16"].parent / f.name)
    to_fp16(paths["fp16"], external)
    _log(start, f"{unit}: FP16 copy converted")
    provider = quantize_graph_ort(paths["fp32"], paths["int8"], [calib], external=external)
    nodes = quantizable_nodes(paths["fp32"])
    _log(start, f"{unit}: INT8 Q/DQ graph written ({len(nodes)} MatMul/Conv/Gemm nodes quantized; calibrated on "
                f"{provider})")
    return paths


def main(argv=None) -> int:
    from vidllm_edge.runtime.ort_backend import OrtUnit, needs_basic_rewrites
    from vidllm_edge.runtime.torch_backend import torch_units

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="edge")
    p.add_argument("--units", default="perception", help="comma-separated: perception, geometry")
    p.add_argument("--frames", default="8,32")
    p.add_argument("--calib-frames", type=int, default=8)
    p.add_argument("--image-hw", default="518x518")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    start = time.perf_counter()
    hw = tuple(int(v) for v in args.image_hw.split("x"))
    frames = [int(v) for v in args.frames.split(",")]
    out = atomic.ensure_dir(args.out, "Output folder")
    work = Path(args.work or tempfile.mkdtemp(prefix="vidllm-int8-gpu-"))
    model = edge_model(args.preset)
    cuda = torch.cuda.is_available()
    device, providers = ("cuda", ["CUDAExecutionProvider"]) if cuda else ("cpu", ["CPUExecutionProvider"])
    ref_units = torch_units(model, hw)
    pool = real_frames(2 * args.calib_frames, hw)  # photographs + synthetic room frames, [2n, 3, H, W]
    calib_images, held_images = pool[0::2], pool[1::2]  # interleaved: calibration and held-out differ
    report = {"what": "edge preset vision units: INT8 Q/DQ and FP16 graphs on ONNX Runtime CUDA vs torch CUDA",
              "date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()})", "preset": args.preset,
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "onnxruntime": __import__("onnxruntime").__version__, "image_hw": list(hw), "opset": args.opset,
              "calibration": f"{args.calib_frames} real frames (one clip); held out: {args.calib_frames} others",
              "weights": "random (seed 0); LLM replaced by the tiny one (unused by these units)", "units": {}}
    for unit in args.units.split(","):
        entry = report["units"].setdefault(unit, {"rows": []})
        try:
            with torch.inference_mode():  # the unit's real inputs: geometry gets the reference's t_geom
                def feed_for(images):
                    if unit == "perception":
                        return {"images": images}
                    return {"t_geom": ref_units["perception"]({"images": images})["t_geom"]}

                calib = {k: v.numpy() for k, v in feed_for(calib_images).items()}
            paths = build_graphs(model, unit, hw, work / unit, args.opset, calib, start)
            entry["files_mb"] = {k: sum(f.stat().st_size for f in v.parent.iterdir()) / 1e6 for k, v in paths.items()}
            model.to(device)
            spec = ref_units[unit].spec
            p_ = model.cfg.patch_size
            bound = {"H": hw[0], "W": hw[1], "P": (hw[0] // p_) * (hw[1] // p_), "C": model.cfg.embed_dim}
            bound = {k: v for k, v in bound.items() if any(k in t.shape for t in spec.inputs + spec.outputs)}
            sessions = {prec: OrtUnit(spec, paths[prec], providers, bound,
                                      basic_optimizations=needs_basic_rewrites(prec == "int8", args.opset))
                        for prec in ("fp16", "int8")}
            for s in [None] + frames:  # None: the held-out clip (parity only)
                images = (held_images if s is None else real_frames(s, hw)).to(device)
                with torch.inference_mode():
                    feed = {k: v.to(device) for k, v in feed_for(images).items()}
                    ref = ref_units[unit](feed)
                    row = {"frames": s or int(images.shape[0]), "split": "heldout" if s is None else "timing"}
                    if s is not None:
                        row["torch_fp32"] = _timed(lambda: ref_units[unit](feed), args.reps, args.warmup)
                        with torch.autocast(device, dtype=torch.bfloat16):
                            row["torch_bf16_autocast"] = _timed(lambda: ref_units[unit](feed), args.reps, args.warmup)
                for prec, sess in sessions.items():
                    try:
                        got = sess(feed)
                        parity = {}
                        for name, value in ref.items():
                            mx, rel, cos = metrics(value.float().cpu().numpy(), got[name].float().cpu().numpy())
                            parity[name] = {"max_abs": mx, "rel_l2": rel, "cosine": cos}
                        row[f"ort_cuda_{prec}"] = {"parity_vs_torch_fp32": parity}
                        if s is not None:
                            row[f"ort_cuda_{prec}"]["timing"] = _timed(lambda: sess(feed), args.reps, args.warmup)
                    except Exception as exc:  # e.g. out of memory at S=32: recorded, not hidden
                        row[f"ort_cuda_{prec}"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                entry["rows"].append(row)
                _log(start, f"{unit} S={row['frames']} ({row['split']}): " + json.dumps(
                    {k: (v.get("timing", {}).get("p50_ms"), min((q["cosine"] for q in v.get("parity_vs_torch_fp32", {}).values()), default=None))
                     if isinstance(v, dict) and k.startswith("ort") else v.get("p50_ms") if isinstance(v, dict) else v
                     for k, v in row.items()}))
            del sessions
            model.cpu()
            if cuda:
                torch.cuda.empty_cache()
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            traceback.print_exc()
        atomic.write_text(out / "gpu_int8_parity.json", json.dumps(report, indent=2))
    atomic.write_text(out / "gpu_int8_parity.json", json.dumps(report, indent=2))
    atomic.write_text(out / "gpu_int8_parity.md", markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"# {report['what']}", "",
             f"{report['device']}, torch {report['torch']} (CUDA {report['cuda']}), onnxruntime {report['onnxruntime']}, "
             f"{report['date']}, frames {report['image_hw'][0]}x{report['image_hw'][1]}, opset {report['opset']}, "
             f"{report['weights']}. INT8 calibration: {report['calibration']}.", "",
             "| unit | S | split | torch fp32 p50 ms | torch bf16 p50 ms | ORT CUDA | p50 ms | worst cosine | worst rel-L2 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for unit, entry in report["units"].items():
        if "error" in entry:
            lines.append(f"| {unit} | | | | | failed: {entry['error'][:120]} | | | |")
        for row in entry["rows"]:
            t32 = row.get("torch_fp32", {}).get("p50_ms")
            t16 = row.get("torch_bf16_autocast", {}).get("p50_ms")
            for prec in ("fp16", "int8"):
                v = row.get(f"ort_cuda_{prec}", {})
                head = (f"| {unit} | {row['frames']} | {row['split']} | {'' if t32 is None else f'{t32:.1f}'} | "
                        f"{'' if t16 is None else f'{t16:.1f}'} | {prec} |")
                if "error" in v:
                    lines.append(head + f" failed: {v['error'][:90]} | | |")
                    continue
                par = v["parity_vs_torch_fp32"].values()
                p50 = v.get("timing", {}).get("p50_ms")
                lines.append(head + f" {'' if p50 is None else f'{p50:.1f}'} | {min(q['cosine'] for q in par):.6f} | "
                             f"{max(q['rel_l2'] for q in par):.2e} |")
    files = {u: e.get("files_mb") for u, e in report["units"].items() if e.get("files_mb")}
    if files:
        lines += ["", "Graph sizes (MB): " + "; ".join(f"{u}: " + ", ".join(f"{k} {v:.0f}" for k, v in f.items())
                                                       for u, f in files.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
