"""Scale alignment: exact recovery, robustness to outlier pixels and frames, apply_scale, frame ids."""

from __future__ import annotations

import pytest
import torch

from vidllm_edge.errors import InputError
from vidllm_edge.models.scale import align_scale, apply_scale, metric_frame_ids

S_TRUE = 2.7
S, H, W = 8, 42, 56


def _scene(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    depth = torch.rand(S, H, W, generator=g) * 4 + 0.5  # network units
    conf = torch.rand(S, H, W, generator=g) + 0.1
    return g, depth, conf


def _with_outliers(metric: torch.Tensor, g: torch.Generator, fraction: float = 0.2) -> torch.Tensor:
    """Replace ``fraction`` of the pixels of every frame by uniform random depths in [0.1, 10.1) m."""
    out = metric.clone()
    n = H * W
    for i in range(S):
        idx = torch.randperm(n, generator=g)[: int(fraction * n)]
        out[i].view(-1)[idx] = torch.rand(idx.numel(), generator=g) * 10 + 0.1
    return out


def test_exact_recovery():
    _, depth, conf = _scene()
    fit = align_scale(depth, depth * S_TRUE, conf, torch.arange(S))
    assert abs(float(fit.scale) - S_TRUE) / S_TRUE < 1e-6
    assert fit.per_frame.shape == (S,) and fit.scale.dim() == 0 and fit.scale.dtype == depth.dtype


def test_outlier_pixels_in_every_frame():
    g, depth, conf = _scene(1)
    metric = _with_outliers(depth * S_TRUE, g)
    robust = align_scale(depth, metric, conf, torch.arange(S))
    plain = align_scale(depth, metric, conf, torch.arange(S), robust_iters=0)
    assert abs(float(robust.scale) - S_TRUE) / S_TRUE < 0.01
    assert abs(float(plain.scale) - S_TRUE) / S_TRUE > 0.01  # what the trimming is for
    assert (robust.inliers <= 0.8 * H * W + 1).all()


def test_outlier_pixels_with_noisy_inliers():
    g, depth, conf = _scene(2)
    metric = depth * S_TRUE * (1 + 0.05 * torch.randn(S, H, W, generator=g))
    fit = align_scale(depth, _with_outliers(metric, g), conf, torch.arange(S))
    assert abs(float(fit.scale) - S_TRUE) / S_TRUE < 0.01


def test_median_over_frames_ignores_a_bad_frame():
    _, depth, conf = _scene(3)
    metric = depth * S_TRUE
    metric[2] = metric[2] * 3.0  # a whole frame at the wrong scale
    fit = align_scale(depth, metric, conf, torch.arange(S))
    assert abs(float(fit.scale) - S_TRUE) / S_TRUE < 1e-6
    assert abs(float(fit.per_frame[2]) - 3 * S_TRUE) < 1e-4


def test_all_frames_or_selected_frames():
    _, depth, conf = _scene(4)
    ids = torch.tensor([0, 3, 7])
    metric = depth[ids] * S_TRUE
    full = align_scale(depth, metric, conf[ids], ids)
    selected = align_scale(depth[ids], metric, conf[ids], ids)
    assert torch.equal(full.scale, selected.scale)
    assert torch.equal(full.frame_ids, ids)


def test_invalid_pixels_are_ignored():
    _, depth, conf = _scene(5)
    metric = depth * S_TRUE
    metric[:, :10] = 0.0          # no metric depth
    depth[:, -5:] = float("nan")  # non-finite network depth
    conf[:, :, :3] = 0.0          # zero confidence
    metric[1] = -1.0              # a frame with no valid pixel at all
    fit = align_scale(depth, metric, conf, torch.arange(S))
    assert abs(float(fit.scale) - S_TRUE) / S_TRUE < 1e-6
    assert torch.isnan(fit.per_frame[1]) and fit.inliers[1] == 0


def test_no_valid_pixel_names_the_input():
    _, depth, conf = _scene(6)
    with pytest.raises(InputError, match="metric"):
        align_scale(depth, torch.zeros(S, H, W), conf, torch.arange(S))
    with pytest.raises(InputError, match="weights"):
        align_scale(depth, depth, torch.zeros(S, H, W), torch.arange(S))


def test_apply_scale_touches_only_lengths():
    g = torch.Generator().manual_seed(7)
    geo = {
        "depth": torch.rand(2, 4, 5, generator=g),
        "world_points": torch.randn(2, 4, 5, 3, generator=g),
        "extrinsics": torch.randn(2, 3, 4, generator=g),
        "pose_enc": torch.randn(2, 9, generator=g),
        "depth_conf": torch.rand(2, 4, 5, generator=g),
        "intrinsics": torch.randn(2, 3, 3, generator=g),
    }
    before = {k: v.clone() for k, v in geo.items()}
    out = apply_scale(geo, torch.tensor(2.5))
    assert all(torch.equal(geo[k], before[k]) for k in geo), "the input dict must not change"
    torch.testing.assert_close(out["depth"], 2.5 * geo["depth"])
    torch.testing.assert_close(out["world_points"], 2.5 * geo["world_points"])
    torch.testing.assert_close(out["extrinsics"][..., 3], 2.5 * geo["extrinsics"][..., 3])
    assert torch.equal(out["extrinsics"][..., :3], geo["extrinsics"][..., :3])
    torch.testing.assert_close(out["pose_enc"][:, :3], 2.5 * geo["pose_enc"][:, :3])
    assert torch.equal(out["pose_enc"][:, 3:], geo["pose_enc"][:, 3:])
    assert out["depth_conf"] is geo["depth_conf"] and out["intrinsics"] is geo["intrinsics"]
    with pytest.raises(InputError, match="Scale"):
        apply_scale(geo, float("nan"))


@pytest.mark.parametrize("num_frames,max_frames", [(1, 16), (5, 16), (16, 16), (17, 16), (32, 16), (100, 7), (10, 2)])
def test_metric_frame_ids(num_frames, max_frames):
    ids = metric_frame_ids(num_frames, max_frames)
    assert ids.dtype == torch.long and ids.numel() == min(num_frames, max_frames)
    assert ids[0] == 0 and ids[-1] == num_frames - 1
    assert (ids[1:] > ids[:-1]).all()
    assert torch.equal(ids, metric_frame_ids(num_frames, max_frames))
    gaps = ids[1:] - ids[:-1]
    assert ids.numel() < 2 or int(gaps.max() - gaps.min()) <= 1  # evenly spaced


def test_metric_frame_ids_rejects_zero():
    with pytest.raises(InputError):
        metric_frame_ids(0, 16)
