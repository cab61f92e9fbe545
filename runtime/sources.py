"""Live frame sources for the embedded loop: one interface over files, frame folders, cameras and streams.

Every source reads one RGB frame at a time, `read() -> (timestamp_s, rgb [H, W, 3] uint8) | None`, and is
a context manager. `open_source(spec)` picks the kind from a CLI string (DESIGN.md §7): an integer is a
camera index, ``rtsp://``, ``rtsps://``, ``http(s)://`` (and ``rtmp://``, ``udp://``) a network stream, a
folder a folder of frames, anything else a video file.

Cameras and streams are read by a background thread into a small drop-oldest buffer, so the caller
always gets a recent frame and a stalled stream never blocks it for longer than ``stall_timeout_s``.
A stall or a failed read is reported (a warning line naming the source and the reason) and the stream
is reopened up to ``max_retries`` times with exponential backoff; then `read` raises VideoError. An
outage ends once a new connection has delivered frames for ``stall_timeout_s`` (then the retry budget and
the backoff start again), so a stream that keeps breaking right after each reconnect still gives up.
The first open is not retried: a wrong URL fails at once, within ``open_timeout_s``.

OpenCV captures are never closed from another thread while they read (that crashes some FFmpeg
builds): an abandoned reader releases its own capture once its read returns, which the FFmpeg read
timeout (set to the stall timeout) bounds.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from vidllm_edge.errors import InputError, VideoError
from vidllm_edge.runtime.video import IMAGE_EXTENSIONS

DEFAULT_STALL_TIMEOUT_S = 5.0   # no frame for this long: the stream is reopened
DEFAULT_OPEN_TIMEOUT_S = 10.0   # connect + probe of one (re)open
DEFAULT_MAX_RETRIES = 3         # reopens per outage (reset by the next frame)
DEFAULT_BACKOFF_S = 0.5         # wait before the first reopen; doubles each time, capped at MAX_BACKOFF_S
MAX_BACKOFF_S = 8.0
DEFAULT_FOLDER_FPS = 10.0       # a folder of frames has no clock: frame i is at i / fps
LIVE_BUFFER_FRAMES = 2          # frames a live reader keeps ahead of the caller (older ones are dropped)
WARNINGS_KEPT = 100             # a source that runs for weeks keeps only its latest warnings
STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https", "rtmp", "udp")
# OpenCV >= 4.5.2 names these; the numbers are a fallback for builds without the names.
CAP_PROP_OPEN_TIMEOUT_MSEC = getattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC", 53)
CAP_PROP_READ_TIMEOUT_MSEC = getattr(cv2, "CAP_PROP_READ_TIMEOUT_MSEC", 54)

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class FrameSource:
    """One frame at a time, with timestamps (seconds): ``open()``, ``read()``, ``close()``.

    ``read()`` returns ``(timestamp_s, rgb)`` with rgb a C-contiguous uint8 [H, W, 3] array the caller
    may keep, or None at the end (or after `cancel`). Counters: ``frames_read`` (frames returned),
    ``dropped`` (frames skipped to keep up: late file frames, live frames the caller was too slow for).
    """

    live = False          # True: frames come at the camera's pace whether read or not
    fps: float | None = None

    def __init__(self, log: Log | None = None) -> None:
        self.frames_read = 0
        self.dropped = 0
        self.warnings: collections.deque[str] = collections.deque(maxlen=WARNINGS_KEPT)
        self._log = log or _stderr
        self._cancel = threading.Event()
        self._opened = False

    def open(self) -> "FrameSource":
        if not self._opened:
            self._cancel.clear()
            self._open()
            self._opened = True
        return self

    def read(self) -> tuple[float, np.ndarray] | None:
        if not self._opened:
            raise InputError(f"Source: {self.describe()}", "was read before it was opened.",
                             "Call open() first, or use the source as a context manager.")
        if self._cancel.is_set():
            return None
        item = self._read()
        if item is not None:
            self.frames_read += 1
        return item

    def close(self) -> None:
        if self._opened:
            self._opened = False
            self._close()

    def cancel(self) -> None:
        """Make a pending or later `read` return None soon; safe from any thread or a signal handler."""
        self._cancel.set()

    def describe(self) -> str:
        raise NotImplementedError

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self._log(f"warning: {message}")

    def __enter__(self) -> "FrameSource":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # subclasses
    def _open(self) -> None:
        raise NotImplementedError

    def _read(self) -> tuple[float, np.ndarray] | None:
        raise NotImplementedError

    def _close(self) -> None:
        pass


class _Pacer:
    """Plays media timestamps on the wall clock: waits for early frames, says which are late."""

    def __init__(self, period_s: float, cancel: threading.Event) -> None:
        self.period_s = period_s
        self.cancel = cancel
        self.start: float | None = None

    def late(self, timestamp_s: float) -> bool:
        """True when the frame at ``timestamp_s`` is over a frame period overdue (skip it)."""
        if self.start is None:
            self.start = time.monotonic() - timestamp_s
        return time.monotonic() - (self.start + timestamp_s) > self.period_s

    def wait(self, timestamp_s: float) -> None:
        delay = self.start + timestamp_s - time.monotonic()
        if delay > 0:
            self.cancel.wait(delay)


class FileSource(FrameSource):
    """A video file OpenCV can decode.

    Args:
        path: the video file.
        pace: True plays it at its frame rate like a camera (early frames wait, frames over a period late
            are skipped and counted as dropped); False returns every frame as fast as it decodes.
        loop: start again at the end (timestamps keep increasing), for demos and soak tests.
    Timestamps are frame index / fps (media time; fps 25 assumed when the file has none).
    """

    def __init__(self, path: str | os.PathLike, pace: bool = True, loop: bool = False, log: Log | None = None) -> None:
        super().__init__(log)
        self.path = Path(path)
        self.pace = pace
        self.loop = loop
        self.total: int | None = None
        self._cap = None
        self._index = 0       # frames decoded so far, over all loops
        self._offset = 0      # index of the current pass's first frame
        self._pacer: _Pacer | None = None

    def describe(self) -> str:
        fps = f"{self.fps:g} fps" if self.fps else "fps unknown"
        return f"video file {self.path} ({fps}{', paced' if self.pace else ''}{', looped' if self.loop else ''})"

    def _subject(self) -> str:
        return f"Video: {self.path}"

    def _capture(self):
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise VideoError(self._subject(), "cannot be opened as a video (not a video, or a codec OpenCV lacks).",
                             "Pass a video file OpenCV can decode (e.g. .mp4 with H.264 or MPEG-4).")
        return cap

    def _open(self) -> None:
        if not self.path.exists():
            raise VideoError(self._subject(), "does not exist.", "Check the path; a folder of frames also works.")
        if self.path.is_dir():
            raise VideoError(self._subject(), "is a folder.", "Use FolderSource (open_source picks it for folders).")
        self._cap = self._capture()
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if 0 < fps < 1000 else None
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.total = count if count > 0 else None
        self._index = self._offset = 0
        self._pacer = _Pacer(1.0 / (self.fps or 25.0), self._cancel) if self.pace else None

    def _timestamp(self, index: int) -> float:
        return index / (self.fps or 25.0)

    def _next_bgr(self, decode: bool = True) -> np.ndarray | bool | None:
        """The next frame (BGR), True when skipped undecoded, None at the end of the file (and of all loops)."""
        for _ in range(2):  # at most one restart per call
            if decode:
                ok, bgr = self._cap.read()
                if ok and bgr is not None:
                    return bgr
            elif self._cap.grab():
                return True
            if not self.loop or self._index == self._offset:  # end, or a pass without a single frame
                return None
            self._cap.release()
            self._cap = self._capture()
            self._offset = self._index
        return None

    def _read(self) -> tuple[float, np.ndarray] | None:
        while self._pacer is not None and self._pacer.late(self._timestamp(self._index)):
            if self._next_bgr(decode=False) is None:
                return None
            self._index += 1
            self.dropped += 1
        bgr = self._next_bgr()
        if bgr is None:
            return None
        timestamp = self._timestamp(self._index)
        self._index += 1
        if self._pacer is not None:
            self._pacer.wait(timestamp)
        return timestamp, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class FolderSource(FrameSource):
    """A folder of frames (png, jpg, jpeg, bmp) read in name order; all frames must have one size.

    Args:
        folder: the folder.
        fps: the clock of the frames (frame i is at i / fps seconds).
        pace: True delivers them at ``fps`` (late frames skipped undecoded), False as fast as they decode.
    """

    def __init__(self, folder: str | os.PathLike, fps: float = DEFAULT_FOLDER_FPS, pace: bool = False,
                 log: Log | None = None) -> None:
        super().__init__(log)
        if fps <= 0:
            raise InputError(f"Argument: fps={fps}", "is not positive.", "Give the frame rate of the folder, e.g. 10.")
        self.folder = Path(folder)
        self.fps = float(fps)
        self.pace = pace
        self.files: list[Path] = []
        self._next = 0
        self._shape: tuple[int, ...] | None = None
        self._pacer: _Pacer | None = None

    def describe(self) -> str:
        paced = ", paced" if self.pace else ""
        return f"frame folder {self.folder} ({len(self.files)} frames at {self.fps:g} fps{paced})"

    def _open(self) -> None:
        subject = f"Video: {self.folder}"
        if not self.folder.is_dir():
            raise VideoError(subject, "is not a folder.", "Pass a folder of frames named in playback order.")
        self.files = sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise VideoError(subject, "is a folder without images (png, jpg, jpeg, bmp).",
                             "Put the frames in the folder as images named in playback order (e.g. 000001.png).")
        self._next, self._shape = 0, None
        self._pacer = _Pacer(1.0 / self.fps, self._cancel) if self.pace else None

    def _read(self) -> tuple[float, np.ndarray] | None:
        while self._pacer is not None and self._next < len(self.files) and self._pacer.late(self._next / self.fps):
            self._next += 1
            self.dropped += 1
        if self._next >= len(self.files):
            return None
        path, timestamp = self.files[self._next], self._next / self.fps
        self._next += 1
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise VideoError(f"Frame: {path}", "cannot be decoded as an image.", "Remove or replace the file.")
        if self._shape is not None and bgr.shape != self._shape:
            raise VideoError(f"Frame: {path}", f"is {bgr.shape[1]}x{bgr.shape[0]} but the first frame is "
                             f"{self._shape[1]}x{self._shape[0]}.", "Use frames of one size.")
        self._shape = bgr.shape
        if self._pacer is not None:
            self._pacer.wait(timestamp)
        return timestamp, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# ---------------------------------------------------------------------------------------------------
# Live sources: a reader thread per connection, a drop-oldest buffer, stall detection and reconnects


class _Reader:
    """One connection: a daemon thread that opens a capture and pushes frames into a small buffer."""

    def __init__(self, open_capture: Callable[[], Any], capacity: int) -> None:
        self._open_capture = open_capture
        self._frames: collections.deque = collections.deque(maxlen=capacity)
        self._cond = threading.Condition()
        self.stop = threading.Event()
        self.opened = False
        self.failure: str | None = None
        self.fps: float | None = None
        self.dropped = 0
        self.opened_at = self.last_frame_at = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="vidllm-frame-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            cap = self._open_capture()
        except Exception as exc:  # noqa: BLE001 - any backend failure is a failed open, reported by the caller
            self._fail(f"cannot be opened ({type(exc).__name__}: {exc})")
            return
        try:
            if cap is None or not cap.isOpened():
                self._fail("cannot be opened (unreachable, refused, or not a stream OpenCV's FFmpeg can play)")
                return
            fps = cap.get(cv2.CAP_PROP_FPS)
            with self._cond:
                self.fps = fps if 0 < fps < 1000 else None
                self.opened = True
                self.opened_at = self.last_frame_at = time.monotonic()
                self._cond.notify_all()
            while not self.stop.is_set():
                ok, bgr = cap.read()
                if self.stop.is_set():
                    break
                if not ok or bgr is None:
                    self._fail("read failed (the stream ended or broke)")
                    break
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                with self._cond:
                    if len(self._frames) == self._frames.maxlen:
                        self.dropped += 1  # the caller is slower than the camera: keep the newest frames
                    self.last_frame_at = time.monotonic()
                    self._frames.append((self.last_frame_at, rgb))
                    self._cond.notify_all()
        finally:
            if cap is not None:
                cap.release()

    def _fail(self, reason: str) -> None:
        with self._cond:
            self.failure = reason
            self._cond.notify_all()

    def wait_open(self, timeout_s: float, cancel: threading.Event) -> bool:
        """True once open; False on failure, cancel, or ``timeout_s`` elapsed."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self.opened and self.failure is None and not cancel.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
            return self.opened

    def get(self, stall_timeout_s: float, cancel: threading.Event) -> tuple[float, np.ndarray] | str | None:
        """The oldest buffered frame; else a reason string (failure or stall); None when cancelled."""
        with self._cond:
            while not self._frames:
                if cancel.is_set():
                    return None
                if self.failure is not None:
                    return self.failure
                left = self.last_frame_at + stall_timeout_s - time.monotonic()
                if left <= 0:
                    return f"no frame for {stall_timeout_s:.1f} s"
                self._cond.wait(min(left, 0.1))  # short slices: cancel() is seen promptly
            return self._frames.popleft()

    def abandon(self, join_s: float = 0.0) -> None:
        self.stop.set()
        with self._cond:
            self._cond.notify_all()
        if join_s > 0:
            self.thread.join(join_s)


