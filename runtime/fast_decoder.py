"""The fast decoder: `FastLLM` behind the shared `Decoder` contract, with a device-side decode loop.

Scene prefix: prefilled once per scene into the static KV cache. A question's chunk is prefilled after
it; the answer is decoded one compiled step per token. Afterwards the crop back to the prefix only resets
the position pointer: nothing is copied, the stale K/V behind it are masked out and overwritten.

The decode loop (`DecodeLoop`) never waits for the host between steps: the next token is sampled on the
device (greedy argmax, or temperature + top-p with a seeded device generator) and fed to the next step
as a device tensor; positions come from a device arange. The host reads token ids only to stream text:
each id is copied to pinned memory asynchronously and a CUDA event marks its arrival; while the host
waits for token i, the steps for tokens i+1 .. i+``stream_lag`` are already queued behind it. So the GPU
never idles on the host (its Python work per token hides behind the queued steps), text still appears
as soon as each token lands, and after an end-of-sequence at most ``stream_lag`` speculative steps are
wasted (their K/V lie past the answer and are forgotten by the pointer crop). Syncing every k tokens
instead would delay text by k tokens for no gain in throughput. The answer is token-for-token what a
synchronous loop produces. On the CPU the loop runs synchronously (nothing to overlap).

With ``compile=True`` the step (decode + sampling) goes through ``torch.compile(mode="reduce-overhead",
fullgraph=True)``: on CUDA one CUDA graph per step. The matmuls are the Triton GEMVs of `models.gemv`
(`FastLLM.set_gemv`, chosen by default on CUDA: one kernel per product, INT8/INT4 dequantized inside it),
or Inductor's own fused reductions with coordinate-descent tuning when the GEMV kernel is "torch". On the
CPU it compiles without graphs.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch
from torch import nn

from vidllm_edge.models.config import LLMConfig
from vidllm_edge.models.fast_llm import FastLLM
from vidllm_edge.models.llm import Answer, Decoder, GenerationConfig

DEFAULT_STREAM_LAG = 4
CHUNK = 64  # questions up to this many tokens are prefilled by one compiled, fixed-shape step


def configure_inductor(coordinate_descent: bool = True) -> None:
    """gpt-fast's Inductor settings for decode (process-wide; called before the first CUDA compile).

    ``coordinate_descent``: tune Inductor's one-row matmul reductions (needed when Inductor generates the
    GEMVs, i.e. the "torch" GEMV kernel choice). With the Triton GEMVs (`models.gemv`) the matmuls are opaque
    custom ops, the remaining reductions are tiny, and skipping the tuning cuts compile time severalfold.
    """
    import torch._inductor.config as inductor

    inductor.coordinate_descent_tuning = coordinate_descent
    inductor.triton.unique_kernel_names = True
    inductor.fx_graph_cache = True


def sample_logits(logits: torch.Tensor, noise: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  use_top_p: bool) -> torch.Tensor:
    """Sample one id [1] from logits [V] without a host sync (temperature and top-p as 0-d tensors).

    ``noise`` [V] is uniform in [0, 1): argmax(p / Exp(1)) draws from p (the exponential race), so the
    draw is a pure tensor function of seeded noise. Top-p keeps the most likely tokens whose cumulative
    mass before them is below top_p (always at least one), as `sample_next` does. Reproducible for a
    seed, but not the same draws as the reference's `torch.multinomial`.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if use_top_p:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    race = probs / (-torch.log1p(-noise)).clamp(min=1e-20)
    return race.argmax(-1, keepdim=True)


