"""Upstream-compatible VGGT: our encoder + geometry modules behind VGGT's interface, and its checkpoint loader.

`VGGT` (submodules ``encoder`` and ``geometry``) returns upstream's output names and shapes with the
B=1 leading dim. `load_vggt` reads an official checkpoint (``facebook/VGGT-1B`` layout) or our own
state dict, maps the names, and fills a meta-device model; it never runs random init.

Name mapping (upstream <-> ours):
  ``aggregator.patch_embed.X``                         <-> ``encoder.X``
  ``aggregator.{camera_token,register_token,frame_blocks,global_blocks}*`` <-> ``geometry.*``
  ``{camera,depth,point}_head.*``                      <-> ``geometry.{camera,depth,point}_head.*``
  ``track_head.*``: accepted and dropped (point tracking is not implemented here).
Everything else is strict: every missing, unexpected or mis-shaped key is reported at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vidllm_edge.errors import CheckpointError, ConfigError, InputError
from vidllm_edge.models import checkpoint as ckpt
from vidllm_edge.models.config import VGGTConfig
from vidllm_edge.models.encoder import build_vggt_encoder
from vidllm_edge.models.geometry import GeometryTransformer

_AGGREGATOR_PARTS = ("camera_token", "register_token", "frame_blocks", "global_blocks")
_HEADS = ("camera_head", "depth_head", "point_head")
DROPPED_PREFIXES = ("track_head.",)
_SHAPE_NOTE = "Expected [S, 3, H, W] with H, W multiples of 14."


class VGGT(nn.Module):
    """VGGT inference (camera, depth and point heads; no tracking) built from upstream constructor args."""

    def __init__(self, vcfg: VGGTConfig | None = None) -> None:
        super().__init__()
        self.vcfg = vcfg or VGGTConfig()
        self.encoder = build_vggt_encoder(self.vcfg)
        self.geometry = GeometryTransformer(self.vcfg)
        self.patch_size = self.vcfg.patch_size

    def check_images(self, images: Any) -> torch.Tensor:
        """Validate images and return them as [B, S, 3, H, W]; raise InputError otherwise."""
        p = self.patch_size
        note = _SHAPE_NOTE.replace("14", str(p))
        if not isinstance(images, torch.Tensor):
            raise InputError("Input tensor: images", f"Received {type(images).__name__}, not a torch.Tensor.", note)
        shape = list(images.shape)
        if images.ndim == 4:
            images = images[None]
        if (images.ndim != 5 or images.shape[2] != 3 or images.shape[1] < 1
                or images.shape[-2] < p or images.shape[-1] < p
                or images.shape[-2] % p or images.shape[-1] % p):
            raise InputError("Input tensor: images", f"Received shape {shape}.", note)
        if not images.is_floating_point():
            raise InputError("Input tensor: images", f"Received dtype {images.dtype}.",
                             "Expected floating-point RGB in [0, 1] (e.g. images.float() / 255).")
        return images

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """images [S, 3, H, W] or [B, S, 3, H, W], RGB in [0, 1] -> upstream VGGT predictions:

        ``pose_enc`` [B, S, 9], ``pose_enc_list`` (4 x [B, S, 9]), ``depth`` [B, S, H, W, 1], ``depth_conf``
        [B, S, H, W], ``world_points`` [B, S, H, W, 3], ``world_points_conf`` [B, S, H, W], ``images``.
        A 4-D input gets B=1. Sequences of a batch are independent and run one after another.
        """
        images = self.check_images(images)
        hw = (images.shape[-2], images.shape[-1])
        per_seq = [self.geometry(self.encoder(seq).tokens, hw) for seq in images]
        out: dict[str, Any] = {}
        for key in ("pose_enc", "depth_conf", "world_points", "world_points_conf"):
            out[key] = torch.stack([r[key] for r in per_seq])
        out["depth"] = torch.stack([r["depth"] for r in per_seq])[..., None]  # [B, S, H, W] -> [B, S, H, W, 1]
        out["pose_enc_list"] = [torch.stack(step) for step in zip(*(r["pose_enc_list"] for r in per_seq))]
        out["images"] = images
        return out


def upstream_to_ours(key: str) -> str | None:
    """Map an upstream checkpoint key to ours; None for keys we drop (``track_head.*``).

    Unknown keys come back unchanged, so the strict check reports them.
    """
    if key.startswith(DROPPED_PREFIXES):
        return None
    if key.startswith("aggregator.patch_embed."):
        return "encoder." + key[len("aggregator.patch_embed."):]
    if key.startswith("aggregator."):
        rest = key[len("aggregator."):]
        if rest.split(".")[0] in _AGGREGATOR_PARTS:
            return "geometry." + rest
    if key.split(".")[0] in _HEADS:
        return "geometry." + key
    return key


def ours_to_upstream(key: str) -> str:
    """Inverse of `upstream_to_ours` for the keys of a `VGGT` state dict."""
    if key.startswith("encoder."):
        return "aggregator.patch_embed." + key[len("encoder."):]
    if key.startswith("geometry."):
        rest = key[len("geometry."):]
        if rest.split(".")[0] in _AGGREGATOR_PARTS:
            return "aggregator." + rest
        return rest
    return key


def to_upstream_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `VGGT` state dict under upstream key names (loadable by upstream VGGT minus its track head)."""
    return {ours_to_upstream(k): v for k, v in state.items()}


