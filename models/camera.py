"""Camera conventions: VGGT's pose encoding <-> OpenCV extrinsics and pinhole intrinsics.

``pose_enc [..., 9] = [tx, ty, tz, qx, qy, qz, qw, fov_h, fov_w]`` (VGGT ``absT_quaR_FoV``):
the world-to-camera translation, the world-to-camera rotation as a quaternion with the scalar last (not
necessarily unit: the rotation normalises it implicitly), and the vertical/horizontal fields of view in
radians. Extrinsics are world-to-camera ``[R | t]`` in OpenCV axes (x right, y down, z forward);
intrinsics ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in pixels with the principal point at the image
centre (W/2, H/2). Everything is elementwise (no data-dependent control flow) and keeps the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vidllm_edge.errors import InputError


def quat_to_mat(quat: torch.Tensor) -> torch.Tensor:
    """Quaternions [..., 4] (x, y, z, w; any non-zero norm) -> rotation matrices [..., 3, 3]."""
    x, y, z, w = torch.unbind(quat, -1)
    two_s = 2.0 / (quat * quat).sum(-1)  # 2/|q|²: normalises q implicitly
    rows = (
        1 - two_s * (y * y + z * z), two_s * (x * y - z * w), two_s * (x * z + y * w),
        two_s * (x * y + z * w), 1 - two_s * (x * x + z * z), two_s * (y * z - x * w),
        two_s * (x * z - y * w), two_s * (y * z + x * w), 1 - two_s * (x * x + y * y),
    )
    return torch.stack(rows, -1).reshape(quat.shape[:-1] + (3, 3))  # [..., 9] -> [..., 3, 3]


def mat_to_quat(rot: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] -> unit quaternions [..., 4] (x, y, z, w) with w >= 0.

    Numerically stable for every rotation: four candidate quaternions are computed and, per matrix,
    the one with the largest denominator is selected (by a one-hot mask, not by branching).
    """
    m = rot.reshape(rot.shape[:-2] + (9,))  # [..., 3, 3] -> [..., 9]
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = torch.unbind(m, -1)
    # 4·|component|² for (w, x, y, z), from the diagonal.
    q_abs = torch.sqrt(torch.clamp(torch.stack([
        1.0 + m00 + m11 + m22, 1.0 + m00 - m11 - m22, 1.0 - m00 + m11 - m22, 1.0 - m00 - m11 + m22,
    ], -1), min=0.0))  # [..., 4]
    # Row i: the quaternion (w, x, y, z) scaled by 2·q_abs[i]·(sign).
    cand = torch.stack([
        torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], -1),
        torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], -1),
        torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], -1),
        torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], -1),
    ], -2)  # [..., 4, 4]
    cand = cand / (2.0 * q_abs[..., None].clamp(min=0.1))
    pick = F.one_hot(q_abs.argmax(-1), 4).to(rot.dtype)  # [..., 4]
    wxyz = (cand * pick[..., None]).sum(-2)  # [..., 4]
    wxyz = F.normalize(wxyz, dim=-1)
    wxyz = torch.where(wxyz[..., :1] < 0, -wxyz, wxyz)  # q and -q are one rotation: keep w >= 0
    return torch.cat([wxyz[..., 1:], wxyz[..., :1]], -1)  # (w, x, y, z) -> (x, y, z, w)


def _check_hw(image_hw: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(v) for v in image_hw)
    if h <= 0 or w <= 0:
        raise InputError(f"Image size: {tuple(image_hw)}", "is not positive.", "Pass (H, W) in pixels.")
    return h, w


def pose_encoding_to_extri_intri(pose_enc: torch.Tensor,
                                 image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """VGGT pose encoding -> (extrinsics, intrinsics).

    Args:
        pose_enc: [..., 9] (usually [S, 9]) translation, quaternion (x, y, z, w), fov_h, fov_w (radians).
        image_hw: (H, W) of the frames the network saw, in pixels.
    Returns:
        extrinsics [..., 3, 4] world-to-camera (OpenCV), intrinsics [..., 3, 3] in pixels;
        fy = (H/2) / tan(fov_h/2), fx = (W/2) / tan(fov_w/2), principal point (W/2, H/2).
    """
    if pose_enc.shape[-1] != 9:
        raise InputError("Input tensor: pose_enc", f"Received shape {list(pose_enc.shape)}.",
                         "Expected [S, 9] = [tx, ty, tz, qx, qy, qz, qw, fov_h, fov_w].")
    h, w = _check_hw(image_hw)
    t = pose_enc[..., :3]
    rot = quat_to_mat(pose_enc[..., 3:7])
    extrinsics = torch.cat([rot, t[..., None]], -1)  # [..., 3, 3] + [..., 3, 1] -> [..., 3, 4]
    fy = (h / 2.0) / torch.tan(pose_enc[..., 7] / 2.0)
    fx = (w / 2.0) / torch.tan(pose_enc[..., 8] / 2.0)
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    intrinsics = torch.stack([fx, zero, zero + w / 2.0,
                              zero, fy, zero + h / 2.0,
                              zero, zero, one], -1).reshape(fx.shape + (3, 3))  # [..., 9] -> [..., 3, 3]
    return extrinsics, intrinsics


def extri_intri_to_pose_encoding(extrinsics: torch.Tensor, intrinsics: torch.Tensor,
                                 image_hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pose_encoding_to_extri_intri`: extrinsics [..., 3, 4], intrinsics [..., 3, 3] -> [..., 9].

    The quaternion is unit with qw >= 0; the principal point and skew of ``intrinsics`` are not encoded.
    """
    if extrinsics.shape[-2:] != (3, 4) or intrinsics.shape[-2:] != (3, 3):
        raise InputError("Input tensors: extrinsics, intrinsics",
                         f"Received shapes {list(extrinsics.shape)}, {list(intrinsics.shape)}.",
                         "Expected [S, 3, 4] world-to-camera and [S, 3, 3] pixel intrinsics.")
    h, w = _check_hw(image_hw)
    quat = mat_to_quat(extrinsics[..., :3, :3])
    fov_h = 2.0 * torch.atan((h / 2.0) / intrinsics[..., 1, 1])
    fov_w = 2.0 * torch.atan((w / 2.0) / intrinsics[..., 0, 0])
    return torch.cat([extrinsics[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]], -1)


def invert_extrinsics(extrinsics: torch.Tensor) -> torch.Tensor:
    """[R | t] [..., 3, 4] (or [..., 4, 4]) -> [Rᵀ | -Rᵀt] of the same shape.

    Turns world-to-camera into camera-to-world and back."""
    if extrinsics.shape[-1] != 4 or extrinsics.shape[-2] not in (3, 4):
        raise InputError("Input tensor: extrinsics", f"Received shape {list(extrinsics.shape)}.",
                         "Expected [..., 3, 4] or [..., 4, 4].")
    rot_t = extrinsics[..., :3, :3].transpose(-1, -2)  # Rᵀ [..., 3, 3]
    t_inv = -(rot_t @ extrinsics[..., :3, 3:])  # [..., 3, 1]
    out = torch.cat([rot_t, t_inv], -1)  # [..., 3, 4]
    if extrinsics.shape[-2] == 4:
        out = torch.cat([out, extrinsics[..., 3:, :]], -2)  # keep the [0, 0, 0, 1] row: [..., 4, 4]
    return out
