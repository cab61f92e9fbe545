"""The benchmark report: ``report.json`` (schema below, versioned), ``report.md`` (tables a person reads first)
and plots (a stacked per-stage latency bar per row, latency against frame count, a parity heat map).

Everything is written into a staging folder inside ``--out`` and moved into place file by file, plots
first and ``report.json`` last, so a folder never holds a half-written file; the suite rewrites the set
after every row (``complete`` stays false until the run ends).

report.json (FORMAT, VERSION)::

    format, version, complete
    meta.environment     device, python, torch (+CUDA), transformers, onnxruntime (+providers), tensorrt
    meta.run             model, image_hw, frames, backends, precisions, reps, warmup, answer_tokens, question,
                         gates, date, identity checks, what was prepared; meta.history: earlier runs (--resume)
    peaks                matmul_tflops per dtype, bandwidth_gbs (measured in the run)
    configs[]            backend, precision, frames, status ok|skipped|error, reason
                         (ok:) stages.<stage>.{host_ms, device_ms} = {p50, p90, p99, mean, min, max, std, n,
                         values}; scene_ms, answer_ms, time_to_first_token_ms, vision_ms_per_frame,
                         decode_tokens_per_s; visual_tokens, prefix_tokens, question_tokens; memory; profile
                         (TensorRT Edge-LLM's structure); parity.{units, scene}; gate.{thresholds, passed,
                         failures}; roofline.<stage>; vision, llm (what ran); seconds
    memory_fit[]         preset, precision, frames: weights/activations/kv/total GB, jetson.<device>.fits
    summary              dominant stage and distance from the floor per row, comparisons with published figures
    plots                files written, or why none were
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vidllm_edge import atomic
from vidllm_edge.benchmarks.timing import REPORT_STAGES as STAGES
from vidllm_edge.errors import InputError

FORMAT = "vidllm-edge-bench"
VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS = "plots"
STAGE_TITLES = {"encoder_adapter": "encoder + adapter", "geometry": "geometry", "metric_depth_scale":
                "metric depth + scale", "lift_pool": "lift + pool + projector", "prefill": "prefill (scene prefix)",
                "question_ttft": "question TTFT", "decode": "decode"}
# Published figures we compare with (shared/ANCHORS.md): (what, ms, frames, our stages to compare, note).
ANCHORS = (
    ("Vid-LLM end to end per scene, 32 frames (paper, hardware not stated)", 1600.0, 32, "scene",
     "our scene: frames in, full answer"),
    ("VGGT-1B geometry, 8 frames 336x518, bf16, H100 (VGGT paper)", 110.0, 8, "vision_geometry",
     "ours: encoder + adapter + geometry"),
    ("VGGT-1B geometry, 20 frames 336x518, bf16, H100 (VGGT paper)", 310.0, 20, "vision_geometry",
     "ours at the nearest measured frame counts"),
)
REQUIRED = {"format", "version", "complete", "meta", "peaks", "configs"}
ROW_REQUIRED = {"backend", "precision", "frames", "status"}
OK_REQUIRED = {"stages", "scene_ms", "time_to_first_token_ms", "vision_ms_per_frame", "decode_tokens_per_s",
               "parity", "gate", "memory", "profile", "roofline"}


def new_report(meta: dict[str, Any], peaks: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "complete": False, "meta": meta, "peaks": peaks, "configs": [],
            "memory_fit": [], "summary": {}, "plots": {}}


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report.json and check its format, version and required keys (InputError otherwise)."""
    path = Path(path)
    fix = "Point to a report.json written by vidllm-edge bench (this version), or run the benchmark again."
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"Benchmark report: {path}", f"cannot be read ({exc}).", fix) from exc
    if report.get("format") != FORMAT or report.get("version") != VERSION:
        raise InputError(f"Benchmark report: {path}", f"has format {report.get('format')!r} version "
                         f"{report.get('version')!r}; this vidllm-edge reads {FORMAT!r} version {VERSION}.", fix)
    missing = REQUIRED - set(report)
    for row in report.get("configs", []):
        missing |= ROW_REQUIRED - set(row)
        if row.get("status") == "ok":
            missing |= OK_REQUIRED - set(row)
    if missing:
        raise InputError(f"Benchmark report: {path}", f"lacks {', '.join(sorted(missing))}.", fix)
    return report


