"""The torch backend: the reference modules of a `VidLLM`, behind the one backend interface."""

from __future__ import annotations

from typing import Callable

import torch

from vidllm_edge import units as U
from vidllm_edge.runtime.backend import Backend


class TorchUnit(Backend):
    """A unit computed by calling reference modules under ``torch.inference_mode``."""

    name = "torch"

    def __init__(self, spec: U.UnitSpec, fn: Callable[..., dict[str, torch.Tensor]], bound: dict[str, int]) -> None:
        super().__init__(spec, bound)
        self.fn = fn

    def _run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return self.fn(**feed)


def torch_units(model, image_hw: tuple[int, int]) -> dict[str, Backend]:
    """Build the vision units of ``model`` (a VidLLM) for frames of size ``image_hw`` (H, W)."""
    h, w = image_hw
    patch = model.cfg.patch_size
    vision = {"H": h, "W": w, "P": (h // patch) * (w // patch), "C": model.cfg.embed_dim}

    def perception(images: torch.Tensor) -> dict[str, torch.Tensor]:
        enc = model.encoder(images)
        t_geom, t_lang = model.adapter(enc.tokens)
        out = {"t_geom": t_geom, "t_lang": t_lang}
        out.update({name: feat for name, feat in zip(U.FEATURE_NAMES, enc.features)})
        return out

    def geometry(t_geom: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model.geometry(t_geom, (h, w))
        return {t.name: out[t.name] for t in U.GEOMETRY.outputs}

    def metric_depth(**feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"metric_depth": model.metric_depth([feats[n] for n in U.FEATURE_NAMES], (h, w))}

    def lift_project(t_lang: torch.Tensor, points: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"t3d": t_lang + model.pos_mlp(points)}  # T_3D = T'_lang + MLP(P_v)

    def projector(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"visual": model.projector(tokens)}

    def box_head(hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"boxes": model.box_head(hidden)}

    return {
        "perception": TorchUnit(U.PERCEPTION, perception, {"H": h, "W": w}),
        "geometry": TorchUnit(U.GEOMETRY, geometry, vision),
        "metric_depth": TorchUnit(U.METRIC_DEPTH, metric_depth, vision),
        "lift_project": TorchUnit(U.LIFT_PROJECT, lift_project, vision),
        "projector": TorchUnit(U.PROJECTOR, projector, {"C": model.cfg.embed_dim, "D": model.dim_llm}),
        "box_head": TorchUnit(U.BOX_HEAD, box_head, {"D": model.dim_llm}),
    }
