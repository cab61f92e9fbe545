"""Vision encoders producing T_base [S, P, C] (DESIGN.md §1 row ``encoder``).

* `DinoEncoder`: DINOv2 with registers exactly as inside VGGT (``aggregator.patch_embed`` upstream).
* `ConvPatchEmbed`: VGGT's ``"conv"`` patch embed (one 14x14 stride-14 conv), used by small test models.
* `CLIPEncoder`: a `transformers` CLIP vision tower.

Every encoder takes images [S, 3, H, W] in [0, 1] and normalises them itself, returns an `EncoderOutput`
and has a ``patch_size`` attribute. Normalisation constants are non-persistent buffers (not in
checkpoints); ``reset_buffers()`` recreates them after a meta-device load.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vidllm_edge.errors import CheckpointError, ConfigError
from vidllm_edge.models.config import DINO_SIZES, EncoderConfig, VGGTConfig, VidLLMConfig
from vidllm_edge.models.layers import Block

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NUM_FEATURES = 4


class EncoderOutput(NamedTuple):
    """``tokens``: patch tokens [S, P, C] after the final norm. ``features``: 4 maps [S, P, C] (final norm
    applied to the patch tokens of the blocks in ``feature_layers``) for the metric-depth decoder."""

    tokens: torch.Tensor
    features: list[torch.Tensor]


class _Normalize(nn.Module):
    """(x - mean) / std with non-persistent [1, 3, 1, 1] buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self._values = (tuple(mean), tuple(std))
        self.reset_buffers()

    def reset_buffers(self) -> None:
        mean, std = self._values
        self.register_buffer("mean", torch.tensor(mean, device="cpu").view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, device="cpu").view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv: [S, 3, H, W] -> [S, (H/p)(W/p), C], row-major patches."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [S, C, h, w] -> [S, h*w, C]


class ConvPatchEmbed(nn.Module):
    """VGGT's ``"conv"`` patch embed: ImageNet normalisation, then one conv. Key ``proj.weight/bias``.

    It has no blocks, so its 4 features are the tokens themselves.
    """

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.normalize = _Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        """images [S, 3, H, W] in [0, 1] -> EncoderOutput with tokens [S, P, C]."""
        x = self.proj(self.normalize(images))
        tokens = x.flatten(2).transpose(1, 2)  # [S, C, h, w] -> [S, P, C]
        return EncoderOutput(tokens, [tokens] * NUM_FEATURES)


