"""Live frame sources: files, folders, dispatch, unreachable URLs, stalls and reconnects (fake captures).

Every test runs under a SIGALRM deadline, so a regression that hangs fails instead of blocking CI.
"""

from __future__ import annotations

import socket
import threading
import time

import cv2
import numpy as np
import pytest

from vidllm_edge.errors import InputError, VideoError
from vidllm_edge.runtime.sources import (CameraSource, FileSource, FolderSource, RtspSource, open_source,
                                         redact_url)

TEST_DEADLINE_S = 20


def _numbered(n, h=48, w=64):
    """BGR frames whose brightness encodes the index; the blue channel is brighter (checks BGR -> RGB)."""
    frames = []
    for i in range(n):
        f = np.full((h, w, 3), 10 + 12 * i, np.uint8)
        f[..., 0] = np.minimum(255, 10 + 12 * i + 40)
        frames.append(f)
    return frames


def _index_of(rgb):
    return int(round((rgb[..., 1].mean() - 10) / 12))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 20.0, (64, 48))
    for f in _numbered(12):
        writer.write(f)
    writer.release()
    return path


def test_file_source_reads_every_frame_in_order_with_media_timestamps(clip):
    with FileSource(clip, pace=False) as src:
        items = []
        while (item := src.read()) is not None:
            items.append(item)
        assert src.read() is None  # stays at the end
    assert [_index_of(rgb) for _, rgb in items] == list(range(12))
    assert [t for t, _ in items] == pytest.approx([i / 20.0 for i in range(12)])
    rgb = items[0][1]
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    assert rgb[..., 2].mean() > rgb[..., 0].mean() + 30  # BGR blue became RGB's last channel
    assert src.frames_read == 12 and src.dropped == 0 and src.fps == pytest.approx(20.0)
    assert "clip.mp4" in src.describe()


def test_file_source_loops_with_increasing_timestamps(clip):
    with FileSource(clip, pace=False, loop=True) as src:
        items = [src.read() for _ in range(30)]
    assert [_index_of(rgb) for _, rgb in items] == [i % 12 for i in range(30)]
    times = [t for t, _ in items]
    assert all(b > a for a, b in zip(times, times[1:]))


def test_paced_file_plays_at_its_frame_rate_and_drops_late_frames(clip):
    with FileSource(clip, pace=True) as src:
        start = time.monotonic()
        first = src.read()
        second = src.read()
        assert time.monotonic() - start >= 0.045  # frame 1 is due 50 ms after frame 0
        time.sleep(0.3)  # a slow consumer: ~6 frames fall due meanwhile
        late = src.read()
    assert _index_of(first[1]) == 0 and _index_of(second[1]) == 1
    assert src.dropped >= 3 and _index_of(late[1]) >= 5  # skipped ahead to the present, not a backlog


def test_folder_source_reads_sorted_frames(tmp_path):
    for i, f in enumerate(_numbered(5)):
        cv2.imwrite(str(tmp_path / f"{i * 7:04d}.png"), f)
    (tmp_path / "notes.txt").write_text("ignored")
    with FolderSource(tmp_path, fps=4.0) as src:
        items = [src.read() for _ in range(6)]
    assert items[-1] is None
    assert [_index_of(rgb) for _, rgb in items[:5]] == [0, 1, 2, 3, 4]
    assert [t for t, _ in items[:5]] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])


def test_folder_source_rejects_mixed_sizes_and_empty_folders(tmp_path):
    cv2.imwrite(str(tmp_path / "0.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "1.png"), np.zeros((8, 10, 3), np.uint8))
    with FolderSource(tmp_path) as src:
        src.read()
        with pytest.raises(VideoError, match=r"^Frame: .*1\.png \| is 10x8 but the first frame is 8x8\.\nNote: "):
            src.read()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoError, match=r"is a folder without images"):
        FolderSource(empty).open()


def test_missing_and_undecodable_files_fail_with_video_error(tmp_path):
    with pytest.raises(VideoError, match=r"^Video: .*nope\.mp4 \| does not exist\.\nNote: "):
        FileSource(tmp_path / "nope.mp4").open()
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 50)
    with pytest.raises(VideoError, match=r"cannot be opened as a video"):
        FileSource(junk).open()


def test_open_source_picks_the_kind_from_the_spec(tmp_path, clip):
    assert isinstance(open_source("0"), CameraSource) and open_source(" 2 ").index == 2
    for url in ("rtsp://10.0.0.2/live", "RTSPS://cam/x", "http://cam/mjpg", "https://cam/stream.m3u8"):
        assert isinstance(open_source(url), RtspSource), url
    assert isinstance(open_source(tmp_path), FolderSource)
    src = open_source(str(clip), pace=False, loop=True)
    assert isinstance(src, FileSource) and not src.pace and src.loop
    assert isinstance(open_source("./0"), FileSource)  # a file named 0
    with pytest.raises(InputError, match=r"^Source: ftp://h/x \| has the unsupported scheme ftp://\."):
        open_source("ftp://h/x")
    with pytest.raises(InputError, match=r"^Source \| is empty\."):
        open_source("  ")


def test_passwords_never_appear_in_messages():
    assert redact_url("rtsp://admin:hunter2@10.0.0.2:554/live") == "rtsp://admin:***@10.0.0.2:554/live"
    assert redact_url("rtsp://10.0.0.2/live") == "rtsp://10.0.0.2/live"
    src = RtspSource("rtsp://admin:hunter2@127.0.0.1:1/live", open_timeout_s=2)
    assert "hunter2" not in src.describe() and "hunter2" not in src.subject()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: nothing listens there


