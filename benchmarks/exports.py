"""The folders a benchmark run reads or makes: ONNX export folders per precision (INT8 Q/DQ graphs inside the
FP32 one) and a TensorRT engines folder.

Every folder is checked before anything is computed: its manifest, the model it was made from (the model
state's sha256, recorded by the exporter), its frame size and its frame profile. A folder from another model
or a frame count outside the profile is an error (exit code 2), never a silent re-export. What is missing
is made: the vision units exported with the exporter (no ONNX Runtime validation pass: the benchmark's
parity is that check) and, for INT8, calibration inputs recorded from a synthetic room with other textures
than the benchmark's and every unit fully quantized (``quantize_unit``: no per-node sensitivity pass, the
parity gate judges the result).

Layout of ``--export DIR``: ``DIR/fp32`` and ``DIR/fp16`` export folders (``DIR/fp32-calib`` the calibration),
or DIR itself one export folder (its precision only).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from vidllm_edge import manifest as M
from vidllm_edge import units as U
from vidllm_edge.errors import CheckpointError, InputError

VISION_UNITS = ("perception", "geometry", "metric_depth", "lift_project", "projector")
INT8_FILE = "{unit}.int8.onnx"


def _check_identity(manifest: dict, subject: str, fingerprint: Callable[[], str], model, model_name: str,
                    note: str) -> str:
    """CheckpointError unless the export of ``manifest`` came from the benchmarked model; returns how it was told:
    by the model state's sha256, or (an export that does not name it) by the config only."""
    recorded = (manifest.get("source") or {}).get("state_sha256")
    if recorded is None:
        if manifest.get("config") != model.portable_config().to_dict():
            raise CheckpointError(subject, f"was exported from another model config than the benchmarked model's "
                                  f"({model_name}).", note)
        return "config only (the export names no model state)"
    ours = fingerprint()
    if recorded != ours:
        raise CheckpointError(subject, f"was made from model state sha256 {recorded[:12]}…; the benchmarked model "
                              f"({model_name}) has {ours[:12]}….", note)
    return "model state sha256"


def _check_frames(frames: tuple[int, ...], lo: int, hi: int, subject: str, fix: str) -> None:
    outside = [s for s in frames if not lo <= s <= hi]
    if outside:
        raise InputError(f"Argument: --frames {','.join(map(str, frames))}", f"asks for {outside[0]} frames, outside "
                         f"the frame profile S in [{lo}, {hi}] of {subject}.",
                         f"Benchmark {lo} to {hi} frames, or {fix}")


@dataclasses.dataclass
class Artifacts:
    """Export folders per precision (existing or to be made) and the engines folder, all checked."""

    exports: dict[str, Path]       # "fp32" / "fp16" -> folder (int8 graphs live in the fp32 folder)
    existing: dict[str, bool]
    engines: Path | None
    engines_precision: str | None
    image_hw: tuple[int, int]
    identity: dict[str, str]
    temporary: Path | None


