"""`vidllm-edge export`: every unit of a model to ONNX, validated and linted, with a manifest.

Folder layout::

    DIR/manifest.json        units, I/O specs, profiles, opset, sha256 of every file, the source config
    DIR/config.json          the model config (scene and prompt settings the runtime needs)
    DIR/tokenizer.json ...   the tokenizer files
    DIR/onnx/<unit>.onnx     one graph per unit (+ <unit>.onnx.data past 2 GB)
    DIR/onnx/llm_embed.safetensors   the LLM's input embedding table
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from vidllm_edge import atomic
from vidllm_edge import manifest as M
from vidllm_edge.errors import InputError, OutputError
from vidllm_edge.export.specs import OPSET, OPSET_23_REASON, OPSET_CHOICES, OPSET_REASON, SPECS, VISION_UNIT_NAMES
from vidllm_edge.export.validate import check, real_feeds, rows_to_dicts, table, validate_unit

LLM_UNITS = ("llm_prefill", "llm_decode")
ALL_UNITS = VISION_UNIT_NAMES + LLM_UNITS


@dataclass(frozen=True)
class FrameProfile:
    """min / opt / max frame counts (the dynamic S axis) the export is validated at and engines built for."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> "FrameProfile":
        try:
            lo, opt, hi = (int(v) for v in text.split(":"))
        except ValueError:
            raise InputError(f"Argument: --frames {text}", "is not MIN:OPT:MAX.", "Write e.g. --frames 1:8:32.") from None
        if not 1 <= lo <= opt <= hi:
            raise InputError(f"Argument: --frames {text}", "must satisfy 1 <= MIN <= OPT <= MAX.",
                             "Write e.g. --frames 1:8:32.")
        return cls(lo, opt, hi)

    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted({self.min, self.opt, self.max}))


