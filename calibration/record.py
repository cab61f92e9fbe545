"""Record each vision unit's real inputs for INT8 calibration (DESIGN.md §4).

Frames are sampled from videos exactly as the pipeline samples them, fitted to the export's frame size,
and pushed through the pipeline's own stage sequence (`Pipeline.encode`) with every unit wrapped by a
recorder, so each unit sees the feed it sees at run time. The grounding head's rows are the LLM's
hidden state at ``<loc>`` after grounding questions over the scene prefix (teacher-forced).

Folder layout::

    DIR/calibration.json            model and data fingerprints, videos, frame indices, shard index
    DIR/<unit>/<input>.npy          calibration split: every sample concatenated along axis 0
    DIR/heldout/<unit>/<input>.npy  held-out split: other frames of the same videos + photographs
    DIR/probe.npz                   a fixed subset of each unit's reference outputs on the first sample

Every unit input has its dynamic axis (S, Sm, M or N) first, so samples concatenate along axis 0 and
``lengths`` in calibration.json splits them again (geometry mixes the frames of one clip, so a clip
is one sample and is never cut).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np

from vidllm_edge import atomic
from vidllm_edge import manifest as M
from vidllm_edge.errors import InputError, VidLLMError

CALIBRATION = "calibration.json"
FORMAT = "vidllm-edge-calibration"
VERSION = 1
SPLITS = ("calibration", "heldout")
PROBE = "probe.npz"
PROBE_VALUES = 4096  # reference output values kept per output to recognise the model later
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
GROUNDING_QUESTIONS = ("Where is the red box?", "Where is the green box?", "Where is the blue box?",
                       "Where is the door?", "Where is the floor?", "Where is the largest object?",
                       "What is closest to the camera?", "Where is the ceiling?")


class CalibrationMismatchError(VidLLMError):
    """A calibration folder was recorded from another model, frame size or data than the one asked for."""


def _fix(subject: str) -> str:
    return ("Record calibration data for this model: vidllm-edge calibrate (--checkpoint DIR | --preset NAME | "
            f"--export DIR) --video FILE --frames N --out DIR (here: {subject}).")


# ------------------------------------------------------------------------------------------ fingerprints


def state_fingerprint(model) -> str:
    """sha256 of a torch model's state: every tensor's name, dtype, shape and bytes, in name order.

    Cheap but real (one pass over the weights, ~1 GB/s); pass it to the exporter as
    ``source={"state_sha256": ...}`` so an export names the state it came from.
    """
    import torch

    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_fingerprint(export_dir: str | Path, units: list[str] | None = None) -> str:
    """sha256 over the manifest's file hashes of ``units`` (default: every unit) of an export folder."""
    manifest = M.read_manifest(export_dir)
    names = sorted(units if units is not None else manifest["units"])
    files = {u: manifest["units"][u]["files"] for u in names if u in manifest["units"]}
    missing = [u for u in names if u not in files]
    digest = hashlib.sha256(json.dumps({"units": files, "missing": missing}, sort_keys=True).encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ frames


def fit_frames(rgb: np.ndarray, image_hw: tuple[int, int], cfg) -> np.ndarray:
    """uint8 frames [S, h, w, 3] -> uint8 [S, H, W, 3] at ``image_hw``, resized and cropped as the pipeline does.

    When the pipeline's own plan (short side ``cfg.image_size``, centre crop to patch multiples) gives
    ``image_hw``, that plan is used; otherwise (a video of another aspect than the export's) the frames
    are resized to cover ``image_hw`` and centre-cropped. Same interpolation rule as `preprocess`.
    """
    import cv2

    from vidllm_edge.runtime.video import plan_preprocess

    h, w = rgb.shape[1:3]
    plan = plan_preprocess(h, w, cfg.image_size, cfg.patch_size)
    if tuple(plan.output_hw) == tuple(image_hw):
        resized_hw, (top, left) = plan.resized_hw, (plan.crop_top, plan.crop_left)
    else:
        scale = max(image_hw[0] / h, image_hw[1] / w)
        resized_hw = (max(image_hw[0], round(h * scale)), max(image_hw[1], round(w * scale)))
        top, left = (resized_hw[0] - image_hw[0]) // 2, (resized_hw[1] - image_hw[1]) // 2
    if tuple(resized_hw) != (h, w):
        interp = cv2.INTER_AREA if resized_hw[0] < h else cv2.INTER_CUBIC
        rgb = np.stack([cv2.resize(f, (resized_hw[1], resized_hw[0]), interpolation=interp) for f in rgb])
    return np.ascontiguousarray(rgb[:, top:top + image_hw[0], left:left + image_hw[1]])  # [S, H, W, 3]


@dataclass
class Clip:
    """Frames that go through the pipeline together (one sample of every unit)."""

    source: str
    indices: list[int]
    rgb: np.ndarray  # [S, H, W, 3] uint8, already at the export's frame size


def video_clips(video: str | Path, frames: int, image_hw: tuple[int, int], cfg,
                log: TextIO | None = None) -> tuple[Clip, Clip | None]:
    """The calibration clip (``frames`` frames sampled evenly, as the pipeline does) and a held-out clip
    of the frames halfway between them (none of them in the calibration clip; None if the video has no
    other frames)."""
    from vidllm_edge.runtime.video import read_frames

    calib = read_frames(video, frames)
    for warning in calib.warnings:
        print(f"warning: {warning}", file=log or sys.stderr, flush=True)
    dense = read_frames(video, 2 * frames - 1) if frames > 1 else read_frames(video, 2)
    used = set(calib.indices)
    keep = [i for i, idx in enumerate(dense.indices) if idx not in used]
    held = None
    if keep:
        held = Clip(str(video), [dense.indices[i] for i in keep], fit_frames(dense.rgb[keep], image_hw, cfg))
    return Clip(str(video), list(calib.indices), fit_frames(calib.rgb, image_hw, cfg)), held


def photo_clip(count: int, image_hw: tuple[int, int], cfg) -> Clip | None:
    """Up to ``count`` natural photographs (scikit-image's sample images) as one held-out clip, or None."""
    try:
        from skimage import data
    except ImportError:
        return None
    names = PHOTOS[:max(1, count)]
    clips = []
    for name in names:
        img = np.asarray(getattr(data, name)())
        img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]
        clips.append(fit_frames(np.ascontiguousarray(img[None].astype(np.uint8)), image_hw, cfg)[0])
    return Clip("skimage:" + ",".join(names), list(range(len(names))), np.stack(clips))


