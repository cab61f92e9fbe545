"""What TensorRT 10's ONNX parser accepts: the operator table that :mod:`vidllm_edge.export.lint` checks against.

Source (read 2026-11-25 through the project's stored copy of public GitHub):

* Operator matrix: ``onnx/onnx-tensorrt``, ``docs/operators.md`` at commit
  ``fa5aa9f61e7781d2ca8f5351d42c1f19525a6124`` — the revision headed "TensorRT 10.15 supports operators in
  the inclusive range of opset 9 to opset 24" (Apache-2.0). Every row of that matrix is below, with its
  Y/N, its "Supported Types" and its "Restrictions" column (reworded, same meaning). ``NVIDIA/TensorRT``
  ``parsers/onnx`` is a git submodule of that repository, so it holds no separate copy.
* ``since``: the 10.x release that added the operator, from ``docs/Changelog.md`` of the same repository
  (entries 10.0 EA … 10.15 GA). Empty means the Changelog names no 10.x release for it (present in 10.0).
  JetPack 6.1/6.2 ship TensorRT 10.3 (from memory, not from these sources), so ``since`` matters on a Jetson.
* Behaviour notes marked "(importer)" come from ``onnxOpImporters.cpp`` of the same repository at commit
  ``0137504e2b25fe5253bd85d26b073378fb67805b`` (the 10.6-era source): constant ``If`` conditions, ``Loop``
  trip counts and scan outputs, ``Pad`` modes.
* Plugins: ``NVIDIA/TensorRT`` ``plugin/README.md`` (commit ``147005ffe1dc447bec8af9601539a9d464ca77fd``),
  non-deprecated entries, and the ``TRT_*`` custom operators of onnx-tensorrt ``docs/TRT_custom_ops.md``.

Data types, per the matrix preamble: DOUBLE, FP32, FP16, BF16, FP8, FP4, INT32, INT64, INT8, INT4, UINT8 and
BOOL. DOUBLE is cast down to FP32 (clamped to ±FLT_MAX). INT8, INT4, FP8 and FP4 are quantized types,
usable only through Q/DQ from a wider float type. UINT8 is allowed only as a network input or output.
INT64 has been native since TensorRT 9.0 (Changelog 9.0 EA): the parser no longer casts INT64 down to
INT32, and INT64 model inputs/outputs need INT64 bindings (TensorRT 8.x clamped INT64 to INT32).

Only the default ONNX domain ("" or "ai.onnx") is in this table. A node in any other domain
(com.microsoft, ai.onnx.ml, ...) is unsupported unless its op_type is a TensorRT plugin or custom operator
in :data:`KNOWN_PLUGINS`, which the parser resolves through the plugin registry at build time.
"""

from __future__ import annotations

from dataclasses import dataclass

TRT_VERSION = "10.15"
SOURCE = (
    "onnx/onnx-tensorrt docs/operators.md @ fa5aa9f61e7781d2ca8f5351d42c1f19525a6124 "
    "(TensorRT 10.15, opset 9-24; read 2026-11-25)"
)
OPSET_RANGE = (9, 24)  # inclusive, from the matrix header
RECOMMENDED_MIN_OPSET = 17  # LayerNormalization is a single op from opset 17 on
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
TOPK_MAX_K = 3840  # TopK: K must be below this


@dataclass(frozen=True)
class OpSupport:
    """One row of the TensorRT operator matrix.

    ``supported``: the matrix says Y. ``types``: its "Supported Types" (FP32, FP16, BF16, FP8, FP4, INT4, INT8,
    INT32, INT64, UINT8, BOOL). ``restrictions``: its "Restrictions" column (what the parser rejects).
    ``notes``: our additions (what the restriction means for an export, data-dependent shapes, sources).
    ``since``: the 10.x release that added it ("" when the Changelog names none).
    """

    supported: bool
    types: tuple[str, ...] = ()
    notes: str = ""
    restrictions: str = ""
    since: str = ""


FP = ("FP32", "FP16", "BF16")
FP_INT = FP + ("INT32", "INT64")
FP_INT_BOOL = FP_INT + ("BOOL",)
FP_ONLY = ("FP32", "FP16")


