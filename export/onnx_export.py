"""Export one unit to ONNX (torch dynamo exporter), optionally to FP16, written atomically.

Graphs over 2 GB keep their weights in one external-data file beside the graph (``<unit>.onnx.data``).
FP16 graphs keep LayerNorm, softmax and the depth/confidence activations (Exp, Log, Sign, Abs) in FP32,
and keep FP32 inputs/outputs so every backend is fed the same tensors.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from vidllm_edge.errors import VidLLMError
from vidllm_edge.export.specs import ExportSpec, dummy_inputs
from vidllm_edge.export.wrappers import frozen_constants
from vidllm_edge.optional import require

EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with headroom
# LayerNorm and softmax accumulate in FP32 (DESIGN.md §4); Exp/Log/Sign/Abs/Softplus are the depth,
# point and confidence activations (exp, expp1, inv_log) and the metric bins; Sin/Cos/Range build positions.
FP32_OPS = ["LayerNormalization", "Softmax", "Exp", "Log", "Sign", "Abs", "Softplus", "Sin", "Cos", "Range", "CumSum"]
MAX_DIM = 4096


class ExportError(VidLLMError):
    """The exporter failed on a unit."""


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_unit(spec: ExportSpec, model, image_hw: tuple[int, int], out_path: Path, precision: str = "fp32",
                example_size: int = 2) -> list[Path]:
    """Export ``spec``'s unit of ``model`` for frames of ``image_hw`` to ``out_path``; returns the files written."""
    wrapper = spec.wrapper(model, image_hw).eval()
    feed = dummy_inputs(spec, model, image_hw, example_size)
    dims = {sym: torch.export.Dim(sym.lower() if sym != "S" else "frames", min=1, max=MAX_DIM) for sym in spec.dynamic}
    dynamic_shapes = {name: {axis: dims[sym] for axis, sym in axes.items()}
                      for name, axes in spec.dynamic_shapes().items()}
    out_path = Path(out_path)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=out_path.parent))
    try:
        with frozen_constants(model, image_hw, wrapper), torch.no_grad():
            wrapper(**feed)  # eager pass: registers every frozen constant before tracing
            big = _param_bytes(wrapper) + sum(b.numel() * b.element_size() for b in wrapper.buffers()) > EXTERNAL_DATA_BYTES
            with warnings.catch_warnings(), _quiet_exporter():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    wrapper, (), kwargs=feed, dynamo=True, opset_version=spec.opset,
                    input_names=[t.name for t in spec.unit.inputs], output_names=[t.name for t in spec.unit.outputs],
                    dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
        tmp = staging / out_path.name
        program.save(str(tmp), external_data=big)
        if precision == "fp16":
            to_fp16(tmp, big)
        elif precision != "fp32":
            raise ExportError(f"Precision: {precision}", "is not an ONNX export precision.", "Use fp32 or fp16.")
        written = []
        for item in sorted(staging.iterdir()):
            target = out_path.parent / item.name
            item.replace(target)
            written.append(target)
        return written
    except VidLLMError:
        raise
    except Exception as exc:  # the exporter raises many error types; name the unit
        raise ExportError(f"Export unit: {spec.name}", f"failed ({type(exc).__name__}: {str(exc)[:500]}).",
                          "Report this with the model config; try --precision fp32 or another --image-hw.") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _quiet_exporter:
    """Silence the exporter's per-call log lines (e.g. "torchvision is not installed")."""

    def __enter__(self):
        self.logger = logging.getLogger("torch.onnx")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def to_fp16(path: Path, external: bool) -> None:
    """Convert an FP32 graph to FP16 in place, keeping numerically sensitive ops and the I/O in FP32."""
    onnx = require("onnx", "FP16 export")
    float16 = require("onnxruntime.transformers.float16", "FP16 export")
    model = onnx.load(str(path))
    converted = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS,
                                                 disable_shape_infer=external)
    drop_duplicate_producers(converted.graph)  # without shape inference it may insert one cast twice
    _toposort(converted.graph)  # the converter appends its input casts at the end of the node list
    unique_node_names(converted.graph)
    for f in path.parent.iterdir():
        if f.name.startswith(path.name):
            f.unlink()
    if external:
        onnx.save_model(converted, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(converted, str(path))


def _toposort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (ONNX requires it)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError("FP16 conversion", f"left {len(rest)} node(s) with inputs nobody produces "
                              f"(first: {rest[0].op_type} {rest[0].name}).", "Export in fp32 and report this graph.")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def drop_duplicate_producers(graph) -> int:
    """Remove nodes that recompute an output an identical earlier node already produces; returns how many."""
    first: dict[str, object] = {}
    keep, dropped = [], 0
    for node in graph.node:
        clash = [first[o] for o in node.output if o in first]
        if clash:
            same = all(c.op_type == node.op_type and list(c.input) == list(node.input)
                       and list(c.output) == list(node.output) and list(c.attribute) == list(node.attribute)
                       for c in clash)
            if not same:
                raise ExportError("FP16 conversion", f"produced two different nodes writing {node.output[0]}.",
                                  "Export in fp32 and report this graph.")
            dropped += 1
            continue
        first.update({o: node for o in node.output})
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return dropped


def unique_node_names(graph) -> int:
    """Rename nodes whose name repeats an earlier one (``name`` -> ``name__2``); returns how many."""
    seen: dict[str, int] = {}
    renamed = 0
    for node in graph.node:
        if not node.name:
            continue
        count = seen.get(node.name, 0) + 1
        seen[node.name] = count
        if count > 1:
            node.name = f"{node.name}__{count}"
            renamed += 1
    return renamed