# ------------------------------------------------------------------------------------------------ summary


def ok_rows(report: dict) -> list[dict]:
    return [r for r in report["configs"] if r.get("status") == "ok"]


def label(row: dict) -> str:
    return f"{row['backend']} {row['precision']}"


def p50(block: dict | None) -> float | None:
    return (block or {}).get("p50")


def summarize(report: dict) -> dict[str, Any]:
    """Per row: the stage that dominates the scene and how far each stage is from its floor; comparisons with
    the published figures."""
    rows = []
    for r in ok_rows(report):
        stage_ms = {s: p50(r["stages"][s]["host_ms"]) or 0.0 for s in STAGES}
        total = sum(stage_ms.values())
        dominant = max(stage_ms, key=stage_ms.get)
        rows.append({"backend": r["backend"], "precision": r["precision"], "frames": r["frames"],
                     "scene_p50_ms": p50(r["scene_ms"]["host_ms"]), "dominant_stage": dominant,
                     "dominant_share": stage_ms[dominant] / total if total else None,
                     "x_floor": {s: (r.get("roofline") or {}).get(s, {}).get("x_floor") for s in STAGES},
                     "bound": {s: (r.get("roofline") or {}).get(s, {}).get("bound") for s in STAGES}})
    anchors = []
    vision = report["meta"]["run"].get("vision") or {}
    comparable = (vision.get("embed_dim"), vision.get("depth")) == (1024, 24)  # VGGT-1B-sized vision only
    for what, ms, frames, kind, note in ANCHORS:
        ours = []
        if not comparable:
            anchors.append({"what": what, "reference_ms": ms, "frames": frames, "ours": [],
                            "note": f"no comparable row: this model's vision is {vision.get('embed_dim')} wide, "
                                    f"{vision.get('depth')} blocks deep (VGGT-1B: 1024, 24)"})
            continue
        measured = sorted({r["frames"] for r in ok_rows(report)})
        nearest = [f for f in measured if f == frames] or sorted(measured, key=lambda f: abs(f - frames))[:2]
        for r in ok_rows(report):
            if r["frames"] not in nearest:
                continue
            if kind == "scene":
                value = p50(r["scene_ms"]["host_ms"])
            else:
                value = sum(p50(r["stages"][s]["host_ms"]) or 0.0 for s in ("encoder_adapter", "geometry"))
            ours.append({"backend": r["backend"], "precision": r["precision"], "frames": r["frames"], "ms": value,
                         "ratio": value / ms if value else None})
        anchors.append({"what": what, "reference_ms": ms, "frames": frames, "note": note, "ours": ours})
    failures = sum(1 for r in ok_rows(report) if not r["gate"]["passed"])
    return {"rows": rows, "anchors": anchors, "gate_failures": failures}


# ------------------------------------------------------------------------------------------------ text


def _f(value: float | None, fmt: str = ".1f") -> str:
    return "–" if value is None else format(value, fmt)


def _worst(parity: dict) -> tuple[float | None, float | None]:
    units = parity["units"].values()
    rel = max((m["rel_l2"] for m in units), default=None)
    cos = min((m["cosine"] for m in units), default=None)
    return rel, cos


def row_line(row: dict) -> str:
    """One line per row for the progress log."""
    head = f"{row['backend']} {row['precision']} at {row['frames']} frames"
    if row["status"] != "ok":
        return f"{head}: {row['status'].upper()} ({row['reason']})"
    rel, _ = _worst(row["parity"])
    return (f"{head}: scene p50 {_f(p50(row['scene_ms']['host_ms']))} ms, TTFT {_f(p50(row['time_to_first_token_ms']))} "
            f"ms, vision {_f(p50(row['vision_ms_per_frame']), '.2f')} ms/frame, decode "
            f"{_f(p50(row['decode_tokens_per_s']))} tok/s; worst rel-L2 {_f(rel, '.1e')}; gate "
            f"{'PASS' if row['gate']['passed'] else 'FAIL'}")


