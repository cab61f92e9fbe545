"""`vidllm-edge` command line: a thin layer over typed functions (defaults live in those functions).

Exit codes: 0 success; 2 bad input (a clear ``subject | problem`` message and a Note on stderr);
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from vidllm_edge.errors import VidLLMError

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 2, 130


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from vidllm_edge.models.config import PRESETS

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="build a model with seeded random weights")
    src.add_argument("--checkpoint", type=Path, help="a folder written by save_pretrained")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights with --preset (default 0)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    from vidllm_edge.models.llm import GenerationConfig

    d = GenerationConfig()
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=d.top_p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidllm-edge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="video -> metric geometry, point cloud and answers")
    run.add_argument("--video", required=True, type=Path, help="a video file or a folder of frames")
    run.add_argument("--question", action="append", default=[], help="repeat for several questions")
    _add_model_args(run)
    run.add_argument("--out", required=True, type=Path, help="output folder")
    run.add_argument("--frames", type=int, default=None, help="frames to sample (default: the preset's)")
    run.add_argument("--backend", default="torch", choices=["torch"], help="inference backend")
    _add_generation_args(run)

    demo = sub.add_parser("demo", help="render a synthetic room video and run the tiny model on it (CPU)")
    demo.add_argument("--out", type=Path, default=Path("vidllm-edge-demo"), help="output folder")
    demo.add_argument("--frames", type=int, default=None)

    doctor = sub.add_parser("doctor", help="what is installed and which backends work")
    doctor.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _load_model(args):
    from vidllm_edge.models.model import build_model, from_pretrained

    if args.checkpoint is not None:
        return from_pretrained(args.checkpoint), str(args.checkpoint)
    return build_model(args.preset, seed=args.seed), f"preset:{args.preset} (random weights, seed {args.seed})"


def run_video(video: Path, questions: Sequence[str], model, model_name: str, out: Path, frames: int | None,
              generation, stream=None, log=None) -> dict[str, Path]:
    """Encode ``video``, answer ``questions`` (streaming text to ``stream``), write the artifacts to ``out``."""
    stream, log = stream or sys.stdout, log or sys.stderr
    from vidllm_edge import atomic
    from vidllm_edge.runtime.artifacts import write_run_outputs
    from vidllm_edge.runtime.pipeline import Pipeline

    atomic.ensure_dir(out)  # fail before any compute if the folder cannot be written
    pipeline = Pipeline(model, num_frames=frames, generation=generation)
    print(f"encoding {video} ...", file=log, flush=True)
    scene = pipeline.encode(video)
    for warning in scene.frames.warnings:
        print(f"warning: {warning}", file=log, flush=True)
    stages = ", ".join(f"{k} {v:.0f} ms" for k, v in scene.timings.items())
    print(f"scene: {scene.num_frames} frames {tuple(scene.images.shape[-2:])}, scale {scene.geometry.scale:.4g} m/unit,"
          f" {scene.visual_tokens.shape[0]} visual tokens; {stages}", file=log, flush=True)
    answers = []
    for question in questions:
        print(f"Q: {question}\nA: ", end="", file=stream, flush=True)
        answer = scene.ask(question, on_text=lambda t: print(t, end="", file=stream, flush=True))
        print(f"\n   ({answer.timings['new_tokens']:.0f} tokens, first after {answer.timings['ttft_ms']:.0f} ms,"
              f" {len(answer.boxes)} box(es))", file=stream, flush=True)
        answers.append(answer)
    meta = {"video": str(video), "model": model_name, "backend": pipeline.backend}
    return write_run_outputs(out, scene, answers, meta)


def cmd_run(args) -> int:
    from vidllm_edge.models.llm import GenerationConfig

    if not args.question:
        print("note: no --question given; writing geometry only.", file=sys.stderr)
    model, name = _load_model(args)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed)
    written = run_video(args.video, args.question, model, name, args.out, args.frames, gen)
    _print_written(written)
    return EXIT_OK


def cmd_demo(args) -> int:
    from vidllm_edge.models.llm import GenerationConfig
    from vidllm_edge.models.model import build_model
    from vidllm_edge.synthetic import write_scene

    start = time.perf_counter()
    out = args.out
    print("rendering the synthetic room video ...", file=sys.stderr, flush=True)
    video, truth = write_scene(out)
    model = build_model("tiny", seed=0)
    print("\nThe tiny model has RANDOM weights: its text, depth and boxes are meaningless. The demo shows the\n"
          "machinery (sampling, geometry, metric scale, 3D pooling, prompting, streaming, artifacts) end to end.\n",
          file=sys.stderr, flush=True)
    questions = ["What is in the room?", "Where is the red box? <loc>"]
    written = run_video(video, questions, model, "preset:tiny (random weights, seed 0)", out / "run", args.frames,
                        GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.95))
    print(f"\nvideo:        {video}\nground truth: {truth}")
    _print_written(written)
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def _print_written(written: dict[str, Path]) -> None:
    for name, path in written.items():
        print(f"{name + ':':13} {path}")


def cmd_doctor(args) -> int:
    from vidllm_edge.runtime.doctor import collect, render

    report = collect()
    if args.json:
        import json

        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return EXIT_OK


COMMANDS = {"run": cmd_run, "demo": cmd_demo, "doctor": cmd_doctor}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except VidLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
