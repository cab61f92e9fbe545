"""Pose encoding <-> extrinsics/intrinsics: identity, conventions, round trips."""

from __future__ import annotations

import math

import pytest
import torch

from vidllm_edge.errors import InputError
from vidllm_edge.models.camera import (extri_intri_to_pose_encoding, invert_extrinsics, mat_to_quat,
                                       pose_encoding_to_extri_intri, quat_to_mat)

HW = (28, 42)


def _rodrigues(axis: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotation by ``angle`` about unit ``axis`` (independent of the quaternion code)."""
    k = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _random_pose_enc(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, 3, generator=g, dtype=torch.float64)
    q = torch.nn.functional.normalize(torch.randn(n, 4, generator=g, dtype=torch.float64), dim=-1)
    q = torch.where(q[:, 3:] < 0, -q, q)
    fov = 0.5 + torch.rand(n, 2, generator=g, dtype=torch.float64)
    return torch.cat([t, q, fov], -1)


def test_identity_pose():
    fov_h, fov_w = 1.0, 1.2
    enc = torch.tensor([[0, 0, 0, 0, 0, 0, 1, fov_h, fov_w]], dtype=torch.float64)
    ext, k = pose_encoding_to_extri_intri(enc, HW)
    torch.testing.assert_close(ext[0], torch.eye(3, 4, dtype=torch.float64))
    h, w = HW
    fx, fy = (w / 2) / math.tan(fov_w / 2), (h / 2) / math.tan(fov_h / 2)
    want = torch.tensor([[fx, 0, w / 2], [0, fy, h / 2], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(k[0], want)
    assert ext.dtype == k.dtype == torch.float64


def test_quaternion_convention_scalar_last_and_unnormalised():
    axis = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    axis = axis / axis.norm()
    angle = 0.7
    q = torch.cat([axis * math.sin(angle / 2), torch.tensor([math.cos(angle / 2)], dtype=torch.float64)])
    torch.testing.assert_close(quat_to_mat(q), _rodrigues(axis, angle))
    torch.testing.assert_close(quat_to_mat(3.0 * q), _rodrigues(axis, angle))  # implicit normalisation


def test_round_trip_pose_encoding():
    enc = _random_pose_enc(16)
    ext, k = pose_encoding_to_extri_intri(enc, HW)
    rot = ext[:, :, :3]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(16, 3, 3))
    torch.testing.assert_close(extri_intri_to_pose_encoding(ext, k, HW), enc)


def test_mat_to_quat_handles_half_turns():
    for axis in torch.eye(3, dtype=torch.float64):
        rot = _rodrigues(axis, math.pi)
        torch.testing.assert_close(quat_to_mat(mat_to_quat(rot)), rot)


def test_invert_extrinsics():
    ext, _ = pose_encoding_to_extri_intri(_random_pose_enc(4, seed=1), HW)
    inv = invert_extrinsics(ext)
    x = torch.randn(4, 3, 1, dtype=torch.float64)
    cam = ext[:, :, :3] @ x + ext[:, :, 3:]
    torch.testing.assert_close(inv[:, :, :3] @ cam + inv[:, :, 3:], x)
    torch.testing.assert_close(invert_extrinsics(inv), ext)
    square = torch.cat([ext, torch.tensor([0, 0, 0, 1.0], dtype=torch.float64).expand(4, 1, 4)], 1)
    torch.testing.assert_close(invert_extrinsics(square)[:, :3], inv)


def test_bad_pose_enc_shape():
    with pytest.raises(InputError, match="pose_enc"):
        pose_encoding_to_extri_intri(torch.zeros(2, 7), HW)