def parse_hw(text: str) -> tuple[int, int]:
    """``"518x686"`` -> (518, 686); both multiples of 14."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"Argument: --image-hw {text}", "is not HxW.", "Write e.g. --image-hw 518x686.") from None
    if h % 14 or w % 14 or min(h, w) < 14:
        raise InputError(f"Argument: --image-hw {text}", "needs H and W as positive multiples of 14.",
                         "Write e.g. --image-hw 518x686 (what a 4:3 video becomes at short side 518).")
    return h, w


def default_image_hw(cfg) -> tuple[int, int]:
    """The frame size a 4:3 landscape video gets from the preprocessing (short side = cfg.image_size)."""
    from vidllm_edge.runtime.video import plan_preprocess

    return tuple(plan_preprocess(480, 640, cfg.image_size, cfg.patch_size).output_hw)


def export_model(model, out_dir: str | Path, precision: str = "fp32", frames: FrameProfile | None = None,
                 units: tuple[str, ...] = ALL_UNITS, image_hw: tuple[int, int] | None = None,
                 allow_unsupported: bool = False, validate: bool = True, source: dict[str, Any] | None = None,
                 log: TextIO | None = None, opset: int = OPSET) -> dict[str, Any]:
    """Export ``units`` of ``model`` into ``out_dir``; returns the manifest (also written as manifest.json).

    Each vision unit is validated right after export on ONNX Runtime CPU against the reference, on real
    frames, at every size of ``frames`` (so dynamic axes are checked away from the export size), then
    linted for TensorRT 10. Raises ValidationError / LintError listing every failing output / operator.
    """
    from vidllm_edge.export.lint import check_lint, lint_onnx
    from vidllm_edge.export.onnx_export import export_unit

    log = log or sys.stderr
    unknown = [u for u in units if u not in ALL_UNITS]
    if unknown:
        raise InputError(f"Argument: --units {','.join(units)}", f"names unknown units {unknown}.",
                         f"Choose from {', '.join(ALL_UNITS)}.")
    if precision not in ("fp32", "fp16"):
        raise InputError(f"Argument: --precision {precision}", "is not an ONNX export precision.", "Use fp32 or fp16.")
    if opset not in OPSET_CHOICES:
        raise InputError(f"Argument: --opset {opset}", f"is not one of {OPSET_CHOICES}.",
                         "Use 18 (TensorRT-portable, the default) or 23 (fused attention on ONNX Runtime CUDA).")
    frames = frames or FrameProfile(1, min(8, model.cfg.num_frames), model.cfg.num_frames)
    image_hw = image_hw or default_image_hw(model.cfg)
    out_dir = atomic.ensure_dir(out_dir, "Export folder")
    onnx_dir = atomic.ensure_dir(out_dir / "onnx", "Export folder")
    entries: dict[str, Any] = {}
    wanted_vision = [u for u in units if u in SPECS]
    feeds = ({s: real_feeds(model, image_hw, s) for s in frames.sizes()} if validate and wanted_vision else {})
    for i, name in enumerate(wanted_vision, 1):
        spec = dataclasses.replace(SPECS[name], opset=opset,
                                   opset_reason=OPSET_23_REASON if opset == 23 else SPECS[name].opset_reason)
        print(f"[{i}/{len(units)}] {name}: exporting ({precision}, {image_hw[0]}x{image_hw[1]}) ...", file=log, flush=True)
        path = onnx_dir / f"{name}.onnx"
        files = export_unit(spec, model, image_hw, path, precision, example_size=max(2, frames.opt))
        report = lint_onnx(path)
        print(_indent(report.table()), file=log)
        entry = _entry(out_dir, spec.unit, files, spec.dynamic, profile_for(spec.dynamic, model.cfg, frames), report)
        if validate:
            rows = validate_unit(spec, model, image_hw, path, precision, frames.sizes(), feeds)
            print(_indent(table(rows)), file=log, flush=True)
            entry["validation"] = rows_to_dicts(rows)
            check(rows, f"Exported unit: {name} ({path})")
        check_lint(report, allow_unsupported, f"Exported unit: {name} ({path})")
        entries[name] = entry
    if any(u in LLM_UNITS for u in units):
        entries.update(_export_llm(model, onnx_dir, out_dir, frames, allow_unsupported, validate, log))
    _write_side_files(model, out_dir)
    manifest = {
        "format": M.FORMAT, "version": M.VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "precision": precision, "image_hw": list(image_hw),
        "frames": {"min": frames.min, "opt": frames.opt, "max": frames.max},
        "opset": opset, "opset_reason": OPSET_23_REASON if opset == 23 else OPSET_REASON,
        "source": source or {}, "config": model.portable_config().to_dict(), "units": entries,
    }
    previous = out_dir / M.MANIFEST
    if previous.is_file() and set(units) != set(ALL_UNITS):
        old = M.read_manifest(out_dir)  # a partial export keeps the other units' entries
        if old.get("image_hw") == manifest["image_hw"] and old.get("precision") == precision:
            manifest["units"] = {**old["units"], **entries}
    atomic.write_text(previous, json.dumps(manifest, indent=2))
    return manifest


def derive_fp16(fp32_dir: str | Path, out_dir: str | Path, units: tuple[str, ...] | None = None,
                log: TextIO | None = None) -> dict[str, Any]:
    """The FP16 export folder made from an FP32 one without tracing again: each vision unit's graph converted
    by `to_fp16`, which is exactly what ``export_model(precision="fp16")`` does after its own trace (the same
    traced program, so the same FP16 graph), in seconds instead of minutes per unit. The LLM graphs stay FP32
    exports of their own and are not carried over. The folder appears complete or not at all.
    """
    import shutil
    import tempfile

    from vidllm_edge.export.lint import lint_onnx
    from vidllm_edge.export.onnx_export import to_fp16

    log = log or sys.stderr
    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    source = M.read_manifest(fp32_dir)
    if source.get("precision") != "fp32":
        raise InputError(f"Export folder: {fp32_dir}", f"is {source.get('precision')}, not fp32.",
                         "Derive FP16 from an FP32 export (vidllm-edge export --precision fp32).")
    units = tuple(u for u in (units or tuple(source["units"])) if u in SPECS)
    missing = [u for u in units if u not in source["units"]]
    if missing:
        raise InputError(f"Export folder: {fp32_dir}", f"lacks the units {', '.join(missing)}.",
                         "Export them first, or name only the units it has.")
    M.verify_files(fp32_dir, source, list(units))
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OutputError(f"Export folder: {out_dir}", "exists and is not empty.", "Choose a new folder or remove it.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        (staging / "onnx").mkdir()
        entries = {}
        for name in units:
            old = source["units"][name]
            start = time.perf_counter()
            files = [staging / f for f in old["files"]]
            for f in old["files"]:
                shutil.copyfile(fp32_dir / f, staging / f)
            path = staging / old["file"]
            to_fp16(path, len(files) > 1)
            files = [staging / f for f in old["files"] if (staging / f).exists()]
            report = lint_onnx(path)
            entries[name] = {**old, "files": {str(f.relative_to(staging)): M.sha256(f) for f in files},
                             "lint": report.to_dict()}
            entries[name].pop("validation", None)  # the FP32 graph's validation does not describe this one
            print(f"[fp16] {name}: converted from {fp32_dir} in {time.perf_counter() - start:.1f} s", file=log, flush=True)
        for side in fp32_dir.iterdir():  # config.json and the tokenizer files
            if side.is_file() and side.name != M.MANIFEST:
                shutil.copyfile(side, staging / side.name)
        manifest = {**source, "precision": "fp16", "units": entries, "derived_from": str(fp32_dir),
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        atomic.write_text(staging / M.MANIFEST, json.dumps(manifest, indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        staging.replace(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _export_llm(model, onnx_dir: Path, out_dir: Path, frames: FrameProfile, allow_unsupported: bool, validate: bool,
                log: TextIO) -> dict[str, Any]:
    from vidllm_edge.export.lint import check_lint, lint_onnx
    from vidllm_edge.export.llm import export_llm, llm_geometry

    print("[llm] llm_prefill + llm_decode: exporting (fp32) ...", file=log, flush=True)
    paths = export_llm(model.llm, onnx_dir, validate=validate)
    geometry = llm_geometry(model.llm)
    entries = {}
    for name in LLM_UNITS:
        report = lint_onnx(paths[name])
        print(_indent(report.table()), file=log)
        check_lint(report, allow_unsupported, f"Exported unit: {name} ({paths[name]})")
        files = [p for p in onnx_dir.iterdir() if p.name.startswith(paths[name].name)]
        if name == "llm_decode":
            files.append(paths["llm_embed"])
        entries[name] = {"files": {str(p.relative_to(out_dir)): M.sha256(p) for p in sorted(files)},
                         "file": str(paths[name].relative_to(out_dir)), "llm": geometry,
                         "lint": report.to_dict(), "precision": "fp32"}
    return entries


def profile_for(dynamic: dict[str, str], cfg, frames: FrameProfile) -> dict[str, list[int]]:
    """min/opt/max of each dynamic symbol: frames from ``frames``; the others from the config."""
    md = cfg.metric_depth.max_frames
    tokens = cfg.scene.max_visual_tokens
    table = {"S": [frames.min, frames.opt, frames.max],
             "Sm": [1, min(frames.opt, md), min(frames.max, md)],
             "M": [1, max(1, tokens // 2), tokens],
             "N": [1, 1, 16]}
    return {sym: table[sym] for sym in dynamic}


def _entry(out_dir: Path, unit, files: list[Path], dynamic: dict[str, str], profile: dict[str, list[int]],
           report) -> dict:
    return {
        "file": str(files[0].relative_to(out_dir)),
        "files": {str(p.relative_to(out_dir)): M.sha256(p) for p in files},
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in unit.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in unit.outputs],
        "dynamic": dynamic,
        "profile": profile,
        "lint": report.to_dict(),
    }


def _write_side_files(model, out_dir: Path) -> None:
    """config.json and the tokenizer, so the runtime needs nothing but this folder."""
    atomic.write_text(out_dir / "config.json", json.dumps(model.portable_config().to_dict(), indent=2))
    from vidllm_edge.models.tokenizer import save_tokenizer

    save_tokenizer(model.tokenizer, out_dir)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
