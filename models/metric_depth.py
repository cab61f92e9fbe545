"""Metric depth (DESIGN.md §1 row ``metric_depth``): DPT decoder + metric-bins head on encoder features.

The decoder is VGGT's `DPTHead` in ``feature_only`` mode on the 4 encoder feature maps. The bins head is
AdaBins/ZoeDepth-style: a global descriptor predicts bin widths (softplus, normalised to span
[min_depth, max_depth]), a conv predicts per-pixel logits over the bins, and depth is the
softmax-weighted sum of the bin centres. Depth is therefore always inside [min_depth, max_depth].

The global descriptor is the mean of the deepest encoder feature over patches (ZoeDepth conditions its
bins on the bottleneck too); it is cheaper than pooling the full-resolution decoder map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidllm_edge.errors import ConfigError, InputError
from vidllm_edge.models.config import VidLLMConfig
from vidllm_edge.models.heads import DPTHead
from vidllm_edge.models.layers import Mlp

NUM_FEATURES = 4
_MIN_WIDTH = 1e-3  # keeps every bin strictly positive before normalisation


class MetricDepth(nn.Module):
    """DPT decoder + metric bins: 4 feature maps [S_m, P, C] -> metric depth [S_m, H, W] in metres."""

    def __init__(self, cfg: VidLLMConfig) -> None:
        super().__init__()
        md = cfg.metric_depth
        if not 0 < md.min_depth < md.max_depth or md.num_bins < 2:
            raise ConfigError("metric_depth", f"has min_depth {md.min_depth}, max_depth {md.max_depth}, "
                              f"num_bins {md.num_bins}.", "Use 0 < min_depth < max_depth and num_bins >= 2.")
        self.patch_size = cfg.patch_size
        self.embed_dim = cfg.embed_dim
        self.min_depth = float(md.min_depth)
        self.max_depth = float(md.max_depth)
        feats = int(md.features)
        self.decoder = DPTHead(dim_in=cfg.embed_dim, patch_size=cfg.patch_size, features=feats,
                               out_channels=md.out_channels, intermediate_layer_idx=list(range(NUM_FEATURES)),
                               pos_embed=True, feature_only=True)
        self.bin_mlp = Mlp(cfg.embed_dim, max(feats, 32), md.num_bins)
        self.bin_logits = nn.Sequential(
            nn.Conv2d(feats, feats, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(feats, md.num_bins, kernel_size=1),
        )

    def bin_centres(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Bin centres [S_m, num_bins] in metres, ascending, inside (min_depth, max_depth)."""
        pooled = features[-1].mean(dim=1)  # [S_m, P, C] -> [S_m, C]
        widths = F.softplus(self.bin_mlp(pooled).float()) + _MIN_WIDTH  # [S_m, bins]
        widths = widths / widths.sum(dim=-1, keepdim=True) * (self.max_depth - self.min_depth)
        return self.min_depth + torch.cumsum(widths, dim=-1) - 0.5 * widths

    def _check(self, features: list[torch.Tensor], image_hw: tuple[int, int]) -> None:
        h, w = image_hw[0] // self.patch_size, image_hw[1] // self.patch_size
        shapes = [list(f.shape) for f in features]
        ok = len(features) == NUM_FEATURES and all(
            f.ndim == 3 and f.shape[1:] == (h * w, self.embed_dim) and f.shape[0] == features[0].shape[0]
            for f in features)
        if not ok:
            raise InputError("Input tensors: metric-depth features", f"Received shapes {shapes}.",
                             f"Expected {NUM_FEATURES} tensors [S_m, {h * w}, {self.embed_dim}] for images "
                             f"of {list(image_hw)} (encoder features of the same frames).")

    def forward(self, features: list[torch.Tensor], image_hw: tuple[int, int]) -> torch.Tensor:
        """features: 4 x [S_m, P, C] (`EncoderOutput.features`); image_hw: (H, W) in pixels.

        Returns metric depth [S_m, H, W] in metres, within [min_depth, max_depth] (fp32).
        """
        image_hw = (int(image_hw[0]), int(image_hw[1]))
        self._check(features, image_hw)
        fused = self.decoder(features, image_hw)  # [S_m, F, H, W]
        prob = torch.softmax(self.bin_logits(fused).float(), dim=1)  # [S_m, bins, H, W]
        centres = self.bin_centres(features)  # [S_m, bins]
        depth = (prob * centres[:, :, None, None]).sum(dim=1)  # [S_m, H, W]
        return depth.clamp(self.min_depth, self.max_depth)  # guards the range against rounding only
