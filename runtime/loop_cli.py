"""``vidllm-edge run --source ...``: the embedded loop (runtime/loop.py) behind the `run` command.

`add_loop_args` adds the loop's options to the `run` parser; `cmd_run_loop` runs it with a built
pipeline. Defaults come from the typed modules (sources.py, loop.py), never restated here.

Exit codes: 0 clean end (end of a file or folder, ``/quit``, ``--max-iterations``); 2 bad input (a
``subject | problem`` message and a Note); 3 stream lost (a camera or stream gave no frame after
``--max-retries`` reconnects; outputs are still written); 130 interrupted (Ctrl-C; outputs written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vidllm_edge.errors import VidLLMError

EXIT_STREAM_LOST = 3


def add_loop_args(run: argparse.ArgumentParser) -> None:
    """Add the loop options to the ``run`` sub-parser (``--question``, ``--out``, model args are the parser's own)."""
    from vidllm_edge.runtime import loop, sources

    g = run.add_argument_group("live loop (--source)")
    g.add_argument("--source", default=None,
                   help="a video file, a folder of frames, a camera index (0) or a stream URL "
                        "(rtsp://, rtsps://, http(s)://): frames are read continuously and the scene re-encoded")
    g.add_argument("--window", type=int, default=None, metavar="N",
                   help="keyframes per scene (default: --frames, else the preset's frame count)")
    g.add_argument("--reencode-every", type=float, default=loop.DEFAULT_REENCODE_S, metavar="S",
                   help=f"seconds between scene encodes (default {loop.DEFAULT_REENCODE_S:g}; 0: every new keyframe)")
    g.add_argument("--keyframe-every", type=float, default=None, metavar="S",
                   help="keep a frame only S seconds after the last keyframe (default: every frame)")
    g.add_argument("--min-motion", type=float, default=None, metavar="M",
                   help="or when its mean grey-level change to the last keyframe is at least M (0..255)")
    g.add_argument("--questions-file", type=Path, default=None, metavar="F",
                   help="one question per line; lines appended while running are asked too")
    g.add_argument("--interactive", action="store_true",
                   help=f"type questions at a prompt ({loop.ENCODE_COMMAND} re-encodes now, {loop.QUIT_COMMAND} ends)")
    g.add_argument("--ask-every-scene", action="store_true",
                   help="ask the --question questions again against every new scene (standing questions)")
    g.add_argument("--stall-timeout", type=float, default=sources.DEFAULT_STALL_TIMEOUT_S, metavar="S",
                   help="camera/stream: reconnect after S seconds without a frame (default %(default)g)")
    g.add_argument("--max-retries", type=int, default=sources.DEFAULT_MAX_RETRIES, metavar="N",
                   help="camera/stream: reconnects per outage before giving up with exit 3 (default %(default)d)")
    g.add_argument("--open-timeout", type=float, default=sources.DEFAULT_OPEN_TIMEOUT_S, metavar="S",
                   help="camera/stream: give up on one (re)connect after S seconds (default %(default)g)")
    g.add_argument("--rtsp-transport", choices=["tcp", "udp"], default="tcp",
                   help="RTSP lower transport (default tcp; udp for cameras that only offer it)")
    g.add_argument("--no-pace", action="store_true",
                   help="files and folders: read frames as fast as they decode, not at the video's frame rate")
    g.add_argument("--max-iterations", type=int, default=None, metavar="N",
                   help="stop after N frames (tests, soak runs)")


def build_feed(questions: list[str], questions_file: Path | None = None, interactive: bool = False,
               repeat: bool = False):
    """One `QuestionFeed` over the CLI's question options."""
    from vidllm_edge.runtime.loop import FileFeed, InteractiveFeed, ListFeed, MergedFeed

    feeds = [ListFeed(questions, repeat=repeat)]
    if questions_file is not None:
        feeds.append(FileFeed(questions_file))
    if interactive:
        feeds.append(InteractiveFeed())
    return MergedFeed(feeds)


def cmd_run_loop(args, pipeline, model_name: str = "", stream=None, log=None) -> int:
    """Run the loop for ``run --source``; returns the exit code (module docstring)."""
    from vidllm_edge.runtime.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK
    from vidllm_edge.runtime.loop import InferenceLoop, RollingWindow
    from vidllm_edge.runtime.sources import open_source

    stream, log = stream or sys.stdout, log or sys.stderr

    def say(line: str) -> None:
        print(line, file=log, flush=True)

    try:
        source = open_source(args.source, pace=not args.no_pace, stall_timeout_s=args.stall_timeout,
                             max_retries=args.max_retries, open_timeout_s=args.open_timeout,
                             rtsp_transport=args.rtsp_transport, log=say)
        window = RollingWindow(args.window or pipeline.num_frames, args.keyframe_every, args.min_motion)
        feed = build_feed(args.question, args.questions_file, args.interactive, repeat=args.ask_every_scene)
        if not (args.question or args.questions_file or args.interactive):
            say("note: no questions (--question, --questions-file, --interactive): scenes and geometry only.")
        if source.live and not args.interactive and args.max_iterations is None:
            say("note: a live source runs until Ctrl-C; outputs are written then.")

        def on_question(question: str, scene_id: int) -> None:
            print(f"Q [scene {scene_id}]: {question}\nA: ", end="", file=stream, flush=True)

        def on_answer(record: dict[str, Any]) -> None:
            t = record["timings"]
            print(f"\n   ({t['new_tokens']:.0f} tokens, first after {t['ttft_ms']:.0f} ms, "
                  f"{len(record['boxes'])} box(es))", file=stream, flush=True)

        loop = InferenceLoop(pipeline, source, window, reencode_every_s=args.reencode_every, questions=feed,
                             out_dir=args.out, on_text=lambda t: print(t, end="", file=stream, flush=True),
                             on_question=on_question, on_answer=on_answer, log=say, model_name=model_name)
        result = loop.run(max_iterations=args.max_iterations)
    except VidLLMError as exc:
        say(f"error: {exc}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # a second Ctrl-C: answers.jsonl holds every finished answer
        say("interrupted")
        return EXIT_INTERRUPTED
    for name, path in result.written.items():
        print(f"{name + ':':13} {path}", file=stream)
    if result.reason == "stream_lost":
        return EXIT_STREAM_LOST
    return EXIT_INTERRUPTED if result.reason == "interrupted" else EXIT_OK