# --------------------------------------------------------------------------------------------- recording


class _Recorder:
    """Wraps a backend unit: stores a float32 copy of every feed (and the first call's outputs) in ``sink``."""

    def __init__(self, unit, sink: dict[str, list[dict[str, np.ndarray]]], outputs: dict[str, dict]) -> None:
        self.unit, self.sink, self.outputs = unit, sink, outputs

    def __call__(self, feed):
        out = self.unit(feed)
        name = self.unit.spec.name
        self.sink.setdefault(name, []).append({k: v.detach().float().cpu().numpy() for k, v in feed.items()})
        self.outputs.setdefault(name, {k: v.detach().float().cpu().numpy() for k, v in out.items()})
        return out


@dataclass
class _Source:
    """What runs the units: the torch reference or an export folder on ONNX Runtime CPU."""

    kind: str  # "torch" | "export"
    sha256: str
    description: str
    cfg: Any
    image_hw: tuple[int, int]
    units_for: Any
    decoder_factory: Any


def _source(model, image_hw: tuple[int, int] | None) -> _Source:
    if isinstance(model, (str, Path)):
        from vidllm_edge.runtime.ort_backend import load_export

        bundle = load_export(model)
        if image_hw is not None and tuple(image_hw) != tuple(bundle.image_hw):
            raise InputError(f"Argument: image_hw {image_hw}", f"differs from the export's {tuple(bundle.image_hw)}.",
                             "Leave image_hw out when calibrating an export folder.")
        return _Source("export", export_fingerprint(model), f"export:{model}", bundle.cfg, tuple(bundle.image_hw),
                       bundle.units_for, bundle.decoder_factory)
    from vidllm_edge.export.exporter import default_image_hw
    from vidllm_edge.models.llm import ReferenceDecoder
    from vidllm_edge.runtime.torch_backend import torch_units

    model = model.eval()
    cfg = model.cfg
    image_hw = tuple(image_hw) if image_hw is not None else default_image_hw(cfg)
    if image_hw[0] % cfg.patch_size or image_hw[1] % cfg.patch_size:
        raise InputError(f"Argument: image_hw {image_hw}", f"is not a multiple of the {cfg.patch_size}-pixel patch.",
                         "Use the export's --image-hw (see its manifest.json).")
    return _Source("torch", state_fingerprint(model), f"torch:{cfg.name}", cfg, image_hw,
                   lambda hw: torch_units(model, hw),
                   lambda: ReferenceDecoder(model.llm, model.tokenizer, model.box_head, cfg.llm))


