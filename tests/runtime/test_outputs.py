"""Artifact writers: exact PLY round trips, depth PNGs, npz/JSON, OutputError and nothing half-written."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from vidllm_edge.errors import InputError, OutputError
from vidllm_edge.runtime import outputs


def _cloud(n=257, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)).astype(np.float32) * 3, rng.integers(0, 256, (n, 3), dtype=np.uint8)


def _leftovers(folder):
    return [p.name for p in folder.rglob(".*")]


def test_ply_round_trip_is_exact(tmp_path):
    points, colors = _cloud()
    path = outputs.write_ply(tmp_path / "sub" / "points.ply", points, colors)
    header = path.read_bytes()[:300]
    assert b"format binary_little_endian 1.0" in header and b"element vertex 257\n" in header
    back_points, back_colors = outputs.read_ply(path)
    assert back_points.dtype == np.float32 and back_colors.dtype == np.uint8
    np.testing.assert_array_equal(back_points, points)
    np.testing.assert_array_equal(back_colors, colors)
    assert path.stat().st_size == len(header.split(b"end_header\n")[0]) + len(b"end_header\n") + 257 * 15
    assert _leftovers(tmp_path) == []


def test_ply_empty_cloud(tmp_path):
    outputs.write_ply(tmp_path / "e.ply", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8))
    points, colors = outputs.read_ply(tmp_path / "e.ply")
    assert points.shape == (0, 3) and colors.shape == (0, 3)


def test_read_ascii_ply_and_no_colours(tmp_path):
    text = ("ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\n"
            "element face 0\nproperty list uchar int vertex_indices\nend_header\n1 2 3\n-4.5 0 6\n")
    (tmp_path / "a.ply").write_text(text)
    points, colors = outputs.read_ply(tmp_path / "a.ply")
    np.testing.assert_array_equal(points, [[1, 2, 3], [-4.5, 0, 6]])
    assert colors is None


def test_read_truncated_ply_raises(tmp_path):
    points, colors = _cloud(10)
    path = outputs.write_ply(tmp_path / "p.ply", points, colors)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(InputError, match="truncated"):
        outputs.read_ply(path)
    (tmp_path / "t.ply").write_text("hello")
    with pytest.raises(InputError, match="not a PLY"):
        outputs.read_ply(tmp_path / "t.ply")


def test_write_ply_checks_shapes(tmp_path):
    with pytest.raises(InputError):
        outputs.write_ply(tmp_path / "p.ply", np.zeros((4, 3)), np.zeros((5, 3), np.uint8))
    with pytest.raises(InputError):
        outputs.write_ply(tmp_path / "p.ply", np.zeros((4, 3)), np.zeros((4, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_subsample_points_is_deterministic():
    points, colors = _cloud(1000)
    a = outputs.subsample_points(points, colors, 100, seed=3)
    b = outputs.subsample_points(points, colors, 100, seed=3)
    assert a[0].shape == (100, 3) and a[1].shape == (100, 3)
    np.testing.assert_array_equal(a[0], b[0])
    rows = [int(np.flatnonzero((points == p).all(1))[0]) for p in a[0]]
    assert rows == sorted(rows)  # input order kept
    same = outputs.subsample_points(points, colors, 5000)
    assert same[0] is points


def test_depth_pngs(tmp_path):
    depth = np.linspace(0.5, 8.0, 2 * 6 * 8, dtype=np.float32).reshape(2, 6, 8)
    depth[1, 0, 0] = np.nan
    paths = outputs.write_depth_pngs(tmp_path / "depth", depth)
    assert [p.name for p in paths] == ["depth_0000.png", "depth_0000_mm.png", "depth_0001.png", "depth_0001_mm.png"]
    colour = cv2.imread(str(paths[0]))
    assert colour.shape == (6, 8, 3) and colour.dtype == np.uint8
    mm = cv2.imread(str(paths[3]), cv2.IMREAD_UNCHANGED)
    assert mm.dtype == np.uint16 and mm[0, 0] == 0
    np.testing.assert_array_equal(mm.ravel()[1:], np.round(depth[1].ravel()[1:] * 1000))
    assert not cv2.imread(str(paths[2]))[0, 0].any()  # invalid depth is black
    assert _leftovers(tmp_path) == []


def test_npz_and_json(tmp_path):
    path = outputs.write_npz(tmp_path / "g.npz", depth=np.ones((2, 3), np.float32), path=np.arange(3))
    data = np.load(path)
    assert path.name == "g.npz" and set(data.files) == {"depth", "path"}
    obj = {"a": np.float32(1.5), "b": np.arange(3), "c": [np.int64(2), float("nan")], "d": tmp_path}
    written = outputs.write_json(tmp_path / "r.json", obj)
    assert json.loads(written.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": [2, None], "d": str(tmp_path)}
    assert '\n  "a": 1.5' in written.read_text()


@pytest.mark.parametrize("write", [
    lambda d: outputs.write_ply(d / "p.ply", *_cloud(3)),
    lambda d: outputs.write_depth_pngs(d, np.ones((1, 4, 4))),
    lambda d: outputs.write_npz(d / "g.npz", x=np.ones(2)),
    lambda d: outputs.write_json(d / "r.json", {}),
])
def test_unwritable_folder_raises_output_error(tmp_path, write):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError) as info:
        write(blocker / "out")
    assert f"{blocker / 'out'} |" in str(info.value) and "Note:" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    outputs.write_json(tmp_path / "r.json", {"old": True})

    def boom(obj):
        raise RuntimeError("crash while serialising")

    monkeypatch.setattr(outputs.np, "savez", lambda fh, **kw: (fh.write(b"PK partial"), boom(kw)))
    with pytest.raises(RuntimeError):
        outputs.write_npz(tmp_path / "g.npz", x=np.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert json.loads((tmp_path / "r.json").read_text()) == {"old": True}