def console_table(report: dict) -> str:
    """The fixed-width table `vidllm-edge bench` prints at the end."""
    head = (f"{'backend':15} {'prec':5} {'S':>3} {'scene p50':>10} {'p90':>9} {'p99':>9} {'TTFT':>9} {'vis/frame':>9} "
            f"{'tok/s':>7} {'rel-L2':>8}  gate")
    lines = [head, "-" * len(head)]
    for r in report["configs"]:
        if r["status"] != "ok":
            lines.append(f"{r['backend']:15} {r['precision']:5} {r['frames']:>3}  {r['status']}: {r['reason'][:90]}")
            continue
        sc = r["scene_ms"]["host_ms"]
        rel, _ = _worst(r["parity"])
        lines.append(f"{r['backend']:15} {r['precision']:5} {r['frames']:>3} {sc['p50']:>10.1f} {sc['p90']:>9.1f} "
                     f"{sc['p99']:>9.1f} {p50(r['time_to_first_token_ms']):>9.1f} "
                     f"{p50(r['vision_ms_per_frame']):>9.2f} {p50(r['decode_tokens_per_s']):>7.1f} "
                     f"{_f(rel, '.1e'):>8}  {'PASS' if r['gate']['passed'] else 'FAIL'}")
    lines.append("(ms, host wall time between device synchronisations; rel-L2: worst unit output vs the FP32 "
                 "torch reference)")
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def markdown(report: dict) -> str:
    env, run = report["meta"]["environment"], report["meta"]["run"]
    dev = env["device"]
    device = (f"{dev['name']} (sm {dev['compute_capability']}, {dev['memory_gib']} GiB)" if dev["kind"] == "cuda"
              else f"CPU {dev['name']} ({dev['threads']} torch threads, {dev['cores']} cores)")
    ort = (f"onnxruntime {env['onnxruntime']} ({', '.join(env.get('onnxruntime_providers', []))})"
           if env.get("onnxruntime") else "onnxruntime not installed")
    lines = [f"# vidllm-edge benchmark: {run['model']}", "",
             f"{device}; python {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']}), transformers "
             f"{env['transformers']}, {ort}, tensorrt {env['tensorrt'] or 'not installed'}; {run['date']}.", "",
             f"Frames {run['image_hw'][0]}x{run['image_hw'][1]} from {run['video']}; {run['reps']} timed repetitions "
             f"after {run['warmup']} warm-up; answers of exactly {run['answer_tokens']} tokens (end of sequence "
             f"ignored) to \"{run['question']}\"."
             + ("" if report.get("complete") else " **Incomplete: the run is still going or was stopped.**"), "",
             "Times are host wall time between device synchronisations (p50/p90/p99 over the repetitions); device "
             "time comes from CUDA events and is absent on the CPU. Not measured: video decoding, text "
             "detokenisation, batch > 1. The model has random weights unless it came from a checkpoint: the parity "
             "numbers are exact comparisons, the answers themselves are meaningless.", ""]
    rows = ok_rows(report)
    lines += ["## Scene latency", ""]
    if run.get("resident_model_mb"):
        lines += [f"Peak GPU memory is the process's, polled: it includes the torch model kept on the device for the "
                  f"reference ({run['resident_model_mb']:.0f} MB) in every row.", ""]
    lines += _table(["backend", "precision", "S", "scene p50 / p90 / p99 ms", "device p50 ms", "TTFT ms",
                     "vision ms/frame", "decode tok/s", "peak GPU MB", "peak RSS MB", "LLM", "gate"],
                    [[r["backend"], r["precision"], str(r["frames"]),
                      " / ".join(_f(r["scene_ms"]["host_ms"][k]) for k in ("p50", "p90", "p99")),
                      _f(p50(r["scene_ms"]["device_ms"])), _f(p50(r["time_to_first_token_ms"])),
                      _f(p50(r["vision_ms_per_frame"]), ".2f"), _f(p50(r["decode_tokens_per_s"])),
                      _f(r["memory"]["peak_gpu_memory_mb"], ".0f"), _f(r["memory"]["peak_host_rss_mb"], ".0f"),
                      f"{r['llm']['decoder']} {r['llm']['dtype']}" + (" compiled" if r["llm"]["compiled"] else ""),
                      "PASS" if r["gate"]["passed"] else "**FAIL**"] for r in rows])
    lines += ["", "## Per stage (p50 ms, host; device in brackets)", ""]
    lines += _table(["backend", "precision", "S"] + [STAGE_TITLES[s] for s in STAGES],
                    [[r["backend"], r["precision"], str(r["frames"])]
                     + [_f(p50(r["stages"][s]["host_ms"])) + (f" ({_f(p50(r['stages'][s]['device_ms']))})"
                                                            if r["stages"][s]["device_ms"] else "") for s in STAGES]
                     for r in rows])
    lines += ["", "## Parity against the FP32 torch reference", "",
              "Unit outputs: each unit fed the reference's own inputs (its error alone). Scene: the chained "
              "pipeline's metric depth, camera poses and answer against the reference pipeline's. Decoder tokens: "
              "the row's decoder on the reference's visual tokens.", ""]
    lines += _table(["backend", "precision", "S", "worst rel-L2", "worst cosine", "depth AbsRel / δ<1.25 (unit)",
                     "scene depth AbsRel / δ<1.25", "pose rot° / trans m (max)", "answer tokens (first diff)",
                     "decoder tokens (first diff)", "gate"], [_parity_row(r) for r in rows])
    failed = [r for r in rows if not r["gate"]["passed"]]
    if failed:
        lines += ["", "Gate failures:", ""]
        lines += [f"- {label(r)} at {r['frames']} frames: " + "; ".join(r["gate"]["failures"][:6])
                  + (f" (+{len(r['gate']['failures']) - 6} more)" if len(r["gate"]["failures"]) > 6 else "")
                  for r in failed]
    lines += ["", "Gates (per precision): " + "; ".join(
        f"{p}: " + ", ".join(f"{k} {'≤' if k in ('rel_l2', 'max_abs', 'abs_rel', 'rot_deg', 'trans_m') else '≥'} {v:g}"
                             for k, v in g.items()) for p, g in run["gates"].items())]
    lines += _roofline_md(report) + _anchors_md(report) + _memory_md(report)
    skipped = [r for r in report["configs"] if r["status"] != "ok"]
    if skipped:
        lines += ["", "## Not measured", ""] + [f"- {label(r)} at {r['frames']} frames: {r['status']}: {r['reason']}"
                                                for r in skipped]
    plots = report.get("plots") or {}
    lines += ["", "## Plots", ""]
    lines += ([f"![{Path(f).stem}]({f})" for f in plots.get("files", [])] if plots.get("files")
              else [f"No plots: {plots.get('skipped', 'not written yet')}."])
    lines += ["", "## Field names", "",
              "Each row's `profile` in report.json has TensorRT Edge-LLM's profile JSON structure (`prefill`, "
              "`generation`, `multimodal`, `stages[].gpu_time_stats`, `peak_gpu_memory_mb`; see "
              "`vidllm_edge/benchmarks/suite.py` for the mapping). Where it has no GPU time it says "
              "`time_source: host_wall`.", ""]
    return "\n".join(lines)


