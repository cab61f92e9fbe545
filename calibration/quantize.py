"""INT8 post-training quantization of exported units to explicit Q/DQ ONNX (DESIGN.md §4).

The graphs have TensorRT 10's explicit-quantization form: QuantizeLinear/DequantizeLinear pairs on the
inputs of MatMul, Conv and Gemm only; int8 activations with zero point 0 (symmetric, one scale per
tensor from the calibration's max |x|); int8 weights with zero point 0 and one scale per output
channel; biases and everything else (LayerNorm, softmax, residual adds, heads' activations) in FP32,
where TensorRT picks its own precision. Attention's activation-by-activation MatMuls stay FP by default
(`quantize_attention`): on a ViT, quantizing them cost ~10x the error for no accuracy-neutral gain
(FINDINGS.md: CLIP-B cosine 0.99985 without, 0.989 with).

Per unit: `sensitivity` quantizes one MatMul/Conv/Gemm at a time and measures the unit's outputs
against FP32; `policy` keeps the most sensitive nodes in FP until the unit meets the INT8 gate, or
rejects INT8 for the unit. Speed is judged on the GPU later; this module only decides parity.

Two routes write the graphs: ``method="ort"`` (onnxruntime.quantization, the default) and ``"modelopt"``
(NVIDIA Model-Optimizer's ONNX quantizer; its ``[onnx]`` extra pins onnx 1.21, onnxruntime-gpu 1.24 and
cupy, so it lives in an environment of its own). Measured on every unit of the tiny preset with the same
export, calibration, held-out frames and gate (benchmarks/results/int8_method_compare_tiny.md): in this
layout both pass the gate on the same units (6/6 with 2 videos x 8 frames, 5/6 with 1 video x 4) and the
policy decides the same. modelopt's lower error on geometry (pose_enc cosine 0.99983 vs 0.99951) comes from
its fixed rule of leaving MatMul/Gemm layers with fewer than 16 input or output features FP: this route
with those 8 camera-head layers excluded gives 0.99982, so the quantizers agree and the gain is a node
choice our policy can make. With attention quantized (modelopt's own default) modelopt passes 4/6 units
against 5/6, with 5.4x the summed error. modelopt also quantizes attention matmuls its pattern matcher
misses (20 in geometry), feeds DequantizeLinear outputs to residual Adds (21), raises the opset to 19 and
took about twice as long per graph. So "ort" stays the default.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from vidllm_edge import manifest as M
from vidllm_edge.calibration.record import Calibration, check_calibration, load_calibration
from vidllm_edge.errors import DependencyError, InputError
from vidllm_edge.export.validate import metrics
from vidllm_edge.optional import require

OP_TYPES = ("MatMul", "Conv", "Gemm")
METHODS = ("ort", "modelopt")
DEPTH_OUTPUTS = {"geometry": ("depth",), "metric_depth": ("metric_depth",)}  # also judged by AbsRel and δ<1.25
MODELOPT_NOTE = ("Install it in a separate environment: pip install 'nvidia-modelopt[onnx]' (its [onnx] extra pins "
                 "onnx 1.21, onnxruntime-gpu 1.24 and cupy, which would replace this install's onnx/onnxruntime).")


@dataclass(frozen=True)
class Int8Gate:
    """Parity an INT8 unit must keep against its FP32 graph, on every output, calibration AND held-out frames.

    Looser than FP16's (rel-L2 1e-2, cosine 0.9995) because 8-bit rounding is ~50x coarser than
    FP16's; cosine 0.999 is rel-L2 ≈ 0.045 for an error orthogonal to the signal. Depth may move by 2 %
    on average (AbsRel) with 99.5 % of pixels within 1.25x: a fraction of a metric-depth model's own
    error (AbsRel 5-10 % on indoor benchmarks), so the scene's metric scale survives.
    """

    cosine: float = 0.999
    rel_l2: float = 0.045
    depth_abs_rel: float = 0.02
    depth_delta: float = 0.995

    def failures(self, unit: str, output: str, m: dict[str, float]) -> list[str]:
        bad = []
        if not m["cosine"] >= self.cosine:
            bad.append(f"cosine {m['cosine']:.5f} < {self.cosine}")
        if not m["rel_l2"] <= self.rel_l2:
            bad.append(f"rel-L2 {m['rel_l2']:.3g} > {self.rel_l2}")
        if output in DEPTH_OUTPUTS.get(unit, ()):
            if not m["abs_rel"] <= self.depth_abs_rel:
                bad.append(f"AbsRel {m['abs_rel']:.3g} > {self.depth_abs_rel}")
            if not m["delta_1_25"] >= self.depth_delta:
                bad.append(f"δ<1.25 {m['delta_1_25']:.4f} < {self.depth_delta}")
        return bad


INT8_GATE = Int8Gate()


def output_metrics(unit: str, output: str, ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """cosine, rel-L2, max-abs of ``got`` against ``ref``; for depth outputs also AbsRel and δ<1.25.

    AbsRel = mean |got − ref| / ref and δ<1.25 = share of pixels with max(got/ref, ref/got) < 1.25, over
    pixels where the reference is positive (a non-positive INT8 depth counts as outside 1.25).
    """
    max_abs, rel, cos = metrics(ref, got)
    out = {"cosine": cos, "rel_l2": rel, "max_abs": max_abs}
    if output in DEPTH_OUTPUTS.get(unit, ()):
        r, g = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        valid = r > 0
        r, g = r[valid], g[valid]
        ratio = np.where(g > 0, np.maximum(g / r, r / np.where(g > 0, g, 1.0)), np.inf)
        out["abs_rel"] = float(np.mean(np.abs(g - r) / r)) if r.size else float("nan")
        out["delta_1_25"] = float(np.mean(ratio < 1.25)) if r.size else float("nan")
    return out


def _reader(samples: list[dict[str, np.ndarray]]):
    """An ORT CalibrationDataReader over ``samples`` (made here: the base class is an optional package's)."""
    quant = require("onnxruntime.quantization", "INT8 calibration")

    class SampleReader(quant.CalibrationDataReader):
        def __init__(self) -> None:
            self.position = 0

        def get_next(self):
            if self.position >= len(samples):
                return None
            self.position += 1
            return samples[self.position - 1]

        def rewind(self) -> None:
            self.position = 0

        def get_first(self):  # modelopt runs one sample through the graph first to read MatMul shapes
            return samples[0]

        def __len__(self) -> int:
            return len(samples)

    return SampleReader()


@dataclass
class NodeInfo:
    name: str
    op_type: str
    scope: str  # the torch module the node came from (the exporter's name scope), "" if unknown
    weight: bool  # True: one input is a constant weight (a GEMM/conv); False: activation x activation


def quantizable_nodes(path: str | Path, quantize_attention: bool = False) -> list[NodeInfo]:
    """MatMul/Conv/Gemm nodes of a graph in graph order; activation-by-activation MatMuls only if asked."""
    onnx = require("onnx", "INT8 quantization")
    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    nodes = []
    for n in graph.node:
        if n.op_type not in OP_TYPES:
            continue
        weight = len(n.input) > 1 and n.input[1] in constants
        if weight or quantize_attention:
            meta = {p.key: p.value for p in n.metadata_props}
            scope = meta.get("pkg.torch.onnx.name_scopes", "")
            with contextlib.suppress(ValueError, IndexError):  # ['', 'parts.encoder', ..., 'parts.x.proj', 'linear_1']
                scope = [s for s in json.loads(scope.replace("'", '"')) if s][-2]  # the module, not the aten op
            nodes.append(NodeInfo(n.name, n.op_type, str(scope), weight))
    return nodes


@dataclass
class Evaluation:
    """Per split, per output: metrics of an INT8 graph against FP32; and whether the gate holds."""

    splits: dict[str, dict[str, dict[str, float]]]
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures

    def worst(self, split: str = "heldout") -> dict[str, float]:
        """The output with the lowest cosine in ``split`` (the loss a node is ranked by)."""
        rows = self.splits[split]
        name = min(rows, key=lambda k: rows[k]["cosine"])
        return {"output": name, **rows[name]}


class UnitQuantizer:
    """One exported unit and its calibration: builds Q/DQ variants and measures them against FP32.

    Construction checks that the calibration belongs to the export and loads nothing heavy; the
    calibration ranges are computed once (cached in a scratch folder) and shared by every variant.
    """

    def __init__(self, export_dir: str | Path, unit: str, calib_dir: str | Path | Calibration, method: str = "ort",
                 quantize_attention: bool = False, gate: Int8Gate = INT8_GATE, log: TextIO | None = None) -> None:
        if method not in METHODS:
            raise InputError(f"Argument: --method {method}", "is not a quantization route.",
                             f"Choose from {', '.join(METHODS)}.")
        self.export_dir = Path(export_dir)
        self.manifest = M.read_manifest(self.export_dir)
        if unit not in self.manifest["units"] or unit.startswith("llm_"):
            vision = [u for u in self.manifest["units"] if not u.startswith("llm_")]
            raise InputError(f"Argument: --units {unit}", f"is not a vision unit of the export {self.export_dir}.",
                             f"Choose from {', '.join(vision)} (the LLM is quantized weight-only elsewhere).")
        if self.manifest.get("precision") != "fp32":
            raise InputError(f"Export folder: {self.export_dir}", f"is {self.manifest.get('precision')}; INT8 Q/DQ "
                             "graphs are made from FP32 graphs.", "Export with --precision fp32 and quantize that.")
        M.verify_files(self.export_dir, self.manifest, [unit])
        self.calib = calib_dir if isinstance(calib_dir, Calibration) else load_calibration(calib_dir)
        check_calibration(self.calib, self.export_dir, [unit])
        self.unit, self.method, self.quantize_attention, self.gate = unit, method, quantize_attention, gate
        self.fp32 = self.export_dir / self.manifest["units"][unit]["file"]
        self.external = len(self.manifest["units"][unit]["files"]) > 1  # weights past 2 GB live in <unit>.onnx.data
        self.log = log or sys.stderr
        self.samples = {"calibration": self.calib.samples(unit, "calibration"),
                        "heldout": self.calib.samples(unit, "heldout", required=False)}
        self.judge = "heldout" if self.samples["heldout"] else "calibration"  # what nodes are ranked on
        self._scratch = Path(tempfile.mkdtemp(prefix=f"vidllm-int8-{unit}-"))
        self._reference: dict[str, dict[str, np.ndarray]] | None = None
        self._built = 0

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> "UnitQuantizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def nodes(self) -> list[NodeInfo]:
        return quantizable_nodes(self.fp32, self.quantize_attention)

    # -- building ----------------------------------------------------------------------------------
    def build(self, target: Path | None = None, exclude: tuple[str, ...] | list[str] = (),
              include: tuple[str, ...] | list[str] | None = None) -> Path:
        """Write a Q/DQ graph quantizing every candidate node but ``exclude`` (or only ``include``)."""
        self._built += 1
        target = target or self._scratch / f"variant{self._built}.onnx"
        if self.method == "ort":
            self._build_ort(target, list(exclude), None if include is None else list(include))
        else:
            self._build_modelopt(target, list(exclude), None if include is None else list(include))
        return target

    def _build_ort(self, target: Path, exclude: list[str], include: list[str] | None) -> None:
        quantize_graph_ort(self.fp32, target, self.samples["calibration"], exclude=exclude, include=include,
                           external=self.external, quantize_attention=self.quantize_attention,
                           ranges=self._scratch / "ranges.json",
                           candidates=[n.name for n in self.nodes()])

    def _build_modelopt(self, target: Path, exclude: list[str], include: list[str] | None) -> None:
        try:
            from modelopt.onnx.quantization import quantize as mo_quantize
        except ImportError as exc:
            raise DependencyError("Python package: modelopt.onnx.quantization",
                                  f"cannot be imported ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); needed "
                                  "for --method modelopt.", MODELOPT_NOTE) from exc
        # modelopt 0.47 runs onnx.shape_inference.infer_shapes_path(onnx_path) on its input, which rewrites
        # that file in place (the export's sha256 would no longer match its manifest), and writes its
        # intermediate graphs beside it: it gets a private copy in the scratch folder. dq_only: int8 weights
        # behind a DequantizeLinear, as the ort route writes them (by default modelopt keeps FP32 weights
        # behind a QuantizeLinear: the same numbers in a file of FP32 size).
        source = self._modelopt_source()
        mo_quantize(onnx_path=str(source), quantize_mode="int8",
                    calibration_data_reader=_reader(self.samples["calibration"]), calibration_method="max",
                    calibration_eps=["cpu"], op_types_to_quantize=list(OP_TYPES),
                    nodes_to_exclude=[f"^{re.escape(n)}$" for n in exclude] or None,
                    nodes_to_quantize=[f"^{re.escape(n)}$" for n in include] if include is not None else None,
                    use_external_data_format=self.external, output_path=str(target), high_precision_dtype="fp32",
                    disable_mha_qdq=not self.quantize_attention, dq_only=True, log_level="WARNING")
        spill = target.with_name(target.name + "_data")  # modelopt's name for external weights; ours is .data
        if spill.exists():
            onnx = require("onnx", "INT8 quantization")
            model = onnx.load(str(target))
            onnx.save(model, str(target), save_as_external_data=True, location=f"{target.name}.data")
            spill.unlink()

    def _modelopt_source(self) -> Path:
        source = self._scratch / "modelopt" / self.fp32.name
        if not source.exists():
            source.parent.mkdir()
            for f in self.manifest["units"][self.unit]["files"]:  # the graph and its external weights
                shutil.copyfile(self.export_dir / f, source.parent / Path(f).name)
        return source

    # -- measuring ---------------------------------------------------------------------------------
    def _run(self, path: Path, split: str) -> dict[str, np.ndarray]:
        ort = require("onnxruntime", "INT8 evaluation")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Basic level keeps DequantizeLinear -> FP op as written: the arithmetic TensorRT's int8 kernels
        # reproduce (int32 accumulation, one rescale). ORT's own int8 fusions (the default level) land
        # within ~3e-3 relative of it on these graphs.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        runs = [session.run(names, feed) for feed in self.samples[split]]
        return {n: np.concatenate([r[i] for r in runs], 0) for i, n in enumerate(names)}  # samples along axis 0

    def reference(self) -> dict[str, dict[str, np.ndarray]]:
        """FP32 graph outputs per split (computed once)."""
        if self._reference is None:
            self._reference = {s: self._run(self.fp32, s) for s in self.samples if self.samples[s]}
        return self._reference

    def evaluate(self, path: Path, splits: tuple[str, ...] = ("calibration", "heldout")) -> Evaluation:
        """Metrics of the graph at ``path`` against FP32 on ``splits``, and the gate's failures."""
        ref = self.reference()
        result, failures = {}, []
        for split in splits:
            if split not in ref:
                continue
            got = self._run(path, split)
            result[split] = {o: output_metrics(self.unit, o, ref[split][o], got[o]) for o in ref[split]}
            failures += [f"{split} {o}: {f}" for o, m in result[split].items()
                         for f in self.gate.failures(self.unit, o, m)]
        return Evaluation(result, failures)

    # -- deciding ----------------------------------------------------------------------------------
    def sensitivity(self, top_k: int = 10, max_nodes: int = 48) -> "SensitivityReport":
        """Quantize one candidate node at a time; rank nodes by the worst output's loss (1 − cosine) on the
        held-out split (the calibration split when the folder has no held-out frames).

        One node alone isolates its own rounding error; excluding one node from a full quantization costs
        the same (one build and one run per node) but measures a small change of a large total, in which
        the other nodes' errors mask the ranking. Past ``max_nodes`` candidates, an evenly spaced sample
        of them is measured and the report says so.
        """
        nodes = self.nodes()
        measured = nodes if len(nodes) <= max_nodes else [nodes[round(i)] for i in
                                                          np.linspace(0, len(nodes) - 1, max_nodes)]
        start = time.perf_counter()
        rows = []
        for i, node in enumerate(measured, 1):
            path = self.build(include=[node.name])
            ev = self.evaluate(path, (self.judge,))
            _discard(path)
            worst = ev.worst(self.judge)
            rows.append({"node": node.name, "op_type": node.op_type, "scope": node.scope, "output": worst["output"],
                         "loss": 1.0 - worst["cosine"], "cosine": worst["cosine"], "rel_l2": worst["rel_l2"]})
            if i % 16 == 0 or i == len(measured):
                print(f"    {self.unit}: sensitivity {i}/{len(measured)} nodes ({time.perf_counter() - start:.0f} s)",
                      file=self.log, flush=True)
        rows.sort(key=lambda r: r["loss"], reverse=True)
        return SensitivityReport(self.unit, self.method, len(nodes), len(measured), len(measured) < len(nodes),
                                 rows, top_k, time.perf_counter() - start)

    def policy(self, ranking: "SensitivityReport | None" = None, max_excluded_share: float = 0.5) -> "Decision":
        """Exclude the most sensitive nodes (1, 2, 4, ... of them) until the unit meets the gate.

        INT8 is rejected for the unit when the full quantization fails and keeping up to
        ``max_excluded_share`` of its candidate nodes in FP does not pass either (by then too little is
        left in INT8 to pay for the Q/DQ boundaries), or when it has no candidate node.
        """
        nodes = self.nodes()
        if not nodes:
            return Decision(self.unit, self.method, False, [], 0, [], "no MatMul/Conv/Gemm with a weight")
        steps = []
        path = self.build()
        full = self.evaluate(path)
        _discard(path)
        steps.append(_step([], full, self.judge))
        if full.ok:
            return Decision(self.unit, self.method, True, [], len(nodes), steps, "meets the gate fully quantized",
                            full.splits)
        ranking = ranking or self.sensitivity()
        order = [r["node"] for r in ranking.rows]
        limit = min(len(order), int(max_excluded_share * len(nodes)))
        count = 1
        while count <= limit:
            exclude = order[:count]
            path = self.build(exclude=exclude)
            ev = self.evaluate(path)
            _discard(path)
            steps.append(_step(exclude, ev, self.judge))
            if ev.ok:
                return Decision(self.unit, self.method, True, exclude, len(nodes), steps,
                                f"meets the gate with the {count} most sensitive node(s) in FP", full.splits)
            count = count * 2 if count * 2 <= limit or count == limit else limit
        why = (f"fails the gate fully quantized ({'; '.join(full.failures[:3])}) and with up to {limit} of "
               f"{len(nodes)} nodes kept in FP" + (f" (sensitivity measured on {ranking.measured} sampled nodes)"
                                                     if ranking.sampled else ""))
        return Decision(self.unit, self.method, False, order[:limit], len(nodes), steps, why, full.splits)

    def write(self, exclude: list[str] | tuple[str, ...] = ()) -> Path:
        """Write ``onnx/<unit>.int8.onnx`` atomically (staged beside it, renamed into place last)."""
        final = self.fp32.with_name(f"{self.unit}.int8.onnx")
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            built = self.build(staging / final.name, exclude=exclude)
            for extra in staging.iterdir():  # external weights first, so the graph never names a missing file
                if extra.name != final.name:
                    os.replace(extra, final.parent / extra.name)
            with open(built, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(built, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final


def quantize_graph_ort(fp32: Path, target: Path, samples: list[dict[str, np.ndarray]], *, exclude=(), include=None,
                       external: bool = False, quantize_attention: bool = False, ranges: Path | None = None,
                       candidates: list[str] | None = None) -> str:
    """onnxruntime.quantization in TensorRT 10's explicit-quantization layout (see the module docstring):
    ``fp32`` graph -> Q/DQ graph ``target``, activation ranges (max |x|) from ``samples`` (feeds by input name).

    exclude / include: node names kept FP / the only nodes quantized (None: every candidate). ``ranges``
    caches the calibration ranges (reused by later variants of the same graph). ``candidates``: the
    quantizable node names (default: `quantizable_nodes`).

    The calibration pass (running the graph over ``samples`` to record max |x|) runs on ONNX Runtime's CUDA
    provider when onnxruntime-gpu has one, else on the CPU; returns which. Only its speed differs: the ranges
    are maxima of the same activations.
    """
    quant = require("onnxruntime.quantization", "INT8 quantization")
    ort = require("onnxruntime", "INT8 quantization")
    params = inspect.signature(quant.quantize_static).parameters
    provider = ("CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers()
                and "calibration_providers" in params else "CPUExecutionProvider")
    exclude, include = list(exclude), None if include is None else list(include)
    # Attention's activation-by-activation MatMuls are left out by name, so that `quantizable_nodes`
    # alone defines the candidates (the sensitivity, the policy and this build agree on them).
    skip = [] if quantize_attention else [n.name for n in quantizable_nodes(fp32, True) if not n.weight]
    scratch = None
    if ranges is None:
        scratch = Path(tempfile.mkdtemp(prefix="vidllm-int8-ranges-"))
        ranges = scratch / "ranges.json"
    # Ranges cached across variants where this onnxruntime can (its calibration_cache_path argument is newer
    # than our onnxruntime>=1.18 floor; without it each variant recalibrates, slower but the same numbers).
    optional = {"calibration_cache_path": str(ranges)} if "calibration_cache_path" in params else {}
    if "calibration_providers" in params:
        optional["calibration_providers"] = [provider, "CPUExecutionProvider"] if provider != "CPUExecutionProvider" \
            else [provider]
    try:
        with _quiet_root_logger():  # ORT warns to run its pre-processing, which would re-fuse the exported graph
            quant.quantize_static(
                str(fp32), str(target), _reader(samples),
                quant_format=quant.QuantFormat.QDQ, op_types_to_quantize=list(OP_TYPES), per_channel=True,
                reduce_range=False, activation_type=quant.QuantType.QInt8, weight_type=quant.QuantType.QInt8,
                nodes_to_quantize=include, nodes_to_exclude=exclude + skip, use_external_data_format=external,
                calibrate_method=quant.CalibrationMethod.MinMax, **optional,
                extra_options={
                    "ActivationSymmetric": True, "WeightSymmetric": True,  # zero points 0: TensorRT's layout
                    "OpTypesToExcludeOutputQuantization": list(OP_TYPES),  # Q/DQ on inputs only; TRT fuses the rest
                    "QuantizeBias": False,  # biases stay FP32 (TensorRT has no int32-bias DequantizeLinear)
                    "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # weight [K, N]: one scale per output column
                    "DedicatedQDQPair": False,
                })
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    names = candidates if candidates is not None else [n.name for n in quantizable_nodes(fp32, quantize_attention)]
    selected = set(names) if include is None else set(include)
    restrict_dq_consumers(target, selected - set(exclude) - set(skip), external)
    return provider


def _discard(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_root_logger():
    import logging

    level = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.root.setLevel(level)


def restrict_dq_consumers(path: Path, quantized: set[str], external: bool = False) -> None:
    """Feed activation DequantizeLinear outputs to the ``quantized`` nodes only; every other consumer reads FP.

    ORT inserts one Q/DQ pair per quantized tensor and rewires *all* its consumers, so a residual Add, a
    LayerNorm, or a MatMul kept in FP that reads the same tensor would compute on rounded values too;
    TensorRT's layout has Q/DQ in front of the quantized ops only. A graph output that ORT renamed onto
    the DQ is renamed back, and pairs nothing reads any more are dropped.
    """
    onnx = require("onnx", "INT8 quantization")
    model = onnx.load(str(path))
    graph = model.graph
    outputs = {o.name for o in graph.output}
    quant_of = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in quant_of]:
        fp, out = quant_of[dq.input[0]].input[0], dq.output[0]
        if out in outputs:  # the FP tensor was renamed <name>_QuantizeLinear_Input to keep the output name
            new = f"{out}_DequantizeLinear_Output"
            for node in graph.node:
                node.output[:] = [new if o == out else (out if o == fp else o) for o in node.output]
                node.input[:] = [new if i == out else (out if i == fp else i) for i in node.input]
            fp, out = out, new
        for node in graph.node:
            if node.name not in quantized and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                node.input[:] = [fp if i == out else i for i in node.input]
    for op in ("DequantizeLinear", "QuantizeLinear"):  # DQs nothing reads, then the Qs only they read
        read = {i for n in graph.node for i in n.input} | outputs
        for node in [n for n in graph.node if n.op_type == op and n.output[0] not in read
                     and (op == "QuantizeLinear" or n.input[0] in quant_of)]:
            graph.node.remove(node)
    onnx.save(model, str(path), save_as_external_data=external, location=f"{path.name}.data" if external else None)


def _step(exclude: list[str], ev: Evaluation, split: str) -> dict[str, Any]:
    return {"excluded": len(exclude), "ok": ev.ok, "split": split, "worst": ev.worst(split),
            "failures": ev.failures[:6]}


@dataclass
class SensitivityReport:
    unit: str
    method: str
    candidates: int
    measured: int
    sampled: bool
    rows: list[dict[str, Any]]  # sorted by loss, worst first
    top_k: int
    seconds: float

    def top(self) -> list[dict[str, Any]]:
        return self.rows[: self.top_k]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["note"] = (f"{self.measured} of {self.candidates} candidate nodes measured, evenly spaced through the graph"
                     if self.sampled else f"all {self.candidates} candidate nodes measured")
        return d


@dataclass
class Decision:
    unit: str
    method: str
    keep_int8: bool
    exclude: list[str]
    candidates: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    full: dict[str, Any] = field(default_factory=dict)  # metrics of the fully quantized unit, per split and output


# ------------------------------------------------------------------------------------ module functions


def quantize_unit(export_dir: str | Path, unit: str, calib_dir: str | Path, method: str = "ort",
                  exclude_nodes: tuple[str, ...] | list[str] = (), quantize_attention: bool = False) -> Path:
    """Write ``export_dir/onnx/<unit>.int8.onnx`` (Q/DQ, symmetric int8, per-channel weights); returns its path.

    Args:
        export_dir: an FP32 export folder (``vidllm-edge export``).
        unit: a vision unit of it (perception, geometry, metric_depth, lift_project, projector, box_head).
        calib_dir: a calibration folder recorded from the same model (``vidllm-edge calibrate``); a
            folder from another model raises CalibrationMismatchError.
        method: "ort" (onnxruntime.quantization) or "modelopt" (needs nvidia-modelopt[onnx]).
        exclude_nodes: node names kept in FP (see `policy`).
        quantize_attention: also quantize activation-by-activation MatMuls (attention scores/values).
    """
    with UnitQuantizer(export_dir, unit, calib_dir, method, quantize_attention) as q:
        return q.write(exclude_nodes)


def sensitivity(export_dir: str | Path, unit: str, calib_dir: str | Path, top_k: int = 10, method: str = "ort",
                max_nodes: int = 48) -> SensitivityReport:
    """Per-node sensitivity of ``unit``: each candidate node quantized alone, ranked by held-out loss."""
    with UnitQuantizer(export_dir, unit, calib_dir, method) as q:
        return q.sensitivity(top_k, max_nodes)


def policy(export_dir: str | Path, unit: str, calib_dir: str | Path, method: str = "ort",
           ranking: SensitivityReport | None = None, gate: Int8Gate = INT8_GATE) -> Decision:
    """Decide whether ``unit`` keeps INT8 and which nodes stay FP (see `UnitQuantizer.policy`)."""
    with UnitQuantizer(export_dir, unit, calib_dir, method, gate=gate) as q:
        return q.policy(ranking)


# ------------------------------------------------------------------------------ whole export + report

REPORT = "quantization_report"


def quantize_export(export_dir: str | Path, calib_dir: str | Path, units: list[str] | None = None, method: str = "ort",
                    top_k: int = 10, max_nodes: int = 48, quantize_attention: bool = False,
                    gate: Int8Gate = INT8_GATE, log: TextIO | None = None) -> dict[str, Any]:
    """Sensitivity, policy and the final ``onnx/<unit>.int8.onnx`` for every unit that keeps INT8.

    Units default to the vision units present in both the export and the calibration folder. A unit the
    policy rejects gets no INT8 graph (a stale one from an earlier run is removed). Returns the report
    (`write_report` writes it); nothing else in the export folder changes.
    """
    log = log or sys.stderr
    export_dir = Path(export_dir)
    calib = load_calibration(calib_dir)
    manifest = M.read_manifest(export_dir)
    units = units or [u for u in manifest["units"] if not u.startswith("llm_") and u in calib.units()]
    if not units:
        raise InputError(f"Calibration folder: {calib.folder}", f"has no inputs for any vision unit of {export_dir}.",
                         "Record calibration data for this export: vidllm-edge calibrate --export DIR ...")
    # Every unit's calibration before the first graph is written, not unit by unit (unknown or LLM units are
    # refused by UnitQuantizer with their own message).
    check_calibration(calib, export_dir, [u for u in units if u in manifest["units"] and not u.startswith("llm_")])
    report: dict[str, Any] = {
        "format": "vidllm-edge-int8-report", "export": str(export_dir), "calibration": str(calib.folder),
        "method": method, "quantize_attention": quantize_attention, "gate": asdict(gate),
        "model": calib.info["model"],
        "data": {s: {"sha256": v["data_sha256"], "clips": [{"source": c["source"], "frames": c["frames"]}
                                                            for c in v["clips"]]}
                 for s, v in calib.info["splits"].items()},
        "units": {},
    }
    for i, unit in enumerate(units, 1):
        start = time.perf_counter()
        print(f"[{i}/{len(units)}] {unit}: calibrating and measuring ({method}) ...", file=log, flush=True)
        with UnitQuantizer(export_dir, unit, calib, method, quantize_attention, gate, log) as q:
            ranking = q.sensitivity(top_k, max_nodes) if q.nodes() else None
            decision = q.policy(ranking)
            final = q.fp32.with_name(f"{unit}.int8.onnx")
            entry: dict[str, Any] = {"keep_int8": decision.keep_int8, "reason": decision.reason,
                                     "candidates": decision.candidates, "excluded": decision.exclude if
                                     decision.keep_int8 else [], "steps": decision.steps,
                                     "sensitivity": ranking.to_dict() if ranking else None,
                                     "metrics": {"full": decision.full}, "bytes": {"fp32": _bytes(q.fp32)}}
            if decision.keep_int8:
                path = q.write(decision.exclude)
                entry["metrics"]["final"] = q.evaluate(path).splits
                entry.update(file=str(path.relative_to(export_dir)), sha256=M.sha256(path))
                from vidllm_edge.export.lint import lint_onnx

                lint = lint_onnx(path).to_dict()  # the Q/DQ graph must still parse on TensorRT 10
                entry["lint"] = {"ok": lint.get("ok"), "errors": [f for f in lint.get("findings", [])
                                                                  if f.get("severity") == "error"]}
                entry["bytes"]["int8"] = _bytes(path)
            elif final.exists():
                _discard(final)
                print(f"    removed the stale {final.name} (this unit keeps FP)", file=log)
        entry["seconds"] = round(time.perf_counter() - start, 2)
        print(f"    {unit}: {'INT8' if decision.keep_int8 else 'FP'}: {decision.reason} ({entry['seconds']:.1f} s)",
              file=log, flush=True)
        report["units"][unit] = entry
    return report


def _bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def write_report(folder: str | Path, report: dict[str, Any], name: str = REPORT) -> tuple[Path, Path]:
    """Write ``folder/<name>.json`` and ``.md`` atomically; returns both paths."""
    from vidllm_edge import atomic

    folder = Path(folder)
    js = atomic.write_text(folder / f"{name}.json", json.dumps(report, indent=2))
    md = atomic.write_text(folder / f"{name}.md", report_markdown(report))
    return js, md


def metrics_table(units: dict[str, dict[str, Any]], which: str = "final") -> list[str]:
    """Markdown rows: unit, kept, split, output, cosine, rel-L2, AbsRel, δ<1.25 (``which`` metrics, else full)."""
    lines = ["| unit | INT8 kept | graph | split | output | cosine | rel-L2 | depth AbsRel | depth δ<1.25 |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for unit, e in units.items():
        graph = which if which in e["metrics"] else "full"
        label = (f"{e['candidates'] - len(e['excluded'])}/{e['candidates']} nodes INT8" if graph == "final"
                 else f"all {e['candidates']} INT8")
        for split, outputs in e["metrics"][graph].items():
            for output, m in outputs.items():
                ar = f"{m['abs_rel']:.2e}" if "abs_rel" in m else ""
                dl = f"{m['delta_1_25']:.4f}" if "delta_1_25" in m else ""
                lines.append(f"| {unit} | {'yes' if e['keep_int8'] else 'no'} | {label} | {split} | {output} | "
                             f"{m['cosine']:.6f} | {m['rel_l2']:.2e} | {ar} | {dl} |")
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    gate = report["gate"]
    lines = [f"# INT8 Q/DQ report: {report['export']}", "",
             f"Method: {report['method']} (symmetric int8, per-channel weights, Q/DQ on MatMul/Conv/Gemm inputs; "
             f"attention matmuls {'quantized' if report['quantize_attention'] else 'FP'}). Metrics: INT8 graph vs "
             "the FP32 graph on ONNX Runtime CPU.",
             f"Gate (every output, calibration and held-out): cosine >= {gate['cosine']}, rel-L2 <= {gate['rel_l2']}, "
             f"depth AbsRel <= {gate['depth_abs_rel']}, depth δ<1.25 >= {gate['depth_delta']}.",
             f"Calibration: {report['calibration']} (model {report['model']['source']}, "
             f"sha256 {report['model']['sha256'][:12]}…).", "", "## Decisions", "",
             "| unit | INT8 | nodes kept FP | why | fp32 MB | int8 MB |", "|---|---|---:|---|---:|---:|"]
    for unit, e in report["units"].items():
        mb = {k: f"{v / 1e6:.2f}" for k, v in e["bytes"].items()}
        lines.append(f"| {unit} | {'yes' if e['keep_int8'] else 'no'} | {len(e['excluded'])}/{e['candidates']} | "
                     f"{e['reason']} | {mb['fp32']} | {mb.get('int8', '')} |")
    lines += ["", "## Parity of the kept graphs (rejected units: fully quantized)", ""] + metrics_table(report["units"])
    lines += ["", "## Most sensitive nodes (each quantized alone; loss = 1 − cosine of the worst held-out output)",
              ""]
    for unit, e in report["units"].items():
        sens = e["sensitivity"]
        if not sens:
            continue
        lines += [f"### {unit} ({sens['note']}, {sens['seconds']:.1f} s)", "",
                  "| node | op | module | output | 1 − cosine | rel-L2 |", "|---|---|---|---|---:|---:|"]
        for r in sens["rows"][: sens["top_k"]]:
            lines.append(f"| {r['node']} | {r['op_type']} | {r['scope']} | {r['output']} | {r['loss']:.2e} | "
                         f"{r['rel_l2']:.2e} |")
        lines.append("")
    return "\n".join(lines) + "\n"
