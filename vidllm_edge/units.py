"""The contract between the parts: every compiled unit's inputs and outputs (DESIGN.md §3).

Shapes use symbols: ``S`` frames, ``Sm`` metric-depth frames, ``P`` patches per frame, ``C`` encoder
width, ``H``/``W`` image size, ``N`` rows. The runtime validates feeds against these specs for every
backend; the exporter writes graphs with exactly these names. This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_FEATURES = 4  # encoder feature maps handed to metric depth


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (numpy-style name) and shape; a str dim is symbolic, an int dim is fixed."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class UnitSpec:
    """A unit's name, inputs and outputs."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


FEATURE_NAMES = tuple(f"feat{i}" for i in range(NUM_FEATURES))

PERCEPTION = UnitSpec(
    "perception",
    inputs=(TensorSpec("images", "float32", ("S", 3, "H", "W")),),
    outputs=(TensorSpec("t_geom", "float32", ("S", "P", "C")), TensorSpec("t_lang", "float32", ("S", "P", "C")))
    + tuple(TensorSpec(n, "float32", ("S", "P", "C")) for n in FEATURE_NAMES),
)
GEOMETRY = UnitSpec(
    "geometry",
    inputs=(TensorSpec("t_geom", "float32", ("S", "P", "C")),),
    outputs=(TensorSpec("pose_enc", "float32", ("S", 9)), TensorSpec("depth", "float32", ("S", "H", "W")),
             TensorSpec("depth_conf", "float32", ("S", "H", "W")),
             TensorSpec("world_points", "float32", ("S", "H", "W", 3)),
             TensorSpec("world_points_conf", "float32", ("S", "H", "W"))),
)
METRIC_DEPTH = UnitSpec(
    "metric_depth",
    inputs=tuple(TensorSpec(n, "float32", ("Sm", "P", "C")) for n in FEATURE_NAMES),
    outputs=(TensorSpec("metric_depth", "float32", ("Sm", "H", "W")),),
)
LIFT_PROJECT = UnitSpec(
    "lift_project",
    inputs=(TensorSpec("t_lang", "float32", ("S", "P", "C")), TensorSpec("points", "float32", ("S", "P", 3))),
    outputs=(TensorSpec("t3d", "float32", ("S", "P", "C")),),
)
PROJECTOR = UnitSpec(
    "projector",
    inputs=(TensorSpec("tokens", "float32", ("M", "C")),),
    outputs=(TensorSpec("visual", "float32", ("M", "D")),),
)
BOX_HEAD = UnitSpec(
    "box_head",
    inputs=(TensorSpec("hidden", "float32", ("N", "D")),),
    outputs=(TensorSpec("boxes", "float32", ("N", 6)),),
)

VISION_UNITS = {u.name: u for u in (PERCEPTION, GEOMETRY, METRIC_DEPTH, LIFT_PROJECT, PROJECTOR, BOX_HEAD)}