class DecodeLoop:
    """Decode ``n`` tokens after a prefill, on the device; yields token ids to the host as they land.

    Args:
        fast: the model (its static cache already holds the prompt). compile: torch.compile the step.
        stream_lag: decode steps the device may run ahead of the host (>= 1; see the module docstring).
        backend: torch.compile backend ("inductor"; tests use "aot_eager" to check the step traces as one
            graph without paying for code generation).
    """

    def __init__(self, fast: FastLLM, compile: bool = False, stream_lag: int = DEFAULT_STREAM_LAG,
                 backend: str = "inductor") -> None:
        assert stream_lag >= 1, f"stream_lag must be >= 1, got {stream_lag}"
        self.fast, self.compile, self.stream_lag, self.backend = fast, compile, stream_lag, backend
        self._steps: dict[tuple[bool, bool], object] = {}
        self.hidden: torch.Tensor | None = None  # [n, D]: final-norm hidden state of each decoded token
        self.launched = 0
        self._launch_until = lambda _k: None

    def step_fn(self, greedy: bool, use_top_p: bool):
        """The (compiled) step: (token [1], pos [1], noise, temperature, top_p) -> (next token [1], hidden [D])."""
        key = (greedy, use_top_p)
        if key not in self._steps:
            fast = self.fast

            def step(token, pos, noise, temperature, top_p):
                logits, hidden = fast.decode_step(token, pos)
                if greedy:
                    return logits.argmax(-1, keepdim=True), hidden
                return sample_logits(logits, noise, temperature, top_p, use_top_p), hidden

            if self.compile:
                cuda = fast.device.type == "cuda"
                if cuda and self.backend == "inductor":
                    configure_inductor(not any(getattr(m, "triton_gemv", False) for m in fast.modules()))
                mode = "reduce-overhead" if cuda and self.backend == "inductor" else None
                step = torch.compile(step, backend=self.backend, mode=mode, fullgraph=True, dynamic=False)
            self._steps[key] = step
        return self._steps[key]

    @torch.inference_mode()
    def run(self, first_logits: torch.Tensor, start_pos: int, n: int, gen: GenerationConfig) -> Iterator[int]:
        """Yield up to ``n`` token ids: the first sampled from ``first_logits`` [V], each next one decoded at
        position start_pos + i. Stop iterating (close the generator) to stop; steps already queued finish.
        `hidden_state(i)` is the final-norm hidden state of token i (its decode step runs if it has not yet).
        """
        fast, device = self.fast, self.fast.device
        cuda = device.type == "cuda"
        assert start_pos + n <= fast.max_seq, f"{start_pos} + {n} tokens exceed the static cache ({fast.max_seq})"
        greedy, use_top_p = gen.temperature <= 0, gen.top_p < 1.0
        step = self.step_fn(greedy, use_top_p)
        noise = temperature = top_p = generator = None
        if not greedy:
            generator = torch.Generator(device=device).manual_seed(gen.seed)
            noise = torch.empty(fast.cfg.vocab_size, device=device)
            temperature = torch.tensor(float(gen.temperature), device=device)
            top_p = torch.tensor(float(gen.top_p), device=device)
        tokens = torch.empty(n + 1, dtype=torch.long, device=device)
        self.hidden = torch.empty(n, fast.cfg.dim, dtype=fast.dtype, device=device)
        positions = torch.arange(start_pos, start_pos + n, device=device)
        host = torch.empty(n + 1, dtype=torch.long, pin_memory=True) if cuda else tokens
        events: list[torch.cuda.Event | None] = [None] * (n + 1)

        def publish(i: int) -> None:  # start the copy of token i to the host; never waits
            if cuda:
                host[i].copy_(tokens[i], non_blocking=True)
                events[i] = torch.cuda.Event()
                events[i].record()

        def launch(i: int) -> None:  # decode token i (at position start_pos + i); its successor lands in tokens[i + 1]
            if noise is not None:
                noise.uniform_(generator=generator)
            if self.compile and cuda:
                torch.compiler.cudagraph_mark_step_begin()
            nxt, hid = step(tokens[i:i + 1], positions[i:i + 1], noise, temperature, top_p)
            tokens[i + 1:i + 2].copy_(nxt)  # copied out before the next replay reuses the graph's output memory
            self.hidden[i].copy_(hid)
            publish(i + 1)

        def launch_until(k: int) -> None:
            with torch.inference_mode():
                while self.launched < min(n, k):
                    launch(self.launched)
                    self.launched += 1

        if greedy:
            tokens[0:1].copy_(first_logits.argmax(-1, keepdim=True))
        else:
            noise.uniform_(generator=generator)
            tokens[0:1].copy_(sample_logits(first_logits, noise, temperature, top_p, use_top_p))
        publish(0)
        self.launched, self._launch_until = 0, launch_until
        lag = self.stream_lag if cuda else 0  # on the CPU every step is synchronous: running ahead only adds latency
        for i in range(n):
            launch_until(i + lag)
            if cuda:
                events[i].synchronize()  # the only host wait: token i, while later steps run
            yield int(host[i])

    def hidden_state(self, i: int) -> torch.Tensor:
        """Final-norm hidden state [D] of token i of the last `run` (for the grounding box of <loc>)."""
        self._launch_until(i + 1)
        return self.hidden[i]


