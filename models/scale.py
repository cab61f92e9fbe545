"""Scale alignment (DESIGN.md §1 row ``scale``): bring VGGT's normalised geometry to metres.

Per metric frame i, s_i = argmin_s Σ w (s·depth − D_metric)² = Σ w·d·m / Σ w·d² over valid pixels
(finite, depth > 0, metric > 0, weight > 0; w = depth confidence), and s = median_i s_i. The median over
frames makes the fit robust to a bad frame.

Our decision (it refines DESIGN's "w = depth_conf"): a frame can itself hold many outlier pixels (sky,
reflections, edges where the metric-depth model hallucinates). Plain WLS is pulled by them, so by
default the per-frame fit is followed by ``robust_iters`` rounds of trimming: relative residuals
r = s·d/m − 1 are centred at their median, pixels farther than ``trim_k``·1.4826·MAD (a robust σ) are
dropped, and the WLS is refit on the rest with the confidence weights unchanged. Relative residuals,
because depth errors grow with distance. A median-centred window keeps about half of the valid pixels
at the very least (median and MAD come from a fixed-stride sample on large frames), and when most
pixels agree exactly they all sit at the median and are kept, so an exact fit stays exact.
Rounds stop early once the kept set no longer changes. ``robust_iters=0`` gives the plain WLS of
DESIGN.md. This runs in the runtime (data-dependent masks and medians), not in an engine.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vidllm_edge.errors import InputError

MAD_TO_SIGMA = 1.4826  # σ of a normal distribution = 1.4826 · MAD
STATS_PIXELS = 1 << 16  # median and MAD per frame from at most ~this many pixels (a fixed stride)


class ScaleFit(NamedTuple):
    """Result of `align_scale`: metres per network unit."""

    scale: torch.Tensor       # 0-d, median of the per-frame scales
    per_frame: torch.Tensor   # [S_m], NaN for a frame without a valid pixel
    frame_ids: torch.Tensor   # [S_m] int64, frames of ``depth`` the fit used
    inliers: torch.Tensor     # [S_m] int64, pixels used by the final per-frame fit


def metric_frame_ids(num_frames: int, max_frames: int) -> torch.Tensor:
    """Evenly spaced frame indices for metric depth: int64 [min(num_frames, max_frames)].

    Sorted, unique, deterministic; the first and last frame are included (only the first when
    ``max_frames`` is 1). Index i is round(i·(S−1)/(m−1)), computed in integers.
    """
    if num_frames < 1 or max_frames < 1:
        raise InputError(f"Frame counts: S={num_frames}, max_frames={max_frames}", "must both be at least 1.",
                         "Sample at least one frame and allow at least one metric-depth frame.")
    m = min(num_frames, max_frames)
    if m == 1:
        return torch.zeros(1, dtype=torch.long)
    i = torch.arange(m, dtype=torch.long)
    # round(i·(S−1)/(m−1)) = floor((2·i·(S−1) + (m−1)) / (2·(m−1))); the step is ≥ 1, so no duplicates.
    return torch.div(2 * i * (num_frames - 1) + (m - 1), 2 * (m - 1), rounding_mode="floor")


def _select(name: str, x: torch.Tensor, frame_ids: torch.Tensor, s_m: int) -> torch.Tensor:
    """``x`` holds either the S_m metric frames already or all S frames (then ``x[frame_ids]``)."""
    if x.shape[0] == s_m:
        return x
    if int(frame_ids.min()) < 0 or int(frame_ids.max()) >= x.shape[0]:
        raise InputError(f"Input tensor: {name}", f"has {x.shape[0]} frames; frame_ids reach {int(frame_ids.max())}.",
                         "Pass all S frames, or exactly the S_m frames that frame_ids selects.")
    return x[frame_ids]


def _check(depth, metric, weights, frame_ids) -> None:
    if metric.dim() != 3 or weights.shape != metric.shape:
        raise InputError("Input tensors: metric, weights", f"Received shapes {list(metric.shape)}, "
                         f"{list(weights.shape)}.", "Expected both [S_m, H, W].")
    if depth.dim() != 3 or depth.shape[1:] != metric.shape[1:]:
        raise InputError("Input tensor: depth", f"Received shape {list(depth.shape)}.",
                         f"Expected [S, H, W] with H, W = {list(metric.shape[1:])} like the metric depth.")
    if frame_ids.dim() != 1 or frame_ids.shape[0] != metric.shape[0] or frame_ids.dtype != torch.long:
        raise InputError("Input tensor: frame_ids", f"Received {frame_ids.dtype} {list(frame_ids.shape)}.",
                         f"Expected int64 [{metric.shape[0]}], one frame index per metric-depth frame.")


def _valid_mask(depth, metric, weights) -> torch.Tensor:
    """Pixels usable for the fit; raise InputError naming the input that leaves none."""
    checks = {
        "depth": torch.isfinite(depth) & (depth > 0),
        "metric": torch.isfinite(metric) & (metric > 0),
        "weights": torch.isfinite(weights) & (weights > 0),
    }
    valid = checks["depth"] & checks["metric"] & checks["weights"]
    if not bool(valid.any()):
        empty = [name for name, ok in checks.items() if not bool(ok.any())] or ["depth, metric and weights together"]
        raise InputError(f"Scale alignment inputs: {', '.join(empty)}",
                         "leave no valid pixel (needs finite depth > 0, metric > 0 and weight > 0 at one pixel).",
                         "Check the metric-depth frames match the geometry frames and are not all masked out.")
    return valid


def _wls(depth, metric, weights, keep) -> torch.Tensor:
    """Per frame Σ w·d·m / Σ w·d² over ``keep``: [S_m, H, W] -> [S_m]; NaN where nothing is kept."""
    w = torch.where(keep, weights, torch.zeros_like(weights))
    d = torch.where(keep, depth, torch.zeros_like(depth))
    m = torch.where(keep, metric, torch.zeros_like(metric))
    # Products in the input dtype, sums in float64: the exact case stays exact to ~1e-7 in float32.
    num = (w * d * m).sum(dim=(1, 2), dtype=torch.float64)
    den = (w * d * d).sum(dim=(1, 2), dtype=torch.float64)
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float64).tiny), torch.nan)


def _trim(depth, metric, valid, per_frame, trim_k) -> torch.Tensor:
    """Valid pixels whose relative residual lies within trim_k robust σ of the frame's median residual."""
    s = per_frame.to(depth.dtype)[:, None, None]  # [S_m] -> [S_m, 1, 1]
    resid = torch.where(valid, s * depth / metric - 1, torch.nan).flatten(1)  # [S_m, H*W]
    # The median and MAD are location/scale estimates: a fixed-stride sample gives them at a fraction
    # of the sorting cost on large frames (16 x 518 x 700 pixels) and stays deterministic.
    sample = resid[:, :: max(1, resid.shape[1] // STATS_PIXELS)]  # [S_m, <= 2·STATS_PIXELS]
    centre = sample.nanmedian(dim=1, keepdim=True).values  # [S_m, 1]
    mad = (sample - centre).abs().nanmedian(dim=1, keepdim=True).values
    dev = (resid - centre).abs()
    # The floor keeps every pixel that is consistent up to rounding when the MAD is (nearly) zero.
    limit = torch.clamp(trim_k * MAD_TO_SIGMA * mad, min=16 * torch.finfo(depth.dtype).eps)
    return valid & (dev <= limit).reshape(valid.shape)  # NaN deviations compare False


def align_scale(depth: torch.Tensor, metric: torch.Tensor, weights: torch.Tensor, frame_ids: torch.Tensor,
                *, robust_iters: int = 3, trim_k: float = 3.0) -> ScaleFit:
    """Fit the metric scale of VGGT depth to metric depth (see the module docstring).

    Args:
        depth: [S, H, W] network depth (normalised units), or already the [S_m, H, W] metric frames.
        metric: [S_m, H, W] metric depth in metres of frames ``frame_ids``.
        weights: [S_m, H, W] per-pixel weights (VGGT depth confidence) of those frames.
        frame_ids: int64 [S_m], indices of the metric frames in the clip (e.g. `metric_frame_ids`).
        robust_iters: rounds of residual trimming per frame; 0 = plain weighted least squares.
        trim_k: trimming window in robust standard deviations.
    Returns:
        `ScaleFit` (metres per network unit) in the dtype of ``depth``.
    """
    _check(depth, metric, weights, frame_ids)
    s_m = metric.shape[0]
    depth = _select("depth", depth, frame_ids, s_m)
    valid = _valid_mask(depth, metric, weights)
    keep = valid
    per_frame = _wls(depth, metric, weights, keep)
    for _ in range(robust_iters):
        trimmed = _trim(depth, metric, valid, per_frame, trim_k)
        if torch.equal(trimmed, keep):  # converged: the same pixels give the same fit
            break
        keep = trimmed
        per_frame = _wls(depth, metric, weights, keep)
    scale = per_frame.nanquantile(0.5)  # the mean of the two middle frames for an even S_m
    inliers = keep.flatten(1).sum(1)
    return ScaleFit(scale.to(depth.dtype), per_frame.to(depth.dtype), frame_ids, inliers)


def apply_scale(geometry: dict[str, torch.Tensor], scale: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """Return a copy of ``geometry`` in metres: lengths multiplied by ``scale``, everything else as is.

    Scaled: ``depth`` [S, H, W], ``world_points`` [S, H, W, 3], the translation column of ``extrinsics``
    [S, 3, 4] (or [S, 4, 4]) and ``pose_enc[..., :3]``. Untouched (same tensors): confidences,
    rotations, intrinsics, fields of view and any other key. The input dict is not modified.
    """
    value = float(scale)
    if not (value > 0 and value < float("inf")):
        raise InputError(f"Scale: {value}", "is not a positive finite number.",
                         "Check the scale fit (align_scale) succeeded.")
    out = dict(geometry)
    for name in ("depth", "world_points"):
        if name in out:
            out[name] = out[name] * value
    if "extrinsics" in out:
        ext = out["extrinsics"].clone()
        ext[..., :3, 3] = ext[..., :3, 3] * value
        out["extrinsics"] = ext
    if "pose_enc" in out:
        enc = out["pose_enc"]
        out["pose_enc"] = torch.cat([enc[..., :3] * value, enc[..., 3:]], -1)
    return out
