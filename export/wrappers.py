"""Export-only wrappers: flat named tensors in and out, constants frozen for one image size.

The reference modules stay clean; whatever tracing needs lives here:
- H, W are fixed per export, so the DINO position table (bicubic + antialias resize, which TensorRT's
  Resize does not implement) and the DPT UV embeddings (evaluated in float64 upstream) are computed
  once, eagerly, and stored as buffers of the wrapper; the traced graph reads them as initializers.
- The DPT heads run all frames at once (no Python chunk loop over a dynamic S).
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
from torch import nn

from vidllm_edge import units as U


@contextlib.contextmanager
def frozen_constants(model, image_hw: tuple[int, int], holder: nn.Module) -> Iterator[None]:
    """Inside the block, ``model``'s size-dependent constants come from buffers registered on ``holder``."""
    patched: list[tuple[object, str, object]] = []

    def patch(obj, name, fn):
        patched.append((obj, name, obj.__dict__.get(name, None)))
        setattr(obj, name, types.MethodType(fn, obj))

    encoder = model.encoder
    if hasattr(encoder, "patch_pos_embed"):
        p = model.cfg.patch_size
        grid = (image_hw[0] // p, image_hw[1] // p)
        if not hasattr(holder, "pos_embed_const"):
            with torch.no_grad():
                holder.register_buffer("pos_embed_const", encoder.patch_pos_embed(*grid).detach().clone())

        def pos(self, h, w):
            assert (h, w) == grid, f"export was frozen for a {grid} patch grid, got {(h, w)}"
            return holder.pos_embed_const

        patch(encoder, "patch_pos_embed", pos)

    from vidllm_edge.models.heads import DPTHead, uv_pos_embed

    for mod_name, mod in model.named_modules():
        if isinstance(mod, DPTHead) and mod.pos_embed:
            cache_prefix = f"uv_{mod_name.replace('.', '_')}"

            def add_pos(self, x, aspect_ratio, _prefix=cache_prefix):
                key = f"{_prefix}_{x.shape[1]}_{x.shape[-2]}_{x.shape[-1]}"
                if not hasattr(holder, key):
                    holder.register_buffer(key, (uv_pos_embed(x.shape[-2], x.shape[-1], x.shape[1], aspect_ratio)
                                                 * 0.1).float())
                return x + getattr(holder, key).to(x.dtype)[None]

            patch(mod, "_add_pos", add_pos)
    geometry = getattr(model, "geometry", None)
    chunk = getattr(geometry, "dpt_chunk_size", None)
    if geometry is not None:
        geometry.dpt_chunk_size = None
    try:
        yield
    finally:
        for obj, name, old in reversed(patched):
            if old is None:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        if geometry is not None:
            geometry.dpt_chunk_size = chunk


class _UnitWrapper(nn.Module):
    """Holds the model without registering it (its weights are reached through the submodules we call)."""

    def __init__(self, model, image_hw: tuple[int, int]) -> None:
        super().__init__()
        self.image_hw = tuple(image_hw)
        self.parts = nn.ModuleDict()
        self._model = model


class PerceptionExport(_UnitWrapper):
    """images [S,3,H,W] -> t_geom, t_lang, feat0..3 [S,P,C]."""

    def __init__(self, model, image_hw):
        super().__init__(model, image_hw)
        self.parts["encoder"] = model.encoder
        self.parts["adapter"] = model.adapter

    def forward(self, images: torch.Tensor):
        enc = self.parts["encoder"](images)
        t_geom, t_lang = self.parts["adapter"](enc.tokens)
        return (t_geom, t_lang, *enc.features)


class GeometryExport(_UnitWrapper):
    """t_geom [S,P,C] -> pose_enc [S,9], depth, depth_conf [S,H,W], world_points [S,H,W,3], world_points_conf."""

    def __init__(self, model, image_hw):
        super().__init__(model, image_hw)
        self.parts["geometry"] = model.geometry

    def forward(self, t_geom: torch.Tensor):
        out = self.parts["geometry"](t_geom, self.image_hw)
        return tuple(out[t.name] for t in U.GEOMETRY.outputs)


class MetricDepthExport(_UnitWrapper):
    """feat0..3 [Sm,P,C] -> metric_depth [Sm,H,W] (metres)."""

    def __init__(self, model, image_hw):
        super().__init__(model, image_hw)
        self.parts["metric_depth"] = model.metric_depth

    def forward(self, feat0, feat1, feat2, feat3):
        return (self.parts["metric_depth"]([feat0, feat1, feat2, feat3], self.image_hw),)


class LiftProjectExport(_UnitWrapper):
    """t_lang [S,P,C], points [S,P,3] -> t3d [S,P,C] = t_lang + MLP(points)."""

    def __init__(self, model, image_hw):
        super().__init__(model, image_hw)
        self.parts["pos_mlp"] = model.pos_mlp

    def forward(self, t_lang, points):
        return (t_lang + self.parts["pos_mlp"](points),)


class ProjectorExport(_UnitWrapper):
    """tokens [M,C] -> visual [M,D]."""

    def __init__(self, model, image_hw):
        super().__init__(model, image_hw)
        self.parts["projector"] = model.projector

    def forward(self, tokens):
        return (self.parts["projector"](tokens),)


class BoxHeadExport(_UnitWrapper):
    """hidden [N,D] -> boxes [N,6]."""

    def __init__(self, model, image_hw):
        super().__init__(model, image_hw)
        self.parts["box_head"] = model.box_head

    def forward(self, hidden):
        return (self.parts["box_head"](hidden),)