class DinoEncoder(nn.Module):
    """DINOv2 ViT with register tokens, as VGGT embeds it (LayerNorm eps 1e-6, LayerScale, no qk-norm/RoPE).

    Token order: [cls, registers, patches]; cls and patches get the position table, registers do not.
    The table is used as is when the patch grid equals the training grid, otherwise its patch part is
    resized with bicubic + antialias (PIL-like) in fp32, as upstream.
    """

    def __init__(self, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 img_size: int = 518, patch_size: int = 14, num_register_tokens: int = 4,
                 qkv_bias: bool = True, proj_bias: bool = True, ffn_bias: bool = True, init_values: float = 1.0,
                 interpolate_antialias: bool = True, interpolate_offset: float = 0.0,
                 feature_layers: Sequence[int] | None = None) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.feature_layers = _check_feature_layers(feature_layers, depth)
        grid = img_size // patch_size
        self.normalize = _Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        else:
            self.register_tokens = None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused at inference, kept for the checkpoint
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias, ffn_bias=ffn_bias,
                  init_values=init_values, norm_eps=1e-6)
            for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_tokens()

    def _init_tokens(self) -> None:
        if self.cls_token.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def patch_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position table of the patch tokens for an h x w patch grid: [1, h*w, C]."""
        table = self.pos_embed[:, 1:]
        m = int(math.isqrt(table.shape[1]))
        assert m * m == table.shape[1], f"pos_embed holds {table.shape[1]} patch entries, not a square grid"
        if (h, w) == (m, m):
            return table
        grid = table.float().reshape(1, m, m, -1).permute(0, 3, 1, 2)  # [1, m*m, C] -> [1, C, m, m]
        if self.interpolate_offset:
            scale = ((h + self.interpolate_offset) / m, (w + self.interpolate_offset) / m)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=self.interpolate_antialias)
        return grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(table.dtype)  # [1, C, h, w] -> [1, h*w, C]

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        """images [S, 3, H, W] in [0, 1] -> EncoderOutput (tokens [S, P, C], 4 features [S, P, C])."""
        s, _, height, width = images.shape
        h, w = height // self.patch_size, width // self.patch_size
        x = self.patch_embed(self.normalize(images))  # [S, P, C]
        x = x + self.patch_pos_embed(h, w)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(s, -1, -1)  # [S, 1, C]
        parts = [cls, x]
        if self.register_tokens is not None:
            parts.insert(1, self.register_tokens.expand(s, -1, -1))  # registers: no position embedding
        x = torch.cat(parts, dim=1)  # [S, 1 + R + P, C]
        start = 1 + self.num_register_tokens
        wanted = set(self.feature_layers)
        taps: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in wanted:
                taps[i] = self.norm(x[:, start:])
        tokens = self.norm(x)[:, start:]
        return EncoderOutput(tokens, [taps[i] for i in self.feature_layers])


def _check_feature_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    if layers is None:
        return default_feature_layers(depth)
    layers = [int(i) for i in layers]
    if len(layers) != NUM_FEATURES or not all(0 <= i < depth for i in layers):
        raise ConfigError(f"encoder.feature_layers: {layers}",
                          f"needs {NUM_FEATURES} block indices in [0, {depth - 1}].",
                          f"The encoder has {depth} blocks; e.g. {default_feature_layers(depth)}.")
    return layers


def default_feature_layers(depth: int) -> list[int]:
    """DPT taps for a ViT of ``depth`` blocks: [4, 11, 17, 23] for 24 blocks, evenly spaced otherwise."""
    if depth == 24:
        return [4, 11, 17, 23]
    return [max(0, round(depth * (k + 1) / NUM_FEATURES) - 1) for k in range(NUM_FEATURES)]


_DINO_KEYS = {"embed_dim", "depth", "num_heads", "mlp_ratio", "img_size", "patch_size", "num_register_tokens",
              "qkv_bias", "proj_bias", "ffn_bias", "init_values", "interpolate_antialias", "interpolate_offset",
              "ffn_layer", "block_chunks"}


def dino_kwargs(vcfg: VGGTConfig) -> dict:
    """DinoEncoder kwargs for VGGT's patch embed (size from ``dino_patch_embed`` or DINO_SIZES)."""
    agg = vcfg.aggregator
    name = agg["patch_embed"]
    kwargs = dict(img_size=agg["img_size"], patch_size=agg["patch_size"],
                  num_register_tokens=agg["num_register_tokens"], init_values=1.0)
    if vcfg.dino_patch_embed is not None:
        bad = set(vcfg.dino_patch_embed) - _DINO_KEYS
        if bad:
            raise ConfigError("vggt.dino_patch_embed", f"has unknown keys {sorted(bad)}.",
                              f"Known keys: {sorted(_DINO_KEYS)}.")
        kwargs.update(vcfg.dino_patch_embed)
    elif name in DINO_SIZES:
        embed_dim, depth, num_heads = DINO_SIZES[name]
        kwargs.update(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0)
    else:
        raise ConfigError(f"vggt.aggregator.patch_embed: {name}", "is not a known patch embed.",
                          f"Use 'conv', one of {sorted(DINO_SIZES)}, or give its size in vggt.dino_patch_embed.")
    if kwargs.pop("ffn_layer", "mlp") != "mlp" or kwargs.pop("block_chunks", 0) != 0:
        raise ConfigError("vggt.dino_patch_embed", "asks for ffn_layer != 'mlp' or block_chunks != 0.",
                          "VGGT's DINOv2 uses plain MLP blocks without chunking; remove those keys.")
    if kwargs["embed_dim"] != agg["embed_dim"]:
        raise ConfigError(f"vggt patch embed: {name}",
                          f"has width {kwargs['embed_dim']} but the aggregator expects {agg['embed_dim']}.",
                          "Make vggt.aggregator.embed_dim equal to the DINOv2 embed_dim.")
    return kwargs


