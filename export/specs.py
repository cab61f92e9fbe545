"""One export spec per unit (DESIGN.md §3): names, dynamic axes, opset and why, dummy inputs, tolerances.

Names and shapes come from the shared contract `vidllm_edge.units`, which the runtime validates feeds
against, so the exporter and every backend agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from vidllm_edge import units as U
from vidllm_edge.export import wrappers as W

OPSET = 18
OPSET_CHOICES = (18, 23)
OPSET_23_REASON = ("23: attention becomes one ONNX Attention op, which ONNX Runtime's CUDA provider runs fused "
                   "(opset 18 materialises [heads, S*P, S*P] scores: 62 GB for geometry at S=32, 518x518) and "
                   "TensorRT parses from 10.14 on; older TensorRT (JetPack 6: 10.3) needs opset 18.")
OPSET_REASON = ("18: LayerNormalization stays one op (>= 17, avoids the decomposed-LayerNorm FP16 overflow), "
                "Resize/ReduceMean in their current form; below 23 so the exporter does not emit the ONNX "
                "Attention op, whose TensorRT 10 parser support is not established (FINDINGS.md).")


@dataclass(frozen=True)
class Tolerance:
    """Validation gate for one output: relative L2 and cosine (max-abs is reported, not gated)."""

    rel_l2: float
    cosine: float


@dataclass(frozen=True)
class ExportSpec:
    unit: U.UnitSpec
    wrapper: Callable  # (model, image_hw) -> nn.Module returning outputs in unit order
    dynamic: dict[str, str]  # symbol -> what it counts ("S": "frames")
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    opset: int = OPSET
    opset_reason: str = OPSET_REASON

    @property
    def name(self) -> str:
        return self.unit.name

    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        """Input name -> {axis: symbol} for the dynamic symbols of this spec."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str) and d in self.dynamic}
                for t in self.unit.inputs}


FP_TOL = {"fp32": Tolerance(rel_l2=1e-4, cosine=0.99999), "fp16": Tolerance(rel_l2=1e-2, cosine=0.9995)}

SPECS: dict[str, ExportSpec] = {
    "perception": ExportSpec(U.PERCEPTION, W.PerceptionExport, {"S": "frames"}, FP_TOL),
    "geometry": ExportSpec(U.GEOMETRY, W.GeometryExport, {"S": "frames"}, FP_TOL),
    "metric_depth": ExportSpec(U.METRIC_DEPTH, W.MetricDepthExport, {"Sm": "metric-depth frames"}, FP_TOL),
    "lift_project": ExportSpec(U.LIFT_PROJECT, W.LiftProjectExport, {"S": "frames"}, FP_TOL),
    "projector": ExportSpec(U.PROJECTOR, W.ProjectorExport, {"M": "visual tokens"}, FP_TOL),
    "box_head": ExportSpec(U.BOX_HEAD, W.BoxHeadExport, {"N": "rows"}, FP_TOL),
}
VISION_UNIT_NAMES = tuple(SPECS)


def unit_dims(model, image_hw: tuple[int, int]) -> dict[str, int]:
    """Values of the fixed symbols for ``model`` at ``image_hw``."""
    h, w = image_hw
    p = model.cfg.patch_size
    return {"H": h, "W": w, "P": (h // p) * (w // p), "C": model.cfg.embed_dim, "D": model.dim_llm}


def dummy_inputs(spec: ExportSpec, model, image_hw: tuple[int, int], size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs with every dynamic symbol set to ``size`` (images in [0, 1])."""
    dims = unit_dims(model, image_hw)
    g = torch.Generator().manual_seed(seed)
    feed = {}
    for t in spec.unit.inputs:
        shape = [d if isinstance(d, int) else (size if d in spec.dynamic else dims[d]) for d in t.shape]
        x = torch.rand(shape, generator=g) if t.name == "images" else torch.randn(shape, generator=g)
        feed[t.name] = x
    return feed
