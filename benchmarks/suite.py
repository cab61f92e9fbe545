"""The benchmark suite: the same frames through every backend x precision x frame count; latency per stage
and end to end, parity against the FP32 torch reference, roofline floors (DESIGN.md §8).

Configurations. A row is (backend, precision, frames S). Backends run the vision units:
``torch`` (the reference modules, eager), ``torch-compiled`` (the same unit callables through
``torch.compile``), ``onnxruntime`` (an export folder; the CUDA provider when installed and the device is
CUDA, else the CPU provider, and the row says which), ``tensorrt`` (an engines folder from ``vidllm-edge
build``). Precision is the vision units': fp32; fp16 (torch: autocast, CUDA only; ONNX Runtime: the FP16
export); int8 (the export's Q/DQ graphs ``onnx/<unit>.int8.onnx``, every MatMul/Conv quantized, no
sensitivity pass; units without one stay FP32 and the row lists them). The LLM of a row: ``torch`` rows use
the reference decoder (transformers, FP32, the reference the others are compared with); every other row the
fast decoder (static KV cache; compiled with CUDA graphs on CUDA, and on the CPU for ``torch-compiled``),
FP32 for fp32 rows and bf16 on CUDA for fp16/int8 rows (LLM weight quantization is measured by
``benchmarks/llm_decode.py``). End of sequence is ignored so every answer has exactly ``answer_tokens``.

Timing and TensorRT Edge-LLM's profile field names: `benchmarks/timing.py`; parity and gates:
`benchmarks/parity.py`; floors: `benchmarks/roofline.py`; the report: `benchmarks/report.py`.

Not measured: video decoding (frames are decoded before timing), the tokenizer's text output, batch > 1.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from vidllm_edge import atomic
from vidllm_edge.benchmarks.exports import VISION_UNITS, ort_units, prepare_exports, resolve_artifacts
from vidllm_edge.benchmarks.parity import (Recording, Reference, check_gate, default_gates,
                                           measure_parity)
from vidllm_edge.benchmarks.timing import (ENCODE_STAGES, Clock, MemoryMonitor, aggregate, clocked_pipeline,
                                           edge_llm_profile, first_token)
from vidllm_edge.errors import DependencyError, InputError, VidLLMError
from vidllm_edge.runtime.backend import Backend, validate_feed

BACKENDS = ("torch", "torch-compiled", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_QUESTION = "What objects are in this room, and where are they?"
CONTEXT_EXTRA = 64  # tokens of system prompt, template and question next to the visual tokens (memory fit)


@dataclasses.dataclass
class BenchOptions:
    """What to run. Defaults are defined here only (the CLI passes what the user gave)."""

    backends: tuple[str, ...] = ("torch", "onnxruntime")
    precisions: tuple[str, ...] = ("fp32",)
    rows: tuple[tuple[str, str], ...] | None = None  # (backend, precision) pairs instead of backends x precisions
    frames: tuple[int, ...] | None = None          # default: the model's num_frames; rows run in this order
    reps: int = 10
    warmup: int = 3
    answer_tokens: int = 64
    question: str = DEFAULT_QUESTION
    image_hw: tuple[int, int] | None = None        # default: the export's, else what a 4:3 video becomes
    video: Path | None = None                      # default: the synthetic room (seed 0)
    export: Path | None = None                     # reuse/keep export folders (DIR/fp32, DIR/fp16)
    engines: Path | None = None                    # a TensorRT engines folder
    device: str | None = None                      # default: cuda when available
    gates: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # overrides of default_gates()
    max_seconds: float | None = None
    opset: int = 18                                # of exports this run makes
    compile_backend: str = "inductor"
    resume: bool = False
    prepare_only: bool = False


def check_options(opts: BenchOptions) -> None:
    """InputError for values no run could use (names are checked by the parsers)."""
    for flag, value, low in (("--reps", opts.reps, 1), ("--warmup", opts.warmup, 0), ("--answer-tokens",
                                                                                       opts.answer_tokens, 1)):
        if value < low:
            raise InputError(f"Argument: {flag} {value}", f"must be at least {low}.", f"Use e.g. {flag} {max(low, 3)}.")
    if opts.warmup < 1 and (opts.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        raise InputError(f"Argument: --warmup {opts.warmup}", "must be at least 1 on CUDA: the first repetition "
                         "compiles and captures CUDA graphs.", "Use e.g. --warmup 2.")
    if opts.max_seconds is not None and opts.max_seconds <= 0:
        raise InputError(f"Argument: --max-seconds {opts.max_seconds:g}", "must be positive.", "Use e.g. 500.")
    if not opts.question.strip():
        raise InputError("Argument: --question", "is empty.", "Ask a question in words.")
    if opts.rows is not None and (set(opts.backends) != {b for b, _ in opts.rows}
                                  or set(opts.precisions) != {p for _, p in opts.rows}):
        raise InputError("Argument: --rows", "and --backends/--precision name different configurations.",
                         "Give either --rows BACKEND:PRECISION,... or --backends and --precision, not both.")
    for name in opts.backends:
        if name not in BACKENDS:
            raise InputError(f"Backend: {name}", "is unknown.", f"Choose from {', '.join(BACKENDS)}.")
    for name in opts.precisions:
        if name not in PRECISIONS:
            raise InputError(f"Precision: {name}", "is unknown.", f"Choose from {', '.join(PRECISIONS)}.")


# ------------------------------------------------------------------------------------------ backends


class PlacedUnit(Backend):
    """A torch unit run on ``device`` (inputs moved there), optionally under autocast (outputs cast back to
    FP32, the unit contract) and through ``torch.compile``."""

    name = "torch"

    def __init__(self, unit, device: torch.device, autocast: torch.dtype | None = None,
                 compile_backend: str | None = None) -> None:
        super().__init__(unit.spec, unit.bound)
        fn = unit.fn
        if autocast is not None:
            inner = fn

            def fn(**feed):
                with torch.autocast(device.type, dtype=autocast):
                    out = inner(**feed)
                return {k: v.float() for k, v in out.items()}
        if compile_backend:
            # Every PlacedUnit compiles this same wrapper code, and torch._dynamo keeps at most recompile_limit
            # (8) graphs per code object, then runs the rest EAGER with only a warning: on the H100 the compiled
            # geometry unit at 8 frames ran eager after the five units' 32-frame graphs. Room for every unit and
            # frame count of a run:
            import torch._dynamo.config as dynamo_config

            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
            fn = torch.compile(fn, backend=compile_backend)
        self.fn, self.device, self.compiled = fn, device, bool(compile_backend)
        # The input axes that vary with the scene (frames S, metric-depth frames Sm, visual tokens N: the spec's
        # symbols not fixed by the frame size) are compiled symbolic: one graph serves every frame count (as one
        # TensorRT profile does), not one compile per count.
        self.s_axes = {t.name: [i for i, d in enumerate(t.shape) if isinstance(d, str) and d not in unit.bound]
                       for t in unit.spec.inputs}

    def __call__(self, feed):
        feed = {k: v.to(self.device) for k, v in feed.items()}
        validate_feed(self.spec, feed, self.bound)
        if self.compiled:
            for name, axes in self.s_axes.items():
                for axis in axes:
                    torch._dynamo.maybe_mark_dynamic(feed[name], axis)
        with torch.inference_mode():
            return self.fn(**feed)


# -------------------------------------------------------------------------------------------- the run


class Suite:
    """One benchmark run: the model on its device, the frames, the artifacts, and the rows measured so far."""

    def __init__(self, model, model_name: str, opts: BenchOptions, log: TextIO | None = None,
                 started: float | None = None) -> None:
        check_options(opts)
        self.log = log or sys.stderr
        self.opts = opts
        self.model = model.eval()
        self.model_name = model_name
        self.cfg = model.cfg
        self.frames = tuple(opts.frames or (model.cfg.num_frames,))
        self.device = self._device(opts.device)
        self._fp: str | None = None
        self.arts = resolve_artifacts(opts, model, model_name, self.frames, self.fingerprint)
        self.image_hw = self.arts.image_hw
        self.gates = default_gates()
        for precision, overrides in opts.gates.items():
            self.gates.setdefault(precision, {}).update(overrides)
        from vidllm_edge.models.llm import GenerationConfig

        self.gen = GenerationConfig(max_new_tokens=opts.answer_tokens, temperature=0.0)
        self.start = time.perf_counter() if started is None else started  # --max-seconds counts from here
        self._decoders: dict[tuple, Any] = {}
        self._torch_units: dict[tuple, dict] = {}
        self._units: dict[tuple, tuple] = {}
        self._references: dict[int, Reference] = {}
        self.prepared: list[str] = []
        self.peaks: dict[str, Any] = {}
        self.portable_cfg = model.portable_config()  # the config with the LLM as a dict (roofline counting)

    @staticmethod
    def _device(name: str | None) -> torch.device:
        if name is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if name not in ("cpu", "cuda"):
            raise InputError(f"Argument: --device {name}", "is not cpu or cuda.", "Use --device cpu or --device cuda.")
        if name == "cuda" and not torch.cuda.is_available():
            raise DependencyError("CUDA GPU", "is not visible to torch.", "Check the driver (nvidia-smi) and that torch "
                                  "is a CUDA build, or use --device cpu.")
        return torch.device(name)

    def fingerprint(self) -> str:
        if self._fp is None:
            from vidllm_edge.calibration.record import state_fingerprint

            self._fp = state_fingerprint(self.model)
        return self._fp

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {msg}", file=self.log, flush=True)

    # -- setup ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Exports and INT8 graphs the onnxruntime rows need (on the CPU, before the model moves)."""
        if "onnxruntime" in self.opts.backends and self.ort_reason() is None:
            self.prepared = prepare_exports(self.model, self.model_name, self.arts, self.opts, self.frames,
                                            self.fingerprint, self.log)

    def close(self) -> None:
        if self.arts.temporary is not None:
            shutil.rmtree(self.arts.temporary, ignore_errors=True)

    def to_device(self) -> None:
        self.model.to(self.device)
        if self.device.type == "cuda":  # fp32 rows and the reference compute in true FP32, not TF32
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

    def scene_frames(self, s: int):
        """The frames of the scene at ``s`` frames, already at the benchmark's frame size (uint8 RGB)."""
        from vidllm_edge.calibration.record import fit_frames
        from vidllm_edge.runtime.video import Frames, read_frames, sample_indices

        if self.opts.video is not None:
            frames = read_frames(self.opts.video, s)
            return dataclasses.replace(frames, rgb=fit_frames(frames.rgb, self.image_hw, self.cfg))
        if not hasattr(self, "_rendered"):
            from vidllm_edge.synthetic import render_frames

            h, w = self.image_hw
            scene = render_frames(num_frames=max(self.frames), width=w, height=h, seed=0)
            self._rendered = fit_frames(scene.rgb, self.image_hw, self.cfg)  # [N, H, W, 3]
        total = self._rendered.shape[0]
        idx = sample_indices(total, s)
        return Frames(np.ascontiguousarray(self._rendered[idx]), idx, total, None, "synthetic room (seed 0)")

    # -- what a row runs -----------------------------------------------------------------------------
    def ort_reason(self) -> str | None:
        from vidllm_edge.optional import require

        try:
            require("onnxruntime", "the onnxruntime backend")
        except DependencyError as exc:
            return str(exc).replace("\n", " ")
        return None

    def ort_providers(self) -> list[str]:
        import onnxruntime

        cuda = self.device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        return ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]

    def skip_reason(self, backend: str, precision: str) -> str | None:
        """Why a row cannot run here (None: it can)."""
        if backend in ("torch", "torch-compiled"):
            if precision == "int8":
                return ("torch has no INT8 path for the vision units: INT8 runs as Q/DQ graphs on onnxruntime "
                        "or tensorrt")
            if precision == "fp16" and self.device.type != "cuda":
                return "fp16 autocast of the torch units is measured on CUDA only (no fast FP16 kernels on the CPU)"
            return None
        if backend == "onnxruntime":
            reason = self.ort_reason()
            if reason:
                return reason
            folder = self.arts.exports.get("fp32" if precision == "int8" else precision)
            if folder is None or not self.arts.existing.get("fp32" if precision == "int8" else precision):
                return f"no {precision} export in {self.opts.export} (it holds {', '.join(self.arts.exports)})"
            return None
        if self.arts.engines is None:
            return "no --engines folder given (vidllm-edge build makes one)"
        from vidllm_edge.optional import require

        try:
            require("tensorrt", "the TensorRT backend")
        except DependencyError as exc:
            return str(exc).replace("\n", " ")
        if self.device.type != "cuda":
            return "TensorRT engines run on a CUDA GPU; this run is on the CPU"
        if precision != self.arts.engines_precision:
            return f"the engines folder holds {self.arts.engines_precision} engines"
        return None

    def torch_units(self, precision: str, compiled: bool) -> dict[str, Backend]:
        key = (precision, compiled)
        if key not in self._torch_units:
            from vidllm_edge.runtime.torch_backend import torch_units

            base = torch_units(self.model, self.image_hw)
            autocast = torch.float16 if precision == "fp16" else None
            backend = self.opts.compile_backend if compiled else None
            self._torch_units[key] = {n: PlacedUnit(base[n], self.device, autocast, backend) for n in VISION_UNITS}
        return self._torch_units[key]

    def units(self, backend: str, precision: str) -> tuple[dict[str, Backend], dict[str, Any]]:
        """The vision units of a row and what they are (providers, units left in FP); built once per backend and
        precision (sessions and engines do not depend on the frame count)."""
        if backend in ("torch", "torch-compiled"):
            return self.torch_units(precision, backend == "torch-compiled"), {}
        if (backend, precision) not in self._units:
            self._units[(backend, precision)] = self._runtime_units(backend, precision)
        return self._units[(backend, precision)]

    def release_cached(self) -> None:
        """Give the blocks torch's caching allocator holds back to the device: ONNX Runtime and TensorRT allocate
        outside it (on the H100 an S=32 ONNX Runtime row ran out of memory next to a torch cache of the FP32
        reference's activations)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _runtime_units(self, backend: str, precision: str) -> tuple[dict[str, Backend], dict[str, Any]]:
        self.release_cached()
        p = self.cfg.patch_size
        dims = {"H": self.image_hw[0], "W": self.image_hw[1], "P": (self.image_hw[0] // p) * (self.image_hw[1] // p),
                "C": self.cfg.embed_dim, "D": self.model.dim_llm}
        if backend == "onnxruntime":
            providers = self.ort_providers()
            folder = self.arts.exports["fp32" if precision == "int8" else precision]
            units, fp_units = ort_units(folder, precision, providers, dims)
            return units, {"providers": providers, "export": str(folder),
                           **({"int8_fp32_units": fp_units} if precision == "int8" else {})}
        from vidllm_edge.runtime.trt_backend import load_engines

        providers = self.ort_providers()
        bundle = load_engines(self.arts.engines, providers=providers, missing="onnxruntime")
        return dict(bundle.units_for(self.image_hw)), {"engines": str(self.arts.engines)}

    def decoder(self, backend: str, precision: str):
        """The row's LLM decoder (see the module docstring), cached: one per kind for the whole run."""
        from vidllm_edge.models.llm import ReferenceDecoder
        from vidllm_edge.runtime.fast_decoder import FastDecoder

        cuda = self.device.type == "cuda"
        if backend == "torch":
            key = ("reference", torch.float32, False)
        else:
            dtype = torch.float32 if precision == "fp32" or not cuda else torch.bfloat16
            key = ("fast", dtype, cuda or backend == "torch-compiled")
        if key not in self._decoders:
            m = self.model
            if key[0] == "reference":
                dec = ReferenceDecoder(m.llm, m.tokenizer, m.box_head, self.cfg.llm)
            else:
                dec = FastDecoder.from_hf(m.llm, m.tokenizer, m.box_head, self.cfg.llm, dtype=key[1],
                                          device=self.device, compile=key[2])
                dec.loop.backend = self.opts.compile_backend  # used when the step is first compiled
            dec.eos_ids = set()  # every answer has exactly answer_tokens tokens
            self._decoders[key] = dec
        kind, dtype, compiled = key
        return self._decoders[key], {"decoder": kind, "dtype": str(dtype).replace("torch.", ""), "compiled": compiled}

    def pipeline(self, units: dict[str, Backend], decoder, backend: str):
        from vidllm_edge.runtime.pipeline import Pipeline

        # Frames arrive at image_hw; preprocessing with that short side is then the identity.
        cfg = dataclasses.replace(self.cfg, image_size=min(self.image_hw))
        return Pipeline(None, backend=backend, generation=self.gen, cfg=cfg, units_for=lambda hw: units,
                        decoder_factory=lambda: decoder, image_hw=self.image_hw)

    # -- the FP32 reference --------------------------------------------------------------------------
    def reference(self, s: int) -> Reference:
        if s not in self._references:
            self.say(f"reference (torch fp32, eager) at {s} frames ...")
            recording = {n: Recording(u) for n, u in self.torch_units("fp32", False).items()}
            decoder, _ = self.decoder("torch", "fp32")
            scene = self.pipeline(recording, decoder, "torch").encode(self.scene_frames(s))
            with torch.inference_mode():
                q_tokens = len(decoder._question_ids(self.opts.question)[0])
            answer = scene.ask(self.opts.question, self.gen)
            self._references[s] = Reference.from_run(recording, scene, answer, q_tokens)
            del recording, scene, answer
            self.release_cached()
        return self._references[s]

    # -- one row ------------------------------------------------------------------------------------
    def run_row(self, backend: str, precision: str, s: int) -> dict[str, Any]:
        row: dict[str, Any] = {"backend": backend, "precision": precision, "frames": s}
        reason = self.skip_reason(backend, precision)
        if reason:
            return {**row, "status": "skipped", "reason": reason}
        start = time.perf_counter()
        ref = self.reference(s)
        try:
            units, vision_info = self.units(backend, precision)
        except DependencyError as exc:  # e.g. ONNX Runtime could not start its CUDA provider: say so, go on
            return {**row, "status": "skipped", "reason": str(exc).replace("\n", " ")}
        decoder, llm_info = self.decoder(backend, precision)
        row.update(vision=vision_info, llm=llm_info, device=str(self.device))
        pipe = self.pipeline(units, decoder, backend)
        frames = self.scene_frames(s)
        reps, scene, answer, memory = self._measure(pipe, frames)
        row.update(aggregate(reps, s, self.opts.answer_tokens), question_tokens=ref.question_tokens)
        row["memory"] = memory
        row["profile"] = edge_llm_profile(reps, row, memory)
        row["parity"] = measure_parity(ref, units, scene, answer, decoder, self.opts.question, self.gen, self.device)
        thresholds = self.gates.get(precision, {})
        failures = check_gate(row["parity"], thresholds)
        row["gate"] = {"thresholds": thresholds, "passed": not failures, "failures": failures}
        row["roofline"] = self.roofline(row)
        row["seconds"] = time.perf_counter() - start
        row["status"] = "ok"
        del units, pipe, scene
        if (backend, precision) in self._units and (s == self.frames[-1] or self.device.type == "cuda"):
            # Free the sessions after their last row, and on CUDA after every row: an ONNX Runtime session's
            # memory arena only grows, and on the H100 two precisions' arenas after 32 frames did not fit.
            del self._units[(backend, precision)]
        self.release_cached()
        return row

    def _measure(self, pipe, frames) -> tuple[list[dict], Any, Any, dict]:
        """Warm-up, then ``reps`` timed scenes; returns per-rep records, the last scene and answer, memory."""
        records = []
        monitor = MemoryMonitor(self.device)

        def one_scene():
            clock = Clock(self.device)
            with clocked_pipeline(pipe, clock):
                scene = pipe.encode(frames)
            missing = [name for name in ENCODE_STAGES if name not in clock.host]
            assert not missing, f"Pipeline.encode no longer times the stages {missing}: update timing.STAGE_GROUPS"
            with clock.span("question_ttft"):
                first_token(scene.decoder, self.opts.question)
            with clock.span("answer"):
                answer = scene.ask(self.opts.question, self.gen)
            return clock, scene, answer

        for _ in range(self.opts.warmup):
            one_scene()
        with monitor:  # peaks of the timed repetitions only
            for _ in range(self.opts.reps):
                clock, scene, answer = one_scene()
                records.append({"host": dict(clock.host), "device": clock.device_ms(),
                                "answer": dict(answer.timings), "visual_tokens": int(scene.visual_tokens.shape[0]),
                                "prefix_tokens": int(scene.decoder.prefix_len)})
        return records, scene, answer, monitor.result()

    def roofline(self, row: dict) -> dict[str, Any]:
        """Floors of the row's stages on this device (peaks measured in this run) and Jetson projections."""
        from vidllm_edge.benchmarks import roofline

        costs = roofline.stage_costs(self.portable_cfg, self.image_hw, row["frames"], row["visual_tokens"],
                                     row["prefix_tokens"], row["question_tokens"], row["answer_tokens"])
        measured = {name: (st["host_ms"] or {}).get("p50") for name, st in row["stages"].items()}
        llm_precision = "fp32" if row["llm"]["dtype"] == "float32" else "fp16"
        return roofline.roofline_rows(costs, row["precision"], llm_precision, measured, self.peaks)

    # -- the whole run ------------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, str, int]]:
        """The rows in run order: frame counts in the order given, then the configurations in theirs."""
        pairs = self.opts.rows or [(b, p) for b in self.opts.backends for p in self.opts.precisions]
        return [(b, p, s) for s in self.frames for b, p in pairs]

    def estimate(self, rows: list[dict], s: int) -> float:
        """Seconds a row at ``s`` frames is expected to take: the slowest row measured at that frame count,
        else the slowest at any count scaled by the frame ratio, else 0 (no basis: run it)."""
        done = [(r["frames"], r["seconds"]) for r in rows if r.get("status") == "ok" and "seconds" in r]
        same = [sec for f, sec in done if f == s]
        if same:
            return max(same)
        return max((sec * s / f for f, sec in done), default=0.0)


