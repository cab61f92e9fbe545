"""INT8 Q/DQ of every vision unit of the tiny preset on this CPU machine: calibration, sensitivity, policy,
and the whole pipeline end to end with the INT8 graphs the policy kept.

    python -m vidllm_edge.benchmarks.int8_cpu_report --out benchmarks/results

Exports the tiny preset (FP32, 70x84 frames, the LLM too), records calibration inputs from two
synthetic room videos (texture seeds 0 and 1, 8 frames each), and quantizes every vision unit with
ONNX Runtime (symmetric int8, per-channel weights, Q/DQ on MatMul/Conv/Gemm inputs, attention FP).
Metrics are INT8 against the FP32 graph on ONNX Runtime CPU, on the calibration frames and on
held-out frames (the frames halfway between the calibration frames, and six photographs). Also
measured: each unit fully quantized with attention's activation matmuls quantized too, and a thin
calibration (one video, 4 frames) that gives the policy work.

End to end: a third synthetic video (texture seed 2, never calibrated on) goes through the torch FP32
reference, the FP32 export on ONNX Runtime CPU, the same export with every vision unit the policy kept
replaced by its ``onnx/<unit>.int8.onnx``, and with each of those alone (which unit moves the answer);
the LLM stays the FP32 ONNX decoder (it is quantized weight-only elsewhere). Reported against the
reference: depth, world_points and metric depth (rel-L2, AbsRel, δ<1.25), the metric scale, the camera
translations, the pooled visual tokens, and the greedy answers to three questions: free-running token
agreement (equal count, first divergence) and teacher-forced top-1 agreement and logit cosine (the
reference's tokens fed, so positions after a first flip still compare). The LLM's own sensitivity is
the yardstick: the reference scene's visual tokens with 1 % Gaussian noise, same measures.

Random weights: activation statistics are not a trained model's, so the numbers show the machinery
and its failure modes, not the INT8 accuracy of the real model. The LLM's matrices are drawn wider
(std 0.35, as in tests/export) so greedy logit margins are real and a token flip means something. No
speed is measured: INT8 is judged for speed on the GPU. Writes int8_cpu_tiny.json and int8_cpu_tiny.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidllm_edge import atomic
from vidllm_edge.calibration.quantize import UnitQuantizer, metrics_table, output_metrics, quantize_export
from vidllm_edge.calibration.record import record_calibration, state_fingerprint
from vidllm_edge.export.exporter import ALL_UNITS, FrameProfile, export_model
from vidllm_edge.models.model import build_model
from vidllm_edge.optional import require
from vidllm_edge.synthetic import write_scene

HW = (70, 84)
FRAMES = 8  # the pipeline's S for calibration and end to end
QUESTIONS = ("Where is the red box?", "How many boxes are there?", "What is next to the door?")
NEW_TOKENS = 24
NOISE_REL = 1e-2  # the LLM-alone probe: visual tokens + this relative RMS of Gaussian noise
COMMAND = "python -m vidllm_edge.benchmarks.int8_cpu_report --out benchmarks/results"


def report_model():
    """The tiny preset (seed 0) with the LLM's matrices redrawn N(0, 0.35): real greedy logit margins."""
    model = build_model("tiny", seed=0)
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.35, generator=torch.Generator().manual_seed(p.numel()))
    return model.eval()


def export_and_calibrate(model, work: Path, log, units: tuple[str, ...] = ALL_UNITS) -> dict[str, Any]:
    """FP32 export of ``units`` (frames 1-4-8, 70x84) and two calibration folders: ``calib`` (2 videos x 8
    frames) and ``calib_thin`` (1 video x 4 frames); held out: in-between frames and 6 photographs."""
    export = work / "export"
    t0 = time.perf_counter()
    export_model(model, export, frames=FrameProfile(1, 4, FRAMES), image_hw=HW, units=units, validate=False,
                 source={"model": "preset:tiny (random weights, seed 0, LLM matrices N(0, 0.35))",
                         "state_sha256": state_fingerprint(model)}, log=log)
    t_export = time.perf_counter() - t0
    videos = [write_scene(work / f"scene{seed}", num_frames=24, width=112, height=84, seed=seed)[0] for seed in (0, 1)]
    record_calibration(model, videos[:1], 4, work / "calib_thin", image_hw=HW, log=log)
    t0 = time.perf_counter()
    record_calibration(model, videos, FRAMES, work / "calib", image_hw=HW, log=log)
    return {"export": export, "calib": work / "calib", "calib_thin": work / "calib_thin", "videos": videos,
            "seconds": {"export": round(t_export, 1), "record": round(time.perf_counter() - t0, 1)}}