def _parity_row(r: dict) -> list[str]:
    par = r["parity"]
    rel, cos = _worst(par)
    depth_units = [m for k, m in par["units"].items() if "abs_rel" in m]
    unit_depth = (f"{_f(max(m['abs_rel'] for m in depth_units), '.2e')} / {_f(min(m['delta_1_25'] for m in depth_units), '.4f')}"
                  if depth_units else "–")
    sc = par["scene"]
    md = sc["metric_depth"]
    ans, dec = sc["answer_tokens"], sc["decoder_tokens"]
    return [r["backend"], r["precision"], str(r["frames"]), _f(rel, ".2e"), _f(cos, ".6f"), unit_depth,
            f"{_f(md.get('abs_rel'), '.2e')} / {_f(md.get('delta_1_25'), '.4f')}",
            f"{_f(sc['pose']['rot_deg_max'], '.3f')} / {_f(sc['pose']['trans_m_max'], '.3g')}",
            f"{ans['agreement']:.0%} ({ans['first_divergence'] if ans['first_divergence'] is not None else 'none'})",
            f"{dec['agreement']:.0%} ({dec['first_divergence'] if dec['first_divergence'] is not None else 'none'})",
            "PASS" if r["gate"]["passed"] else "**FAIL**"]


def _roofline_md(report: dict) -> list[str]:
    rows = ok_rows(report)
    if not rows:
        return []
    peaks = report["peaks"]
    tf = ", ".join(f"{k} {v:.1f}" for k, v in peaks["matmul_tflops"].items())
    lines = ["", "## Roofline: distance from the floor", "",
             f"Peaks measured in this run: matmul TFLOP/s {tf}; copy bandwidth {peaks['bandwidth_gbs']:.0f} GB/s"
             + (f" ({'; '.join(peaks['notes'])})" if peaks.get("notes") else "") + ". Floor = max(FLOPs / peak, "
             "bytes / bandwidth); FLOPs and bytes are counted from the config (benchmarks/roofline.py). "
             "Cells: measured p50 ms / floor ms (x floor, c = compute-bound, m = memory-bound).", ""]
    table = []
    for r in rows:
        cells = []
        for s in STAGES:
            f = r["roofline"].get(s) or {}
            cells.append(f"{_f(f.get('measured_ms'))} / {_f(f.get('floor_ms'), '.2f')} "
                         f"(x{_f(f.get('x_floor'), '.0f')} {(f.get('bound') or '?')[0]})")
        table.append([r["backend"], r["precision"], str(r["frames"])] + cells)
    lines += _table(["backend", "precision", "S"] + [STAGE_TITLES[s] for s in STAGES], table)
    summary = report.get("summary") or {}
    if summary.get("rows"):
        lines += ["", "Dominant stage per row: " + "; ".join(
            f"{s['backend']} {s['precision']} S={s['frames']}: {STAGE_TITLES[s['dominant_stage']]} "
            f"({_f(100 * (s['dominant_share'] or 0), '.0f')}% of the stages)" for s in summary["rows"]) + "."]
    big = max(r["frames"] for r in rows)
    lines += ["", f"### Jetson Orin PROJECTIONS at {big} frames (not measured)", "",
              "Projected = the measured time scaled by the ratio of the Jetson floor to this device's floor, i.e. "
              "the stage keeps the fraction of its roofline it reaches here (published peaks, dense; "
              "benchmarks/roofline.py cites them). Cells: projected ms (floor ms).", ""]
    names = list(next(iter(r["roofline"].values()))["projections"] for r in rows[:1])[0]
    table = []
    for r in (r for r in rows if r["frames"] == big):
        for name in names:
            cells, total = [], 0.0
            for s in STAGES:
                pr = (r["roofline"].get(s) or {}).get("projections", {}).get(name, {})
                total += pr.get("projected_ms") or 0.0
                cells.append(f"{_f(pr.get('projected_ms'))} ({_f(pr.get('floor_ms'), '.1f')})")
            table.append([r["backend"], r["precision"], name] + cells + [_f(total)])
    lines += _table(["backend", "precision", "device (projection)"] + [STAGE_TITLES[s] for s in STAGES]
                    + ["scene (sum)"], table)
    return lines


