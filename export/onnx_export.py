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
FP32_OPS = ["LayerNormalization", "Softmax", "Exp", "Log", "Sign", "Abs", "ReduceMean", "Pow", "Sqrt",
            "Div", "Reciprocal", "Softplus", "CumSum", "Range", "Sin", "Cos", "Expm1"]
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
    for f in path.parent.iterdir():
        if f.name.startswith(path.name):
            f.unlink()
    if external:
        onnx.save_model(converted, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(converted, str(path))
