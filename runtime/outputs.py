"""Artifact writers (PLY point clouds, depth PNGs, npz, JSON) and a PLY reader.

Every writer creates the parent folder (OutputError when it cannot) and writes atomically: a
temporary file beside the target, renamed over it only when complete.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from vidllm_edge import atomic
from vidllm_edge.errors import InputError, OutputError

PLY_VERTEX = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
_PLY_FORMATS = {"binary_little_endian": "<", "binary_big_endian": ">", "ascii": None}


def _parent(path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic.ensure_dir(path.parent)
    return path


# ---------------------------------------------------------------------------------------------------
# PLY


def write_ply(path: str | os.PathLike, points: np.ndarray, colors: np.ndarray) -> Path:
    """Write a binary little-endian PLY: x, y, z float32 and red, green, blue uchar per vertex.

    Args:
        path: target file (its folder is created).
        points: [N, 3] float positions (metres).
        colors: [N, 3] uint8 RGB.
    """
    points, colors = np.asarray(points), np.asarray(colors)
    if points.ndim != 2 or points.shape[1] != 3 or colors.shape != points.shape:
        raise InputError("Point cloud", f"Received points {list(points.shape)} and colors {list(colors.shape)}.",
                         "Expected points [N, 3] and colors [N, 3].")
    if colors.dtype != np.uint8:
        raise InputError("Point cloud colors", f"Received dtype {colors.dtype}.", "Expected uint8 RGB in 0..255.")
    vertices = np.empty(len(points), PLY_VERTEX)
    for i, name in enumerate("xyz"):
        vertices[name] = points[:, i]
    for i, name in enumerate(("red", "green", "blue")):
        vertices[name] = colors[:, i]
    header = ("ply\nformat binary_little_endian 1.0\ncomment vidllm-edge point cloud, metres\n"
              f"element vertex {len(points)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    return atomic.write_bytes(_parent(path), header.encode("ascii") + vertices.tobytes())


def read_ply(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read the vertices of a PLY file (binary little/big endian or ascii).

    Returns:
        (points [N, 3] float32, colors [N, 3] uint8 or None when the file has no red/green/blue).
    """
    path = Path(path)
    subject = f"PLY file: {path}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(subject, f"cannot be read ({exc.strerror or exc}).", "Check the path.") from exc
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise InputError(subject, "is not a PLY file (no 'ply' ... 'end_header' header).", "Pass a .ply file.")
    body_start = data.index(b"\n", end) + 1
    fmt, count, dtype = _parse_ply_header(data[:end].decode("ascii", "replace"), subject)
    if fmt is None:
        lines = [ln for ln in data[body_start:].decode("ascii", "replace").splitlines() if ln.strip()][:count]
        rows = np.array([line.split()[:len(dtype.names)] for line in lines], dtype=np.float64).reshape(-1, len(dtype.names))
        vertices = np.empty(len(rows), dtype)
        for i, name in enumerate(dtype.names):
            vertices[name] = rows[:, i]
    else:
        vertices = np.frombuffer(data, dtype.newbyteorder(fmt), count=count, offset=body_start) \
            if len(data) - body_start >= count * dtype.itemsize else np.empty(0, dtype)
    if len(vertices) != count:
        raise InputError(subject, f"is truncated: the header declares {count} vertices, {len(vertices)} are present.",
                         "Write the file again.")
    points = np.stack([vertices[n] for n in "xyz"], -1).astype(np.float32)
    if not {"red", "green", "blue"} <= set(dtype.names):
        return points, None
    return points, np.stack([vertices[n] for n in ("red", "green", "blue")], -1).astype(np.uint8)


