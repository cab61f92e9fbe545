"""Video sources: even sampling, frame folders, too few frames, every unreadable input; preprocessing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vidllm_edge.errors import InputError, VideoError
from vidllm_edge.runtime import video as video_mod
from vidllm_edge.runtime.video import plan_preprocess, preprocess, preprocess_with_info, read_frames, sample_indices


def _write_video(path, frames_bgr, fourcc="mp4v", fps=10.0):
    h, w = frames_bgr[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened()
    for frame in frames_bgr:
        writer.write(frame)
    writer.release()
    return path


def _numbered(n, h=48, w=64):
    """BGR frames whose brightness encodes the frame index (robust to compression)."""
    return [np.full((h, w, 3), 10 + 12 * i, np.uint8) for i in range(n)]


def _index_of(rgb_frame):
    return int(round((rgb_frame.mean() - 10) / 12))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return _write_video(tmp_path_factory.mktemp("v") / "clip.mp4", _numbered(20))


def test_sample_indices_are_even_and_unique():
    assert sample_indices(12, 4) == [0, 4, 7, 11]
    assert sample_indices(100, 1) == [0]
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]
    many = sample_indices(1000, 33)
    assert many[0] == 0 and many[-1] == 999 and len(set(many)) == 33 and max(np.diff(many)) - min(np.diff(many)) <= 1


def test_video_is_sampled_evenly(clip):
    frames = read_frames(clip, 5)
    assert frames.indices == [0, 5, 10, 14, 19] and frames.total == 20 and frames.warnings == []
    assert frames.rgb.shape == (5, 48, 64, 3) and frames.rgb.dtype == np.uint8
    assert [_index_of(f) for f in frames.rgb] == frames.indices
    assert frames.fps == pytest.approx(10.0) and frames.source == str(clip)


def test_seeking_gives_the_same_frames_as_decoding(clip, monkeypatch):
    monkeypatch.setattr(video_mod, "SEEK_GAP", 1)
    frames = read_frames(clip, 5)
    assert [_index_of(f) for f in frames.rgb] == [0, 5, 10, 14, 19]


def test_wrong_frame_count_falls_back_to_decoding(clip, monkeypatch):
    real_capture = cv2.VideoCapture

    class LyingCapture:  # a wrapper: subclassing cv2.VideoCapture crashes OpenCV 5
        def __init__(self, *args):
            self._cap = real_capture(*args)

        def __getattr__(self, name):
            return getattr(self._cap, name)

        def get(self, prop):
            return 35.0 if prop == cv2.CAP_PROP_FRAME_COUNT else self._cap.get(prop)

    monkeypatch.setattr(video_mod.cv2, "VideoCapture", LyingCapture)
    frames = read_frames(clip, 5)
    assert frames.total == 20 and frames.indices == [0, 5, 10, 14, 19]
    assert [_index_of(f) for f in frames.rgb] == frames.indices
    assert "reports 35 frames but 20 decode" in frames.warnings[0]


def test_folder_of_frames_sorted_by_name(tmp_path):
    for i, frame in enumerate(_numbered(6)):
        cv2.imwrite(str(tmp_path / f"frame_{i:03d}.png"), frame)
    (tmp_path / "notes.txt").write_text("not a frame")
    frames = read_frames(tmp_path, 3)
    assert frames.indices == [0, 2, 5] and frames.total == 6 and frames.fps is None
    assert [_index_of(f) for f in frames.rgb] == [0, 2, 5]  # PNG is lossless and RGB order is kept


def test_fewer_frames_than_asked_uses_all_with_a_warning(tmp_path):
    path = _write_video(tmp_path / "x.mp4", _numbered(5))
    frames = read_frames(path, 8)
    assert frames.indices == [0, 1, 2, 3, 4] and frames.rgb.shape[0] == 5
    assert frames.warnings == [f"Video: {path} | has 5 frames, fewer than the 8 asked; using all 5."]


def _video_error(path, num_frames=4):
    with pytest.raises(VideoError) as info:
        read_frames(path, num_frames)
    assert "Note:" in str(info.value)
    return info.value


def test_missing_path(tmp_path):
    err = _video_error(tmp_path / "nope.mp4")
    assert err.subject == f"Video: {tmp_path / 'nope.mp4'}" and "does not exist" in err.problem


def test_text_file_named_mp4(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("hello, I am not a video")
    err = _video_error(bad)
    assert err.subject == f"Video: {bad}" and "cannot be opened" in err.problem


def test_empty_folder(tmp_path):
    err = _video_error(tmp_path)
    assert err.subject == f"Video: {tmp_path}" and "without images" in err.problem


def test_zero_frame_videos(tmp_path):
    # MJPG/AVI opens with no frames; an mp4 without frames has no index and does not open at all.
    avi = tmp_path / "empty.avi"
    writer = cv2.VideoWriter(str(avi), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    writer.release()
    err = _video_error(avi)
    assert err.subject == f"Video: {avi}" and "no decodable frames" in err.problem
    mp4 = tmp_path / "empty.mp4"
    writer = cv2.VideoWriter(str(mp4), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 48))
    writer.release()
    assert _video_error(mp4).subject == f"Video: {mp4}"


def test_undecodable_image_in_folder(tmp_path):
    cv2.imwrite(str(tmp_path / "000.png"), np.zeros((20, 20, 3), np.uint8))
    (tmp_path / "001.png").write_bytes(b"broken")
    err = _video_error(tmp_path, 2)
    assert err.subject == f"Frame: {tmp_path / '001.png'}"


def test_num_frames_must_be_positive(clip):
    with pytest.raises(InputError):
        read_frames(clip, 0)


@pytest.mark.parametrize("hw, short, expect", [((48, 64), 28, (28, 28)), ((120, 160), 70, (70, 84)),
                                                ((160, 120), 70, (84, 70)), ((36, 36), 42, (42, 42)),
                                                ((1080, 1920), 518, (518, 910))])
def test_preprocess_shapes(hw, short, expect):
    rgb = np.random.default_rng(0).integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    images, info = preprocess_with_info(rgb, short)
    assert tuple(images.shape) == (2, 3, *expect) and images.dtype.is_floating_point
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert min(info.resized_hw) == short and all(s % 14 == 0 for s in images.shape[2:])


def test_preprocess_keeps_values_without_resize():
    rgb = np.random.default_rng(1).integers(0, 256, (1, 28, 42, 3), dtype=np.uint8)
    images = preprocess(rgb, 28)
    np.testing.assert_allclose(images[0].permute(1, 2, 0).numpy() * 255, rgb[0], atol=1e-4)


def test_preprocess_info_maps_intrinsics():
    info = plan_preprocess(120, 160, 70)  # -> resized 70x93, cropped to 70x84 from left 4
    assert info.resized_hw == (70, 93) and (info.crop_top, info.crop_left) == (0, 4)
    K = np.array([[100.0, 0, 80], [0, 100.0, 60], [0, 0, 1]])
    mapped = info.map_intrinsics(K)
    np.testing.assert_allclose(mapped[:2, 2], [80 * 93 / 160 - 4, 60 * 70 / 120])
    np.testing.assert_allclose(np.diag(mapped)[:2], [100 * 93 / 160, 100 * 70 / 120])


@pytest.mark.parametrize("hw, short", [((10, 12), 70), ((120, 160), 10)])
def test_too_small_frames_or_size_raise(hw, short):
    with pytest.raises(InputError) as info:
        preprocess(np.zeros((1, *hw, 3), np.uint8), short)
    assert "Note:" in str(info.value) and ("10" in info.value.subject)


def test_preprocess_rejects_wrong_layout():
    with pytest.raises(InputError, match=r"\[S, H, W, 3\]"):
        preprocess(np.zeros((2, 3, 28, 28), np.uint8), 28)