def _run_clip(src: _Source, clip: Clip, sink: dict, outputs: dict) -> None:
    """Run one clip through the pipeline's stages, recording every unit's feed, then the box-head rows."""
    import torch

    from vidllm_edge.runtime.pipeline import Pipeline
    from vidllm_edge.runtime.video import Frames

    # Frames are already at image_hw, so preprocessing with that short side is the identity.
    cfg = dataclasses.replace(src.cfg, image_size=min(src.image_hw))
    units = {n: _Recorder(u, sink, outputs) for n, u in src.units_for(src.image_hw).items()}
    pipe = Pipeline(None, backend=src.kind, num_frames=len(clip.indices), cfg=cfg, units_for=lambda hw: units,
                    decoder_factory=src.decoder_factory, image_hw=src.image_hw)
    scene = pipe.encode(Frames(clip.rgb, clip.indices, len(clip.indices), None, clip.source))
    rows = []
    decoder = scene.decoder
    with torch.inference_mode():
        for question in GROUNDING_QUESTIONS:  # the runtime feeds the box head the hidden state of <loc>
            ids = decoder.tokenizer(decoder.parts.question_template.format(question=question),
                                    add_special_tokens=False)["input_ids"]
            _, hidden = decoder._forward(decoder._embed(ids + [decoder.loc_id]))
            decoder._crop(decoder.prefix_len)
            rows.append(hidden.float().cpu().reshape(-1))
    hidden = torch.stack(rows)  # [N, D]
    box = units.get("box_head")
    if box is not None:
        box({"hidden": hidden})


def _save_npy(path: Path, array: np.ndarray) -> str:
    with atomic.atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array, dtype=np.float32))
    return M.sha256(path)


def _frames_digest(clips: list[Clip]) -> str:
    digest = hashlib.sha256()
    for clip in clips:
        digest.update(f"{clip.source}|{clip.indices}|{list(clip.rgb.shape)}|".encode())
        digest.update(clip.rgb.tobytes())
    return digest.hexdigest()


def _write_split(out_dir: Path, root: str, sink: dict[str, list[dict[str, np.ndarray]]]) -> dict[str, Any]:
    units = {}
    for unit, samples in sink.items():
        folder = atomic.ensure_dir(out_dir / root / unit if root else out_dir / unit, "Calibration folder")
        entry = {"lengths": [int(next(iter(s.values())).shape[0]) for s in samples], "inputs": {}}
        for name in samples[0]:
            array = np.concatenate([s[name] for s in samples], 0)  # [sum of lengths, ...]
            path = folder / f"{name}.npy"
            entry["inputs"][name] = {"file": str(path.relative_to(out_dir)), "shape": list(array.shape),
                                     "dtype": "float32", "sha256": _save_npy(path, array)}
        units[unit] = entry
    return units


def record_calibration(model, videos: list[str | Path], frames: int, out_dir: str | Path,
                       image_hw: tuple[int, int] | None = None, photos: int = 6,
                       log: TextIO | None = None) -> dict[str, Any]:
    """Record every vision unit's real inputs into ``out_dir``; returns calibration.json's content.

    Args:
        model: a `VidLLM` (the torch reference) or the path of an export folder (its FP32 graphs on ONNX
            Runtime CPU; needs all units, the LLM included, for the box head's rows).
        videos: video files or frame folders; from each, ``frames`` frames sampled evenly (the pipeline's
            sampling) form one calibration clip; the frames halfway between them a held-out clip.
        frames: frames per video (≥ 1), the pipeline's S.
        out_dir: the calibration folder (created; files written atomically).
        image_hw: (H, W) pixels of the export's frames; default: the export's, or a 4:3 video's.
        photos: natural photographs added as one more held-out clip (0: none; needs scikit-image).
    """
    log = log or sys.stderr
    if frames < 1:
        raise InputError(f"Argument: --frames {frames}", "must be at least 1.", "Use e.g. --frames 8.")
    if not videos:
        raise InputError("Argument: --video", "is missing.", "Pass at least one video: --video FILE.")
    src = _source(model, image_hw)
    out_dir = atomic.ensure_dir(out_dir, "Calibration folder")
    (out_dir / CALIBRATION).unlink(missing_ok=True)  # written last: a failed run leaves no folder that looks valid
    calib_clips, held_clips = [], []
    for video in videos:
        calib, held = video_clips(video, frames, src.image_hw, src.cfg, log)
        calib_clips.append(calib)
        held_clips += [held] if held is not None else []
    extra = photo_clip(photos, src.image_hw, src.cfg) if photos else None
    held_clips += [extra] if extra is not None else []
    probe_outputs: dict[str, dict] = {}
    splits: dict[str, Any] = {}
    for split, clips in (("calibration", calib_clips), ("heldout", held_clips)):
        sink: dict[str, list] = {}
        for i, clip in enumerate(clips, 1):
            print(f"[{split} {i}/{len(clips)}] {clip.source}: {len(clip.indices)} frames through the "
                  f"{src.kind} units ...", file=log, flush=True)
            _run_clip(src, clip, sink, probe_outputs if split == "calibration" and i == 1 else {})
        splits[split] = {
            "data_sha256": _frames_digest(clips),
            "clips": [{"source": c.source, "frames": len(c.indices), "indices": c.indices} for c in clips],
            "units": _write_split(out_dir, "" if split == "calibration" else "heldout", sink) if sink else {},
        }
    probe = {f"{u}/{o}": _probe_values(v) for u, outs in probe_outputs.items() for o, v in outs.items()}
    with atomic.atomic_path(out_dir / PROBE, suffix=".npz") as tmp:
        np.savez(tmp, **probe)
    info = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "image_hw": list(src.image_hw),
        "model": {"kind": src.kind, "sha256": src.sha256, "source": src.description,
                  **({"unit_files": {u: e["files"] for u, e in M.read_manifest(model)["units"].items()}}
                     if src.kind == "export" else {})},
        "frames": frames, "videos": [str(v) for v in videos],
        "probe": {"file": PROBE, "shapes": {f"{u}/{o}": list(v.shape) for u, outs in probe_outputs.items()
                                            for o, v in outs.items()}},
        "splits": splits,
    }
    atomic.write_text(out_dir / CALIBRATION, json.dumps(info, indent=2))
    return info


