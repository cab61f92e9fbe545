"""Video in, scene out, questions answered: the stage-by-stage data flow of DESIGN.md §1.

`Pipeline.encode(video)` samples frames, runs the vision units of a backend, aligns the scale to
metric depth, lifts and pools the language tokens in 3D, projects them, and prefills the LLM with the
scene prefix once. `Scene.ask(question)` answers from that prefix (never recomputing it) and streams.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from vidllm_edge.errors import InputError
from vidllm_edge.models.camera import pose_encoding_to_extri_intri
from vidllm_edge.models.lift import backproject, patch_centres, patch_grid_depth
from vidllm_edge.models.llm import Answer, GenerationConfig
from vidllm_edge.models.pooling import voxel_pool
from vidllm_edge.models.scale import align_scale, apply_scale, metric_frame_ids
from vidllm_edge.runtime.video import Frames, preprocess, read_frames
from vidllm_edge.units import FEATURE_NAMES


@dataclasses.dataclass
class SceneGeometry:
    """Metric geometry of the sampled frames (world = first camera, OpenCV axes, metres)."""

    depth: torch.Tensor            # [S, H, W] metric depth
    depth_conf: torch.Tensor       # [S, H, W]
    world_points: torch.Tensor     # [S, H, W, 3] metric point map (point head)
    extrinsics: torch.Tensor       # [S, 3, 4] world-to-camera, metric translation
    intrinsics: torch.Tensor       # [S, 3, 3] pixels of the preprocessed frames
    pose_enc: torch.Tensor         # [S, 9] network pose encoding (normalised scale)
    scale: float                   # metres per network unit
    per_frame_scale: torch.Tensor  # [S_m]
    metric_depth: torch.Tensor     # [S_m, H, W] metric-depth model output
    metric_frame_ids: torch.Tensor  # [S_m]


class Scene:
    """An encoded video: geometry, visual tokens and the LLM prefix cache; answers many questions."""

    def __init__(self, frames: Frames, images: torch.Tensor, geometry: SceneGeometry, visual_tokens: torch.Tensor,
                 voxel_centres: torch.Tensor, decoder, timings: dict[str, float],
                 generation: GenerationConfig) -> None:
        self.frames = frames
        self.images = images              # [S, 3, H, W] in [0, 1], what the model saw
        self.geometry = geometry
        self.visual_tokens = visual_tokens  # [M, C_llm]
        self.voxel_centres = voxel_centres  # [M, 3]
        self.decoder = decoder
        self.timings = timings
        self.generation = generation

    @property
    def num_frames(self) -> int:
        return int(self.images.shape[0])

    def stream(self, question: str, generation: GenerationConfig | None = None) -> Iterator[str | Answer]:
        """Yield text pieces as they are decoded, then the final `Answer`."""
        if not question or not question.strip():
            raise InputError("Question", "is empty.", "Ask a question in words, e.g. --question \"Where is the door?\"")
        if getattr(self.decoder, "owner", self) is not self:
            raise InputError("Scene", "no longer holds its LLM prefix: the fast decoder keeps one static KV cache, and "
                             "a newer scene from the same pipeline has replaced it.",
                             "Ask questions on the latest scene, or encode this video again.")
        for piece, answer in self.decoder.stream(question, generation or self.generation):
            yield answer if answer is not None else piece

    def ask(self, question: str, generation: GenerationConfig | None = None,
            on_text: Callable[[str], None] | None = None) -> Answer:
        """Answer ``question``; ``on_text`` receives each new piece of text as it is decoded."""
        answer = None
        for item in self.stream(question, generation):
            if isinstance(item, Answer):
                answer = item
            elif on_text is not None:
                on_text(item)
        assert answer is not None, "the decoder ended without an answer"
        return answer


class Pipeline:
    """Runs Vid-LLM on videos through one backend; every backend provides the same units.

    ``Pipeline(model)`` runs the torch reference; `Pipeline.from_export(folder)` runs an export folder on
    ONNX Runtime. ``units_for(image_hw)`` returns the vision units, ``decoder_factory()`` a fresh LLM decoder.
    """

    def __init__(self, model=None, backend: str = "torch", num_frames: int | None = None,
                 generation: GenerationConfig | None = None, *, cfg=None, units_for=None,
                 decoder_factory=None, image_hw: tuple[int, int] | None = None, decoder: str = "reference") -> None:
        """``decoder`` (with a model): "reference" (transformers, a fresh KV cache per scene) or "fast"
        (`FastDecoder`: static KV cache, Triton GEMVs and CUDA graphs on CUDA; one decoder, so one live scene)."""
        if decoder not in ("reference", "fast"):
            raise InputError(f"Decoder: {decoder}", "is unknown.", "Use reference or fast.")
        if model is not None:
            if backend != "torch":
                raise InputError(f"Backend: {backend}", "needs an export folder, not a model.",
                                 "Use Pipeline.from_export(folder) (CLI: --backend onnxruntime --engines DIR).")
            from vidllm_edge.models.llm import ReferenceDecoder
            from vidllm_edge.runtime.torch_backend import torch_units

            model = model.eval()
            cfg = model.cfg
            units_for = lambda hw: torch_units(model, hw)  # noqa: E731
            decoder_factory = lambda: ReferenceDecoder(model.llm, model.tokenizer, model.box_head, cfg.llm)  # noqa: E731
            if decoder == "fast":
                decoder_factory = _shared_fast_decoder(model)
        assert cfg is not None and units_for is not None and decoder_factory is not None, \
            "Pipeline needs a model, or cfg + units_for + decoder_factory"
        self.model = model
        self.cfg = cfg
        self.backend = backend
        self.num_frames = num_frames or cfg.num_frames
        self.generation = generation or GenerationConfig()
        self.image_hw = image_hw  # fixed frame size of compiled units (None: any size)
        self._units_for = units_for
        self._decoder_factory = decoder_factory
        self._units: dict[tuple[int, int], dict] = {}
        # Factory of the stage timer `encode` uses (timings dict -> ``with stage(name):``); the benchmark
        # suite puts a clock here that synchronises the device at every stage edge and records CUDA events.
        self.stopwatch: Callable[[dict[str, float]], Callable] = _Stopwatch

    @classmethod
    def from_export(cls, folder: str | Path, providers: list[str] | None = None, num_frames: int | None = None,
                    generation: GenerationConfig | None = None, int8: bool = False) -> "Pipeline":
        """A pipeline over an export folder (``vidllm-edge export``) on ONNX Runtime; ``int8``: with the INT8
        Q/DQ graphs ``vidllm-edge quantize`` kept (`ort_backend.int8_graphs`)."""
        from vidllm_edge.runtime.ort_backend import load_export

        bundle = load_export(folder, providers, int8=int8)
        return cls(None, backend="onnxruntime", num_frames=num_frames, generation=generation, cfg=bundle.cfg,
                   units_for=bundle.units_for, decoder_factory=bundle.decoder_factory, image_hw=bundle.image_hw)

    def units(self, image_hw: tuple[int, int]) -> dict:
        if image_hw not in self._units:
            self._units[image_hw] = self._units_for(image_hw)
        return self._units[image_hw]

    def load_frames(self, video: str | Path | Frames, num_frames: int | None = None) -> Frames:
        if isinstance(video, Frames):
            return video
        return read_frames(video, num_frames or self.num_frames)

    @torch.inference_mode()
    def encode(self, video: str | Path | Frames, num_frames: int | None = None) -> Scene:
        """Encode a video file, frame folder or `Frames` into a `Scene` (timings in ms per stage)."""
        timings: dict[str, float] = {}
        stage = self.stopwatch(timings)
        with stage("decode_video"):
            frames = self.load_frames(video, num_frames)
        with stage("preprocess"):
            images = preprocess(frames.rgb, self.cfg.image_size, self.cfg.patch_size)  # [S, 3, H, W]
        s, _, h, w = images.shape
        if self.image_hw is not None and (h, w) != tuple(self.image_hw):
            raise InputError(f"Video: {frames.source}", f"gives {w}x{h} frames after preprocessing; the compiled "
                             f"units take {self.image_hw[1]}x{self.image_hw[0]}.",
                             f"Re-export for this video: vidllm-edge export ... --image-hw {h}x{w}.")
        units = self.units((h, w))
        with stage("encoder_adapter"):
            per = units["perception"]({"images": images})
        with stage("geometry"):
            geo = units["geometry"]({"t_geom": per["t_geom"]})
        ids = metric_frame_ids(s, self.cfg.metric_depth.max_frames)
        with stage("metric_depth"):
            d_metric = units["metric_depth"]({n: per[n][ids] for n in FEATURE_NAMES})["metric_depth"]
        with stage("scale"):
            geometry = self._metric_geometry(geo, d_metric, ids, (h, w))
        with stage("lift"):
            points = patch_points(geometry.depth, geometry.intrinsics, geometry.extrinsics, self.cfg.patch_size)
            t3d = units["lift_project"]({"t_lang": per["t_lang"], "points": points})["t3d"]  # [S, P, C]
        with stage("pool"):
            pooled = voxel_pool(t3d.reshape(-1, t3d.shape[-1]), points.reshape(-1, 3),  # [S*P, C], [S*P, 3]
                                self.cfg.scene.voxel_size, self.cfg.scene.max_visual_tokens,
                                self.cfg.scene.coarsen_factor)
        with stage("projector"):
            visual = units["projector"]({"tokens": pooled.tokens.float()})["visual"]  # [M, C] -> [M, C_llm]
        decoder = self._decoder_factory()
        with stage("prefill_prefix"):
            decoder.prefill_prefix(visual)
        timings["scene_total"] = sum(timings.values())
        scene = Scene(frames, images, geometry, visual, pooled.centres, decoder, timings, self.generation)
        decoder.owner = scene  # a decoder shared between scenes (the fast one) answers for this one only now
        return scene

    def _metric_geometry(self, geo: dict, d_metric: torch.Tensor, ids: torch.Tensor,
                         image_hw: tuple[int, int]) -> SceneGeometry:
        fit = align_scale(geo["depth"][ids], d_metric, geo["depth_conf"][ids], ids)
        extrinsics, intrinsics = pose_encoding_to_extri_intri(geo["pose_enc"], image_hw)
        scaled = apply_scale({"depth": geo["depth"], "world_points": geo["world_points"], "extrinsics": extrinsics},
                             fit.scale)
        return SceneGeometry(depth=scaled["depth"], depth_conf=geo["depth_conf"], world_points=scaled["world_points"],
                             extrinsics=scaled["extrinsics"], intrinsics=intrinsics, pose_enc=geo["pose_enc"],
                             scale=float(fit.scale), per_frame_scale=fit.per_frame, metric_depth=d_metric,
                             metric_frame_ids=ids)


def _shared_fast_decoder(model):
    """A factory returning one `FastDecoder` over ``model.llm`` (built on first use: converting the weights and
    compiling the step are per model, not per scene); compiled with CUDA graphs when the model is on CUDA."""
    made = []

    def factory():
        if not made:
            from vidllm_edge.runtime.fast_decoder import FastDecoder

            cuda = next(model.llm.parameters()).device.type == "cuda"
            made.append(FastDecoder.from_hf(model.llm, model.tokenizer, model.box_head, model.cfg.llm, compile=cuda))
        return made[0]

    return factory


class _Stopwatch:
    """``with stage("name"):`` adds the block's wall time in ms to ``timings[name]``."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + (time.perf_counter() - start) * 1e3


def patch_points(depth: torch.Tensor, intrinsics: torch.Tensor, extrinsics: torch.Tensor, patch: int) -> torch.Tensor:
    """Back-projected patch centres P_v [S, P, 3] (world = first camera) from metric depth mean-pooled per patch."""
    grid = patch_grid_depth(depth, patch)  # [S, h, w]
    uv = patch_centres(grid.shape[1], grid.shape[2], patch, dtype=depth.dtype, device=depth.device)
    return backproject(grid, uv, intrinsics, extrinsics).flatten(1, 2)  # [S, h, w, 3] -> [S, P, 3]


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """[S, 3, H, W] in [0, 1] -> uint8 [S, H, W, 3] RGB."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