def resolve_artifacts(opts: Any, model, model_name: str, frames: tuple[int, ...],
                      fingerprint: Callable[[], str]) -> Artifacts:
    """Find and check every folder the run reads before anything is computed: manifests, the model they came
    from, their frame size and their frame profile (CheckpointError / InputError, exit code 2)."""
    from vidllm_edge.export.exporter import default_image_hw

    identity: dict[str, str] = {}
    image_hw = tuple(opts.image_hw) if opts.image_hw else None
    base = Path(opts.export) if opts.export is not None else None
    if base is None or "onnxruntime" not in opts.backends:  # only onnxruntime rows read export folders
        exports = {}
    elif (base / M.MANIFEST).is_file():
        exports = {M.read_manifest(base)["precision"]: base}
    else:
        exports = {"fp32": base / "fp32", "fp16": base / "fp16"}
    existing = {}
    fix_other = "leave --export out (a temporary export is made) or point it to a folder of this model's exports."
    for precision, folder in exports.items():
        existing[precision] = (folder / M.MANIFEST).is_file()
        if not existing[precision]:
            continue
        manifest = M.read_manifest(folder)
        subject = f"Export folder: {folder}"
        if manifest.get("precision") != precision:
            raise CheckpointError(subject, f"holds a {manifest.get('precision')} export where {precision} was expected.",
                                  f"Keep each precision in its own folder: {base}/fp32, {base}/fp16.")
        missing = [u for u in VISION_UNITS if u not in manifest["units"]]
        if missing:
            raise CheckpointError(subject, f"lacks the units {', '.join(missing)}.",
                                  f"Export them (vidllm-edge export --units {','.join(VISION_UNITS)} ...), or {fix_other}")
        hw = tuple(manifest["image_hw"])
        if image_hw is not None and hw != image_hw:
            raise InputError(f"{subject}", f"takes {hw[0]}x{hw[1]} frames; this run measures {image_hw[0]}x{image_hw[1]}.",
                             "Use one frame size for every folder (--image-hw), or another --export folder.")
        image_hw = hw
        fr = manifest["frames"]
        _check_frames(frames, fr["min"], fr["max"], f"the export {folder}",
                      "export for more: leave --export out, or use an empty --export folder.")
        identity[f"export {precision}"] = _check_identity(manifest, subject, fingerprint, model, model_name,
                                                          "Benchmark the model it was exported from (same --preset and "
                                                          f"--seed, or --checkpoint), or {fix_other}")
    engines_precision = None
    if opts.engines is not None:
        from vidllm_edge.engines.manifest import read_engines

        data = read_engines(opts.engines)
        if not data["engines"]:
            raise CheckpointError(f"Engines folder: {opts.engines}", "lists no engines.",
                                  f"Build them: vidllm-edge build --export EXPORT_DIR --out {opts.engines}")
        export = Path(data.get("export") or "")
        subject = f"Engines folder: {opts.engines}"
        manifest = M.read_manifest(export)
        identity["engines"] = _check_identity(manifest, subject, fingerprint, model, model_name,
                                              "Build engines from an export of this model (vidllm-edge export, then "
                                              "vidllm-edge build), or leave --engines out.")
        hw = tuple(manifest["image_hw"])
        if image_hw is not None and hw != image_hw:
            raise InputError(subject, f"was built for {hw[0]}x{hw[1]} frames; this run measures "
                             f"{image_hw[0]}x{image_hw[1]}.", "Use the engines' frame size (--image-hw) or other engines.")
        image_hw = hw
        for unit, entry in data["engines"].items():
            if "S" in entry.get("profile", {}):
                lo, _, hi = entry["profile"]["S"]
                _check_frames(frames, lo, hi, f"the engine of {unit} in {opts.engines}",
                              "rebuild the engines for more (vidllm-edge build ... --frames MIN:OPT:MAX).")
        precisions = {(e.get("build") or {}).get("precision") or e.get("precision") for e in data["engines"].values()}
        engines_precision = "int8" if "int8" in precisions else "fp16" if precisions & {"fp16", "best"} else "fp32"
    if image_hw is None:
        image_hw = default_image_hw(model.cfg)
    if image_hw[0] % model.cfg.patch_size or image_hw[1] % model.cfg.patch_size:
        raise InputError(f"Argument: --image-hw {image_hw[0]}x{image_hw[1]}",
                         f"is not a multiple of the {model.cfg.patch_size}-pixel patch.", "Write e.g. --image-hw 336x518.")
    temporary = None
    if base is None and "onnxruntime" in opts.backends:  # made last: a failed check leaves nothing behind
        temporary = Path(tempfile.mkdtemp(prefix="vidllm-bench-"))
        exports = {"fp32": temporary / "fp32", "fp16": temporary / "fp16"}
        existing = {p: False for p in exports}
    return Artifacts(exports, existing, opts.engines, engines_precision, tuple(image_hw), identity, temporary)


