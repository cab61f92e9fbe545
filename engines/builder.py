"""`vidllm-edge build`: TensorRT 10 engines from an export folder (DESIGN.md §4, §6).

Per unit: parse the ONNX graph (every parser error listed), one optimization profile from the export's
input specs and the requested frame range, a workspace cap (8–16 GB Jetsons run out of memory while
*building*), a persistent timing cache (loaded, merged, saved atomically), and the engine written
atomically, so a failed build leaves the previous good engine in place. Each build runs in a child process
(:func:`build_in_child`): a crash or the kernel's out-of-memory killer becomes a :class:`BuildError` with
the exit code or signal and the tail of the build log, and the command itself survives to report it.

Precision: ``fp16`` builds the export's graph; an FP16 export (FP32 islands already in the graph) builds
strongly typed, an FP32 export weakly typed with the FP16 flag and LayerNorm/Softmax pinned to FP32.
``int8`` builds the Q/DQ graph ``onnx/<unit>.int8.onnx`` strongly typed (no precision flags; layers
without Q/DQ run at the graph's own float type). ``best`` builds both and keeps the faster one when INT8
stays within :data:`INT8_MIN_COSINE` of ONNX Runtime (ViTs often gain nothing from INT8).

After each build: build time, engine size, a parity line against ONNX Runtime CPU on seeded dummy inputs
at the profile's smallest shape (cheap enough for a Jetson's CPU) and the engine's latency at the opt shape.

TensorRT calls as documented for the Python API (docs.nvidia.com/deeplearning/tensorrt/latest/_static/
python-api: Builder, IBuilderConfig, ITimingCache, OnnxParser, IOptimizationProfile).
"""

from __future__ import annotations

import datetime
import importlib
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

from vidllm_edge import atomic
from vidllm_edge import manifest as M
from vidllm_edge.engines import manifest as EM
from vidllm_edge.engines.keys import (PRECISIONS, EngineKey, UnitProfile, as_range, fixed_dims, onnx_digest,
                                      profiles_from_manifest, sm_tag, trt_tag)
from vidllm_edge.errors import ConfigError, InputError, VidLLMError
from vidllm_edge.optional import require

DEFAULT_PRECISION = "fp16"
DEFAULT_WORKSPACE_MB = 1024  # fits an 8 GB Orin Nano next to the builder's own host memory
DEFAULT_TIMEOUT_S = 3600  # per engine build
INT8_MIN_COSINE = 0.99  # "best" keeps INT8 only if every output stays this close to ONNX Runtime
LATENCY_REPS = 20
LOG_TAIL_LINES = 30
LLM_UNITS = ("llm_prefill", "llm_decode")
_OOM_NOTE = ("SIGKILL is what the kernel's out-of-memory killer sends: the builder needs several times the model "
             "in host memory. Try a smaller --workspace-mb, close other programs, add swap, or build one unit at a "
             "time with --units.")


class BuildError(VidLLMError):
    """An engine could not be built (parser errors, no tactic within the workspace, a crashed builder)."""


def require_tensorrt():
    """``import tensorrt`` or a DependencyError with the install hint (never a silent fallback)."""
    return require("tensorrt", "building TensorRT engines (vidllm-edge build)")


# -- one engine ------------------------------------------------------------------------------------------


