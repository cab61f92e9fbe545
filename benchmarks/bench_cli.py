"""`vidllm-edge bench`: a thin layer over `suite.run_bench` (its defaults live in `suite.BenchOptions`).

Exit codes: 0 every measured row met its parity gate; 1 the report is complete but a row FAILED its gate
(the FAIL rows are in report.md); 2 bad input (nothing is computed or written); 130 interrupted.
Registered in runtime/cli.py: ``add_bench_parser(sub)`` and ``COMMANDS["bench"] = cmd_bench``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vidllm_edge.errors import InputError

EXIT_OK, EXIT_GATE_FAILED = 0, 1


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    from vidllm_edge.benchmarks.suite import BACKENDS, PRECISIONS, BenchOptions
    from vidllm_edge.models.config import PRESETS

    d = BenchOptions()  # the defaults, quoted in the help texts
    p = subparsers.add_parser("bench", help="latency per stage and end to end, parity and roofline, per backend, "
                                            "precision and frame count")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a model with seeded random weights")
    src.add_argument("--checkpoint", type=Path, help="a folder written by save_pretrained")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights with --preset (default 0)")
    p.add_argument("--backends", default=None, help=f"comma-separated from {', '.join(BACKENDS)} "
                                                     f"(default {','.join(d.backends)})")
    p.add_argument("--precision", default=None, help=f"comma-separated from {', '.join(PRECISIONS)} "
                                                      f"(default {','.join(d.precisions)})")
    p.add_argument("--rows", default=None,
                   help="comma-separated BACKEND:PRECISION pairs to run instead of every --backends x --precision "
                        "pair, e.g. torch:fp32,torch:fp16,onnxruntime:int8")
    p.add_argument("--frames", default=None, help="comma-separated frame counts, measured in this order "
                                                  "(default: the preset's)")
    p.add_argument("--reps", type=int, default=None, help=f"timed repetitions per row (default {d.reps})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed repetitions first (default {d.warmup})")
    p.add_argument("--answer-tokens", type=int, default=None, help="tokens per answer, end of sequence ignored "
                                                                   f"(default {d.answer_tokens})")
    p.add_argument("--question", default=None, help="the question asked about every scene")
    p.add_argument("--image-hw", default=None, help="HxW of the frames (default: the export's, else a 4:3 video's)")
    p.add_argument("--video", type=Path, default=None, help="a video or frame folder (default: the synthetic room)")
    p.add_argument("--export", type=Path, default=None,
                   help="folder of export folders (DIR/fp32, DIR/fp16) or one export folder: reused when they exist "
                        "(checked against the model), filled when not (default: a temporary folder)")
    p.add_argument("--engines", type=Path, default=None, help="a TensorRT engines folder (vidllm-edge build)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--gate", default=None,
                   help="parity gate overrides, e.g. fp16:rel_l2=1e-2,int8:cosine=0.999 (keys: rel_l2, cosine, "
                        "max_abs, abs_rel, delta_1_25, rot_deg, trans_m, token_agreement)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="skip rows that would end past this many seconds since the command started, model loading "
                        "included (stated in the report)")
    p.add_argument("--opset", type=int, default=None, choices=[18, 23], help="opset of exports this run makes "
                                                                             f"(default {d.opset})")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend of torch-compiled rows and the "
                                                           f"fast decoder's step (default {d.compile_backend})")
    p.add_argument("--resume", action="store_true", help="keep the rows of an earlier run of the same measurement "
                                                         "in --out and run only the others")
    p.add_argument("--prepare-only", action="store_true",
                   help="make the exports and INT8 graphs the rows need (into --export), then stop")
    p.add_argument("--out", type=Path, default=None, help="report folder (report.json, report.md, plots/)")
    return p


def parse_names(text: str, allowed: tuple[str, ...], flag: str, what: str) -> tuple[str, ...]:
    """``"torch,onnxruntime"`` -> ("torch", "onnxruntime"); InputError naming an unknown entry."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        if name not in allowed:
            raise InputError(f"Argument: {flag} {text}", f"names an unknown {what} '{name}'.",
                             f"Choose from {', '.join(allowed)} (comma-separated).")
    if not names:
        raise InputError(f"Argument: {flag} {text!r}", f"names no {what}.", f"Choose from {', '.join(allowed)}.")
    return tuple(dict.fromkeys(names))


def parse_rows(text: str) -> tuple[tuple[str, str], ...]:
    """``"torch:fp32,onnxruntime:int8"`` -> (("torch", "fp32"), ("onnxruntime", "int8")); InputError naming a
    malformed or unknown entry."""
    from vidllm_edge.benchmarks.suite import BACKENDS, PRECISIONS

    note = (f"Write BACKEND:PRECISION pairs, comma-separated, e.g. --rows torch:fp32,onnxruntime:int8 "
            f"(backends {', '.join(BACKENDS)}; precisions {', '.join(PRECISIONS)}).")
    rows = []
    for item in (i.strip() for i in text.split(",")):
        backend, sep, precision = item.partition(":")
        if not sep or backend not in BACKENDS or precision not in PRECISIONS:
            raise InputError(f"Argument: --rows {text}", f"has the entry {item!r}, not BACKEND:PRECISION with a "
                             "known backend and precision.", note)
        rows.append((backend, precision))
    return tuple(dict.fromkeys(rows))


