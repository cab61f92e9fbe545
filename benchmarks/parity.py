"""Parity of a benchmark row against the FP32 torch reference, and the pass/fail gate per precision.

Three levels, all against the reference run on the same frames:

* unit outputs: every vision unit fed the reference's own inputs for that unit, so each number is the
  unit's own error: max-abs, relative L2, cosine (``calibration.quantize.output_metrics``), plus AbsRel and
  δ<1.25 for the depth outputs (``geometry.depth``, ``metric_depth.metric_depth``);
* the scene, chained as the pipeline runs it: metric depth (AbsRel, δ<1.25), camera poses (rotation angle in
  degrees, camera-centre distance in metres, per frame), the metric scale, the visual tokens (when their count
  matches) and the answer's tokens (agreement and the first position that differs);
* the decoder alone: the row's decoder answering from the reference's visual tokens.

Gates (``--gate PRECISION:KEY=VALUE``): ``rel_l2``, ``cosine``, ``max_abs``, ``abs_rel``, ``delta_1_25`` apply
to every unit output; ``rot_deg`` and ``trans_m`` to the worst frame's pose; ``token_agreement`` to the answer.
Defaults: the export's FP32/FP16 tolerances and the INT8 calibration gate. Random-weight models have near-flat
logits, so answers of two correct implementations part at the first near-tie: token agreement is reported, and
gated only when asked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from vidllm_edge.runtime.backend import Backend

# Gate keys and which way is good.
GATE_KEYS = {"rel_l2": "max", "cosine": "min", "max_abs": "max", "abs_rel": "max", "delta_1_25": "min",
             "rot_deg": "max", "trans_m": "max", "token_agreement": "min"}


def default_gates() -> dict[str, dict[str, float]]:
    """The parity gate per precision: the export's FP tolerances and the INT8 calibration gate."""
    from vidllm_edge.calibration.quantize import INT8_GATE
    from vidllm_edge.export.specs import FP_TOL

    return {"fp32": {"rel_l2": FP_TOL["fp32"].rel_l2, "cosine": FP_TOL["fp32"].cosine},
            "fp16": {"rel_l2": FP_TOL["fp16"].rel_l2, "cosine": FP_TOL["fp16"].cosine},
            "int8": {"rel_l2": INT8_GATE.rel_l2, "cosine": INT8_GATE.cosine, "abs_rel": INT8_GATE.depth_abs_rel,
                     "delta_1_25": INT8_GATE.depth_delta}}


class Recording(Backend):
    """Passes calls to ``unit`` and keeps a CPU copy of the last feed and outputs (the reference's)."""

    def __init__(self, unit: Backend) -> None:
        super().__init__(unit.spec, unit.bound)
        self.unit = unit
        self.last_feed: dict[str, torch.Tensor] = {}
        self.last_outputs: dict[str, torch.Tensor] = {}

    def __call__(self, feed):
        out = self.unit(feed)
        self.last_feed = {k: v.detach().float().cpu().clone() for k, v in feed.items()}
        self.last_outputs = {k: v.detach().float().cpu().clone() for k, v in out.items()}
        return out


@dataclasses.dataclass
class Reference:
    """The FP32 torch reference at one frame count: each unit's feed and outputs, the scene, the answer."""

    feeds: dict[str, dict[str, torch.Tensor]]
    outputs: dict[str, dict[str, torch.Tensor]]
    depth: np.ndarray        # [S, H, W] metric depth
    extrinsics: np.ndarray   # [S, 3, 4] world-to-camera, metric
    scale: float
    visual: torch.Tensor     # [M, C_llm]
    answer: list[int]
    question_tokens: int

    @classmethod
    def from_run(cls, recording: dict[str, Recording], scene, answer, question_tokens: int) -> "Reference":
        geo = scene.geometry
        return cls(feeds={n: r.last_feed for n, r in recording.items()},
                   outputs={n: r.last_outputs for n, r in recording.items()},
                   depth=geo.depth.float().cpu().numpy(), extrinsics=geo.extrinsics.float().cpu().numpy(),
                   scale=float(geo.scale), visual=scene.visual_tokens.detach().float().cpu(),
                   answer=list(answer.token_ids), question_tokens=question_tokens)