def _y(types: tuple[str, ...], restrictions: str = "", notes: str = "", since: str = "") -> OpSupport:
    return OpSupport(True, types, notes, restrictions, since)


def _n(notes: str = "") -> OpSupport:
    return OpSupport(False, (), notes)


_REDUCE = "`axes` input must be an initializer."
_POOL_DIL = "`dilations` must be empty or all ones."
_BIDIR = "Bidirectional: the forward and reverse activation functions must be the same."
_SEED = "`seed` is ignored (TensorRT picks its own seed)."
_DDS = (
    "Data-dependent output shape: the output size is known only after the kernel runs, so such outputs need "
    "an IOutputAllocator and the enqueue cannot be captured into a CUDA graph."
)

SUPPORTED_OPS: dict[str, OpSupport] = {
    "Abs": _y(FP_INT),
    "Acos": _y(FP),
    "Acosh": _y(FP),
    "Add": _y(FP_INT),
    "AffineGrid": _n(),
    "And": _y(("BOOL",)),
    "ArgMax": _y(FP_INT),
    "ArgMin": _y(FP_INT),
    "Asin": _y(FP),
    "Asinh": _y(FP),
    "Atan": _y(FP),
    "Atanh": _y(FP),
    "Attention": _y(
        FP + ("INT8", "FP8"),
        "Q, K, V and attn_mask must be 4D. Inputs past_key, past_value, nonpad_kv_seqlen and outputs "
        "present_key, present_value, qk_matmul_output are unsupported. Attributes qk_matmul_output_mode and "
        "softcap are unsupported; q_num_heads/kv_num_heads come from dim 1 of Q and K/V.",
        "Opset 23 op. The op checker also rejects `softmax_precision`. A 10.3 parser (JetPack 6.1/6.2) lacks it: "
        "export SDPA decomposed (opset 18) for those targets.",
        since="10.14",
    ),
    "AveragePool": _y(FP, "2D or 3D pooling only. " + _POOL_DIL),
    "BatchNormalization": _y(FP),
    "Bernoulli": _n(),
    "BitShift": _n(),
    "BitwiseAnd": _n(),
    "BitwiseNot": _n(),
    "BitwiseOr": _n(),
    "BitwiseXor": _n(),
    "BlackmanWindow": _y(FP_ONLY, since="10.4"),
    "Cast": _y(FP_INT + ("UINT8", "BOOL")),
    "CastLike": _y(FP_INT + ("UINT8", "BOOL")),
    "Ceil": _y(FP),
    "Celu": _y(FP),
    "CenterCropPad": _n(),
    "Clip": _y(FP),
    "Col2Im": _n(),
    "Compress": _n("Data-dependent output shape; not imported."),
    "Concat": _y(FP_INT_BOOL),
    "ConcatFromSequence": _n("Sequence types are not supported."),
    "Constant": _y(
        FP + ("FP8", "FP4", "INT4", "INT32", "INT64", "BOOL"),
        "Attributes sparse_value, value_string and value_strings are unsupported.",
    ),
    "ConstantOfShape": _y(FP + ("FP8", "FP4", "INT4", "INT32", "INT64", "BOOL")),
    "Conv": _y(FP),
    "ConvInteger": _n("Use Q/DQ around Conv instead."),
    "ConvTranspose": _y(FP),
    "Cos": _y(FP),
    "Cosh": _y(FP),
    "CumSum": _y(FP, "`axis` must be a build-time constant.", "Dynamic axes improved in 10.8 (Changelog)."),
    "DFT": _n(),
    "DeformConv": _y(
        FP_ONLY,
        "`input` must have 1D or 2D spatial dimensions; begin and end `pads` must be equal on each axis.",
        since="10.1",
    ),
    "DepthToSpace": _y(FP_INT),
    "DequantizeLinear": _y(("INT8", "FP8", "FP4", "INT4"), "`x_zero_point` must be zero."),
    "Det": _n(),
    "Div": _y(FP_INT),
    "Dropout": _y(FP, "`is_training` must be an initializer that evaluates to False."),
    "DynamicQuantizeLinear": _n(
        "Not supported; TensorRT's IDynamicQuantize can be reached through a model local function."
    ),
    "Einsum": _y(FP, notes="Ellipsis, diagonal and broadcasting equations only since 10.12 (Changelog)."),
    "Elu": _y(FP),
    "Equal": _y(FP_INT),
    "Erf": _y(FP),
    "Exp": _y(FP),
    "Expand": _y(FP_INT_BOOL),
    "EyeLike": _y(FP_INT_BOOL, "`input` must have static dimensions."),
    "Flatten": _y(FP_INT_BOOL),
    "Floor": _y(FP),
    "Gather": _y(FP_INT_BOOL),
    "GatherElements": _y(FP_INT_BOOL),
    "GatherND": _y(FP_INT_BOOL),
    "Gelu": _y(FP + ("INT8", "INT32", "INT64")),
    "Gemm": _y(FP),
    "GlobalAveragePool": _y(FP),
    "GlobalLpPool": _y(FP),
    "GlobalMaxPool": _y(FP),
    "Greater": _y(FP_INT),
    "GreaterOrEqual": _y(FP_INT),
    "GridSample": _y(FP_ONLY, "Input must be 4D."),
    "GroupNormalization": _y(FP, notes="Opset 21 GroupNormalization since 10.9 (Changelog)."),
    "GRU": _y(FP, _BIDIR),
    "HammingWindow": _y(FP_ONLY, since="10.4"),
    "HannWindow": _y(FP_ONLY, since="10.4"),
    "HardSigmoid": _y(FP),
    "HardSwish": _y(FP),
    "Hardmax": _y(FP, "The size of the `axis` dimension of the input must be a build-time constant."),
    "Identity": _y(FP_INT_BOOL),
    "If": _y(
        FP_INT_BOOL,
        "The outputs of the two branches must have the same rank and different names.",
        "(importer) A build-time-constant condition makes the parser import only the taken branch; otherwise "
        "it builds an IIfConditional and the condition must reduce to a scalar BOOL. Both branches must "
        "have the same number of outputs.",
    ),
    "ImageScaler": _y(FP),
    "ImageDecoder": _n(),
    "InstanceNormalization": _y(FP),
    "IsInf": _y(FP),
    "IsNaN": _y(FP_INT),
    "LayerNormalization": _y(
        FP,
        "Only the first output `Y` is supported.",
        "Imported as one INormalizationLayer that computes in `stash_type` (FP32 by default), which avoids "
        "the FP16 overflow of a decomposed LayerNorm. Needs opset >= 17 at export.",
    ),
    "LeakyRelu": _y(FP),
    "Less": _y(FP_INT),
    "LessOrEqual": _y(FP_INT),
    "Log": _y(FP),
    "LogSoftmax": _y(FP),
    "Loop": _y(
        FP_INT_BOOL,
        "Scan output length cannot be dynamic. Loop-carried values must keep the same shape on every "
        "iteration.",
        "(importer) A trip count is cast to INT32. With no trip count (or one >= INT32_MAX, treated as none), "
        "scan outputs get a dummy length of 1024 and must not be consumed. Iterations run serially.",
    ),
    "LRN": _y(FP),
    "LSTM": _y(FP, _BIDIR + " `input_forget` must be 0. `layout` must be 0."),
    "LpNormalization": _y(FP),
    "LpPool": _y(FP, _POOL_DIL),
    "MatMul": _y(FP, notes="(importer) INT32/INT64 operands are rejected."),
    "MatMulInteger": _n("Use Q/DQ around MatMul instead."),
    "Max": _y(FP_INT),
    "MaxPool": _y(FP, "2D or 3D pooling only. The `Indices` output is unsupported. " + _POOL_DIL),
    "MaxRoiPool": _n(),
    "MaxUnpool": _n(),
    "Mean": _y(FP + ("FP8", "INT32", "INT64")),
    "MeanVarianceNormalization": _y(FP),
    "MelWeightMatrix": _n(),
    "Min": _y(FP_INT),
    "Mish": _y(FP_ONLY),
    "Mod": _y(FP_INT),
    "Mul": _y(FP_INT),
    "Multinomial": _n(),
    "Neg": _y(FP_INT),
    "NegativeLogLikelihoodLoss": _n(),
    "NonMaxSuppression": _y(FP_ONLY, notes=_DDS),
    "NonZero": _y(FP_ONLY, notes=_DDS),
    "Not": _y(("BOOL",)),
    "OneHot": _y(FP_INT_BOOL, "`depth` must be a build-time constant."),
    "Optional": _n("Optional types are not supported."),
    "OptionalGetElement": _n("Optional types are not supported."),
    "OptionalHasElement": _n("Optional types are not supported."),
    "Or": _y(("BOOL",)),
    "Pad": _y(
        FP_INT,
        notes="(importer) All four ONNX modes map to a slice layer: constant, reflect, edge, wrap (wrap since "
        "10.0 EA); tensor `axes` since 10.4 (Changelog).",
    ),
    "ParametricSoftplus": _y(FP),
    "Pow": _y(FP_INT, notes="Integer exponents since 10.8 and integer bases since 10.12 (Changelog)."),
    "PRelu": _y(FP),
    "QLinearConv": _n("Use Q/DQ around Conv instead."),
    "QLinearMatMul": _n("Use Q/DQ around MatMul instead."),
    "QuantizeLinear": _y(FP, "`y_zero_point` must be 0."),
    "RandomNormal": _y(FP, _SEED),
    "RandomNormalLike": _y(FP, _SEED),
    "RandomUniform": _y(FP, _SEED),
    "RandomUniformLike": _y(FP, _SEED),
    "Range": _y(FP_INT),
    "Reciprocal": _y(FP),
    "ReduceL1": _y(FP_INT, _REDUCE),
    "ReduceL2": _y(FP_INT, _REDUCE),
    "ReduceLogSum": _y(FP_INT, _REDUCE),
    "ReduceLogSumExp": _y(FP_INT, _REDUCE),
    "ReduceMax": _y(FP_INT, _REDUCE),
    "ReduceMean": _y(FP_INT, _REDUCE),
    "ReduceMin": _y(FP_INT, _REDUCE),
    "ReduceProd": _y(FP_INT, _REDUCE),
    "ReduceSum": _y(FP_INT, _REDUCE),
    "ReduceSumSquare": _y(FP_INT, _REDUCE),
    "RegexFullMatch": _n("String types are not supported."),
    "Relu": _y(FP_INT),
    "Reshape": _y(FP_INT_BOOL),
    "Resize": _y(
        FP,
        "coordinate_transformation_mode: half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric or "
        "align_corners. mode: nearest or linear. nearest_mode: floor, ceil, round_prefer_floor or "
        "round_prefer_ceil. keep_aspect_ratio_policy: stretch. With a `scales` tensor input, `axes` must be "
        "0..rank-1 in order. No antialiasing.",
        "So: no cubic, no tf_crop_and_resize, no half_pixel_symmetric, antialias=0.",
    ),
    "ReverseSequence": _y(FP_INT_BOOL),
    "RMSNormalization": _y(FP, notes="Opset 23 op.", since="10.15"),
    "RNN": _y(FP, _BIDIR),
    "RoiAlign": _y(FP_ONLY),
    "RotaryEmbedding": _y(FP, "`position_ids` must be INT64.", "Opset 23 op.", since="10.15"),
    "Round": _y(FP),
    "STFT": _y(("FP32",), "`frame_step` and `window` must be initializers. Input must be real-valued.", since="10.5"),
    "ScaledTanh": _y(FP),
    "Scan": _y(FP, notes="Imported as an ILoop: iterations run serially."),
    "Scatter": _y(FP_INT),
    "ScatterElements": _y(FP_INT, notes="`reduction` attribute supported since 10.0 EA (Changelog)."),
    "ScatterND": _y(FP_INT, "`reduction` other than none is unsupported."),
    "Selu": _y(FP),
    "SequenceAt": _n("Sequence types are not supported."),
    "SequenceConstruct": _n("Sequence types are not supported."),
    "SequenceEmpty": _n("Sequence types are not supported."),
    "SequenceErase": _n("Sequence types are not supported."),
    "SequenceInsert": _n("Sequence types are not supported."),
    "SequenceLength": _n("Sequence types are not supported."),
    "SequenceMap": _n("Sequence types are not supported."),
    "Shape": _y(FP_INT_BOOL),
    "Shrink": _y(FP_INT),
    "Sigmoid": _y(FP),
    "Sign": _y(FP_INT),
    "Sin": _y(FP),
    "Sinh": _y(FP),
    "Size": _y(FP_INT_BOOL),
    "Slice": _y(FP_INT_BOOL, notes="Tensor `axes` input since 10.3 (Changelog)."),
    "Softmax": _y(FP),
    "SoftmaxCrossEntropyLoss": _n(),
    "Softplus": _y(FP),
    "Softsign": _y(FP),
    "SpaceToDepth": _y(FP_INT),
    "Split": _y(FP_INT_BOOL),
    "SplitToSequence": _n("Sequence types are not supported."),
    "Sqrt": _y(FP),
    "Squeeze": _y(FP_INT_BOOL, "`axes` must be resolvable to a constant."),
    "StringConcat": _n("String types are not supported."),
    "StringNormalizer": _n("String types are not supported."),
    "StringSplit": _n("String types are not supported."),
    "Sub": _y(FP_INT),
    "Sum": _y(FP_INT),
    "Tan": _y(FP),
    "Tanh": _y(FP),
    "TensorScatter": _y(
        FP + ("INT32",), "`past_cache` and `update` must be 4D; `axis` must be -2.", "Opset 24 op.", since="10.15"
    ),
    "TfIdfVectorizer": _n(),
    "ThresholdedRelu": _y(FP),
    "Tile": _y(FP_INT_BOOL),
    "TopK": _y(
        FP_INT,
        f"`sorted` must be 1. `K` must be less than {TOPK_MAX_K}.",
        "A K that is not a build-time constant makes the output shape data-dependent (dynamic K since 8.6).",
    ),
    "Transpose": _y(FP_INT_BOOL),
    "Trilu": _y(FP_INT_BOOL),
    "Unique": _n("Data-dependent output shape; not imported."),
    "Unsqueeze": _y(FP_INT_BOOL, "`axes` must be resolvable to a constant."),
    "Upsample": _y(FP, notes="Deprecated in ONNX; same limits as Resize."),
    "Where": _y(FP_INT_BOOL),
    "Xor": _y(("BOOL",)),
}

