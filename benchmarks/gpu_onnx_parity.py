"""ONNX Runtime CUDA vs torch CUDA for the `edge` preset's perception and geometry units (issue: export).

One whole measurement, meant for the lent GPU with onnxruntime-gpu on the path:

    python -m vidllm_edge.benchmarks.gpu_onnx_parity --phase export --work /tmp/edge   # CPU tracing, lint
    python -m vidllm_edge.benchmarks.gpu_onnx_parity --phase run --work /tmp/edge --out results/

Weights are random (seeded); the LLM of the preset is replaced by a tiny one because these two units do
not touch it. Inputs are real frames (photographs + the synthetic room), resized to --image-hw.
Parity: the FP16 graph on the CUDA provider against the FP32 torch reference on CUDA (geometry is fed the
reference's t_geom so its error is its own). Latency: warm-up excluded, CUDA-synchronised wall time per
call with inputs and outputs already on the GPU (I/O binding), p50/p90 over --reps. Not measured here:
video decoding, host-to-device copies of the frames, TensorRT (not installable in this workplace).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from vidllm_edge.export.validate import metrics, real_frames

UNITS = ("perception", "geometry")


def edge_model(preset: str = "edge"):
    from vidllm_edge.models.config import from_name
    from vidllm_edge.models.model import build_model

    cfg = from_name(preset)
    cfg.llm = from_name("tiny").llm  # perception/geometry never touch the LLM
    return build_model(cfg, seed=0)


def phase_export(args) -> None:
    from vidllm_edge.export.lint import lint_onnx
    from vidllm_edge.export.onnx_export import export_unit
    from vidllm_edge.export.specs import SPECS

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hw = tuple(int(v) for v in args.image_hw.split("x"))
    model = edge_model(args.preset)
    lints = {}
    for opset in args.opsets:
        for unit in args.units:
            spec = dataclasses.replace(SPECS[unit], opset=opset)
            path = work / f"o{opset}" / f"{unit}.onnx"
            path.parent.mkdir(exist_ok=True)
            start = time.perf_counter()
            export_unit(spec, model, hw, path, "fp16", example_size=2)
            report = lint_onnx(path)
            lints[f"{unit}@opset{opset}"] = {"seconds": round(time.perf_counter() - start, 1), "ok": report.ok,
                                             "errors": [f.message for f in report.findings if f.severity == "error"],
                                             "op_counts": report.op_counts}
            print(f"exported {path} in {time.perf_counter() - start:.1f} s; lint ok={report.ok}", flush=True)
    old = json.loads((work / "lint.json").read_text()) if (work / "lint.json").exists() else {}
    (work / "lint.json").write_text(json.dumps({**old, **lints}, indent=2))


def _timed(fn, reps: int, warmup: int) -> dict:
    """Wall time per call (synchronised on CUDA), warm-up excluded."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90)),
            "min_ms": float(min(times)), "reps": reps, "warmup": warmup}


def phase_run(args) -> None:
    from vidllm_edge.runtime.ort_backend import OrtUnit
    from vidllm_edge.runtime.torch_backend import torch_units

    work = Path(args.work)
    hw = tuple(int(v) for v in args.image_hw.split("x"))
    model = edge_model(args.preset).cuda().eval()
    ref_units = torch_units(model, hw)
    p = model.cfg.patch_size
    bound = {"H": hw[0], "W": hw[1], "P": (hw[0] // p) * (hw[1] // p), "C": model.cfg.embed_dim}
    results = []
    for frames in args.frames:
        images = real_frames(frames, hw).cuda()
        with torch.inference_mode():
            ref = {"perception": ref_units["perception"]({"images": images})}
            ref["geometry"] = ref_units["geometry"]({"t_geom": ref["perception"]["t_geom"]})
        feeds = {"perception": {"images": images}, "geometry": {"t_geom": ref["perception"]["t_geom"]}}
        for unit in args.units:
            row = {"unit": unit, "frames": frames}
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                row["torch_fp32"] = _timed(lambda: ref_units[unit](feeds[unit]), args.reps, args.warmup)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    row["torch_bf16_autocast"] = _timed(lambda: ref_units[unit](feeds[unit]), args.reps, args.warmup)
            row["torch_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            for opset in args.opsets:
                key = f"ort_cuda_fp16_opset{opset}"
                try:
                    spec = ref_units[unit].spec
                    ort_unit = OrtUnit(spec, work / f"o{opset}" / f"{unit}.onnx", ["CUDAExecutionProvider"],
                                       {k: v for k, v in bound.items() if any(k in t.shape for t in spec.inputs + spec.outputs)})
                    out = ort_unit(feeds[unit])
                    parity = {}
                    for name, value in ref[unit].items():
                        max_abs, rel, cos = metrics(value.float().cpu().numpy(), out[name].float().cpu().numpy())
                        parity[name] = {"max_abs": max_abs, "rel_l2": rel, "cosine": cos}
                    row[key] = {"timing": _timed(lambda: ort_unit(feeds[unit]), args.reps, args.warmup),
                                "parity_vs_torch_fp32": parity}
                    del ort_unit
                except Exception as exc:  # record failures (e.g. out of memory) instead of hiding them
                    row[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:400]}"}
                    traceback.print_exc()
                torch.cuda.empty_cache()
            results.append(row)
            print(json.dumps(row), flush=True)
    report = {"what": "edge preset perception + geometry: ONNX Runtime CUDA EP (FP16 ONNX) vs torch CUDA",
              "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "onnxruntime": __import__("onnxruntime").__version__, "image_hw": list(hw),
              "weights": "random (seed 0); LLM replaced by the tiny one (unused by these units)",
              "lint": json.loads((work / "lint.json").read_text()) if (work / "lint.json").exists() else None,
              "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_onnx_parity.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_onnx_parity.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [f"# {report['what']}", "",
             f"{report['device']}, torch {report['torch']} (CUDA {report['cuda']}), onnxruntime {report['onnxruntime']},"
             f" {report['date']}, frames {report['image_hw'][0]}x{report['image_hw'][1]}, {report['weights']}.", "",
             "| unit | S | torch fp32 p50 ms | torch bf16 p50 ms | ORT fp16 variant | ORT p50 ms | worst rel-L2 | worst cosine |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        for key, value in row.items():
            if not key.startswith("ort_"):
                continue
            base = f"| {row['unit']} | {row['frames']} | {row['torch_fp32']['p50_ms']:.1f} | {row['torch_bf16_autocast']['p50_ms']:.1f} | {key[9:]} |"
            if "error" in value:
                lines.append(base + f" failed: {value['error'][:80]} | | |")
            else:
                par = value["parity_vs_torch_fp32"].values()
                lines.append(base + f" {value['timing']['p50_ms']:.1f} | {max(p['rel_l2'] for p in par):.2e} |"
                             f" {min(p['cosine'] for p in par):.6f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["export", "run"], required=True)
    parser.add_argument("--preset", default="edge")
    parser.add_argument("--work", default="/tmp/edge_onnx")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--image-hw", default="518x518")
    parser.add_argument("--frames", type=lambda s: [int(v) for v in s.split(",")], default=[8, 32])
    parser.add_argument("--opsets", type=lambda s: [int(v) for v in s.split(",")], default=[18, 23])
    parser.add_argument("--units", type=lambda s: s.split(","), default=list(UNITS))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    (phase_export if args.phase == "export" else phase_run)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
