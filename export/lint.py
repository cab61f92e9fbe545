"""TensorRT 10 compatibility lint for ONNX graphs, run right after export and by ``vidllm-edge export``.

:func:`lint_onnx` reads a model, checks every node (subgraphs of If/Loop/Scan included) against
:mod:`vidllm_edge.export.trt_support` and returns a :class:`LintReport`; :func:`check_lint` turns its errors
into one :class:`LintError` unless the user passed ``--allow-unsupported``.

What it checks: operators and domains against the TensorRT table (and the target version's ``since``),
attribute/input restrictions the table states, the data type of each node's first input, data-dependent
output shapes, If/Loop/Scan restrictions, the decomposed-LayerNorm pattern that overflows in FP16, INT64
constants outside the INT32 range, the opset, and ``onnx.checker``. Model-local functions (the torch dynamo
exporter may emit them) are inlined first so their bodies are linted too.

Large models: ``lint_onnx(path, load_weights=False)`` reads the graph without external data. Every check
still runs except the INT64 value check, which then only sees initializers stored inside the .onnx file.
This is a static lint, not a parse: ``trtexec``/Polygraphy on the target stays the final word.

onnx is imported inside functions (through :func:`vidllm_edge.optional.require`), so this module imports
without it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from vidllm_edge.errors import InputError, VidLLMError
from vidllm_edge.export import trt_support as ts
from vidllm_edge.optional import require

if TYPE_CHECKING:  # pragma: no cover - typing only
    import onnx

FEATURE = "the TensorRT ONNX lint"
Severity = Literal["error", "warning", "info"]
_RANK = {"error": 0, "warning": 1, "info": 2}
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

_ONNX_TYPES = {  # TensorProto.DataType -> the names the TensorRT table uses
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
    9: "BOOL", 10: "FP16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128",
    16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 21: "UINT4", 22: "INT4", 23: "FP4",
}


class OnnxFileError(VidLLMError):
    """An ONNX file is missing or cannot be parsed."""


class LintError(VidLLMError):
    """The TensorRT lint found errors and ``--allow-unsupported`` was not given."""


@dataclass(frozen=True)
class Finding:
    """One lint result. ``node``/``op_type`` are empty for model-level findings; ``op_type`` is
    ``domain::op`` outside the default domain."""

    severity: Severity
    code: str
    node: str
    op_type: str
    message: str


@dataclass
class LintReport:
    """Findings plus per-operator counts (subgraphs included) for one model."""

    model: str
    opset: int
    trt_version: str
    findings: list[Finding] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when there is no error finding (warnings and info are allowed)."""
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def status(self, op: str) -> str:
        """``ok`` or the worst severity with its codes, for one ``op_counts`` key."""
        mine = sorted((f for f in self.findings if f.op_type == op), key=lambda f: _RANK[f.severity])
        if not mine:
            return "ok"
        worst = mine[0].severity
        codes = sorted({f.code for f in mine if f.severity == worst})
        return f"{'ERROR' if worst == 'error' else worst}: {', '.join(codes)}"

    def table(self) -> str:
        """A text table (op, count, status), then the model-level findings and a summary line."""
        ops = sorted(self.op_counts, key=lambda op: (_RANK.get(self.status(op).split(":")[0].lower(), 3), op))
        width = max([len("op")] + [len(op) for op in ops])
        rule = f"{'-' * width}  -----  {'-' * 30}"
        lines = [f"TensorRT {self.trt_version} lint: {self.model} (opset {self.opset})",
                 f"{'op':<{width}}  count  status", rule]
        lines += [f"{op:<{width}}  {self.op_counts[op]:>5}  {self.status(op)}" for op in ops]
        lines.append(rule)
        lines += [f"{f.severity:<7}  {f.code}: {f.message}" for f in self.findings if not f.op_type]
        counts = Counter(f.severity for f in self.findings)
        lines.append(f"{counts['error']} errors, {counts['warning']} warnings, {counts['info']} info")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: model, opset, trt_version, source, ok, op_counts, findings."""
        return {
            "model": self.model,
            "opset": self.opset,
            "trt_version": self.trt_version,
            "source": ts.SOURCE,
            "ok": self.ok,
            "op_counts": dict(self.op_counts),
            "findings": [asdict(f) for f in self.findings],
        }


def check_lint(report: LintReport, allow_unsupported: bool, subject: str) -> None:
    """Raise :class:`LintError` listing every error finding of ``report``, unless ``allow_unsupported``.

    ``subject`` names the model in the message (``ONNX model: <subject> | ...``), e.g. the file name.
    """
    errors = report.errors
    if not errors or allow_unsupported:
        return
    lines = [
        f"  - {f.code} at {f.node} ({f.op_type}): {f.message}" if f.op_type else f"  - {f.code}: {f.message}"
        for f in errors
    ]
    plural = "" if len(errors) == 1 else "s"
    raise LintError(
        f"ONNX model: {subject}",
        f"{len(errors)} error{plural} from the TensorRT {report.trt_version} lint:\n" + "\n".join(lines),
        "Change the export so that TensorRT can parse these nodes (opset, export wrapper, or a TensorRT "
        "plugin), or pass --allow-unsupported to export anyway (the engine build is then expected to fail).",
    )


def lint_onnx(
    model: str | Path | onnx.ModelProto, *, trt_version: str | None = None, load_weights: bool = True
) -> LintReport:
    """Lint an ONNX model for TensorRT 10.

    model: a .onnx path (external data resolved beside it) or a loaded ``onnx.ModelProto``.
    trt_version: the TensorRT the engine will be built with, e.g. "10.3" on JetPack 6.1/6.2; operators added
        after it are errors. Default: the table's version (:data:`trt_support.TRT_VERSION`).
    load_weights: False reads a path without its external data (fast on large models; the INT64 value check
        then sees only initializers stored inside the .onnx file).
    Raises :class:`OnnxFileError` when the file is missing or cannot be parsed.
    """
    onnx = _onnx()
    target = _target_version(trt_version)
    proto, label, path = _load(model, load_weights)
    report = LintReport(model=label, opset=_default_opset(proto), trt_version=target)
    lint = _Lint(report, target)
    if path is None and any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
        lint.model_info("onnx-checker-skipped", "onnx.checker did not run: the ModelProto refers to external "
                        "data it cannot locate. Pass the file path instead.")
    else:
        lint.check_checker(onnx, path if path is not None else proto)
    if len(proto.functions):
        lint.model_info("local-functions", f"{len(proto.functions)} model-local functions inlined before linting.")
        try:
            proto = onnx.inliner.inline_local_functions(proto)
        except Exception as exc:  # noqa: BLE001 - the calls are then linted as they are (custom domains)
            lint.model_info("local-functions", f"Inlining failed ({type(exc).__name__}: {exc}); calls are linted "
                            "as nodes.")
    lint.index(onnx, proto)
    lint.check_opset()
    lint.check_nodes()
    lint.check_int64(onnx)
    check_decomposed_layernorm(lint)
    report.findings.sort(key=lambda f: _RANK[f.severity])  # stable: graph order within a severity
    return report


# -- loading ------------------------------------------------------------------------------------------


def _onnx() -> Any:
    """onnx with the submodules used here (``import onnx`` does not import all of them)."""
    onnx = require("onnx", FEATURE)
    for sub in ("onnx.checker", "onnx.external_data_helper", "onnx.inliner", "onnx.numpy_helper",
                "onnx.shape_inference"):
        require(sub, FEATURE)
    return onnx


def _target_version(trt_version: str | None) -> str:
    version = require("packaging.version", FEATURE)
    target = trt_version or ts.TRT_VERSION
    try:
        parsed = version.Version(target)
    except version.InvalidVersion as exc:
        raise InputError(f"TensorRT version: {target}", "is not a version number.",
                         "Pass the version as MAJOR.MINOR, e.g. 10.3 (JetPack 6.1/6.2).") from exc
    if parsed.major != 10:
        raise InputError(f"TensorRT version: {target}", f"is not 10.x; this lint's table is for TensorRT "
                         f"{ts.TRT_VERSION}.", "Build with TensorRT 10 or lint against 10.x.")
    return target


def _load(model: Any, load_weights: bool) -> tuple[onnx.ModelProto, str, Path | None]:
    onnx = require("onnx", FEATURE)
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<ModelProto>", None
    if not isinstance(model, (str, Path)):
        raise TypeError(f"lint_onnx takes a path or an onnx.ModelProto, not {type(model).__name__}")
    path = Path(model)
    subject = f"ONNX file: {path}"
    if not path.is_file():
        raise OnnxFileError(subject, "does not exist.", "Check the path, or run the export first.")
    try:
        proto = onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError, missing external data, bad header...
        raise OnnxFileError(
            subject, f"cannot be parsed ({type(exc).__name__}: {exc}).",
            "The file is truncated or not an ONNX model (or its external data is missing): re-export it.",
        ) from exc
    if not proto.graph.node and not proto.graph.output:
        raise OnnxFileError(subject, "cannot be parsed (it holds no graph: truncated or not an ONNX model).",
                            "Re-export it.")
    return proto, path.name, path


def _default_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ts.DEFAULT_DOMAINS), 0)


# -- the graph index and node checks ------------------------------------------------------------------


def _attr(node: Any, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            onnx = require("onnx", FEATURE)
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _inputs(node: Any, index: int) -> str:
    """The name of input ``index`` or "" when absent (optional inputs may be empty strings)."""
    return node.input[index] if index < len(node.input) else ""


def _key(node: Any) -> str:
    return node.op_type if node.domain in ts.DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


def _subgraphs(node: Any) -> list[Any]:
    graphs = []
    for a in node.attribute:
        graphs += [a.g] if a.HasField("g") else []
        graphs += list(a.graphs)
    return graphs


class _Lint:
    """Everything the checks look up: constants, producers, consumers, inferred types and shapes."""

    def __init__(self, report: LintReport, target: str) -> None:
        self.report = report
        self.target = target
        self.nodes: list[Any] = []  # every node, subgraphs included, in graph order
        self.consts: dict[str, Any] = {}  # name -> TensorProto (initializers, Constant outputs)
        self.graph_inputs: set[str] = set()
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[tuple[Any, int]]] = {}
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list[int | None]] = {}

    # findings
    def add(self, severity: Severity, code: str, node: Any, message: str) -> None:
        name = node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"
        self.report.findings.append(Finding(severity, code, name, _key(node), message))

    def model_finding(self, severity: Severity, code: str, message: str) -> None:
        self.report.findings.append(Finding(severity, code, "", "", message))

    def model_info(self, code: str, message: str) -> None:
        self.model_finding("info", code, message)

    # index
    def check_checker(self, onnx: Any, model: Any) -> None:
        try:
            onnx.checker.check_model(str(model) if isinstance(model, Path) else model)
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.model_finding("error", "onnx-checker", f"onnx.checker rejects the model: {first}")
        except Exception as exc:  # noqa: BLE001 - e.g. a >2 GB ModelProto the checker cannot serialize
            self.model_info("onnx-checker-skipped", f"onnx.checker did not run ({type(exc).__name__}: {exc}); "
                            "pass the file path instead of a ModelProto.")

    def index(self, onnx: Any, proto: Any) -> None:
        self._index_graph(proto.graph)
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
        except Exception as exc:  # noqa: BLE001 - >2 GB protos, unknown ops in strict builds
            self.model_info("shape-inference-skipped", f"No type/rank checks: shape inference failed "
                            f"({type(exc).__name__}).")
            return
        self._index_types(inferred.graph)

    def _index_graph(self, graph: Any) -> None:
        self.consts.update({t.name: t for t in graph.initializer})
        self.graph_inputs.update(i.name for i in graph.input if i.name not in self.consts)
        for node in graph.node:
            self.nodes.append(node)
            for i, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, i))
            for name in node.output:
                self.producer[name] = node
            if node.op_type == "Constant" and node.domain in ts.DEFAULT_DOMAINS and node.output:
                self.consts[node.output[0]] = _attr(node, "value")  # None for value_int(s)/value_float(s)...
            for sub in _subgraphs(node):
                self._index_graph(sub)

    def _index_types(self, graph: Any) -> None:
        for t in graph.initializer:
            self.types[t.name] = t.data_type
            self.shapes[t.name] = list(t.dims)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and tt.elem_type:
                self.types[vi.name] = tt.elem_type
                if tt.HasField("shape"):
                    self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        for node in graph.node:
            for sub in _subgraphs(node):
                self._index_types(sub)

    # helpers for the checks
    def const_value(self, name: str) -> Any:
        """The numpy value of a constant, or None when not constant or not loaded (external data)."""
        onnx = require("onnx", FEATURE)
        if name not in self.consts:
            return None
        tensor = self.consts[name]
        if tensor is None:  # a Constant node with value_int(s)/value_float(s)/value_string(s)
            node = self.producer.get(name)
            for key in ("value_int", "value_ints", "value_float", "value_floats"):
                value = _attr(node, key) if node is not None else None
                if value is not None:
                    return require("numpy").asarray(value)
            return None
        if onnx.external_data_helper.uses_external_data(tensor):
            return None
        return onnx.numpy_helper.to_array(tensor)

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def require_const(self, node: Any, index: int, what: str) -> None:
        """Table rule "X must be an initializer / build-time constant": error for a graph input (never
        constant), warning for a computed tensor (TensorRT may still fold it)."""
        name = _inputs(node, index)
        if not name or name in self.consts:
            return
        if name in self.graph_inputs:
            self.add("error", "non-constant-input", node, f"{what} comes from graph input '{name}'; TensorRT "
                     "needs it as a build-time constant.")
        else:
            self.add("warning", "non-constant-input", node, f"{what} is computed ('{name}'); TensorRT needs a "
                     "build-time constant. Fold it (onnxsim / polygraphy surgeon sanitize --fold-constants) "
                     "or make it an initializer.")

    # model-level checks
    def check_opset(self) -> None:
        lo, hi = ts.OPSET_RANGE
        opset = self.report.opset
        if opset < lo:
            self.model_finding("error", "opset-range", f"Default-domain opset {opset} is below {lo}, the lowest "
                               f"TensorRT {ts.TRT_VERSION} parses. Re-export with opset >= "
                               f"{ts.RECOMMENDED_MIN_OPSET}.")
        elif opset > hi:
            self.model_finding("warning", "opset-range", f"Default-domain opset {opset} is above {hi}, the "
                               f"highest TensorRT {ts.TRT_VERSION} documents. Re-export with opset <= {hi}.")
        if lo <= opset < ts.RECOMMENDED_MIN_OPSET:
            self.model_finding("warning", "old-opset", f"Opset {opset} < {ts.RECOMMENDED_MIN_OPSET}: "
                               "LayerNormalization does not exist there, so LayerNorm is exported decomposed "
                               "(FP16 overflow risk). Re-export with opset >= 17 (we use 18).")

    def check_nodes(self) -> None:
        counts: Counter[str] = Counter()
        for node in self.nodes:
            counts[_key(node)] += 1
            self._check_node(node)
        self.report.op_counts = dict(counts)

    def _check_node(self, node: Any) -> None:
        op = node.op_type
        if node.domain not in ts.DEFAULT_DOMAINS or op not in ts.SUPPORTED_OPS:
            if op in ts.KNOWN_PLUGINS:
                self.add("warning", "trt-plugin", node, f"'{op}' is resolved through TensorRT's plugin "
                         f"registry ({ts.KNOWN_PLUGINS[op]}): the plugin library must be loaded at build and "
                         "run time.")
            elif node.domain not in ts.DEFAULT_DOMAINS:
                self.add("error", "custom-domain", node, f"'{op}' is in domain '{node.domain}', which TensorRT's "
                         "ONNX parser does not implement, and it is not a known TensorRT plugin.")
            else:
                self.add("error", "unsupported-op", node, f"'{op}' is not in the TensorRT {ts.TRT_VERSION} "
                         "operator table (not an ONNX operator TensorRT knows).")
            return
        row = ts.SUPPORTED_OPS[op]
        if not row.supported:
            note = f" {row.notes}" if row.notes else ""
            self.add("error", "unsupported-op", node, f"TensorRT {ts.TRT_VERSION} does not support {op}.{note}")
            return
        version = require("packaging.version", FEATURE)
        if row.since and version.Version(self.target) < version.Version(row.since):
            self.add("error", "unsupported-op", node, f"{op} needs TensorRT >= {row.since}; the target is "
                     f"{self.target}.")
            return
        self._check_type(node, row)
        check = _NODE_CHECKS.get(op)
        if check is not None:
            check(self, node)

    def _check_type(self, node: Any, row: ts.OpSupport) -> None:
        name = next((n for n in node.input if n), "")
        dtype = _ONNX_TYPES.get(self.types.get(name, 0))
        if not row.types or dtype is None or dtype in row.types:
            return
        if dtype == "DOUBLE" and "FP32" in row.types:
            self.add("info", "double-downcast", node, f"Input '{name}' is DOUBLE; TensorRT casts it to FP32 "
                     "(clamped to +-FLT_MAX).")
        else:
            self.add("warning", "unsupported-type", node, f"Input '{name}' is {dtype}; TensorRT's {node.op_type} "
                     f"takes {', '.join(row.types)}.")

    def check_int64(self, onnx: Any) -> None:
        np = require("numpy")
        n_tensors = n_values = n_unloaded = 0
        for name, tensor in self.consts.items():
            if tensor is None or tensor.data_type != onnx.TensorProto.INT64:
                continue
            n_tensors += 1
            value = self.const_value(name)
            n_unloaded += value is None
            if value is None or value.size == 0:
                continue
            n_values += int(value.size)
            lo, hi = int(np.min(value)), int(np.max(value))
            if INT32_MIN <= lo and hi <= INT32_MAX:
                continue
            uses = self.consumers.get(name, [])
            if uses and all(_is_int64_sentinel_use(node, i) for node, i in uses):
                continue  # Slice starts/ends and Loop trip counts: the parser clamps these on purpose
            user = uses[0][0] if uses else None
            message = (f"INT64 constant '{name}' holds values outside the INT32 range (min {lo}, max {hi}). "
                       "TensorRT 10 keeps INT64 natively, but wherever a value is cast to INT32 (Loop trip "
                       "counts; every INT64 on TensorRT < 9) it is clamped: check it is meant to be this big.")
            if user is not None:
                self.add("warning", "int64-out-of-range", user, message)
            else:
                self.model_finding("warning", "int64-out-of-range", message)
        if n_unloaded:
            self.model_info("external-data-not-loaded", f"{n_unloaded} INT64 constants are in external data that "
                            "was not loaded: their values were not range-checked (lint with load_weights=True).")
        if n_tensors:
            self.model_info("int64-initializers", f"{n_tensors} INT64 constants ({n_values} values loaded), "
                            "usually shapes and indices. TensorRT 10 runs INT64 natively (no cast to INT32 since "
                            "9.0); INT64 network inputs/outputs need INT64 bindings.")


def _is_int64_sentinel_use(node: Any, index: int) -> bool:
    return (node.op_type == "Slice" and index in (1, 2)) or (node.op_type == "Loop" and index == 0)


# -- per-operator restriction checks (from the table's Restrictions column) ----------------------------

_RESIZE_CTM = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


def _check_resize(lint: _Lint, node: Any) -> None:
    def bad(what: str) -> None:
        lint.add("error", "unsupported-attribute", node, f"{node.op_type} {what} is unsupported by TensorRT.")

    mode = _attr(node, "mode", "nearest")
    if mode not in ("nearest", "linear"):
        bad(f"mode='{mode}' (only nearest, linear)")
    ctm = _attr(node, "coordinate_transformation_mode", "half_pixel")
    if ctm not in _RESIZE_CTM:
        bad(f"coordinate_transformation_mode='{ctm}' (only {', '.join(sorted(_RESIZE_CTM))})")
    nearest = _attr(node, "nearest_mode", "round_prefer_floor")
    if mode == "nearest" and nearest not in _RESIZE_NEAREST:
        bad(f"nearest_mode='{nearest}'")
    policy = _attr(node, "keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        bad(f"keep_aspect_ratio_policy='{policy}' (only stretch)")
    if _attr(node, "antialias", 0):
        bad("antialias=1")
    axes = _attr(node, "axes")
    rank = lint.rank(_inputs(node, 0))
    if axes is not None and _inputs(node, 2):
        if rank is None:
            lint.add("warning", "unsupported-attribute", node, "Resize has `axes` with a `scales` input; TensorRT "
                     "needs axes = 0..rank-1 in order and the input rank is unknown here.")
        elif list(axes) != list(range(rank)):
            bad(f"axes={list(axes)} with a `scales` input (must be 0..{rank - 1} in order)")


def _check_pool(lint: _Lint, node: Any) -> None:
    kernel = _attr(node, "kernel_shape", [])
    if node.op_type != "LpPool" and len(kernel) not in (2, 3):
        lint.add("error", "unsupported-rank", node, f"{node.op_type} with a {len(kernel)}D kernel: TensorRT "
                 "pools in 2D or 3D only.")
    dilations = _attr(node, "dilations", [])
    if any(d != 1 for d in dilations):
        lint.add("error", "unsupported-attribute", node, f"{node.op_type} dilations={list(dilations)}: TensorRT "
                 "needs none or all ones.")
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        lint.add("error", "unsupported-io", node, "MaxPool's `Indices` output is unsupported by TensorRT.")


def _check_constant(lint: _Lint, node: Any) -> None:
    for name in ("sparse_value", "value_string", "value_strings"):
        if _attr(node, name) is not None:
            lint.add("error", "unsupported-attribute", node, f"Constant with `{name}` is unsupported by TensorRT.")


def _check_zero_point(index: int, what: str) -> Callable[[_Lint, Any], None]:
    def check(lint: _Lint, node: Any) -> None:
        name = _inputs(node, index)
        if not name:
            return
        lint.require_const(node, index, f"{node.op_type} `{what}`")
        value = lint.const_value(name)
        if value is not None and value.any():
            lint.add("error", "unsupported-attribute", node, f"{node.op_type} `{what}` is non-zero; TensorRT "
                     "supports symmetric quantization only.")
    return check


def _check_dropout(lint: _Lint, node: Any) -> None:
    name = _inputs(node, 2)
    if name:
        lint.require_const(node, 2, "Dropout `training_mode`")
        value = lint.const_value(name)
        if value is not None and bool(value.any()):
            lint.add("error", "unsupported-attribute", node, "Dropout in training mode; export in eval mode.")


def _check_rnn(lint: _Lint, node: Any) -> None:
    per_direction = {"RNN": 1, "GRU": 2, "LSTM": 3}[node.op_type]
    acts = [a.decode() if isinstance(a, bytes) else a for a in _attr(node, "activations", [])]
    if _attr(node, "direction", "forward") == "bidirectional" and len(acts) == 2 * per_direction:
        if acts[:per_direction] != acts[per_direction:]:
            lint.add("error", "unsupported-attribute", node, f"Bidirectional {node.op_type} with different forward "
                     f"and reverse activations {acts}: TensorRT needs them equal.")
    if node.op_type == "LSTM":
        for name in ("input_forget", "layout"):
            if _attr(node, name, 0):
                lint.add("error", "unsupported-attribute", node, f"LSTM {name}={_attr(node, name)}: TensorRT "
                         "needs 0.")


def _check_rank(index: int, want: tuple[int, ...], what: str) -> Callable[[_Lint, Any], None]:
    def check(lint: _Lint, node: Any) -> None:
        rank = lint.rank(_inputs(node, index))
        if rank is not None and rank not in want:
            lint.add("error", "unsupported-rank", node, f"{node.op_type} {what} has rank {rank}; TensorRT needs "
                     f"{' or '.join(map(str, want))}.")
    return check


def _check_deform_conv(lint: _Lint, node: Any) -> None:
    _check_rank(0, (3, 4), "input (1D or 2D spatial)")(lint, node)
    pads = list(_attr(node, "pads", []))
    half = len(pads) // 2
    if pads and pads[:half] != pads[half:]:
        lint.add("error", "unsupported-attribute", node, f"DeformConv pads={pads}: TensorRT needs equal begin and "
                 "end pads on each axis.")


def _check_eye_like(lint: _Lint, node: Any) -> None:
    shape = lint.shapes.get(_inputs(node, 0))
    if shape is None or None in shape:
        lint.add("warning", "static-shape-required", node, "EyeLike needs an input with static dimensions; the "
                 "shape here is dynamic or unknown.")


def _check_first_output_only(lint: _Lint, node: Any) -> None:
    if any(node.output[1:]):
        lint.add("error", "unsupported-io", node, f"{node.op_type}: only the first output is supported by TensorRT.")


def _check_rotary(lint: _Lint, node: Any) -> None:
    dtype = lint.types.get(_inputs(node, 3))
    if dtype is not None and _ONNX_TYPES.get(dtype) != "INT64":
        lint.add("error", "unsupported-type", node, f"RotaryEmbedding `position_ids` is {_ONNX_TYPES.get(dtype)}; "
                 "TensorRT needs INT64.")


def _check_scatter_nd(lint: _Lint, node: Any) -> None:
    reduction = _attr(node, "reduction", "none")
    if reduction != "none":
        lint.add("error", "unsupported-attribute", node, f"ScatterND reduction='{reduction}' is unsupported by "
                 "TensorRT (only none).")


def _check_tensor_scatter(lint: _Lint, node: Any) -> None:
    _check_rank(0, (4,), "`past_cache`")(lint, node)
    _check_rank(1, (4,), "`update`")(lint, node)
    if _attr(node, "axis", -2) not in (-2, 2):
        lint.add("error", "unsupported-attribute", node, f"TensorScatter axis={_attr(node, 'axis')}: TensorRT "
                 "needs -2.")


def _check_topk(lint: _Lint, node: Any) -> None:
    if _attr(node, "sorted", 1) != 1:
        lint.add("error", "unsupported-attribute", node, "TopK sorted=0 is unsupported by TensorRT.")
    name = _inputs(node, 1)
    k = lint.const_value(name) if name in lint.consts else None
    if name in lint.consts:
        if k is not None and k.size and int(k.max()) >= ts.TOPK_MAX_K:
            lint.add("error", "unsupported-attribute", node, f"TopK K={int(k.max())}: TensorRT needs "
                     f"K < {ts.TOPK_MAX_K}.")
    elif name:
        lint.add("warning", "data-dependent-shape", node, f"TopK K comes from '{name}' at run time: the output "
                 f"shape is data-dependent and K must stay below {ts.TOPK_MAX_K}.")


def _check_data_dependent(lint: _Lint, node: Any) -> None:
    lint.add("warning", "data-dependent-shape", node, f"{node.op_type}: {ts.SUPPORTED_OPS[node.op_type].notes}")


def _check_attention(lint: _Lint, node: Any) -> None:
    for index, what in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
        if _inputs(node, index):
            lint.add("error", "unsupported-io", node, f"Attention input `{what}` is unsupported by TensorRT.")
    for index, what in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
        if index < len(node.output) and node.output[index]:
            lint.add("error", "unsupported-io", node, f"Attention output `{what}` is unsupported by TensorRT.")
    for name in ("qk_matmul_output_mode", "softcap"):
        if _attr(node, name, 0):
            lint.add("error", "unsupported-attribute", node, f"Attention `{name}` is unsupported by TensorRT.")
    if _attr(node, "softmax_precision") is not None:
        lint.add("error", "unsupported-attribute", node, "Attention `softmax_precision` is rejected by TensorRT.")
    for index, what in enumerate(("Q", "K", "V", "attn_mask")):
        _check_rank(index, (4,), what)(lint, node)


def _check_einsum(lint: _Lint, node: Any) -> None:
    version = require("packaging.version", FEATURE)
    if "..." in _attr(node, "equation", "") and version.Version(lint.target) < version.Version("10.12"):
        lint.add("error", "unsupported-attribute", node, f"Einsum with an ellipsis needs TensorRT >= 10.12 "
                 f"(Changelog); the target is {lint.target}.")


def _check_if(lint: _Lint, node: Any) -> None:
    cond = _inputs(node, 0)
    if cond in lint.consts:
        lint.add("info", "if-constant-cond", node, "If with a constant condition: TensorRT imports only the "
                 "taken branch.")
        return
    lint.add("warning", "control-flow", node, "If with a run-time condition becomes an IIfConditional (the "
             "condition must be a scalar BOOL); both branches are built and fusion stops at its boundary.")
    then, other = _attr(node, "then_branch"), _attr(node, "else_branch")
    if then is None or other is None:  # malformed; onnx.checker reports it
        return
    if len(then.output) != len(other.output):
        lint.add("error", "if-branch-mismatch", node, f"If branches have {len(then.output)} and "
                 f"{len(other.output)} outputs; TensorRT needs the same number.")
        return
    for a, b in zip(then.output, other.output):
        if a.name == b.name:
            lint.add("error", "if-branch-mismatch", node, f"If branches share the output name '{a.name}'; TensorRT "
                     "needs different names.")
        ra, rb = (len(v.type.tensor_type.shape.dim) if v.type.tensor_type.HasField("shape") else None for v in (a, b))
        if ra is not None and rb is not None and ra != rb:
            lint.add("error", "if-branch-mismatch", node, f"If branch outputs '{a.name}' and '{b.name}' have ranks "
                     f"{ra} and {rb}; TensorRT needs the same rank.")


def _check_loop(lint: _Lint, node: Any) -> None:
    body = _attr(node, "body")
    if body is None:  # malformed; onnx.checker reports it
        return
    n_state = max(len(node.input) - 2, 0)
    n_scan = len(body.output) - 1 - n_state
    trip = _inputs(node, 0)
    value = lint.const_value(trip) if trip in lint.consts else None
    if not trip or (value is not None and value.size == 1 and int(value.reshape(-1)[0]) >= INT32_MAX):
        trip_kind = "none"
    else:
        trip_kind = "const" if trip in lint.consts else "dynamic"
    if n_scan > 0 and trip_kind == "none":
        lint.add("error", "loop-scan-output", node, f"Loop with {n_scan} scan output(s) and no trip count: "
                 "TensorRT gives scan outputs a dummy length of 1024 and they must not be consumed. Give the "
                 "loop a trip count or carry the values as state.")
    elif n_scan > 0 and trip_kind == "dynamic":
        lint.add("warning", "loop-scan-output", node, f"Loop with {n_scan} scan output(s) and a run-time trip "
                 f"count ('{trip}'): TensorRT documents that scan output length cannot be dynamic.")
    else:
        lint.add("warning", "control-flow", node, "Loop becomes an ILoop: iterations run serially, loop-carried "
                 "values must keep their shape on every iteration, and fusion stops at its boundary.")


def _check_scan(lint: _Lint, node: Any) -> None:
    lint.add("warning", "control-flow", node, "Scan becomes an ILoop: iterations run serially and fusion stops "
             "at its boundary.")


def _const_input(index: int, what: str) -> Callable[[_Lint, Any], None]:
    return lambda lint, node: lint.require_const(node, index, f"{node.op_type} `{what}`")


def _both(*checks: Callable[[_Lint, Any], None]) -> Callable[[_Lint, Any], None]:
    def check(lint: _Lint, node: Any) -> None:
        for c in checks:
            c(lint, node)
    return check


_NODE_CHECKS: dict[str, Callable[[_Lint, Any], None]] = {
    "Resize": _check_resize,
    "Upsample": _check_resize,
    "AveragePool": _check_pool,
    "MaxPool": _check_pool,
    "LpPool": _check_pool,
    "Constant": _check_constant,
    "CumSum": _const_input(1, "axis"),
    "DeformConv": _check_deform_conv,
    "DequantizeLinear": _check_zero_point(2, "x_zero_point"),
    "QuantizeLinear": _check_zero_point(2, "y_zero_point"),
    "Dropout": _check_dropout,
    "EyeLike": _check_eye_like,
    "GridSample": _check_rank(0, (4,), "input"),
    "GRU": _check_rnn,
    "LSTM": _check_rnn,
    "RNN": _check_rnn,
    "LayerNormalization": _check_first_output_only,
    "OneHot": _const_input(1, "depth"),
    **{op: _const_input(1, "axes") for op in ts.SUPPORTED_OPS if op.startswith("Reduce")},
    "RotaryEmbedding": _check_rotary,
    "STFT": _both(_const_input(1, "frame_step"), _const_input(2, "window")),
    "ScatterND": _check_scatter_nd,
    "Squeeze": _const_input(1, "axes"),
    "Unsqueeze": _const_input(1, "axes"),
    "TensorScatter": _check_tensor_scatter,
    "TopK": _check_topk,
    "NonZero": _check_data_dependent,
    "NonMaxSuppression": _check_data_dependent,
    "Attention": _check_attention,
    "Einsum": _check_einsum,
    "If": _check_if,
    "Loop": _check_loop,
    "Scan": _check_scan,
}


# -- decomposed LayerNorm ------------------------------------------------------------------------------


def check_decomposed_layernorm(lint: _Lint) -> None:
    """Warn on ReduceMean -> Sub -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div.

    In FP16 the squared deviation overflows (|x - mean| > 255.9 gives inf), the classic source of NaNs in
    TensorRT transformer engines. Exporting with opset >= 17 keeps LayerNormalization one op, which TensorRT
    computes in FP32. ``Mul(d, d)`` for the square and ``Reciprocal`` + ``Mul`` for the division match too.
    """

    def made_by(name: str, *ops: str) -> Any:
        node = lint.producer.get(name)
        return node if node is not None and node.op_type in ops else None

    for sqrt in (n for n in lint.nodes if n.op_type == "Sqrt"):
        add = made_by(sqrt.input[0], "Add")
        var = add and next((made_by(i, "ReduceMean") for i in add.input if made_by(i, "ReduceMean")), None)
        square = var and made_by(var.input[0], "Pow", "Mul")
        if not square or not _is_square(lint, square):
            continue
        sub = made_by(square.input[0], "Sub")
        mean = sub and made_by(sub.input[1], "ReduceMean")
        if not mean or mean.input[0] != sub.input[0]:
            continue
        users = [n for n, _ in lint.consumers.get(sqrt.output[0], []) if n.op_type in ("Div", "Reciprocal")]
        anchor = users[0] if users else sqrt
        lint.add("warning", "decomposed-layernorm", anchor, "Decomposed LayerNorm (ReduceMean -> Sub -> Pow(2) -> "
                 f"ReduceMean -> Add(eps) -> Sqrt -> Div) on '{mean.input[0]}': in FP16 the squared deviation "
                 "overflows above 255.9 and the engine returns inf/NaN. Export with opset >= 17 so "
                 "LayerNormalization stays one op (TensorRT computes it in FP32).")


def _is_square(lint: _Lint, node: Any) -> bool:
    if node.op_type == "Mul":
        return len(node.input) == 2 and node.input[0] == node.input[1]
    exponent = lint.const_value(_inputs(node, 1))
    return exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0
