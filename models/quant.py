"""Weight-only quantization of a `FastLLM`: INT8 per-output-channel and INT4 group-wise, RTN or AWQ.

Formats (activations stay in the model dtype; weights are dequantized on the fly):

* INT8: symmetric per output channel, ``w ≈ q * scale``, q in [-127, 127] (int8 [N, K]), scale float32 [N].
* INT4: ASYMMETRIC group-wise (group 128 along the input dimension) with a float zero point, the layout
  of the "tinygemm" kernel in PyTorch core: ``w ≈ (q - 8) * scale + zero``, q in [0, 15]. Two values per
  byte, ``byte[n, j] = q[n, 2j] << 4 | q[n, 2j + 1]`` (uint8 [N, K/2]); scale and zero bfloat16 [N, K/g].
  Asymmetric because LLM weight groups are not centred and 4 bits leave no level to waste.
* lm_head is INT8 in both recipes (AWQ practice keeps it out of INT4: it is the most sensitive layer);
  the embedding table stays in the model dtype (one row is read per token).

Methods: RTN (round to nearest), or AWQ-style activation-aware scaling: per linear, the mean |x| of its
input channels is collected on a few calibration prompts; a per-input-channel scale
``s = mean|x|^a / mean|w_normalised|^(1-a)`` is searched over a small grid of ``a`` (plus s = 1, so a
layer never gets worse than RTN on the calibration rows), minimising the output error
``|x W^T - (x / s) Q(W diag(s))^T|``. The 1/s is FOLDED into the preceding op as AWQ does (RMSNorm
weight for q/k/v and gate/up, the up rows for down, the v rows for o when there is no GQA), so the
runtime format is identical to RTN and costs nothing extra. AWQ's clipping search is not done.

Kernels: `Int8Linear` / `Int4Linear` forward in plain torch. For one token under torch.compile they are
written as an explicit dequant-multiply-reduce (a GEMV) that Inductor fuses into one kernel reading the
packed weights once; eagerly (prefill, CPU tests) they dequantize and call F.linear. On CUDA with
bfloat16, `Int4Linear` uses PyTorch's own tinygemm kernel (``aten._weight_int4pack_mm``), repacked from
the file's layout at load time.

Why not torchao: torchao 0.18 (the current wheel, built for torch >= 2.11 / CUDA 13) imports on torch
2.13 CPU here but its compiled extensions do not load; its INT8 weight-only path works (plain torch),
its default INT4 path needs the CUDA-only ``mslk`` package, and its tinygemm INT4 path needs CUDA. It
would serve neither INT4 on the CPU nor our file format, and the GPU kernel it would call is the aten
op we call directly; so the formats and the AWQ search are ours (a few hundred lines) and torch is the
only dependency.

Files: safetensors named by recipe (``llm.int4-g128-awq.safetensors``) with metadata: format, bits,
group, method, the FastConfig, the source model's config sha256 and weights fingerprint, calibration
prompt and token counts. Loading a file for another model raises CheckpointError naming both.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vidllm_edge import atomic
from vidllm_edge.errors import CheckpointError, ConfigError, InputError
from vidllm_edge.models import checkpoint as ckpt
from vidllm_edge.models import gemv as G
from vidllm_edge.models.fast_llm import FastConfig, FastLLM, even_indices, source_identity

QUANT_FORMAT = "vidllm-edge-fastllm-quant"
FORMAT_VERSION = 1
METHODS = ("rtn", "awq")
BITS = (8, 4)
DEFAULT_GROUP = 128
LM_HEAD_BITS = 8
AWQ_GRID = tuple(i / 10 for i in range(11))
_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w_gate_up", "feed_forward.w_down")
_REQUANT_NOTE = "Quantize this model: vidllm-edge quantize-llm --checkpoint DIR --bits 4 --method awq --out DIR."


# -- formats --------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scale float32 [N]), symmetric per output channel."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (packed uint8 [N, K/2], scale bf16 [N, K/g], zero bf16 [N, K/g]).

    Scale and zero are rounded to bfloat16 first and q is computed from the rounded values, so the
    file, the torch path and the tinygemm kernel all dequantize to the same numbers.
    """
    n, k = w.shape
    if k % group or group % 2:
        raise ConfigError(f"INT4 group size: {group}", f"does not divide in_features {k}.",
                          "Use a group size that divides every linear's input width (128 for LLaMA/Qwen2).")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo).clamp(min=1e-6) / 15.0).to(torch.bfloat16)
    zero = (lo + 8.0 * scale.float()).to(torch.bfloat16)
    low = zero.float() - 8.0 * scale.float()
    q = torch.round((g - low[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return pack_int4(q), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15 -> uint8 [N, K/2], even k in the high nibble (tinygemm's input layout)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] in 0..15."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    n = packed.shape[0]
    q = unpack_int4(packed).float().reshape(n, -1, group)  # [N, K] -> [N, K/g, g]
    return ((q - 8.0) * scale.float()[..., None] + zero.float()[..., None]).reshape(n, -1)


def _int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """One row x [K] times the packed weight -> [N] float32, written as dequant * x then a reduction.

    Under torch.compile this is a single fused kernel that reads each packed byte once.
    """
    n, half = packed.shape
    xs = x.reshape(2 * half // group, group // 2, 2).float()  # [K] -> [G, g/2, (even, odd)]
    p = packed.reshape(n, 2 * half // group, group // 2)  # [N, K/2] -> [N, G, g/2]
    s, z = scale.float()[..., None], zero.float()[..., None]  # [N, G, 1]
    even = ((p >> 4).float() - 8.0) * s + z
    odd = ((p & 15).float() - 8.0) * s + z
    return (even * xs[..., 0] + odd * xs[..., 1]).sum(dim=(-1, -2))


def _tinygemm_ok(n: int, k: int, group: int) -> bool:
    return k % (8 * 16) == 0 and n % 8 == 0 and group in (32, 64, 128, 256)


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W int8 per output channel, dequantized on the fly."""

    bits = 8
    triton_gemv = False  # FastLLM.set_gemv: one token through the Triton INT8 GEMV

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32,
                 device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Int8Linear":
        n, k = weight.shape
        m = cls(k, n, bias is not None, dtype=dtype, device="meta")
        m.weight, m.scales = quantize_int8(weight)
        if bias is not None:
            m.bias = bias.detach().to(dtype)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton_gemv and x.numel() == self.in_features:
            return G.gemv(x, self.weight, mode="int8", scale=self.scales, bias=self.bias).reshape(
                *x.shape[:-1], self.out_features)
        if x.numel() == self.in_features and torch.compiler.is_compiling():  # one token: fused dequant-GEMV
            y = (self.weight.float() * x.reshape(1, -1).float()).sum(dim=-1) * self.scales
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:  # the per-channel scale applied in float32 (a bf16 scale would add up to 0.4 % per channel)
            y = (F.linear(x, self.weight.to(x.dtype)).float() * self.scales).to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def gemv_silu(self, h: torch.Tensor) -> torch.Tensor:
        return G.gemv(h, self.weight, mode="int8", scale=self.scales, bias=self.bias, silu_mul=True)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W INT4 group-wise asymmetric (see the module docstring), dequantized on the fly.

    ``kernel``: "torch" (portable; the fused GEMV under torch.compile), "tinygemm" (CUDA, bfloat16:
    aten._weight_int4pack_mm) or "cpu-int4pack" (aten._weight_int4pack_mm_for_cpu). The packed kernels
    drop the portable copy of the weight, so save a model before `set_kernel`.
    """

    bits = 4
    triton_gemv = False  # FastLLM.set_gemv: one token through the Triton INT4 GEMV (portable layout only)

    def __init__(self, in_features: int, out_features: int, bias: bool, group: int = DEFAULT_GROUP,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        if in_features % group:
            raise ConfigError(f"INT4 group size: {group}", f"does not divide in_features {in_features}.",
                              "Use a group size that divides every linear's input width.")
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.kernel = "torch"
        groups = in_features // group
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.bfloat16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, group: int) -> "Int4Linear":
        n, k = weight.shape
        m = cls(k, n, bias is not None, group=group, dtype=dtype, device="meta")
        m.weight, m.scales, m.zeros = quantize_int4(weight, group)
        if bias is not None:
            m.bias = bias.detach().to(dtype)
        return m

    def set_kernel(self, kind: str, act_dtype: torch.dtype) -> str:
        """Choose the matmul kernel ("auto", "torch", "tinygemm", "cpu-int4pack"); returns the one in use."""
        if self.kernel != "torch":
            if kind in (self.kernel, "auto"):
                return self.kernel
            raise InputError(f"INT4 kernel: {kind}", f"cannot replace {self.kernel!r}, which dropped the portable weights.",
                             "Load the quantized file again to choose another kernel.")
        cuda = self.weight.is_cuda
        tinygemm_ok = cuda and act_dtype == torch.bfloat16 and _tinygemm_ok(self.out_features, self.in_features, self.group)
        if kind == "auto":
            kind = "tinygemm" if tinygemm_ok else "torch"
        if kind == "tinygemm":
            if not tinygemm_ok:
                raise InputError("INT4 kernel: tinygemm", f"needs CUDA, bfloat16 activations, K % 128 == 0 and N % 8 == 0 "
                                 f"(got {self.weight.device.type}, {act_dtype}, K={self.in_features}, N={self.out_features}).",
                                 "Use kernel='auto' or 'torch'.")
            packed = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), 8)
            self._packed_scales(torch.bfloat16)
            self.register_buffer("packed", packed, persistent=False)
        elif kind == "cpu-int4pack":
            if self.weight.is_cuda or self.out_features % 16:
                raise InputError("INT4 kernel: cpu-int4pack", f"needs CPU tensors and N % 16 == 0 (got "
                                 f"{self.weight.device.type}, N={self.out_features}).", "Use kernel='auto' or 'torch'.")
            q = unpack_int4(self.weight).to(torch.int32).contiguous()  # the CPU op takes unpacked values
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
            self._packed_scales(act_dtype)
            self.register_buffer("packed", packed, persistent=False)
        elif kind != "torch":
            raise InputError(f"INT4 kernel: {kind}", "is unknown.", "Use auto, torch, tinygemm or cpu-int4pack.")
        if kind != "torch":  # the packed copy replaces the portable one (memory is the point of INT4)
            self.weight = self.scales = self.zeros = None
        self.kernel = kind
        return kind

    def _packed_scales(self, dtype: torch.dtype) -> None:
        sz = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).contiguous()  # [N, G, 2] -> [G, N, 2]
        self.register_buffer("scales_and_zeros", sz.to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.triton_gemv and self.kernel == "torch" and x.numel() == self.in_features:
            return G.gemv(x, self.weight, mode="int4", scale=self.scales, zero=self.zeros, bias=self.bias,
                          group=self.group).reshape(*lead, self.out_features)
        if self.kernel == "tinygemm":
            y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, self.in_features).contiguous(), self.packed, self.group,
                                                   self.scales_and_zeros)
        elif self.kernel == "cpu-int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).contiguous(), self.packed,
                                                           self.group, self.scales_and_zeros)
        elif x.numel() == self.in_features and torch.compiler.is_compiling():  # one token: fused dequant-GEMV
            y = _int4_gemv(x, self.weight, self.scales, self.zeros, self.group).to(x.dtype)
        else:
            y = F.linear(x, dequantize_int4(self.weight, self.scales, self.zeros, self.group).to(x.dtype))
        y = y.reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    def gemv_silu(self, h: torch.Tensor) -> torch.Tensor:
        return G.gemv(h, self.weight, mode="int4", scale=self.scales, zero=self.zeros, bias=self.bias,
                      group=self.group, silu_mul=True)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 g{self.group} asym, kernel={self.kernel}"


# -- recipes ------------------------------------------------------------------------------------
def recipe_name(bits: int, method: str, group: int = DEFAULT_GROUP) -> str:
    """``int8-rtn``, ``int4-g128-awq``, ... (the part of the file name that says what invalidates it)."""
    return f"int8-{method}" if bits == 8 else f"int4-g{group}-{method}"


def quantized_file_name(bits: int, method: str, group: int = DEFAULT_GROUP) -> str:
    return f"llm.{recipe_name(bits, method, group)}.safetensors"


def _check_recipe(bits: int, method: str) -> None:
    if bits not in BITS:
        raise InputError(f"Quantization bits: {bits}", "is not supported.", "Use 8 or 4.")
    if method not in METHODS:
        raise InputError(f"Quantization method: {method}", "is not supported.", f"Use one of: {', '.join(METHODS)}.")


def _quantize_weight(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Quantize then dequantize (float32), for the AWQ search."""
    if bits == 8:
        return dequantize_int8(*quantize_int8(w))
    return dequantize_int4(*quantize_int4(w, group), group)


def _weight_profile(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Mean over rows of |w| normalised by its quantization block's max, per input channel [K] (AWQ's w_mean)."""
    n, k = w.shape
    block = w.abs().reshape(n, -1, group if bits == 4 else k)
    return (block / block.amax(dim=-1, keepdim=True).clamp(min=1e-6)).reshape(n, k).mean(dim=0)


def awq_search(w: torch.Tensor, x: torch.Tensor, bits: int, group: int,
               grid: Iterable[float] = AWQ_GRID) -> tuple[torch.Tensor | None, float | None, float, float]:
    """Search the per-input-channel scale for ``w`` [N, K] given calibration inputs ``x`` [n, K].

    Returns (scale [K] or None when no scale beats RTN, alpha, error with that scale, RTN error), errors
    as mean squared output error relative to the output's mean square.
    """
    w, x = w.float(), x.float()
    ref = x @ w.t()
    power = ref.pow(2).mean().clamp(min=1e-20)
    rtn = float(((x @ _quantize_weight(w, bits, group).t()) - ref).pow(2).mean() / power)
    x_mean = x.abs().mean(dim=0).clamp(min=1e-8)
    w_mean = _weight_profile(w, bits, group).clamp(min=1e-8)
    best: tuple[torch.Tensor | None, float | None, float] = (None, None, rtn)
    for alpha in grid:
        s = (x_mean.pow(alpha) / w_mean.pow(1.0 - alpha)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = _quantize_weight(w * s[None, :], bits, group) / s[None, :]
        err = float(((x @ wq.t()) - ref).pow(2).mean() / power)
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2], rtn


@torch.no_grad()
def collect_linear_inputs(fast: FastLLM, calibration: list[torch.Tensor], max_rows: int = 512) -> dict[str, torch.Tensor]:
    """Inputs [n, K] (float32, n <= max_rows evenly spaced rows) of every block linear over the calibration embeds.

    The KV cache serves as scratch (any decoder state in it is lost).
    """
    rows: dict[str, list[torch.Tensor]] = {}
    per_prompt = max(1, -(-max_rows // max(1, len(calibration))))  # keep memory bounded while collecting

    def keep(key: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] > per_prompt:
            x = x[even_indices(x.shape[0], per_prompt, x.device)]
        rows.setdefault(key, []).append(x.float())

    hooks = []
    for i, block in enumerate(fast.layers):
        for name in _LINEARS:
            key = f"layers.{i}.{name}"
            hooks.append(block.get_submodule(name).register_forward_pre_hook(lambda _m, args, key=key: keep(key, args[0])))
    try:
        for embeds in calibration:
            fast.prefill(embeds[:, :fast.max_seq], 0)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for key, chunks in rows.items():
        x = torch.cat(chunks)
        if x.shape[0] > max_rows:
            x = x[even_indices(x.shape[0], max_rows, x.device)]
        out[key] = x
    return out


def _as_embeds(fast: FastLLM, item) -> torch.Tensor:
    if isinstance(item, torch.Tensor) and item.dim() == 3:
        return item.to(device=fast.device, dtype=fast.dtype)
    return fast.embed(item)


@torch.no_grad()
def quantize_fast_llm(fast: FastLLM, bits: int, method: str = "rtn", group: int = DEFAULT_GROUP,
                      calibration: list | None = None, max_rows: int = 512,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quantize ``fast`` IN PLACE (linears swapped for Int8Linear / Int4Linear; AWQ folds scales into norms).

    Args:
        bits: 8 (per-channel) or 4 (group-wise ``group``). method: "rtn" or "awq".
        calibration: for AWQ, a list of token-id lists/tensors or embeddings [1, T, D] (a few prompts).
        max_rows: calibration rows kept per linear for the search.
        log: progress callback (one line per layer).
    Returns a report: recipe, seconds, per-linear alpha and relative output errors (AWQ vs RTN).
    Tensors shared with the source model are never written to (norms are replaced, not edited).
    """
    _check_recipe(bits, method)
    if method == "awq" and not calibration:
        raise InputError("AWQ calibration", "has no prompts.", "Pass a few calibration prompts (token ids or embeddings).")
    start = time.perf_counter()
    calib = [_as_embeds(fast, c) for c in calibration or []]
    inputs = collect_linear_inputs(fast, calib, max_rows) if method == "awq" else {}
    cfg, dtype = fast.cfg, fast.dtype
    layers_report = []
    for i, block in enumerate(fast.layers):
        weights = {n: block.get_submodule(n).weight.detach().float() for n in _LINEARS}
        biases = {n: (b.detach().float() if (b := block.get_submodule(n).bias) is not None else None) for n in _LINEARS}
        scales: dict[str, torch.Tensor] = {}
        for name in _LINEARS if method == "awq" else ():
            if name == "attention.wo" and cfg.n_heads != cfg.n_kv_heads:
                continue  # with GQA one v row feeds several o columns: no per-column fold (AutoAWQ skips it too)
            s, alpha, err, rtn = awq_search(weights[name], inputs[f"layers.{i}.{name}"], bits, group)
            layers_report.append({"linear": f"layers.{i}.{name}", "alpha": alpha, "err_awq": err, "err_rtn": rtn})
            if s is not None:
                scales[name] = s
        _fold_scales(block, cfg, weights, biases, scales, dtype)
        for name in _LINEARS:
            parent, attr = name.split(".")
            q = (Int8Linear.from_float(weights[name], biases[name], dtype) if bits == 8
                 else Int4Linear.from_float(weights[name], biases[name], dtype, group))
            setattr(block.get_submodule(parent), attr, q)
        if log:
            done = [r for r in layers_report if r["linear"].startswith(f"layers.{i}.")]
            detail = ", ".join(f"{r['linear'].split('.')[-1]} a={r['alpha']} err {r['err_rtn']:.2e}->{r['err_awq']:.2e}"
                               for r in done)
            log(f"layer {i + 1}/{cfg.n_layers} quantized" + (f" ({detail})" if detail else ""))
    head = fast.lm_head
    fast.lm_head = Int8Linear.from_float(head.weight.detach(), head.bias, dtype)
    tokens = sum(int(e.shape[1]) for e in calib)
    fast.quant = {"bits": bits, "group_size": group if bits == 4 else 0, "method": method, "lm_head_bits": LM_HEAD_BITS,
                  "calibration_prompts": len(calib), "calibration_tokens": tokens}
    return {"recipe": recipe_name(bits, method, group), **fast.quant, "seconds": time.perf_counter() - start,
            "linears": layers_report}


def _fold_scales(block, cfg: FastConfig, weights: dict, biases: dict, scales: dict, dtype: torch.dtype) -> None:
    """W <- W diag(s) for each scaled linear, and 1/s into the op that produces its input."""
    if "attention.wqkv" in scales:
        s = scales["attention.wqkv"]
        weights["attention.wqkv"] = weights["attention.wqkv"] * s[None, :]
        block.attention_norm.weight = nn.Parameter((block.attention_norm.weight.float() / s).to(dtype), requires_grad=False)
    if "feed_forward.w_gate_up" in scales:
        s = scales["feed_forward.w_gate_up"]
        weights["feed_forward.w_gate_up"] = weights["feed_forward.w_gate_up"] * s[None, :]
        block.ffn_norm.weight = nn.Parameter((block.ffn_norm.weight.float() / s).to(dtype), requires_grad=False)
    if "feed_forward.w_down" in scales:  # down's input is silu(gate) * up: scale the up rows
        s, hidden = scales["feed_forward.w_down"], cfg.intermediate_size
        weights["feed_forward.w_down"] = weights["feed_forward.w_down"] * s[None, :]
        _divide_rows(weights, biases, "feed_forward.w_gate_up", hidden, s)
    if "attention.wo" in scales:  # no GQA: o's input channel c is v's output row c (attention mixes positions only)
        s = scales["attention.wo"]
        v0 = (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim
        weights["attention.wo"] = weights["attention.wo"] * s[None, :]
        _divide_rows(weights, biases, "attention.wqkv", v0, s)


def _divide_rows(weights: dict, biases: dict, name: str, start: int, s: torch.Tensor) -> None:
    """Divide the output rows ``start:`` of linear ``name`` (weight and bias, copied) by ``s``: the producer
    side of an AWQ scale folded through an op that maps those rows one-to-one onto the next linear's inputs."""
    w = weights[name].clone()
    w[start:] /= s[:, None]
    weights[name] = w
    if biases[name] is not None:
        b = biases[name].clone()
        b[start:] /= s
        biases[name] = b


def set_int4_kernel(fast: FastLLM, kind: str = "auto") -> dict[str, int]:
    """Pick the INT4 matmul kernel of every Int4Linear; returns {kernel: count}."""
    counts: dict[str, int] = {}
    for m in fast.modules():
        if isinstance(m, Int4Linear):
            used = m.set_kernel(kind, fast.dtype)
            counts[used] = counts.get(used, 0) + 1
    return counts


# -- files ----------------------------------------------------------------------------------------
def save_quantized(fast: FastLLM, folder: str | Path) -> Path:
    """Write ``fast`` (quantized, portable layout) to ``folder/llm.<recipe>.safetensors`` atomically."""
    from safetensors.torch import save_file

    quant = getattr(fast, "quant", None)
    if not quant:
        raise InputError("LLM", "is not quantized.", "Call quantize_fast_llm first.")
    packed = [n for n, m in fast.named_modules() if isinstance(m, Int4Linear) and m.kernel != "torch"]  # tinygemm/cpu
    if packed:
        raise InputError("Quantized LLM", f"has {len(packed)} INT4 linears in a device-specific packed layout.",
                         "Save before set_int4_kernel (the file holds the portable layout).")
    if not fast.source.get("weights_fingerprint"):
        raise InputError("Quantized LLM", "does not record its source model.", "Build it with FastLLM.from_hf.")
    modules = {n: f"int{m.bits}" for n, m in fast.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    state = {k: v.detach().contiguous().cpu() for k, v in fast.state_dict().items()}
    ptrs = {}
    for k, v in state.items():
        assert v.data_ptr() not in ptrs or v.numel() == 0, f"{k} shares memory with {ptrs[v.data_ptr()]}"
        ptrs[v.data_ptr()] = k
    meta = {"format": QUANT_FORMAT, "version": str(FORMAT_VERSION), "bits": str(quant["bits"]),
            "group_size": str(quant["group_size"]), "method": quant["method"], "lm_head_bits": str(quant["lm_head_bits"]),
            "calibration_prompts": str(quant["calibration_prompts"]),
            "calibration_tokens": str(quant["calibration_tokens"]), "dtype": str(fast.dtype).removeprefix("torch."),
            "config": fast.cfg.to_json(), "source_config_sha256": fast.source["config_sha256"],
            "source_weights_fingerprint": fast.source["weights_fingerprint"], "modules": json.dumps(modules),
            "torch": torch.__version__}
    folder = atomic.ensure_dir(folder, "Quantized LLM folder")
    target = folder / quantized_file_name(quant["bits"], quant["method"], quant["group_size"] or DEFAULT_GROUP)
    with atomic.atomic_path(target, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata=meta)
    return target


def read_quant_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a quantized file (CheckpointError when it is not one)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Quantized LLM: {path}", "does not exist.", _REQUANT_NOTE)
    ckpt._check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"Quantized LLM: {path}", f"cannot be read ({exc}).", _REQUANT_NOTE) from exc
    if meta.get("format") != QUANT_FORMAT:
        raise CheckpointError(f"Quantized LLM: {path}", f"is not a {QUANT_FORMAT} file (format {meta.get('format')!r}).",
                              _REQUANT_NOTE)
    if int(meta.get("version", "0")) > FORMAT_VERSION:
        raise CheckpointError(f"Quantized LLM: {path}", f"has format version {meta['version']}; this build reads "
                              f"<= {FORMAT_VERSION}.", "Upgrade vidllm-edge or quantize again.")
    return meta


def check_source(meta: Mapping[str, str], source: nn.Module | Mapping[str, str], path: str | Path) -> None:
    """Raise CheckpointError naming both fingerprints when the file was not made from ``source``."""
    ident = source_identity(source) if isinstance(source, nn.Module) else dict(source)
    file_fp, file_cfg = meta.get("source_weights_fingerprint", ""), meta.get("source_config_sha256", "")
    if ident["weights_fingerprint"] != file_fp or ident["config_sha256"] != file_cfg:
        raise CheckpointError(
            f"Quantized LLM: {path}",
            f"was made for another model: the file's source weights fingerprint is {file_fp[:16]} (config sha256 "
            f"{file_cfg[:12]}); this model's is {ident['weights_fingerprint'][:16]} (config sha256 "
            f"{ident['config_sha256'][:12]}).", _REQUANT_NOTE)


def load_quantized(path: str | Path, source: nn.Module | Mapping[str, str] | None = None, *,
                   device: torch.device | str = "cpu", dtype: torch.dtype | None = None, max_seq: int | None = None,
                   kernel: str = "auto") -> FastLLM:
    """Load a quantized FastLLM (meta build, strict keys and shapes, no random init).

    Args:
        source: the `transformers` model (or its `source_identity`) the file must have been made from;
            a mismatch raises CheckpointError naming both fingerprints. None skips the check.
        device, dtype: where and in which activation dtype to run (default: the dtype it was made in).
        max_seq: static KV-cache length. kernel: INT4 kernel choice (see `Int4Linear`).
    """
    path = Path(path)
    meta = read_quant_metadata(path)
    if source is not None:
        check_source(meta, source, path)
    cfg = FastConfig.from_json(meta["config"])
    dtype = dtype or getattr(torch, meta["dtype"])
    group = int(meta["group_size"]) or DEFAULT_GROUP
    modules = json.loads(meta["modules"])

    def skeleton() -> FastLLM:
        model = FastLLM(cfg).to(dtype)
        model.inv_freq = torch.zeros(cfg.head_dim // 2)  # stays float32 (rotary precision)
        for name, kind in modules.items():
            old = model.get_submodule(name)
            new = (Int8Linear(old.in_features, old.out_features, old.bias is not None, dtype=dtype) if kind == "int8"
                   else Int4Linear(old.in_features, old.out_features, old.bias is not None, group=group, dtype=dtype))
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
        return model

    model = ckpt.build_on_meta(skeleton)
    state = ckpt.read_state_dict(path)
    ckpt.load_into(model, state, f"Quantized LLM: {path}", _REQUANT_NOTE)
    ckpt.assert_materialized(model, f"Quantized LLM: {path}")
    model = model.to(device)
    model.source = {"config_sha256": meta["source_config_sha256"], "weights_fingerprint": meta["source_weights_fingerprint"]}
    model.quant = {"bits": int(meta["bits"]), "group_size": int(meta["group_size"]), "method": meta["method"],
                   "lm_head_bits": int(meta["lm_head_bits"]), "calibration_prompts": int(meta["calibration_prompts"]),
                   "calibration_tokens": int(meta["calibration_tokens"])}
    model.requires_grad_(False)
    model.setup_cache(max_seq or min(cfg.max_position_embeddings, 4096))
    set_int4_kernel(model, kernel)
    return model.eval()