def prepare_exports(model, model_name: str, arts: Artifacts, opts: Any, frames: tuple[int, ...],
                    fingerprint: Callable[[], str], log: TextIO) -> list[str]:
    """Make the ONNX artifacts the requested onnxruntime rows need and do not have yet; returns what was made."""
    from vidllm_edge.export.exporter import FrameProfile, export_model

    made = []
    wanted = {"fp32" if p == "int8" else p for p in opts.precisions}
    profile = FrameProfile(1, min(8, max(frames)), max(max(frames), 2))
    for precision in sorted(wanted, reverse=True):  # fp32 first: the fp16 folder is derived from it
        folder = arts.exports.get(precision)
        if folder is None:
            continue  # a single export folder of another precision was given: those rows are skipped
        fp32 = arts.exports.get("fp32")
        if precision == "fp16" and not arts.existing.get("fp16") and fp32 is not None and arts.existing.get("fp32"):
            from vidllm_edge.export.exporter import derive_fp16

            start = time.perf_counter()  # the same FP16 graphs as exporting again, without tracing again
            derive_fp16(fp32, folder, VISION_UNITS, log=log)
            arts.existing["fp16"] = True
            made.append(f"fp16 export derived from the fp32 one ({time.perf_counter() - start:.0f} s)")
            continue
        if not arts.existing.get(precision):
            start = time.perf_counter()
            print(f"exporting the vision units ({precision}, {arts.image_hw[0]}x{arts.image_hw[1]}, opset {opts.opset}) "
                  f"into {folder} ...", file=log, flush=True)
            export_model(model, folder, precision=precision, frames=profile, units=VISION_UNITS,
                         image_hw=arts.image_hw, validate=False, opset=opts.opset, log=log,
                         source={"model": model_name, "state_sha256": fingerprint()})
            arts.existing[precision] = True
            made.append(f"{precision} export ({time.perf_counter() - start:.0f} s)")
    if "int8" in opts.precisions and "fp32" in arts.exports:
        made += _prepare_int8(model, arts.exports["fp32"], arts, profile.opt, log)
    return made


def _prepare_int8(model, export: Path, arts: Artifacts, frames: int, log: TextIO) -> list[str]:
    """Record calibration inputs from a synthetic room with other textures (seed 1) and write every unit's
    fully quantized Q/DQ graph that is missing (no per-node sensitivity pass: the parity gate judges it)."""
    missing = [u for u in VISION_UNITS if not (export / "onnx" / INT8_FILE.format(unit=u)).is_file()]
    if not missing:
        return []
    from vidllm_edge.calibration.quantize import quantize_unit
    from vidllm_edge.calibration.record import record_calibration
    from vidllm_edge.synthetic import write_scene

    start = time.perf_counter()
    calib = export.parent / f"{export.name}-calib"
    h, w = arts.image_hw
    video, _ = write_scene(calib / "video", num_frames=max(16, 2 * frames), width=w + w % 2, height=h + h % 2, seed=1)
    print(f"recording INT8 calibration inputs ({frames} frames of {video}) ...", file=log, flush=True)
    record_calibration(model, [video], frames, calib, image_hw=arts.image_hw, photos=0, log=log)
    for unit in missing:
        print(f"quantizing {unit} (INT8 Q/DQ, every MatMul/Conv) ...", file=log, flush=True)
        quantize_unit(export, unit, calib)
    return [f"int8 Q/DQ graphs of {', '.join(missing)} ({time.perf_counter() - start:.0f} s)"]


def ort_units(folder: Path, precision: str, providers: list[str], dims: dict[str, int]) -> tuple[dict, list[str]]:
    """The vision units of an export folder on ONNX Runtime; for int8 the Q/DQ graphs where they exist.
    Returns (units, the units that run in FP32 in an int8 row)."""
    from vidllm_edge.runtime.ort_backend import OrtUnit, needs_basic_rewrites

    manifest = M.read_manifest(folder)
    M.verify_files(folder, manifest, list(VISION_UNITS))
    units, fp_units = {}, []
    for name in VISION_UNITS:
        path = folder / manifest["units"][name]["file"]
        if precision == "int8":
            int8 = path.with_name(INT8_FILE.format(unit=name))
            path = int8 if int8.is_file() else path
            if path != int8:
                fp_units.append(name)
        spec = U.VISION_UNITS[name]
        bound = {k: v for k, v in dims.items() if any(k in t.shape for t in spec.inputs + spec.outputs)}
        basic = needs_basic_rewrites(path.name.endswith(".int8.onnx"), int(manifest.get("opset", 18)))
        units[name] = OrtUnit(spec, path, providers, bound, basic_optimizations=basic)
    return units, fp_units
