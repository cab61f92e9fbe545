"""Validation of an exported graph against the reference, on ONNX Runtime CPU.

Order: output names, then shapes, then values (max-abs, relative L2, cosine per output). Every failing
output is listed in one `ValidationError`. Inputs are real: frames of the synthetic scene and natural
photographs (scikit-image's, when installed), pushed through the reference units to get each unit's feed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vidllm_edge.errors import VidLLMError
from vidllm_edge.export.specs import ExportSpec, Tolerance
from vidllm_edge.optional import require


class ValidationError(VidLLMError):
    """An exported graph does not reproduce the reference."""


@dataclass
class Row:
    unit: str
    size: int
    output: str
    shape: list[int]
    max_abs: float
    rel_l2: float
    cosine: float
    ok: bool
    reason: str = ""


def metrics(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """max |a-b|, ||a-b|| / ||a||, cosine(a, b), computed in float64."""
    a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    diff = a - b
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    rel = float(np.linalg.norm(diff) / norm_a) if norm_a > 0 else float(np.linalg.norm(diff))
    cos = float(a @ b / (norm_a * norm_b)) if norm_a > 0 and norm_b > 0 else float(norm_a == norm_b)
    return float(np.abs(diff).max(initial=0.0)), rel, cos


def compare(unit: str, size: int, ref: dict[str, torch.Tensor], got: dict[str, np.ndarray],
            tol: Tolerance) -> list[Row]:
    """Rows for every reference output: names, then shapes, then values against ``tol``."""
    rows = []
    for name, value in ref.items():
        r = value.detach().float().cpu().numpy()
        if name not in got:
            rows.append(Row(unit, size, name, list(r.shape), float("nan"), float("nan"), float("nan"), False,
                            "missing from the graph's outputs"))
            continue
        g = np.asarray(got[name], dtype=np.float32)
        if g.shape != r.shape:
            rows.append(Row(unit, size, name, list(g.shape), float("nan"), float("nan"), float("nan"), False,
                            f"shape {list(g.shape)}, reference {list(r.shape)}"))
            continue
        max_abs, rel, cos = metrics(r, g)
        ok = bool(np.isfinite(g).all() and rel <= tol.rel_l2 and cos >= tol.cosine)
        reason = "" if ok else f"rel-L2 {rel:.2e} (gate {tol.rel_l2:g}), cosine {cos:.6f} (gate {tol.cosine:g})"
        rows.append(Row(unit, size, name, list(r.shape), max_abs, rel, cos, ok, reason))
    return rows


def run_onnx(path: Path, feed: dict[str, torch.Tensor], providers: list[str] | None = None) -> dict[str, np.ndarray]:
    ort = require("onnxruntime", "ONNX validation")
    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {k: v.detach().cpu().numpy() for k, v in feed.items()})
    return dict(zip(names, values))


def table(rows: list[Row]) -> str:
    """A fixed-width table a person reads first."""
    lines = [f"{'unit':13} {'S':>3} {'output':18} {'max-abs':>9} {'rel-L2':>9} {'cosine':>10}  status"]
    for r in rows:
        status = "ok" if r.ok else f"FAIL: {r.reason}"
        lines.append(f"{r.unit:13} {r.size:>3} {r.output:18} {r.max_abs:>9.2e} {r.rel_l2:>9.2e} {r.cosine:>10.7f}  {status}")
    return "\n".join(lines)


def check(rows: list[Row], subject: str) -> None:
    """Raise one ValidationError naming every failing output."""
    bad = [r for r in rows if not r.ok]
    if bad:
        listing = "; ".join(f"{r.output} at size {r.size}: {r.reason}" for r in bad)
        raise ValidationError(subject, f"{len(bad)} output(s) differ from the reference: {listing}.",
                              "Re-export in fp32 to isolate precision, or pass --no-validate to keep the files "
                              "(not recommended).")


def rows_to_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


# ----------------------------------------------------------------------------------------- real inputs


def real_frames(count: int, image_hw: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """``count`` real RGB frames [count, 3, H, W] in [0, 1]: natural photographs first, then synthetic frames."""
    import cv2

    from vidllm_edge.synthetic import render_frames

    photos = []
    try:
        from skimage import data

        for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
            photos.append(getattr(data, name)())
    except ImportError:
        pass
    if len(photos) < count:
        scene = render_frames(num_frames=max(2, count - len(photos)), width=224, height=168, seed=seed)
        photos += list(scene.rgb)
    h, w = image_hw
    out = []
    for img in photos[:count]:
        img = np.asarray(img)[..., :3]
        scale = max(h / img.shape[0], w / img.shape[1])
        resized = cv2.resize(img, (max(w, round(img.shape[1] * scale)), max(h, round(img.shape[0] * scale))),
                             interpolation=cv2.INTER_AREA)
        top, left = (resized.shape[0] - h) // 2, (resized.shape[1] - w) // 2
        out.append(resized[top:top + h, left:left + w])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0  # [S, H, W, 3] -> [S, 3, H, W]


def real_feeds(model, image_hw: tuple[int, int], size: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Every vision unit's feed at dynamic size ``size``, computed by the reference on real frames."""
    from vidllm_edge.models.camera import pose_encoding_to_extri_intri
    from vidllm_edge.runtime.pipeline import patch_points
    from vidllm_edge.runtime.torch_backend import torch_units
    from vidllm_edge.units import FEATURE_NAMES

    units = torch_units(model, image_hw)
    images = real_frames(size, image_hw, seed)
    per = units["perception"]({"images": images})
    geo = units["geometry"]({"t_geom": per["t_geom"]})
    extr, intr = pose_encoding_to_extri_intri(geo["pose_enc"], image_hw)
    points = patch_points(geo["depth"], intr, extr, model.cfg.patch_size).float()
    t3d = units["lift_project"]({"t_lang": per["t_lang"], "points": points})["t3d"]
    tokens = t3d.reshape(-1, t3d.shape[-1])[: max(1, size * 7)]  # [M, C] real scene tokens
    with torch.inference_mode():
        visual = units["projector"]({"tokens": tokens})["visual"]
        hidden = model.llm(inputs_embeds=visual[None], output_hidden_states=True).hidden_states[-1][0]  # [M, D]
    return {
        "perception": {"images": images},
        "geometry": {"t_geom": per["t_geom"]},
        "metric_depth": {n: per[n] for n in FEATURE_NAMES},
        "lift_project": {"t_lang": per["t_lang"], "points": points},
        "projector": {"tokens": tokens},
        "box_head": {"hidden": hidden[:size].float()},
    }


def validate_unit(spec: ExportSpec, model, image_hw: tuple[int, int], path: Path, precision: str,
                  sizes: tuple[int, ...], feeds: dict[int, dict[str, dict[str, torch.Tensor]]]) -> list[Row]:
    """Run ``path`` and the reference on real feeds at each size; return the comparison rows."""
    from vidllm_edge.runtime.torch_backend import torch_units

    unit = torch_units(model, image_hw)[spec.name]
    rows = []
    for size in sizes:
        feed = feeds[size][spec.name]
        ref = unit(feed)
        rows += compare(spec.name, size, ref, run_onnx(path, feed), spec.tolerances[precision])
    return rows
