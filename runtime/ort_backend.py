"""The ONNX Runtime backend: an export folder's units behind the one backend interface.

CPU provider everywhere; the CUDA provider where onnxruntime-gpu is installed, with I/O binding: input
tensors already on the GPU are bound in place, and outputs are written into torch tensors allocated on
the GPU (their shapes follow from the unit's spec), so chained units never copy through the host.
The manifest and every file's sha256 are checked before any session is created.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vidllm_edge import manifest as M
from vidllm_edge import units as U
from vidllm_edge.errors import CheckpointError, DependencyError
from vidllm_edge.optional import require
from vidllm_edge.runtime.backend import Backend, validate_feed

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def resolve_providers(providers: list[str] | None) -> list[str]:
    """Providers to use; asking for one that is not installed is an error (no silent fallback)."""
    ort = require("onnxruntime", "the onnxruntime backend")
    available = ort.get_available_providers()
    wanted = providers or ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise DependencyError(f"ONNX Runtime providers: {', '.join(missing)}", f"are not available (installed: "
                              f"{', '.join(available)}).", "Install onnxruntime-gpu for CUDAExecutionProvider, "
                              "or use --providers CPUExecutionProvider.")
    return wanted


def open_session(path: Path, providers: list[str], basic_optimizations: bool = False):
    """An InferenceSession on ``providers``; a CheckpointError naming a corrupted/unreadable graph, and a
    DependencyError when ONNX Runtime could not start the first provider asked for.

    ONNX Runtime itself, when a provider fails to initialise (missing CUDA/cuDNN libraries, a driver
    mismatch), retries on the CPU and only warns: a GPU run would silently become a CPU run (seen on the
    lent H100: a 100 ms FP16 unit took 11 s). Here that is an error that carries ONNX Runtime's reason.

    ``basic_optimizations``: only ONNX Runtime's basic graph rewrites. Needed for Q/DQ graphs at opset >= 21,
    where an extended-level rewrite inserts a QuantizeLinear with ``output_dtype`` that ONNX Runtime's own type
    check then rejects (microsoft/onnxruntime#25526: "output_dtype INT8 does not match y_zero_point type UINT8").
    """
    import warnings

    ort = require("onnxruntime", "the onnxruntime backend")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # ONNX Runtime's worker threads spin after each run by default, taking the cores from the torch steps
    # between units (measured: the tiny scene on 2 CPU cores 2.2x slower); the units run back to back anyway.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if basic_optimizations:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # entries are names or (name, options) pairs (ort_trt_providers)
    first = (providers[0] if isinstance(providers[0], str) else providers[0][0]) if providers else None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            session = ort.InferenceSession(str(path), sess_options=options, providers=provider_options(providers))
    except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf types
        text = " ".join(str(exc).split())
        if providers and first != "CPUExecutionProvider" and any(m in text for m in DEVICE_FAILURES):
            raise DependencyError(f"ONNX Runtime provider: {first}", f"failed while loading {Path(path).name}: "
                                  f"{_device_failure(text)}.", "The device is out of memory or its libraries failed: "
                                  "free device memory (other processes, other sessions), or use fewer frames.") from exc
        raise CheckpointError(f"ONNX file: {path}", f"cannot be loaded ({str(exc).splitlines()[0][:300]}).",
                              "The file is damaged or incomplete: export again (vidllm-edge export ...).") from exc
    if providers:
        check_started(session, first, path, [str(w.message) for w in caught])
    return session


# What ONNX Runtime says when a session fails to load for the device's sake, not the file's (seen on the H100:
# cublasCreate failing for lack of memory next to another precision's sessions).
DEVICE_FAILURES = ("CUBLAS failure", "CUDA failure", "CUDNN failure", "Failed to allocate", "out of memory")


def _device_failure(text: str) -> str:
    at = min(text.find(m) for m in DEVICE_FAILURES if m in text)
    return text[at:at + 200]


def provider_options(providers: list[str]) -> list:
    """``providers`` as ONNX Runtime takes them, with our options: the CUDA provider's memory arena grows by
    what is requested, not to the next power of two (the default may reserve up to twice what a run needs; on
    a Jetson the GPU shares the board's 8-64 GB with everything else). Entries given with options are kept."""
    return [(p, {"arena_extend_strategy": "kSameAsRequested"}) if p == "CUDAExecutionProvider" else p
            for p in providers]


def needs_basic_rewrites(qdq: bool, opset: int) -> bool:
    """Whether a graph must load with ``basic_optimizations`` (`open_session`): Q/DQ graphs at opset >= 21,
    which ONNX Runtime's extended rewrites break (microsoft/onnxruntime#25526)."""
    return qdq and opset >= 21


def check_started(session, wanted: str, path: Path, warned: list[str] = ()) -> None:
    """DependencyError unless ``session`` runs on ``wanted`` first (ONNX Runtime's own fallback warning, if
    any, is quoted as the reason)."""
    running = session.get_providers()
    if running and running[0] == wanted:
        return
    reason = " ".join(" ".join(warned).split())[:400] or "no reason given"
    raise DependencyError(f"ONNX Runtime provider: {wanted}", f"could not be started for {Path(path).name}; ONNX "
                          f"Runtime fell back to {', '.join(running)} ({reason}).",
                          "Check the CUDA and cuDNN libraries onnxruntime-gpu needs (LD_LIBRARY_PATH, vidllm-edge "
                          "doctor), or ask for --providers CPUExecutionProvider explicitly.")


class OrtUnit(Backend):
    """One exported unit on ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, spec: U.UnitSpec, path: Path, providers: list[str], bound: dict[str, int],
                 basic_optimizations: bool = False) -> None:
        super().__init__(spec, bound)
        self.path = path
        self.session = open_session(path, providers, basic_optimizations)
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        names = [o.name for o in self.session.get_outputs()]
        expected = [t.name for t in spec.outputs]
        if names != expected:
            raise CheckpointError(f"ONNX file: {path}", f"has outputs {names}, the unit {spec.name} has {expected}.",
                                  "Export again with this version of vidllm-edge.")

    def __call__(self, feed):
        symbols = validate_feed(self.spec, feed, self.bound)
        return self._run(dict(feed), symbols)

    def _run(self, feed, symbols=None):
        if self.on_cuda:
            return self._run_cuda(feed, symbols or validate_feed(self.spec, feed, self.bound))
        arrays = {k: v.detach().cpu().numpy() for k, v in feed.items()}
        values = self.session.run([t.name for t in self.spec.outputs], arrays)
        return {t.name: torch.from_numpy(v) for t, v in zip(self.spec.outputs, values)}

    def _run_cuda(self, feed, symbols: dict[str, int]):
        binding = self.session.io_binding()
        device = torch.device("cuda", torch.cuda.current_device())
        keep = []
        for t in self.spec.inputs:
            x = feed[t.name].to(device).contiguous()
            keep.append(x)
            binding.bind_input(t.name, "cuda", device.index, _NP[x.dtype], list(x.shape), x.data_ptr())
        outs = {}
        for t in self.spec.outputs:
            shape = [d if isinstance(d, int) else symbols[d] for d in t.shape]
            y = torch.empty(shape, dtype=_TORCH[t.dtype], device=device)
            binding.bind_output(t.name, "cuda", device.index, _NP[y.dtype], shape, y.data_ptr())
            outs[t.name] = y
        self.session.run_with_iobinding(binding)
        return outs


@dataclass
class ExportBundle:
    """What a pipeline needs from an export folder."""

    folder: Path
    manifest: dict
    cfg: object
    image_hw: tuple[int, int]
    units_for: Callable
    decoder_factory: Callable
    int8_units: list[str] = field(default_factory=list)  # vision units running their INT8 Q/DQ graph


def int8_graphs(folder: Path, manifest: dict) -> dict[str, Path]:
    """The INT8 Q/DQ graph of every vision unit the quantization policy kept in INT8 (``vidllm-edge quantize``
    wrote them and ``quantization_report.json``, with their sha256), each checked against that hash.

    Raises CheckpointError when the folder has no report, or a graph is missing or was changed since.
    """
    from vidllm_edge.calibration.quantize import REPORT

    report_path = folder / f"{REPORT}.json"
    if not report_path.is_file():
        raise CheckpointError(f"Export folder: {folder}", "has no INT8 graphs (no quantization_report.json).",
                              f"Make them: vidllm-edge calibrate ... --out CALIB; vidllm-edge quantize --export {folder} "
                              "--calib CALIB. Or run without --int8.")
    report = json.loads(report_path.read_text())
    graphs = {}
    for unit, entry in report.get("units", {}).items():
        if not entry.get("keep_int8") or unit not in U.VISION_UNITS:
            continue
        path = folder / entry["file"]
        if not path.is_file() or M.sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"INT8 graph: {path}", "is missing or differs from the one quantization_report.json "
                                  "records.", f"Quantize again: vidllm-edge quantize --export {folder} --calib CALIB.")
        graphs[unit] = path
    return graphs


def load_export(folder: str | Path, providers: list[str] | None = None, int8: bool = False) -> ExportBundle:
    """Check ``folder`` (manifest, hashes) and prepare lazy unit and decoder construction.

    ``int8``: run the INT8 Q/DQ graph of every unit the quantization policy kept in INT8 (`int8_graphs`);
    the others, and the LLM, stay as exported. ``bundle.int8_units`` names them.
    """
    from vidllm_edge.models.config import VidLLMConfig
    from vidllm_edge.models.tokenizer import load_tokenizer
    from vidllm_edge.runtime.ort_llm import OrtDecoder

    folder = Path(folder)
    manifest = M.read_manifest(folder)
    needed = [u for u in U.VISION_UNITS] + ["llm_prefill", "llm_decode"]
    missing = [u for u in needed if u not in manifest["units"]]
    if missing:
        raise CheckpointError(f"Export folder: {folder}", f"lacks the units {missing}.",
                              f"Export them: vidllm-edge export ... --out {folder} (all units by default).")
    M.verify_files(folder, manifest)
    quantized = int8_graphs(folder, manifest) if int8 else {}
    providers = resolve_providers(providers)
    cfg = VidLLMConfig.from_dict(json.loads((folder / "config.json").read_text()))
    tokenizer = load_tokenizer(folder)
    image_hw = tuple(manifest["image_hw"])
    dims = {"H": image_hw[0], "W": image_hw[1],
            "P": (image_hw[0] // cfg.patch_size) * (image_hw[1] // cfg.patch_size), "C": cfg.embed_dim,
            "D": int(manifest["units"]["llm_decode"]["llm"]["hidden_size"])}
    cache: dict[str, OrtUnit] = {}

    def unit(name: str) -> OrtUnit:
        if name not in cache:
            spec = U.VISION_UNITS[name]
            fixed = {k: v for k, v in dims.items() if any(k in t.shape for t in spec.inputs + spec.outputs)}
            path = quantized.get(name, folder / manifest["units"][name]["file"])
            basic = needs_basic_rewrites(name in quantized, int(manifest.get("opset", 18)))
            cache[name] = OrtUnit(spec, path, providers, fixed, basic_optimizations=basic)
        return cache[name]

    def units_for(hw: tuple[int, int]) -> dict[str, OrtUnit]:
        assert tuple(hw) == image_hw, f"units were exported for {image_hw}, asked for {hw}"
        return {name: unit(name) for name in U.VISION_UNITS}

    def box_fn(hidden):
        h = torch.as_tensor(np.asarray(hidden) if not isinstance(hidden, torch.Tensor) else hidden).float()
        return unit("box_head")({"hidden": h.reshape(1, -1)})["boxes"]

    def decoder_factory():
        return OrtDecoder(folder / "onnx", tokenizer, cfg.llm, box_fn=box_fn, providers=providers)

    return ExportBundle(folder, manifest, cfg, image_hw, units_for, decoder_factory, sorted(quantized))