# op_type -> where it is documented. The parser resolves these by name through the plugin registry
# (the node's domain is read as the plugin namespace since 10.10), so any domain is accepted.
KNOWN_PLUGINS: dict[str, str] = {
    **{
        name: "onnx-tensorrt docs/TRT_custom_ops.md"
        for name in ("TRT_QuantizedAttention", "TRT_Attention", "TRT_KVCacheUpdate")
    },
    **{
        name: "NVIDIA/TensorRT plugin/README.md"
        for name in (
            "CustomQKVToContextPluginDynamic",
            "CropAndResizeDynamic",
            "DecodeBbox3DPlugin",
            "DetectionLayer_TRT",
            "DisentangledAttention_TRT",
            "EfficientNMS_TRT",
            "CustomEmbLayerNormPluginDynamic",
            "CustomFCPluginDynamic",
            "FlattenConcat_TRT",
            "GenerateDetection_TRT",
            "GridAnchor_TRT",
            "GridAnchorRect_TRT",
            "GroupNormalizationPlugin",
            "InstanceNormalization_TRT",
            "ModulatedDeformConv2d",
            "MultilevelCropAndResize_TRT",
            "MultilevelProposeROI_TRT",
            "MultiscaleDeformableAttnPlugin_TRT",
            "RPROI_TRT",
            "PillarScatterPlugin",
            "PriorBox_TRT",
            "ProposalLayer_TRT",
            "ProposalDynamic",
            "PyramidROIAlign_TRT",
            "Region_TRT",
            "Reorg_TRT",
            "ROIAlign_TRT",
            "ResizeNearest_TRT",
            "CustomSkipLayerNormPluginDynamic",
            "VoxelGeneratorPlugin",
        )
    },
}


def lookup(op_type: str, domain: str = "") -> OpSupport | None:
    """The table row for a default-domain operator, or None when the table does not list it."""
    if domain not in DEFAULT_DOMAINS:
        return None
    return SUPPORTED_OPS.get(op_type)
