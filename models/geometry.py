"""The geometry transformer (DESIGN.md §1 row ``geometry``): VGGT's aggregator without its patch embed,
plus the camera, depth and point heads.

Input: patch tokens [S, P, C] of one sequence (frame 0 is the reference frame) and the image size.
Each frame gets [camera (1), registers (R), patches (P)] tokens; the first frame uses slot 0 of the
learned special tokens and every other frame slot 1 (the only thing marking the reference frame).
Then ``depth`` rounds of frame attention (within each frame) and global attention (over all S*T tokens),
both with 2D RoPE and qk-norm. Heads read the concatenated [frame, global] outputs.

Traceable: no Python branch depends on tensor values; shapes come from ``tokens`` and ``image_hw``,
so it exports with a dynamic S (set ``dpt_chunk_size = None`` before exporting).
"""

from __future__ import annotations

import torch
from torch import nn

from vidllm_edge.errors import ConfigError, InputError
from vidllm_edge.models.config import VGGTConfig
from vidllm_edge.models.heads import CameraHead, DPTHead
from vidllm_edge.models.layers import Block, RotaryPositionEmbedding2D, position_grid

_ORDER = ("frame", "global")


class GeometryTransformer(nn.Module):
    """Alternating-attention aggregator (``camera_token``, ``register_token``, ``frame_blocks``,
    ``global_blocks``) and the heads ``camera_head``, ``depth_head``, ``point_head`` of VGGT."""

    def __init__(self, vcfg: VGGTConfig) -> None:
        super().__init__()
        agg = vcfg.aggregator
        dim, depth, heads = int(agg["embed_dim"]), int(agg["depth"]), int(agg["num_heads"])
        self.patch_size = int(agg["patch_size"])
        self.embed_dim = dim
        self.num_register_tokens = int(agg["num_register_tokens"])
        self.patch_start_idx = 1 + self.num_register_tokens
        self.aa_order = list(agg["aa_order"])
        self.aa_block_size = int(agg["aa_block_size"])
        if sorted(self.aa_order) != sorted(_ORDER) or depth % self.aa_block_size:
            raise ConfigError("vggt.aggregator", f"aa_order {self.aa_order} / aa_block_size {self.aa_block_size} "
                              f"do not fit depth {depth}.",
                              "Use aa_order ['frame', 'global'] and an aa_block_size dividing depth.")
        self.rope = RotaryPositionEmbedding2D(agg["rope_freq"]) if agg["rope_freq"] > 0 else None
        kw = dict(mlp_ratio=agg["mlp_ratio"], qkv_bias=agg["qkv_bias"], proj_bias=agg["proj_bias"],
                  ffn_bias=agg["ffn_bias"], init_values=agg["init_values"], qk_norm=agg["qk_norm"])
        self.frame_blocks = nn.ModuleList(Block(dim, heads, **kw) for _ in range(depth))
        self.global_blocks = nn.ModuleList(Block(dim, heads, **kw) for _ in range(depth))
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, self.num_register_tokens, dim))
        if not self.camera_token.is_meta:
            nn.init.normal_(self.camera_token, std=1e-6)
            nn.init.normal_(self.register_token, std=1e-6)
        self.camera_head = CameraHead(**vcfg.camera_head)
        self.depth_head = DPTHead(**vcfg.depth_head)
        self.point_head = DPTHead(**vcfg.point_head)
        self.dpt_chunk_size: int | None = 8  # frames per DPT pass (memory); None for export
        num_outputs = depth  # one [frame, global] output per block pair
        needed = set(vcfg.depth_head["intermediate_layer_idx"]) | set(vcfg.point_head["intermediate_layer_idx"])
        if not all(-num_outputs <= i < num_outputs for i in needed):
            raise ConfigError("vggt heads: intermediate_layer_idx", f"{sorted(needed)} exceed the {num_outputs} "
                              "aggregator outputs.", "Use indices below vggt.aggregator.depth.")
        self._keep = {i % num_outputs for i in needed} | {num_outputs - 1}
        self.num_outputs = num_outputs

    def special_tokens(self, s: int) -> torch.Tensor:
        """[S, 1 + R, C]: slot 0 for frame 0, slot 1 for every other frame."""
        first = (torch.arange(s, device=self.camera_token.device) == 0).view(s, 1, 1)  # [S, 1, 1]
        cam = torch.where(first, self.camera_token[0, 0:1], self.camera_token[0, 1:2])  # -> [S, 1, C]
        reg = torch.where(first, self.register_token[0, 0:1], self.register_token[0, 1:2])  # -> [S, R, C]
        return torch.cat([cam, reg], dim=1)

    def aggregate(self, tokens: torch.Tensor, image_hw: tuple[int, int],
                  keep_all: bool = False) -> dict[int, torch.Tensor]:
        """Patch tokens [S, P, C] -> {output index: [S, T, 2C]} (all outputs if ``keep_all``)."""
        s, p, c = tokens.shape
        h, w = image_hw[0] // self.patch_size, image_hw[1] // self.patch_size
        if p != h * w or c != self.embed_dim:
            raise InputError("Input tensor: tokens", f"Received shape {list(tokens.shape)} for image size "
                             f"{list(image_hw)}.", f"Expected [S, {h * w}, {self.embed_dim}] "
                             f"(patches of {self.patch_size}x{self.patch_size} pixels, encoder width).")
        x = torch.cat([self.special_tokens(s).to(tokens.dtype), tokens], dim=1)  # [S, T, C]
        t = x.shape[1]
        rope = None
        if self.rope is not None:
            pos = position_grid(h, w, self.patch_start_idx, device=tokens.device)  # [T, 2]
            cos, sin = self.rope.tables(pos, c // self.frame_blocks[0].attn.num_heads, tokens.dtype)
            rope = (cos, sin)
        outputs: dict[int, torch.Tensor] = {}
        out_idx = 0
        for start in range(0, len(self.frame_blocks), self.aa_block_size):
            inter: dict[str, list[torch.Tensor]] = {"frame": [], "global": []}
            for kind in self.aa_order:
                for i in range(start, start + self.aa_block_size):
                    if kind == "frame":
                        x = self.frame_blocks[i](x, rope=rope)  # attention within each frame: [S, T, C]
                    else:
                        g_rope = None if rope is None else (rope[0].repeat(s, 1), rope[1].repeat(s, 1))
                        x = self.global_blocks[i](x.reshape(1, s * t, c), rope=g_rope)  # [S, T, C] -> [1, S*T, C]
                        x = x.reshape(s, t, c)  # [1, S*T, C] -> [S, T, C]
                    inter[kind].append(x)
            for f, g in zip(inter["frame"], inter["global"]):
                if keep_all or out_idx in self._keep:
                    outputs[out_idx] = torch.cat([f, g], dim=-1)  # [S, T, 2C]
                out_idx += 1
        return outputs

    def _dpt(self, head: DPTHead, outputs: dict[int, torch.Tensor], image_hw: tuple[int, int]):
        lists = [outputs.get(i % self.num_outputs) for i in range(self.num_outputs)]
        chunk = self.dpt_chunk_size
        s = outputs[self.num_outputs - 1].shape[0]
        if chunk is None or s <= chunk:
            return head(lists, image_hw, self.patch_start_idx)
        parts = [head([None if x is None else x[i:i + chunk] for x in lists], image_hw, self.patch_start_idx)
                 for i in range(0, s, chunk)]  # frames are independent in the DPT head
        return tuple(torch.cat(p, dim=0) for p in zip(*parts))

    def forward(self, tokens: torch.Tensor, image_hw: tuple[int, int],
                return_aggregated: bool = False) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """tokens [S, P, C], image_hw (H, W) in pixels -> dict of

        ``pose_enc`` [S, 9], ``pose_enc_list`` (4 x [S, 9]), ``depth`` [S, H, W], ``depth_conf`` [S, H, W],
        ``world_points`` [S, H, W, 3], ``world_points_conf`` [S, H, W]; with ``return_aggregated`` also
        ``aggregated_tokens`` (every aggregator output, [S, T, 2C]).
        """
        image_hw = (int(image_hw[0]), int(image_hw[1]))
        outputs = self.aggregate(tokens, image_hw, keep_all=return_aggregated)
        pose_list = self.camera_head(outputs[self.num_outputs - 1][:, 0])  # camera token: [S, 2C]
        depth, depth_conf = self._dpt(self.depth_head, outputs, image_hw)
        points, points_conf = self._dpt(self.point_head, outputs, image_hw)
        out = {"pose_enc": pose_list[-1], "pose_enc_list": pose_list, "depth": depth[..., 0],
               "depth_conf": depth_conf, "world_points": points, "world_points_conf": points_conf}
        if return_aggregated:
            out["aggregated_tokens"] = [outputs[i] for i in range(self.num_outputs)]
        return out