def _parse_ply_header(header: str, subject: str) -> tuple[str | None, int, np.dtype]:
    """-> (byte order '<' / '>' or None for ascii, vertex count, vertex dtype in native order)."""
    fmt, count, fields, element = None, None, [], None
    for line in header.splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            if words[1] not in _PLY_FORMATS:
                raise InputError(subject, f"has the unknown format '{words[1]}'.", "Use ascii or binary PLY.")
            fmt = _PLY_FORMATS[words[1]]
        elif words[0] == "element":
            if element == "vertex":
                break  # elements after the vertices (faces) are not read
            element, count = words[1], int(words[2])
            if element != "vertex":
                raise InputError(subject, f"starts with the element '{element}', not 'vertex'.",
                                 "Write the vertices first.")
        elif words[0] == "property" and element == "vertex":
            if words[1] == "list" or words[1] not in _PLY_TYPES:
                raise InputError(subject, f"has the unsupported vertex property '{line.strip()}'.",
                                 "Use scalar vertex properties.")
            fields.append((words[2], _PLY_TYPES[words[1]]))
    names = [name for name, _ in fields]
    if count is None or not {"x", "y", "z"} <= set(names):
        raise InputError(subject, "has no vertex element with x, y, z.", "Pass a point-cloud PLY.")
    return fmt, count, np.dtype(fields)


def subsample_points(points: np.ndarray, colors: np.ndarray, max_points: int,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` of the points [N, 3] and colors [N, 3], chosen at random (seeded), in input order."""
    if max_points < 1:
        raise InputError("Argument: max_points", f"Received {max_points}.", "Use a positive number of points.")
    if len(points) <= max_points:
        return points, colors
    keep = np.sort(np.random.default_rng(seed).choice(len(points), max_points, replace=False))
    return points[keep], colors[keep]


# ---------------------------------------------------------------------------------------------------
# Images, arrays, JSON


def _encode_png(image: np.ndarray, target: Path) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OutputError(f"Image: {target}", "could not be encoded as PNG.", "Check the depth array.")
    return buf.tobytes()


def write_depth_pngs(out_dir: str | os.PathLike, depth: np.ndarray, prefix: str = "depth") -> list[Path]:
    """Per frame, ``{prefix}_{i:04d}.png`` (colourised, TURBO, near = red) and ``{prefix}_{i:04d}_mm.png``
    (uint16 millimetres). Both use 0 / black for invalid depth (not finite or ≤ 0).

    Args:
        out_dir: folder (created).
        depth: [S, H, W] depth in metres. The colour range is the min..max valid depth over all frames,
            so colours compare across frames.
    Returns:
        The paths written, colour then millimetre image for each frame.
    """
    import cv2

    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 3:
        raise InputError("Depth", f"Received shape {list(depth.shape)}.", "Expected [S, H, W] in metres.")
    out_dir = atomic.ensure_dir(out_dir)
    valid = np.isfinite(depth) & (depth > 0)
    lo, hi = (depth[valid].min(), depth[valid].max()) if valid.any() else (0.0, 1.0)
    near = np.clip((hi - np.where(valid, depth, hi)) / max(hi - lo, 1e-9), 0, 1)  # 1 = nearest
    written = []
    for i in range(depth.shape[0]):
        colour = cv2.applyColorMap(np.round(near[i] * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
        colour[~valid[i]] = 0
        mm = np.clip(np.round(np.where(valid[i], depth[i], 0) * 1000), 0, 65535).astype(np.uint16)
        for name, image in ((f"{prefix}_{i:04d}.png", colour), (f"{prefix}_{i:04d}_mm.png", mm)):
            written.append(atomic.write_bytes(out_dir / name, _encode_png(image, out_dir / name)))
    return written


def write_npz(path: str | os.PathLike, /, **arrays: Any) -> Path:
    """Write ``arrays`` (name -> array) to an uncompressed ``.npz`` at ``path`` (no pickled objects)."""
    path = _parent(path)
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
            np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (indent 2): numpy scalars/arrays, tensors and paths converted, NaN/inf -> null."""
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False)
    return atomic.write_text(_parent(path), text + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, np.generic)) or hasattr(obj, "tolist"):  # numpy and torch
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj
