"""Configuration dataclasses and named presets (``tiny``, ``vggt-1b``, ``edge``, ``paper``).

The VGGT part mirrors upstream constructor arguments one to one (`VGGTConfig`), so a checkpoint of any
VGGT size loads from the ``constructor_args`` of its config. Every decision DESIGN.md §1 takes where
the paper is silent is a field here, so a released checkpoint can override it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vidllm_edge.errors import ConfigError

# DINOv2 sizes by upstream patch-embed name (embed_dim, depth, num_heads).
DINO_SIZES = {
    "dinov2_vits14_reg": (384, 12, 6),
    "dinov2_vitb14_reg": (768, 12, 12),
    "dinov2_vitl14_reg": (1024, 24, 16),
    "dinov2_vitg2_reg": (1536, 40, 24),
}


def _aggregator_defaults() -> dict[str, Any]:
    return dict(img_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                num_register_tokens=4, qkv_bias=True, proj_bias=True, ffn_bias=True,
                patch_embed="dinov2_vitl14_reg", aa_order=["frame", "global"], aa_block_size=1,
                qk_norm=True, rope_freq=100, init_values=0.01)


def _camera_defaults() -> dict[str, Any]:
    return dict(dim_in=2048, trunk_depth=4, pose_encoding_type="absT_quaR_FoV", num_heads=16, mlp_ratio=4,
                init_values=0.01, trans_act="linear", quat_act="linear", fl_act="relu")


def _dpt_defaults(output_dim: int, activation: str) -> dict[str, Any]:
    return dict(dim_in=2048, patch_size=14, output_dim=output_dim, activation=activation,
                conf_activation="expp1", features=256, out_channels=[256, 512, 1024, 1024],
                intermediate_layer_idx=[4, 11, 17, 23], pos_embed=True, feature_only=False, down_ratio=1)


@dataclass
class VGGTConfig:
    """Upstream VGGT constructor arguments, one dict per module (as in the oracle's config.json).

    ``dino_patch_embed`` optionally overrides the DINOv2 size (embed_dim, depth, num_heads, mlp_ratio)
    for patch-embed names not in DINO_SIZES, so tiny test models can use a real DINO encoder.
    """

    aggregator: dict[str, Any] = field(default_factory=_aggregator_defaults)
    camera_head: dict[str, Any] = field(default_factory=_camera_defaults)
    point_head: dict[str, Any] = field(default_factory=lambda: _dpt_defaults(4, "inv_log"))
    depth_head: dict[str, Any] = field(default_factory=lambda: _dpt_defaults(2, "exp"))
    dino_patch_embed: dict[str, Any] | None = None

    @classmethod
    def from_constructor_args(cls, args: dict[str, Any]) -> "VGGTConfig":
        """Build from a dict like the oracle's ``config.json -> constructor_args`` (missing keys: defaults)."""
        base = cls()
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(args) - known - {"track_head"}
        if extra:
            raise ConfigError("VGGT config", f"has unknown sections {sorted(extra)}.",
                              f"Use the sections {sorted(known)} (upstream constructor arguments).")
        for name in ("aggregator", "camera_head", "point_head", "depth_head"):
            section = getattr(base, name)
            section.update(args.get(name) or {})
        base.dino_patch_embed = args.get("dino_patch_embed")
        return base

    @property
    def embed_dim(self) -> int:
        return int(self.aggregator["embed_dim"])

    @property
    def patch_size(self) -> int:
        return int(self.aggregator["patch_size"])


@dataclass
class EncoderConfig:
    """Which vision encoder produces T_base. ``vggt``: the DINOv2 patch embed inside VGGT (its size comes
    from ``VGGTConfig``); ``clip``: a `transformers` CLIP vision tower built from ``clip`` kwargs or loaded
    from the local folder ``path``. ``feature_layers``: encoder blocks whose outputs feed metric depth."""

    kind: str = "vggt"
    clip: dict[str, Any] | None = None
    path: str | None = None
    feature_layers: list[int] = field(default_factory=lambda: [4, 11, 17, 23])


@dataclass
class AdapterConfig:
    """Cross-Task Adapter. ``mode='none'`` passes T_base through unchanged to both streams."""

    mode: str = "cta"
    num_bridge_tokens: int = 16
    num_heads: int = 16
    mlp_ratio: int = 4


@dataclass
class MetricDepthConfig:
    """DPT decoder + metric-bins head on encoder features (run on at most ``max_frames`` frames)."""

    features: int = 256
    out_channels: list[int] = field(default_factory=lambda: [256, 512, 1024, 1024])
    num_bins: int = 64
    min_depth: float = 0.1
    max_depth: float = 20.0
    max_frames: int = 16


@dataclass
class SceneConfig:
    """Lifting, voxel pooling and the projector into the LLM."""

    pos_mlp_hidden: int = 256
    voxel_size: float = 0.2
    max_visual_tokens: int = 1024
    coarsen_factor: float = 1.5


@dataclass
class LLMConfig:
    """A `transformers` causal LM: built from ``hf_config`` (a dict with ``model_type``) or loaded from the
    local folder ``path``. Prompting: chat template with ``image_token`` replaced by the visual tokens;
    grounding: the hidden state of ``loc_token`` goes through the box head."""

    hf_config: dict[str, Any] | None = None
    path: str | None = None
    image_token: str = "<image>"
    loc_token: str = "<loc>"
    system_prompt: str = "You are a helpful assistant that understands 3D scenes."
    box_head_hidden: int = 256


@dataclass
class VidLLMConfig:
    """The whole model. ``image_size`` is the short side frames are resized to (a multiple of 14)."""

    name: str = "custom"
    image_size: int = 518
    num_frames: int = 32
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    vggt: VGGTConfig = field(default_factory=VGGTConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    metric_depth: MetricDepthConfig = field(default_factory=MetricDepthConfig)
    scene: SceneConfig = field(default_factory=SceneConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VidLLMConfig":
        """Inverse of `to_dict`; unknown fields are an error (they would be silently ignored otherwise)."""
        d = copy.deepcopy(d)
        sections = {"encoder": EncoderConfig, "vggt": VGGTConfig, "adapter": AdapterConfig,
                    "metric_depth": MetricDepthConfig, "scene": SceneConfig, "llm": LLMConfig}
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value = d.pop(f.name)
            if f.name in sections:
                sub = sections[f.name]
                names = {g.name for g in dataclasses.fields(sub)}
                bad = set(value) - names
                if bad:
                    raise ConfigError(f"config.json: {f.name}", f"has unknown fields {sorted(bad)}.",
                                      f"Known fields: {sorted(names)}.")
                value = sub(**value)
            kwargs[f.name] = value
        if d:
            raise ConfigError("config.json", f"has unknown fields {sorted(d)}.",
                              "Was it written by a newer vidllm-edge? Remove the fields or upgrade.")
        return cls(**kwargs)

    @property
    def patch_size(self) -> int:
        return self.vggt.patch_size

    @property
    def embed_dim(self) -> int:
        return self.vggt.embed_dim


def _qwen2_1_5b() -> dict[str, Any]:
    return dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def _llama_7b() -> dict[str, Any]:
    return dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def _tiny() -> VidLLMConfig:
    dim = 64
    vggt = VGGTConfig(
        aggregator=dict(_aggregator_defaults(), img_size=70, embed_dim=dim, depth=2, num_heads=4,
                        patch_embed="dinov2_tiny_reg"),
        camera_head=dict(_camera_defaults(), dim_in=2 * dim, trunk_depth=1, num_heads=4),
        point_head=dict(_dpt_defaults(4, "inv_log"), dim_in=2 * dim, features=16, out_channels=[16, 32, 32, 32],
                        intermediate_layer_idx=[0, 1, 1, 1]),
        depth_head=dict(_dpt_defaults(2, "exp"), dim_in=2 * dim, features=16, out_channels=[16, 32, 32, 32],
                        intermediate_layer_idx=[0, 1, 1, 1]),
        dino_patch_embed=dict(embed_dim=dim, depth=2, num_heads=4, mlp_ratio=4.0),
    )
    return VidLLMConfig(
        name="tiny", image_size=70, num_frames=4,
        encoder=EncoderConfig(kind="vggt", feature_layers=[0, 1, 1, 1]),
        vggt=vggt,
        adapter=AdapterConfig(mode="cta", num_bridge_tokens=4, num_heads=4, mlp_ratio=2),
        metric_depth=MetricDepthConfig(features=16, out_channels=[16, 32, 32, 32], num_bins=16, max_frames=4),
        scene=SceneConfig(pos_mlp_hidden=32, voxel_size=0.5, max_visual_tokens=32),
        llm=LLMConfig(hf_config=dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True),
                      box_head_hidden=32),
    )


def _vggt_1b() -> VidLLMConfig:
    return VidLLMConfig(name="vggt-1b", adapter=AdapterConfig(mode="none"),
                        llm=LLMConfig(hf_config=_qwen2_1_5b()))


def _edge() -> VidLLMConfig:
    return VidLLMConfig(name="edge", llm=LLMConfig(hf_config=_qwen2_1_5b()))


def _paper() -> VidLLMConfig:
    return VidLLMConfig(name="paper", llm=LLMConfig(hf_config=_llama_7b()))


PRESETS = {"tiny": _tiny, "vggt-1b": _vggt_1b, "edge": _edge, "paper": _paper}


def from_name(name: str) -> VidLLMConfig:
    """Return a fresh config for preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"Preset: {name}", "is not a known preset.", f"Choose one of: {', '.join(PRESETS)}.")
    return PRESETS[name]()