# ------------------------------------------------------------------------------------------ report assembly


def environment(device: torch.device) -> dict[str, Any]:
    """Device and software versions of this run."""
    import transformers

    from vidllm_edge.optional import available

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "transformers": transformers.__version__}
    if available("onnxruntime"):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    else:
        info["onnxruntime"] = None
    info["tensorrt"] = __import__("tensorrt").__version__ if available("tensorrt") else None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = {"kind": "cuda", "name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                          "memory_gib": round(props.total_memory / 2**30, 1)}
    else:
        info["device"] = {"kind": "cpu", "name": platform.processor() or platform.machine(),
                          "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    return info


def _resume_rows(out: Path | None, meta: dict, log: TextIO) -> list[dict]:
    """Rows of an earlier run in ``out`` to keep (--resume); InputError when that run measured something else.
    The earlier runs' settings go to ``meta["history"]``."""
    from vidllm_edge.benchmarks.report import REPORT_JSON, load_report

    if out is None or not (out / REPORT_JSON).is_file():
        return []
    old = load_report(out / REPORT_JSON)
    keys = ("model", "image_hw", "reps", "warmup", "answer_tokens", "question")
    diffs = [k for k in keys if old["meta"]["run"].get(k) != meta["run"].get(k)]
    if old["meta"]["environment"]["device"].get("name") != meta["environment"]["device"].get("name"):
        diffs.append("device")
    if diffs:
        raise InputError(f"Output folder: {out}", f"holds a report of another run (differs in {', '.join(diffs)}); "
                         "--resume only continues the same measurement.", "Use another --out folder, or drop --resume.")
    kept = [r for r in old["configs"] if r.get("status") == "ok"]
    meta["history"] = old["meta"].get("history", []) + [old["meta"]["run"]]
    print(f"resuming: {len(kept)} measured row(s) kept from {out / REPORT_JSON}", file=log, flush=True)
    return kept


def run_meta(suite: Suite, model_name: str) -> dict[str, Any]:
    """What this run measures and on what (``meta`` of the report)."""
    opts, cfg = suite.opts, suite.cfg
    return {"environment": environment(suite.device), "run": {
        "model": model_name, "image_hw": list(suite.image_hw), "reps": opts.reps, "warmup": opts.warmup,
        "answer_tokens": opts.answer_tokens, "question": opts.question, "frames": list(suite.frames),
        "backends": list(opts.backends), "precisions": list(opts.precisions),
        "rows": [f"{b}:{p}" for b, p in opts.rows] if opts.rows else None, "gates": suite.gates,
        "video": str(opts.video) if opts.video else "synthetic room (seed 0), rendered at the frame size",
        "export": str(opts.export) if opts.export else "temporary", "opset": opts.opset,
        "engines": str(opts.engines) if opts.engines else None, "compile_backend": opts.compile_backend,
        "max_seconds": opts.max_seconds, "tf32": "off (CUDA fp32 matmuls and convolutions in true FP32)",
        "identity_checked_by": suite.arts.identity,
        "vision": {"embed_dim": cfg.embed_dim, "depth": int(cfg.vggt.aggregator["depth"]), "encoder": cfg.encoder.kind,
                   "adapter": cfg.adapter.mode},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}


def run_bench(model, model_name: str, opts: BenchOptions, out: Path | None, log: TextIO | None = None,
              started: float | None = None) -> dict:
    """Run every configuration of ``opts`` on ``model``; write the report into ``out`` after each row (atomically)
    and return it. Bad input raises before anything is computed or written. ``started``: the ``perf_counter()``
    the --max-seconds budget counts from (default: now; the CLI passes its own start, model loading included)."""
    from vidllm_edge.benchmarks import report as R
    from vidllm_edge.benchmarks import roofline

    log = log or sys.stderr
    suite = Suite(model, model_name, opts, log, started)
    try:
        meta = run_meta(suite, model_name)
        rows = _resume_rows(out, meta, log) if opts.resume else []
        if out is not None:
            atomic.ensure_dir(out, "Benchmark output folder")
        suite.prepare()
        meta["run"]["prepared"] = suite.prepared
        if opts.prepare_only:
            suite.say("prepared: " + ("; ".join(suite.prepared) or "everything was already there"))
            return {"prepared": suite.prepared}
        suite.to_device()
        if suite.device.type == "cuda":  # part of every row's peak: the reference model stays on the device
            meta["run"]["resident_model_mb"] = torch.cuda.memory_allocated(suite.device) / 2**20
        suite.say(f"measuring peaks on {suite.device} ...")
        suite.peaks = roofline.measure_peaks(suite.device)
        report = R.new_report(meta, suite.peaks)
        report["configs"] = list(rows)
        done = {(r["backend"], r["precision"], r["frames"]) for r in rows}
        ran = 0
        for backend, precision, s in suite.plan():
            if (backend, precision, s) in done:
                continue
            expected = suite.estimate(report["configs"], s)
            if ran and opts.max_seconds is not None and suite.elapsed() + expected > opts.max_seconds:
                # (the first row of a call always runs, so repeating a --resume command makes progress)
                row = {"backend": backend, "precision": precision, "frames": s, "status": "skipped",
                       "reason": f"would end past the --max-seconds {opts.max_seconds:g} budget "
                                 f"({suite.elapsed():.0f} s spent, ~{expected:.0f} s expected)"}
            else:
                suite.say(f"{backend} {precision} at {s} frames ...")
                ran += suite.skip_reason(backend, precision) is None
                row = _guarded(suite, backend, precision, s)
            suite.say(R.row_line(row))
            report["configs"].append(row)
            if out is not None:
                R.write_report(out, report, plots=row["status"] == "ok")
        _finish(suite, report, rows)
        if out is not None:
            R.write_report(out, report)
        return report
    finally:
        suite.close()


def _guarded(suite: Suite, backend: str, precision: str, s: int) -> dict[str, Any]:
    """One row; an unexpected failure (out of memory, a compile error) is recorded in the row, not fatal. Errors
    caused by the input (VidLLMError) still end the run with exit code 2."""
    try:
        return suite.run_row(backend, precision, s)
    except VidLLMError:
        raise
    except Exception as exc:  # noqa: BLE001 - recorded with its traceback
        import traceback

        return {"backend": backend, "precision": precision, "frames": s, "status": "error",
                "reason": f"{type(exc).__name__}: {str(exc).strip()[:600]}", "traceback": traceback.format_exc()[-3000:]}


def _finish(suite: Suite, report: dict, resumed: list[dict]) -> None:
    """Order the rows; memory fit of every preset at the measured frame counts and precisions; the summary."""
    from vidllm_edge.benchmarks import report as R
    from vidllm_edge.benchmarks import roofline
    from vidllm_edge.export.exporter import default_image_hw
    from vidllm_edge.models.config import PRESETS

    report["configs"].sort(key=lambda r: (r["frames"], BACKENDS.index(r["backend"]), PRECISIONS.index(r["precision"])))
    frames = sorted({r["frames"] for r in report["configs"]} | set(suite.frames))
    precisions = [p for p in PRECISIONS if p in suite.opts.precisions or any(r["precision"] == p for r in resumed)]
    report["memory_fit"] = roofline.memory_fit(
        PRESETS, frames, precisions,
        lambda cfg: suite.image_hw if cfg.image_size == suite.cfg.image_size else default_image_hw(cfg),
        lambda cfg: cfg.scene.max_visual_tokens + CONTEXT_EXTRA + suite.opts.answer_tokens)
    report["complete"] = True
    report["summary"] = R.summarize(report)
