"""The backend interface validates feeds before running (names, dtypes, ranks, bound and symbolic dims)."""

from __future__ import annotations

import pytest
import torch

from vidllm_edge.errors import InputError
from vidllm_edge.runtime.backend import Backend, validate_feed
from vidllm_edge.units import GEOMETRY, PERCEPTION, METRIC_DEPTH, FEATURE_NAMES


class Echo(Backend):
    name = "echo"

    def _run(self, feed):
        return {"seen": sorted(feed)}


def test_valid_feed_binds_symbols():
    assert validate_feed(PERCEPTION, {"images": torch.zeros(3, 3, 28, 42)}, {}) == {"S": 3, "H": 28, "W": 42}
    assert Echo(GEOMETRY, {"P": 6, "C": 8})({"t_geom": torch.zeros(2, 6, 8)}) == {"seen": ["t_geom"]}


@pytest.mark.parametrize("feed, message", [
    ({"images": torch.zeros(3, 28, 28)}, r"^Input tensor: images \| Received shape \[3, 28, 28\]\.\nNote: Expected images: float32\[S, 3, H, W\]"),
    ({"images": torch.zeros(2, 3, 28, 28, dtype=torch.float64)}, r"^Input tensor: images \| Received dtype float64\."),
    ({"images": torch.zeros(2, 4, 28, 28)}, r"^Input tensor: images \| Received shape \[2, 4, 28, 28\]"),
    ({"images": torch.zeros(2, 3, 28, 56)}, r"Received shape \[2, 3, 28, 56\]\.\nNote: .* with H=28, W=42\."),
    ({"frames": torch.zeros(2, 3, 28, 42)}, r"^Unit: perception \| got inputs \['frames'\]; missing \['images'\], unexpected \['frames'\]"),
    ({"images": [[0.0]]}, r"^Input tensor: images \| Received list, not a tensor"),
])
def test_bad_feeds_are_named(feed, message):
    with pytest.raises(InputError, match=message):
        Echo(PERCEPTION, {"H": 28, "W": 42})(feed)


def test_symbolic_dims_must_agree_across_inputs():
    feed = {n: torch.zeros(2, 6, 8) for n in FEATURE_NAMES}
    feed["feat3"] = torch.zeros(3, 6, 8)
    with pytest.raises(InputError, match=r"^Input tensor: feat3 \| Received shape \[3, 6, 8\]\.\nNote: .*Sm=2"):
        Echo(METRIC_DEPTH, {"P": 6, "C": 8})(feed)
