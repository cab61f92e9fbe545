"""Voxel pooling (DESIGN.md §1 row ``pool``): the 3D tokens of a clip reduced to at most M per voxel grid.

Voxel key = floor(point / voxel) on a grid anchored at the world origin; tokens and points are averaged
per voxel and voxels are sorted by key lexicographically (x, then y, then z), so the result depends on
the set of (token, point) pairs only, not on their order. Sums accumulate in float64 and are rounded
once, so a permutation of the inputs changes the outputs by at most float64 rounding (invisible in
float32). When there are more voxels than ``max_tokens`` the voxel is multiplied by ``coarsen`` until
they fit. Points with a non-finite coordinate (patches with invalid depth) are ignored, with their
tokens. The number of voxels is data-dependent, so this runs in the runtime (torch), not in an engine.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from vidllm_edge.errors import InputError

# Once the voxel exceeds every |coordinate|, keys are in {-1, 0}³: an origin-anchored grid never has
# fewer than (up to) 8 voxels, so smaller caps cannot always be met.
MIN_MAX_TOKENS = 8
KEY_LIMIT = float(2**52)  # |point / voxel| beyond this cannot be an int64 key with unit resolution


class PoolResult(NamedTuple):
    """Pooled tokens: one row per occupied voxel, voxels sorted by key (x, y, z)."""

    tokens: torch.Tensor   # [M, C] mean token per voxel, dtype of the input tokens
    centres: torch.Tensor  # [M, 3] mean point per voxel, dtype of the input points
    voxel_size: float      # the voxel edge actually used, after coarsening (same unit as the points)
    counts: torch.Tensor   # [M] int64, points per voxel


def _as_tensor(name: str, x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise InputError(f"Input: {name}", f"is a {type(x).__name__}.", "Pass a torch tensor or a numpy array.")
    return x


def _check(tokens: torch.Tensor, points: torch.Tensor, voxel_size: float, max_tokens: int, coarsen: float) -> None:
    if tokens.dim() != 2 or points.dim() != 2 or points.shape[1] != 3 or tokens.shape[0] != points.shape[0]:
        raise InputError("Input tensors: tokens, points",
                         f"Received shapes {list(tokens.shape)}, {list(points.shape)}.",
                         "Expected tokens [N, C] and points [N, 3] with the same N.")
    if tokens.shape[0] == 0:
        raise InputError("Input tensors: tokens, points", "are empty (N = 0).", "Pool at least one token.")
    if not (math.isfinite(voxel_size) and voxel_size > 0 and math.isfinite(coarsen) and coarsen > 1):
        raise InputError(f"Voxel pooling: voxel_size={voxel_size}, coarsen={coarsen}",
                         "need voxel_size > 0 and coarsen > 1 (both finite).", "Fix scene.voxel_size / coarsen_factor.")
    if max_tokens < MIN_MAX_TOKENS:
        raise InputError(f"Voxel pooling: max_tokens={max_tokens}", "is below the minimum the grid can reach.",
                         f"Use max_tokens >= {MIN_MAX_TOKENS} (an origin-anchored grid keeps up to 8 voxels).")


def _voxel_keys(points: torch.Tensor, voxel: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique sorted keys [M, 3], inverse index [N] and counts [M] of ``points`` [N, 3] (all finite)."""
    scaled = (points.double() / voxel).clamp(-KEY_LIMIT, KEY_LIMIT)
    keys = torch.floor(scaled).to(torch.long)  # [N, 3]
    return torch.unique(keys, dim=0, sorted=True, return_inverse=True, return_counts=True)


def _scatter_mean(values: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [N, D] per group ``inverse`` [N] -> [M, D], accumulated in float64."""
    sums = torch.zeros(counts.shape[0], values.shape[1], dtype=torch.float64, device=values.device)
    sums.index_add_(0, inverse, values.double())
    return (sums / counts[:, None].double()).to(values.dtype)


def voxel_pool(tokens: torch.Tensor, points: torch.Tensor, voxel_size: float, max_tokens: int,
               coarsen: float = 1.5) -> PoolResult:
    """Scatter-mean ``tokens`` over a voxel grid of their ``points``.

    Args:
        tokens: [N, C] tokens (torch tensor or numpy array).
        points: [N, 3] their positions in metres (world frame); rows with a non-finite value are ignored.
        voxel_size: initial voxel edge in metres (DESIGN default 0.2).
        max_tokens: cap on the number of voxels M (at least 8).
        coarsen: factor (> 1) applied to the voxel edge while M > max_tokens.
    Returns:
        `PoolResult` with M <= max_tokens voxels sorted by key.
    """
    tokens, points = _as_tensor("tokens", tokens), _as_tensor("points", points)
    _check(tokens, points, float(voxel_size), int(max_tokens), float(coarsen))
    finite = torch.isfinite(points).all(-1)  # [N]
    if not bool(finite.all()):
        if not bool(finite.any()):
            raise InputError("Input tensor: points", "has no finite row.",
                             "Check the depth and cameras the points were lifted from.")
        tokens, points = tokens[finite], points[finite]
    voxel = float(voxel_size)
    # Each round multiplies the voxel by `coarsen`; past max |coordinate| at most 8 voxels remain.
    extent = float(points.abs().max())
    rounds = max(0, math.ceil(math.log(max(extent, voxel) / voxel) / math.log(coarsen))) + 2
    for _ in range(rounds):
        _, inverse, counts = _voxel_keys(points, voxel)
        if counts.shape[0] <= max_tokens:
            break
        voxel *= coarsen
    assert counts.shape[0] <= max_tokens, f"voxel coarsening did not converge ({counts.shape[0]} > {max_tokens})"
    return PoolResult(_scatter_mean(tokens, inverse, counts), _scatter_mean(points, inverse, counts), voxel, counts)