def probe_index(size: int, count: int = PROBE_VALUES) -> np.ndarray:
    """The fixed positions (seeded, sorted) of the values a probe keeps from a flattened output of ``size``."""
    if size <= count:
        return np.arange(size)
    return np.sort(np.random.default_rng(size).choice(size, count, replace=False))


def _probe_values(array: np.ndarray) -> np.ndarray:
    flat = array.reshape(-1)
    return flat[probe_index(flat.size)].astype(np.float32)


# --------------------------------------------------------------------------------------------- reading


@dataclass
class Calibration:
    """A calibration folder, read: ``samples(unit, split)`` yields one feed (name -> array) per sample."""

    folder: Path
    info: dict[str, Any]

    @property
    def image_hw(self) -> tuple[int, int]:
        return tuple(self.info["image_hw"])

    def units(self, split: str = "calibration") -> list[str]:
        return list(self.info["splits"][split]["units"])

    def samples(self, unit: str, split: str = "calibration", required: bool = True) -> list[dict[str, np.ndarray]]:
        """Every sample of ``unit`` in ``split`` (split along axis 0 by the recorded lengths); [] if absent
        and not ``required``."""
        entry = self.info["splits"][split]["units"].get(unit)
        if entry is None and not required:
            return []
        if entry is None:
            raise InputError(f"Calibration folder: {self.folder}", f"has no {split} inputs for the unit {unit} "
                             f"(it has {', '.join(self.units(split)) or 'none'}).", _fix(str(self.folder)))
        arrays = {n: np.load(self.folder / e["file"], mmap_mode="r") for n, e in entry["inputs"].items()}
        bounds = np.cumsum([0] + entry["lengths"])
        return [{n: np.ascontiguousarray(a[lo:hi]) for n, a in arrays.items()} for lo, hi in zip(bounds, bounds[1:])]

    def probe(self) -> Iterator[tuple[str, str, tuple[int, ...], np.ndarray]]:
        """(unit, output, full shape, kept values) for every recorded reference output."""
        with np.load(self.folder / self.info["probe"]["file"]) as data:
            for key, shape in self.info["probe"]["shapes"].items():
                unit, output = key.split("/", 1)
                yield unit, output, tuple(shape), np.asarray(data[key])


def load_calibration(folder: str | Path) -> Calibration:
    """Read and structurally check ``folder/calibration.json`` and the presence of its shards."""
    folder = Path(folder)
    path = folder / CALIBRATION
    if not path.is_file():
        raise InputError(f"Calibration folder: {folder}", f"has no {CALIBRATION}.", _fix(str(folder)))
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"Calibration file: {path}", f"is not valid JSON ({exc}).", _fix(str(folder))) from exc
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise InputError(f"Calibration file: {path}", f"has format {info.get('format')!r} version "
                         f"{info.get('version')!r}; this vidllm-edge reads {FORMAT!r} version {VERSION}.",
                         _fix(str(folder)))
    missing = [e["file"] for s in info["splits"].values() for u in s["units"].values() for e in u["inputs"].values()
               if not (folder / e["file"]).is_file()]
    if missing:
        raise InputError(f"Calibration folder: {folder}", f"lacks {', '.join(missing)}.", _fix(str(folder)))
    return Calibration(folder, info)


