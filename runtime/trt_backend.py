"""The TensorRT backend: engines from `vidllm-edge build` behind the one backend interface (DESIGN.md §5-6).

Before TensorRT sees a file, :class:`TrtUnit` checks it against ``engines.json``: size and sha256 (a
truncated copy is named as such), then the TensorRT version (``packaging.version``), the GPU's compute
capability and the ONNX hash (:func:`~vidllm_edge.engines.keys.check_engine`). A mismatch is an
:class:`~vidllm_edge.engines.keys.EngineMismatchError` with the rebuild command, never TensorRT's opaque
deserialisation failure. A frame count outside the engine's optimization profile is an InputError naming
the input and the range, before TensorRT would say "does not satisfy any optimization profile".

Execution: ``execute_async_v3`` on one torch CUDA stream of the unit, ordered against the caller's
current stream (no host sync); the shape-dependent setup (input shapes, output shapes, staging buffers)
is cached per input shape; outputs stay on the GPU as torch tensors. Inputs already on the GPU with the
engine's dtype are bound in place. With ``cuda_graph=True`` each input shape is captured once into a
``torch.cuda.CUDAGraph`` and replayed; its outputs are then static buffers, overwritten by the next call.

Imports on a machine without TensorRT: ``tensorrt`` is imported inside functions, and the TensorRT logger
class is created by a factory.
"""

from __future__ import annotations

import collections
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from vidllm_edge import manifest as M
from vidllm_edge import units as U
from vidllm_edge.engines.keys import (FRAME_SYMBOLS, EngineMismatchError, check_engine, entry_rebuild_command,
                                      fixed_dims, onnx_digest, rebuild_command, sm_tag)
from vidllm_edge.engines.manifest import EngineFileError, check_engine_file, read_engines
from vidllm_edge.errors import CheckpointError, DependencyError, InputError
from vidllm_edge.optional import available, require
from vidllm_edge.runtime.backend import Backend, validate_feed

_WHAT = {"S": "frames", "Sm": "metric-depth frames", "M": "visual tokens", "N": "rows"}
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                 "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
_SPEC_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}
LLM_UNITS = ("llm_prefill", "llm_decode")

_LOGGER = None


def trt_logger(trt, stream=None):
    """The process-wide TensorRT logger: prints warnings and errors to ``stream`` (default stderr) and keeps
    the recent ones for error messages. Created here, not at import, because it subclasses ``trt.ILogger``."""
    global _LOGGER
    if _LOGGER is None:
        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.stream = None
                self.recent: collections.deque[str] = collections.deque(maxlen=40)
                self.print_level = int(trt.ILogger.Severity.WARNING)

            def log(self, severity, msg) -> None:
                level = int(severity)
                if level > self.print_level:
                    return
                line = f"[TensorRT {getattr(severity, 'name', level)}] {msg}"
                self.recent.append(line)
                print(line, file=self.stream or sys.stderr, flush=True)

        _LOGGER = _Logger()
    if stream is not None:
        _LOGGER.stream = stream
    return _LOGGER


def gpu_compute_capability() -> str:
    """``"8.7"`` for the current CUDA device, or a DependencyError when torch sees no GPU."""
    if not torch.cuda.is_available():
        raise DependencyError("CUDA GPU", "is not visible to torch; TensorRT engines run on (and are built for) "
                              "an NVIDIA GPU.", "Check the driver (nvidia-smi) and that torch is a CUDA build; "
                              "without a GPU use --backend onnxruntime.")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def check_profile(spec: U.UnitSpec, symbols: Mapping[str, int], profile: Mapping[str, Sequence[int]],
                  entry: Mapping[str, Any], engines_dir: Any) -> None:
    """InputError if a bound symbol lies outside the engine's optimization profile (TensorRT-free)."""
    for sym, (lo, opt, hi) in profile.items():
        value = symbols.get(sym)
        if value is None or lo <= value <= hi:
            continue
        name = next(t.name for t in spec.inputs if sym in t.shape)
        problem = (f"has {sym}={value} ({_WHAT.get(sym, sym)}), outside the engine's optimization profile "
                   f"{sym} in [{lo}, {hi}] (built for {opt}).")
        if sym in FRAME_SYMBOLS:
            build = entry.get("build") or {}
            frames = build.get("frames") or (lo, opt, hi)
            wider = (min(frames[0], value), frames[1], max(frames[2], value))
            note = (f"Feed {lo} to {hi} {_WHAT[sym]}, or rebuild the engines for more: "
                    + rebuild_command(build.get("export", "EXPORT_DIR"), build.get("precision", "fp16"), wider,
                                      engines_dir))
        else:
            note = (f"This range comes from the export (vidllm-edge export); split the {_WHAT.get(sym, sym)} "
                    f"into chunks of at most {hi}.")
        raise InputError(f"Input tensor: {name}", problem, note)


