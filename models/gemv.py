"""Batch-1 matrix-vector kernels (Triton) for the decode step: bf16/fp16, INT8 per-channel, INT4 group-wise.

A decode step at batch 1 is a chain of GEMVs: each weight byte is read once and used for one multiply-add,
so its speed is the memory bandwidth the kernel reaches. Measured on the H100 (benchmarks/decode_profile):
Inductor's own reductions for these shapes and cuBLAS's GEMMs for the small ones stay well below it, and
an INT8/INT4 weight must be dequantized *inside* the kernel that reads it (a separate dequantization
writes and re-reads a bf16 copy). One kernel covers the three weight formats of `vidllm_edge.models.quant`:

* ``mode="dense"``: w [N, K] in the activation dtype.
* ``mode="int8"``: w int8 [N, K], y = (w x) * scale[N] (scale float32).
* ``mode="int4"``: w uint8 [N, K/2] (even k in the high nibble), scale/zero bf16 [N, K/g];
  y[n] = sum_g scale[n, g] * sum_k (q - 8) x_k + zero[n, g] * sum_k x_k (the group's affine map taken out of
  the inner sum).

``silu_mul=True`` reads x as [gate | up] (2K values) and uses silu(gate) * up as the vector: the LLaMA/Qwen2
MLP's activation fused into the down projection's load. Accumulation is float32; the output is rounded to
the activation dtype once, plus an optional bias.

The kernel is registered as the custom op ``vidllm_edge::gemv`` (torch.library; no ``from __future__ import
annotations`` in this module, because the op's schema is read from its annotations), so a compiled decode step
calls it as one opaque node and a CUDA graph captures its launch. It needs CUDA and Triton; `available()`
says whether they are here, and the modules fall back to plain torch otherwise (the CPU path every test runs).
Block sizes are autotuned per (N, K, mode) on first use, which must therefore happen before a CUDA graph
is captured (every decode loop warms up first).
"""

import functools
from typing import Optional

import torch

MODES = ("dense", "int8", "int4")


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when CUDA and Triton are usable (the kernel's only requirements)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    dense_configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                     for n, k, w, s in ((4, 512, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3),
                                        (16, 512, 8, 3), (32, 128, 4, 4), (32, 256, 8, 3), (2, 1024, 4, 3))]

    @triton.autotune(configs=dense_configs, key=["N", "K", "MODE", "SILU"])
    @triton.jit
    def gemv_dense_int8(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, MODE: tl.constexpr, SILU: tl.constexpr,
                        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            if SILU:
                g = tl.load(x_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
                u = tl.load(x_ptr + K + rk, mask=k_ok, other=0.0).to(tl.float32)
                x = g * tl.sigmoid(g) * u
            else:
                x = tl.load(x_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if MODE == 1:
            acc *= tl.load(s_ptr + rn, mask=n_ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)

    int4_configs = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                    for n, w, s in ((4, 2, 4), (8, 4, 4), (16, 4, 4), (32, 4, 4), (32, 8, 3), (64, 8, 3))]

    @triton.autotune(configs=int4_configs, key=["N", "K", "GROUP", "SILU"])
    @triton.jit
    def gemv_int4(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, GROUP: tl.constexpr, HALF: tl.constexpr,
                  SILU: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        half = HALF
        rj = tl.arange(0, HALF)
        groups = K // GROUP
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for gi in range(0, groups):
            k_even = gi * GROUP + 2 * rj
            if SILU:
                ge = tl.load(x_ptr + k_even).to(tl.float32)
                go = tl.load(x_ptr + k_even + 1).to(tl.float32)
                xe = ge * tl.sigmoid(ge) * tl.load(x_ptr + K + k_even).to(tl.float32)
                xo = go * tl.sigmoid(go) * tl.load(x_ptr + K + k_even + 1).to(tl.float32)
            else:
                xe = tl.load(x_ptr + k_even).to(tl.float32)
                xo = tl.load(x_ptr + k_even + 1).to(tl.float32)
            b = tl.load(w_ptr + rn[:, None] * (K // 2) + gi * half + rj[None, :], mask=n_ok[:, None], other=0,
                        eviction_policy="evict_first")
            hi = (b >> 4).to(tl.float32) - 8.0
            lo = (b & 15).to(tl.float32) - 8.0
            part = tl.sum(hi * xe[None, :] + lo * xo[None, :], axis=1)
            s = tl.load(s_ptr + rn * groups + gi, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + rn * groups + gi, mask=n_ok, other=0.0).to(tl.float32)
            acc += part * s + z * tl.sum(xe + xo, axis=0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)

    return triton, gemv_dense_int8, gemv_int4


def _launch(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None,
            bias: torch.Tensor | None, mode: str, group: int, silu_mul: bool) -> torch.Tensor:
    triton, dense, int4 = _kernels()
    n = w.shape[0]
    k = x.numel() // 2 if silu_mul else x.numel()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    dummy = y  # an unused pointer argument still needs a tensor
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    if mode == "int4":
        int4[grid](x, w, scale, zero, bias if bias is not None else dummy, y, n, k, GROUP=group, HALF=group // 2,
                   SILU=silu_mul,
                   HAS_BIAS=bias is not None)
    else:
        dense[grid](x, w, scale if scale is not None else dummy, bias if bias is not None else dummy, y, n, k,
                    MODE=1 if mode == "int8" else 0, SILU=silu_mul, HAS_BIAS=bias is not None)
    return y


@torch.library.custom_op("vidllm_edge::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], mode: str, group: int, silu_mul: bool, n: int) -> torch.Tensor:
    """The op a compiled step calls (registered at import: defining it needs only torch; running it, Triton)."""
    return _launch(x.contiguous(), w, scale, zero, bias, mode, group, silu_mul)


@_gemv_op.register_fake
def _(x, w, scale, zero, bias, mode, group, silu_mul, n):
    return x.new_empty(n)


def gemv(x: torch.Tensor, w: torch.Tensor, *, mode: str = "dense", scale: torch.Tensor | None = None,
         zero: torch.Tensor | None = None, bias: torch.Tensor | None = None, group: int = 128,
         silu_mul: bool = False) -> torch.Tensor:
    """y [N] = W x for one activation vector x [K] (or [2K] = [gate | up] with ``silu_mul``), on CUDA.

    w / scale / zero as described in the module docstring for ``mode``; bias [N] or None. x and the
    output share the activation dtype.
    """
    assert mode in MODES, mode
    n = w.shape[0]
    return _gemv_op(x.reshape(-1), w, scale, zero, bias, mode, group, silu_mul, n)


def reference(x: torch.Tensor, w: torch.Tensor, *, mode: str = "dense", scale=None, zero=None, bias=None,
              group: int = 128, silu_mul: bool = False) -> torch.Tensor:
    """The same product in plain torch, float32 accumulation (what tests compare the kernel with)."""
    from vidllm_edge.models import quant

    x = x.reshape(-1).float()
    if silu_mul:
        gate, up = x.chunk(2)
        x = torch.nn.functional.silu(gate) * up
    if mode == "dense":
        wf = w.float()
    elif mode == "int8":
        wf = quant.dequantize_int8(w, scale)
    else:
        wf = quant.dequantize_int4(w, scale, zero, group)
    y = wf @ x
    return y + bias.float() if bias is not None else y