class FastDecoder(Decoder):
    """`Decoder` over a `FastLLM` (fp, INT8 or INT4), on CUDA or the CPU.

    Args:
        fast: the model (`FastLLM.from_hf` or `quant.load_quantized`). tokenizer, cfg: as for every Decoder.
        box_head: grounding head, hidden [1, D] -> [1, 6] (the torch `BoxHead`).
        compile: compile the decode step (CUDA graphs on CUDA). stream_lag: see `DecodeLoop`.

    ``prefill_log`` records (start position, tokens) of every prefill: the scene prefix appears once per
    scene, then one entry per question.
    """

    def __init__(self, fast: FastLLM, tokenizer, box_head: nn.Module, cfg: LLMConfig, *, compile: bool = False,
                 stream_lag: int = DEFAULT_STREAM_LAG, chunk: int = CHUNK) -> None:
        super().__init__(tokenizer, cfg)
        self.fast, self.box_head = fast, box_head
        self.loop = DecodeLoop(fast, compile=compile, stream_lag=stream_lag)
        self.prefill_log: list[tuple[int, int]] = []
        self._len = 0
        self.chunk = chunk
        self._chunk_step = None  # compiled on the first short prefill (CUDA + compile only)

    def _short_prefill(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A question-sized prefill through the compiled fixed-shape chunk step (one CUDA graph), or None when
        it does not apply (CPU, no compile, too long, or too close to the end of the cache)."""
        fast, t = self.fast, embeds.shape[1]
        if not (self.loop.compile and fast.device.type == "cuda" and t <= self.chunk
                and self._len + self.chunk <= fast.max_seq):
            return None
        if self._chunk_step is None:
            self._chunk_step = torch.compile(fast.chunk_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        padded = torch.zeros(1, self.chunk, fast.cfg.dim, dtype=fast.dtype, device=fast.device)
        padded[:, :t] = embeds
        pos = torch.arange(self._len, self._len + self.chunk, device=fast.device)
        last = torch.tensor([t - 1], device=fast.device)
        torch.compiler.cudagraph_mark_step_begin()
        logits, hidden = self._chunk_step(padded, pos, last)
        return logits.clone(), hidden.clone()  # out of the graph's memory before the next replay

    @classmethod
    def from_hf(cls, llm: nn.Module, tokenizer, box_head: nn.Module, cfg: LLMConfig, *, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None, max_seq: int | None = None, quantized=None,
                kernel: str = "auto", gemv: str = "auto", compile: bool = False) -> "FastDecoder":
        """Convert ``llm`` (a `transformers` LLaMA/Qwen2), or load ``quantized`` (a file made from it; checked).

        dtype/device default to the source model's (a quantized file: the dtype it was made in).
        kernel: the INT4 matmul kernel (`quant.Int4Linear`); gemv: the one-token matmul (`FastLLM.set_gemv`).
        """
        if quantized is not None:
            from vidllm_edge.models.quant import load_quantized

            device = device or next(llm.parameters()).device
            fast = load_quantized(quantized, source=llm, device=device, dtype=dtype, max_seq=max_seq, kernel=kernel)
        else:
            fast = FastLLM.from_hf(llm, dtype=dtype, device=device, max_seq=max_seq)
        fast.set_gemv(gemv)
        return cls(fast, tokenizer, box_head, cfg, compile=compile)

    # -- Decoder hooks ------------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return min(self.fast.max_seq, self.fast.cfg.max_position_embeddings)

    def _embed(self, ids: list[int]) -> torch.Tensor:  # -> [1, T, D] in the model dtype, on its device
        return self.fast.embed(ids)

    def _reset(self) -> None:
        self._len = 0

    def _seq_len(self) -> int:
        return self._len

    def _forward(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        short = self._short_prefill(embeds)
        logits, hidden = short if short is not None else self.fast.prefill(embeds, self._len)
        self.prefill_log.append((self._len, int(embeds.shape[1])))
        self._len += embeds.shape[1]
        return logits.float(), hidden.float()

    def _crop(self, length: int) -> None:
        self._len = min(self._len, length)  # the pointer is the crop: positions past it are masked and overwritten

    def _box(self, hidden: torch.Tensor) -> list[float]:
        p = next(self.box_head.parameters())
        return [float(v) for v in self.box_head(hidden[None].to(device=p.device, dtype=p.dtype))[0]]

    # -- the device-side loop ---------------------------------------------------------------------
    @torch.inference_mode()
    def stream(self, question: str, gen: GenerationConfig) -> Iterator[tuple[str, Answer | None]]:
        """As `Decoder.stream` (same tokens, text pieces, boxes and timing keys), decoded by `DecodeLoop`."""
        ids, budget = self._question_ids(question)
        n = min(gen.max_new_tokens, budget)
        t0 = time.perf_counter()
        try:
            logits, _ = self._forward(self._embed(ids))
            start = self._len
            ttft = 0.0
            out_ids: list[int] = []
            text = ""
            tokens = self.loop.run(logits, start, n, gen)
            try:
                for i, token in enumerate(tokens):
                    if i == 0:
                        ttft = (time.perf_counter() - t0) * 1e3  # the first id is on the host: a true TTFT
                    if token in self.eos_ids:
                        break
                    out_ids.append(token)
                    piece, text = self._new_text(out_ids, text)
                    if piece is not None:
                        yield piece, None
                    if any(s in text for s in gen.stop_strings):
                        break
            finally:
                tokens.close()
            boxes = [self._box(self.loop.hidden_state(i)) for i, t in enumerate(out_ids) if t == self.loc_id]
            yield "", self._answer(question, out_ids, boxes, t0, ttft)
        finally:
            self._crop(self.prefix_len)  # back to the scene prefix for the next question
