"""Roofline floors per stage, peaks measured on this device, Jetson Orin projections and memory fit.

Counting, from the config alone (no weights, no compute):

* Vision units (encoder + adapter, geometry, metric depth, lift, projector) are run once on the ``meta``
  device, built from the config, under ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions
  and SDPA; 2 FLOPs per multiply-add) while a dispatch mode follows the bytes of live tensors, which gives
  each unit's activation peak (FP32, as the reference runs; halved for 16-bit and INT8 engines, which keep
  16-bit activations between their INT8 GEMMs).
* The LLM stages are counted from its Hugging Face config: 2 FLOPs per weight per token in the decoder
  blocks, causal attention over the context, the LM head on the last position only (all a decoder needs).
* Scale alignment and voxel pooling are data-dependent and small: counted by formula (see `_SCALE_*`).

Bytes are the compulsory traffic of a stage: every weight it uses read once, at the precision's width, plus
its inputs and outputs at the unit contract's FP32 (the LLM: K/V written and read, embeddings, logits).
Intermediate activations are assumed to stay on chip, so the floor is a lower bound:

    floor_ms = max(FLOPs / peak FLOP/s, bytes / peak bandwidth)          (x floor = measured / floor)

Peaks are measured in the same run (`measure_peaks`): dense matmul throughput per dtype and the
device-to-device copy bandwidth (`benchmarks.llm_decode.measure_bandwidth`, read + written bytes).

Jetson projections (`JETSON`, from published peaks, dense) are PROJECTIONS, not measurements: the Jetson
floor of each stage, and the measured time scaled by the ratio of the Jetson floor to this device's floor
(the stage keeps the fraction of its roofline it reaches here; Jetson's smaller caches and lower clocks
usually make it worse). Memory fit adds weights, the largest activation working set and the K/V cache of
the scene's context, against the module's memory less `JETSON_RESERVE_GB`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import weakref
from typing import Any, Callable, Iterable

import torch

from vidllm_edge.benchmarks.timing import VISION_STAGES, sync

PRECISIONS = ("fp32", "fp16", "int8")
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
ACT_BYTES = {"fp32": 4, "fp16": 2, "int8": 2}  # INT8 engines keep 16-bit activations between INT8 GEMMs
IO_BYTES = 4  # unit inputs and outputs are FP32 by contract (vidllm_edge/units.py), FP16 graphs included
_SCALE_PASSES = 4        # align_scale: one weighted fit + up to 3 trimming rounds, each reads depth, metric, conf
_SCALE_FLOPS_PER_PIXEL = 12

# ------------------------------------------------------------------------------------------- Jetson Orin


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    """Published peaks of a device (dense: the sparse Tensor Core figures halved)."""

    name: str
    fp32_tflops: float    # CUDA cores
    fp16_tflops: float    # Tensor Cores, dense, FP16 in, FP16/FP32 accumulate
    int8_tops: float      # Tensor Cores, dense
    bandwidth_gbs: float  # DRAM
    memory_gb: float      # unified memory shared by CPU and GPU

    def peak_tflops(self, precision: str) -> float:
        return {"fp32": self.fp32_tflops, "fp16": self.fp16_tflops, "int8": self.int8_tops}[precision]

    @property
    def usable_gb(self) -> float:
        return self.memory_gb - JETSON_RESERVE_GB


# Sources: NVIDIA Jetson AGX Orin Series and Jetson Orin NX / Orin Nano Series module data sheets, and the
# "Jetson Orin" technical specifications table (developer.nvidia.com/embedded/jetson-modules); Orin Nano Super:
# NVIDIA's JetPack 6.2 "Super Mode" announcement (Dec 2024). The data sheets give the GPU's sparse INT8 TOPS
# (AGX Orin 64GB: 170 of its 275 TOPS, the rest are the DLAs; Orin NX 16GB: 60 of 100; Orin Nano 8GB: 40),
# CUDA/Tensor Core counts and the max GPU clock. Derived here: dense INT8 = sparse / 2; dense FP16 = dense
# INT8 / 2 (Ampere Tensor Cores: 2048 dense FP16 FLOP per clock per SM); FP32 = CUDA cores x 2 x clock.
JETSON = (
    # 16 SMs (2048 CUDA, 64 Tensor Cores) at 1.3 GHz; 256-bit LPDDR5 at 204.8 GB/s.
    DevicePeaks("Jetson AGX Orin 64GB", fp32_tflops=5.3, fp16_tflops=42.6, int8_tops=85.2, bandwidth_gbs=204.8,
                memory_gb=64.0),
    # 8 SMs (1024 CUDA, 32 Tensor Cores) at 918 MHz; 128-bit LPDDR5 at 102.4 GB/s.
    DevicePeaks("Jetson Orin NX 16GB", fp32_tflops=1.88, fp16_tflops=15.0, int8_tops=30.0, bandwidth_gbs=102.4,
                memory_gb=16.0),
    # 8 SMs at 625 MHz (JetPack 5 / 6.0-6.1 clocks); 128-bit LPDDR5 at 68 GB/s.
    DevicePeaks("Jetson Orin Nano 8GB", fp32_tflops=1.28, fp16_tflops=10.2, int8_tops=20.5, bandwidth_gbs=68.0,
                memory_gb=8.0),
    # The same module in JetPack 6.2's MAXN SUPER mode: GPU at 1020 MHz (67 sparse INT8 TOPS), memory at 102 GB/s.
    DevicePeaks("Jetson Orin Nano 8GB Super", fp32_tflops=2.09, fp16_tflops=16.7, int8_tops=33.4,
                bandwidth_gbs=102.0, memory_gb=8.0),
)
# Unified memory the OS (headless JetPack), the CUDA context and the runtime's own buffers take: an assumption.
JETSON_RESERVE_GB = 1.5

# ------------------------------------------------------------------------------------- measured peaks


def _matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Dense n x n x n matmul throughput in TFLOP/s (2 FLOPs per multiply-add)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if dtype == torch.int8:
        a = torch.randint(-64, 64, (n, n), generator=g, dtype=torch.int8).to(device)
        b = torch.randint(-64, 64, (n, n), generator=g, dtype=torch.int8).to(device)
        fn = lambda: torch._int_mm(a, b)  # noqa: E731 - int8 x int8 -> int32, the GEMM INT8 engines use
    else:
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        fn = lambda: a @ b  # noqa: E731
    for _ in range(3):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def measure_peaks(device: torch.device) -> dict[str, Any]:
    """Dense matmul TFLOP/s per precision and copy bandwidth (GB/s) of ``device``, measured now.

    CUDA: n=8192 matmuls in FP32 (TF32 off, as the reference runs), FP16, BF16 and INT8 (``torch._int_mm``).
    CPU: FP32 at n=1024 only; FP16/INT8 floors then use the FP32 peak, and the report says so.
    """
    from vidllm_edge.benchmarks.llm_decode import measure_bandwidth

    cuda = device.type == "cuda"
    n, reps = (8192, 10) if cuda else (1024, 5)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8} if cuda \
        else {"fp32": torch.float32}
    tflops, notes = {}, []
    for name, dtype in dtypes.items():
        try:
            tflops[name] = _matmul_tflops(device, dtype, n, reps)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. no int8 matmul kernel for this GPU
            notes.append(f"{name} matmul not measured ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    if not cuda:
        notes.append("CPU: only the FP32 matmul peak is measured; FP16/INT8 floors use it")
    bandwidth = measure_bandwidth(device, 1.0 if cuda else 0.25)
    if cuda:
        torch.cuda.empty_cache()
    return {"matmul_tflops": tflops, "bandwidth_gbs": bandwidth, "matmul_n": n, "notes": notes,
            "method": f"{n}^3 matmuls ({reps} reps after 3 warm-up) and a device-to-device copy (read + write bytes)"}


def peak_for(peaks: dict[str, Any], precision: str) -> tuple[float, str]:
    """(TFLOP/s, which measured peak) for a stage run at ``precision`` on the measured device."""
    measured = peaks["matmul_tflops"]
    for key in {"fp32": ("fp32",), "fp16": ("fp16", "bf16"), "int8": ("int8", "fp16")}[precision] + ("fp32",):
        if key in measured:
            return measured[key], key
    raise KeyError("no matmul peak was measured")


# ------------------------------------------------------------------------------------- counting: vision


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of live tensors created inside the mode (views and in-place results are not new memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in inputs and not t._is_view():
                nbytes = t.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, nbytes)
        return out


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@functools.lru_cache(maxsize=32)
def _trace_vision(cfg_json: str, image_hw: tuple[int, int], frames: int) -> dict[str, dict]:
    from torch.utils.flop_counter import FlopCounterMode

    from vidllm_edge.models.checkpoint import build_on_meta
    from vidllm_edge.models.config import VidLLMConfig, from_name
    from vidllm_edge.models.model import VidLLM
    from vidllm_edge.models.scale import metric_frame_ids
    from vidllm_edge.models.tokenizer import tiny_tokenizer
    from vidllm_edge.runtime.torch_backend import torch_units
    from vidllm_edge.units import FEATURE_NAMES

    cfg = VidLLMConfig.from_dict(json.loads(cfg_json))
    cfg.llm = from_name("tiny").llm  # the LLM is not traced here (the projector is counted by `vision_trace`)
    model = build_on_meta(lambda: VidLLM(cfg, tokenizer=tiny_tokenizer())).to("meta").eval().requires_grad_(False)
    units = torch_units(model, image_hw)
    h, w = image_hw
    p = (h // cfg.patch_size) * (w // cfg.patch_size)
    s_m = len(metric_frame_ids(frames, cfg.metric_depth.max_frames))
    modules = {"perception": (model.encoder, model.adapter), "geometry": (model.geometry,),
               "metric_depth": (model.metric_depth,), "lift_project": (model.pos_mlp,)}
    with torch.device("meta"):
        images = torch.empty(frames, 3, h, w)
        points = torch.empty(frames, p, 3)
    feeds = {"perception": lambda out: {"images": images},
             "geometry": lambda out: {"t_geom": out["perception"]["t_geom"]},
             "metric_depth": lambda out: {n: out["perception"][n][:s_m] for n in FEATURE_NAMES},
             "lift_project": lambda out: {"t_lang": out["perception"]["t_lang"], "points": points}}
    result, outputs, held = {}, {}, 0
    for name, feed_fn in feeds.items():
        feed = feed_fn(outputs)
        flops, live = FlopCounterMode(display=False), _LiveBytes()
        with torch.no_grad(), flops, live:
            out = units[name](feed)
        outputs[name] = out
        params = sum(q.numel() for m in modules[name] for q in m.parameters())
        result[name] = {"flops": float(flops.get_total_flops()), "params": int(params),
                        "in_bytes": _nbytes(feed.values()), "out_bytes": _nbytes(out.values()),
                        "peak_bytes": int(live.peak), "held_bytes": held}
        held += _nbytes(out.values())  # the pipeline keeps every unit's outputs until the scene is built
    result["_shape"] = {"frames": frames, "patches": p, "metric_frames": s_m, "embed_dim": cfg.embed_dim,
                        "image_hw": list(image_hw)}
    return result


def vision_trace(cfg, image_hw: tuple[int, int], frames: int, visual_tokens: int | None = None) -> dict[str, dict]:
    """Per vision unit: FLOPs, parameters, input/output bytes, activation peak and bytes held by the pipeline
    (FP32), counted on the meta device from ``cfg`` (a VidLLMConfig) at ``frames`` frames of ``image_hw``; the
    projector (two linears, C -> D -> D on ``visual_tokens`` rows, default the cap) by formula."""
    cfg_dict = cfg.to_dict()
    cfg_dict["name"] = "trace"
    cfg_dict.pop("llm")  # one trace per vision architecture, whatever the LLM
    trace = dict(_trace_vision(json.dumps(cfg_dict, sort_keys=True), tuple(image_hw), int(frames)))
    m, c, d = int(visual_tokens or cfg.scene.max_visual_tokens), cfg.embed_dim, int(cfg.llm.hf_config["hidden_size"])
    held = trace["lift_project"]["held_bytes"] + trace["lift_project"]["out_bytes"]
    trace["projector"] = {"flops": 2.0 * m * (c * d + d * d), "params": c * d + d + d * d + d,
                          "in_bytes": m * c * 4, "out_bytes": m * d * 4, "peak_bytes": 2 * m * d * 4, "held_bytes": held}
    trace["_shape"] = dict(trace["_shape"], visual_tokens=m)
    return trace


# ---------------------------------------------------------------------------------------- counting: LLM


def llm_shape(hf: dict[str, Any]) -> dict[str, int]:
    """Sizes of a LLaMA/Qwen2-family decoder from its Hugging Face config dict."""
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    kv = int(hf.get("num_key_value_heads") or heads)
    dh = int(hf.get("head_dim") or d // heads)
    layers, inter, vocab = int(hf["num_hidden_layers"]), int(hf["intermediate_size"]), int(hf["vocab_size"])
    block = d * heads * dh + 2 * d * kv * dh + heads * dh * d + 3 * d * inter  # q, k, v, o; gate, up, down
    return {"hidden": d, "heads": heads, "kv_heads": kv, "head_dim": dh, "layers": layers, "vocab": vocab,
            "block_params": layers * block, "head_params": vocab * d,
            "params": layers * block + vocab * d * (1 if hf.get("tie_word_embeddings") else 2)}


def _kv_bytes(hf: dict[str, Any], width: int) -> int:
    from vidllm_edge.benchmarks.llm_decode import _kv_bytes_per_position

    dtype = {4: torch.float32, 2: torch.bfloat16, 1: torch.int8}[width]
    return _kv_bytes_per_position(hf, dtype)


def llm_costs(hf: dict[str, Any], prefix_tokens: int, question_tokens: int, answer_tokens: int,
              width: int) -> dict[str, dict[str, float]]:
    """FLOPs and bytes of the scene-prefix prefill, the question's prefill + first token, and the
    ``answer_tokens - 1`` decode steps after it, with weights and K/V ``width`` bytes wide."""
    s = llm_shape(hf)
    kv = _kv_bytes(hf, width)
    weights = (s["block_params"] + s["head_params"]) * width  # blocks + LM head, read once per pass

    def attention(new: int, past: int) -> float:  # QK^T and AV for ``new`` causal tokens after ``past``
        return 4.0 * s["layers"] * s["heads"] * s["head_dim"] * (new * past + new * (new + 1) / 2)

    def prefill(new: int, past: int) -> dict[str, float]:
        flops = 2.0 * s["block_params"] * new + attention(new, past) + 2.0 * s["head_params"]
        return {"flops": flops, "bytes": weights + kv * (new + past) + new * s["hidden"] * width + s["vocab"] * 4}

    n = max(0, answer_tokens - 1)
    context = prefix_tokens + question_tokens
    decode_flops = n * (2.0 * (s["block_params"] + s["head_params"])) + attention(n, context)
    decode_bytes = n * (weights + s["hidden"] * width + s["vocab"] * 4) + kv * (n * context + n * (n + 1) / 2)
    return {"prefill": prefill(prefix_tokens, 0), "question_ttft": prefill(question_tokens, prefix_tokens),
            "decode": {"flops": decode_flops, "bytes": decode_bytes}}


# ------------------------------------------------------------------------------------------ stage costs


def stage_costs(cfg, image_hw: tuple[int, int], frames: int, visual_tokens: int, prefix_tokens: int,
                question_tokens: int, answer_tokens: int) -> dict[str, dict[str, Any]]:
    """FLOPs and bytes per stage (``timing.REPORT_STAGES``) and precision, counted from ``cfg``.

    Returns {stage: {"flops": F, "bytes": {precision: B}}}; the LLM's bytes follow the decoder a row runs
    (FP32 for fp32 rows, 16-bit for fp16 and int8 rows).
    """
    t = vision_trace(cfg, image_hw, frames, visual_tokens)
    shape = t["_shape"]
    h, w = image_hw
    scale_px = shape["metric_frames"] * h * w
    pool_in = frames * shape["patches"] * shape["embed_dim"]
    extra = {  # the runtime's own work between units: scale alignment, voxel pooling
        "metric_depth_scale": (_SCALE_FLOPS_PER_PIXEL * _SCALE_PASSES * scale_px, 3 * _SCALE_PASSES * scale_px * 4),
        "lift_pool": (2.0 * pool_in, (pool_in + visual_tokens * shape["embed_dim"]) * 4),
    }
    groups = {"encoder_adapter": ("perception",), "geometry": ("geometry",), "metric_depth_scale": ("metric_depth",),
              "lift_pool": ("lift_project", "projector")}
    out: dict[str, dict[str, Any]] = {}
    for stage, units in groups.items():
        flops = sum(t[u]["flops"] for u in units) + extra.get(stage, (0.0, 0.0))[0]
        io = sum(t[u]["in_bytes"] + t[u]["out_bytes"] for u in units) + extra.get(stage, (0.0, 0.0))[1]
        params = sum(t[u]["params"] for u in units)
        out[stage] = {"flops": flops, "params": params,
                      "bytes": {p: params * WEIGHT_BYTES[p] + io for p in PRECISIONS}}
    hf = cfg.llm.hf_config
    for precision in PRECISIONS:
        width = 4 if precision == "fp32" else 2
        for stage, cost in llm_costs(hf, prefix_tokens, question_tokens, answer_tokens, width).items():
            out.setdefault(stage, {"flops": cost["flops"], "params": llm_shape(hf)["params"], "bytes": {}})
            out[stage]["bytes"][precision] = cost["bytes"]
    return out


def floor_ms(cost: dict[str, Any], precision: str, tflops: float, bandwidth_gbs: float) -> dict[str, float]:
    """Compute floor, memory floor and the roofline floor (their max) in ms; which one binds."""
    compute = cost["flops"] / (tflops * 1e12) * 1e3
    memory = cost["bytes"][precision] / (bandwidth_gbs * 1e9) * 1e3
    return {"compute_ms": compute, "memory_ms": memory, "floor_ms": max(compute, memory),
            "bound": "compute" if compute >= memory else "memory"}


def roofline_rows(costs: dict[str, dict], precision: str, llm_precision: str, measured_ms: dict[str, float | None],
                  peaks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per stage: FLOPs, bytes, floors on the measured device, measured p50 and how far above the floor it is;
    and the labelled Jetson projections. ``precision``: the vision units'; ``llm_precision``: the decoder's
    ("fp32" or "fp16" for 16-bit)."""
    rows = {}
    for stage, cost in costs.items():
        stage_precision = precision if stage in VISION_STAGES else llm_precision
        peak, used = peak_for(peaks, stage_precision)
        here = floor_ms(cost, stage_precision, peak, peaks["bandwidth_gbs"])
        ms = measured_ms.get(stage)
        row = {"flops": cost["flops"], "bytes": cost["bytes"][stage_precision], "peak_used": used, **here,
               "measured_ms": ms, "x_floor": (ms / here["floor_ms"]) if ms and here["floor_ms"] > 0 else None,
               "projections": {}}
        for dev in JETSON:
            jf = floor_ms(cost, stage_precision, dev.peak_tflops(stage_precision), dev.bandwidth_gbs)
            row["projections"][dev.name] = {
                "floor_ms": jf["floor_ms"], "bound": jf["bound"],
                "projected_ms": ms * jf["floor_ms"] / here["floor_ms"] if ms and here["floor_ms"] > 0 else None}
        rows[stage] = row
    return rows


