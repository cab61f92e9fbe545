"""The synthetic room: deterministic, geometrically exact ground truth, and a video that reads back."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vidllm_edge import synthetic
from vidllm_edge.errors import InputError


@pytest.fixture(scope="module")
def scene():
    return synthetic.render_frames(num_frames=6, width=64, height=48, seed=3)


def _camera_points(scene):
    rot, t = scene.extrinsics[:, None, None, :, :3], scene.extrinsics[:, None, None, :, 3]  # [N, 1, 1, 3, *]
    return (rot @ scene.points.astype(np.float64)[..., None])[..., 0] + t  # [N, H, W, 3]


def test_deterministic_for_a_seed_and_textures_follow_the_seed(scene):
    again = synthetic.render_frames(num_frames=6, width=64, height=48, seed=3)
    for name in ("rgb", "depth", "K", "extrinsics", "points", "boxes"):
        np.testing.assert_array_equal(getattr(again, name), getattr(scene, name), err_msg=name)
    other = synthetic.render_frames(num_frames=6, width=64, height=48, seed=4)
    assert not np.array_equal(other.rgb, scene.rgb)
    np.testing.assert_array_equal(other.depth, scene.depth)  # seed changes textures, not geometry


def test_shapes_and_dtypes(scene):
    n, h, w = 6, 48, 64
    assert scene.rgb.shape == (n, h, w, 3) and scene.rgb.dtype == np.uint8
    assert scene.depth.shape == (n, h, w) and scene.depth.dtype == np.float32
    assert scene.points.shape == (n, h, w, 3) and scene.points.dtype == np.float32
    assert scene.K.shape == (n, 3, 3) and scene.extrinsics.shape == (n, 3, 4)
    assert scene.boxes.shape == (3, 6) and scene.box_names == ["red box", "green box", "blue box"]
    np.testing.assert_allclose(scene.K[0, :2, 2], [w / 2, h / 2])
    assert scene.rgb.std() > 20  # textured, not flat


def test_depth_is_the_camera_z_of_the_hit_points(scene):
    cam = _camera_points(scene)
    assert np.all(scene.depth > 0.1)
    np.testing.assert_allclose(cam[..., 2], scene.depth, rtol=1e-6, atol=1e-5)


def test_hit_points_project_onto_their_pixel_centres(scene):
    cam = _camera_points(scene)
    pix = (scene.K[:, None, None] @ cam[..., None])[..., 0]  # [N, H, W, 3]
    uv = pix[..., :2] / pix[..., 2:]
    h, w = scene.depth.shape[1:]
    v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    assert np.abs(uv - np.stack([u, v], -1)).max() < 1e-3


def test_hit_points_are_on_the_room_or_a_box(scene):
    pts = scene.points.reshape(-1, 3).astype(np.float64)
    tol = 1e-4
    assert np.all(pts >= synthetic.ROOM_MIN - tol) and np.all(pts <= synthetic.ROOM_MAX + tol)
    on_room = np.any(np.isclose(pts, synthetic.ROOM_MIN, atol=tol) | np.isclose(pts, synthetic.ROOM_MAX, atol=tol), 1)
    lo, hi = scene.boxes[:, :3] - scene.boxes[:, 3:] / 2, scene.boxes[:, :3] + scene.boxes[:, 3:] / 2
    inside = np.all((pts[:, None] >= lo - tol) & (pts[:, None] <= hi + tol), -1)  # [P, B]
    assert np.all(on_room | inside.any(1))
    assert inside.any(0).all()  # every box is seen at least once


def test_boxes_stand_inside_the_room(scene):
    lo, hi = scene.boxes[:, :3] - scene.boxes[:, 3:] / 2, scene.boxes[:, :3] + scene.boxes[:, 3:] / 2
    assert np.all(lo >= synthetic.ROOM_MIN) and np.all(hi <= synthetic.ROOM_MAX)
    np.testing.assert_allclose(lo[:, 2], 0.0)  # on the floor


def test_first_camera_frame_helpers(scene):
    rel = synthetic.relative_extrinsics(scene.extrinsics)
    np.testing.assert_allclose(rel[0], np.hstack([np.eye(3), np.zeros((3, 1))]), atol=1e-12)
    first = synthetic.to_first_camera_frame(scene.extrinsics, scene.points.astype(np.float64))
    np.testing.assert_allclose(first[0, ..., 2], scene.depth[0], rtol=1e-6)
    # the relative cameras see the first-camera points exactly where the world cameras saw the world points
    moved = (rel[:, None, None, :, :3] @ first[..., None])[..., 0] + rel[:, None, None, :, 3]
    np.testing.assert_allclose(moved, _camera_points(scene), atol=1e-9)
    boxes = synthetic.boxes_to_first_camera(scene.extrinsics, scene.boxes)
    centres = synthetic.to_first_camera_frame(scene.extrinsics, scene.boxes[:, :3])
    np.testing.assert_allclose(boxes[:, :3], centres, atol=1e-12)
    assert np.all(boxes[:, 3:] >= scene.boxes[:, 3:].min(1, keepdims=True) - 1e-12)


def test_backproject_depth_reproduces_the_hit_points(scene):
    torch = pytest.importorskip("torch")
    try:
        from vidllm_edge.models.lift import backproject_depth
    except ImportError:
        pytest.skip("vidllm_edge.models.lift.backproject_depth is not implemented yet")
    as64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    world = backproject_depth(as64(scene.depth), as64(scene.K), as64(scene.extrinsics))  # [N, H, W, 3]
    assert world.shape == scene.points.shape
    np.testing.assert_allclose(world.numpy(), scene.points, atol=1e-4)
    rel = synthetic.relative_extrinsics(scene.extrinsics)
    first = backproject_depth(as64(scene.depth), as64(scene.K), as64(rel))
    np.testing.assert_allclose(first.numpy(), synthetic.to_first_camera_frame(scene.extrinsics, scene.points), atol=1e-4)


def test_write_scene_video_reads_back(tmp_path):
    video, truth = synthetic.write_scene(tmp_path, num_frames=10, width=96, height=72, fps=8, seed=1)
    assert (video.name, truth.name) == ("scene.mp4", "scene_truth.npz")
    cap = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) == 10 and frames[0].shape == (72, 96, 3)
    data = np.load(truth)  # no pickles needed
    assert data["depth"].shape == (10, 72, 96) and data["K"].shape == (10, 3, 3)
    assert data["extrinsics"].shape == (10, 3, 4) and data["points"].shape == (10, 72, 96, 3)
    assert list(data["box_names"]) == ["red box", "green box", "blue box"] and float(data["fps"]) == 8
    # the video is the rendered RGB, up to MPEG-4 compression
    decoded = np.stack(frames)[..., ::-1].astype(np.float64)
    assert np.abs(decoded - data["rgb"]).mean() < 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.mp4", "scene_truth.npz"]  # no temp files


def test_write_scene_rejects_odd_sizes(tmp_path):
    with pytest.raises(InputError, match="even width and height"):
        synthetic.write_scene(tmp_path, num_frames=2, width=65, height=48)
    assert list(tmp_path.iterdir()) == []