def build_engine(onnx_path: str | Path, key: EngineKey, workspace_mb: int, timing_cache_path: str | Path | None,
                 log: TextIO | None = None, *, shapes: Mapping[str, Any], out_dir: str | Path,
                 strongly_typed: bool | None = None) -> dict[str, Any]:
    """Build one engine and write it atomically to ``out_dir / key.file_name()``.

    Args:
        onnx_path: the unit's graph (external weights beside it are found by the parser).
        key: what the engine is (its precision picks the build mode, its name the file).
        workspace_mb: cap of TensorRT's tactic workspace, MiB. timing_cache_path: persistent timing cache
            (None: none). log: where TensorRT warnings go (default stderr).
        shapes: input name -> (min, opt, max) shapes, the one optimization profile.
        strongly_typed: default True for int8 (Q/DQ graph); pass True for an FP16-typed export.
    Returns: {"path", "seconds", "size", "strongly_typed", "pinned_fp32"}.
    """
    trt = require_tensorrt()
    log = log or sys.stderr
    logger = _make_logger(trt, log)
    onnx_path, out_dir = Path(onnx_path), atomic.ensure_dir(out_dir, "Engines folder")
    strongly = key.precision == "int8" if strongly_typed is None else bool(strongly_typed)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"ONNX file: {onnx_path}", f"TensorRT {trt.__version__}'s ONNX parser reports {len(errors)} "
                         "error(s): " + " | ".join(errors),
                         "vidllm-edge export prints a TensorRT lint report for each graph; TensorRT before 10.14 "
                         "needs --opset 18.")
    _check_network_inputs(network, shapes, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    pinned = 0 if strongly else _weak_fp16(trt, network, config)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(profile)
    if timing_cache_path:
        _load_timing_cache(config, Path(timing_cache_path), log)
    logger.recent.clear()
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise BuildError(f"Unit: {key.unit} ({onnx_path.name}, {key.precision})",
                         f"TensorRT found no engine within a {workspace_mb} MiB workspace "
                         f"({' | '.join(logger.recent) or 'no message'}).",
                         f"The workspace may be too small: try --workspace-mb {2 * int(workspace_mb)} (on an 8 GB "
                         "Jetson close other programs first); the messages above name the layer otherwise.")
    if timing_cache_path:
        _save_timing_cache(config, Path(timing_cache_path))
    path = atomic.write_bytes(out_dir / key.file_name(), plan)  # IHostMemory is a buffer: no second copy
    return {"path": str(path), "seconds": seconds, "size": path.stat().st_size, "strongly_typed": strongly,
            "pinned_fp32": pinned}


def _make_logger(trt, log: TextIO):
    """A TensorRT logger printing warnings and errors to ``log`` and keeping them for error messages.

    The class subclasses ``trt.ILogger``, so it is made here, at call time. The build child uses this one
    rather than the runtime's, which would import torch into a process that needs every byte for the build.
    """
    class _BuildLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.recent: list[str] = []

        def log(self, severity, msg) -> None:
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                line = f"[TensorRT {getattr(severity, 'name', int(severity))}] {msg}"
                self.recent = (self.recent + [line])[-LOG_TAIL_LINES:]
                print(line, file=log, flush=True)

    return _BuildLogger()


def _check_network_inputs(network, shapes: Mapping[str, Any], onnx_path: Path) -> None:
    """The parsed graph's inputs must be the profile's, fixed dims equal (else the export is inconsistent)."""
    names = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        names.append(tensor.name)
        dims = tuple(int(d) for d in tensor.shape)
        if tensor.name not in shapes:
            raise BuildError(f"ONNX input: {tensor.name}", f"of {onnx_path.name} is not in the export manifest's "
                             f"inputs ({sorted(shapes)}).", "Export again; the graph and its manifest disagree.")
        lo, _, hi = shapes[tensor.name]
        if len(dims) != len(lo) or any(d >= 0 and not lo[j] == hi[j] == d for j, d in enumerate(dims)):
            raise BuildError(f"ONNX input: {tensor.name}", f"has shape {list(dims)} (-1: dynamic) in {onnx_path.name}; "
                             f"the profile is min {list(lo)}, max {list(hi)}.",
                             "Export again; the graph and its manifest disagree.")
    missing = sorted(set(shapes) - set(names))
    if missing:
        raise BuildError(f"ONNX file: {onnx_path}", f"lacks the inputs {missing}.", "Export again.")


def _weak_fp16(trt, network, config) -> int:
    """FP16 flag on an FP32 graph, with LayerNorm and Softmax pinned to FP32 (DESIGN.md §4); returns the count."""
    if not hasattr(trt.BuilderFlag, "FP16"):
        raise BuildError(f"TensorRT {trt.__version__}", "has no BuilderFlag.FP16 (weak typing was removed in 11.0).",
                         "Export with --precision fp16 (an FP16 graph with FP32 islands); it builds strongly typed.")
    config.set_flag(trt.BuilderFlag.FP16)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [layer.get_output(k) for k in range(layer.num_outputs)]
        sensitive = layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX)
        if sensitive and all(o.dtype == trt.float32 for o in outs):
            layer.precision = trt.float32
            for k in range(layer.num_outputs):
                layer.set_output_type(k, trt.float32)
            pinned += 1
    if pinned:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return pinned


