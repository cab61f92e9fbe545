"""Cross-Task Adapter (CTA, DESIGN.md §1 row ``cta``): one encoder stream split into a geometry stream
and a language stream that exchange information through a few learnable bridge tokens.

    T_geom = φ_geom(T_base),  T_lang = φ_lang(T_base)                    φ: Linear-GELU-Linear
    B'     = Attn_g(q=B, kv=LN_g(T_geom)) + Attn_l(q=B, kv=LN_l(T_lang))  over all S·P tokens of the clip
    T'_x   = T_x + Attn_wx(q=LN_qx(T_x), kv=B')                          x in {geom, lang}

Attention is written with Linear projections and `F.scaled_dot_product_attention` rather than
`nn.MultiheadAttention`, whose fused path exports badly to ONNX with a dynamic batch. There is no
data-dependent control flow: the number of frames S is a dynamic axis of the ``perception`` unit.
Since the bridge tokens carry no frame position, the adapter is equivariant to a permutation of frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidllm_edge.errors import ConfigError, InputError
from vidllm_edge.models.config import AdapterConfig

MODES = ("cta", "none")


class CrossAttention(nn.Module):
    """Multi-head attention of ``num_heads`` heads from queries [B, Nq, C] to keys/values [B, Nk, C]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(f"Adapter heads: {num_heads}", f"do not divide the width {dim}.",
                              "Set adapter.num_heads to a divisor of the encoder width.")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return x.reshape(b, -1, self.num_heads, self.head_dim).transpose(1, 2)  # [B, N, C] -> [B, h, N, d]

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """query [B, Nq, C], context [B, Nk, C] -> [B, Nq, C]."""
        b = query.shape[0]
        q, k, v = self._split(self.q(query)), self._split(self.k(context)), self._split(self.v(context))
        o = F.scaled_dot_product_attention(q, k, v)  # [B, h, Nq, d]
        o = o.transpose(1, 2).reshape(b, -1, self.dim)  # [B, h, Nq, d] -> [B, Nq, C]
        return self.out(o)


def _stream_mlp(dim: int, ratio: int) -> nn.Sequential:
    """φ: Linear(C, ratio·C) - GELU - Linear(ratio·C, C)."""
    return nn.Sequential(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))


class CrossTaskAdapter(nn.Module):
    """Split T_base [S, P, C] into (T'_geom, T'_lang), each [S, P, C].

    Args:
        dim: encoder width C.
        cfg: `AdapterConfig`. ``mode='cta'`` builds the adapter above; ``mode='none'`` has no parameters
            and returns ``(T_base, T_base)`` (the same tensor twice: callers must not modify it in place).
    """

    def __init__(self, dim: int, cfg: AdapterConfig) -> None:
        super().__init__()
        if cfg.mode not in MODES:
            raise ConfigError(f"Adapter mode: {cfg.mode}", "is not a known mode.", f"Use one of: {', '.join(MODES)}.")
        if cfg.mode == "cta" and (cfg.num_bridge_tokens < 1 or cfg.mlp_ratio < 1):
            raise ConfigError(f"Adapter: {cfg.num_bridge_tokens} bridge tokens, mlp_ratio {cfg.mlp_ratio}",
                              "must both be at least 1.", "Set adapter.num_bridge_tokens and adapter.mlp_ratio >= 1.")
        self.dim = dim
        self.mode = cfg.mode
        if self.mode == "none":
            return
        self.phi_geom = _stream_mlp(dim, cfg.mlp_ratio)
        self.phi_lang = _stream_mlp(dim, cfg.mlp_ratio)
        self.bridge = nn.Parameter(torch.empty(cfg.num_bridge_tokens, dim))  # B [K, C]
        nn.init.trunc_normal_(self.bridge, std=0.02)
        self.norm_geom = nn.LayerNorm(dim)   # LN_g: keys/values of the geometry gather
        self.norm_lang = nn.LayerNorm(dim)   # LN_l: keys/values of the language gather
        self.gather_geom = CrossAttention(dim, cfg.num_heads)  # Attn_g: bridge <- geometry stream
        self.gather_lang = CrossAttention(dim, cfg.num_heads)  # Attn_l: bridge <- language stream
        self.norm_q_geom = nn.LayerNorm(dim)  # LN_q,geom: queries of the geometry write-back
        self.norm_q_lang = nn.LayerNorm(dim)
        self.write_geom = CrossAttention(dim, cfg.num_heads)
        self.write_lang = CrossAttention(dim, cfg.num_heads)

    def forward(self, t_base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t_base [S, P, C] -> (t_geom [S, P, C], t_lang [S, P, C])."""
        if t_base.dim() != 3 or t_base.shape[-1] != self.dim:
            raise InputError("Input tensor: t_base", f"Received shape {list(t_base.shape)}.",
                             f"Expected [S, P, {self.dim}] (frames, patches, encoder width).")
        if self.mode == "none":
            return t_base, t_base
        t_geom = self.phi_geom(t_base)  # [S, P, C]
        t_lang = self.phi_lang(t_base)  # [S, P, C]
        bridge = self.bridge.unsqueeze(0)  # [K, C] -> [1, K, C]
        flat_geom = self.norm_geom(t_geom).reshape(1, -1, self.dim)  # [S, P, C] -> [1, S*P, C]
        flat_lang = self.norm_lang(t_lang).reshape(1, -1, self.dim)  # [S, P, C] -> [1, S*P, C]
        bridged = self.gather_geom(bridge, flat_geom) + self.gather_lang(bridge, flat_lang)  # B' [1, K, C]
        out_geom = self._write_back(t_geom, self.norm_q_geom, self.write_geom, bridged)
        out_lang = self._write_back(t_lang, self.norm_q_lang, self.write_lang, bridged)
        return out_geom, out_lang

    def _write_back(self, t: torch.Tensor, norm: nn.LayerNorm, attn: CrossAttention,
                    bridged: torch.Tensor) -> torch.Tensor:
        """T' = T + Attn(q=LN(T), kv=B'); every token attends to the same K bridge tokens."""
        # Flattening the frames into one query sequence is exact (queries are independent) and keeps
        # the attention batch at 1, so the bridge tokens need no expand over a dynamic S.
        queries = norm(t).reshape(1, -1, self.dim)  # [S, P, C] -> [1, S*P, C]
        update = attn(queries, bridged)  # [1, S*P, C]
        return t + update.reshape(t.shape)  # [1, S*P, C] -> [S, P, C]
