"""The export folder's manifest (``manifest.json``): what was exported, from what, and file hashes.

Shared by the exporter (writes it) and the runtime (checks it before loading anything), so it imports
nothing heavy. A file whose sha256 differs from the manifest is refused with the command that fixes it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vidllm_edge.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = "vidllm-edge-export"
VERSION = 1


def sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and structurally check ``folder/manifest.json``."""
    folder = Path(folder)
    path = folder / MANIFEST
    fix = "Export again: vidllm-edge export (--checkpoint DIR | --preset NAME) --out " + str(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Export folder: {folder}", "does not exist.", fix)
    if not path.is_file():
        raise CheckpointError(f"Export folder: {folder}", f"has no {MANIFEST}.", fix)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"Manifest: {path}", f"is not valid JSON ({exc}).", fix) from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"Manifest: {path}", f"has format {manifest.get('format')!r} version "
                              f"{manifest.get('version')!r}; this vidllm-edge reads {FORMAT!r} version {VERSION}.", fix)
    return manifest


def verify_files(folder: str | Path, manifest: dict[str, Any], units: list[str] | None = None) -> None:
    """Check every file of the named units (default: all) exists and has the recorded sha256."""
    folder = Path(folder)
    fix = f"Export again into a fresh folder: vidllm-edge export ... --out {folder}"
    problems = []
    for name, unit in manifest["units"].items():
        if units is not None and name not in units:
            continue
        for rel, digest in unit["files"].items():
            path = folder / rel
            if not path.is_file():
                problems.append(f"{rel} is missing")
            elif sha256(path) != digest:
                problems.append(f"{rel} has sha256 {sha256(path)[:12]}…, the manifest says {digest[:12]}…")
    if problems:
        raise CheckpointError(f"Export folder: {folder}", "does not match its manifest: " + "; ".join(problems) + ".",
                              fix)