def build_vggt_encoder(vcfg: VGGTConfig, feature_layers: Sequence[int] | None = None) -> nn.Module:
    """VGGT's patch embed as a standalone encoder: `ConvPatchEmbed` for ``"conv"`` names, else `DinoEncoder`.

    ``feature_layers``: DINO blocks tapped for `EncoderOutput.features` (None: `default_feature_layers`).
    """
    name = vcfg.aggregator["patch_embed"]
    if "conv" in name:  # upstream's test, kept literally
        return ConvPatchEmbed(vcfg.patch_size, vcfg.embed_dim)
    return DinoEncoder(**dino_kwargs(vcfg), feature_layers=feature_layers)


class CLIPEncoder(nn.Module):
    """A `transformers` CLIPVisionModel: CLIP normalisation inside, CLS dropped, post-LayerNorm applied to
    the patch tokens (like DINO's final norm). ``features``: hidden states after blocks ``feature_layers``.

    Built from ``cfg.clip`` kwargs (a CLIPVisionConfig dict), or loaded from the local folder ``cfg.path``.
    Position embeddings are interpolated for any H, W that are multiples of the patch size.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if cfg.path and torch.empty(0).device.type != "meta":
            try:
                self.model = CLIPVisionModel.from_pretrained(cfg.path, local_files_only=True, dtype=torch.float32)
            except (OSError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"CLIP folder: {cfg.path}", f"cannot be loaded ({exc}).",
                                      "Check the folder holds a CLIPVisionModel (or CLIPModel) save.") from exc
        else:
            if cfg.path:
                hf = CLIPVisionConfig.from_pretrained(cfg.path, local_files_only=True)
            elif cfg.clip:
                hf = CLIPVisionConfig(**{k: v for k, v in cfg.clip.items() if k != "transformers_version"})
            else:
                raise ConfigError("encoder.clip", "is empty and encoder.path is not set.",
                                  "Give CLIPVisionConfig kwargs in encoder.clip or a local folder in encoder.path.")
            self.model = CLIPVisionModel(hf)
        self.hf_config = self.model.config
        self.patch_size = int(self.hf_config.patch_size)
        self.embed_dim = int(self.hf_config.hidden_size)
        self.feature_layers = _check_feature_layers(cfg.feature_layers, int(self.hf_config.num_hidden_layers))
        self.normalize = _Normalize(CLIP_MEAN, CLIP_STD)

    def reset_buffers(self) -> None:
        """Recreate CLIP's non-persistent ``position_ids`` after a meta-device load."""
        emb = self.model.embeddings
        if emb.position_ids.is_meta:
            emb.register_buffer("position_ids", torch.arange(emb.num_positions).expand((1, -1)), persistent=False)

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        """images [S, 3, H, W] in [0, 1] -> EncoderOutput (tokens [S, P, C], 4 features [S, P, C])."""
        out = self.model(self.normalize(images), interpolate_pos_encoding=True, output_hidden_states=True)
        post = self.model.post_layernorm
        tokens = post(out.last_hidden_state[:, 1:])  # drop CLS: [S, 1+P, C] -> [S, P, C]
        # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of block i
        features = [post(out.hidden_states[i + 1][:, 1:]) for i in self.feature_layers]
        return EncoderOutput(tokens, features)


def build_encoder(cfg: VidLLMConfig) -> nn.Module:
    """The encoder selected by ``cfg.encoder.kind``: ``"vggt"`` (VGGT's DINOv2 or conv patch embed) or ``"clip"``.

    The encoder width and patch size must match the geometry transformer (``cfg.vggt``).
    """
    kind = cfg.encoder.kind
    if kind == "vggt":
        return build_vggt_encoder(cfg.vggt, cfg.encoder.feature_layers)
    if kind == "clip":
        enc = CLIPEncoder(cfg.encoder)
        if (enc.embed_dim, enc.patch_size) != (cfg.embed_dim, cfg.patch_size):
            raise ConfigError("encoder.clip",
                              f"has width {enc.embed_dim} and patch {enc.patch_size}, the geometry expects "
                              f"{cfg.embed_dim} and {cfg.patch_size}.",
                              "Use a CLIP ViT with hidden_size = vggt.aggregator.embed_dim and patch_size 14.")
        return enc
    raise ConfigError(f"encoder.kind: {kind}", "is not a known encoder.", "Use 'vggt' or 'clip'.")
