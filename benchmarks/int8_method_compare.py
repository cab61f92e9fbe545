"""NVIDIA Model-Optimizer vs onnxruntime.quantization on every vision unit of the tiny preset.

    python -m vidllm_edge.benchmarks.int8_method_compare --modelopt-python /tmp/mo-venv/bin/python \\
        --out benchmarks/results

modelopt's ``[onnx]`` extra pins onnx 1.21, onnxruntime-gpu 1.24 (CUDA 12) and cupy, which would replace
this install's onnx/onnxruntime, so it lives in its own virtual environment (the path above):

    python -m venv /tmp/mo-venv && /tmp/mo-venv/bin/pip install torch==2.13.0
    /tmp/mo-venv/bin/pip install 'nvidia-modelopt[onnx]' transformers tokenizers opencv-python-headless \\
        scikit-image
    /tmp/mo-venv/bin/pip install --no-deps -e .

Both routes get the same FP32 export, the same calibration folders, the same held-out frames and the same
gate (`Int8Gate`). Each graph is built where its tool is installed: the ONNX Runtime route in this process,
the modelopt route in a child process of ``--modelopt-python`` (the same `UnitQuantizer`, method
"modelopt"). Then every graph is judged here, by one `UnitQuantizer.evaluate` per unit (one FP32
reference, one ONNX Runtime), its Q/DQ placement is counted from the graph, and it is linted for
TensorRT 10. Variants: attention's activation-by-activation MatMuls FP (our layout) or quantized
(modelopt's own default), on the main calibration (2 videos x 8 frames) and on a thin one (1 video x 4
frames). The policy (sensitivity, then exclusions until the gate holds) runs on the thin calibration in
each route's own environment. Build time includes the calibration pass (tool imports excluded).

Random weights, CPU: the numbers compare the two tools' graphs, not the real model's INT8 accuracy, and
no speed (INT8 speed is judged on the GPU). Writes int8_method_compare_tiny.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as metadata
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vidllm_edge import atomic
from vidllm_edge.optional import require

ROUTES = ("ort", "modelopt")
CALIBS = ("calib", "calib_thin")
WEIGHTED = ("MatMul", "Conv", "Gemm")
POLICY_CALIB = "calib_thin"
CONTROL = "ort, modelopt's FP nodes"  # the ONNX Runtime route leaving FP the nodes modelopt left FP
COMMAND = ("python -m vidllm_edge.benchmarks.int8_method_compare --modelopt-python /tmp/mo-venv/bin/python "
           "--out benchmarks/results")
_TOOL = {"ort": "onnxruntime.quantization", "modelopt": "modelopt.onnx.quantization"}


def versions() -> dict[str, str | None]:
    """Installed versions of what the routes use (None: not installed)."""
    out = {}
    for dist in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "nvidia-modelopt", "cupy-cuda12x"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# -- building (runs in the route's environment) ----------------------------------------------------------------

def build_route(spec: dict[str, Any]) -> dict[str, Any]:
    """Build every (calibration, attention, unit) graph of ``spec["method"]`` into ``spec["out"]``, then run the
    policy on ``spec["policy_calib"]``; returns build times, decisions and this environment's versions."""
    import torch

    from vidllm_edge.calibration.quantize import UnitQuantizer

    torch.set_num_threads(2)
    method, out = spec["method"], Path(spec["out"])
    require(_TOOL[method], f"the {method} route")  # imported before timing: an import is not quantization work
    log = io.StringIO()
    builds = {}
    for calib in CALIBS:
        for attention in (False, True):
            for unit in spec["units"]:
                with UnitQuantizer(spec["export"], unit, spec["calibs"][calib], method, attention, log=log) as q:
                    start = time.perf_counter()
                    path = q.build(out / f"{method}.{calib}.{'attn' if attention else 'noattn'}.{unit}.onnx")
                    builds[f"{calib}/{attention}/{unit}"] = {"file": str(path),
                                                            "seconds": time.perf_counter() - start}
    policy = {}
    for unit in spec["units"]:
        start = time.perf_counter()
        with UnitQuantizer(spec["export"], unit, spec["calibs"][spec["policy_calib"]], method, log=log) as q:
            d = q.policy()
        policy[unit] = {"keep_int8": d.keep_int8, "excluded": len(d.exclude), "candidates": d.candidates,
                        "reason": d.reason, "seconds": time.perf_counter() - start}
    return {"builds": builds, "policy": policy, "versions": versions(),
            "providers": require("onnxruntime", "the comparison").get_available_providers(),
            "cupy_imported": "cupy" in sys.modules, "python": sys.executable}


