"""The embedded loop on a synthetic video: encodes, re-encodes, answers, ends cleanly, stays flat in memory.

Tiny model with random weights (the text is meaningless; the machinery is what is tested). A fake clock
(one tick per iteration) makes re-encode timing deterministic. Every test runs under a SIGALRM deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading

import numpy as np
import pytest

from vidllm_edge.errors import InputError
from vidllm_edge.runtime.loop import (FileFeed, InferenceLoop, InteractiveFeed, ListFeed, MergedFeed, QuestionFeed,
                                      RollingWindow, rss_bytes)
from vidllm_edge.runtime.sources import FileSource

TEST_DEADLINE_S = 60
MEMORY_GROWTH_BOUND_MB = 30.0


@pytest.fixture(scope="module")
def pipeline():
    from vidllm_edge.models.llm import GenerationConfig
    from vidllm_edge.models.model import build_model
    from vidllm_edge.runtime.pipeline import Pipeline

    return Pipeline(build_model("tiny", seed=0), generation=GenerationConfig(max_new_tokens=3))


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from vidllm_edge.synthetic import write_scene

    return write_scene(tmp_path_factory.mktemp("loop"), num_frames=24, width=96, height=72, fps=12)[0]


class Ticker:
    """A fake clock: each call is ``step`` seconds after the previous (the loop calls it once per iteration)."""

    def __init__(self, step: float = 1.0, on_tick=None) -> None:
        self.step, self.calls, self.on_tick = step, 0, on_tick

    def __call__(self) -> float:
        self.calls += 1
        if self.on_tick is not None:
            self.on_tick(self.calls)
        return self.calls * self.step


def _lines(out):
    return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


def _artifacts_written(out):
    report = json.loads((out / "answers.json").read_text())
    assert (out / "geometry.npz").is_file() and (out / "points.ply").is_file() and (out / "depth").is_dir()
    return report


# ---------------------------------------------------------------------------------------------------
# Window and feeds (no model)


def test_window_keeps_the_last_keyframes_in_one_preallocated_buffer():
    window = RollingWindow(3)
    for i in range(7):
        assert window.push(i * 0.1, np.full((4, 5, 3), i, np.uint8), index=10 + i)
        if i == 0:
            buffer = window._rgb
    assert window._rgb is buffer and buffer.shape == (3, 4, 5, 3)  # allocated once
    snap = window.snapshot("cam", fps=10.0)
    assert snap.indices == [14, 15, 16] and snap.total == 7 and snap.fps == 10.0 and snap.source == "cam"
    assert [int(f[0, 0, 0]) for f in snap.rgb] == [4, 5, 6]
    window.push(0.8, np.full((4, 5, 3), 9, np.uint8))
    assert [int(f[0, 0, 0]) for f in snap.rgb] == [4, 5, 6]  # a snapshot is a copy


def test_window_keyframe_interval_and_motion():
    timed = RollingWindow(4, keyframe_interval_s=0.5)
    kept = [timed.push(t, np.zeros((4, 4, 3), np.uint8)) for t in (0.0, 0.2, 0.5, 0.6, 1.1)]
    assert kept == [True, False, True, False, True] and timed.version == 3
    moving = RollingWindow(4, min_motion=10.0)
    still, bright = np.zeros((48, 64, 3), np.uint8), np.full((48, 64, 3), 200, np.uint8)
    assert [moving.push(i, f) for i, f in enumerate([still, still, bright, bright, still])] == \
        [True, False, True, False, True]


def test_window_restarts_when_the_frame_size_changes():
    window = RollingWindow(2)
    window.push(0, np.zeros((4, 4, 3), np.uint8))
    window.push(1, np.zeros((6, 4, 3), np.uint8))
    assert len(window) == 1 and "frame size changed from 4x4 to 4x6" in window.snapshot().warnings[0]
    with pytest.raises(InputError, match=r"^Window: 0 frames \| is less than 1\."):
        RollingWindow(0)


def test_file_feed_reads_complete_lines_as_they_are_appended(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("What is here?\n# a comment\n\nHow far is the door?")
    feed = FileFeed(path)
    assert feed.poll() == ["What is here?", "How far is the door?"]
    assert feed.poll() == []
    with open(path, "a") as fh:
        fh.write("\nWhere is the red box?\nhalf a lin")
    assert feed.poll() == ["Where is the red box?"]
    with open(path, "a") as fh:
        fh.write("e\n")
    assert feed.poll() == ["half a line"]
    with pytest.raises(InputError, match=r"^Questions file: .*missing\.txt \| does not exist"):
        FileFeed(tmp_path / "missing.txt")


def test_interactive_feed_reads_lines_in_a_thread_until_quit():
    import io

    prompts = io.StringIO()
    feed = InteractiveFeed(stdin=io.StringIO("What is here?\n\n/encode\n/quit\nnever read\n"), prompt_to=prompts)
    feed._thread.join(5)
    assert not feed._thread.is_alive() and feed.quit_requested
    assert feed.poll() == ["What is here?", "/encode"] and feed.poll() == []
    assert "/quit ends" in prompts.getvalue()
    eof = InteractiveFeed(stdin=io.StringIO(""), prompt_to=io.StringIO())  # Ctrl-D
    eof._thread.join(5)
    assert eof.quit_requested


def test_list_feed_asks_once_or_after_every_scene():
    once, standing = ListFeed(["a", " ", "b"]), ListFeed(["a"], repeat=True)
    assert once.poll() == ["a", "b"] and once.poll() == []
    once.scene_changed()
    assert once.poll() == []
    assert standing.poll() == []
    for _ in range(2):
        standing.scene_changed()
        assert standing.poll() == ["a"] and standing.poll() == []


# ---------------------------------------------------------------------------------------------------
# The loop


def test_loop_encodes_reencodes_and_answers_from_a_list_and_a_file(pipeline, video, tmp_path):
    qfile = tmp_path / "questions.txt"
    qfile.write_text("How big is the room?\nWhere is the red box? <loc>\n")
    streamed, asked = [], []
    loop = InferenceLoop(pipeline, FileSource(video, pace=False), RollingWindow(4), reencode_every_s=5.0,
                         questions=MergedFeed([ListFeed(["What is in the room?"]), FileFeed(qfile)]),
                         out_dir=tmp_path / "out", on_text=streamed.append, clock=Ticker(1.0),
                         on_question=lambda q, sid: asked.append((q, sid)), log=lambda line: None)
    result = loop.run()
    out = tmp_path / "out"
    assert result.reason == "end_of_stream" and result.error is None
    # first scene when the window is full (iteration 4), then every 5 ticks with new keyframes: 9, 14, 19, 24
    assert result.scenes == 5 and loop.stats.encodes == 5 and loop.stats.iterations == 24
    assert [sid for _, sid in asked] == [1, 1, 1]
    records = _lines(out)
    assert [r["question"] for r in records] == ["What is in the room?", "How big is the room?",
                                                "Where is the red box? <loc>"]
    assert all(r["scene_id"] == 1 and r["scene_frames"] == [0, 1, 2, 3] and r["run"] == loop.run_id for r in records)
    assert "".join(streamed) == "".join(r["text"] for r in records)
    report = _artifacts_written(out)
    assert report["loop"]["exit"] == "end_of_stream" and report["loop"]["scene_id"] == 5
    assert report["frames"]["indices"] == [20, 21, 22, 23] and report["frames"]["total"] == 24
    assert [a["question"] for a in report["answers"]] == [r["question"] for r in records]
    assert result.written["answers.jsonl"] == out / "answers.jsonl"


def test_encode_on_demand_from_the_feed_and_from_another_thread(pipeline, video, tmp_path):
    holder = {}

    def on_tick(n):
        if n == 10:
            threading.Thread(target=holder["loop"].request_encode).start()

    scenes = []
    loop = InferenceLoop(pipeline, FileSource(video, pace=False), RollingWindow(4), reencode_every_s=1e9,
                         questions=ListFeed(["/encode", "What is here?"]), out_dir=tmp_path,
                         clock=Ticker(1.0, on_tick), log=scenes.append)
    holder["loop"] = loop
    result = loop.run()
    assert result.scenes == 2, scenes
    scene_lines = [line for line in scenes if line.startswith("scene ")]
    assert "1 keyframes (frames 0..0)" in scene_lines[0]  # /encode came with the first frame
    # the request from the thread lands at the next iteration with the clock: frames 7..10 or 8..11
    assert "4 keyframes" in scene_lines[1]
    assert [r["scene_id"] for r in _lines(tmp_path)] == [1]


def test_end_of_stream_before_a_full_window_encodes_what_is_left(pipeline, video, tmp_path):
    loop = InferenceLoop(pipeline, FileSource(video, pace=False), RollingWindow(64), reencode_every_s=1e9,
                         questions=ListFeed(["What is here?"]), out_dir=tmp_path, clock=Ticker(), log=lambda s: None)
    result = loop.run()
    assert result.reason == "end_of_stream" and result.scenes == 1
    records = _lines(tmp_path)
    assert len(records) == 1 and records[0]["scene_frames"] == list(range(24))
    assert _artifacts_written(tmp_path)["frames"]["count"] == 24


def test_answers_log_appends_across_runs_and_repairs_a_torn_line(pipeline, video, tmp_path):
    (tmp_path / "answers.jsonl").write_text('{"question": "from a run that lost power", "te')
    for _ in range(2):
        InferenceLoop(pipeline, FileSource(video, pace=False), RollingWindow(4), questions=ListFeed(["Q?"]),
                      out_dir=tmp_path, clock=Ticker(), log=lambda s: None).run(max_iterations=5)
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 3 and lines[0].endswith('"te')
    first, second = json.loads(lines[1]), json.loads(lines[2])
    assert first["question"] == second["question"] == "Q?" and first["run"] != second["run"]


def _run_until_signalled(loop, trigger_after_answers, send):
    """Run ``loop`` on this (main) thread; ``send()`` from another thread once an answer was logged."""
    answered = threading.Event()
    loop.on_answer = lambda record: answered.set()

    def trigger():
        if answered.wait(30):
            send()

    thread = threading.Thread(target=trigger, daemon=True)
    thread.start()
    result = loop.run()
    thread.join(5)
    return result


@pytest.mark.parametrize("how", ["sigint", "stop"])
def test_ctrl_c_or_stop_ends_a_live_run_cleanly_with_outputs_flushed(pipeline, video, tmp_path, how):
    source = FileSource(video, pace=True, loop=True)  # a camera-like endless source
    loop = InferenceLoop(pipeline, source, RollingWindow(4), reencode_every_s=0.5,
                         questions=ListFeed(["What is here?"], repeat=True), out_dir=tmp_path, log=lambda s: None)
    send = (lambda: os.kill(os.getpid(), signal.SIGINT)) if how == "sigint" else loop.stop
    before = signal.getsignal(signal.SIGINT)
    result = _run_until_signalled(loop, 1, send)
    assert result.reason == "interrupted" and result.error is None
    assert signal.getsignal(signal.SIGINT) is before  # the loop's handler is gone again
    assert source._cap is None  # closed
    records = _lines(tmp_path)
    assert len(records) >= 1 and all(r["text"] is not None for r in records)
    assert _artifacts_written(tmp_path)["loop"]["exit"] == "interrupted"


def test_ctrl_c_during_an_answer_lets_that_answer_finish(pipeline, video, tmp_path):
    pieces = []

    def on_text(piece):
        if not pieces:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the first answer streams
        pieces.append(piece)

    loop = InferenceLoop(pipeline, FileSource(video, pace=False, loop=True), RollingWindow(4),
                         questions=ListFeed(["First?", "Second?"]), out_dir=tmp_path, on_text=on_text,
                         clock=Ticker(), log=lambda s: None)
    result = loop.run()
    assert result.reason == "interrupted"
    records = _lines(tmp_path)
    assert [r["question"] for r in records] == ["First?"]  # finished; the second never started
    assert len(pieces) == len(records[0]["token_ids"]) == 3


def test_quit_from_a_feed_ends_the_run(pipeline, video, tmp_path):
    class Quitter(QuestionFeed):
        def __init__(self):
            self.n = 0

        def poll(self):
            self.n += 1
            return ["What?", "/quit"] if self.n == 6 else []

    result = InferenceLoop(pipeline, FileSource(video, pace=False, loop=True), RollingWindow(4), questions=Quitter(),
                           out_dir=tmp_path, clock=Ticker(), log=lambda s: None).run()
    assert result.reason == "quit" and result.answers == 1 and result.stats.iterations <= 6  # an endless source


def test_host_memory_stays_flat_over_200_iterations(pipeline, video, tmp_path):
    rss_before = rss_bytes() / 2**20
    # a scene every 10 iterations, a standing question answered against each (bounded test time on 2 shared cores;
    # benchmarks/loop_memory.py re-encodes every 5)
    loop = InferenceLoop(pipeline, FileSource(video, pace=False, loop=True), RollingWindow(4), reencode_every_s=10.0,
                         questions=ListFeed(["What is here?"], repeat=True), out_dir=tmp_path, clock=Ticker(1.0),
                         log=lambda s: None)
    result = loop.run(max_iterations=200)
    history = list(loop.stats.history)
    after_20, after_200 = history[19].rss_mb, history[199].rss_mb
    print(f"\nRSS MB: before {rss_before:.1f}, after 20 iterations {after_20:.1f}, after 200 {after_200:.1f} "
          f"(growth 20->200: {after_200 - after_20:+.1f} MB; {result.scenes} scenes, {result.answers} answers)")
    assert result.reason == "max_iterations" and result.scenes == 20 and result.answers == 20
    assert after_200 - after_20 < MEMORY_GROWTH_BOUND_MB


# ---------------------------------------------------------------------------------------------------
# CLI glue


def _loop_parser():
    from vidllm_edge.runtime.loop_cli import add_loop_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--question", action="append", default=[])
    parser.add_argument("--out")
    add_loop_args(parser)
    return parser


def test_loop_options_are_wired_into_run_without_clashes():
    from vidllm_edge.runtime.cli import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]  # argparse raises on a clash
    existing = [s for a in run._actions for s in a.option_strings]
    ours = {s for a in _loop_parser()._actions for s in a.option_strings} - {"-h", "--help", "--question", "--out"}
    assert ours <= set(existing) and len(existing) == len(set(existing))


def test_cmd_run_loop_exit_codes(pipeline, video, tmp_path, capsys):
    from vidllm_edge.runtime.loop_cli import cmd_run_loop

    args = _loop_parser().parse_args(["--source", str(video), "--out", str(tmp_path / "ok"), "--no-pace",
                                      "--window", "4", "--question", "What is here?"])
    assert cmd_run_loop(args, pipeline, model_name="preset:tiny") == 0
    out = capsys.readouterr().out
    assert "Q [scene 1]: What is here?" in out and "answers.jsonl:" in out
    assert json.loads((tmp_path / "ok" / "answers.json").read_text())["model"] == "preset:tiny"
    bad = _loop_parser().parse_args(["--source", str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "bad")])
    assert cmd_run_loop(bad, pipeline) == 2
    assert "error: Video: " in capsys.readouterr().err