def check_calibration(calib: Calibration, export_dir: str | Path, units: list[str] | None = None,
                      tolerance: float = 1e-3) -> None:
    """Raise CalibrationMismatchError unless ``calib`` was recorded from the model of ``export_dir``.

    By hash first: recorded from an export, the graphs of ``units`` (default: all recorded) must have the
    recorded sha256; recorded from a torch model, an export whose manifest names its source state
    (``source.state_sha256``) must name the recorded one. Otherwise (a re-export of the same model has
    other file hashes: the exporter's metadata differs) the export's FP32 graphs must reproduce the
    probe, reference outputs recorded on the first calibration sample, to relative L2 ``tolerance``
    (an fp32 export is ~1e-6 from its reference, another model ~1).
    """
    export_dir = Path(export_dir)
    manifest = M.read_manifest(export_dir)
    recorded = calib.info["model"]
    subject = f"Calibration folder: {calib.folder}"
    fix = (f"Record calibration data for this export: vidllm-edge calibrate --export {export_dir} --video FILE "
           f"--frames N --out DIR (or from the checkpoint it was exported from).")
    if tuple(manifest["image_hw"]) != calib.image_hw:
        raise CalibrationMismatchError(subject, f"holds {calib.image_hw[0]}x{calib.image_hw[1]} frames; the export "
                                       f"{export_dir} takes {manifest['image_hw'][0]}x{manifest['image_hw'][1]}.", fix)
    units = list(units) if units is not None else calib.units()
    if recorded["kind"] == "export":
        files = recorded.get("unit_files", {})
        if all(u in files and files[u] == manifest["units"].get(u, {}).get("files") for u in units):
            return
    else:
        state = (manifest.get("source") or {}).get("state_sha256")
        if state == recorded["sha256"]:
            return
        if state is not None:
            raise CalibrationMismatchError(subject, f"was recorded from model state sha256 "
                                           f"{recorded['sha256'][:16]}…; the export {export_dir} was exported from "
                                           f"state {state[:16]}….", fix)
    if manifest.get("precision") == "fp16":
        tolerance = max(tolerance, 2e-2)  # the fp16 graphs' own distance from the reference
    _check_probe(calib, export_dir, manifest, units, tolerance, subject, fix)


def _check_probe(calib: Calibration, export_dir: Path, manifest: dict, units: list[str] | None, tolerance: float,
                 subject: str, fix: str) -> None:
    ort = None
    sessions: dict[str, Any] = {}
    failures = []
    for unit in units or []:
        if unit not in manifest["units"]:
            failures.append(f"the export has no unit {unit}")
        elif unit not in calib.info["probe"]["shapes"] and not any(k.startswith(f"{unit}/")
                                                                     for k in calib.info["probe"]["shapes"]):
            failures.append(f"no recorded outputs of {unit} to compare")
    for unit, output, shape, kept in calib.probe():
        if unit not in manifest["units"] or (units is not None and unit not in units):
            continue
        if unit not in sessions:
            from vidllm_edge.optional import require

            ort = ort or require("onnxruntime", "checking a calibration folder against an export")
            sess = ort.InferenceSession(str(export_dir / manifest["units"][unit]["file"]),
                                        providers=["CPUExecutionProvider"])
            feed = calib.samples(unit, "calibration")[0]
            names = [o.name for o in sess.get_outputs()]
            sessions[unit] = dict(zip(names, sess.run(names, feed)))
        got = sessions[unit][output]
        if tuple(got.shape) != shape:
            failures.append(f"{unit}.{output} has shape {list(got.shape)}, recorded {list(shape)}")
            continue
        values = got.reshape(-1)[probe_index(got.size)].astype(np.float64)
        rel = float(np.linalg.norm(values - kept) / max(np.linalg.norm(kept), 1e-30))
        if not rel <= tolerance:
            failures.append(f"{unit}.{output} rel-L2 {rel:.2e}")
    if failures:
        graphs = export_fingerprint(export_dir)
        what = "model state" if calib.info["model"]["kind"] == "torch" else "export graphs"
        raise CalibrationMismatchError(
            subject, f"was recorded from {what} sha256 {calib.info['model']['sha256'][:16]}…; the export "
            f"{export_dir} (graphs sha256 {graphs[:16]}…) does not reproduce the recorded outputs: "
            f"{'; '.join(failures)}.", fix)