class _LiveSource(FrameSource):
    """A camera or stream read by `_Reader` threads, reopened after a stall or a failed read."""

    live = True

    def __init__(self, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S, max_retries: int = DEFAULT_MAX_RETRIES,
                 open_timeout_s: float = DEFAULT_OPEN_TIMEOUT_S, backoff_s: float = DEFAULT_BACKOFF_S,
                 capture_factory: Callable[[], Any] | None = None, log: Log | None = None) -> None:
        super().__init__(log)
        if stall_timeout_s <= 0 or open_timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise InputError("Live source options", f"Received stall_timeout_s={stall_timeout_s}, open_timeout_s="
                             f"{open_timeout_s}, max_retries={max_retries}, backoff_s={backoff_s}.",
                             "Use positive timeouts and non-negative retries and backoff.")
        self.stall_timeout_s = float(stall_timeout_s)
        self.max_retries = int(max_retries)
        self.open_timeout_s = float(open_timeout_s)
        self.backoff_s = float(backoff_s)
        self.reconnects = 0              # over the source's life
        self._attempt = 0                # reopens in the current outage
        self._capture_factory = capture_factory
        self._reader: _Reader | None = None
        self._t0 = 0.0
        self._dropped_before = 0         # drops of abandoned readers

    # subclasses: subject (error messages), the note of a lost source, and how to open the capture
    def subject(self) -> str:
        raise NotImplementedError

    def _lost_note(self) -> str:
        raise NotImplementedError

    def _open_capture(self):
        raise NotImplementedError

    def _new_reader(self) -> _Reader:
        return _Reader(self._capture_factory or self._open_capture, LIVE_BUFFER_FRAMES)

    def _wait_open_s(self) -> float:
        return self.open_timeout_s + 2.0  # grace over the backend's own timeout, for the probe

    def _open(self) -> None:
        self._t0 = time.monotonic()
        self._dropped_before = self.dropped = 0
        reader = self._new_reader()
        if not reader.wait_open(self._wait_open_s(), self._cancel):
            reader.abandon()
            if self._cancel.is_set():
                return  # reads return None
            reason = reader.failure or f"does not open within {self._wait_open_s():.1f} s"
            raise VideoError(self.subject(), f"{reason}.", self._open_note())
        self._reader = reader
        self._attempt = 0
        self.fps = reader.fps

    def _open_note(self) -> str:
        return self._lost_note()

    def _read(self) -> tuple[float, np.ndarray] | None:
        while True:
            item = self._reader.get(self.stall_timeout_s, self._cancel)
            self.dropped = self._dropped_before + self._reader.dropped
            if item is None:
                return None
            if not isinstance(item, str):
                arrived, rgb = item
                if self._attempt and arrived - self._reader.opened_at >= self.stall_timeout_s:
                    self._attempt = 0  # healthy again: the outage is over
                return arrived - self._t0, rgb
            reason = item
            while True:  # reopen until a connection opens, or give up
                if self._attempt >= self.max_retries:
                    raise VideoError(self.subject(), f"{reason} after {self.max_retries} reconnects.",
                                     self._lost_note())
                self._attempt += 1
                delay = min(self.backoff_s * 2 ** (self._attempt - 1), MAX_BACKOFF_S)
                self.warn(f"{self.subject()} | {reason}; reconnecting ({self._attempt}/{self.max_retries}) "
                          f"in {delay:.1f} s.")
                self._dropped_before += self._reader.dropped
                self._reader.abandon()
                if self._cancel.wait(delay):
                    return None
                self.reconnects += 1
                self._reader = self._new_reader()
                if self._reader.wait_open(self._wait_open_s(), self._cancel):
                    self.fps = self._reader.fps or self.fps
                    break
                if self._cancel.is_set():
                    return None
                reason = self._reader.failure or f"does not reopen within {self._wait_open_s():.1f} s"

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.abandon(join_s=1.0)  # its capture is released by the thread once its read returns
            self.dropped = self._dropped_before + self._reader.dropped
            self._reader = None