# ------------------------------------------------------------------------------------------ memory fit


def memory_need(cfg, image_hw: tuple[int, int], frames: int, precision: str, context_tokens: int) -> dict[str, float]:
    """Bytes a scene needs: weights (vision at ``precision``; the LLM 4/2/1 bytes for fp32/fp16/int8, i.e.
    INT8 weight-only as DESIGN.md §4 plans), the largest activation working set (a vision unit's own peak
    plus what the pipeline holds meanwhile, or the LLM prefill's) and the K/V cache of ``context_tokens``."""
    t = vision_trace(cfg, image_hw, frames)
    units = [u for u in t if not u.startswith("_")]
    act_scale = ACT_BYTES[precision] / 4
    vision_weights = sum(t[u]["params"] for u in units) * WEIGHT_BYTES[precision]
    vision_act = max(t[u]["peak_bytes"] + t[u]["held_bytes"] for u in units) * act_scale
    hf = cfg.llm.hf_config
    s = llm_shape(hf)
    llm_width = WEIGHT_BYTES[precision]
    act_width = ACT_BYTES[precision]
    llm_act = context_tokens * (4 * s["hidden"] + 3 * int(hf["intermediate_size"])) * act_width + s["vocab"] * 4
    kv = _kv_bytes(hf, act_width) * context_tokens
    weights = vision_weights + s["params"] * llm_width
    activations = max(vision_act, llm_act)
    return {"weights_gb": weights / 1e9, "activations_gb": activations / 1e9, "kv_gb": kv / 1e9,
            "total_gb": (weights + activations + kv) / 1e9}


def memory_fit(presets: Iterable[str], frames: Iterable[int], precisions: Iterable[str], image_hw_for: Callable,
               context_for: Callable) -> list[dict[str, Any]]:
    """One row per preset x precision x frame count: the need and, per Jetson, whether it fits."""
    from vidllm_edge.models.config import from_name

    rows = []
    for preset in presets:
        cfg = from_name(preset)
        hw = image_hw_for(cfg)
        for precision in precisions:
            for s in frames:
                need = memory_need(cfg, hw, s, precision, context_for(cfg))
                fits = {d.name: {"fits": need["total_gb"] <= d.usable_gb, "usable_gb": d.usable_gb} for d in JETSON}
                rows.append({"preset": preset, "precision": precision, "frames": s, "image_hw": list(hw), **need,
                             "jetson": fits})
    return rows