def test_unreachable_rtsp_url_fails_within_the_bound():
    url = f"rtsp://127.0.0.1:{_closed_port()}/live"
    src = RtspSource(url, open_timeout_s=2.0)
    start = time.monotonic()
    with pytest.raises(VideoError, match=rf"^RTSP stream: {url} \| cannot be opened .*\nNote: Check the URL"):
        src.open()
    assert time.monotonic() - start < 2.0 + 2.0 + 1.0  # open timeout + probe grace + slack


# ---------------------------------------------------------------------------------------------------
# Fake captures (objects with the VideoCapture methods the reader uses; never a cv2 subclass)


class FakeCapture:
    """Delivers ``frames`` numbered frames, then stalls (``stall``) or fails a read (``fail``)."""

    def __init__(self, frames: int, after: str = "stall", opened: bool = True, first: int = 0) -> None:
        self.frames, self.after, self.opened, self.next = frames, after, opened, first
        self.limit = first + frames
        self.released = threading.Event()

    def isOpened(self):
        return self.opened

    def get(self, prop):
        return 25.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def read(self):
        if self.next < self.limit:
            time.sleep(0.03)  # a camera's frame period
            self.next += 1
            return True, np.full((6, 8, 3), self.next - 1, np.uint8)
        if self.after == "stall":
            time.sleep(0.5)  # like FFmpeg's read timeout: a stalled read returns, late
        return False, None

    def release(self):
        self.released.set()


class Factory:
    def __init__(self, *captures):
        self.captures = list(captures)
        self.made = []

    def __call__(self):
        cap = self.captures.pop(0) if self.captures else FakeCapture(0, opened=False)
        self.made.append(cap)
        return cap


def _values_until(src, last):
    """Read until the frame numbered ``last``; the numbers read (a slow test thread may miss some: drop-oldest)."""
    values = []
    while not values or values[-1] != last:
        values.append(int(src.read()[1][0, 0, 0]))
    assert values == sorted(set(values)), values
    return values


def test_a_stalled_stream_is_retried_with_backoff_then_ends_with_video_error():
    factory = Factory(FakeCapture(3), FakeCapture(0), FakeCapture(0), FakeCapture(0))
    lines = []
    src = RtspSource("rtsp://cam.local/live", stall_timeout_s=0.2, max_retries=3, backoff_s=0.05,
                     capture_factory=factory, log=lines.append)
    start = time.monotonic()
    with src:
        assert _values_until(src, 2)[0] in (0, 1)
        with pytest.raises(VideoError) as err:
            src.read()
    elapsed = time.monotonic() - start
    assert str(err.value).startswith("RTSP stream: rtsp://cam.local/live | no frame for 0.2 s after 3 reconnects.\n"
                                     "Note: The stream stopped delivering frames.")
    assert len(factory.made) == 4 and src.reconnects == 3
    assert lines == [f"warning: RTSP stream: rtsp://cam.local/live | no frame for 0.2 s; reconnecting ({i}/3) in "
                     f"{0.05 * 2 ** (i - 1):.1f} s." for i in (1, 2, 3)]
    assert elapsed < 4 * 0.2 + 0.05 + 0.1 + 0.2 + 2.0  # four stalls + three backoffs + slack
    for cap in factory.made:  # every abandoned reader releases its own capture once its read returns
        assert cap.released.wait(2.0)


def test_a_failed_read_reconnects_and_the_stream_goes_on():
    factory = Factory(FakeCapture(2, after="fail"), FakeCapture(12, after="fail", first=2))  # 12 x 30 ms > 0.25 s
    lines = []
    src = RtspSource("rtsp://u:secret@cam/live", stall_timeout_s=0.25, max_retries=1, backoff_s=0.0,
                     capture_factory=factory, log=lines.append)
    with src:
        _values_until(src, 1)
        assert _values_until(src, 13)[0] in (2, 3)
        with pytest.raises(VideoError, match=r"\| cannot be opened \(unreachable.*\) after 1 reconnects\."):
            src.read()  # the third connection fails to open: the new outage uses up the one retry
    assert src.reconnects == 2  # the second connection streamed for longer than the stall timeout: a new budget
    assert "read failed (the stream ended or broke); reconnecting (1/1)" in lines[0]
    assert all("secret" not in line for line in lines)


def test_a_stream_that_breaks_right_after_each_reconnect_still_gives_up():
    factory = Factory(*[FakeCapture(1, after="fail", first=i) for i in range(10)])
    src = CameraSource(0, stall_timeout_s=1.0, max_retries=2, backoff_s=0.0, capture_factory=factory,
                       log=lambda line: None)
    with src:
        with pytest.raises(VideoError, match=r"^Camera: 0 \| read failed .* after 2 reconnects\."):
            while True:
                src.read()
    assert src.reconnects == 2 and len(factory.made) == 3


def test_camera_that_does_not_open_fails_at_once():
    src = CameraSource(3, capture_factory=Factory(FakeCapture(0, opened=False)))
    start = time.monotonic()
    with pytest.raises(VideoError, match=r"^Camera: 3 \| cannot be opened .*\nNote: Check the camera is connected"):
        src.open()
    assert time.monotonic() - start < 1.0


def test_cancel_ends_a_blocked_read_promptly():
    src = CameraSource(0, stall_timeout_s=10.0, capture_factory=Factory(FakeCapture(0)))
    with src:
        threading.Timer(0.2, src.cancel).start()
        start = time.monotonic()
        assert src.read() is None
        assert time.monotonic() - start < 1.0


def test_a_slow_reader_gets_recent_frames_and_drops_are_counted():
    class Endless(FakeCapture):
        def read(self):
            time.sleep(0.002)
            self.next += 1
            return True, np.full((6, 8, 3), self.next % 256, np.uint8)

    src = CameraSource(0, capture_factory=Factory(Endless(0)))
    with src:
        src.read()
        time.sleep(0.3)
        src.read()
        assert src.dropped > 10
