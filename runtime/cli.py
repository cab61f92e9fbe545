"""`vidllm-edge` command line: a thin layer over typed functions (defaults live in those functions).

Exit codes: 0 success; 2 bad input (a clear ``subject | problem`` message and a Note on stderr);
3 stream lost (``run --source``: a camera or stream gave no frame after its reconnects); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from vidllm_edge.errors import VidLLMError

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 2, 130


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    from vidllm_edge.models.config import PRESETS

    src = p.add_mutually_exclusive_group(required=required)
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
    run.add_argument("--video", type=Path, default=None,
                     help="a video file or a folder of frames, encoded once (or --source for the live loop)")
    run.add_argument("--question", action="append", default=[], help="repeat for several questions")
    _add_model_args(run, required=False)
    run.add_argument("--out", required=True, type=Path, help="output folder")
    run.add_argument("--frames", type=int, default=None, help="frames to sample (default: the preset's)")
    run.add_argument("--decoder", default="reference", choices=["reference", "fast"],
                     help="LLM decoder for --backend torch: reference (transformers) or fast (our static-KV-cache "
                          "decoder; Triton GEMVs and CUDA graphs when the model is on a GPU, see README)")
    run.add_argument("--backend", default="torch", choices=list(BACKENDS),
                     help="torch (needs --preset/--checkpoint) or onnxruntime (needs --engines)")
    run.add_argument("--engines", type=Path, default=None,
                     help="onnxruntime: an export folder (vidllm-edge export); tensorrt: an engines folder (build)")
    run.add_argument("--int8", action="store_true",
                     help="onnxruntime: run the INT8 Q/DQ graphs vidllm-edge quantize kept (the other units as exported)")
    run.add_argument("--providers", default=None,
                     help="ONNX Runtime providers, comma-separated (default CPUExecutionProvider)")
    _add_generation_args(run)
    from vidllm_edge.runtime.loop_cli import add_loop_args

    add_loop_args(run)

    export = sub.add_parser("export", help="export every unit to ONNX, validated against the reference and linted")
    _add_model_args(export)
    export.add_argument("--out", required=True, type=Path, help="export folder")
    export.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    export.add_argument("--frames", default=None, help="MIN:OPT:MAX frame counts (default 1:8:<preset frames>)")
    export.add_argument("--image-hw", default=None, help="HxW of the preprocessed frames (default: a 4:3 video's)")
    export.add_argument("--opset", type=int, default=18, choices=[18, 23],
                        help="18: TensorRT-portable (default); 23: ONNX Attention op, fused on ONNX Runtime CUDA")
    export.add_argument("--units", default=None, help="comma-separated subset of units (default: all)")
    export.add_argument("--allow-unsupported", action="store_true",
                        help="keep graphs with operators TensorRT 10 cannot parse")
    export.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime parity check")

    demo = sub.add_parser("demo", help="render a synthetic room video and run the tiny model on it (CPU)")
    demo.add_argument("--out", type=Path, default=Path("vidllm-edge-demo"), help="output folder")
    demo.add_argument("--frames", type=int, default=None)

    from vidllm_edge.calibration.cli import add_calibrate_parser, add_quantize_parser
    from vidllm_edge.engines.cli import add_build_parser

    add_calibrate_parser(sub)
    add_quantize_parser(sub)
    add_build_parser(sub)
    from vidllm_edge.models.quant_cli import add_quantize_llm_parser

    add_quantize_llm_parser(sub)
    from vidllm_edge.benchmarks.bench_cli import add_bench_parser

    add_bench_parser(sub)

    doctor = sub.add_parser("doctor", help="what is installed and which backends work")
    doctor.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _load_model(args):
    from vidllm_edge.models.model import build_model, from_pretrained

    if args.checkpoint is not None:
        return from_pretrained(args.checkpoint), str(args.checkpoint)
    return build_model(args.preset, seed=args.seed), f"preset:{args.preset} (random weights, seed {args.seed})"


BACKENDS = ("torch", "onnxruntime", "tensorrt")


def run_video(video: Path, questions: Sequence[str], pipeline, model_name: str, out: Path,
              stream=None, log=None) -> dict[str, Path]:
    """Encode ``video`` with ``pipeline``, answer ``questions`` (streaming to ``stream``), write artifacts to ``out``."""
    stream, log = stream or sys.stdout, log or sys.stderr
    from vidllm_edge import atomic
    from vidllm_edge.runtime.artifacts import write_run_outputs

    atomic.ensure_dir(out)  # fail before any compute if the folder cannot be written
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
    from vidllm_edge.errors import InputError
    from vidllm_edge.models.llm import GenerationConfig
    from vidllm_edge.runtime.pipeline import Pipeline

    if (args.video is None) == (args.source is None):
        raise InputError("Arguments: --video / --source", "give exactly one of them.",
                         "--video FILE|FOLDER encodes once; --source FILE|FOLDER|CAMERA|URL runs the live loop.")
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed)
    if args.int8 and args.backend != "onnxruntime":
        raise InputError("Arguments: --int8", f"applies to --backend onnxruntime; --backend {args.backend} has no INT8 "
                         "graphs to choose (torch runs the reference, TensorRT the precision its engines were built with).",
                         "Drop --int8, or export, quantize and run --backend onnxruntime --engines DIR --int8.")
    if args.backend == "torch":
        if args.engines is not None or (args.preset is None and args.checkpoint is None):
            raise InputError("Arguments: --backend torch", "needs --preset or --checkpoint (and no --engines).",
                             "Add --preset tiny, or run an export folder with --backend onnxruntime --engines DIR.")
        model, name = _load_model(args)
        pipeline = Pipeline(model, num_frames=args.frames, generation=gen, decoder=args.decoder)
    else:
        if args.decoder != "reference":
            raise InputError(f"Arguments: --decoder {args.decoder}", f"applies to --backend torch; --backend "
                             f"{args.backend} decodes with the LLM graphs of its engine folder.",
                             "Drop --decoder, or run --backend torch --preset/--checkpoint --decoder fast.")
        if args.engines is None or args.preset is not None or args.checkpoint is not None:
            raise InputError(f"Arguments: --backend {args.backend}", "needs --engines DIR (and no --preset/--checkpoint).",
                             "Export first: vidllm-edge export --preset tiny --out DIR; then --engines DIR.")
        providers = args.providers.split(",") if args.providers else None
        if args.backend == "onnxruntime":
            pipeline = Pipeline.from_export(args.engines, providers=providers, num_frames=args.frames, generation=gen,
                                            int8=args.int8)
        else:
            from vidllm_edge.runtime.trt_backend import load_engines

            bundle = load_engines(args.engines, providers=providers)
            pipeline = Pipeline(None, backend="tensorrt", num_frames=args.frames, generation=gen, cfg=bundle.cfg,
                                units_for=bundle.units_for, decoder_factory=bundle.decoder_factory,
                                image_hw=bundle.image_hw)
        name = f"{args.backend}{' (INT8 Q/DQ graphs)' if args.int8 else ''}:{args.engines}"
    if args.source is not None:
        from vidllm_edge.runtime.loop_cli import cmd_run_loop

        return cmd_run_loop(args, pipeline, model_name=name)
    if not args.question:
        print("note: no --question given; writing geometry only.", file=sys.stderr)
    written = run_video(args.video, args.question, pipeline, name, args.out)
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
    from vidllm_edge.runtime.pipeline import Pipeline

    model = build_model("tiny", seed=0)
    print("\nThe tiny model has RANDOM weights: its text, depth and boxes are meaningless. The demo shows the\n"
          "machinery (sampling, geometry, metric scale, 3D pooling, prompting, streaming, artifacts) end to end.\n",
          file=sys.stderr, flush=True)
    questions = ["What is in the room?", "Where is the red box? <loc>"]
    pipeline = Pipeline(model, num_frames=args.frames,
                        generation=GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.95))
    written = run_video(video, questions, pipeline, "preset:tiny (random weights, seed 0)", out / "run")
    print(f"\nvideo:        {video}\nground truth: {truth}")
    _print_written(written)
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def _print_written(written: dict[str, Path]) -> None:
    for name, path in written.items():
        print(f"{name + ':':13} {path}")


def cmd_export(args) -> int:
    from vidllm_edge.calibration.record import state_fingerprint
    from vidllm_edge.export.exporter import ALL_UNITS, FrameProfile, export_model, parse_hw

    frames = FrameProfile.parse(args.frames) if args.frames else None
    image_hw = parse_hw(args.image_hw) if args.image_hw else None
    units = tuple(u.strip() for u in args.units.split(",")) if args.units else ALL_UNITS
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        from vidllm_edge.errors import CheckpointError

        raise CheckpointError(f"Checkpoint folder: {args.checkpoint}", "does not exist or is not a folder.",
                              "Pass a folder written by save_pretrained, or --preset NAME.")
    from vidllm_edge import atomic

    atomic.ensure_dir(args.out, "Export folder")  # before the model is built
    model, name = _load_model(args)
    start = time.perf_counter()
    manifest = export_model(model, args.out, precision=args.precision, frames=frames, units=units, image_hw=image_hw,
                            allow_unsupported=args.allow_unsupported, validate=not args.no_validate,
                            source={"model": name, "state_sha256": state_fingerprint(model)}, opset=args.opset)
    print(f"exported {len(manifest['units'])} unit(s) to {args.out} in {time.perf_counter() - start:.1f} s "
          f"(manifest: {args.out / 'manifest.json'})")
    return EXIT_OK


def cmd_doctor(args) -> int:
    from vidllm_edge.runtime.doctor import collect, render

    report = collect()
    if args.json:
        import json

        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return EXIT_OK


def cmd_build(args) -> int:
    from vidllm_edge.engines.cli import cmd_build as build

    return build(args)


def cmd_quantize_llm(args) -> int:
    from vidllm_edge.models.quant_cli import cmd_quantize_llm as quantize_llm

    return quantize_llm(args)


def cmd_calibrate(args) -> int:
    from vidllm_edge.calibration.cli import cmd_calibrate as calibrate

    return calibrate(args)


def cmd_quantize(args) -> int:
    from vidllm_edge.calibration.cli import cmd_quantize as quantize

    return quantize(args)


def cmd_bench(args) -> int:
    from vidllm_edge.benchmarks.bench_cli import cmd_bench as bench

    return bench(args)


COMMANDS = {"run": cmd_run, "demo": cmd_demo, "export": cmd_export, "calibrate": cmd_calibrate,
            "quantize": cmd_quantize, "quantize-llm": cmd_quantize_llm, "build": cmd_build, "doctor": cmd_doctor,
            "bench": cmd_bench}


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
