"""VGGT prediction heads: `CameraHead` (iterative pose refinement) and `DPTHead` (dense depth / points).

Both follow upstream VGGT numerically and by parameter name. They take per-frame token lists without a
batch dim: ``tokens_list[i]`` is [S, T, C] (T = special tokens + patches of one frame).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vidllm_edge.errors import ConfigError
from vidllm_edge.models.layers import Block, Mlp

# ---------------------------------------------------------------------------------------------- camera


def _act(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "linear":
        return x
    if kind == "relu":
        return F.relu(x)
    if kind == "exp":
        return torch.exp(x)
    if kind == "inv_log":
        return inverse_log_transform(x)
    raise ConfigError(f"camera_head activation: {kind}", "is not known.", "Use linear, relu, exp or inv_log.")


def inverse_log_transform(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * (exp(|x|) - 1)."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


class CameraHead(nn.Module):
    """absT_quaR_FoV camera head: refines a pose encoding [S, 9] over ``num_iterations`` (4) steps.

    Each step embeds the running (pre-activation) pose, modulates the normalised camera tokens with it
    (adaLN: shift, scale, gate), runs the trunk of plain blocks across frames and adds the predicted delta.
    """

    def __init__(self, dim_in: int = 2048, trunk_depth: int = 4, pose_encoding_type: str = "absT_quaR_FoV",
                 num_heads: int = 16, mlp_ratio: float = 4, init_values: float = 0.01, trans_act: str = "linear",
                 quat_act: str = "linear", fl_act: str = "relu") -> None:
        super().__init__()
        if pose_encoding_type != "absT_quaR_FoV":
            raise ConfigError(f"camera_head.pose_encoding_type: {pose_encoding_type}", "is not supported.",
                              "Use 'absT_quaR_FoV' (the only encoding VGGT ships).")
        for act in (trans_act, quat_act, fl_act):
            _act(torch.zeros(1), act)  # validate names at build time
        self.target_dim = 9
        self.acts = (trans_act, quat_act, fl_act)
        self.trunk = nn.Sequential(*[Block(dim_in, num_heads, mlp_ratio, init_values=init_values)
                                     for _ in range(trunk_depth)])
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.embed_pose = nn.Linear(self.target_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, self.target_dim)

    def activate(self, pose: torch.Tensor) -> torch.Tensor:
        """Per-part activations: translation [..., :3], quaternion [..., 3:7] (not normalised), FoV [..., 7:]."""
        t, q, fov = pose[..., :3], pose[..., 3:7], pose[..., 7:]
        return torch.cat([_act(t, self.acts[0]), _act(q, self.acts[1]), _act(fov, self.acts[2])], dim=-1)

    def forward(self, camera_tokens: torch.Tensor, num_iterations: int = 4) -> list[torch.Tensor]:
        """camera_tokens [S, C] (token 0 of the last aggregator output) -> list of pose encodings [S, 9]."""
        base = self.token_norm(camera_tokens)[None]  # [S, C] -> [1, S, C]: attention runs across frames
        normed = self.adaln_norm(base)
        pose = None
        out = []
        for _ in range(num_iterations):
            if pose is None:
                embedded = self.embed_pose(self.empty_pose_tokens.expand(1, base.shape[1], -1))
            else:
                embedded = self.embed_pose(pose)
            shift, scale, gate = self.poseLN_modulation(embedded).chunk(3, dim=-1)
            x = gate * (normed * (1 + scale) + shift) + base
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))  # [1, S, 9]
            pose = delta if pose is None else pose + delta
            out.append(self.activate(pose)[0])
        return out


# ---------------------------------------------------------------------------------------------- DPT


def uv_grid(width: int, height: int, aspect_ratio: float, dtype: torch.dtype = torch.float32,
            device: torch.device | None = None) -> torch.Tensor:
    """Normalised (u, v) grid [height, width, 2] spanning the image diagonal, as upstream `create_uv_grid`."""
    diag = (aspect_ratio ** 2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    xs = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, steps=width,
                        dtype=dtype, device=device)
    ys = torch.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, steps=height,
                        dtype=dtype, device=device)
    uu, vv = torch.meshgrid(xs, ys, indexing="xy")  # [height, width] each
    return torch.stack((uu, vv), dim=-1)


def _sincos(pos: torch.Tensor, dim: int, omega_0: float) -> torch.Tensor:
    """pos [M] -> [M, dim] = [sin(pos*w), cos(pos*w)] with w_k = omega_0^(-k/(dim/2)), in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / omega_0 ** (omega / (dim / 2.0))
    angles = pos.reshape(-1).double()[:, None] * omega[None, :]  # [M, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def uv_pos_embed(h: int, w: int, channels: int, aspect_ratio: float, device: torch.device | None = None,
                 omega_0: float = 100.0) -> torch.Tensor:
    """DPT position embedding [channels, h, w]: [sin x, cos x, sin y, cos y], each channels/4 wide."""
    grid = uv_grid(w, h, aspect_ratio, dtype=torch.float32, device=device).reshape(-1, 2)  # [h*w, 2]
    emb = torch.cat([_sincos(grid[:, 0], channels // 2, omega_0), _sincos(grid[:, 1], channels // 2, omega_0)], 1)
    return emb.float().reshape(h, w, channels).permute(2, 0, 1)  # [h*w, C] -> [C, h, w]


class ResidualConvUnit(nn.Module):
    """relu(x) + conv2(relu(conv1(relu(x)))).

    Upstream uses ``nn.ReLU(inplace=True)`` on the input, so the skip carries relu(x), not x. Reproduced.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    """RefineNet fusion: (x + rcu1(skip)) -> rcu2 -> bilinear (align_corners) resize -> 1x1 out_conv."""

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.has_residual = has_residual
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                size: Sequence[int] | None = None) -> torch.Tensor:
        if self.has_residual:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        size = tuple(size) if size is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


_ACTIVATIONS = {"norm_exp", "norm", "exp", "relu", "inv_log", "xy_inv_log", "sigmoid", "linear"}
_CONF_ACTIVATIONS = {"expp1", "expp0", "sigmoid"}


def activate_head(out: torch.Tensor, activation: str, conf_activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D+1, H, W] -> (values [N, H, W, D], confidence [N, H, W]); the last channel is the confidence."""
    fmap = out.permute(0, 2, 3, 1)  # [N, C, H, W] -> [N, H, W, C]
    xyz, conf = fmap[..., :-1], fmap[..., -1]
    if activation == "norm_exp":
        d = xyz.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        pts = xyz / d * torch.expm1(d)
    elif activation == "norm":
        pts = xyz / xyz.norm(dim=-1, keepdim=True)
    elif activation == "exp":
        pts = torch.exp(xyz)
    elif activation == "relu":
        pts = F.relu(xyz)
    elif activation == "inv_log":
        pts = inverse_log_transform(xyz)
    elif activation == "xy_inv_log":
        xy, z = xyz.split([2, 1], dim=-1)
        z = inverse_log_transform(z)
        pts = torch.cat([xy * z, z], dim=-1)
    elif activation == "sigmoid":
        pts = torch.sigmoid(xyz)
    else:
        pts = xyz
    if conf_activation == "expp1":
        conf = 1 + conf.exp()
    elif conf_activation == "expp0":
        conf = conf.exp()
    else:
        conf = torch.sigmoid(conf)
    return pts, conf


class _Scratch(nn.Module):
    """Container matching upstream's ``scratch.*`` key names."""


class DPTHead(nn.Module):
    """DPT decoder on 4 token maps (upstream VGGT ``DPTHead``).

    ``forward(tokens_list, image_hw)``: ``tokens_list[i]`` is [N, T, C] and the maps used are
    ``tokens_list[j]`` for j in ``intermediate_layer_idx``; patch tokens start at ``patch_start_idx``.
    Returns (values [N, H, W, output_dim-1], confidence [N, H, W]), or with ``feature_only`` the fused
    feature map [N, features, H/down_ratio, W/down_ratio] (after output_conv1, features -> features,
    as upstream; no activation).
    """

    def __init__(self, dim_in: int, patch_size: int = 14, output_dim: int = 4, activation: str = "inv_log",
                 conf_activation: str = "expp1", features: int = 256,
                 out_channels: Sequence[int] = (256, 512, 1024, 1024),
                 intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23), pos_embed: bool = True,
                 feature_only: bool = False, down_ratio: int = 1) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS or conf_activation not in _CONF_ACTIVATIONS:
            raise ConfigError(f"DPT head activations: {activation}, {conf_activation}", "are not known.",
                              f"Use one of {sorted(_ACTIVATIONS)} and one of {sorted(_CONF_ACTIVATIONS)}.")
        if len(out_channels) != 4 or len(intermediate_layer_idx) != 4:
            raise ConfigError("DPT head", "needs 4 out_channels and 4 intermediate_layer_idx.",
                              "Give one entry per DPT level, e.g. out_channels [256, 512, 1024, 1024].")
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self.intermediate_layer_idx = list(intermediate_layer_idx)
        oc = list(out_channels)
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, c, kernel_size=1) for c in oc)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),  # x4
            nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),  # x2
            nn.Identity(),
            nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),  # /2 (ceil)
        ])
        self.scratch = _Scratch()
        for i, c in enumerate(oc):
            setattr(self.scratch, f"layer{i + 1}_rn", nn.Conv2d(c, features, kernel_size=3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FeatureFusionBlock(features, has_residual=i != 4))
        if feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, output_dim, kernel_size=1),
            )

    def _add_pos(self, x: torch.Tensor, aspect_ratio: float) -> torch.Tensor:
        emb = uv_pos_embed(x.shape[-2], x.shape[-1], x.shape[1], aspect_ratio, device=x.device)
        return x + (emb * 0.1).to(x.dtype)[None]

    def _fuse(self, levels: list[torch.Tensor]) -> torch.Tensor:
        sc = self.scratch
        l1, l2, l3, l4 = (getattr(sc, f"layer{i + 1}_rn")(x) for i, x in enumerate(levels))
        out = sc.refinenet4(l4, size=l3.shape[-2:])
        out = sc.refinenet3(out, l3, size=l2.shape[-2:])
        out = sc.refinenet2(out, l2, size=l1.shape[-2:])
        out = sc.refinenet1(out, l1)
        return sc.output_conv1(out)

    def forward(self, tokens_list: Sequence[torch.Tensor], image_hw: tuple[int, int],
                patch_start_idx: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """See the class docstring. ``image_hw``: (H, W) of the input images in pixels."""
        height, width = image_hw
        h, w = height // self.patch_size, width // self.patch_size
        aspect = width / height
        levels = []
        for level, idx in enumerate(self.intermediate_layer_idx):
            x = self.norm(tokens_list[idx][:, patch_start_idx:])  # [N, P, C]
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], h, w)  # [N, P, C] -> [N, C, h, w]
            x = self.projects[level](x)
            if self.pos_embed:
                x = self._add_pos(x, aspect)
            levels.append(self.resize_layers[level](x))
        out = self._fuse(levels)
        size = (int(h * self.patch_size / self.down_ratio), int(w * self.patch_size / self.down_ratio))
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=True)
        if self.pos_embed:
            out = self._add_pos(out, aspect)
        if self.feature_only:
            return out
        return activate_head(self.scratch.output_conv2(out), self.activation, self.conf_activation)
