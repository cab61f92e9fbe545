"""Metric depth head on the tiny preset: shapes, metric range, bins, and input/config errors."""

from __future__ import annotations

import pytest
import torch

from vidllm_edge.errors import ConfigError, InputError
from vidllm_edge.models.config import from_name
from vidllm_edge.models.encoder import build_encoder
from vidllm_edge.models.metric_depth import MetricDepth


@pytest.fixture(scope="module")
def tiny():
    cfg = from_name("tiny")
    torch.manual_seed(0)
    return cfg, build_encoder(cfg).eval(), MetricDepth(cfg).eval()


def test_shapes_and_range(tiny):
    cfg, encoder, head = tiny
    images = torch.rand(3, 3, 56, 84)
    with torch.no_grad():
        feats = encoder(images).features
        depth = head(feats, (56, 84))
        centres = head.bin_centres(feats)
    md = cfg.metric_depth
    assert [tuple(f.shape) for f in feats] == [(3, 24, cfg.embed_dim)] * 4
    assert depth.shape == (3, 56, 84) and depth.dtype == torch.float32
    assert torch.isfinite(depth).all()
    assert (depth >= md.min_depth).all() and (depth <= md.max_depth).all()
    assert depth.std() > 0  # varies over pixels
    assert centres.shape == (3, md.num_bins)
    assert (centres.diff(dim=-1) > 0).all()
    assert (centres > md.min_depth).all() and (centres < md.max_depth).all()
    with torch.no_grad():  # frames are independent
        single = head([f[1:2] for f in feats], (56, 84))
    torch.testing.assert_close(single[0], depth[1], rtol=1e-5, atol=1e-5)


def test_bad_features_and_config(tiny):
    cfg, _, head = tiny
    feats = [torch.zeros(2, 24, cfg.embed_dim)] * 4
    with pytest.raises(InputError, match=r"Received shapes \[\[2, 24, 64\], \[2, 24, 64\], \[2, 24, 64\]\]"):
        head(feats[:3], (56, 84))
    with pytest.raises(InputError, match="Expected 4 tensors"):
        head(feats, (70, 70))
    bad = from_name("tiny")
    bad.metric_depth.min_depth, bad.metric_depth.max_depth = 5.0, 1.0
    with pytest.raises(ConfigError, match="min_depth"):
        MetricDepth(bad)