def _load_timing_cache(config, path: Path, log: TextIO) -> None:
    data = path.read_bytes() if path.is_file() else b""
    cache = None
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception:  # noqa: BLE001 - a cache from another TensorRT may not even deserialise
            cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if data:
            print(f"    timing cache {path} is from another GPU or TensorRT; starting a fresh one", file=log)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(config, path: Path) -> None:
    """Merge what this build learned with what is on disk now (another build may have added entries)."""
    cache = config.get_timing_cache()
    if cache is None:
        return
    if path.is_file():
        try:
            previous = config.create_timing_cache(path.read_bytes())
        except Exception:  # noqa: BLE001
            previous = None
        if previous is not None:
            cache.combine(previous, ignore_mismatch=False)
    atomic.ensure_dir(path.parent, "Timing cache folder")
    atomic.write_bytes(path, cache.serialize())


# -- isolation -------------------------------------------------------------------------------------------


def build_in_child(fn: Callable, *args: Any, timeout: float | None = DEFAULT_TIMEOUT_S, log: TextIO | None = None,
                   **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in a spawned child process and return its (picklable) result.

    The child's stdout and stderr (TensorRT's C++ output included) go to a log file whose new lines are
    forwarded to ``log`` while it runs. A VidLLMError raised in the child is raised here with its message;
    any other exception, a non-zero exit, a signal (a segfault, the OOM killer) or ``timeout`` seconds
    become a :class:`BuildError` with the exit code or signal and the tail of the log.
    """
    log = log or sys.stderr
    ctx = multiprocessing.get_context("spawn")
    fd, log_path = tempfile.mkstemp(prefix="vidllm-build-", suffix=".log")
    os.close(fd)
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(fn, args, kwargs, sender, log_path), name="vidllm-build")
    what = getattr(fn, "__name__", repr(fn))
    deadline = None if timeout is None else time.monotonic() + timeout
    offset, message, received = 0, None, False
    try:
        proc.start()
        sender.close()
        while proc.is_alive():
            if not received and receiver.poll(0.2):  # read while it runs: a big message must not block it
                message, received = _receive(receiver), True
            else:
                proc.join(0.2)
            offset = _forward(log_path, offset, log)
            if deadline is not None and time.monotonic() > deadline and proc.is_alive():
                proc.kill()
                proc.join()
                raise BuildError(f"Build step: {what}", f"took longer than {timeout:g} s and was stopped."
                                 + _tail(log_path), "Raise the timeout, or build fewer units at a time (--units).")
        proc.join()
        _forward(log_path, offset, log)
        if not received:
            message = _receive(receiver)
    except BaseException:
        if proc.is_alive():
            proc.kill()
            proc.join()
        raise
    finally:
        receiver.close()
    if message is not None and message[0] == "ok":
        if proc.exitcode != 0:  # e.g. a crash while CUDA tears down, after the result was sent
            print(f"    note: the build process exited with {proc.exitcode} after returning its result", file=log)
        os.unlink(log_path)
        return message[1]
    if message is not None and message[0] == "vidllm":
        os.unlink(log_path)
        raise _rebuild_error(*message[1:])
    if message is not None and message[0] == "error":
        raise BuildError(f"Build step: {what}", f"raised {message[1]}." + _tail(log_path),
                         f"Full log: {log_path}")
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        note = (_OOM_NOTE if -code == signal.SIGKILL
                else "A crash inside TensorRT or the CUDA driver; the log may name the layer.")
        raise BuildError(f"Build step: {what}", f"the build process was killed by {name}." + _tail(log_path),
                         f"{note} Full log: {log_path}")
    raise BuildError(f"Build step: {what}", f"the build process exited with code {code} without a result."
                     + _tail(log_path), f"Full log: {log_path}")


def _child_main(fn: Callable, args: tuple, kwargs: dict, conn, log_path: str) -> None:
    """Child entry: output to the log file (fd level, so C++ output too), result or error down the pipe."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    try:
        message = ("ok", fn(*args, **kwargs))
    except VidLLMError as exc:
        message = ("vidllm", type(exc).__module__, type(exc).__qualname__, exc.subject, exc.problem, exc.note)
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        traceback.print_exc()
        message = ("error", f"{type(exc).__name__}: {exc}")
    try:
        conn.send(message)
    except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
        conn.send(("error", f"an unpicklable result ({exc})"))
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()