def _anchors_md(report: dict) -> list[str]:
    anchors = (report.get("summary") or {}).get("anchors") or []
    if not anchors:
        return []
    lines = ["", "## Against published figures", ""]
    rows = []
    for a in anchors:
        for o in a["ours"] or [{}]:
            rows.append([a["what"], _f(a["reference_ms"], ".0f"),
                         f"{o.get('backend', '–')} {o.get('precision', '')} S={o.get('frames', '–')}",
                         _f(o.get("ms")), _f(o.get("ratio"), ".2f"), a["note"]])
    lines += _table(["figure", "ms", "ours (row)", "ours ms", "ours / figure", "what we compare"], rows)
    return lines


def _memory_md(report: dict) -> list[str]:
    fit = report.get("memory_fit") or []
    if not fit:
        return []
    names = list(fit[0]["jetson"])
    lines = ["", "## Memory fit on Jetson Orin (counted from the configs; not measured)", "",
             "Weights (vision at the precision; LLM 4/2/1 bytes for fp32/fp16/int8 = INT8 weight-only) + the largest "
             "activation working set + the K/V cache of the scene's context, against the module's memory less "
             "1.5 GB for the OS and the CUDA context.", ""]
    rows = [[f["preset"], f["precision"], str(f["frames"]), _f(f["weights_gb"], ".2f"), _f(f["activations_gb"], ".2f"),
             _f(f["kv_gb"], ".3f"), _f(f["total_gb"], ".2f")]
            + ["yes" if f["jetson"][n]["fits"] else "no" for n in names] for f in fit]
    lines += _table(["preset", "precision", "S", "weights GB", "activations GB", "KV GB", "total GB"] + names, rows)
    return lines