def resolve_config(config: VGGTConfig | Mapping[str, Any] | None, folder: Path | None = None) -> VGGTConfig:
    """None -> the folder's ``config.json`` ``constructor_args`` if present, else VGGT-1B defaults;
    a dict of upstream constructor args (or a dict holding ``constructor_args``) -> VGGTConfig."""
    if isinstance(config, VGGTConfig):
        return config
    if config is None:
        cfg_file = folder / "config.json" if folder is not None else None
        if cfg_file is not None and cfg_file.is_file():
            try:
                data = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"Checkpoint config: {cfg_file}", f"is not valid JSON ({exc}).",
                                      "Fix or remove the file (without it VGGT-1B defaults are used).") from exc
            if isinstance(data, dict) and isinstance(data.get("constructor_args"), dict):
                return VGGTConfig.from_constructor_args(data["constructor_args"])
        return VGGTConfig()
    if isinstance(config, Mapping):
        args = config.get("constructor_args", config)
        return VGGTConfig.from_constructor_args(dict(args))
    raise ConfigError("load_vggt: config", f"is a {type(config).__name__}.",
                      "Pass None, a dict of upstream constructor args, or a VGGTConfig.")


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, Path | None]:
    """Return (weights file, folder or None). A folder must hold model.safetensors or exactly one .pt/.pth."""
    path = Path(checkpoint)
    if not path.is_dir():
        return path, None
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors", path
    candidates = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth", ".safetensors") and p.is_file())
    if len(candidates) == 1:
        return candidates[0], path
    raise CheckpointError(f"Checkpoint folder: {path}",
                          f"holds {len(candidates)} weight files ({', '.join(p.name for p in candidates) or 'none'}).",
                          "Put the weights in model.safetensors, or pass the weights file itself.")


def map_checkpoint(state: Mapping[str, torch.Tensor], model: VGGT, subject: str) -> dict[str, torch.Tensor]:
    """Check ``state`` (upstream or our names) against ``model`` and return it under our names.

    Upstream-named checkpoints are checked under upstream names, so the error lists the user's keys.
    """
    ours = {k: tuple(v) for k, v in ckpt.expected_shapes(model).items()}
    is_ours = any(k.startswith(("encoder.", "geometry.")) for k in state) and not any(
        k.startswith("aggregator.") for k in state)
    hint = ("Check that the checkpoint and the config describe the same VGGT size (pass the upstream "
            "constructor args as config for non-default sizes).")
    if is_ours:
        ckpt.check_state_dict(ours, state, subject, hint)
        return dict(state)
    kept = {k: v for k, v in state.items() if upstream_to_ours(k) is not None}
    ckpt.check_state_dict({ours_to_upstream(k): s for k, s in ours.items()}, kept, subject, hint)
    return {upstream_to_ours(k): v for k, v in kept.items()}


def load_vggt(checkpoint: str | Path, config: VGGTConfig | Mapping[str, Any] | None = None) -> VGGT:
    """Load VGGT weights into a `VGGT` (eval mode, fp32, CPU) without random initialisation.

    Args:
        checkpoint: a ``.safetensors`` file, a ``.pt``/``.pth`` state dict (read with weights_only=True), or
            a folder with ``model.safetensors`` (or a single weights file) and optionally ``config.json``.
            Upstream key names (official VGGT-1B) or our `VGGT` key names. ``track_head.*`` is dropped.
        config: None (the folder's ``config.json -> constructor_args``, else VGGT-1B), a dict of upstream
            constructor args (as the oracle's ``config.json -> constructor_args``), or a VGGTConfig.

    Raises CheckpointError listing every missing, unexpected and mis-shaped key, or for unreadable files.
    """
    weights, folder = resolve_checkpoint(checkpoint)
    vcfg = resolve_config(config, folder)
    subject = f"Checkpoint: {weights}"
    state = ckpt.read_state_dict(weights)
    model = ckpt.build_on_meta(lambda: VGGT(vcfg))
    mapped = map_checkpoint(state, model, subject)
    ckpt.load_into(model, mapped, subject)
    ckpt.assert_materialized(model, subject)
    return model.float().eval()
