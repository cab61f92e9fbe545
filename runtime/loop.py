"""The embedded loop: frames in continuously, a scene re-encoded now and then, questions answered against it.

A camera box reads frames without pause into a `RollingWindow` of keyframes (a preallocated ring
buffer: memory stays flat however long it runs). Once the window is full (or ``reencode_every_s`` has
passed), then every ``reencode_every_s`` seconds when it holds new keyframes, or on demand
(`InferenceLoop.request_encode`, or ``/encode`` typed as a question), the window is encoded into a
`Scene` (DESIGN.md §1: encoded once, answers many questions). Questions from a `QuestionFeed` are
answered against the latest scene as they come, tokens streamed; each answer is appended to
``answers.jsonl`` as one line, flushed and fsynced. On exit the latest scene's artifacts are written
with `write_run_outputs` (answers.json, geometry.npz, points.ply, depth PNGs).

Exit paths, all of which close the source and flush the outputs:

- end of stream: encode the window if no scene exists yet, answer the questions still queued, write;
- stream lost (the source raised VideoError after its reconnects): the same, and the error is kept;
- Ctrl-C (SIGINT) or `InferenceLoop.stop`: the current token stream finishes, nothing new starts, write
  (a second Ctrl-C interrupts at once);
- ``/quit`` (typed, a line of the questions file) or ``max_iterations`` reached: like end of stream.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import queue
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import cv2
import numpy as np

from vidllm_edge import atomic
from vidllm_edge.errors import InputError, VideoError, VidLLMError
from vidllm_edge.runtime.sources import FrameSource
from vidllm_edge.runtime.video import Frames

DEFAULT_REENCODE_S = 5.0        # seconds between scene re-encodes
STATS_HISTORY = 1024            # iterations kept in LoopStats.history (bounded: memory stays flat)
ANSWERS_KEPT = 64               # latest answers passed to answers.json (all are in answers.jsonl)
MOTION_THUMB_WH = (64, 48)      # min_motion is measured on grey thumbnails of this size
ENCODE_COMMAND, QUIT_COMMAND = "/encode", "/quit"
EXIT_REASONS = ("end_of_stream", "stream_lost", "interrupted", "quit", "max_iterations")


def rss_bytes() -> int | None:
    """Resident set size of this process in bytes, from /proc/self/statm (None where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------------------------------
# Rolling window of keyframes


class RollingWindow:
    """The last ``capacity_frames`` keyframes, copied into one preallocated uint8 ring buffer.

    A frame becomes a keyframe when the window is empty, or when ``keyframe_interval_s`` seconds have
    passed since the last keyframe, or when its mean absolute grey-level difference to the last keyframe
    (0..255, on 64x48 thumbnails) is at least ``min_motion``. With neither set, every frame is a keyframe.
    The buffer is allocated at the first frame and again only if the frame size changes (a warning).
    """

    def __init__(self, capacity_frames: int, keyframe_interval_s: float | None = None,
                 min_motion: float | None = None) -> None:
        if capacity_frames < 1:
            raise InputError(f"Window: {capacity_frames} frames", "is less than 1.",
                             "Keep at least 1 frame (--window N).")
        if (keyframe_interval_s is not None and keyframe_interval_s < 0) or (min_motion is not None and min_motion < 0):
            raise InputError("Window", f"Received keyframe_interval_s={keyframe_interval_s}, min_motion={min_motion}.",
                             "Use non-negative values (or None for every frame).")
        self.capacity = int(capacity_frames)
        self.keyframe_interval_s = keyframe_interval_s
        self.min_motion = min_motion
        self.version = 0          # keyframes accepted so far: a scene is stale when this moved on
        self.frames_seen = 0
        self.warnings: collections.deque[str] = collections.deque(maxlen=16)  # bounded: a flapping camera
        self._rgb: np.ndarray | None = None          # [N, H, W, 3] uint8
        self._times = np.zeros(self.capacity)         # [N] seconds
        self._indices = np.zeros(self.capacity, np.int64)  # [N] frame number in the source
        self._thumb = np.zeros(MOTION_THUMB_WH[::-1], np.float32)  # grey thumbnail of the last keyframe
        self._head = 0            # next slot to write
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def full(self) -> bool:
        return self._count == self.capacity

    def _motion(self, rgb: np.ndarray) -> tuple[float, np.ndarray]:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        thumb = cv2.resize(grey, MOTION_THUMB_WH, interpolation=cv2.INTER_AREA).astype(np.float32)
        return float(np.abs(thumb - self._thumb).mean()), thumb

    def push(self, timestamp_s: float, rgb: np.ndarray, index: int | None = None) -> bool:
        """Offer a frame (uint8 [H, W, 3]); True when it was kept as a keyframe. ``index``: its number in the source."""
        index = self.frames_seen if index is None else index
        self.frames_seen += 1
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError("Frame", f"Received {rgb.dtype} array of shape {list(rgb.shape)}.",
                             "Expected uint8 RGB [H, W, 3].")
        if self._rgb is not None and self._rgb.shape[1:] != rgb.shape:
            self.warnings.append(f"Window | frame size changed from {self._rgb.shape[2]}x{self._rgb.shape[1]} to "
                                 f"{rgb.shape[1]}x{rgb.shape[0]} at frame {index}; the window restarts.")
            self._rgb, self._count, self._head = None, 0, 0
        thumb = None
        if self._count:
            wanted = self.keyframe_interval_s is None and self.min_motion is None
            if not wanted and self.keyframe_interval_s is not None:
                wanted = timestamp_s - self._times[(self._head - 1) % self.capacity] >= self.keyframe_interval_s
            if not wanted and self.min_motion is not None:
                motion, thumb = self._motion(rgb)
                wanted = motion >= self.min_motion
            if not wanted:
                return False
        if self._rgb is None:
            self._rgb = np.empty((self.capacity, *rgb.shape), np.uint8)
        np.copyto(self._rgb[self._head], rgb)
        self._times[self._head], self._indices[self._head] = timestamp_s, index
        if self.min_motion is not None:
            self._thumb[...] = thumb if thumb is not None else self._motion(rgb)[1]
        self._head = (self._head + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)
        self.version += 1
        return True

    def timestamps(self) -> list[float]:
        return [float(t) for t in self._times[self._order()]]

    def _order(self) -> np.ndarray:
        return (self._head - self._count + np.arange(self._count)) % self.capacity  # oldest first

    def snapshot(self, source: str = "", fps: float | None = None) -> Frames:
        """The keyframes, oldest first, as `Frames` (a copy: the ring buffer keeps moving)."""
        if not self._count:
            raise VideoError(f"Source: {source or 'window'}", "gave no frames to encode.",
                             "Check the source delivers frames (try it with the plain `run --video`).")
        order = self._order()
        return Frames(rgb=self._rgb[order], indices=[int(i) for i in self._indices[order]], total=self.frames_seen,
                      fps=fps, source=source, warnings=list(self.warnings))


# ---------------------------------------------------------------------------------------------------
# Question feeds


class QuestionFeed:
    """Where questions come from. ``poll()`` never blocks; ``quit_requested`` ends the loop."""

    quit_requested = False

    def poll(self) -> list[str]:
        """Questions that arrived since the last call (commands such as /encode included)."""
        return []

    def scene_changed(self) -> None:
        """Called after each new scene (standing questions are asked again)."""

    def close(self) -> None:
        pass


def _clean(lines: Iterable[str]) -> list[str]:
    return [q for q in (line.strip() for line in lines) if q and not q.startswith("#")]


class ListFeed(QuestionFeed):
    """Fixed questions (CLI ``--question``): asked once, at the first scene; with ``repeat``, at every scene."""

    def __init__(self, questions: Iterable[str], repeat: bool = False) -> None:
        self.questions = _clean(questions)
        self.repeat = repeat
        self._due = not repeat  # standing questions come with each scene, the first included

    def poll(self) -> list[str]:
        due, self._due = self._due, False
        return list(self.questions) if due else []

    def scene_changed(self) -> None:
        if self.repeat:
            self._due = True


class FileFeed(QuestionFeed):
    """Questions from a text file, one per line (blank lines and ``#`` comments skipped).

    Lines appended while the loop runs are picked up (a complete line, ending in a newline, at a time),
    so another process can ask questions by appending to the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"Questions file: {self.path}", "does not exist or is not a file.",
                             "Write one question per line into a text file and pass it with --questions-file.")
        self._offset = 0
        self._first = True

    def poll(self) -> list[str]:
        try:
            if not self._first and os.stat(self.path).st_size <= self._offset:
                return []  # nothing appended: a stat per iteration, no open
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except OSError:
            return []  # moved away meanwhile: no new questions
        if self._first and data and not data.endswith(b"\n"):
            data += b"\n"  # a file written without a final newline: its last line is complete
            self._offset -= 1
        self._first = False
        complete = data[:data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return _clean(complete.decode("utf-8", errors="replace").splitlines())


class InteractiveFeed(QuestionFeed):
    """Questions typed at a prompt, read by a daemon thread; ``/quit`` or end of input (Ctrl-D) ends the loop."""

    def __init__(self, stdin: TextIO | None = None, prompt_to: TextIO | None = None, prompt: str = "? ") -> None:
        self._stdin = stdin or sys.stdin
        self._prompt_to = prompt_to or sys.stderr
        self._prompt = prompt
        self._queue: queue.Queue[str] = queue.Queue()
        self.quit_requested = False
        print(f"type a question and Enter; {ENCODE_COMMAND} re-encodes the scene now, {QUIT_COMMAND} ends",
              file=self._prompt_to, flush=True)
        self._thread = threading.Thread(target=self._run, name="vidllm-questions", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            print(self._prompt, end="", file=self._prompt_to, flush=True)
            line = self._stdin.readline()
            if not line or line.strip() == QUIT_COMMAND:
                self.quit_requested = True
                return
            if line.strip():
                self._queue.put(line.strip())

    def poll(self) -> list[str]:
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self._queue.get_nowait())
        return out


class MergedFeed(QuestionFeed):
    """Several feeds as one (``--question`` + ``--questions-file`` + ``--interactive``)."""

    def __init__(self, feeds: Iterable[QuestionFeed]) -> None:
        self.feeds = list(feeds)

    @property
    def quit_requested(self) -> bool:
        return any(f.quit_requested for f in self.feeds)

    def poll(self) -> list[str]:
        return [q for f in self.feeds for q in f.poll()]

    def scene_changed(self) -> None:
        for f in self.feeds:
            f.scene_changed()

    def close(self) -> None:
        for f in self.feeds:
            f.close()


# ---------------------------------------------------------------------------------------------------
# Stats and the answers log


@dataclasses.dataclass
class IterationStats:
    """One loop iteration: a frame read, maybe an encode, maybe answers. Times in ms, memory in MB."""

    iteration: int
    frames_read: int       # total so far
    dropped: int           # total so far (source drops: late file frames, frames a live reader discarded)
    keyframes: int         # total so far
    encode_ms: float       # this iteration (0 without an encode)
    answer_ms: float       # this iteration (all answers)
    rss_mb: float | None
    scene_id: int          # latest scene (0: none yet)


@dataclasses.dataclass
class LoopStats:
    """Totals and the last `STATS_HISTORY` iterations."""

    iterations: int = 0
    frames_read: int = 0
    dropped: int = 0
    keyframes: int = 0
    encodes: int = 0
    answers: int = 0
    encode_ms_total: float = 0.0
    answer_ms_total: float = 0.0
    last_encode_ms: float = 0.0
    rss_start_mb: float | None = None
    rss_mb: float | None = None
    rss_peak_mb: float | None = None
    history: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=STATS_HISTORY))

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "history"}
        out["encode_ms_mean"] = self.encode_ms_total / self.encodes if self.encodes else None
        out["answer_ms_mean"] = self.answer_ms_total / self.answers if self.answers else None
        return out


class AnswersLog:
    """``answers.jsonl``: one JSON object per line, appended with one write, then flushed and fsynced.

    A line torn by a power cut is at most the last one; the next run starts on a fresh line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        if size:
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    self._write(b"\n")

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def append(self, record: dict[str, Any]) -> None:
        self._write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclasses.dataclass
class LoopResult:
    """How a run ended: ``reason`` is one of EXIT_REASONS; ``error`` is set for ``stream_lost``."""

    reason: str
    error: VidLLMError | None
    written: dict[str, Path]
    scenes: int
    answers: int
    stats: LoopStats


# ---------------------------------------------------------------------------------------------------
# The loop


class InferenceLoop:
    """Reads ``source`` continuously, keeps ``window`` and a scene fresh, answers ``questions``.

    Args:
        pipeline: a `Pipeline` (any backend).
        source: a `FrameSource` (opened by `run` if it is not open yet; closed by `run`).
        window: the keyframes each scene is encoded from (default: the pipeline's frame count, every frame).
        reencode_every_s: seconds between scenes, on ``clock`` (0: every iteration with a new keyframe).
        questions: a `QuestionFeed` (default: none).
        out_dir: folder of answers.jsonl and the final artifacts.
        on_text: receives each decoded piece of an answer as it streams.
        clock: seconds, called exactly once per iteration (default time.monotonic; tests pass a fake).
        on_question: called with (question, scene_id) before its answer streams.
        on_answer: called with each answers.jsonl record after its answer.
        log: status lines (default stderr).
        model_name: recorded in answers.json.
    """

    def __init__(self, pipeline, source: FrameSource, window: RollingWindow | None = None,
                 reencode_every_s: float = DEFAULT_REENCODE_S, questions: QuestionFeed | None = None,
                 out_dir: str | os.PathLike = "vidllm-edge-loop", on_text: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_question: Callable[[str, int], None] | None = None,
                 on_answer: Callable[[dict[str, Any]], None] | None = None,
                 log: Callable[[str], None] | None = None, model_name: str = "") -> None:
        if reencode_every_s < 0:
            raise InputError(f"Re-encode interval: {reencode_every_s} s", "is negative.",
                             "Use seconds >= 0 (--reencode-every S).")
        self.pipeline = pipeline
        self.source = source
        self.window = window if window is not None else RollingWindow(pipeline.num_frames)  # (an empty window is falsy)
        self.reencode_every_s = float(reencode_every_s)
        self.questions = questions if questions is not None else QuestionFeed()
        self.out_dir = Path(out_dir)
        self.on_text = on_text
        self.clock = clock
        self.on_question = on_question
        self.on_answer = on_answer
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.model_name = model_name
        self.stats = LoopStats()
        self.scene = None
        self.scene_id = 0
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._encode_requested = threading.Event()
        self._pending: collections.deque[str] = collections.deque()
        self._recent: collections.deque = collections.deque(maxlen=ANSWERS_KEPT)  # (scene_id, Answer)
        self._scene_version = -1   # window.version the scene was encoded from
        self._scene_clock: float | None = None  # clock of the last encode (of the first iteration before one)
        self._scene_times: list[float] = []
        self._quit = False
        self._log_file: AnswersLog | None = None

    # -- control, callable from any thread ---------------------------------------------------------

    def request_encode(self) -> None:
        """Encode a fresh scene at the next iteration."""
        self._encode_requested.set()

    def stop(self) -> None:
        """End the run: the current token stream finishes, nothing new starts, outputs are flushed."""
        self._stop.set()
        self.source.cancel()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- the run -----------------------------------------------------------------------------------

    def run(self, max_iterations: int | None = None, handle_sigint: bool = True) -> LoopResult:
        """Run until the stream ends or is lost, `stop`, Ctrl-C, ``/quit`` or ``max_iterations``."""
        atomic.ensure_dir(self.out_dir)  # fail before any compute if the folder cannot be written
        self.stats.rss_start_mb = _mb(rss_bytes())
        reason, error, written = "end_of_stream", None, {}
        with contextlib.ExitStack() as stack:
            if handle_sigint:
                stack.enter_context(self._sigint_stops())
            stack.callback(self.questions.close)
            stack.callback(self.source.close)
            self.source.open()
            self._log_file = AnswersLog(self.out_dir / "answers.jsonl")
            stack.callback(self._log_file.close)
            self.log(f"loop: {self.source.describe()} -> {self.out_dir} (window {self.window.capacity} keyframes, "
                     f"re-encode every {self.reencode_every_s:g} s)")
            try:
                reason = self._iterate(max_iterations)
            except VideoError as exc:
                if not self.source.live:
                    raise  # a broken file or frame is bad input, not a lost stream
                reason, error = "stream_lost", exc
                self.log(f"error: {exc}")
            if self._stop.is_set():
                reason = "interrupted"
            if reason != "interrupted":
                self._finish()
            written = self._write_outputs(reason, error)
        self.log(f"loop: ended ({reason}) after {self.stats.iterations} iterations, {self.stats.encodes} scene(s), "
                 f"{self.stats.answers} answer(s)")
        return LoopResult(reason, error, written, self.stats.encodes, self.stats.answers, self.stats)

    def _iterate(self, max_iterations: int | None) -> str:
        while not self._stop.is_set():
            if max_iterations is not None and self.stats.iterations >= max_iterations:
                return "max_iterations"
            item = self.source.read()
            if item is None:
                return "end_of_stream"
            if self._stop.is_set():  # Ctrl-C while the frame was read: start nothing new
                return "interrupted"
            timestamp, rgb = item
            now = self.clock()
            if self._scene_clock is None:
                self._scene_clock = now
            if self.window.push(timestamp, rgb, self.source.frames_read - 1 + self.source.dropped):
                self.stats.keyframes += 1
            self._take_questions()
            if self._quit or self.questions.quit_requested:
                self._record(0.0, 0.0)
                return "quit"
            encode_ms = self._encode() if self._encode_due(now) and not self._stop.is_set() else 0.0
            if encode_ms:
                self._scene_clock = now
            answer_ms = self._answer_pending()
            self._record(encode_ms, answer_ms)
        return "interrupted"

    def _take_questions(self) -> None:
        for q in self.questions.poll():
            if q == ENCODE_COMMAND:
                self.request_encode()
            elif q == QUIT_COMMAND:
                self._quit = True
            else:
                self._pending.append(q)

    def _encode_due(self, now: float) -> bool:
        if not len(self.window):
            return False
        if self._encode_requested.is_set():
            return True
        elapsed = now - self._scene_clock >= self.reencode_every_s
        if self.scene is None:
            return self.window.full or elapsed
        return elapsed and self.window.version != self._scene_version

    def _encode(self) -> float:
        self._encode_requested.clear()
        frames = self.window.snapshot(self.source.describe(), self.source.fps)
        start = time.perf_counter()
        scene = self.pipeline.encode(frames)
        ms = (time.perf_counter() - start) * 1e3
        self.scene, self.scene_id = scene, self.scene_id + 1  # the old scene and its KV cache go here
        self._scene_version = self.window.version
        self._scene_times = self.window.timestamps()
        self.stats.encodes += 1
        self.stats.encode_ms_total += ms
        self.stats.last_encode_ms = ms
        self.log(f"scene {self.scene_id}: {scene.num_frames} keyframes (frames {frames.indices[0]}.."
                 f"{frames.indices[-1]}), {scene.visual_tokens.shape[0]} visual tokens, {ms:.0f} ms")
        self.questions.scene_changed()
        self._take_questions()
        return ms

    def _answer_pending(self) -> float:
        total = 0.0
        while self._pending and self.scene is not None and not self._stop.is_set():
            question = self._pending.popleft()
            if self.on_question is not None:
                self.on_question(question, self.scene_id)
            start = time.perf_counter()
            answer = self.scene.ask(question, on_text=self.on_text)  # finishes even if stop() comes meanwhile
            ms = (time.perf_counter() - start) * 1e3
            total += ms
            record = {"run": self.run_id, "time_unix": round(time.time(), 3), "scene_id": self.scene_id,
                      "scene_frames": self.scene.frames.indices,
                      "scene_time_s": [round(self._scene_times[0], 3), round(self._scene_times[-1], 3)],
                      "source": self.source.describe(), **answer.to_dict(), "answer_ms": round(ms, 2)}
            self._log_file.append(record)
            self._recent.append((self.scene_id, answer))
            self.stats.answers += 1
            self.stats.answer_ms_total += ms
            if self.on_answer is not None:
                self.on_answer(record)
        return total

    def _record(self, encode_ms: float, answer_ms: float) -> None:
        s = self.stats
        s.iterations += 1
        s.frames_read, s.dropped = self.source.frames_read, self.source.dropped
        s.rss_mb = _mb(rss_bytes())
        if s.rss_mb is not None:
            s.rss_peak_mb = max(s.rss_peak_mb or 0.0, s.rss_mb)
        s.history.append(IterationStats(s.iterations, s.frames_read, s.dropped, s.keyframes, round(encode_ms, 3),
                                        round(answer_ms, 3), s.rss_mb, self.scene_id))

    def _finish(self) -> None:
        """End of stream (or lost, /quit, max_iterations): a scene if there is none, the questions still queued."""
        if self.scene is None and len(self.window):
            self._encode()
        self._take_questions()
        self._answer_pending()

    def _write_outputs(self, reason: str, error: VidLLMError | None) -> dict[str, Path]:
        if self.scene is None:
            self.log("loop: no scene was encoded (no frames); only answers.jsonl is written")
            return {"answers.jsonl": self.out_dir / "answers.jsonl"}
        from vidllm_edge.runtime.artifacts import write_run_outputs

        meta = {"source": self.source.describe(), "model": self.model_name, "backend": self.pipeline.backend,
                "loop": {"run": self.run_id, "exit": reason, "error": str(error) if error else None,
                         "scene_id": self.scene_id, "answers_log": "answers.jsonl",
                         "answers_scene_ids": [sid for sid, _ in self._recent],
                         "source_warnings": list(self.source.warnings), "stats": self.stats.summary()}}
        written = write_run_outputs(self.out_dir, self.scene, [a for _, a in self._recent], meta)
        written["answers.jsonl"] = self.out_dir / "answers.jsonl"
        return written

    @contextlib.contextmanager
    def _sigint_stops(self):
        """First Ctrl-C: `stop` (finish cleanly); second: KeyboardInterrupt. Only from the main thread."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop.is_set():
                raise KeyboardInterrupt
            self.log("\ninterrupt: finishing the current answer and writing outputs (Ctrl-C again to abort)")
            self.stop()

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 2)
