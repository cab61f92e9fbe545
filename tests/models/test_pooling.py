"""Voxel pooling: hand example, order independence, coarsening, non-finite points, errors."""

from __future__ import annotations

import pytest
import torch

from vidllm_edge.errors import InputError
from vidllm_edge.models.pooling import voxel_pool


def _cloud(n: int = 500, c: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randn(n, 3, generator=g) * 2


def test_hand_example():
    points = torch.tensor([[0.05, 0.05, 0.05], [0.15, 0.1, 0.0], [-0.1, 0.0, 0.0], [0.3, 0.0, 0.0]])
    tokens = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [5.0, 5.0]])
    out = voxel_pool(tokens, points, voxel_size=0.2, max_tokens=8)
    # keys: (0,0,0) for the first two, (-1,0,0) for the third, (1,0,0) for the last; sorted by x.
    torch.testing.assert_close(out.tokens, torch.tensor([[10.0, 0.0], [2.0, 3.0], [5.0, 5.0]]))
    torch.testing.assert_close(out.centres, torch.tensor([[-0.1, 0.0, 0.0], [0.1, 0.075, 0.025], [0.3, 0.0, 0.0]]))
    assert out.counts.tolist() == [1, 2, 1] and out.voxel_size == 0.2


def test_voxels_sorted_lexicographically():
    tokens, points = _cloud()
    out = voxel_pool(tokens, points, 0.5, 10_000)
    keys = torch.floor(out.centres / out.voxel_size).long().tolist()
    assert keys == sorted(keys) and len(set(map(tuple, keys))) == len(keys)
    assert int(out.counts.sum()) == tokens.shape[0]


def test_deterministic_and_order_independent():
    tokens, points = _cloud(seed=1)
    ref = voxel_pool(tokens, points, 0.3, 10_000)
    again = voxel_pool(tokens, points, 0.3, 10_000)
    assert torch.equal(ref.tokens, again.tokens) and torch.equal(ref.centres, again.centres)
    perm = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(2))
    shuffled = voxel_pool(tokens[perm], points[perm], 0.3, 10_000)
    assert torch.equal(ref.counts, shuffled.counts)
    torch.testing.assert_close(shuffled.tokens, ref.tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(shuffled.centres, ref.centres, rtol=0, atol=1e-6)


def test_coarsens_until_it_fits():
    tokens, points = _cloud(2000, seed=3)
    fine = voxel_pool(tokens, points, 0.1, 10_000)
    out = voxel_pool(tokens, points, 0.1, 32, coarsen=1.5)
    assert fine.tokens.shape[0] > 32 >= out.tokens.shape[0]
    assert out.voxel_size > 0.1
    assert out.tokens.shape == (out.counts.shape[0], 8) and int(out.counts.sum()) == 2000
    # The mean token of all voxels, weighted by counts, is the mean of all tokens.
    torch.testing.assert_close((out.tokens * out.counts[:, None]).sum(0) / 2000, tokens.mean(0), rtol=0, atol=1e-5)


def test_smallest_cap_is_reachable_around_the_origin():
    tokens, points = _cloud(300, seed=4)
    points = points * 1e3  # far from the first voxel size: many coarsening rounds
    assert voxel_pool(tokens, points, 0.2, 8).tokens.shape[0] <= 8


def test_non_finite_points_are_ignored():
    tokens, points = _cloud(50, seed=5)
    bad = points.clone()
    bad[3, 0] = float("nan")
    bad[7, 2] = float("inf")
    keep = torch.ones(50, dtype=torch.bool)
    keep[[3, 7]] = False
    out = voxel_pool(tokens, bad, 0.5, 10_000)
    ref = voxel_pool(tokens[keep], points[keep], 0.5, 10_000)
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.centres, ref.centres)
    with pytest.raises(InputError, match="no finite row"):
        voxel_pool(tokens[:2], torch.full((2, 3), float("nan")), 0.5, 100)


def test_numpy_input_and_dtypes():
    tokens, points = _cloud(20, seed=6)
    out = voxel_pool(tokens.double().numpy(), points.numpy(), 0.5, 100)
    assert out.tokens.dtype == torch.float64 and out.centres.dtype == torch.float32


def test_errors():
    with pytest.raises(InputError, match="empty"):
        voxel_pool(torch.zeros(0, 4), torch.zeros(0, 3), 0.2, 100)
    with pytest.raises(InputError, match="shapes"):
        voxel_pool(torch.zeros(5, 4), torch.zeros(4, 3), 0.2, 100)
    with pytest.raises(InputError, match="voxel_size"):
        voxel_pool(torch.zeros(5, 4), torch.zeros(5, 3), 0.0, 100)
    with pytest.raises(InputError, match="max_tokens"):
        voxel_pool(torch.zeros(5, 4), torch.zeros(5, 3), 0.2, 4)