def _receive(conn) -> tuple | None:
    """The child's message, or None when it died before sending one (poll() is also true at EOF)."""
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):
        return None


def _rebuild_error(module: str, qualname: str, subject: str, problem: str, note: str) -> VidLLMError:
    """The child's VidLLMError as the same type here (its own __init__ may take other arguments)."""
    try:
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if not (isinstance(cls, type) and issubclass(cls, VidLLMError)):
            raise TypeError(qualname)
    except Exception:  # noqa: BLE001 - any doubt: the generic build error, same message
        cls = BuildError
    exc = cls.__new__(cls)
    VidLLMError.__init__(exc, subject, problem, note)
    return exc


def _forward(log_path: str, offset: int, log: TextIO) -> int:
    with open(log_path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    if data:
        log.write(data.decode("utf-8", "replace"))
        log.flush()
    return offset + len(data)


def _tail(log_path: str, lines: int = LOG_TAIL_LINES) -> str:
    text = Path(log_path).read_text("utf-8", "replace").rstrip()
    if not text:
        return " The build log is empty."
    return " Last lines of the build log:\n" + "\n".join("    " + ln for ln in text.splitlines()[-lines:])


# -- an export folder -------------------------------------------------------------------------------------


@dataclass
class UnitBuild:
    """What happened to one unit: ``built``, ``up to date`` or ``failed``."""

    unit: str
    status: str
    entry: dict | None = None
    message: str = ""


def build_all(export_dir: str | Path, out_dir: str | Path, precision: str = DEFAULT_PRECISION, frames: Any = None,
              workspace_mb: int = DEFAULT_WORKSPACE_MB, timing_cache: str | Path | None = None,
              units: list[str] | tuple[str, ...] | None = None, *, log: TextIO | None = None,
              timeout: float | None = DEFAULT_TIMEOUT_S, force: bool = False,
              isolate: bool = True) -> dict[str, UnitBuild]:
    """Build engines for ``units`` (default: every vision unit of the export) into ``out_dir``.

    Args:
        export_dir: a `vidllm-edge export` folder. out_dir: the engines folder (engines + engines.json).
        precision: fp16 | int8 | best. frames: (min, opt, max) frames for S/Sm, or None for the export's.
        workspace_mb: TensorRT workspace cap, MiB. timing_cache: file (default: in ``out_dir``, named by
            TensorRT version and GPU). timeout: seconds per engine build. force: rebuild up-to-date engines.
        isolate: build in a child process (default; False runs in this process, for debugging).
    Returns unit -> UnitBuild; raises BuildError after trying every unit if any failed.
    """
    log = log or sys.stderr
    if precision not in PRECISIONS:
        raise InputError(f"Argument: --precision {precision}", f"is not one of {PRECISIONS}.",
                         "Use fp16, int8 or best.")
    if int(workspace_mb) < 1:
        raise InputError(f"Argument: --workspace-mb {workspace_mb}", "must be a positive number of MiB.",
                         f"The default is {DEFAULT_WORKSPACE_MB}.")
    trt = require_tensorrt()  # first: without TensorRT nothing below can work
    from vidllm_edge.runtime.trt_backend import gpu_compute_capability

    session = _Session(trt, gpu_compute_capability(), Path(export_dir), atomic.ensure_dir(out_dir, "Engines folder"),
                       precision, as_range(frames), int(workspace_mb), log, timeout, force, isolate)
    session.timing_cache = Path(timing_cache) if timing_cache else session.default_timing_cache()
    todo = session.select(units)
    print(f"TensorRT {trt.__version__}, GPU {sm_tag(session.cc)}; export {session.export_dir} "
          f"({session.image_hw[0]}x{session.image_hw[1]}); timing cache {session.timing_cache}", file=log, flush=True)
    results = {}
    for i, unit in enumerate(todo, 1):
        try:
            results[unit] = session.build_unit(unit, f"[{i}/{len(todo)}]")
        except VidLLMError as exc:
            print(f"    FAILED: {exc}", file=log, flush=True)
            results[unit] = UnitBuild(unit, "failed", message=str(exc))
    failed = [r for r in results.values() if r.status == "failed"]
    if failed:
        raise BuildError(f"Engines folder: {session.out_dir}", f"{len(failed)} of {len(todo)} unit(s) failed: "
                         + "; ".join(f"{r.unit}: {r.message.splitlines()[0].rstrip('.')}" for r in failed) + ".",
                         "The messages above say why; engines that built are in place and in engines.json.")
    return results


@dataclass
class _Session:
    trt: Any
    cc: str
    export_dir: Path
    out_dir: Path
    precision: str
    frames: tuple[int, int, int] | None
    workspace_mb: int
    log: TextIO
    timeout: float | None
    force: bool
    isolate: bool
    timing_cache: Path | None = None
    manifest: dict = field(default_factory=dict)
    dims: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.manifest = M.read_manifest(self.export_dir)
        self.image_hw = tuple(int(v) for v in self.manifest["image_hw"])
        self.dims = fixed_dims(self.manifest)
        exported = self.manifest.get("frames") or {}
        self.build_frames = self.frames or tuple(exported.get(k, 1) for k in ("min", "opt", "max"))

    def default_timing_cache(self) -> Path:
        return self.out_dir / f"timing.{trt_tag(self.trt.__version__)}.{sm_tag(self.cc)}.cache"

    def select(self, units) -> list[str]:
        vision = [u for u, e in self.manifest["units"].items() if "inputs" in e]
        todo = [u.strip() for u in (units or vision) if u.strip()]
        llm = [u for u in todo if u in LLM_UNITS]
        if llm:
            raise InputError(f"Argument: --units {','.join(todo)}", f"names the LLM units {llm}; `vidllm-edge build` "
                             "makes engines for the vision units only.", "The LLM runs on the ONNX Runtime decoder "
                             "(its TensorRT execution provider compiles it): drop them from --units.")
        unknown = [u for u in todo if u not in vision]
        if unknown:
            raise InputError(f"Argument: --units {','.join(todo)}", f"names units the export does not have: {unknown}.",
                             f"Choose from {', '.join(vision)}.")
        M.verify_files(self.export_dir, self.manifest, todo)
        no_int8 = [u for u in todo if not self.int8_path(u).is_file()]
        if self.precision == "int8" and no_int8:
            raise InputError(f"Export folder: {self.export_dir}", "has no INT8 graph for " + ", ".join(no_int8)
                             + f" ({', '.join(self.int8_path(u).name for u in no_int8)} in onnx/).",
                             "Make them with vidllm-edge calibrate (post-training quantization to Q/DQ ONNX), "
                             "or build --precision fp16 or best.")
        return todo

    def int8_path(self, unit: str) -> Path:
        return self.export_dir / "onnx" / f"{unit}.int8.onnx"

    # -- one unit ------------------------------------------------------------------------------------
    def build_unit(self, unit: str, tag: str) -> UnitBuild:
        entry = self.manifest["units"][unit]
        prof = self._profile(unit, entry)
        for sym in prof.beyond_export:
            print(f"{tag} {unit}: note: {sym} {list(prof.symbols[sym])} goes beyond the range the export was "
                  f"validated at {list(prof.validated[sym])}; allowed, recorded in engines.json.", file=self.log)
        sources = self._sources(unit, entry, tag)
        keys = {p: EngineKey(unit, p, prof.symbols, self.image_hw, self.trt.__version__, self.cc, digest)
                for p, (_, digest) in sources.items()}
        current = self._up_to_date(unit, keys)
        if current is not None:
            print(f"{tag} {unit}: up to date ({current['file']})", file=self.log, flush=True)
            return UnitBuild(unit, "up to date", current)
        built = {p: self._build(unit, entry, prof, keys[p], sources[p][0], tag) for p in sources}
        choice = self._choose(unit, built, tag)
        record = self._entry(unit, prof, built, choice)
        previous = EM.read_engines(self.out_dir, missing_ok=True)["engines"].get(unit)
        data = EM.update_entry(self.out_dir, unit, record, self.export_dir.resolve())
        for p, b in built.items():  # keep only the chosen engine, and drop the one it replaces
            if p != choice and b["path"].name != record["file"]:
                b["path"].unlink(missing_ok=True)
        if previous and previous.get("file") != record["file"]:
            still_used = {e.get("file") for e in data["engines"].values()}
            if previous.get("file") not in still_used:
                (self.out_dir / previous["file"]).unlink(missing_ok=True)
        return UnitBuild(unit, "built", record)

    def _profile(self, unit: str, entry: Mapping[str, Any]) -> UnitProfile:
        try:
            return profiles_from_manifest(entry, self.frames, self.image_hw, self.dims, self.dims.get("Sm_cap"))
        except ConfigError:  # a size the manifest cannot tell: read it from the graph itself
            self.dims.update(_dims_from_onnx(self.export_dir / entry["file"], entry))
            return profiles_from_manifest(entry, self.frames, self.image_hw, self.dims, self.dims.get("Sm_cap"))

    def _sources(self, unit: str, entry: Mapping[str, Any], tag: str) -> dict[str, tuple[Path, str]]:
        """precision -> (ONNX file, its digest)."""
        out = {}
        if self.precision in ("fp16", "best"):
            out["fp16"] = (self.export_dir / entry["file"], onnx_digest(entry["files"]))
        int8 = self.int8_path(unit)
        if self.precision in ("int8", "best"):
            if int8.is_file():  # (select() refused --precision int8 without it)
                files = {p.name: M.sha256(p) for p in sorted(int8.parent.glob(int8.name + "*"))}
                out["int8"] = (int8, onnx_digest(files))
            else:
                print(f"{tag} {unit}: no {int8.name} (vidllm-edge calibrate makes it); best = fp16", file=self.log)
        return out

    def _up_to_date(self, unit: str, keys: Mapping[str, EngineKey]) -> dict | None:
        if self.force:
            return None
        entry = EM.read_engines(self.out_dir, missing_ok=True)["engines"].get(unit)
        if not entry or (entry.get("build") or {}).get("precision") != self.precision:
            return None
        try:
            if EngineKey.from_dict(entry) not in keys.values():
                return None
            EM.check_engine_file(self.out_dir / entry["file"], entry, verify="size")
        except VidLLMError:
            return None
        return entry

    def _build(self, unit: str, entry: Mapping[str, Any], prof: UnitProfile, key: EngineKey, onnx_path: Path,
               tag: str) -> dict[str, Any]:
        ranges = ", ".join(f"{s} {a}-{b}-{c}" for s, (a, b, c) in key.profile) or "static shapes"
        print(f"{tag} {unit}: building {key.precision} engine ({ranges}, {self.image_hw[0]}x{self.image_hw[1]}, "
              f"workspace {self.workspace_mb} MiB) ...", file=self.log, flush=True)
        strongly = key.precision == "int8" or self.manifest.get("precision") == "fp16"
        kwargs = {"shapes": prof.shapes, "out_dir": self.out_dir, "strongly_typed": strongly}
        args = (onnx_path, key, self.workspace_mb, self.timing_cache)
        if self.isolate:
            info = build_in_child(build_engine, *args, None, timeout=self.timeout, log=self.log, **kwargs)
        else:
            info = build_engine(*args, self.log, **kwargs)
        info["path"], info["key"] = Path(info["path"]), key
        info["onnx_file"] = str(onnx_path.relative_to(self.export_dir))
        info["sha256"] = M.sha256(info["path"])
        print(f"    built in {info['seconds']:.1f} s, {info['size'] / 1e6:.1f} MB -> {info['path']}", file=self.log)
        info["report"] = self._check(unit, entry, prof, key, info)
        return info

    def _check(self, unit: str, entry: Mapping[str, Any], prof: UnitProfile, key: EngineKey,
               info: Mapping[str, Any]) -> dict[str, Any]:
        """Load and run the engine (a failure fails the unit); parity against ONNX Runtime CPU at the smallest
        shape (skipped, and said so, without onnxruntime); engine latency at the opt shape."""
        import torch

        from vidllm_edge import units as U
        from vidllm_edge.runtime.trt_backend import TrtUnit

        spec = U.VISION_UNITS[unit]
        bound = {k: v for k, v in self.dims.items() if any(k in t.shape for t in spec.inputs + spec.outputs)}
        engine_entry = dict(key.to_dict(), size=info["size"], sha256=info["sha256"])
        trt_unit = TrtUnit(spec, info["path"], engine_entry, bound, verify="size", engines_dir=self.out_dir)
        feed = dummy_feed(spec, prof.shapes, 0)
        got = trt_unit({k: v.cuda() for k, v in feed.items()})
        small = "x".join(str(v) for v in next(iter(prof.shapes.values()))[0])
        report: dict[str, Any] = {"parity_shape": small, "parity": [], "min_cosine": None, "ort_cpu_ms": None}
        try:
            ref, report["ort_cpu_ms"] = _run_ort(self.export_dir / entry["file"], feed)
        except VidLLMError as exc:  # onnxruntime is not needed to build or run engines
            print(f"    parity: skipped ({exc.subject} {exc.problem})", file=self.log)
        else:
            report["parity"] = _parity_rows(spec, ref, got, key.precision)
            report["min_cosine"] = min(r["cosine"] for r in report["parity"])
            print(f"    parity vs ONNX Runtime CPU at {small} ({report['ort_cpu_ms']:.0f} ms, first run):",
                  file=self.log)
            for r in report["parity"]:
                print(f"      {r['output']:18} max-abs {r['max_abs']:9.2e}  rel-L2 {r['rel_l2']:9.2e}  "
                      f"cos {r['cosine']:.6f}  {'ok' if r['ok'] else 'CHECK: ' + r['gate']}", file=self.log)
        opt = "x".join(str(v) for v in next(iter(prof.shapes.values()))[1])
        opt_feed = {k: v.cuda() for k, v in dummy_feed(spec, prof.shapes, 1).items()}
        report.update(latency_ms=_latency_ms(torch, trt_unit, opt_feed), latency_shape=opt)
        print(f"    latency: TensorRT {key.precision} {report['latency_ms']:.2f} ms at {opt} (device time, median of "
              f"{LATENCY_REPS} after 3 warm-up runs)", file=self.log, flush=True)
        del trt_unit, got, opt_feed
        torch.cuda.empty_cache()  # on a Jetson this memory is the next build's host memory too
        return report

    def _choose(self, unit: str, built: Mapping[str, dict], tag: str) -> str:
        if len(built) == 1:
            return next(iter(built))
        fp16, int8 = built["fp16"]["report"], built["int8"]["report"]
        cos = int8["min_cosine"]
        ok = cos is not None and cos >= INT8_MIN_COSINE
        choice = "int8" if ok and int8["latency_ms"] < fp16["latency_ms"] else "fp16"
        gate = ("no parity for int8 (onnxruntime missing)" if cos is None
                else "" if ok else f"int8 cosine {cos:.4f} < {INT8_MIN_COSINE}")
        why = f"int8 {int8['latency_ms']:.2f} ms vs fp16 {fp16['latency_ms']:.2f} ms" + (f"; {gate}" if gate else "")
        print(f"{tag} {unit}: best = {choice} ({why})", file=self.log, flush=True)
        return choice

    def _entry(self, unit: str, prof: UnitProfile, built: Mapping[str, dict], choice: str) -> dict[str, Any]:
        info = built[choice]
        entry = info["key"].to_dict()
        entry.update({
            "size": info["size"], "sha256": info["sha256"],
            "shapes": {n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in prof.shapes.items()},
            "validated": {s: list(r) for s, r in prof.validated.items()}, "beyond_export": prof.beyond_dict(),
            "build": {"export": str(self.export_dir.resolve()), "precision": self.precision,
                      "frames": list(self.build_frames), "workspace_mb": self.workspace_mb,
                      "onnx_file": info["onnx_file"], "strongly_typed": info["strongly_typed"],
                      "pinned_fp32_layers": info["pinned_fp32"], "seconds": round(info["seconds"], 2),
                      "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "timing_cache": str(self.timing_cache)},
            "report": info["report"],
        })
        if len(built) > 1:
            entry["report"]["candidates"] = {p: b["report"]["latency_ms"] for p, b in built.items()}
        return entry


def _dims_from_onnx(path: Path, unit_entry: Mapping[str, Any]) -> dict[str, int]:
    """Fixed symbol sizes read from the graph's input shapes (needs the `onnx` package)."""
    onnx = require("onnx", "reading input sizes from the ONNX graph")
    model = onnx.load(str(path), load_external_data=False)
    graph = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
             for i in model.graph.input}
    dims = {}
    for spec in unit_entry["inputs"]:
        for sym, size in zip(spec["shape"], graph.get(spec["name"], [])):
            if isinstance(sym, str) and size:
                dims[sym] = int(size)
    return dims


def dummy_feed(spec, shapes: Mapping[str, Any], which: int, seed: int = 0) -> dict:
    """Seeded CPU inputs at the profile's min (``which=0``), opt (1) or max (2) shapes, like the export's dummy
    inputs: images uniform in [0, 1], everything else standard normal."""
    import torch

    g = torch.Generator().manual_seed(seed)
    feed = {}
    for t in spec.inputs:
        shape = tuple(shapes[t.name][which])
        feed[t.name] = torch.rand(shape, generator=g) if t.name == "images" else torch.randn(shape, generator=g)
    return feed


def _parity_rows(spec, ref: Mapping[str, Any], got: Mapping[str, Any], precision: str) -> list[dict[str, Any]]:
    """Per output max-abs, rel-L2, cosine of the engine against ONNX Runtime, with the export's FP16 gate
    (or the INT8 cosine gate); reported, not enforced (``best`` enforces the INT8 one)."""
    from vidllm_edge.export.specs import FP_TOL
    from vidllm_edge.export.validate import metrics

    tol = FP_TOL["fp16"]
    rows = []
    for t in spec.outputs:
        max_abs, rel, cos = metrics(ref[t.name], got[t.name].float().cpu().numpy())
        if precision == "int8":
            ok, gate = cos >= INT8_MIN_COSINE, f"cosine >= {INT8_MIN_COSINE}"
        else:
            ok, gate = rel <= tol.rel_l2 and cos >= tol.cosine, f"rel-L2 <= {tol.rel_l2:g}, cosine >= {tol.cosine:g}"
        rows.append({"output": t.name, "max_abs": max_abs, "rel_l2": rel, "cosine": cos, "ok": bool(ok), "gate": gate})
    return rows


def _run_ort(path: Path, feed: Mapping[str, Any]) -> tuple[dict, float]:
    from vidllm_edge.export.validate import run_onnx

    start = time.perf_counter()
    out = run_onnx(path, dict(feed))
    return out, (time.perf_counter() - start) * 1e3


def _latency_ms(torch, unit, feed: Mapping[str, Any], reps: int = LATENCY_REPS, warmup: int = 3) -> float:
    """Median device time of one call, CUDA events on the caller's stream (the unit orders against it)."""
    for _ in range(warmup):
        unit(feed)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        unit(feed)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