# -- INT8 graphs in the pipeline -------------------------------------------------------------------------------

def int8_units(export_dir: str | Path, base: dict, providers: list[str] | None = None) -> dict:
    """``base`` (unit name -> backend) with every unit that has ``onnx/<unit>.int8.onnx`` replaced by that
    Q/DQ graph on ONNX Runtime (same spec, same fixed dims); the others are kept as given."""
    from vidllm_edge.runtime.ort_backend import OrtUnit

    out = dict(base)
    for name, unit in base.items():
        path = Path(export_dir) / "onnx" / f"{name}.int8.onnx"
        if path.is_file():
            out[name] = OrtUnit(unit.spec, path, providers or ["CPUExecutionProvider"], unit.bound)
    return out


def int8_pipeline(export_dir: str | Path, num_frames: int | None = None, generation=None,
                  only: tuple[str, ...] | None = None):
    """A Pipeline over an FP32 export folder on ONNX Runtime CPU in which each vision unit with an INT8 graph
    (from `quantize_export`; only those in ``only`` if given) runs that graph, the box head in the decoder
    included; the LLM is the export's FP32 decoder."""
    from vidllm_edge.models.tokenizer import load_tokenizer
    from vidllm_edge.runtime.ort_backend import load_export
    from vidllm_edge.runtime.ort_llm import OrtDecoder
    from vidllm_edge.runtime.pipeline import Pipeline

    folder = Path(export_dir)
    bundle = load_export(folder)
    fp32 = bundle.units_for(bundle.image_hw)
    units = {name: unit if only is None or name in only else fp32[name]
             for name, unit in int8_units(folder, fp32).items()}
    tokenizer = load_tokenizer(folder)

    def box_fn(hidden):
        return units["box_head"]({"hidden": torch.as_tensor(hidden).float().reshape(1, -1)})["boxes"]

    def decoder_factory():
        return OrtDecoder(folder / "onnx", tokenizer, bundle.cfg.llm, box_fn=box_fn,
                          providers=["CPUExecutionProvider"])

    def units_for(hw):
        assert tuple(hw) == bundle.image_hw, f"units were exported for {bundle.image_hw}, asked for {hw}"
        return units

    return Pipeline(None, backend="onnxruntime-int8", num_frames=num_frames, generation=generation, cfg=bundle.cfg,
                    units_for=units_for, decoder_factory=decoder_factory, image_hw=bundle.image_hw)


def int8_unit_names(pipeline, image_hw=HW) -> list[str]:
    """The units of ``pipeline`` that run an INT8 graph."""
    return sorted(n for n, u in pipeline.units(image_hw).items() if str(getattr(u, "path", "")).endswith(".int8.onnx"))


def token_agreement(ref: list[int], got: list[int]) -> dict[str, Any]:
    """Equal positions, and the first position where the sequences differ (None: identical)."""
    first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    if first is None and len(ref) != len(got):
        first = min(len(ref), len(got))
    return {"tokens": len(ref), "equal": sum(a == b for a, b in zip(ref, got)), "first_divergence": first}


@torch.inference_mode()
def forced_logits(decoder, question: str, token_ids: list[int]) -> torch.Tensor:
    """Logits [T, V] before each of ``token_ids`` when exactly those tokens are fed (teacher forcing).

    Free-running tokens stop being comparable after the first flip; fed the reference's answer, every
    position is compared with the same history. Uses the decoder's backend hooks (`Decoder`), and crops
    the cache back to the scene prefix, as `Decoder.stream` does.
    """
    ids, _ = decoder._question_ids(question)
    try:
        logits, _ = decoder._forward(decoder._embed(ids))
        rows = [logits.float().cpu()]
        for token in token_ids[:-1]:
            logits, _ = decoder._forward(decoder._embed([token]))
            rows.append(logits.float().cpu())
    finally:
        decoder._crop(decoder.prefix_len)
    return torch.stack(rows)


