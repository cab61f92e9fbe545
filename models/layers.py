"""Transformer building blocks shared by the DINOv2 encoder, the VGGT aggregator and the camera head.

Parameter names follow upstream VGGT/DINOv2 (``norm1``, ``attn.qkv``, ``attn.q_norm``, ``ls1.gamma``, ...)
so checkpoints load by name. Attention is written with ``F.scaled_dot_product_attention`` instead of
``nn.MultiheadAttention``, which exports to ONNX as a tangle of reshapes.

2D RoPE is applied from precomputed ``(cos, sin)`` tables of shape [N, head_dim] (one row per token), so
the blocks have no data-dependent control flow and trace with a dynamic number of frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [N, head_dim]


class LayerScale(nn.Module):
    """Per-channel learned scale ``x * gamma`` (CaiT)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """Linear -> GELU (exact erf form) -> Linear."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (the "rotate-half" RoPE form, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., N, D] by tables [N, D] built by `RotaryPositionEmbedding2D`.

    The first D/2 channels rotate by the row position and the last D/2 by the column position, each
    half with its own rotate-half; the tables already hold [cos_y, cos_x] side by side.
    """
    y_half, x_half = x.chunk(2, dim=-1)
    rotated = torch.cat((rotate_half(y_half), rotate_half(x_half)), dim=-1)
    return x * cos + rotated * sin


class RotaryPositionEmbedding2D(nn.Module):
    """2D rotary position embedding of VGGT (base frequency 100 by default).

    Holds no state: `tables` turns integer (row, col) positions into (cos, sin) tables, computed in
    fp32 exactly as upstream does (angles = position * base^(-2k/d), then cos/sin).
    """

    def __init__(self, frequency: float = 100.0) -> None:
        super().__init__()
        self.base_frequency = frequency

    def tables(self, positions: torch.Tensor, head_dim: int, dtype: torch.dtype = torch.float32) -> Rope:
        """positions: [N, 2] (row, col) -> (cos, sin), each [N, head_dim] in ``dtype``."""
        assert head_dim % 4 == 0, f"2D RoPE needs head_dim divisible by 4, got {head_dim}"
        half = head_dim // 2  # channels per axis
        exponents = torch.arange(0, half, 2, device=positions.device).float() / half
        inv_freq = 1.0 / (self.base_frequency ** exponents)  # [half/2]
        pos = positions.float()
        angles_y = pos[:, 0:1] * inv_freq  # [N, half/2]
        angles_x = pos[:, 1:2] * inv_freq
        angles = torch.cat((angles_y, angles_y, angles_x, angles_x), dim=-1)  # [N, head_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def position_grid(h: int, w: int, num_special: int, device: torch.device | None = None) -> torch.Tensor:
    """Token positions of one frame: ``num_special`` tokens at (0, 0), then patches at (row+1, col+1).

    Returns [num_special + h*w, 2] int64 (row, col), patches in row-major order.
    """
    rows = torch.arange(h, device=device).repeat_interleave(w)  # [h*w]
    cols = torch.arange(w, device=device).repeat(h)
    patches = torch.stack((rows, cols), dim=-1) + 1  # [h*w, 2]
    special = torch.zeros(num_special, 2, dtype=patches.dtype, device=device)
    return torch.cat((special, patches), dim=0)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, optional qk-norm (LayerNorm over head_dim), optional RoPE.

    qk-norm is applied per head before RoPE, as upstream VGGT does.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False, norm_eps: float = 1e-5) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        b, n, c = x.shape
        # [B, N, 3C] -> [B, N, 3, heads, D] -> [3, B, heads, N, D]; rows of qkv are q, then k, then v
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope_2d(q, *rope)
            k = apply_rope_2d(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, D]
        out = out.transpose(1, 2).reshape(b, n, c)  # [B, heads, N, D] -> [B, N, C]
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x)).

    ``norm_eps`` is 1e-5 in the VGGT aggregator and camera head, 1e-6 inside DINOv2.
    ``init_values`` falsy means no LayerScale (as upstream).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, init_values: float | None = None,
                 qk_norm: bool = False, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        return x + self.ls2(self.mlp(self.norm2(x)))
