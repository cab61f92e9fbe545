"""A synthetic room with exact ground truth, ray cast in numpy (no GPU, no OpenGL).

The scene: a 6 m × 5 m × 3 m room (world frame: z up, floor at z = 0, room centre above the origin)
with a different procedural texture on the floor, the ceiling and each wall, and three axis-aligned
boxes standing on the floor. A camera at about 1.5 m height moves along an arc around the boxes,
looking at them. Per frame the renderer returns the colour image and its exact geometry.

Conventions (the same as ``vidllm_edge.models.lift``):
- Pixel (u, v) covers [u, u+1) × [v, v+1) in continuous image coordinates; its centre is (u + 0.5, v + 0.5).
  The principal point is the image centre (W/2, H/2), so ``X_cam = depth · K⁻¹ [u + 0.5, v + 0.5, 1]ᵀ``.
- Cameras use OpenCV axes (x right, y down, z forward); extrinsics are world-to-camera [R | t] with
  ``X_cam = R X_world + t``. Depth is z-depth along the optical axis (not the ray length), in metres.
- Boxes are (cx, cy, cz, dx, dy, dz) in metres in the world frame (centre and full extents).

The model's world is its first camera: use `to_first_camera_frame`, `boxes_to_first_camera` and
`relative_extrinsics` to compare its outputs with this ground truth.

The geometry and the camera path are fixed; ``seed`` only changes the procedural textures.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from vidllm_edge import atomic
from vidllm_edge.errors import InputError, OutputError

ROOM_MIN = np.array([-3.0, -2.5, 0.0])  # metres, world frame
ROOM_MAX = np.array([3.0, 2.5, 3.0])
BOX_NAMES = ("red box", "green box", "blue box")
BOXES = np.array([  # (cx, cy, cz, dx, dy, dz), metres; cz = dz / 2: every box stands on the floor
    [0.5, 0.4, 0.4, 0.7, 0.5, 0.8],
    [-0.8, -0.3, 0.3, 0.6, 0.6, 0.6],
    [0.2, -0.9, 0.2, 0.9, 0.4, 0.4],
])
BOX_COLOURS = np.array([[0.85, 0.15, 0.12], [0.15, 0.7, 0.2], [0.15, 0.3, 0.85]])  # RGB in [0, 1]
HFOV_DEG = 80.0  # horizontal field of view
LIGHT = np.array([0.5, 0.3, 2.9])  # a point light under the ceiling, metres
MAX_NPZ_POINTS_BYTES = 64 << 20  # `write_scene` leaves the hit points out of the npz above this


@dataclasses.dataclass
class SyntheticScene:
    """Rendered frames and their ground truth (see the module docstring for the conventions)."""

    rgb: np.ndarray         # [N, H, W, 3] uint8, RGB
    depth: np.ndarray       # [N, H, W] float32 z-depth, metres
    K: np.ndarray           # [N, 3, 3] float64 pinhole intrinsics, pixels
    extrinsics: np.ndarray  # [N, 3, 4] float64 world-to-camera [R | t], OpenCV axes, metres
    points: np.ndarray      # [N, H, W, 3] float32 world-space hit point of each pixel-centre ray, metres
    boxes: np.ndarray       # [B, 6] float64 (cx, cy, cz, dx, dy, dz), world frame, metres
    box_names: list[str]    # [B]
    fps: float = 12.0


def intrinsics(width: int, height: int) -> np.ndarray:
    """Pinhole K [3, 3] for a ``width`` × ``height`` image: square pixels, principal point (W/2, H/2)."""
    f = (width / 2) / np.tan(np.radians(HFOV_DEG) / 2)
    return np.array([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """World-to-camera [R | t] [3, 4] (OpenCV axes) of a camera at ``eye`` looking at ``target`` (metres)."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward])  # rows: camera axes in world coordinates
    return np.concatenate([rot, -(rot @ eye)[:, None]], 1)