# ------------------------------------------------------------------------------------------------ plots


def write_plots(report: dict, folder: Path) -> list[str]:
    """Write the three PNGs into ``folder``; returns their names. ImportError when matplotlib is absent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = ok_rows(report)
    files = []
    if not rows:
        return files
    names = [f"{r['backend']}\n{r['precision']} S={r['frames']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4.5))
    bottom = np.zeros(len(rows))
    for s in STAGES:
        values = np.array([p50(r["stages"][s]["host_ms"]) or 0.0 for r in rows])
        ax.bar(names, values, bottom=bottom, label=STAGE_TITLES[s])
        bottom += values
    ax.set_ylabel("p50 ms (host)")
    ax.set_title("Scene latency per stage")
    ax.legend(fontsize=7, loc="upper left")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(folder / "stages.png", dpi=110)
    plt.close(fig)
    files.append("stages.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({label(r) for r in rows}):
        pts = sorted((r["frames"], p50(r["scene_ms"]["host_ms"])) for r in rows if label(r) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax.set_xlabel("frames S")
    ax.set_ylabel("scene p50 ms")
    ax.set_title("Scene latency against frame count")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "latency_vs_frames.png", dpi=110)
    plt.close(fig)
    files.append("latency_vs_frames.png")

    outputs = list(rows[0]["parity"]["units"])
    grid = np.array([[r["parity"]["units"].get(o, {}).get("rel_l2", np.nan) for o in outputs] for r in rows])
    logs = np.log10(np.clip(grid, 1e-12, None))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(outputs)), max(2.5, 0.45 * len(rows) + 1.5)))
    im = ax.imshow(logs, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(outputs)), outputs, rotation=70, fontsize=6)
    ax.set_yticks(range(len(rows)), [n.replace("\n", " ") for n in names], fontsize=7)
    for i in range(len(rows)):
        for j in range(len(outputs)):
            ax.text(j, i, f"{logs[i, j]:.0f}", ha="center", va="center", fontsize=5, color="w")
    fig.colorbar(im, ax=ax, label="log10 rel-L2 vs FP32 reference")
    ax.set_title("Parity per unit output")
    fig.tight_layout()
    fig.savefig(folder / "parity_heatmap.png", dpi=110)
    plt.close(fig)
    files.append("parity_heatmap.png")
    return files


def write_report(out: str | Path, report: dict, plots: bool = True) -> dict[str, Path]:
    """Write plots (unless ``plots`` is False: the previous ones stay), report.md and report.json into ``out``
    (staged, then moved into place, report.json last)."""
    out = atomic.ensure_dir(out, "Benchmark output folder")
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        folder = staging / PLOTS
        folder.mkdir()
        if plots:
            try:
                files = write_plots(report, folder)
                report["plots"] = {"files": [f"{PLOTS}/{f}" for f in files],
                                   "skipped": None if files else "no measured row"}
            except ImportError as exc:
                report["plots"] = {"files": [], "skipped": f"matplotlib is not installed ({exc}); pip install "
                                                           "'vidllm-edge[bench]' to get the plots"}
        (staging / REPORT_MD).write_text(markdown(report))
        (staging / REPORT_JSON).write_text(json.dumps(report, indent=1, default=str))
        written = {}
        target = out / PLOTS
        if plots and report["plots"]["files"]:
            if target.exists():
                shutil.rmtree(target)
            folder.replace(target)
            written[PLOTS] = target
        for name in (REPORT_MD, REPORT_JSON):
            (staging / name).replace(out / name)
            written[name] = out / name
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