class CameraSource(_LiveSource):
    """A local camera by index (V4L2 on Linux, e.g. /dev/video0 is 0).

    ``capture_factory`` (tests) replaces ``cv2.VideoCapture(index)`` with any object that has
    ``isOpened()``, ``read() -> (ok, bgr)``, ``get(prop)`` and ``release()``.
    """

    def __init__(self, index: int, **options) -> None:
        super().__init__(**options)
        if index < 0:
            raise InputError(f"Camera: {index}", "is a negative index.", "Use 0 for the first camera.")
        self.index = int(index)

    def subject(self) -> str:
        return f"Camera: {self.index}"

    def describe(self) -> str:
        return f"camera {self.index}"

    def _lost_note(self) -> str:
        return (f"Check the camera is connected and not used by another program (v4l2-ctl --list-devices; "
                f"ls /dev/video*); raise --stall-timeout or --max-retries for a slow camera.")

    def _open_capture(self):
        cap = cv2.VideoCapture(self.index)
        if cap.isOpened():
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a queue of stale ones
        return cap


_ENV_LOCK = threading.Lock()  # OpenCV reads OPENCV_FFMPEG_CAPTURE_OPTIONS from the environment at open time
_FFMPEG_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"


@contextlib.contextmanager
def _ffmpeg_capture_options(options: dict[str, str]):
    """Set OpenCV's FFmpeg demuxer options for one open (the user's own variable takes precedence)."""
    with _ENV_LOCK:
        before = os.environ.get(_FFMPEG_OPTIONS_ENV)
        ours = "|".join(f"{k};{v}" for k, v in options.items())
        os.environ[_FFMPEG_OPTIONS_ENV] = f"{ours}|{before}" if before else ours
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(_FFMPEG_OPTIONS_ENV, None)
            else:
                os.environ[_FFMPEG_OPTIONS_ENV] = before