@dataclass
class _Plan:
    """Everything that depends only on the input shapes."""

    shapes: tuple[tuple[int, ...], ...]
    out_shapes: dict[str, tuple[int, ...]]
    staging: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] | None = None  # static outputs (CUDA graph mode)
    graph: Any = None


class TrtUnit(Backend):
    """One unit as a TensorRT engine.

    Args:
        spec: the unit's contract; engine_path: the ``.engine`` file; entry: its ``engines.json`` entry.
        bound: fixed symbol values (H, W, P, C, D). onnx_sha: the export's current ONNX digest of the unit
            (None: not checked). cuda_graph: capture one CUDA graph per input shape and replay it.
        verify: ``"sha256"`` (default) or ``"size"`` for the pre-load file check. engines_dir: for messages.
    """

    name = "tensorrt"

    def __init__(self, spec: U.UnitSpec, engine_path: str | Path, entry: Mapping[str, Any],
                 bound: Mapping[str, int] | None = None, *, onnx_sha: str | None = None, cuda_graph: bool = False,
                 verify: str = "sha256", engines_dir: str | Path | None = None) -> None:
        super().__init__(spec, bound)
        self.path = Path(engine_path)
        self.entry = dict(entry)
        self.engines_dir = Path(engines_dir) if engines_dir else self.path.parent
        self.command = entry_rebuild_command(self.entry, self.engines_dir)
        self.profile = {s: tuple(r) for s, r in self.entry["profile"].items()}
        check_engine_file(self.path, self.entry, verify)  # before TensorRT is even imported
        trt = require("tensorrt", "the TensorRT backend")
        diffs = check_engine(self.entry, trt.__version__, gpu_compute_capability(), onnx_sha)
        if diffs:
            raise EngineMismatchError(self.path, diffs, self.command)
        self._trt = trt
        self._logger = trt_logger(trt)
        trt.init_libnvinfer_plugins(self._logger, "")
        self._runtime = trt.Runtime(self._logger)
        self._logger.recent.clear()
        try:
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        except Exception as exc:  # some TensorRT versions raise instead of returning None
            self.engine = None
            self._logger.recent.append(str(exc))
        if self.engine is None:
            raise EngineFileError(f"Engine file: {self.path}", f"cannot be deserialised by TensorRT {trt.__version__} "
                                  f"({' | '.join(self._logger.recent) or 'no message'}).",
                                  "The file is damaged or not a vidllm-edge engine. Rebuild: " + self.command)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if n not in ins]
        want_in, want_out = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
        if sorted(ins) != sorted(want_in) or sorted(outs) != sorted(want_out):
            raise CheckpointError(f"Engine file: {self.path}", f"has inputs {ins} and outputs {outs}; the unit "
                                  f"{spec.name} has {want_in} and {want_out}.", "Rebuild: " + self.command)
        self._dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self.cuda_graph = cuda_graph
        self._plans: dict[tuple, _Plan] = {}
        self._bound_shapes: tuple | None = None

    def __call__(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        symbols = validate_feed(self.spec, feed, self.bound)
        check_profile(self.spec, symbols, self.profile, self.entry, self.engines_dir)
        return self._run(dict(feed))

    # -- execution ------------------------------------------------------------------------------------
    def _set_shapes(self, plan: _Plan) -> None:
        if self._bound_shapes == plan.shapes:
            return
        for t, shape in zip(self.spec.inputs, plan.shapes):
            if not self.context.set_input_shape(t.name, shape):
                raise InputError(f"Input tensor: {t.name}", f"shape {list(shape)} is refused by the engine "
                                 f"({' | '.join(self._logger.recent) or 'no message'}).", "Rebuild: " + self.command)
        self._bound_shapes = plan.shapes

    def _plan(self, shapes: tuple[tuple[int, ...], ...]) -> _Plan:
        plan = _Plan(shapes, {})
        self._bound_shapes = None
        self._set_shapes(plan)
        for t in self.spec.outputs:
            shape = tuple(self.context.get_tensor_shape(t.name))
            assert all(d >= 0 for d in shape), f"output {t.name} has unresolved shape {shape}"
            plan.out_shapes[t.name] = shape
        self._plans[shapes] = plan
        return plan

    def _staging(self, plan: _Plan, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in plan.staging:
            plan.staging[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
        return plan.staging[name]

    def _bind_inputs(self, plan: _Plan, feed: dict[str, torch.Tensor], in_place: bool) -> None:
        for t, shape in zip(self.spec.inputs, plan.shapes):
            x = feed[t.name]
            if in_place and x.device == self.device and x.dtype == self._dtypes[t.name] and x.is_contiguous():
                x.record_stream(self.stream)  # the caller may free it while the engine still reads it
                ptr = x.data_ptr()
            else:
                buf = self._staging(plan, t.name, shape)
                buf.copy_(x, non_blocking=True)
                ptr = buf.data_ptr()
            self.context.set_tensor_address(t.name, ptr)

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.path.name}: "
                               f"{' | '.join(self._logger.recent) or 'no message'}")

    def _run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = tuple(tuple(int(d) for d in feed[t.name].shape) for t in self.spec.inputs)
        plan = self._plans.get(shapes) or self._plan(shapes)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # inputs produced on the caller's stream are ready
        with torch.cuda.stream(self.stream):
            if self.cuda_graph:
                outs = self._run_graph(plan, feed)
            else:
                self._set_shapes(plan)
                self._bind_inputs(plan, feed, in_place=True)
                outs = {}
                for t in self.spec.outputs:
                    y = torch.empty(plan.out_shapes[t.name], dtype=self._dtypes[t.name], device=self.device)
                    self.context.set_tensor_address(t.name, y.data_ptr())
                    outs[t.name] = y
                self._execute()
        caller.wait_stream(self.stream)
        result = {}
        for t in self.spec.outputs:
            y = outs[t.name]
            if not self.cuda_graph:
                y.record_stream(caller)  # allocated on the unit's stream, used on the caller's
            result[t.name] = y if y.dtype == _SPEC_DTYPES[t.dtype] else y.to(_SPEC_DTYPES[t.dtype])
        return result

    def _run_graph(self, plan: _Plan, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if plan.graph is None:
            self._set_shapes(plan)
            plan.outputs = {t.name: torch.empty(plan.out_shapes[t.name], dtype=self._dtypes[t.name], device=self.device)
                            for t in self.spec.outputs}
            self._bind_inputs(plan, feed, in_place=False)
            for name, y in plan.outputs.items():
                self.context.set_tensor_address(name, y.data_ptr())
            self._execute()  # TensorRT needs one enqueue after a shape change before a capture
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    self._execute()
            except Exception as exc:  # some engines cannot be captured; say so, keep running eagerly
                warnings.warn(f"{self.path.name}: CUDA graph capture failed ({exc}); running without graphs.",
                              stacklevel=3)
                self.cuda_graph = False
                return dict(plan.outputs)
            plan.graph = graph
            return dict(plan.outputs)
        for t, shape in zip(self.spec.inputs, plan.shapes):
            self._staging(plan, t.name, shape).copy_(feed[t.name], non_blocking=True)
        plan.graph.replay()
        return dict(plan.outputs)


# -- engines folder -> pipeline bundle -------------------------------------------------------------------


def load_engines(engines_dir: str | Path, export_dir: str | Path | None = None, providers: list | None = None, *,
                 cuda_graph: bool = False, verify: str = "sha256", missing: str = "error"):
    """Check an engines folder against its export folder and this machine; prepare lazy unit construction.

    Returns an :class:`~vidllm_edge.runtime.ort_backend.ExportBundle` (cfg, image_hw, units_for,
    decoder_factory), the same shape as ``load_export``'s, so the pipeline takes either.

    Every engine is checked against the installed TensorRT and this GPU up front, and all mismatching
    engines are reported in one EngineMismatchError. Vision units without an engine are an error; with
    ``missing="onnxruntime"`` they run on ONNX Runtime instead, and a line on stderr says which.

    The LLM runs on the ONNX Runtime decoder (``runtime/ort_llm.py``) with ``providers`` (default CPU; pass
    :func:`ort_trt_providers` to have ONNX Runtime's TensorRT execution provider compile it). `vidllm-edge
    build` does not produce engines for the LLM units yet; an ``engines.json`` that lists them is refused
    rather than silently ignored.
    """
    from vidllm_edge.models.config import VidLLMConfig
    from vidllm_edge.models.tokenizer import load_tokenizer
    from vidllm_edge.runtime.ort_backend import ExportBundle, OrtUnit, resolve_providers
    from vidllm_edge.runtime.ort_llm import OrtDecoder

    if missing not in ("error", "onnxruntime"):
        raise InputError(f"Argument: missing={missing!r}", "is not 'error' or 'onnxruntime'.", "Use one of those.")
    engines_dir = Path(engines_dir)
    data = read_engines(engines_dir)
    if not (export_dir or data.get("export")):
        raise CheckpointError(f"Engines manifest: {engines_dir / 'engines.json'}", "names no export folder.",
                              "Pass the export folder the engines were built from.")
    export_dir = Path(export_dir or data["export"])
    manifest = M.read_manifest(export_dir)
    llm = [u for u in data["engines"] if u in LLM_UNITS]
    if llm:
        raise CheckpointError(f"Engines folder: {engines_dir}", f"has engines for {llm}, which this runtime does not "
                              "run (the LLM runs on the ONNX Runtime decoder).",
                              "Remove those entries, or update vidllm-edge.")
    M.verify_files(export_dir, manifest, units=[u for u in LLM_UNITS if u in manifest["units"]])
    image_hw = tuple(manifest["image_hw"])
    trt = require("tensorrt", "the TensorRT backend")
    cc = gpu_compute_capability()
    have = [u for u in U.VISION_UNITS if u in data["engines"]]
    lacking = [u for u in U.VISION_UNITS if u not in data["engines"]]
    if lacking and missing == "error":
        raise CheckpointError(f"Engines folder: {engines_dir}", f"has no engines for {', '.join(lacking)} (it has: "
                              f"{', '.join(have) or 'none'}).",
                              f"Build them: vidllm-edge build --export {export_dir} --precision fp16 --units "
                              f"{' '.join(lacking)} --out {engines_dir}; or load with missing='onnxruntime'.")
    ort_providers = [p for p in (providers or []) if isinstance(p, str)] or ["CPUExecutionProvider"]
    digests, diffs, bad = {}, [], []
    for unit in have:
        entry = data["engines"][unit]
        if tuple(entry["image_hw"]) != image_hw:
            raise CheckpointError(f"Engine: {engines_dir / entry['file']}", f"was built for {entry['image_hw']}, the "
                                  f"export is {list(image_hw)}.",
                                  "Rebuild: " + entry_rebuild_command(entry, engines_dir))
        digests[unit] = _current_onnx_digest(export_dir, manifest, unit, entry)
        found = check_engine(entry, trt.__version__, cc, digests[unit])
        if found:
            bad.append(unit)
            diffs += [d for d in found if d not in diffs]
    if bad:
        entry = data["engines"][bad[0]]
        raise EngineMismatchError(f"{', '.join(bad)} in {engines_dir}", diffs,
                                  entry_rebuild_command(entry, engines_dir))
    if lacking:
        print(f"note: no engines for {', '.join(lacking)}; they run on ONNX Runtime ({', '.join(ort_providers)}).",
              file=sys.stderr)
    cfg = VidLLMConfig.from_dict(json.loads((export_dir / "config.json").read_text()))
    tokenizer = load_tokenizer(export_dir)
    dims = {k: v for k, v in fixed_dims(manifest).items() if k in ("H", "W", "P", "C", "D")}
    cache: dict[str, Backend] = {}

    def unit(name: str) -> Backend:
        if name not in cache:
            spec = U.VISION_UNITS[name]
            bound = {k: v for k, v in dims.items() if any(k in t.shape for t in spec.inputs + spec.outputs)}
            if name in data["engines"]:
                entry = data["engines"][name]
                cache[name] = TrtUnit(spec, engines_dir / entry["file"], entry, bound, onnx_sha=digests[name],
                                      cuda_graph=cuda_graph, verify=verify, engines_dir=engines_dir)
            else:
                cache[name] = OrtUnit(spec, export_dir / manifest["units"][name]["file"],
                                      resolve_providers(ort_providers), bound)
        return cache[name]

    def units_for(hw: tuple[int, int]) -> dict[str, Backend]:
        if tuple(hw) != image_hw:
            raise InputError(f"Frame size: {hw[0]}x{hw[1]}", f"differs from the engines' {image_hw[0]}x{image_hw[1]}.",
                             "Export and build for this size (vidllm-edge export --image-hw HxW, then build).")
        return {name: unit(name) for name in U.VISION_UNITS}

    def box_fn(hidden: torch.Tensor) -> torch.Tensor:
        return unit("box_head")({"hidden": torch.as_tensor(hidden).float().reshape(1, -1)})["boxes"].cpu()

    def decoder_factory():
        return OrtDecoder(export_dir / "onnx", tokenizer, cfg.llm, box_fn=box_fn,
                          providers=providers or ["CPUExecutionProvider"])

    return ExportBundle(export_dir, manifest, cfg, image_hw, units_for, decoder_factory)


def _current_onnx_digest(export_dir: Path, manifest: Mapping[str, Any], unit: str,
                         entry: Mapping[str, Any]) -> str | None:
    """The digest of the ONNX the engine claims to come from, as the export folder has it now."""
    rel = (entry.get("build") or {}).get("onnx_file")
    files = manifest["units"].get(unit, {}).get("files", {})
    if rel is None or rel in files:
        return onnx_digest(files) if files else None
    path = export_dir / rel  # e.g. onnx/<unit>.int8.onnx from calibration, not in the export manifest
    if not path.is_file():
        return None  # the graph is gone; the engine itself was checked by size and hash
    extra = {p.name: M.sha256(p) for p in path.parent.glob(path.name + "*")}
    return onnx_digest(extra)


def ort_trt_providers(cache_dir: str | Path, *, fp16: bool = True, workspace_mb: int | None = None,
                      device_id: int = 0) -> list:
    """ONNX Runtime provider list for its TensorRT execution provider, caches inside ``cache_dir``.

    Engine and timing caches go to ``cache_dir/ort-trt.<ort version>[.<trt version>].<sm>``, a folder keyed
    by what invalidates them (ONNX Runtime reuses a cached engine without checking the TensorRT version).
    The CUDA provider follows, as ONNX Runtime recommends, for nodes TensorRT does not take.
    Option names: onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html.
    """
    from vidllm_edge import atomic

    ort = require("onnxruntime", "ONNX Runtime's TensorRT execution provider")
    parts = [f"ort{ort.__version__}"]
    if available("tensorrt"):  # optional: it only names the folder
        parts.append(f"trt{require('tensorrt').__version__}")
    if torch.cuda.is_available():
        parts.append(sm_tag(torch.cuda.get_device_capability(device_id)))
    folder = atomic.ensure_dir(Path(cache_dir) / ("ort-trt." + ".".join(parts)), "TensorRT cache folder")
    options: dict[str, Any] = {
        "device_id": device_id,
        "trt_fp16_enable": bool(fp16),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(folder),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(folder),
    }
    if workspace_mb:
        options["trt_max_workspace_size"] = int(workspace_mb) << 20
    return [("TensorrtExecutionProvider", options), ("CUDAExecutionProvider", {"device_id": device_id})]


__all__ = ["TrtUnit", "load_engines", "ort_trt_providers", "check_profile", "trt_logger", "gpu_compute_capability"]
