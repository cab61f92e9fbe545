"""`vidllm-edge calibrate` and `vidllm-edge quantize`: thin layers over `record_calibration` and `quantize_export`.

The lead wires them into runtime/cli.py::

    add_calibrate_parser(sub); add_quantize_parser(sub)
    COMMANDS.update(calibrate=cmd_calibrate, quantize=cmd_quantize)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_OK = 0


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    from vidllm_edge.models.config import PRESETS

    p = subparsers.add_parser("calibrate", help="record every vision unit's real inputs for INT8 calibration")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a folder written by save_pretrained (the torch reference)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a model with seeded random weights")
    src.add_argument("--export", type=Path, help="an export folder (its FP32 graphs on ONNX Runtime CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights with --preset (default 0)")
    p.add_argument("--video", type=Path, action="append", required=True, help="a video or frame folder; repeatable")
    p.add_argument("--frames", type=int, required=True, help="frames sampled evenly per video (the pipeline's S)")
    p.add_argument("--out", type=Path, required=True, help="calibration folder")
    p.add_argument("--image-hw", default=None,
                   help="HxW of the export's frames (default: the export's / a 4:3 video's)")
    p.add_argument("--photos", type=int, default=None,
                   help="natural photographs added to the held-out frames (default 6; 0 for none)")
    return p


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    from vidllm_edge.calibration.quantize import METHODS

    p = subparsers.add_parser("quantize", help="INT8 Q/DQ graphs for the units that stay within the parity gate")
    p.add_argument("--export", type=Path, required=True, help="an FP32 export folder")
    p.add_argument("--calib", type=Path, required=True, help="a calibration folder of the same model")
    p.add_argument("--units", default=None, help="comma-separated vision units (default: all calibrated ones)")
    p.add_argument("--method", default=None, choices=METHODS, help="ort (default) or modelopt (needs its [onnx] extra)")
    p.add_argument("--top-k", type=int, default=None, help="sensitive nodes listed per unit (default 10)")
    p.add_argument("--max-nodes", type=int, default=None,
                   help="nodes measured one by one per unit; past it an even sample (default 48)")
    p.add_argument("--attention", action="store_true",
                   help="also quantize attention's activation-by-activation MatMuls")
    return p


def _given(args, **names: str) -> dict:
    """Keyword arguments for the options the user gave (the functions own the defaults)."""
    return {kw: getattr(args, attr) for kw, attr in names.items() if getattr(args, attr) is not None}


def cmd_calibrate(args) -> int:
    from vidllm_edge import atomic
    from vidllm_edge.calibration.record import record_calibration
    from vidllm_edge.errors import CheckpointError

    image_hw = None
    if args.image_hw:
        from vidllm_edge.export.exporter import parse_hw

        image_hw = parse_hw(args.image_hw)
    atomic.ensure_dir(args.out, "Calibration folder")  # before any model is built
    if args.export is not None:
        model = args.export
    elif args.checkpoint is not None:
        if not args.checkpoint.is_dir():
            raise CheckpointError(f"Checkpoint folder: {args.checkpoint}", "does not exist or is not a folder.",
                                  "Pass a folder written by save_pretrained, --preset NAME or --export DIR.")
        from vidllm_edge.models.model import from_pretrained

        model = from_pretrained(args.checkpoint)
    else:
        from vidllm_edge.models.model import build_model

        model = build_model(args.preset, seed=args.seed)
    start = time.perf_counter()
    info = record_calibration(model, args.video, args.frames, args.out, image_hw=image_hw,
                              **_given(args, photos="photos"))
    splits = info["splits"]
    print(f"recorded {len(splits['calibration']['units'])} unit(s) from {len(splits['calibration']['clips'])} "
          f"calibration and {len(splits['heldout']['clips'])} held-out clip(s) into {args.out} in "
          f"{time.perf_counter() - start:.1f} s (model sha256 {info['model']['sha256'][:12]}…)")
    return EXIT_OK


def cmd_quantize(args) -> int:
    from vidllm_edge.calibration.quantize import metrics_table, quantize_export, write_report

    units = [u.strip() for u in args.units.split(",")] if args.units else None
    start = time.perf_counter()
    report = quantize_export(args.export, args.calib, units=units, quantize_attention=args.attention,
                             **_given(args, method="method", top_k="top_k", max_nodes="max_nodes"))
    js, md = write_report(args.export, report)
    print("\n".join(metrics_table(report["units"])))
    for unit, e in report["units"].items():
        where = e.get("file", "no INT8 graph")
        print(f"{unit}: {'INT8' if e['keep_int8'] else 'FP'} ({e['reason']}): {where}")
    print(f"report: {js} and {md} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return EXIT_OK
