"""Video sources -> evenly sampled RGB frames -> model input tensors.

`read_frames` takes a video file (anything OpenCV's FFmpeg opens) or a folder of images and samples
``num_frames`` frames evenly over the whole of it. `preprocess` resizes them so the short side is the
model's image size and centre-crops both sides to multiples of the patch size.

torch is imported inside `preprocess` only, so reading frames works without it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import cv2
import numpy as np

from vidllm_edge.errors import InputError, VideoError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
SEEK_GAP = 64  # frames: skip gaps up to this by decoding (exact); seek over longer ones (fast)
_NOTE = "Pass a video file OpenCV can decode (e.g. .mp4 with H.264 or MPEG-4) or a folder of png/jpg/bmp frames."


@dataclasses.dataclass
class Frames:
    """Frames sampled from a source."""

    rgb: np.ndarray      # [S, H, W, 3] uint8, RGB
    indices: list[int]   # [S] index of each frame in the source
    total: int           # frames in the source
    fps: float | None    # frame rate of a video file; None for a folder or when unknown
    source: str
    warnings: list[str] = dataclasses.field(default_factory=list)


def sample_indices(total: int, num_frames: int) -> list[int]:
    """Evenly spaced indices over ``total`` frames, first and last included: round(linspace(0, total-1, k))."""
    if num_frames >= total:
        return list(range(total))
    return [int(i) for i in np.unique(np.linspace(0, total - 1, num_frames).round().astype(np.int64))]


def read_frames(source: str | os.PathLike, num_frames: int) -> Frames:
    """Read ``num_frames`` frames sampled evenly from a video file or an image folder (sorted by name).

    With fewer frames than asked, all are used and `Frames.warnings` says so. Raises VideoError for a
    missing path, a file that is not a decodable video, and a video or folder without frames.
    """
    if num_frames < 1:
        raise InputError("Argument: num_frames", f"Received {num_frames}.", "Ask for at least 1 frame.")
    path = Path(source)
    subject = f"Video: {path}"
    if not path.exists():
        raise VideoError(subject, "does not exist.", _NOTE)
    frames = _read_folder(path, num_frames) if path.is_dir() else _read_video(path, num_frames)
    if frames.total < num_frames:
        frames.warnings.insert(0, f"{subject} | has {frames.total} frames, fewer than the {num_frames} asked; "
                                  f"using all {frames.total}.")
    return frames


def _read_folder(folder: Path, num_frames: int) -> Frames:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise VideoError(f"Video: {folder}", "is a folder without images (png, jpg, jpeg, bmp).",
                         "Put the frames in the folder as images named in playback order (e.g. 000001.png).")
    indices = sample_indices(len(files), num_frames)
    images = []
    for i in indices:
        bgr = cv2.imread(str(files[i]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise VideoError(f"Frame: {files[i]}", "cannot be decoded as an image.", "Remove or replace the file.")
        if images and bgr.shape != images[0].shape:
            raise VideoError(f"Frame: {files[i]}", f"is {bgr.shape[1]}x{bgr.shape[0]} but the first sampled frame is "
                             f"{images[0].shape[1]}x{images[0].shape[0]}.", "Use frames of one size.")
        images.append(bgr)
    rgb = np.stack(images)[..., ::-1]  # [S, H, W, 3] BGR -> RGB
    return Frames(np.ascontiguousarray(rgb), indices, len(files), None, str(folder))


def _open(path: Path) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise VideoError(f"Video: {path}", "cannot be opened as a video (not a video, or a codec OpenCV lacks).", _NOTE)
    return cap


def _read_video(path: Path, num_frames: int) -> Frames:
    cap = _open(path)
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
        reported = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if reported > 0:
            indices = sample_indices(reported, num_frames)
            images = _grab_indices(cap, indices, seek=True)
            if images is not None and not cap.grab():  # all read, and nothing beyond the reported count
                return Frames(np.stack(images), indices, reported, fps if fps > 0 else None, str(path))
    finally:
        cap.release()
    # The container's frame count is missing or wrong: count by decoding, then sample exactly.
    total = _count_frames(path)
    if total == 0:
        raise VideoError(f"Video: {path}", "has no decodable frames.", _NOTE)
    indices = sample_indices(total, num_frames)
    cap = _open(path)
    try:
        images = _grab_indices(cap, indices, seek=False)
    finally:
        cap.release()
    if images is None:
        raise VideoError(f"Video: {path}", "decodes differently on a second pass.", _NOTE)
    warnings = [f"Video: {path} | reports {reported} frames but {total} decode; sampled over the {total}."] \
        if 0 < reported != total else []
    return Frames(np.stack(images), indices, total, fps if fps > 0 else None, str(path), warnings)


def _count_frames(path: Path) -> int:
    cap = _open(path)
    try:
        count = 0
        while cap.grab():
            count += 1
        return count
    finally:
        cap.release()


def _grab_indices(cap: cv2.VideoCapture, indices: list[int], seek: bool) -> list[np.ndarray] | None:
    """RGB frames [H, W, 3] at increasing ``indices``; None as soon as one cannot be decoded."""
    images, position = [], 0  # position: index of the next frame the decoder returns
    for index in indices:
        if seek and index - position > SEEK_GAP:
            cap.set(cv2.CAP_PROP_POS_FRAMES, index)
            position = index
        while position < index:
            if not cap.grab():
                return None
            position += 1
        ok, bgr = cap.read()
        if not ok or bgr is None:
            return None
        position += 1
        images.append(np.ascontiguousarray(bgr[..., ::-1]))  # BGR -> RGB
    return images


# ---------------------------------------------------------------------------------------------------
# Preprocessing


@dataclasses.dataclass(frozen=True)
class PreprocessInfo:
    """How preprocessed pixels relate to the input frames (continuous coordinates, pixel centres at +0.5):
    ``x_out = x_in · scale_x − left``, ``y_out = y_in · scale_y − top``."""

    input_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    crop_top: int
    crop_left: int
    output_hw: tuple[int, int]

    @property
    def scale_x(self) -> float:
        return self.resized_hw[1] / self.input_hw[1]

    @property
    def scale_y(self) -> float:
        return self.resized_hw[0] / self.input_hw[0]

    def map_intrinsics(self, K: np.ndarray) -> np.ndarray:
        """K [..., 3, 3] in input-frame pixels -> K [..., 3, 3] in preprocessed-frame pixels."""
        affine = np.array([[self.scale_x, 0, -self.crop_left], [0, self.scale_y, -self.crop_top], [0, 0, 1.0]])
        return affine @ np.asarray(K, dtype=np.float64)


def plan_preprocess(height: int, width: int, short_side: int, patch_size: int = 14) -> PreprocessInfo:
    """The resize and crop `preprocess` applies to ``height`` × ``width`` frames (pixels)."""
    if short_side < patch_size:
        raise InputError(f"Argument: short_side={short_side}", f"is smaller than one {patch_size}-pixel patch.",
                         f"Use a short side of at least {patch_size} (a multiple of {patch_size}, e.g. 518).")
    if min(height, width) < patch_size:
        raise InputError(f"Frames: {width}x{height}", f"are smaller than one {patch_size}x{patch_size} patch.",
                         f"Use frames at least {patch_size} pixels on each side (upscaling would invent the content).")
    scale = short_side / min(height, width)
    resized = (short_side, max(short_side, round(width * scale))) if height <= width \
        else (max(short_side, round(height * scale)), short_side)
    out = (resized[0] // patch_size * patch_size, resized[1] // patch_size * patch_size)
    assert min(out) >= patch_size, f"crop {out} smaller than a patch"
    return PreprocessInfo((height, width), resized, (resized[0] - out[0]) // 2, (resized[1] - out[1]) // 2, out)


def preprocess_with_info(rgb: np.ndarray, short_side: int, patch_size: int = 14):
    """Like `preprocess`, also returning the `PreprocessInfo` mapping input pixels to output pixels."""
    import torch

    rgb = np.asarray(rgb)
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.shape[0] < 1 or rgb.dtype != np.uint8:
        raise InputError("Frames", f"Received {rgb.dtype} array of shape {list(rgb.shape)}.",
                         "Expected uint8 RGB [S, H, W, 3] with S >= 1.")
    info = plan_preprocess(rgb.shape[1], rgb.shape[2], short_side, patch_size)
    (rh, rw), (oh, ow) = info.resized_hw, info.output_hw
    if (rh, rw) == info.input_hw:
        resized = rgb
    else:
        interp = cv2.INTER_AREA if rh < info.input_hw[0] else cv2.INTER_CUBIC
        resized = np.stack([cv2.resize(f, (rw, rh), interpolation=interp) for f in rgb])  # [S, rh, rw, 3]
    crop = resized[:, info.crop_top:info.crop_top + oh, info.crop_left:info.crop_left + ow]  # [S, oh, ow, 3]
    images = torch.from_numpy(np.ascontiguousarray(crop)).permute(0, 3, 1, 2).float().div_(255.0)  # [S, 3, oh, ow]
    return images.contiguous(), info


def preprocess(rgb: np.ndarray, short_side: int, patch_size: int = 14):
    """Frames -> model input.

    Args:
        rgb: [S, H, W, 3] uint8 RGB frames.
        short_side: target short side in pixels (≥ patch_size); INTER_AREA when shrinking, INTER_CUBIC
            when enlarging; the aspect ratio is kept.
        patch_size: both sides are centre-cropped down to multiples of it (pixels).
    Returns:
        torch.FloatTensor [S, 3, H', W'] in [0, 1], H' and W' multiples of ``patch_size``.
    """
    return preprocess_with_info(rgb, short_side, patch_size)[0]
