"""Our own decoder layout for the `transformers` LLaMA and Qwen2 families (gpt-fast style).

`FastLLM.from_hf(hf_model)` converts the weights once into a compact module: fused q/k/v (with Qwen2's
q/k/v biases), fused gate/up, RMSNorm, rotary tables from the source model's rope parameters and
head_dim, GQA, tied or untied lm_head, and a STATIC pre-allocated KV cache
``[layers, 1, kv_heads, max_seq, head_dim]``.

Two entry points:

* `FastLLM.prefill` (eager, Python-int positions): a chunk of embeddings [1, T, D] written at
  ``start_pos``; attention goes through SDPA (flash / memory-efficient kernels on CUDA).
* `FastLLM.decode_step` (one token): fixed shapes, the position is a device tensor, attention runs over
  the whole static cache with a mask built from that tensor. No Python value is ever read from a
  tensor, so ``torch.compile(mode="reduce-overhead")`` captures the step in one CUDA graph and a
  decode loop never waits for the host (see `vidllm_edge.runtime.fast_decoder`).

Linears are plain ``nn.Linear`` children so `vidllm_edge.models.quant` can swap them for INT8/INT4
modules in place, as gpt-fast does. Conversion records where the weights came from (`source`): the
sha256 of the architecture config and a fingerprint of the weights, used to refuse a quantized file
made for another model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vidllm_edge.errors import ConfigError, DependencyError, InputError
from vidllm_edge.models import checkpoint as ckpt
from vidllm_edge.models import gemv as G

SUPPORTED = ("llama", "qwen2")
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # inv_freq does not depend on the sequence length


@dataclasses.dataclass(frozen=True)
class FastConfig:
    """Architecture of a LLaMA/Qwen2 decoder (everything the weights' shapes and the math depend on)."""

    model_type: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    rope_type: str
    rope_attention_scaling: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    lm_head_bias: bool

    @property
    def qkv_dim(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FastConfig":
        return cls(**json.loads(text))

    def sha256(self) -> str:
        """Identity of the architecture (the config half of a quantized file's source check)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_hf(cls, hf_config, hf_model: nn.Module | None = None) -> "FastConfig":
        """Read a `transformers` config (biases and tying from ``hf_model`` when given: what the weights really are).

        Raises ConfigError for an architecture or feature the fast decoder does not implement.
        """
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED:
            raise ConfigError(f"LLM architecture: model_type={model_type!r}", "is not supported by the fast decoder.",
                              f"Supported model_type values: {', '.join(SUPPORTED)}. Use the reference decoder "
                              "(ReferenceDecoder) for other architectures.")
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"LLM config: hidden_act={act!r}", "is not supported by the fast decoder.",
                              "The LLaMA/Qwen2 families use silu; other activations need the reference decoder.")
        layer_types = getattr(hf_config, "layer_types", None) or []
        if getattr(hf_config, "use_sliding_window", False) or "sliding_attention" in layer_types:
            raise ConfigError(f"LLM config: {model_type} with sliding-window attention",
                              "is not supported by the fast decoder.",
                              "Set use_sliding_window=False (Qwen2 checkpoints ship with it off) or use the reference "
                              "decoder.")
        rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        if rope_type not in _STATIC_ROPE_TYPES:
            raise ConfigError(f"LLM config: rope_type={rope_type!r}", "changes the rotary frequencies with the sequence "
                              "length; the fast decoder's rotary tables are static.",
                              f"Supported rope types: {', '.join(_STATIC_ROPE_TYPES)}.")
        heads = int(hf_config.num_attention_heads)
        kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
        if heads % kv_heads:
            raise ConfigError("LLM config", f"has {heads} attention heads and {kv_heads} key/value heads.",
                              "num_attention_heads must be a multiple of num_key_value_heads.")
        head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads)
        _, scaling = rope_frequencies(hf_config, rope_type, theta, head_dim)
        qkv_bias = bool(getattr(hf_config, "attention_bias", model_type == "qwen2"))
        o_bias = bool(getattr(hf_config, "attention_bias", False)) and model_type == "llama"
        mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
        tie = bool(getattr(hf_config, "tie_word_embeddings", False))
        lm_head_bias = False
        if hf_model is not None:  # the modules are the truth (a bias may have been added after construction)
            layer = hf_model.model.layers[0]
            qkv_bias = layer.self_attn.q_proj.bias is not None
            o_bias = layer.self_attn.o_proj.bias is not None
            mlp_bias = layer.mlp.gate_proj.bias is not None
            lm_head_bias = getattr(hf_model.lm_head, "bias", None) is not None
            tie = hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
        return cls(model_type=model_type, vocab_size=int(hf_config.vocab_size), dim=int(hf_config.hidden_size),
                   n_layers=int(hf_config.num_hidden_layers), n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
                   intermediate_size=int(hf_config.intermediate_size), norm_eps=float(hf_config.rms_norm_eps),
                   rope_theta=theta, rope_type=rope_type, rope_attention_scaling=float(scaling),
                   max_position_embeddings=int(hf_config.max_position_embeddings), tie_word_embeddings=tie,
                   qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, lm_head_bias=lm_head_bias)


def rope_frequencies(hf_config, rope_type: str, theta: float, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] (float32) and the cos/sin scaling, computed as `transformers` does."""
    if rope_type == "default":
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, device="cpu")
    return inv_freq.float(), float(scaling)


class RMSNorm(nn.Module):
    """RMSNorm exactly as LLaMA/Qwen2 compute it (statistics in float32, the weight multiplies in the input dtype)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Linear(nn.Linear):
    """`nn.Linear` whose one-token product may run on the Triton GEMV kernel (`FastLLM.set_gemv`)."""

    triton_gemv = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton_gemv and x.numel() == self.in_features:
            return G.gemv(x, self.weight, bias=self.bias).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def gemv_silu(self, h: torch.Tensor) -> torch.Tensor:
        """W (silu(gate) * up) + b for one token h = [gate | up] (the MLP's down projection, activation fused)."""
        return G.gemv(h, self.weight, bias=self.bias, silu_mul=True)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the `transformers` (rotate-half) convention; x [1, H, T, Dh], cos/sin [T, Dh]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: FastConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = Linear(cfg.dim, cfg.qkv_dim, bias=cfg.qkv_bias)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        t = x.shape[1]
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(1, t, self.n_heads, self.head_dim).transpose(1, 2)  # [1, T, H*Dh] -> [1, H, T, Dh]
        k = k.view(1, t, self.n_kv, self.head_dim).transpose(1, 2)  # -> [1, Hkv, T, Dh]
        v = v.view(1, t, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def prefill(self, x, cos, sin, start: int) -> torch.Tensor:
        """x [1, T, D] at positions start..start+T-1; K/V written into this layer's cache in place."""
        t = x.shape[1]
        end = start + t
        q, k, v = self._qkv(x, cos, sin)
        self.k_cache[:, :, start:end] = k
        self.v_cache[:, :, start:end] = v
        k_cache, v_cache = self.k_cache, self.v_cache
        group = self.n_heads // self.n_kv
        # Prefill is compute-bound: repeating K/V to all heads is cheap and lets SDPA pick flash/efficient kernels.
        keys = k_cache[:, :, :end].repeat_interleave(group, dim=1)  # [1, Hkv, end, Dh] -> [1, H, end, Dh]
        values = v_cache[:, :, :end].repeat_interleave(group, dim=1)
        if start == 0:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:
            rows = torch.arange(start, end, device=x.device)[:, None]
            mask = torch.arange(end, device=x.device)[None, :] <= rows  # [T, end]: key j visible from row t
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(1, t, -1))  # [1, H, T, Dh] -> [1, T, H*Dh]

    def decode(self, x, cos, sin, pos: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """One token x [1, 1, D] at position ``pos`` [1] (a tensor); ``visible`` [S] masks the static cache.

        The cache is this layer's own buffer, written with index_copy_ (a tensor index: no host sync, CUDA-graph
        safe). It must not be a slice of one stacked [layers, ...] buffer: under torch.compile a write into a
        view of a buffer is functionalised into a copy of the WHOLE buffer per layer (measured on the H100:
        2.5 of 3.6 ms per step for a 1.5B model went to such copies).
        """
        q, k, v = self._qkv(x, cos, sin)
        k_cache, v_cache = self.k_cache, self.v_cache
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        group = self.n_heads // self.n_kv
        # GQA without copying the cache: the G query heads of one KV head become G "rows" over that head's keys.
        q = q.reshape(1, self.n_kv, group, self.head_dim)  # [1, H, 1, Dh] -> [1, Hkv, G, Dh]
        scores = torch.matmul(q, k_cache.transpose(-1, -2)) * self.head_dim ** -0.5  # [1, Hkv, G, S]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v_cache)  # [1, Hkv, G, Dh]
        return self.wo(out.reshape(1, 1, self.n_heads * self.head_dim))

    def chunk(self, x, cos, sin, pos: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """T tokens x [1, T, D] at positions ``pos`` [T] (a tensor); ``visible`` [T, S] masks the static cache.

        The fixed-shape sibling of `decode` for a short chunk (a question): the same GQA trick with the G query
        heads of a KV head times T tokens as rows, K/V written with index_copy_.
        """
        t = x.shape[1]
        q, k, v = self._qkv(x, cos, sin)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        group = self.n_heads // self.n_kv
        q = q.reshape(1, self.n_kv, group * t, self.head_dim)  # [1, H, T, Dh] -> [1, Hkv, G*T, Dh] (row g*T + t)
        scores = torch.matmul(q, self.k_cache.transpose(-1, -2)) * self.head_dim ** -0.5  # [1, Hkv, G*T, S]
        scores = scores.masked_fill(~visible.repeat(group, 1), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, self.v_cache).reshape(1, self.n_heads, t, self.head_dim)
        return self.wo(out.transpose(1, 2).reshape(1, t, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: FastConfig) -> None:
        super().__init__()
        self.hidden = cfg.intermediate_size
        self.w_gate_up = Linear(cfg.dim, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w_down = Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_gate_up(x)
        if getattr(self.w_down, "triton_gemv", False) and h.numel() == 2 * self.hidden:  # one token, fused silu
            return self.w_down.gemv_silu(h).reshape(*x.shape[:-1], -1)
        gate, up = h.split(self.hidden, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: FastConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def prefill(self, x, cos, sin, start: int) -> torch.Tensor:
        h = x + self.attention.prefill(self.attention_norm(x), cos, sin, start)
        return h + self.feed_forward(self.ffn_norm(h))

    def chunk(self, x, cos, sin, pos, visible) -> torch.Tensor:
        h = x + self.attention.chunk(self.attention_norm(x), cos, sin, pos, visible)
        return h + self.feed_forward(self.ffn_norm(h))

    def decode(self, x, cos, sin, pos, visible) -> torch.Tensor:
        h = x + self.attention.decode(self.attention_norm(x), cos, sin, pos, visible)
        return h + self.feed_forward(self.ffn_norm(h))


class FastLLM(nn.Module):
    """A LLaMA/Qwen2 decoder with a static KV cache. Build with `from_hf` (or `quant.load_quantized`).

    Attributes:
        cfg: the architecture. source: {"config_sha256", "weights_fingerprint"} of the model it came from.
        max_seq: positions the static cache holds (set by `setup_cache`).
    """

    def __init__(self, cfg: FastConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.register_buffer("inv_freq", torch.zeros(cfg.head_dim // 2))  # persistent: rope types beyond default
        self.source: dict[str, str] = {}
        self.quant: dict[str, Any] = {}  # the recipe, once vidllm_edge.models.quant has quantized it
        self.max_seq = 0

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                max_seq: int | None = None) -> "FastLLM":
        """Convert a `transformers` LlamaForCausalLM / Qwen2ForCausalLM (weights are read once, never copied when
        dtype and device already match, except the fused q/k/v and gate/up).

        Args:
            hf_model: the source model (any device/dtype). dtype/device: of the result (default: the source's).
            max_seq: static KV-cache length (default: min(max_position_embeddings, 4096)).
        Raises ConfigError for an unsupported architecture.
        """
        cfg = FastConfig.from_hf(hf_model.config, hf_model)
        ref = hf_model.model.embed_tokens.weight
        dtype = dtype or ref.dtype
        device = torch.device(device) if device is not None else ref.device
        state = _hf_to_fast_state(hf_model, cfg)
        state = {k: v.detach().to(device=device, dtype=dtype) for k, v in state.items()}
        inv_freq, _ = rope_frequencies(hf_model.config, cfg.rope_type, cfg.rope_theta, cfg.head_dim)
        hf_inv = getattr(getattr(hf_model.model, "rotary_emb", None), "inv_freq", None)
        if isinstance(hf_inv, torch.Tensor) and not hf_inv.is_meta:
            assert torch.allclose(hf_inv.float().cpu(), inv_freq, rtol=1e-6), "rotary frequencies differ from the source's"
        state["inv_freq"] = inv_freq.to(device)
        model = ckpt.build_on_meta(lambda: cls(cfg))
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight")
        ckpt.check_state_dict({k: v for k, v in ckpt.expected_shapes(model).items()
                               if not (cfg.tie_word_embeddings and k == "lm_head.weight")}, state,
                              f"LLM conversion: {cfg.model_type}", "The source model's weights do not fit its config.")
        model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.tok_embeddings.weight
        model.source = {"config_sha256": cfg.sha256(), "weights_fingerprint": weights_fingerprint(hf_model.state_dict())}
        model.requires_grad_(False)
        model.setup_cache(max_seq or min(cfg.max_position_embeddings, 4096))
        return model.eval()

    def setup_cache(self, max_seq: int) -> None:
        """(Re)allocate the static KV cache, one [1, kv_heads, max_seq, head_dim] K and V buffer per layer (in the
        model dtype: bf16, fp16 or fp32), and the rotary tables. Compiled decode steps capture these buffers:
        build the decode loop after this call.

        The cache starts zeroed so masked-out slots hold finite numbers (0 * garbage could be NaN).
        """
        cfg = self.cfg
        if max_seq > cfg.max_position_embeddings:
            raise InputError(f"KV cache: max_seq={max_seq}", f"exceeds the model's {cfg.max_position_embeddings} positions.",
                             f"Use max_seq <= {cfg.max_position_embeddings}.")
        device, dtype = self.tok_embeddings.weight.device, self.tok_embeddings.weight.dtype
        shape = (1, cfg.n_kv_heads, max_seq, cfg.head_dim)
        for layer in self.layers:
            layer.attention.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            layer.attention.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        positions = torch.arange(max_seq, device=device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq.float()[None, :]  # [S, Dh/2], the same product transformers forms
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos() * cfg.rope_attention_scaling, persistent=False)  # [S, Dh] float32
        self.register_buffer("rope_sin", emb.sin() * cfg.rope_attention_scaling, persistent=False)
        self.register_buffer("key_positions", torch.arange(max_seq, device=device), persistent=False)
        self.max_seq = max_seq

    def set_gemv(self, kind: str = "auto") -> dict[str, int]:
        """Choose the one-token matmul of every linear: "triton" (`models.gemv`: one kernel per product that
        reads the weight once, INT8/INT4 dequantized in it, the MLP activation fused into the down
        projection), "torch" (F.linear / the quantized modules' own paths, fused by Inductor), or "auto"
        (triton on CUDA with bf16/fp16 when Triton is installed, else torch). Prefill is unaffected.

        INT4 linears already packed for tinygemm keep that kernel. Returns {"triton": n, "torch": m}.
        Raises DependencyError when "triton" is asked for where it cannot run.
        """
        if kind not in ("auto", "triton", "torch"):
            raise InputError(f"GEMV kernel: {kind}", "is unknown.", "Use auto, triton or torch.")
        usable = G.available() and self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16)
        if kind == "triton" and not usable:
            raise DependencyError("GEMV kernel: triton", f"needs CUDA, Triton and bf16/fp16 weights (device "
                                  f"{self.device.type}, dtype {self.dtype}, triton usable: {G.available()}).",
                                  "Use kind='auto' or 'torch', or install triton with a CUDA build of torch.")
        on = kind == "triton" or (kind == "auto" and usable)
        counts = {"triton": 0, "torch": 0}
        for m in self.modules():
            if hasattr(type(m), "triton_gemv"):
                m.triton_gemv = on and getattr(m, "kernel", "torch") == "torch"
                counts["triton" if m.triton_gemv else "torch"] += 1
        return counts

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    # -- inference ----------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Token ids [T] (or a list) -> embeddings [1, T, D] in the model dtype."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        return self.tok_embeddings(ids)[None]

    def prefill(self, embeds: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run embeds [1, T, D] at positions start_pos.. and write their K/V into the static cache.

        Returns (logits [V], hidden [D]) of the last position (hidden is after the final norm).
        """
        if embeds.dim() != 3 or embeds.shape[0] != 1 or embeds.shape[2] != self.cfg.dim:
            raise InputError("Input tensor: inputs_embeds", f"Received shape {list(embeds.shape)}.",
                             f"Expected [1, T, {self.cfg.dim}].")
        t = embeds.shape[1]
        if start_pos < 0 or start_pos + t > self.max_seq:
            raise InputError("Input tensor: inputs_embeds", f"Received {t} tokens at position {start_pos}; the static KV "
                             f"cache holds {self.max_seq} positions.",
                             "Shorten the prompt, or build the decoder with a larger max_seq.")
        x = embeds.to(self.dtype)
        cos, sin = self.rope_cos[start_pos:start_pos + t], self.rope_sin[start_pos:start_pos + t]
        for layer in self.layers:
            x = layer.prefill(x, cos, sin, start_pos)
        hidden = self.norm(x[:, -1:])  # only the last position needs logits
        return self.lm_head(hidden)[0, 0], hidden[0, 0]

    def decode_step(self, token: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token id [1] (long, on the device) at position ``pos`` [1] (long tensor) -> (logits [V], hidden [D]).

        Fixed shapes and no host reads: the step torch.compile captures into a CUDA graph. The caller keeps
        ``pos < max_seq`` (it cannot be checked here without a sync).
        """
        x = self.tok_embeddings(token)[None]  # [1] -> [1, 1, D]
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [1, Dh]
        visible = self.key_positions <= pos  # [S]: the cache up to and including this token
        for layer in self.layers:
            x = layer.decode(x, cos, sin, pos, visible)
        hidden = self.norm(x)
        return self.lm_head(hidden)[0, 0], hidden[0, 0]

    def chunk_step(self, embeds: torch.Tensor, pos: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed-size chunk embeds [1, T, D] at positions ``pos`` [T] (long tensor) -> (logits [V], hidden [D])
        of the row ``last`` [1] (long tensor).

        Like `decode_step`, no Python value is read from a tensor, so one compiled graph serves every question
        of up to T tokens: the caller pads the chunk at the end (padding rows come after the real ones, so
        causality keeps them out of the real rows; their K/V land past the question, where the mask hides
        them and the answer's tokens overwrite them). The caller keeps ``pos < max_seq``.
        """
        x = embeds.to(self.dtype)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [T, Dh]
        visible = self.key_positions[None, :] <= pos[:, None]  # [T, S]
        for layer in self.layers:
            x = layer.chunk(x, cos, sin, pos, visible)
        hidden = self.norm(x.index_select(1, last))  # [1, 1, D]
        return self.lm_head(hidden)[0, 0], hidden[0, 0]

    # -- accounting -------------------------------------------------------------------------------
    def weight_bytes_per_token(self) -> int:
        """Bytes of parameters and quantization tables one decode step reads: everything except the cache and
        rotary tables, and of the embedding table one row (all of it when lm_head is tied to it)."""
        skip = {"rope_cos", "rope_sin", "key_positions", "inv_freq"}
        table = self.tok_embeddings.weight
        tied = getattr(self.lm_head, "weight", None) is table
        total = (table.numel() if tied else table.shape[1]) * table.element_size()
        seen = {table.data_ptr()}
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            if name.rsplit(".", 1)[-1] in skip or name.endswith(("k_cache", "v_cache")) or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    def kv_bytes_per_position(self) -> int:
        """Bytes of K and V one position occupies over all layers (read once per decode step per position)."""
        c = self.cfg
        return 2 * c.n_layers * c.n_kv_heads * c.head_dim * self.dtype.itemsize


def _hf_to_fast_state(hf_model: nn.Module, cfg: FastConfig) -> dict[str, torch.Tensor]:
    """The name mapping HF -> ours; q/k/v and gate/up are concatenated along the output dimension."""
    state: dict[str, torch.Tensor] = {"tok_embeddings.weight": hf_model.model.embed_tokens.weight,
                                      "norm.weight": hf_model.model.norm.weight,
                                      "lm_head.weight": hf_model.lm_head.weight}
    if cfg.lm_head_bias:
        state["lm_head.bias"] = hf_model.lm_head.bias
    for i, layer in enumerate(hf_model.model.layers):
        att, mlp, p = layer.self_attn, layer.mlp, f"layers.{i}."
        state[p + "attention_norm.weight"] = layer.input_layernorm.weight
        state[p + "ffn_norm.weight"] = layer.post_attention_layernorm.weight
        state[p + "attention.wqkv.weight"] = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
        state[p + "attention.wo.weight"] = att.o_proj.weight
        state[p + "feed_forward.w_gate_up.weight"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        state[p + "feed_forward.w_down.weight"] = mlp.down_proj.weight
        if cfg.qkv_bias:
            state[p + "attention.wqkv.bias"] = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias])
        if cfg.o_bias:
            state[p + "attention.wo.bias"] = att.o_proj.bias
        if cfg.mlp_bias:
            state[p + "feed_forward.w_gate_up.bias"] = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
            state[p + "feed_forward.w_down.bias"] = mlp.down_proj.bias
    return state


def even_indices(n: int, k: int, device=None) -> torch.Tensor:
    """min(k, n) evenly spaced indices into range(n), first and last included (exact int64 arithmetic)."""
    k = min(k, n)
    if k <= 1:
        return torch.zeros(k, dtype=torch.long, device=device)
    return torch.arange(k, device=device) * (n - 1) // (k - 1)


def weights_fingerprint(state: Mapping[str, torch.Tensor], samples: int = 256) -> str:
    """sha256 over names, shapes and ``samples`` evenly spaced values (rounded to bf16) of every tensor.

    Cheap on a 7B model on any device, independent of the storage dtype (fp32/bf16 copies of one model
    agree), and different for any two independently initialised or trained models.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        flat = t.reshape(-1)
        n = flat.numel()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        if n == 0 or not t.is_floating_point():
            continue
        idx = even_indices(n, samples, flat.device)
        h.update(flat[idx].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()


def source_identity(hf_model: nn.Module) -> dict[str, Any]:
    """{"config_sha256", "weights_fingerprint"} of a `transformers` model (what a quantized file must match)."""
    cfg = FastConfig.from_hf(hf_model.config, hf_model)
    return {"config_sha256": cfg.sha256(), "weights_fingerprint": weights_fingerprint(hf_model.state_dict())}


@torch.inference_mode()
def teacher_forced_logits(fast: FastLLM, ids: torch.Tensor | list[int], prompt_len: int) -> torch.Tensor:
    """Logits [len(ids) - prompt_len + 1, V] (float32) predicting ids[prompt_len:] and one more token: the
    prompt is prefilled, then every later id is fed through `decode_step` whatever the model would have
    picked (teacher forcing), so two models compare position by position on one fixed sequence."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=fast.device).reshape(-1)
    logits, _ = fast.prefill(fast.embed(ids[:prompt_len]), 0)
    out = [logits.float()]
    for t in range(prompt_len, ids.numel()):
        logits, _ = fast.decode_step(ids[t:t + 1], torch.tensor([t], device=fast.device))
        out.append(logits.float())
    return torch.stack(out)
