"""LLM decode throughput: transformers `generate` vs the fast decoder (bf16, INT8, INT4) against the bandwidth floor.

One run for the lent GPU (issue 5), side by side per model shape (random weights, bf16, built on the GPU):

    python -m vidllm_edge.benchmarks.llm_decode --models 1.5b,7b --out benchmarks/results --max-seconds 480
    python -m vidllm_edge.benchmarks.llm_decode --models tiny --out /tmp/llm_decode      # CPU smoke test

Per configuration: time to first token (prefill of the prompt + first id on the host, median of 3), decode
tokens/s over ``--new-tokens`` at batch 1 (median of 3 runs, tokens streamed to the host as they land),
peak device memory, and the bandwidth floor: the device-to-device copy bandwidth measured in this run
divided by the bytes one decode step must read (weights and quantization tables, one embedding row, and
the K/V of the average context). Agreement: bf16 fast vs transformers (greedy tokens over the first 64, and
teacher-forced top-1 / logit cosine on transformers' own sequence); INT8/INT4 vs bf16 fast likewise.

Configurations: ``hf`` (transformers generate, greedy, its default DynamicCache, SDPA attention, eager),
``bf16`` / ``int8`` (compiled step, CUDA graphs, the Triton GEMVs of models/gemv.py), ``int4`` / ``int4-awq``
(INT4 linears through PyTorch's tinygemm kernel, the INT8 lm_head through the Triton GEMV),
``int4-triton`` (INT4 through the Triton GEMV too), ``bf16-inductor`` (Inductor's own GEMV reductions
instead of the Triton kernels), ``bf16-eager`` (no compile), and ``fp32``: transformers and the fast
decoder (eager) both in float32 on the same weights, greedy for 64 tokens, where rounding noise (1e-7) is
far below the logit margins, so token equality tests the implementation itself. Compile time is reported
as ``warmup_s`` and excluded from tokens/s.

Scene prefix reuse (``bf16``): through `FastDecoder`, the prompt is the scene prefix (system prompt and
the visual tokens, here random embeddings) prefilled once, then two questions; the first question's time
to first token including the prefix (what a question costs when the scene is new) against the second's
(the prefix reused).

Not measured: tokenizer and text streaming cost (ids are streamed, not decoded to text), sampling (greedy
only), batch > 1, TensorRT. Random weights have near-flat logits, so free-running greedy tokens of two
correct implementations diverge at the first near-tie (bf16 rounding); the teacher-forced numbers are the
meaningful agreement measure.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from vidllm_edge import atomic
from vidllm_edge.benchmarks.timing import sync

TINY = dict(model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
            tie_word_embeddings=True)
MODELS = {  # name: (preset that holds the HF config, or the dict; prompt tokens; new tokens)
    "tiny": (TINY, 64, 64),
    "1.5b": ("edge", 1500, 128),  # Qwen2-1.5B shape
    "7b": ("paper", 1500, 128),  # LLaMA-7B shape (the paper preset)
}
DEFAULT_CONFIGS = {"tiny": "hf,bf16,int8,int4,fp32,int4-awq,bf16-eager",
                   "1.5b": "hf,bf16,int8,int4,fp32,int4-triton,bf16-inductor,int4-awq",
                   "7b": "hf,bf16,int8,int4,fp32,int4-triton"}
CORE = ("hf", "bf16", "int8", "int4", "fp32")  # run for every model before any extra configuration
AGREE_TOKENS = 64
REPS = 3


def hf_config(name: str) -> dict:
    from vidllm_edge.models.config import from_name

    spec = MODELS[name][0]
    return dict(spec) if isinstance(spec, dict) else dict(from_name(spec).llm.hf_config)


def measure_bandwidth(device: torch.device, gib: float, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written, 1e9)."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    seconds = time.perf_counter() - start
    del src, dst
    return 2 * n * reps / seconds / 1e9


def build_hf(cfg: dict, device: torch.device, dtype: torch.dtype):
    """A random-weight transformers model built directly on ``device`` (no CPU init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(cfg)
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def hf_weight_bytes(model) -> int:
    emb = model.get_input_embeddings().weight
    tied = model.lm_head.weight.data_ptr() == emb.data_ptr()
    total = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    return total if tied else total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def agreement(tokens: list[int], reference: list[int], logits: torch.Tensor, ref_logits: torch.Tensor) -> dict:
    n = min(AGREE_TOKENS, len(tokens), len(reference))
    same = [a == b for a, b in zip(tokens[:n], reference[:n])]
    cos = torch.nn.functional.cosine_similarity(logits.float(), ref_logits.float(), dim=-1)
    return {"greedy_equal": sum(same), "greedy_of": n, "first_divergence": same.index(False) if False in same else None,
            "tf_top1": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
            "tf_cos_mean": float(cos.mean()), "tf_cos_min": float(cos.min())}


class ModelRun:
    """One model shape: the transformers model, the prompt, and the references later configs compare with."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, seed: int) -> None:
        self.name, self.device, self.dtype = name, device, dtype
        self.cfg = hf_config(name)
        _, self.prompt_len, self.new_tokens = MODELS[name]
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        self.hf = build_hf(self.cfg, device, dtype)
        self.init_s = time.perf_counter() - t0
        g = torch.Generator().manual_seed(seed + 1)
        self.prompt = torch.randint(0, self.cfg["vocab_size"], (self.prompt_len,), generator=g).to(device)
        self.max_seq = -(-(self.prompt_len + self.new_tokens + 8) // 128) * 128
        self.hf_tokens: list[int] | None = None
        self.hf_logits: torch.Tensor | None = None  # teacher-forced on prompt + hf_tokens[:64]
        self.bf16_tokens: list[int] | None = None
        self.bf16_logits: torch.Tensor | None = None
        self.results: dict[str, dict] = {}

    @property
    def n_agree(self) -> int:
        return min(AGREE_TOKENS, self.new_tokens)

    def reference_sequence(self) -> torch.Tensor:
        return torch.cat([self.prompt, torch.tensor(self.hf_tokens[:self.n_agree], device=self.device)])

    # -- transformers ------------------------------------------------------------------------------
    def run_hf(self) -> dict:
        model, ids = self.hf, self.prompt[None]
        kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.inference_mode():
            model.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
            ttfts = []
            for _ in range(REPS):
                sync(self.device)
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
                sync(self.device)
                ttfts.append(time.perf_counter() - t0)
            sync(self.device)
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, **kwargs)
            sync(self.device)
            total = time.perf_counter() - t0
            self.hf_tokens = out[0, self.prompt_len:].tolist()
            seq = self.reference_sequence()
            self.hf_logits = model(input_ids=seq[None], logits_to_keep=self.n_agree + 1).logits[0].float()
        ttft = statistics.median(ttfts)
        weights = hf_weight_bytes(model)
        return {"ttft_ms": ttft * 1e3, "decode_tok_s": (self.new_tokens - 1) / (total - ttft),
                "weight_bytes": weights, "cache": "DynamicCache (default), SDPA, eager"}

    # -- the fast decoder --------------------------------------------------------------------------
    def build_fast(self, config: str, log):
        from vidllm_edge.models import quant
        from vidllm_edge.models.fast_llm import FastLLM

        fast = FastLLM.from_hf(self.hf, max_seq=self.max_seq)
        info = {}
        if config in ("int8", "int4", "int4-awq", "int4-triton"):
            bits, method = (8 if config == "int8" else 4), ("awq" if config == "int4-awq" else "rtn")
            calibration = None
            if method == "awq":
                g = torch.Generator().manual_seed(7)
                calibration = [torch.randint(0, self.cfg["vocab_size"], (256,), generator=g) for _ in range(8)]
            t0 = time.perf_counter()
            report = quant.quantize_fast_llm(fast, bits, method, calibration=calibration)
            info["quantize_s"] = time.perf_counter() - t0
            info["kernels"] = quant.set_int4_kernel(fast, "torch" if config == "int4-triton" else "auto")
            log(f"    quantized ({report['recipe']}) in {info['quantize_s']:.1f} s, INT4 kernels {info['kernels']}")
        gemv = "torch" if config in ("bf16-inductor", "bf16-eager") or self.device.type != "cuda" else "triton"
        info["gemv"] = fast.set_gemv(gemv)
        return fast, info

    def run_fp32(self, log) -> dict:
        """transformers vs the fast decoder, both float32 and eager, greedy on the same weights."""
        import copy

        from vidllm_edge.models.fast_llm import FastLLM
        from vidllm_edge.models.llm import GenerationConfig
        from vidllm_edge.runtime.fast_decoder import DecodeLoop

        hf32 = copy.deepcopy(self.hf).float()
        n = self.n_agree
        with torch.inference_mode():
            out = hf32.generate(self.prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
            hf_tokens = out[0, self.prompt_len:].tolist()
            hf_logits = hf32(input_ids=torch.cat([self.prompt, out[0, self.prompt_len:]])[None],
                             logits_to_keep=n + 1).logits[0].float()
            fast = FastLLM.from_hf(hf32, max_seq=self.max_seq)
            del hf32, out
            fast.set_gemv("torch")
            logits, _ = fast.prefill(fast.embed(self.prompt), 0)
            tokens = list(DecodeLoop(fast, compile=False).run(logits, self.prompt_len, n,
                                                              GenerationConfig(max_new_tokens=n)))
            from vidllm_edge.models.fast_llm import teacher_forced_logits

            seq = torch.cat([self.prompt, torch.tensor(hf_tokens, device=self.device)])
            tf = teacher_forced_logits(fast, seq, self.prompt_len)
        agree = agreement(tokens, hf_tokens, tf, hf_logits)
        top2 = hf_logits.topk(2, dim=-1).values
        agree["min_top2_margin"] = float((top2[:, 0] - top2[:, 1]).min())
        agree["max_abs_logit_diff"] = float((tf - hf_logits).abs().max())
        log(f"    fp32 greedy {agree['greedy_equal']}/{agree['greedy_of']}, max |logit diff| "
            f"{agree['max_abs_logit_diff']:.2e}, smallest top-2 margin {agree['min_top2_margin']:.2e}")
        del fast
        return {"agreement_vs_hf_fp32": agree, "weight_bytes": 0, "ttft_ms": float("nan"), "decode_tok_s": float("nan")}

    def scene_ttft(self, fast, loop, log) -> dict:
        """First question on a new scene (prefix + question) vs a second question (prefix reused), via FastDecoder."""
        from vidllm_edge.models.config import from_name
        from vidllm_edge.models.llm import GenerationConfig
        from vidllm_edge.models.tokenizer import tiny_tokenizer
        from vidllm_edge.runtime.fast_decoder import FastDecoder

        cfg = from_name("tiny").llm
        dec = FastDecoder(fast, tiny_tokenizer(), torch.nn.Linear(fast.cfg.dim, 6).to(fast.device), cfg)
        dec.loop = loop  # the step compiled for this model already
        g = torch.Generator().manual_seed(3)
        n_visual = min(self.prompt_len, self.max_seq - 48) - len(dec.parts.prefix_ids)  # prefix ~ the prompt length
        visual = (torch.randn(n_visual, fast.cfg.dim, generator=g) * 0.02).to(fast.device, fast.dtype)
        gen = GenerationConfig(max_new_tokens=8)
        runs = []
        for _ in range(REPS):
            sync(self.device)
            prefix_ms = dec.prefill_prefix(visual)
            answers = [a for _, a in dec.stream("what is on the table?", gen) if a is not None]
            second = [a for _, a in dec.stream("how far is the door?", gen) if a is not None]
            runs.append((prefix_ms, answers[0].timings["ttft_ms"], second[0].timings["ttft_ms"]))
        prefix_ms, q1, q2 = (statistics.median(v) for v in zip(*runs))
        res = {"prefix_tokens": dec.prefix_len, "prefix_ms": prefix_ms, "first_question_ttft_ms": prefix_ms + q1,
               "second_question_ttft_ms": q2, "speedup": (prefix_ms + q1) / q2,
               "prefills": dec.prefill_log[-3:]}
        log(f"    scene: first question {prefix_ms + q1:.1f} ms to first token (prefix {prefix_ms:.1f}), second "
            f"{q2:.1f} ms: {res['speedup']:.1f}x")
        return res

    def run_fast(self, config: str, log) -> dict:
        from vidllm_edge.models.fast_llm import teacher_forced_logits
        from vidllm_edge.models.llm import GenerationConfig
        from vidllm_edge.runtime.fast_decoder import DecodeLoop

        from torch._dynamo.utils import counters

        compile_ = config != "bf16-eager"
        counters.clear()
        fast, info = self.build_fast(config, log)
        loop = DecodeLoop(fast, compile=compile_)
        gen = GenerationConfig(max_new_tokens=self.new_tokens)
        embeds = fast.embed(self.prompt)
        with torch.inference_mode():
            t0 = time.perf_counter()  # warm-up: compile, CUDA graph recording (two passes)
            for _ in range(2):
                logits, _ = fast.prefill(embeds, 0)
                list(loop.run(logits, self.prompt_len, min(16, self.new_tokens), gen))
            sync(self.device)
            info["warmup_s"] = time.perf_counter() - t0
            if compile_:  # a skipped CUDA graph or a recompile would silently cost speed: record them
                info["compile_counters"] = {"unique_graphs": counters["stats"]["unique_graphs"],
                                            "graph_breaks": sum(counters["graph_break"].values()),
                                            "cudagraph_skips": sum(counters["inductor"].get(k, 0) for k in counters["inductor"]
                                                                   if "cudagraph_skip" in k),
                                            "recompiles": sum(counters["recompiles"].values())}
            log(f"    warm-up (compile + graph capture) {info['warmup_s']:.1f} s {info.get('compile_counters', '')}")
            ttfts, rates, tokens = [], [], []
            for _ in range(REPS):
                sync(self.device)
                t0 = time.perf_counter()
                logits, _ = fast.prefill(embeds, 0)
                int(logits.argmax())  # the first id on the host
                ttfts.append(time.perf_counter() - t0)
                sync(self.device)
                t0 = time.perf_counter()
                tokens = list(loop.run(logits, self.prompt_len, self.new_tokens, gen))
                sync(self.device)
                rates.append(self.new_tokens / (time.perf_counter() - t0))
            tf_logits = teacher_forced_logits(fast, self.reference_sequence(), self.prompt_len)
            if config == "bf16":
                info["scene"] = self.scene_ttft(fast, loop, log)
        res = {**info, "ttft_ms": statistics.median(ttfts) * 1e3, "decode_tok_s": statistics.median(rates),
               "decode_tok_s_runs": rates, "weight_bytes": fast.weight_bytes_per_token(),
               "kv_bytes_per_position": fast.kv_bytes_per_position(), "static_cache_positions": fast.max_seq}
        if config.startswith("bf16"):
            res["agreement_vs_hf"] = agreement(tokens, self.hf_tokens, tf_logits, self.hf_logits)
            if config == "bf16":
                self.bf16_tokens, self.bf16_logits = tokens, tf_logits
        elif self.bf16_logits is not None:
            res["agreement_vs_bf16"] = agreement(tokens, self.bf16_tokens, tf_logits, self.bf16_logits)
        del fast, loop
        return res

    def run(self, config: str, bandwidth_gbs: float, log) -> dict:
        torch._dynamo.reset()  # drops the previous configuration's graphs (and CUDA graph pools) before measuring
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else None
        t0 = time.perf_counter()
        if config == "hf":
            res = self.run_hf()
        elif config == "fp32":
            res = self.run_fp32(log)
        else:
            res = self.run_fast(config, log)
        res["seconds"] = time.perf_counter() - t0
        res["peak_gb"], res["allocated_before_gb"] = peak_gb(self.device), before
        kv_per_pos = res.get("kv_bytes_per_position") or _kv_bytes_per_position(self.cfg, self.dtype)
        kv_avg = kv_per_pos * (self.prompt_len + self.new_tokens / 2)
        res["bytes_per_token"] = res["weight_bytes"] + kv_avg
        res["floor_tok_s"] = bandwidth_gbs * 1e9 / res["bytes_per_token"]
        res["floor_fraction"] = res["decode_tok_s"] / res["floor_tok_s"]
        res["achieved_gbs"] = res["decode_tok_s"] * res["bytes_per_token"] / 1e9
        if "static_cache_positions" in res:  # what our kernels really read: the whole static cache every step
            res["bytes_read_impl"] = res["weight_bytes"] + kv_per_pos * res["static_cache_positions"]
        res["status"] = "ok"
        return res


def _kv_bytes_per_position(cfg: dict, dtype: torch.dtype) -> int:
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * kv * head_dim * torch.empty(0, dtype=dtype).element_size()


def estimate(report: dict, name: str, config: str, device: torch.device) -> float:
    """Seconds a configuration is expected to take: the slowest comparable one measured so far in this run
    (compiled configurations compile a graph; hf and bf16-eager do not), else a guess."""
    compiled = config not in ("hf", "bf16-eager")
    done = [r["seconds"] for r in report["models"].get(name, {}).get("configs", {}).values()
            if r.get("status") == "ok" and ("compile_counters" in r) == compiled]
    if done:
        return max(done)
    if device.type != "cuda" or name == "tiny":
        return 10.0
    return 90.0 if compiled else 30.0


def plan(models: list[str], configs: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Core configurations of every model first, then the extras (so a time budget cuts extras first)."""
    core = [(m, c) for m in models for c in configs[m] if c in CORE]
    extra = [(m, c) for m in models for c in configs[m] if c not in CORE]
    return core + extra


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# LLM decode: transformers vs the fast decoder ({meta['date']})", "",
             f"{meta['device']}, torch {meta['torch']} (CUDA {meta['cuda']}), transformers {meta['transformers']}, "
             f"copy bandwidth {meta['bandwidth_gbs']:.0f} GB/s, batch 1, bf16 activations, random weights.", ""]
    for name, model in report["models"].items():
        lines += [f"## {name}: {model['shape']}", "",
                  f"prompt {model['prompt_len']} tokens, {model['new_tokens']} new tokens; model init "
                  f"{model['init_s']:.1f} s.", "",
                  "| config | TTFT ms | decode tok/s | floor tok/s | % of floor | GB/s | weights GB | peak GB | "
                  "greedy equal | TF top-1 | TF cos | warm-up s | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for cfg, r in model["configs"].items():
            if cfg == "fp32" and r.get("status") == "ok":
                continue  # an agreement check, not a speed row (below the table)
            if r.get("status") != "ok":
                lines.append(f"| {cfg} | | | | | | | | | | | | {r.get('status')}: {str(r.get('error', ''))[:90]} |")
                continue
            agree = r.get("agreement_vs_hf") or r.get("agreement_vs_bf16") or {}
            ref = " (vs hf)" if "agreement_vs_hf" in r else " (vs bf16)" if agree else ""
            peak = f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else "n/a"
            lines.append(
                f"| {cfg} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} | {r['floor_tok_s']:.0f} | "
                f"{100 * r['floor_fraction']:.0f}% | {r['achieved_gbs']:.0f} | {r['weight_bytes'] / 1e9:.2f} | {peak} | "
                + (f"{agree['greedy_equal']}/{agree['greedy_of']}{ref} | {agree['tf_top1']:.3f} | "
                   f"{agree['tf_cos_mean']:.5f} | " if agree else "| | | ")
                + f"{r.get('warmup_s', 0):.1f} | ok |")
        fp32 = model["configs"].get("fp32", {}).get("agreement_vs_hf_fp32")
        if fp32:
            lines += ["", f"fp32 (transformers vs fast, both float32, same weights): greedy tokens equal "
                          f"{fp32['greedy_equal']}/{fp32['greedy_of']}, teacher-forced top-1 {fp32['tf_top1']:.3f}, "
                          f"max |logit diff| {fp32['max_abs_logit_diff']:.2e} (smallest top-2 margin of transformers' "
                          f"logits {fp32['min_top2_margin']:.2e})."]
        scene = model["configs"].get("bf16", {}).get("scene")
        if scene:
            lines += ["", f"Scene prefix reuse (bf16, {scene['prefix_tokens']}-token prefix): first question "
                          f"{scene['first_question_ttft_ms']:.1f} ms to first token (prefix {scene['prefix_ms']:.1f} ms), "
                          f"second question {scene['second_question_ttft_ms']:.1f} ms: {scene['speedup']:.1f}x sooner."]
        speed = {c: r["decode_tok_s"] for c, r in model["configs"].items()
                 if r.get("status") == "ok" and r["decode_tok_s"] == r["decode_tok_s"]}
        if "bf16" in speed:
            ratios = ", ".join(f"{c} {speed[c] / speed['bf16']:.2f}x" for c in speed if c not in ("bf16",))
            lines += ["", f"Decode speed relative to bf16 (compiled): {ratios}."]
        lines.append("")
    lines += ["Floor = copy bandwidth / (weights + quantization tables + one embedding row + K/V of the average "
              "context) per token. Peak GB is the process peak during that configuration (other models' weights "
              "resident). TF = teacher forcing on transformers' greedy sequence (bf16 rows: vs transformers; "
              "quantized rows: vs bf16 fast). Greedy equality of random-weight models ends at the first near-tie.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1.5b,7b", help=f"comma-separated from {', '.join(MODELS)}")
    parser.add_argument("--configs", default=None,
                        help="comma-separated configurations for every model (default: per model, see DEFAULT_CONFIGS)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for llm_decode.json / .md")
    parser.add_argument("--max-seconds", type=float, default=480.0,
                        help="skip configurations that would start after this many seconds (default 480)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = atomic.ensure_dir(args.out, "Benchmark output folder")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    configs = {m: (args.configs or DEFAULT_CONFIGS[m]).split(",") for m in models}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)

    import transformers

    bandwidth = measure_bandwidth(device, 1.0 if device.type == "cuda" else 0.25)
    log(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()}), "
        f"copy bandwidth {bandwidth:.0f} GB/s")
    report = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
                       "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                       "python": platform.python_version(), "bandwidth_gbs": bandwidth, "dtype": "bfloat16",
                       "args": vars(args) | {"out": str(args.out)}},
              "models": {}}
    runs: dict[str, ModelRun] = {}

    def write() -> None:
        atomic.write_text(out / "llm_decode.json", json.dumps(report, indent=2, default=str))
        atomic.write_text(out / "llm_decode.md", markdown(report))

    for name, config in plan(models, configs):
        entry = report["models"].setdefault(name, {"shape": None, "configs": {}})
        elapsed = time.perf_counter() - start
        if elapsed + estimate(report, name, config, device) > args.max_seconds:
            entry["configs"][config] = {"status": "skipped", "error": f"would end past the {args.max_seconds:.0f} s budget "
                                                                     f"({elapsed:.0f} s spent)"}
            log(f"{name} {config}: skipped (time budget)")
            continue
        try:
            if name not in runs:
                log(f"{name}: building the transformers model on {device} ...")
                runs[name] = ModelRun(name, device, dtype, args.seed)
                r = runs[name]
                entry.update(shape={k: r.cfg[k] for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                          "num_attention_heads", "num_key_value_heads",
                                                          "intermediate_size", "vocab_size")},
                             prompt_len=r.prompt_len, new_tokens=r.new_tokens, init_s=r.init_s)
                log(f"{name}: built in {r.init_s:.1f} s")
            if config != "hf" and runs[name].hf_tokens is None:
                raise RuntimeError("the hf configuration did not run (its tokens are the agreement reference)")
            log(f"{name} {config}: running ...")
            res = runs[name].run(config, bandwidth, log)
            entry["configs"][config] = res
            agree = res.get("agreement_vs_hf") or res.get("agreement_vs_bf16")
            log(f"{name} {config}: TTFT {res['ttft_ms']:.1f} ms, decode {res['decode_tok_s']:.1f} tok/s "
                f"({100 * res['floor_fraction']:.0f}% of the {res['floor_tok_s']:.0f} tok/s floor)"
                + (f", greedy {agree['greedy_equal']}/{agree['greedy_of']}, TF top-1 {agree['tf_top1']:.3f}" if agree else ""))
        except Exception as exc:  # one failing configuration (compile error, OOM) is recorded, not fatal
            entry["configs"][config] = {"status": "error", "error": f"{type(exc).__name__}: {str(exc).strip()[:600]}",
                                        "traceback": traceback.format_exc()[-3000:]}
            log(f"{name} {config}: FAILED {type(exc).__name__}: {str(exc).strip()[:300]}")
        write()
        if all(c in entry["configs"] for c in configs[name]):
            runs.pop(name, None)  # free this model once its last configuration ran
    write()
    print(markdown(report))
    log(f"wrote {out / 'llm_decode.json'} and {out / 'llm_decode.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