def redact_url(url: str) -> str:
    """``rtsp://user:secret@host/path`` -> ``rtsp://user:***@host/path`` (messages and logs never show passwords)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RtspSource(_LiveSource):
    """A network stream through OpenCV's FFmpeg backend: RTSP(S), HTTP(S) (MJPEG, HLS, MPEG-TS), RTMP, UDP.

    Args:
        url: the stream URL (credentials are redacted in every message).
        transport: RTSP lower transport, "tcp" (default: survives NAT and loss without artefacts) or "udp".
        ffmpeg_options: extra FFmpeg demuxer options (e.g. {"analyzeduration": "500000"} for a faster probe).
        stall_timeout_s, max_retries, open_timeout_s, backoff_s: the reconnect policy (module docstring).
        capture_factory: tests: a zero-argument callable returning a capture-like object.
    """

    def __init__(self, url: str, transport: str = "tcp", ffmpeg_options: dict[str, str] | None = None,
                 **options) -> None:
        super().__init__(**options)
        if transport not in ("tcp", "udp"):
            raise InputError(f"Argument: transport={transport!r}", "is not tcp or udp.",
                             "Use tcp (default) or udp for cameras that only stream over UDP.")
        self.url = url
        self.transport = transport
        self.ffmpeg_options = dict(ffmpeg_options or {})

    def subject(self) -> str:
        kind = "RTSP stream" if urlsplit(self.url).scheme.lower() in ("rtsp", "rtsps") else "Stream"
        return f"{kind}: {redact_url(self.url)}"

    def describe(self) -> str:
        scheme = urlsplit(self.url).scheme.lower()
        extra = f" over {self.transport}" if scheme in ("rtsp", "rtsps") else ""
        return f"{scheme} stream {redact_url(self.url)}{extra}"

    def _open_note(self) -> str:
        return ("Check the URL (path and credentials), that the server is up and reachable from here "
                f"(ffprobe '{redact_url(self.url)}'), and the transport (--rtsp-transport udp for UDP-only cameras).")

    def _lost_note(self) -> str:
        return ("The stream stopped delivering frames. Check the camera or server and the network; "
                "raise --stall-timeout or --max-retries for a flaky link.")

    def _open_capture(self):
        options = {"rtsp_transport": self.transport} if urlsplit(self.url).scheme.lower() in ("rtsp", "rtsps") else {}
        options.update(self.ffmpeg_options)
        timeouts = [CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.open_timeout_s * 1000),
                    CAP_PROP_READ_TIMEOUT_MSEC, int(self.stall_timeout_s * 1000)]
        with _ffmpeg_capture_options(options):
            return cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, timeouts)


# ---------------------------------------------------------------------------------------------------


def open_source(spec: str | os.PathLike | int, *, pace: bool = True, loop: bool = False,
                folder_fps: float = DEFAULT_FOLDER_FPS, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
                max_retries: int = DEFAULT_MAX_RETRIES, open_timeout_s: float = DEFAULT_OPEN_TIMEOUT_S,
                rtsp_transport: str = "tcp", log: Log | None = None) -> FrameSource:
    """The source a CLI string names (not opened yet).

    An integer (``"0"``) is a camera index (write ``./0`` for a file named 0); a URL with scheme rtsp,
    rtsps, http, https, rtmp or udp is a stream; an existing folder a folder of frames; anything else a
    video file. ``pace``/``loop`` apply to files (``pace`` also to folders), the timeouts and retries to
    cameras and streams.
    """
    text = str(spec).strip()
    if not text:
        raise InputError("Source", "is empty.", "Give a video file, a frame folder, a camera index or an RTSP URL.")
    live = dict(stall_timeout_s=stall_timeout_s, max_retries=max_retries, open_timeout_s=open_timeout_s, log=log)
    if re.fullmatch(r"\d+", text):
        return CameraSource(int(text), **live)
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme:
        if scheme.group(1).lower() not in STREAM_SCHEMES:
            raise InputError(f"Source: {redact_url(text)}", f"has the unsupported scheme {scheme.group(1)}://.",
                             f"Use one of {', '.join(s + '://' for s in STREAM_SCHEMES)}, a file or a folder.")
        return RtspSource(text, transport=rtsp_transport, **live)
    path = Path(text)
    if path.is_dir():
        return FolderSource(path, fps=folder_fps, pace=pace, log=log)
    return FileSource(path, pace=pace, loop=loop, log=log)