def _run_child(python: str, spec: dict[str, Any], log) -> dict[str, Any]:
    """`build_route` in another interpreter; {"ran": False, "error": ...} with its last output if it fails."""
    spec_path = Path(spec["out"]) / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([python, "-m", "vidllm_edge.benchmarks.int8_method_compare", "--child", str(spec_path)],
                          capture_output=True, text=True, timeout=3600)
    log.write(proc.stderr)
    result = Path(spec["out"]) / "result.json"
    if proc.returncode != 0 or not result.is_file():
        tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][-12:]
        return {"ran": False, "python": python, "exit_code": proc.returncode, "error": "\n".join(tail)}
    return dict(json.loads(result.read_text()), ran=True)


def _route(method: str, python: str | None, spec: dict[str, Any], log) -> dict[str, Any]:
    if python:
        return _run_child(python, spec, log)
    from vidllm_edge.errors import VidLLMError

    try:
        return dict(build_route(spec), ran=True)
    except VidLLMError as exc:  # e.g. DependencyError: the tool is not installed here
        return {"ran": False, "python": sys.executable, "error": f"{type(exc).__name__}: {exc}"}


# -- judging (here) -------------------------------------------------------------------------------------------

def qdq_placement(path: Path) -> dict[str, Any]:
    """What a Q/DQ graph quantizes: MatMul/Conv/Gemm nodes reading a DequantizeLinear (split into those with a
    weight and activation x activation ones), the op types that read an activation DQ besides those (e.g.
    a residual Add fed rounded values), int8 weight bytes, file bytes, opset."""
    onnx = require("onnx", "the comparison")
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    dq_out = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}

    def is_weight(name: str) -> bool:  # int8 initializer -> DQ, or FP initializer -> Q -> DQ
        src = dq_out[name].input[0]
        return src in inits or (src in producer and producer[src].op_type == "QuantizeLinear"
                                and producer[src].input[0] in inits)

    quantized = [n for n in graph.node if n.op_type in WEIGHTED and any(i in dq_out for i in n.input)]
    weight = [n for n in quantized if len(n.input) > 1 and n.input[1] in dq_out and is_weight(n.input[1])]
    others: dict[str, int] = {}
    for n in graph.node:
        if n.op_type in WEIGHTED or n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i in n.input:
            if i in dq_out and not is_weight(i):
                others[n.op_type] = others.get(n.op_type, 0) + 1
    int8_bytes = sum(len(i.raw_data) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8)
    data = path.with_name(path.name + ".data")
    size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return {"quantized": len(quantized), "weight_gemms": len(weight), "activation_gemms": len(quantized) - len(weight),
            "quantized_names": sorted(n.name for n in quantized), "dq_read_by_other_ops": others,
            "int8_weight_bytes": int8_bytes, "bytes": size,
            "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))}


def judge(export: Path, calibs: dict[str, Path], units: list[str], routes: dict[str, dict], log) -> dict[str, Any]:
    """Per calibration, unit, attention setting and route: parity against FP32, placement, size, time, lint; and
    the control: the ONNX Runtime route with the weight GEMMs modelopt left FP excluded (attention FP)."""
    from vidllm_edge.calibration.quantize import UnitQuantizer, quantizable_nodes

    rows: dict[str, Any] = {}
    for calib in CALIBS:
        for unit in units:
            with UnitQuantizer(export, unit, calibs[calib], log=log) as q:
                nodes = quantizable_nodes(q.fp32, True)
                cand = {"weight_gemms": sum(n.weight for n in nodes),
                        "activation_gemms": sum(not n.weight for n in nodes)}
                for attention in (False, True):
                    for method, route in routes.items():
                        if not route.get("ran"):
                            continue
                        build = route["builds"][f"{calib}/{attention}/{unit}"]
                        path = Path(build["file"])
                        rows[f"{calib}/{attention}/{unit}/{method}"] = _row(calib, attention, unit, method, cand, path,
                                                                           build["seconds"], q.evaluate(path))
                # The control: the ONNX Runtime route told to leave FP exactly the weight GEMMs modelopt left FP.
                mo = rows.get(f"{calib}/False/{unit}/modelopt")
                if mo is None:
                    continue
                kept_fp = sorted({n.name for n in nodes if n.weight} - set(mo["placement"]["quantized_names"]))
                if kept_fp:
                    start = time.perf_counter()
                    path = q.build(exclude=kept_fp)
                    rows[f"{calib}/False/{unit}/{CONTROL}"] = dict(
                        _row(calib, False, unit, CONTROL, cand, path, time.perf_counter() - start, q.evaluate(path)),
                        excluded=kept_fp)
    return rows


def _row(calib: str, attention: bool, unit: str, method: str, cand: dict, path: Path, seconds: float, ev) -> dict:
    from vidllm_edge.export.lint import lint_onnx

    lint = lint_onnx(path).to_dict()
    return {"calib": calib, "attention": attention, "unit": unit, "method": method, "candidates": cand,
            "placement": qdq_placement(path), "seconds": seconds, "heldout_worst": ev.worst("heldout"),
            "calibration_worst": ev.worst("calibration"), "metrics": ev.splits, "gate_ok": ev.ok,
            "failures": ev.failures[:6], "lint_ok": bool(lint.get("ok")),
            "lint_errors": [f["message"] for f in lint.get("findings", []) if f.get("severity") == "error"]}


def run(work: Path, modelopt_python: str | None, log) -> dict[str, Any]:
    from vidllm_edge.benchmarks.int8_cpu_report import export_and_calibrate, report_model
    from vidllm_edge.export.specs import VISION_UNIT_NAMES

    model = report_model()
    setup = export_and_calibrate(model, work, log, units=VISION_UNIT_NAMES)
    units = list(VISION_UNIT_NAMES)
    calibs = {c: setup[c] for c in CALIBS}
    routes = {}
    for method in ROUTES:
        out = atomic.ensure_dir(work / f"graphs_{method}")
        spec = {"method": method, "export": str(setup["export"]), "calibs": {k: str(v) for k, v in calibs.items()},
                "units": units, "policy_calib": POLICY_CALIB, "out": str(out)}
        print(f"building the {method} graphs ...", file=log, flush=True)
        routes[method] = _route(method, modelopt_python if method == "modelopt" else None, spec, log)
    rows = judge(setup["export"], calibs, units, routes, log)
    for r in routes.values():
        for b in r.get("builds", {}).values():
            b["file"] = Path(b["file"]).name  # temporary folders: keep the names only
    return {"format": "vidllm-edge-int8-method-compare", "date": datetime.date.today().isoformat(),
            "command": COMMAND, "versions": versions(), "python": sys.executable, "routes": routes, "rows": rows,
            "units": units, "seconds": setup["seconds"], "summary": summarize(rows)}


def summarize(rows: dict[str, Any]) -> dict[str, Any]:
    """Per (calibration, attention) and route: gate passes, lint passes, sum of 1 − worst held-out cosine,
    nodes quantized, build seconds."""
    out: dict[str, Any] = {}
    for r in rows.values():
        if r["method"] == CONTROL:
            continue
        key = f"{r['calib']}/{'attention INT8' if r['attention'] else 'attention FP'}"
        s = out.setdefault(key, {}).setdefault(r["method"], {"units": 0, "gate_ok": 0, "lint_ok": 0, "loss_sum": 0.0,
                                                               "quantized": 0, "seconds": 0.0})
        s["units"] += 1
        s["gate_ok"] += bool(r["gate_ok"])
        s["lint_ok"] += bool(r["lint_ok"])
        s["loss_sum"] += 1.0 - r["heldout_worst"]["cosine"]
        s["quantized"] += r["placement"]["quantized"]
        s["seconds"] += r["seconds"]
    return out


# -- the report -------------------------------------------------------------------------------------------------

def markdown(r: dict[str, Any]) -> str:
    v, mo = r["versions"], r["routes"]["modelopt"]
    lines = ["# INT8 Q/DQ: NVIDIA Model-Optimizer vs onnxruntime.quantization (tiny preset, CPU, random weights)", "",
             f"{r['date']}. Command: `{r['command']}`.", "",
             f"This environment (ONNX Runtime route, and where every graph is judged): torch {v['torch']}, onnx "
             f"{v['onnx']}, onnxruntime {v['onnxruntime']}."]
    if mo.get("ran"):
        mv = mo["versions"]
        lines += [f"modelopt environment ({mo['python']}): nvidia-modelopt {mv['nvidia-modelopt']}, onnx {mv['onnx']}, "
                  f"onnxruntime-gpu {mv['onnxruntime-gpu']} (providers {', '.join(mo['providers'])}; calibration ran "
                  f"on CPUExecutionProvider, no GPU here), cupy-cuda12x {mv['cupy-cuda12x']} installed and "
                  f"{'imported' if mo['cupy_imported'] else 'never imported'} by the INT8 path, torch {mv['torch']}.",
                  "", NOTES]
    else:
        lines += ["", "**modelopt did not run.** Exact error:", "", "```", mo.get("error", "?"), "```"]
    lines += ["", "Both routes: the same FP32 export (opset 18), the same calibration data (max calibration: ONNX "
              "Runtime's MinMax, modelopt's `max`), symmetric int8 with zero point 0, per-channel weights, Q/DQ in "
              "front of MatMul/Conv/Gemm, FP32 elsewhere. Judged on held-out frames (in-between video frames and 6 "
              "photographs) against the FP32 graph on ONNX Runtime CPU with the INT8 gate (every output, calibration "
              "and held-out: cosine >= 0.999, rel-L2 <= 0.045; depth AbsRel <= 0.02, δ<1.25 >= 0.995).", "",
              "## Summary", "",
              "| calibration / attention | route | gate pass | lint pass | Σ(1 − worst held-out cosine) | "
              "nodes quantized | build s |", "|---|---|---:|---:|---:|---:|---:|"]
    for key, routes in r["summary"].items():
        for method, s in routes.items():
            lines.append(f"| {key} | {method} | {s['gate_ok']}/{s['units']} | {s['lint_ok']}/{s['units']} | "
                         f"{s['loss_sum']:.2e} | {s['quantized']} | {s['seconds']:.1f} |")
    for calib in CALIBS:
        for attention in (False, True):
            what = "2 videos x 8 frames" if calib == "calib" else "1 video x 4 frames"
            lines += ["", f"## {calib} ({what}), attention matmuls {'INT8' if attention else 'FP'}", "",
                      "| unit | route | INT8 nodes: weight + attention / candidates | other ops reading a DQ | "
                      "worst held-out output | cosine | rel-L2 | depth AbsRel / δ<1.25 | gate | file KB | int8 "
                      "weights KB | build s | lint |", "|---|---|---|---|---|---:|---:|---|---|---:|---:|---:|---|"]
            for row in r["rows"].values():
                if row["calib"] != calib or row["attention"] != attention:
                    continue
                p, c, w = row["placement"], row["candidates"], row["heldout_worst"]
                depth = next((m for m in row["metrics"]["heldout"].values() if "abs_rel" in m), None)
                other = ", ".join(f"{k} {n}" for k, n in sorted(p["dq_read_by_other_ops"].items())) or "none"
                lines.append(
                    f"| {row['unit']} | {row['method']} | {p['weight_gemms']} + {p['activation_gemms']} / "
                    f"{c['weight_gemms']} + {c['activation_gemms']} | {other} | {w['output']} | {w['cosine']:.6f} | "
                    f"{w['rel_l2']:.2e} | " + (f"{depth['abs_rel']:.1e} / {depth['delta_1_25']:.4f}" if depth else "")
                    + f" | {'pass' if row['gate_ok'] else 'FAIL'} | {p['bytes'] / 1e3:.0f} | "
                    f"{p['int8_weight_bytes'] / 1e3:.0f} | {row['seconds']:.2f} | "
                    f"{'ok' if row['lint_ok'] else 'FAIL'} |")
    lines += ["", f"## Policy on the thin calibration ({POLICY_CALIB}), each route in its own environment", "",
              "| unit | ort | modelopt |", "|---|---|---|"]
    for unit in r["units"]:
        cells = []
        for method in ROUTES:
            d = r["routes"][method].get("policy", {}).get(unit)
            cells.append("not run" if d is None else
                         f"{'INT8' if d['keep_int8'] else 'FP'}, {d['excluded']}/{d['candidates']} kept FP "
                         f"({d['seconds']:.0f} s): {d['reason']}")
        lines.append(f"| {unit} | " + " | ".join(cells) + " |")
    lines += ["", "## Verdict", "", verdict(r) if mo.get("ran") else "ONNX Runtime stays the default: modelopt did not "
              "run, so there is nothing to compare.", "",
              f"Setup time on 2 cores: export {r['seconds']['export']} s, recording {r['seconds']['record']} s."]
    return "\n".join(lines) + "\n"


NOTES = ("What the modelopt route needed (calibration/quantize.py `_build_modelopt`): modelopt asks its calibration "
         "reader for `get_first()`, which ONNX Runtime's reader interface lacks (added to our reader); modelopt runs "
         "`onnx.shape_inference.infer_shapes_path` on its input, which rewrites the export's FP32 graph in place "
         "(its sha256 then no longer matches the manifest), so it quantizes a private copy; `dq_only=True` stores "
         "int8 weights (without it modelopt keeps FP32 weights behind a QuantizeLinear and the file stays FP32-"
         "sized); external weights are renamed from modelopt's `<file>_data` to our `<file>.data`. modelopt raises "
         "the opset to 19 (the minimum it writes for int8) and logs `Failed to get GPU count: NVML Shared Library Not "
         "Found` at ERROR level on a machine without a GPU; neither stops it.")

def verdict(r: dict[str, Any]) -> str:
    """Which route stays the default, and why, from the numbers of this run."""
    rows, s, n = r["rows"], r["summary"], len(r["units"])

    def cos(key: str) -> float | None:
        return rows[key]["heldout_worst"]["cosine"] if key in rows else None

    fp, thin, att = s["calib/attention FP"], s["calib_thin/attention FP"], s["calib/attention INT8"]
    decisions = {m: {u: (d["keep_int8"], d["excluded"]) for u, d in r["routes"][m]["policy"].items()} for m in ROUTES}
    same_policy = decisions["ort"] == decisions["modelopt"]
    # Past 1e-5: the two tools' max ranges differ in the last float digits (another ONNX Runtime calibrates).
    differ = [u for u in r["units"] if abs(cos(f"calib/False/{u}/ort") - cos(f"calib/False/{u}/modelopt")) > 1e-5]
    control = {u: cos(f"calib/False/{u}/{CONTROL}") for u in differ}
    explained = all(c is not None and abs(c - cos(f"calib/False/{u}/modelopt")) <= 1e-4 for u, c in control.items())
    mo_geo = rows["calib/False/geometry/modelopt"]["placement"]
    adds = sum(rows[f"calib/False/{u}/modelopt"]["placement"]["dq_read_by_other_ops"].get("Add", 0) for u in r["units"])
    parts = [
        f"**Default: ort (onnxruntime.quantization).** With our layout (attention matmuls FP) both routes pass the "
        f"gate on {fp['ort']['gate_ok']}/{n} (ort) and {fp['modelopt']['gate_ok']}/{n} (modelopt) units with the main "
        f"calibration and {thin['ort']['gate_ok']}/{n} and {thin['modelopt']['gate_ok']}/{n} with the thin one, and "
        + ("the policy makes the same decisions for every unit. " if same_policy else "the policies differ (above). ")]
    if differ:
        parts.append(
            "Their worst held-out cosines differ on " + ", ".join(
                f"{u} ({cos(f'calib/False/{u}/ort'):.6f} ort, {cos(f'calib/False/{u}/modelopt'):.6f} modelopt)"
                for u in differ) + " and agree to 1e-5 elsewhere. modelopt leaves MatMul/Gemm layers with fewer "
            "than 16 input or output features in FP (a fixed rule of its quantizer); told to leave exactly those "
            "nodes FP, the ONNX Runtime route gives " + ", ".join(
                f"{u} {c:.6f}" if c is not None else f"{u} (no node left FP: not explained by the node choice)"
                for u, c in control.items())
            + (": the two quantizers compute the same numbers for the same nodes, the gain is the node choice, which "
               "our policy can adopt (a rule in `quantizable_nodes`), not a reason to change tools. "
               if explained else ". "))
    parts.append(
        f"With attention's matmuls quantized too (modelopt's own default), modelopt passes "
        f"{att['modelopt']['gate_ok']}/{n} against {att['ort']['gate_ok']}/{n} and its summed error is "
        f"{att['modelopt']['loss_sum'] / att['ort']['loss_sum']:.1f}x "
        f"ONNX Runtime's (perception {cos('calib/True/perception/modelopt'):.4f} vs "
        f"{cos('calib/True/perception/ort'):.4f}). modelopt also departs from the layout the gate and the engines "
        f"assume: with attention left FP it still quantized {mo_geo['activation_gemms']} activation-by-activation "
        f"MatMuls in geometry (its attention pattern does not match them), its DequantizeLinear outputs feed {adds} "
        f"residual Adds, and it raises the opset to {mo_geo['opset']}. Its builds took "
        f"{fp['modelopt']['seconds'] / fp['ort']['seconds']:.1f}x as long ({fp['modelopt']['seconds']:.1f} s vs "
        f"{fp['ort']['seconds']:.1f} s for the six units) and repeat the calibration pass for every variant, where "
        "ours reuses one range cache across the sensitivity sweep; and its [onnx] extra pins onnx 1.21, "
        "onnxruntime-gpu 1.24 (CUDA 12) and cupy, which replace this package's onnx/onnxruntime, so it needs an "
        "environment of its own. modelopt stays available as `--method modelopt`.")
    return "".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--modelopt-python", default=None,
                        help="python of an environment with nvidia-modelopt[onnx] and this package (default: this one)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: build one route from a spec
    parser.add_argument("--markdown-from", default=None, type=Path,
                        help="rewrite the .md from an existing int8_method_compare_tiny.json (no measuring)")
    parser.add_argument("--verbose", action="store_true", help="print the progress log")
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        result = build_route(spec)
        atomic.write_text(Path(spec["out"]) / "result.json", json.dumps(result, indent=2))
        return 0
    out = atomic.ensure_dir(args.out)
    if args.markdown_from:
        report = json.loads(args.markdown_from.read_text())
    else:
        import torch

        torch.set_num_threads(2)
        log = sys.stderr if args.verbose else io.StringIO()
        with tempfile.TemporaryDirectory() as tmp:
            report = run(Path(tmp), args.modelopt_python, log)
        atomic.write_text(out / "int8_method_compare_tiny.json", json.dumps(report, indent=2))  # first: the data
    atomic.write_text(out / "int8_method_compare_tiny.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
