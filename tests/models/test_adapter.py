"""Cross-Task Adapter: shapes, the 'none' mode, determinism, global bridge, frame equivariance, export."""

from __future__ import annotations

import pytest
import torch

from vidllm_edge.errors import ConfigError, InputError
from vidllm_edge.models.adapter import CrossTaskAdapter
from vidllm_edge.models.config import AdapterConfig

DIM = 32


def _adapter(mode: str = "cta") -> CrossTaskAdapter:
    torch.manual_seed(0)
    return CrossTaskAdapter(DIM, AdapterConfig(mode=mode, num_bridge_tokens=4, num_heads=4, mlp_ratio=2)).eval()


def _tokens(s: int = 3, p: int = 6) -> torch.Tensor:
    return torch.randn(s, p, DIM, generator=torch.Generator().manual_seed(1))


def test_cta_shapes_and_changes_tokens():
    t = _tokens()
    t_geom, t_lang = _adapter()(t)
    assert t_geom.shape == t_lang.shape == t.shape
    assert not torch.allclose(t_geom, t) and not torch.allclose(t_lang, t)
    assert not torch.allclose(t_geom, t_lang)


def test_none_mode_is_identity_without_parameters():
    adapter = _adapter("none")
    t = _tokens()
    t_geom, t_lang = adapter(t)
    assert torch.equal(t_geom, t) and torch.equal(t_lang, t)
    assert sum(p.numel() for p in adapter.parameters()) == 0


def test_unknown_mode_and_bad_heads_are_config_errors():
    with pytest.raises(ConfigError, match="Adapter mode: cat"):
        CrossTaskAdapter(DIM, AdapterConfig(mode="cat"))
    with pytest.raises(ConfigError, match="do not divide"):
        CrossTaskAdapter(DIM, AdapterConfig(num_heads=5))


def test_wrong_width_is_input_error():
    with pytest.raises(InputError, match="t_base"):
        _adapter()(torch.zeros(2, 3, DIM + 1))


def test_deterministic_without_grad():
    adapter, t = _adapter(), _tokens()
    with torch.no_grad():
        first, second = adapter(t), adapter(t.clone())
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_bridge_is_global_across_frames():
    adapter, t = _adapter(), _tokens()
    changed = t.clone()
    changed[0, 2] += 5.0  # one token of frame 0
    with torch.no_grad():
        before, after = adapter(t), adapter(changed)
    for a, b in zip(before, after):
        assert (a[1] - b[1]).abs().max() > 1e-5, "frame 1 must see frame 0 through the bridge tokens"


def test_equivariant_to_frame_permutation():
    adapter, t = _adapter(), _tokens(s=4)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        ref, out = adapter(t), adapter(t[perm])
    for a, b in zip(ref, out):
        torch.testing.assert_close(a[perm], b, rtol=1e-5, atol=1e-5)


def test_exports_with_dynamic_frames():
    adapter = _adapter()
    frames = torch.export.Dim("S", min=1, max=64)
    program = torch.export.export(adapter, (_tokens(s=3),), dynamic_shapes=({0: frames},))
    t = _tokens(s=5)
    with torch.no_grad():
        for a, b in zip(program.module()(t), adapter(t)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