def parse_frames(text: str) -> tuple[int, ...]:
    """``"32,8,16"`` -> (32, 8, 16): unique, in the order given (the run order); InputError unless positive
    integers."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"Argument: --frames {text}", "is not a comma-separated list of frame counts.",
                         "Write e.g. --frames 8,16,32.") from None
    if not values or min(values) < 1:
        raise InputError(f"Argument: --frames {text}", "must be positive frame counts.", "Write e.g. --frames 8,16,32.")
    return tuple(dict.fromkeys(values))


def parse_gates(text: str) -> dict[str, dict[str, float]]:
    """``fp16:rel_l2=1e-2,int8:cosine=0.999`` -> {"fp16": {"rel_l2": 0.01}, "int8": {"cosine": 0.999}}."""
    from vidllm_edge.benchmarks.parity import GATE_KEYS
    from vidllm_edge.benchmarks.suite import PRECISIONS

    gates: dict[str, dict[str, float]] = {}
    note = (f"Write PRECISION:KEY=VALUE items, comma-separated, e.g. --gate fp16:rel_l2=1e-2,int8:cosine=0.999 "
            f"(precisions {', '.join(PRECISIONS)}; keys {', '.join(GATE_KEYS)}).")
    for item in (i.strip() for i in text.split(",") if i.strip()):
        precision, _, rest = item.partition(":")
        key, _, value = rest.partition("=")
        if precision not in PRECISIONS or key not in GATE_KEYS:
            raise InputError(f"Argument: --gate {item}", "is not PRECISION:KEY=VALUE with a known precision and key.",
                             note)
        try:
            gates.setdefault(precision, {})[key] = float(value)
        except ValueError:
            raise InputError(f"Argument: --gate {item}", f"has the value {value!r}, not a number.", note) from None
    return gates


def options_from_args(args):
    """`BenchOptions` from parsed arguments: only what the user gave overrides the defaults."""
    from vidllm_edge.benchmarks.suite import BACKENDS, PRECISIONS, BenchOptions
    from vidllm_edge.export.exporter import parse_hw

    given = {}
    if args.backends is not None:
        given["backends"] = parse_names(args.backends, BACKENDS, "--backends", "backend")
    if args.precision is not None:
        given["precisions"] = parse_names(args.precision, PRECISIONS, "--precision", "precision")
    if args.rows is not None:
        if args.backends is not None or args.precision is not None:
            raise InputError(f"Argument: --rows {args.rows}", "was given with --backends or --precision.",
                             "Give either --rows BACKEND:PRECISION,... or --backends and --precision, not both.")
        given["rows"] = parse_rows(args.rows)
        given["backends"] = tuple(dict.fromkeys(b for b, _ in given["rows"]))
        given["precisions"] = tuple(dict.fromkeys(p for _, p in given["rows"]))
    if args.frames is not None:
        given["frames"] = parse_frames(args.frames)
    if args.image_hw is not None:
        given["image_hw"] = parse_hw(args.image_hw)
    if args.gate is not None:
        given["gates"] = parse_gates(args.gate)
    for attr in ("reps", "warmup", "answer_tokens", "question", "video", "export", "engines", "device",
                 "max_seconds", "opset", "compile_backend"):
        if getattr(args, attr) is not None:
            given[attr] = getattr(args, attr)
    return BenchOptions(resume=args.resume, prepare_only=args.prepare_only, **given)


def cmd_bench(args) -> int:
    from vidllm_edge.benchmarks.report import console_table
    from vidllm_edge.benchmarks.suite import check_options, run_bench
    from vidllm_edge.errors import CheckpointError

    opts = options_from_args(args)
    check_options(opts)  # before the model is built
    if args.out is None and not args.prepare_only:
        raise InputError("Argument: --out", "is missing.", "Name a report folder: --out bench/ (or pass --prepare-only).")
    if args.prepare_only and args.export is None:
        raise InputError("Argument: --prepare-only", "needs --export DIR to keep what it makes.",
                         "Add --export DIR, then run the benchmark with the same --export DIR.")
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        raise CheckpointError(f"Checkpoint folder: {args.checkpoint}", "does not exist or is not a folder.",
                              "Pass a folder written by save_pretrained, or --preset NAME.")
    if args.video is not None and not args.video.exists():
        from vidllm_edge.errors import VideoError

        raise VideoError(f"Video: {args.video}", "does not exist.", "Pass a video file or a folder of frames.")
    from vidllm_edge.runtime.cli import _load_model

    start = time.perf_counter()
    model, name = _load_model(args)
    report = run_bench(model, name, opts, args.out, started=start)  # --max-seconds counts model loading too
    if opts.prepare_only:
        return EXIT_OK
    print(console_table(report))
    print(f"report: {args.out / 'report.json'}, {args.out / 'report.md'} ({time.perf_counter() - start:.0f} s)",
          file=sys.stderr)
    return EXIT_GATE_FAILED if report["summary"]["gate_failures"] else EXIT_OK