def camera_path(num_frames: int) -> np.ndarray:
    """Extrinsics [N, 3, 4] along an elliptical arc (~100°) around the boxes, about 1.5 m high."""
    s = np.linspace(0.0, 1.0, num_frames)
    theta = np.radians(200.0 + 100.0 * s)
    eyes = np.stack([2.3 * np.cos(theta), 1.8 * np.sin(theta), 1.5 + 0.1 * np.sin(2 * np.pi * s)], -1)
    targets = np.stack([0.3 * np.sin(np.pi * s), -0.2 * np.cos(np.pi * s), np.full_like(s, 0.7)], -1)
    return np.stack([look_at(e, t) for e, t in zip(eyes, targets)])


# ---------------------------------------------------------------------------------------------------
# Procedural textures: (a, b) metric coordinates on a surface -> intensity or RGB in [0, 1].


class _Noise:
    """Smooth value noise from a seeded lattice (periodic), bilinearly interpolated."""

    def __init__(self, rng: np.random.Generator, size: int = 64) -> None:
        self.grid = rng.random((size, size))
        self.size = size

    def __call__(self, a: np.ndarray, b: np.ndarray, cell: float) -> np.ndarray:
        x, y = a / cell, b / cell
        x0, y0 = np.floor(x), np.floor(y)
        fx, fy = x - x0, y - y0
        fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)  # smoothstep: no visible lattice lines
        i0, j0 = x0.astype(np.int64) % self.size, y0.astype(np.int64) % self.size
        i1, j1 = (i0 + 1) % self.size, (j0 + 1) % self.size
        g = self.grid
        top = g[j0, i0] * (1 - fx) + g[j0, i1] * fx
        bottom = g[j1, i0] * (1 - fx) + g[j1, i1] * fx
        return top * (1 - fy) + bottom * fy


def _mix(c0, c1, w: np.ndarray) -> np.ndarray:
    """Blend two RGB colours by weights w [P] in [0, 1] -> [P, 3]."""
    return np.asarray(c0)[None] * (1 - w[:, None]) + np.asarray(c1)[None] * w[:, None]


def _surface_textures(seed: int):
    """One texture function per room surface (floor, ceiling, x-, x+, y-, y+ walls) and one for boxes."""
    noises = [_Noise(r) for r in (np.random.default_rng([seed, k]) for k in range(7))]

    def checker(a, b, n):  # floor: 0.5 m wooden tiles
        tile = (np.floor(a / 0.5) + np.floor(b / 0.5)) % 2
        return _mix([0.55, 0.4, 0.25], [0.8, 0.68, 0.5], 0.8 * tile + 0.2 * n(a, b, 0.15))

    def blotches(a, b, n):  # ceiling: soft plaster
        return _mix([0.75, 0.75, 0.72], [0.95, 0.95, 0.92], n(a, b, 0.4))

    def vertical_stripes(a, b, n):
        stripe = (np.floor(a / 0.3) % 2) * 0.7 + 0.3 * n(a, b, 0.2)
        return _mix([0.3, 0.45, 0.6], [0.85, 0.85, 0.75], stripe)

    def horizontal_stripes(a, b, n):
        stripe = (np.sin(2 * np.pi * b / 0.5) > 0) * 0.6 + 0.4 * n(a, b, 0.3)
        return _mix([0.6, 0.3, 0.35], [0.9, 0.8, 0.7], stripe)

    def bricks(a, b, n):
        row = np.floor(b / 0.25)
        u = a + 0.25 * (row % 2)
        mortar = (np.abs(b / 0.25 - np.round(b / 0.25)) < 0.1) | (np.abs(u / 0.5 - np.round(u / 0.5)) < 0.05)
        return _mix([0.65, 0.3, 0.2], [0.85, 0.85, 0.8], np.maximum(mortar, 0.3 * n(a, b, 0.1)))

    def grid_noise(a, b, n):
        lines = (np.abs(a / 0.6 - np.round(a / 0.6)) < 0.04) | (np.abs(b / 0.6 - np.round(b / 0.6)) < 0.04)
        return _mix([0.35, 0.55, 0.35], [0.9, 0.9, 0.6], np.clip(0.7 * n(a, b, 0.5) + 0.8 * lines, 0, 1))

    room = [checker, blotches, vertical_stripes, horizontal_stripes, bricks, grid_noise]
    bound = [(lambda f, n: lambda a, b: f(a, b, n))(f, n) for f, n in zip(room, noises)]

    def box_face(a, b, base):  # fine checker modulation so box faces carry features
        fine = (np.floor(a / 0.1) + np.floor(b / 0.1)) % 2
        return base * (0.75 + 0.15 * fine + 0.1 * noises[6](a, b, 0.07))[:, None]

    return bound, box_face


