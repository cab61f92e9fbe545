"""Lifting: patch-grid depth, patch centres, back-projection conventions, lift_tokens."""

from __future__ import annotations

import pytest
import torch

from vidllm_edge.errors import InputError
from vidllm_edge.models.camera import pose_encoding_to_extri_intri
from vidllm_edge.models.lift import (PositionMLP, backproject, backproject_depth, lift_tokens, patch_centres,
                                     patch_grid_depth)

F64 = torch.float64


def _camera(s: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random poses and intrinsics of h×w frames, float64."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(s, 4, generator=g, dtype=F64), dim=-1)
    enc = torch.cat([torch.randn(s, 3, generator=g, dtype=F64), q, 0.6 + torch.rand(s, 2, generator=g, dtype=F64)], -1)
    ext, k = pose_encoding_to_extri_intri(enc, (h, w))
    return k, ext


def _project(points: torch.Tensor, k: torch.Tensor, ext: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World points [S, h, w, 3] -> pixel coordinates [S, h, w, 2] and z-depth [S, h, w]."""
    cam = torch.einsum("sij,shwj->shwi", ext[:, :, :3], points) + ext[:, None, None, :, 3]
    pix = torch.einsum("sij,shwj->shwi", k, cam)
    return pix[..., :2] / pix[..., 2:], cam[..., 2]


def test_patch_grid_depth_is_block_mean():
    depth = torch.arange(2 * 4 * 6, dtype=F64).reshape(2, 4, 6)
    grid = patch_grid_depth(depth, 2)
    assert grid.shape == (2, 2, 3) and grid.dtype == F64
    assert grid[1, 1, 2] == depth[1, 2:4, 4:6].mean()
    torch.testing.assert_close(grid, depth.reshape(2, 2, 2, 3, 2).mean(dim=(2, 4)))
    with pytest.raises(InputError, match="multiples"):
        patch_grid_depth(torch.zeros(1, 5, 6), 2)


def test_patch_centres():
    uv = patch_centres(2, 3, 14)
    assert uv.shape == (2, 3, 2)
    assert uv[0, 0].tolist() == [7.0, 7.0] and uv[1, 2].tolist() == [35.0, 21.0]  # (x, y)
    assert patch_centres(1, 2, 1)[0, 1].tolist() == [1.5, 0.5]


def test_fronto_parallel_plane():
    h, w, z = 4, 6, 2.5
    k = torch.tensor([[[10.0, 0, 3.0], [0, 20.0, 2.0], [0, 0, 1]]], dtype=F64)
    ext = torch.eye(3, 4, dtype=F64)[None]
    pts = backproject_depth(torch.full((1, h, w), z, dtype=F64), k, ext)
    assert pts.shape == (1, h, w, 3)
    torch.testing.assert_close(pts[..., 2], torch.full((1, h, w), z, dtype=F64))
    u = torch.arange(w, dtype=F64) + 0.5
    v = torch.arange(h, dtype=F64) + 0.5
    torch.testing.assert_close(pts[0, 0, :, 0], (u - 3.0) * z / 10.0)
    torch.testing.assert_close(pts[0, :, 0, 1], (v - 2.0) * z / 20.0)


def test_translated_camera_moves_points():
    k = torch.tensor([[[10.0, 0, 3.0], [0, 10.0, 2.0], [0, 0, 1]]], dtype=F64)
    ext = torch.eye(3, 4, dtype=F64)[None].clone()
    ext[0, :, 3] = torch.tensor([1.0, -2.0, 0.5])  # world-to-camera t: camera centre at -t
    depth = torch.ones(1, 4, 6, dtype=F64)
    moved = backproject_depth(depth, k, ext) - backproject_depth(depth, k, torch.eye(3, 4, dtype=F64)[None])
    torch.testing.assert_close(moved, -ext[0, :, 3].expand(1, 4, 6, 3))


@pytest.mark.parametrize("identity", [True, False])
def test_round_trip_with_projection(identity):
    s, h, w = 3, 5, 7
    k, ext = _camera(s, h, w)
    if identity:
        ext = torch.eye(3, 4, dtype=F64).expand(s, 3, 4)
    depth = 1 + torch.rand(s, h, w, generator=torch.Generator().manual_seed(1), dtype=F64)
    pix, z = _project(backproject_depth(depth, k, ext), k, ext)
    torch.testing.assert_close(z, depth)
    torch.testing.assert_close(pix, patch_centres(h, w, 1, dtype=F64).expand(s, h, w, 2))


def test_backproject_depth_uses_pixel_centres():
    k, ext = _camera(2, 4, 6, seed=2)
    depth = torch.rand(2, 4, 6, dtype=F64) + 1
    uv = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")[::-1], -1).to(F64) + 0.5
    torch.testing.assert_close(backproject_depth(depth, k, ext), backproject(depth, uv, k, ext))


def test_lift_tokens_shapes_dtypes_and_formula():
    s, patch, h, w, c = 2, 2, 3, 4, 8
    k, ext = _camera(s, h * patch, w * patch, seed=3)
    depth = 1 + torch.rand(s, h * patch, w * patch, dtype=F64)
    torch.manual_seed(0)
    mlp = PositionMLP(c, 16).double()
    t_lang = torch.randn(s, h * w, c, dtype=F64)
    t3d, points = lift_tokens(t_lang, depth, k, ext, patch, mlp)
    assert t3d.shape == (s, h * w, c) and points.shape == (s, h * w, 3)
    assert t3d.dtype == points.dtype == F64
    want = backproject(patch_grid_depth(depth, patch), patch_centres(h, w, patch, dtype=F64), k, ext)
    torch.testing.assert_close(points, want.reshape(s, h * w, 3))
    torch.testing.assert_close(t3d, t_lang + mlp(points))
    with pytest.raises(InputError, match="t_lang"):
        lift_tokens(t_lang[:, :-1], depth, k, ext, patch, mlp)


def test_lift_tokens_float32_mlp_with_float64_geometry():
    k, ext = _camera(1, 4, 4, seed=4)
    t3d, points = lift_tokens(torch.zeros(1, 4, 8), torch.ones(1, 4, 4, dtype=F64), k, ext, 2, PositionMLP(8, 4))
    assert t3d.dtype == torch.float32 and points.dtype == F64


def test_lift_exports_with_dynamic_frames():
    class Lift(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = PositionMLP(8, 16)

        def forward(self, t_lang, depth, k, ext):
            return lift_tokens(t_lang, depth, k, ext, 2, self.mlp)

    k, ext = _camera(3, 4, 6, seed=5)
    args = (torch.randn(3, 6, 8), 1 + torch.rand(3, 4, 6), k.float(), ext.float())
    frames = torch.export.Dim("S", min=2, max=64)
    lift = Lift()
    program = torch.export.export(lift, args, dynamic_shapes=tuple({0: frames} for _ in args))
    k5, ext5 = _camera(5, 4, 6, seed=6)
    args5 = (torch.randn(5, 6, 8), 1 + torch.rand(5, 4, 6), k5.float(), ext5.float())
    for a, b in zip(program.module()(*args5), lift(*args5)):
        torch.testing.assert_close(a, b)
