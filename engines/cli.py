"""`vidllm-edge build`: the command line over :func:`vidllm_edge.engines.builder.build_all`.

``runtime/cli.py`` adds the subcommand with :func:`add_build_parser` and dispatches to :func:`cmd_build`.
Defaults live in the builder module and are only referenced here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vidllm_edge.engines.builder import DEFAULT_PRECISION, DEFAULT_TIMEOUT_S, DEFAULT_WORKSPACE_MB
from vidllm_edge.engines.keys import PRECISIONS
from vidllm_edge.errors import VidLLMError


def add_build_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``build`` to an ``add_subparsers()`` object; returns the new parser (its default func is cmd_build)."""
    p = subparsers.add_parser("build", help="build TensorRT engines from an export folder (on the target GPU)")
    p.add_argument("--export", required=True, type=Path, help="an export folder (vidllm-edge export --out)")
    p.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
                   help=f"fp16, int8 (needs onnx/<unit>.int8.onnx from calibrate) or best "
                        f"(default {DEFAULT_PRECISION})")
    p.add_argument("--frames", default=None, help="MIN:OPT:MAX frame counts of the profile (default: the export's)")
    p.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB,
                   help=f"TensorRT workspace cap in MiB (default {DEFAULT_WORKSPACE_MB}; lower it on 8 GB Jetsons)")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="timing cache file (default: in --out, named by TensorRT version and GPU)")
    p.add_argument("--units", nargs="+", default=None,
                   help="units to build, space- or comma-separated (default: all vision units)")
    p.add_argument("--out", required=True, type=Path, help="engines folder (engines + engines.json)")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"per-engine build time limit in seconds (default {DEFAULT_TIMEOUT_S})")
    p.add_argument("--force", action="store_true", help="rebuild engines that are up to date")
    p.set_defaults(func=cmd_build)
    return p


def cmd_build(args: argparse.Namespace) -> int:
    """Run the build; 0 on success, 2 with ``subject | problem`` and a Note on stderr otherwise."""
    from vidllm_edge.engines.builder import build_all
    from vidllm_edge.export.exporter import FrameProfile
    from vidllm_edge.runtime.cli import EXIT_BAD_INPUT, EXIT_OK  # here: runtime.cli imports this module

    start = time.perf_counter()
    try:
        frames = FrameProfile.parse(args.frames) if args.frames else None
        units = [u for item in args.units for u in item.split(",") if u.strip()] if args.units else None
        results = build_all(args.export, args.out, precision=args.precision, frames=frames,
                            workspace_mb=args.workspace_mb, timing_cache=args.timing_cache, units=units,
                            timeout=args.timeout_s, force=args.force)
    except VidLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    built = sum(r.status == "built" for r in results.values())
    print(f"{built} engine(s) built, {len(results) - built} up to date, in {time.perf_counter() - start:.1f} s "
          f"(manifest: {Path(args.out) / 'engines.json'})")
    return EXIT_OK