# ---------------------------------------------------------------------------------------------------
# Ray casting


def _pixel_rays(K: np.ndarray, width: int, height: int) -> np.ndarray:
    """Camera-frame ray directions with z = 1 through every pixel centre: [H*W, 3]."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)  # [H, W] each
    pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], -1)  # [H*W, 3]
    return pix @ np.linalg.inv(K).T


def _intersect_room(origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exit distance t [P] of rays from inside the room and the surface id [P] (0 floor, 1 ceiling, 2..5 walls)."""
    safe = np.where(np.abs(dirs) < 1e-12, 1e-12, dirs)  # [P, 3]
    bound = np.where(safe > 0, ROOM_MAX, ROOM_MIN)
    t_axis = (bound - origin) / safe  # [P, 3], all positive from inside
    axis = np.argmin(t_axis, 1)
    t = t_axis[np.arange(len(t_axis)), axis]
    positive = safe[np.arange(len(safe)), axis] > 0
    # axis 2 (z): floor 0 / ceiling 1; axis 0: walls 2 (x-) / 3 (x+); axis 1: walls 4 (y-) / 5 (y+).
    surface = np.select([axis == 2, axis == 0], [positive.astype(int), 2 + positive], 4 + positive)
    return t, surface


def _intersect_boxes(origin: np.ndarray, dirs: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    """Nearest box hit per ray (slab test): t [P] (inf if none), box index [P], hit face axis [P]."""
    lo, hi = boxes[:, :3] - boxes[:, 3:] / 2, boxes[:, :3] + boxes[:, 3:] / 2  # [B, 3]
    safe = np.where(np.abs(dirs) < 1e-12, 1e-12, dirs)[:, None]  # [P, 1, 3]
    t1, t2 = (lo - origin) / safe, (hi - origin) / safe  # [P, B, 3]
    t_min = np.minimum(t1, t2)
    t_near, t_far = t_min.max(-1), np.maximum(t1, t2).min(-1)  # [P, B]
    t_near = np.where((t_near <= t_far) & (t_near > 1e-6), t_near, np.inf)
    index = np.argmin(t_near, 1)  # [P]
    rows = np.arange(len(index))
    return t_near[rows, index], index, np.argmax(t_min[rows, index], -1)


def _shade(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Diffuse shading factor [P] from the point light plus ambient light."""
    to_light = LIGHT - points
    dist = np.linalg.norm(to_light, axis=-1)
    lambert = np.clip((normals * to_light).sum(-1) / dist, 0.0, 1.0)
    return 0.45 + 0.65 * lambert / (1 + 0.04 * dist**2)


def _render_view(extrinsic: np.ndarray, rays_cam: np.ndarray, textures) -> tuple[np.ndarray, ...]:
    """Cast all rays of one camera: returns colour [P, 3] in [0, 1], z-depth [P] and world hit points [P, 3]."""
    room_tex, box_tex = textures
    rot, trans = extrinsic[:, :3], extrinsic[:, 3]
    origin = -rot.T @ trans  # camera centre, world frame
    dirs = rays_cam @ rot  # [P, 3]: Rᵀ d per row; camera z-component stays 1, so t is the z-depth
    t_room, surface = _intersect_room(origin, dirs)
    t_box, box, face_axis = _intersect_boxes(origin, dirs, BOXES)
    on_box = t_box < t_room
    t = np.where(on_box, t_box, t_room)
    points = origin + t[:, None] * dirs  # [P, 3]

    colour = np.empty_like(points)
    normals = np.zeros_like(points)
    for sid, (axis, sign) in enumerate([(2, 1), (2, -1), (0, 1), (0, -1), (1, 1), (1, -1)]):
        m = ~on_box & (surface == sid)
        a, b = np.delete(points[m], axis, axis=1).T  # the two in-plane coordinates
        colour[m] = room_tex[sid](a, b)
        normals[m, axis] = sign  # pointing into the room
    for axis in range(3):
        m = on_box & (face_axis == axis)
        a, b = np.delete(points[m], axis, axis=1).T
        colour[m] = box_tex(a, b, BOX_COLOURS[box[m]])
        normals[m, axis] = -np.sign(dirs[m, axis])  # facing the camera
    colour *= _shade(points, normals)[:, None]
    return colour, t, points


def render_frames(num_frames: int = 48, width: int = 160, height: int = 120, seed: int = 0,
                  fps: float = 12.0) -> SyntheticScene:
    """Render the room along the camera arc.

    Args:
        num_frames: N ≥ 1 frames spread over the whole arc (fewer frames: larger motion between frames).
        width, height: image size in pixels (≥ 2 each).
        seed: texture seed; the same seed gives bit-identical frames.
        fps: frame rate recorded in the scene (frames per second).
    Returns:
        A `SyntheticScene` (shapes and units in its field comments).
    """
    if num_frames < 1 or width < 2 or height < 2:
        raise InputError("Synthetic scene", f"Received num_frames={num_frames}, size {width}x{height}.",
                         "Ask for at least 1 frame of at least 2x2 pixels.")
    K = intrinsics(width, height)
    extrinsics = camera_path(num_frames)  # [N, 3, 4]
    rays = _pixel_rays(K, width, height)  # [H*W, 3]
    textures = _surface_textures(seed)
    rgb = np.empty((num_frames, height, width, 3), np.uint8)
    depth = np.empty((num_frames, height, width), np.float32)
    points = np.empty((num_frames, height, width, 3), np.float32)
    for i, ext in enumerate(extrinsics):
        colour, z, pts = _render_view(ext, rays, textures)
        rgb[i] = np.clip(np.round(colour * 255), 0, 255).reshape(height, width, 3)
        depth[i] = z.reshape(height, width)
        points[i] = pts.reshape(height, width, 3)
    return SyntheticScene(rgb=rgb, depth=depth, K=np.repeat(K[None], num_frames, 0), extrinsics=extrinsics,
                          points=points, boxes=BOXES.copy(), box_names=list(BOX_NAMES), fps=float(fps))


# ---------------------------------------------------------------------------------------------------
# World = first camera


def to_first_camera_frame(extrinsics: np.ndarray, points: np.ndarray) -> np.ndarray:
    """World points [..., 3] (metres) -> the same points in the first camera's frame (OpenCV axes).

    ``extrinsics`` [N, 3, 4] world-to-camera; only ``extrinsics[0]`` is used.
    """
    rot, trans = extrinsics[0, :, :3], extrinsics[0, :, 3]
    return (points @ rot.T + trans).astype(points.dtype, copy=False)


def relative_extrinsics(extrinsics: np.ndarray) -> np.ndarray:
    """World-to-camera [N, 3, 4] -> camera-from-first-camera [N, 3, 4] (the first becomes [I | 0])."""
    rot0, t0 = extrinsics[0, :, :3], extrinsics[0, :, 3]
    rot = extrinsics[:, :, :3] @ rot0.T  # R_i R_0ᵀ
    trans = extrinsics[:, :, 3] - rot @ t0  # t_i − R_i R_0ᵀ t_0
    return np.concatenate([rot, trans[..., None]], -1)


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """(cx, cy, cz, dx, dy, dz) [B, 6] -> the 8 corners [B, 8, 3]."""
    signs = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1], indexing="ij")).reshape(3, 8).T  # [8, 3]
    return boxes[:, None, :3] + signs[None] * boxes[:, None, 3:] / 2


def boxes_to_first_camera(extrinsics: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """World boxes [B, 6] -> axis-aligned boxes [B, 6] in the first camera's frame.

    The first camera is tilted, so a world-aligned box is rotated in its frame: the result is the
    axis-aligned bound of the 8 transformed corners (exact centre, extents ≥ the true ones). Use
    `box_corners` + `to_first_camera_frame` where the exact shape matters.
    """
    corners = to_first_camera_frame(extrinsics, box_corners(boxes))  # [B, 8, 3]
    lo, hi = corners.min(1), corners.max(1)
    return np.concatenate([(lo + hi) / 2, hi - lo], -1)


# ---------------------------------------------------------------------------------------------------
# Files


def write_scene(out_dir: str | Path, num_frames: int = 48, width: int = 160, height: int = 120, fps: float = 12,
                seed: int = 0) -> tuple[Path, Path]:
    """Render and write ``scene.mp4`` and ``scene_truth.npz`` into ``out_dir`` (both atomically).

    Args:
        out_dir: folder to write to (created).
        num_frames, width, height, seed: as in `render_frames`; width and height must be even (MPEG-4).
        fps: frame rate of the video (frames per second).
    Returns:
        (video path, ground-truth path). The npz holds depth, K, extrinsics, boxes, box_names, rgb, fps
        and, when under 64 MiB, points.
    """
    if width % 2 or height % 2:
        raise InputError("Synthetic scene", f"Received size {width}x{height}.",
                         "Use an even width and height: the MPEG-4 encoder rounds odd sizes down.")
    out_dir = atomic.ensure_dir(out_dir)
    scene = render_frames(num_frames, width, height, seed, fps)
    video = _write_mp4(out_dir / "scene.mp4", scene.rgb, fps)
    arrays = dict(depth=scene.depth, K=scene.K, extrinsics=scene.extrinsics, boxes=scene.boxes,
                  box_names=np.array(scene.box_names), rgb=scene.rgb, fps=np.float64(fps))
    if scene.points.nbytes <= MAX_NPZ_POINTS_BYTES:
        arrays["points"] = scene.points
    from vidllm_edge.runtime.outputs import write_npz

    truth = write_npz(out_dir / "scene_truth.npz", **arrays)
    return video, truth


def _write_mp4(target: Path, rgb: np.ndarray, fps: float) -> Path:
    """Encode RGB frames [N, H, W, 3] with the 'mp4v' codec and check that they read back."""
    import cv2

    n, h, w, _ = rgb.shape
    note = "Install opencv-python-headless from PyPI (its FFmpeg has the 'mp4v' encoder) or pick another folder."
    # OpenCV picks the container from the extension, so the temporary name must end in .mp4.
    with atomic.atomic_path(target, suffix=".mp4") as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
        if not writer.isOpened():
            raise OutputError(f"Video: {target}", "cannot be written (OpenCV could not open an 'mp4v' writer).", note)
        for frame in rgb:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # RGB -> BGR
        writer.release()
        count, size = _count_frames(tmp)
        if (count, size) != (n, (w, h)):
            raise OutputError(f"Video: {target}", f"reads back as {count} frames of {size}, not {n} of {(w, h)}.",
                              note)
    return target


def _count_frames(path: Path) -> tuple[int, tuple[int, int] | None]:
    """Decode a video to the end: (frame count, (width, height) of the first frame or None)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    count, size = 0, None
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                return count, size
            size = size or (frame.shape[1], frame.shape[0])
            count += 1
    finally:
        cap.release()
