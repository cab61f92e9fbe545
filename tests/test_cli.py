"""The CLI end to end on the synthetic video, and every bad input: message, exit code 2, nothing half written."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from vidllm_edge.runtime.cli import main
from vidllm_edge.runtime.outputs import read_ply


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from vidllm_edge.synthetic import write_scene

    path, truth = write_scene(tmp_path_factory.mktemp("scene"), num_frames=12, width=112, height=84)
    return path


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_run_writes_every_artifact(video, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--video", str(video), "--preset", "tiny", "--out", str(out), "--frames", "4",
                 "--question", "Where is the red box?", "--question", "What is on the floor?", "--max-new-tokens", "6"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Q: Where is the red box?" in captured.out and "Q: What is on the floor?" in captured.out
    report = json.loads((out / "answers.json").read_text())
    assert [a["question"] for a in report["answers"]] == ["Where is the red box?", "What is on the floor?"]
    assert all(len(a["token_ids"]) <= 6 for a in report["answers"])
    assert report["frames"]["count"] == 4 and report["frames"]["indices"] == [0, 4, 7, 11]
    for stage in ("encoder_adapter", "geometry", "metric_depth", "scale", "lift", "pool", "prefill_prefix"):
        assert report["timings_ms"]["scene"][stage] >= 0
    geo = np.load(out / "geometry.npz")
    s, h, w = geo["depth"].shape
    assert (s, h % 14, w % 14) == (4, 0, 0) and min(h, w) == 70
    assert geo["intrinsics"].shape == (4, 3, 3) and geo["extrinsics"].shape == (4, 3, 4)
    assert float(geo["scale"]) > 0 and np.all(geo["depth"] > 0)
    rot = geo["extrinsics"][:, :, :3]  # proper rotations even with random weights (quaternions normalised)
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-5)
    points, colours = read_ply(out / "points.ply")
    assert points.shape[0] > 0 and points.shape == colours.shape and points.dtype == np.float32
    pngs = sorted((out / "depth").glob("*.png"))
    assert len(pngs) >= 4 and cv2.imread(str(pngs[0])) is not None
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_demo_runs_and_says_weights_are_random(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.err and "meaningless" in captured.err
    assert "points.ply" in captured.out and (tmp_path / "demo" / "run" / "answers.json").is_file()


def _bad(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def test_missing_video(tmp_path, capsys):
    code, err = _bad(["run", "--video", str(tmp_path / "nope.mp4"), "--preset", "tiny", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and f"{tmp_path / 'nope.mp4'}" in err and "Note:" in err
    assert _files(tmp_path / "o") == []


def test_not_a_video(tmp_path, capsys):
    bad = tmp_path / "notes.mp4"
    bad.write_text("hello, I am not a video")
    code, err = _bad(["run", "--video", str(bad), "--preset", "tiny", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "notes.mp4 |" in err and "Note:" in err
    assert _files(tmp_path / "o") == []


def test_fewer_frames_than_asked_uses_what_there_is(video, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["run", "--video", str(video), "--preset", "tiny", "--out", str(out), "--frames", "20"])
    err = capsys.readouterr().err
    assert code == 0 and "fewer than the 20 asked" in err
    report = json.loads((out / "answers.json").read_text())
    assert report["frames"]["count"] == 12 and "fewer than the 20 asked" in report["frames"]["warnings"][0]


def test_frames_too_small_for_a_patch(tmp_path, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((10, 12, 3), 40 * i, np.uint8))
    code, err = _bad(["run", "--video", str(folder), "--preset", "tiny", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "Note:" in err
    assert _files(tmp_path / "o") == []


def test_unwritable_output_folder(video, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _bad(["run", "--video", str(video), "--preset", "tiny", "--out", str(blocker / "out")], capsys)
    assert code == 2 and f"Output folder: {blocker / 'out'} |" in err


def test_checkpoint_errors_exit_2(video, tmp_path, capsys):
    from vidllm_edge.models.model import build_model

    folder = tmp_path / "ckpt"
    build_model("tiny").save_pretrained(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:1000])
    code, err = _bad(["run", "--video", str(video), "--checkpoint", str(folder), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "is truncated" in err
    assert _files(tmp_path / "o") == []


def test_failure_while_writing_leaves_nothing(video, tmp_path, capsys, monkeypatch):
    from vidllm_edge.runtime import outputs

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(outputs, "write_ply", boom)
    with pytest.raises(OSError):
        main(["run", "--video", str(video), "--preset", "tiny", "--out", str(tmp_path / "o"), "--frames", "2"])
    assert _files(tmp_path / "o") == []  # answers.json and geometry.npz were staged, never published


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vidllm_edge.runtime.cli", "run", "--video", str(tmp_path / "x.mp4"),
                           "--preset", "tiny", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and f"error: Video: {tmp_path / 'x.mp4'} | does not exist" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "vidllm_edge.runtime.cli", "run", "--preset", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2  # argparse usage errors are exit 2 as well