def forced_agreement(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Teacher-forced top-1 agreement (share of positions) and the lowest per-position logit cosine."""
    cos = torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=-1)
    return {"top1": float((ref.argmax(-1) == got.argmax(-1)).double().mean()), "min_logit_cosine": float(cos.min())}


def scene_parity(ref, got, voxel_size: float) -> dict[str, Any]:
    """Geometry and visual tokens of scene ``got`` against scene ``ref`` (metric units, after scale alignment;
    ``voxel_size`` in metres, the pooling's)."""
    out: dict[str, Any] = {}
    for name in ("depth", "world_points", "metric_depth", "depth_conf"):
        a, b = getattr(ref.geometry, name).numpy(), getattr(got.geometry, name).numpy()
        out[name] = output_metrics({"depth": "geometry", "metric_depth": "metric_depth"}.get(name, ""), name, a, b)
    out["scale"] = {"ref": ref.geometry.scale, "got": got.geometry.scale,
                    "rel_diff": abs(got.geometry.scale - ref.geometry.scale) / abs(ref.geometry.scale)}
    t_ref, t_got = ref.geometry.extrinsics[:, :, 3], got.geometry.extrinsics[:, :, 3]
    out["camera_translation"] = {"max_abs_m": float((t_ref - t_got).abs().max())}
    m_ref, m_got = ref.visual_tokens.shape[0], got.visual_tokens.shape[0]
    out["visual_tokens"] = {"ref": m_ref, "got": m_got}
    # The same voxels: as many, in the same (key) order, each centre (a mean of its points) within half a voxel.
    same = m_ref == m_got and float((ref.voxel_centres - got.voxel_centres).abs().max()) < voxel_size / 2
    if same:
        out["visual_tokens"].update(output_metrics("", "visual", ref.visual_tokens.numpy(), got.visual_tokens.numpy()))
    else:
        out["visual_tokens"]["note"] = "other voxels"
    return out


def _answers(scene, reference: list | None, gen) -> tuple[list, list[dict[str, Any]]]:
    """Free-running answers of ``scene`` and, against ``reference`` (answers, forced logits), their agreement."""
    answers = [scene.ask(q, gen) for q in QUESTIONS]
    if reference is None:
        return answers, []
    rows = []
    for q, (a, ref_logits), b in zip(QUESTIONS, reference, answers):
        forced = forced_agreement(ref_logits, forced_logits(scene.decoder, q, a.token_ids))
        rows.append(dict(question=q, **token_agreement(a.token_ids, b.token_ids), **forced, ref_text=a.text,
                         text=b.text, boxes=len(b.boxes)))
    return answers, rows


def end_to_end(model, export: Path, work: Path, log) -> dict[str, Any]:
    """The synthetic video through torch FP32, ONNX Runtime FP32 and ONNX Runtime with the INT8 graphs
    (all kept units, then each alone), and the LLM's own sensitivity to noise on its visual tokens."""
    from vidllm_edge.models.llm import GenerationConfig
    from vidllm_edge.runtime.pipeline import Pipeline

    video = write_scene(work / "scene_e2e", num_frames=48, width=160, height=120, seed=2)[0]
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS)
    ref_scene = Pipeline(model, num_frames=FRAMES).encode(video)
    ref_scene.decoder.eos_ids = set()  # fixed-length answers: every question compares NEW_TOKENS tokens
    ref_answers, _ = _answers(ref_scene, None, gen)
    reference = [(a, forced_logits(ref_scene.decoder, q, a.token_ids)) for q, a in zip(QUESTIONS, ref_answers)]
    kept = int8_unit_names(int8_pipeline(export, FRAMES))
    variants: dict[str, Any] = {"ort_fp32": Pipeline.from_export(export, num_frames=FRAMES),
                                "ort_int8": int8_pipeline(export, FRAMES)}
    variants.update({f"ort_int8_{u}_only": int8_pipeline(export, FRAMES, only=(u,)) for u in kept})
    result: dict[str, Any] = {
        "video": "write_scene(num_frames=48, 160x120, seed=2), never calibrated on", "frames": FRAMES,
        "new_tokens": NEW_TOKENS, "int8_units": kept, "voxel_size_m": model.cfg.scene.voxel_size,
        "reference": {"visual_tokens": int(ref_scene.visual_tokens.shape[0]),
                      "focal_px_finite": bool(torch.isfinite(ref_scene.geometry.intrinsics).all()),
                      "answers": [{"question": a.question, "text": a.text, "distinct_tokens": len(set(a.token_ids))}
                                  for a in ref_answers]},
        "pipelines": {}}
    for name, pipe in variants.items():
        print(f"end to end: {name} ...", file=log, flush=True)
        scene = pipe.encode(video)
        scene.decoder.eos_ids = set()
        result["pipelines"][name] = {"int8_units": int8_unit_names(pipe) if pipe.backend != "onnxruntime" else [],
                                     "scene": scene_parity(ref_scene, scene, model.cfg.scene.voxel_size),
                                     "answers": _answers(scene, reference, gen)[1]}
    # The LLM alone: the reference scene's visual tokens with Gaussian noise of 1 % relative RMS (INT8-sized).
    visual = ref_scene.visual_tokens
    noise = torch.randn(visual.shape, generator=torch.Generator().manual_seed(0)) * visual.pow(2).mean().sqrt()
    ref_scene.decoder.prefill_prefix(visual + NOISE_REL * noise)
    result["llm_noise_floor"] = {"relative_rms": NOISE_REL, "answers": _answers(ref_scene, reference, gen)[1]}
    ref_scene.decoder.prefill_prefix(visual)
    return result


# -- the report -------------------------------------------------------------------------------------------------

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
    model = report_model()
    setup = export_and_calibrate(model, work, log)
    export = setup["export"]
    thin = quantize_export(export, setup["calib_thin"], log=log)
    t0 = time.perf_counter()
    report = quantize_export(export, setup["calib"], log=log)  # the graphs it keeps are the ones used end to end
    t_quant = time.perf_counter() - t0
    report["thin_calibration"] = {"clips": thin["data"], "units": thin["units"]}
    report["attention_quantized"] = {u: _attention_variant(export, setup["calib"], u) for u in report["units"]}
    report["fp32_depth_heldout"] = _depth_spread(export, setup["calib"])
    t0 = time.perf_counter()
    report["end_to_end"] = end_to_end(model, export, work, log)
    report["seconds"] = dict(setup["seconds"], quantize=round(t_quant, 1),
                             end_to_end=round(time.perf_counter() - t0, 1))
    report["date"] = datetime.date.today().isoformat()
    report["versions"] = {"torch": torch.__version__, "onnxruntime": require("onnxruntime", "this report").__version__,
                          "onnx": require("onnx", "this report").__version__}
    report["command"] = COMMAND
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


def _label(name: str) -> str:
    if name == "ort_fp32":
        return "ONNX Runtime FP32"
    if name == "ort_int8":
        return "ONNX Runtime, every kept unit INT8"
    return f"ONNX Runtime, {name[len('ort_int8_'):-len('_only')]} INT8 alone"


def _e2e_lines(e2e: dict) -> list[str]:
    lines = ["| pipeline vs torch FP32 | depth rel-L2 | depth AbsRel | depth δ<1.25 | world_points rel-L2 | "
             "metric depth rel-L2 | scale rel. diff | camera t max-abs (m) | visual tokens M | visual rel-L2 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref_m = e2e["reference"]["visual_tokens"]
    for name, p in e2e["pipelines"].items():
        s = p["scene"]
        vt = s["visual_tokens"]
        m = f"{vt['got']}" + ("" if vt["got"] == ref_m else f" (ref {ref_m})")
        rel = f"{vt['rel_l2']:.1e}" if "rel_l2" in vt else vt["note"]
        lines.append(f"| {_label(name)} | {s['depth']['rel_l2']:.1e} | {s['depth']['abs_rel']:.1e} | "
                     f"{s['depth']['delta_1_25']:.4f} | {s['world_points']['rel_l2']:.1e} | "
                     f"{s['metric_depth']['rel_l2']:.1e} | {s['scale']['rel_diff']:.1e} | "
                     f"{s['camera_translation']['max_abs_m']:.1e} | {m} | {rel} |")
    n = e2e["new_tokens"]
    lines += ["", f"Answers ({len(QUESTIONS)} questions, {n} greedy tokens each): free-running tokens equal to the "
              "reference and the first divergence; teacher-forced (the reference's tokens fed): top-1 agreement and "
              "the lowest per-position logit cosine. Per question, in order.", "",
              "| pipeline | tokens equal | first divergence | forced top-1 | min logit cosine |",
              "|---|---|---|---|---|"]
    rows = [(_label(k), v["answers"]) for k, v in e2e["pipelines"].items()]
    floor = e2e["llm_noise_floor"]
    rows.append((f"torch FP32 LLM alone, visual tokens + {floor['relative_rms']:.0%} Gaussian noise", floor["answers"]))
    for label, answers in rows:
        lines.append(f"| {label} | " + ", ".join(f"{a['equal']}/{a['tokens']}" for a in answers) + " | "
                     + ", ".join("none" if a["first_divergence"] is None else str(a["first_divergence"])
                                 for a in answers) + " | "
                     + ", ".join(f"{a['top1']:.2f}" for a in answers) + " | "
                     + ", ".join(f"{a['min_logit_cosine']:.4f}" for a in answers) + " |")
    lines += ["", "Reference answers (torch FP32) and the all-INT8 pipeline's:", ""]
    int8 = e2e["pipelines"]["ort_int8"]["answers"]
    for ref, got in zip(e2e["reference"]["answers"], int8):
        same = got["first_divergence"] is None
        lines.append(f"- {ref['question']} reference `{_clean(ref['text'])}`"
                     + (" (INT8: the same)" if same else f"; INT8 `{_clean(got['text'])}`"))
    moved = [(k, v["scene"]) for k, v in e2e["pipelines"].items() if "note" in v["scene"]["visual_tokens"]]
    if moved:
        lines += ["", "Pipelines whose pooled scene differs from the reference's (other voxels): " + "; ".join(
            f"{_label(k)}: M {s['visual_tokens']['got']} vs {ref_m}, cameras moved up to "
            f"{s['camera_translation']['max_abs_m']:.2f} m" for k, s in moved)
            + f" (voxel {e2e['voxel_size_m']} m). Voxel pooling is discontinuous in the points: a camera shift of "
            "a fraction of a voxel moves points across voxel boundaries, and the LLM then reads another set of "
            "visual tokens. The per-unit INT8 gate does not bound this."]
    return lines


def _clean(text: str) -> str:
    return "".join(c if c.isprintable() and c not in "|`" else "·" for c in text)


def markdown(r: dict) -> str:
    gate = r["gate"]
    lines = [
        "# INT8 Q/DQ on CPU: tiny preset, every vision unit, and end to end (random weights)", "",
        f"{r['date']}, torch {r['versions']['torch']}, onnxruntime {r['versions']['onnxruntime']}, onnx "
        f"{r['versions']['onnx']}, frames {HW[0]}x{HW[1]}. Command: `{r['command']}`.", "",
        "Calibration: 2 synthetic room videos x 8 frames (pipeline sampling). Held out: the 7 "
        "frames halfway between them per video + 6 photographs (scikit-image). Metrics: INT8 vs the FP32 graph on "
        "ONNX Runtime CPU, pooled over each split.", "",
        f"Quantization ({r['method']}): symmetric int8 activations (zero point 0) and per-channel int8 weights, "
        "Q/DQ on MatMul/Conv/Gemm inputs only, biases FP32, attention's activation matmuls FP (TensorRT 10 "
        f"explicit-quantization layout). TensorRT 10 lint of the kept graphs: {_lint_summary(r['units'])}. "
        "Why ONNX Runtime's quantizer and not modelopt: `int8_method_compare_tiny.md`.", "",
        f"Gate on every output, calibration and held-out: cosine >= {gate['cosine']}, rel-L2 <= {gate['rel_l2']}, "
        f"depth AbsRel <= {gate['depth_abs_rel']}, depth δ<1.25 >= {gate['depth_delta']} (depth = geometry.depth, "
        "metric_depth.metric_depth).", "",
        "## Policy: which units keep INT8", ""] + _decisions(r["units"])
    e2e = r["end_to_end"]
    lines += ["", "## End to end on a synthetic video", "",
              f"Video: {e2e['video']}; {e2e['frames']} frames. The torch FP32 reference against the FP32 export on "
              "ONNX Runtime CPU, the same export with every INT8 graph the policy kept "
              f"({', '.join(e2e['int8_units'])}), and with each of them alone; the LLM is the FP32 ONNX decoder in "
              "all of them. Geometry after metric scale alignment. Answers: greedy, end-of-sequence ignored so every "
              "position is compared; distinct tokens per reference answer: "
              f"{', '.join(str(a['distinct_tokens']) for a in e2e['reference']['answers'])}."
              + ("" if e2e["reference"]["focal_px_finite"] else " Random weights: the camera head predicts a zero "
                 "field of view (infinite focal length), so each frame's patches back-project onto one ray and the "
                 f"pooled scene is a few voxels along the camera path (M = {e2e['reference']['visual_tokens']})."), ""]
    lines += _e2e_lines(e2e)
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
    sec = r["seconds"]
    lines += ["", f"Time on 2 cores: export {sec['export']} s (all units, the LLM included), recording {sec['record']} "
              f"s, sensitivity + policy + final graphs {sec['quantize']} s, end to end (3 pipelines, 3 questions) "
              f"{sec['end_to_end']} s. Not measured: speed (judged on the GPU)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--verbose", action="store_true", help="print the progress log")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    log = sys.stderr if args.verbose else io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        report = run(Path(tmp), log)
    out = atomic.ensure_dir(args.out)
    atomic.write_text(out / "int8_cpu_tiny.json", json.dumps(report, indent=2, default=_jsonable))
    atomic.write_text(out / "int8_cpu_tiny.md", markdown(report))
    print(markdown(report))
    return 0


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


if __name__ == "__main__":
    raise SystemExit(main())
