"""What `vidllm-edge run` leaves behind: answers.json, geometry.npz, points.ply and depth PNGs.

Everything is first written into a hidden staging folder inside the output folder and moved into place
only when all files are complete, so a failure never leaves a half-written set.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidllm_edge import atomic
from vidllm_edge.models.lift import backproject_depth
from vidllm_edge.models.llm import Answer
from vidllm_edge.runtime import outputs
from vidllm_edge.runtime.pipeline import Scene, images_to_uint8

MAX_PLY_POINTS = 200_000
CONF_QUANTILE = 0.3  # drop the least confident 30% of pixels from the point cloud


def scene_points(scene: Scene, max_points: int = MAX_PLY_POINTS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Metric, coloured points: metric depth back-projected with the metric cameras, confident pixels only."""
    geo = scene.geometry
    pts = backproject_depth(geo.depth, geo.intrinsics, geo.extrinsics)  # [S, H, W, 3]
    conf = geo.depth_conf
    keep = conf >= torch.quantile(conf.flatten().float(), CONF_QUANTILE) if conf.numel() > 1 else torch.ones_like(conf, dtype=torch.bool)
    keep &= torch.isfinite(pts).all(-1)
    colours = images_to_uint8(scene.images)  # [S, H, W, 3]
    mask = keep.numpy()
    return outputs.subsample_points(pts.numpy()[mask].astype(np.float32), colours[mask], max_points, seed=seed)


def write_run_outputs(out_dir: str | Path, scene: Scene, answers: list[Answer], meta: dict[str, Any]) -> dict[str, Path]:
    """Write every artifact of a run into ``out_dir``; returns name -> final path."""
    out_dir = atomic.ensure_dir(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        geo = scene.geometry
        report = dict(meta)
        report.update({
            "frames": {"count": scene.num_frames, "indices": scene.frames.indices, "total": scene.frames.total,
                       "size_hw": list(scene.images.shape[-2:]), "warnings": scene.frames.warnings},
            "scale_m_per_unit": geo.scale,
            "visual_tokens": int(scene.visual_tokens.shape[0]),
            "timings_ms": {"scene": scene.timings},
            "answers": [a.to_dict() for a in answers],
        })
        outputs.write_json(staging / "answers.json", report)
        outputs.write_npz(staging / "geometry.npz",
                          depth=geo.depth.numpy(), depth_conf=geo.depth_conf.numpy(),
                          intrinsics=geo.intrinsics.numpy(), extrinsics=geo.extrinsics.numpy(),
                          pose_enc=geo.pose_enc.numpy(), scale=np.float64(geo.scale),
                          per_frame_scale=geo.per_frame_scale.numpy(), metric_depth=geo.metric_depth.numpy(),
                          metric_frame_ids=geo.metric_frame_ids.numpy(),
                          frame_indices=np.asarray(scene.frames.indices))
        points, colours = scene_points(scene)
        outputs.write_ply(staging / "points.ply", points, colours)
        outputs.write_depth_pngs(staging / "depth", geo.depth.numpy())
        return _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out_dir: Path) -> dict[str, Path]:
    """Move the complete staged set into ``out_dir`` (renames within one file system)."""
    written = {}
    for item in sorted(staging.iterdir()):
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
        written[item.name] = target
    return written