def pose_error(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Rotation angle (degrees) and camera-centre distance (metres) between extrinsics [S, 3, 4], per frame.

    The angle comes from the chordal distance, ||R0 - R1||_F = 2√2 sin(θ/2), which stays exact near zero
    (arccos of the trace loses ~0.02° to float32 rounding there).
    """
    r0, r1 = ref[:, :3, :3].astype(np.float64), got[:, :3, :3].astype(np.float64)
    chord = np.linalg.norm(r0 - r1, axis=(1, 2)) / (2 * np.sqrt(2))
    deg = np.degrees(2 * np.arcsin(np.clip(chord, 0.0, 1.0)))
    c0 = -np.einsum("sji,sj->si", r0, ref[:, :3, 3].astype(np.float64))  # camera centre -R^T t
    c1 = -np.einsum("sji,sj->si", r1, got[:, :3, 3].astype(np.float64))
    dist = np.linalg.norm(c1 - c0, axis=1)
    return {"rot_deg_mean": float(deg.mean()), "rot_deg_max": float(deg.max()), "trans_m_mean": float(dist.mean()),
            "trans_m_max": float(dist.max())}


def token_agreement(ref: list[int], got: list[int]) -> dict[str, Any]:
    """Share of positions with the same token and the first position that differs (None: identical)."""
    n = max(len(ref), len(got))
    same = [a == b for a, b in zip(ref, got)]
    first = same.index(False) if False in same else (None if len(ref) == len(got) else len(same))
    return {"agreement": sum(same) / n if n else 1.0, "first_divergence": first, "tokens": n}


def measure_parity(ref: Reference, units: dict[str, Backend], scene, answer, decoder, question: str, gen,
                   device: torch.device) -> dict[str, Any]:
    """Unit, scene and decoder-alone parity of a row (see the module docstring)."""
    from vidllm_edge.calibration.quantize import output_metrics

    result: dict[str, Any] = {"units": {}}
    for name, outputs in ref.outputs.items():
        got = units[name](ref.feeds[name])
        for output, value in outputs.items():
            result["units"][f"{name}.{output}"] = output_metrics(
                name, output, value.numpy(), got[output].detach().float().cpu().numpy())
    geo = scene.geometry
    visual = scene.visual_tokens.detach().float().cpu()
    with torch.inference_mode():
        decoder.prefill_prefix(ref.visual.to(device))
        alone = [a for _, a in decoder.stream(question, gen) if a is not None][-1]
    result["scene"] = {
        "metric_depth": output_metrics("geometry", "depth", ref.depth, geo.depth.detach().float().cpu().numpy()),
        "pose": pose_error(ref.extrinsics, geo.extrinsics.detach().float().cpu().numpy()),
        "scale_rel": abs(float(geo.scale) - ref.scale) / ref.scale if ref.scale else None,
        "visual_tokens": {"count": int(visual.shape[0]), "reference": int(ref.visual.shape[0]),
                          **(output_metrics("projector", "visual", ref.visual.numpy(), visual.numpy())
                             if visual.shape == ref.visual.shape else {})},
        "answer_tokens": token_agreement(ref.answer, list(answer.token_ids)),
        "decoder_tokens": token_agreement(ref.answer, list(alone.token_ids)),
    }
    return result


def check_gate(parity: dict[str, Any], thresholds: dict[str, float]) -> list[str]:
    """Every threshold a row's parity breaks, as readable lines (NaN breaks every threshold)."""
    failures = []

    def check(what: str, key: str, value: float | None) -> None:
        if key not in thresholds or value is None:
            return
        limit = thresholds[key]
        ok = value <= limit if GATE_KEYS[key] == "max" else value >= limit
        if not ok:
            failures.append(f"{what} {key} {value:.4g} {'>' if GATE_KEYS[key] == 'max' else '<'} {limit:g}")

    for output, m in parity["units"].items():
        for key in ("rel_l2", "cosine", "max_abs", "abs_rel", "delta_1_25"):
            check(output, key, m.get(key))
    scene = parity.get("scene") or {}
    check("scene pose", "rot_deg", (scene.get("pose") or {}).get("rot_deg_max"))
    check("scene pose", "trans_m", (scene.get("pose") or {}).get("trans_m_max"))
    check("answer tokens", "token_agreement", (scene.get("answer_tokens") or {}).get("agreement"))
    return failures
