"""Lifting (DESIGN.md §1 row ``lift``): language tokens placed in 3D with metric depth and cameras.

Depth is brought to the patch grid by the mean over each patch×patch block, each patch centre is
back-projected with its camera, and T_3D = T'_lang + MLP(P_v). Pixel convention: pixel (u, v) covers
[u, u+1) × [v, v+1) and has its centre at (u + 0.5, v + 0.5), so patch (i, j) is centred at
(j·patch + patch/2, i·patch + patch/2). Cameras are world-to-camera [R | t] (OpenCV axes) with upper
triangular intrinsics K ([0, 0, 1] last row): K is inverted in closed form, because a general matrix
inverse has no standard ONNX operator. No data-dependent control flow; dtypes are preserved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidllm_edge.errors import InputError


def _check_frames(name: str, x: torch.Tensor, trailing: tuple[int, ...]) -> None:
    if x.dim() != 1 + len(trailing) or tuple(x.shape[1:]) != trailing:
        want = ", ".join(["S"] + [str(t) for t in trailing])
        raise InputError(f"Input tensor: {name}", f"Received shape {list(x.shape)}.", f"Expected [{want}].")


def patch_grid_depth(depth: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean depth of each patch: depth [S, H, W] (H, W multiples of ``patch``) -> [S, H/patch, W/patch]."""
    if depth.dim() != 3 or depth.shape[1] % patch or depth.shape[2] % patch:
        raise InputError("Input tensor: depth", f"Received shape {list(depth.shape)}.",
                         f"Expected [S, H, W] with H, W multiples of the patch size {patch}.")
    return F.avg_pool2d(depth[:, None], patch)[:, 0]  # [S, 1, H, W] -> [S, 1, h, w] -> [S, h, w]


def patch_centres(h: int, w: int, patch: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Pixel coordinates (x, y) of the centres of an h×w grid of patch×patch patches: [h, w, 2].

    Patch (i, j) is centred at x = j·patch + patch/2, y = i·patch + patch/2 (``patch=1``: pixel centres).
    """
    ys = torch.arange(h, dtype=dtype, device=device) * patch + patch / 2
    xs = torch.arange(w, dtype=dtype, device=device) * patch + patch / 2
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # [h, w] each
    return torch.stack([grid_x, grid_y], -1)  # [h, w, 2]


def backproject(depth: torch.Tensor, uv: torch.Tensor, intrinsics: torch.Tensor,
                extrinsics: torch.Tensor) -> torch.Tensor:
    """World points of pixels at continuous coordinates ``uv`` with z-depth ``depth``.

    Args:
        depth: [S, h, w] z-depth along the optical axis (same unit as the translations, e.g. metres).
        uv: [h, w, 2] pixel coordinates (x, y), shared by all frames (e.g. `patch_centres`).
        intrinsics: [S, 3, 3] upper-triangular K in pixels.
        extrinsics: [S, 3, 4] world-to-camera [R | t].
    Returns:
        [S, h, w, 3] world points X_world = Rᵀ (depth · K⁻¹ [u, v, 1]ᵀ − t).
    """
    _check_frames("intrinsics", intrinsics, (3, 3))
    _check_frames("extrinsics", extrinsics, (3, 4))
    if depth.dim() != 3 or uv.shape != depth.shape[1:] + (2,):
        raise InputError("Input tensors: depth, uv", f"Received shapes {list(depth.shape)}, {list(uv.shape)}.",
                         "Expected depth [S, h, w] and uv [h, w, 2].")
    k = intrinsics[:, None, None]  # [S, 3, 3] -> [S, 1, 1, 3, 3]
    fx, skew, cx, fy, cy = k[..., 0, 0], k[..., 0, 1], k[..., 0, 2], k[..., 1, 1], k[..., 1, 2]  # [S, 1, 1]
    y_n = (uv[..., 1] - cy) / fy  # [S, h, w]
    x_n = (uv[..., 0] - cx - skew * y_n) / fx
    cam = depth[..., None] * torch.stack([x_n, y_n, torch.ones_like(x_n)], -1)  # [S, h, w, 3]
    rot, t = extrinsics[:, :, :3], extrinsics[:, :, 3]  # [S, 3, 3], [S, 3]
    rel = (cam - t[:, None, None, :]).flatten(1, 2)  # [S, h, w, 3] -> [S, h*w, 3]
    # Row vectors: xᵀ R = (Rᵀ x)ᵀ.
    return (rel @ rot).reshape(cam.shape)  # [S, h*w, 3] -> [S, h, w, 3]


def backproject_depth(depth: torch.Tensor, intrinsics: torch.Tensor, extrinsics: torch.Tensor) -> torch.Tensor:
    """Back-project every pixel centre (u + 0.5, v + 0.5): depth [S, H, W], K [S, 3, 3], [R|t] [S, 3, 4]
    -> world points [S, H, W, 3]."""
    if depth.dim() != 3:
        raise InputError("Input tensor: depth", f"Received shape {list(depth.shape)}.", "Expected [S, H, W].")
    uv = patch_centres(depth.shape[1], depth.shape[2], 1, dtype=depth.dtype, device=depth.device)  # [H, W, 2]
    return backproject(depth, uv, intrinsics, extrinsics)


class PositionMLP(nn.Module):
    """3D position embedding MLP(3 -> hidden -> dim) with GELU; points in metres (world frame)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """points [..., 3] -> [..., dim]."""
        return self.net(points)


def lift_tokens(t_lang: torch.Tensor, depth: torch.Tensor, intrinsics: torch.Tensor, extrinsics: torch.Tensor,
                patch: int, pos_mlp: PositionMLP) -> tuple[torch.Tensor, torch.Tensor]:
    """T_3D = T'_lang + MLP(P_v) with P_v the back-projected patch centres.

    Args:
        t_lang: [S, P, C] language tokens, P = (H/patch)·(W/patch) in row-major patch order.
        depth: [S, H, W] metric depth (metres).
        intrinsics: [S, 3, 3] K in pixels of the H×W frames; extrinsics: [S, 3, 4] world-to-camera, metres.
        patch: patch size in pixels.
        pos_mlp: the `PositionMLP`; it runs in its own parameter dtype.
    Returns:
        (t3d [S, P, C] in the dtype of ``t_lang``, points [S, P, 3] in the dtype of ``depth``). A patch with
        non-finite depth gives a non-finite point (and token); `voxel_pool` drops it.
    """
    grid = patch_grid_depth(depth, patch)  # [S, h, w]
    s, h, w = grid.shape
    if t_lang.dim() != 3 or t_lang.shape[0] != s or t_lang.shape[1] != h * w:
        raise InputError("Input tensor: t_lang", f"Received shape {list(t_lang.shape)}.",
                         f"Expected [{s}, {h * w}, C]: one token per {patch}x{patch} patch of the depth map.")
    uv = patch_centres(h, w, patch, dtype=depth.dtype, device=depth.device)  # [h, w, 2]
    points = backproject(grid, uv, intrinsics, extrinsics).flatten(1, 2)  # [S, h, w, 3] -> [S, P, 3]
    param_dtype = next(pos_mlp.parameters()).dtype
    t3d = t_lang + pos_mlp(points.to(param_dtype)).to(t_lang.dtype)  # [S, P, C]
    return t3d, points
