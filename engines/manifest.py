"""``engines.json``: the engines folder's manifest, one entry per unit (DESIGN.md §6).

An entry is :meth:`EngineKey.to_dict` (what invalidates the engine) plus the engine file's size and sha256,
the per-input shapes of its profile, how it was built (export folder, requested precision, frames,
workspace) and its build report (seconds, parity, latency). Written atomically: a failed write leaves the
previous manifest, and with it the previous good engines, in place.

The size and sha256 let :func:`check_engine_file` refuse a truncated or damaged engine with a clear
message *without* TensorRT: the plan format has no public header or version API
(github.com/NVIDIA/TensorRT/issues/3073), and deserialising a damaged plan gives an opaque error at best.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from vidllm_edge import atomic
from vidllm_edge.engines.keys import entry_rebuild_command
from vidllm_edge.errors import CheckpointError
from vidllm_edge.manifest import sha256

ENGINES = "engines.json"
FORMAT = "vidllm-edge-engines"
VERSION = 1
BUILD_HINT = "Build engines: vidllm-edge build --export EXPORT_DIR --precision fp16 --out {folder}"


class EngineFileError(CheckpointError):
    """An engine file is missing, truncated or damaged (checked before TensorRT sees it)."""


def empty_manifest(export_dir: Any = None) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "export": str(export_dir) if export_dir else None, "engines": {}}


def read_engines(folder: str | Path, missing_ok: bool = False) -> dict[str, Any]:
    """Read and structurally check ``folder/engines.json`` (an empty manifest if absent and ``missing_ok``)."""
    folder = Path(folder)
    path = folder / ENGINES
    fix = BUILD_HINT.format(folder=folder)
    if not path.is_file():
        if missing_ok:
            return empty_manifest()
        raise CheckpointError(f"Engines folder: {folder}", f"has no {ENGINES}.", fix)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"Engines manifest: {path}", f"is not valid JSON ({exc}).", fix) from exc
    if data.get("format") != FORMAT or data.get("version") != VERSION or not isinstance(data.get("engines"), dict):
        raise CheckpointError(f"Engines manifest: {path}", f"has format {data.get('format')!r} version "
                              f"{data.get('version')!r}; this vidllm-edge reads {FORMAT!r} version {VERSION}.", fix)
    return data


def write_engines(folder: str | Path, data: Mapping[str, Any]) -> Path:
    """Atomically write ``folder/engines.json``."""
    folder = atomic.ensure_dir(folder, "Engines folder")
    return atomic.write_text(folder / ENGINES, json.dumps(data, indent=2, sort_keys=False) + "\n")


def update_entry(folder: str | Path, unit: str, entry: Mapping[str, Any], export_dir: Any = None) -> dict[str, Any]:
    """Read-modify-write: set ``unit``'s entry (other units' entries are kept); returns the new manifest."""
    data = read_engines(folder, missing_ok=True)
    if export_dir is not None:
        data["export"] = str(export_dir)
    data["engines"][unit] = dict(entry)
    write_engines(folder, data)
    return data


def get_entry(data: Mapping[str, Any], unit: str, folder: str | Path) -> dict[str, Any]:
    """``unit``'s entry, or a CheckpointError naming the units that do have engines and the build command."""
    engines = data["engines"]
    if unit not in engines:
        export = data.get("export") or "EXPORT_DIR"
        raise CheckpointError(f"Engines folder: {folder}", f"has no engine for {unit} (it has: "
                              f"{', '.join(sorted(engines)) or 'none'}).",
                              f"Build it: vidllm-edge build --export {export} --precision fp16 --units {unit} "
                              f"--out {folder}")
    return engines[unit]


def check_engine_file(path: str | Path, entry: Mapping[str, Any], verify: str = "sha256") -> None:
    """Refuse a missing, truncated or damaged engine before deserialising it.

    Args:
        path: the engine file; entry: its ``engines.json`` entry (``size``, ``sha256``).
        verify: ``"size"`` (cheap) or ``"sha256"`` (reads the whole file; catches same-size damage).
    """
    path = Path(path)
    fix = "Rebuild: " + entry_rebuild_command(entry, path.parent)
    if not path.is_file():
        raise EngineFileError(f"Engine file: {path}", "is missing.", fix)
    size = path.stat().st_size
    if size != int(entry["size"]):
        what = "truncated" if size < int(entry["size"]) else "longer than recorded"
        raise EngineFileError(f"Engine file: {path}", f"is {what}: {size} bytes, {ENGINES} records "
                              f"{int(entry['size'])} (an interrupted copy or a full disk).", fix)
    if verify == "sha256" and sha256(path) != entry["sha256"]:
        raise EngineFileError(f"Engine file: {path}", f"is damaged: its sha256 differs from {ENGINES} "
                              f"({entry['sha256'][:12]}…).", fix)
