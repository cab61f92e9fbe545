"""Where one decode step's time goes on the GPU: kernels, launches, graphs (diagnostic for the fast decoder).

    python -m vidllm_edge.benchmarks.decode_profile --model 1.5b --out /tmp/prof      # on the lent GPU

Prints and writes (``decode_profile.json``): per linear shape of the model, the batch-1 GEMV time and GB/s
of cuBLAS (eager ``F.linear``), of Inductor's compiled reduction, and of the INT8 / INT4 kernels, with
their error against the float32 product; then the decode step as a whole, run several ways on the same
static cache: eager (synchronised per step, and pipelined), eager captured in a CUDA graph, compiled
(Inductor, no graphs) and compiled captured in a CUDA graph, and the `DecodeLoop` as the decoder runs it.
Per way: milliseconds per step, the kernels one step launches and the GPU time they add up to (torch
profiler), so launch overhead (wall >> GPU time), slow kernels (GPU time >> weight bytes / bandwidth) and
host work in the loop (loop >> graph replay) can be told apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vidllm_edge import atomic


def gpu_ms(fn, iters: int, sync_each: bool = False) -> float:
    """Milliseconds per call of ``fn`` (CUDA events around ``iters`` back-to-back calls, after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
        if sync_each:
            torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def kernel_profile(fn, steps: int = 3, top: int = 12) -> dict:
    """Kernels one call of ``fn`` launches and their summed GPU time (mean over ``steps`` calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0)
        if dev and e.device_type.name == "CUDA":
            rows.append((e.key, e.count / steps, dev / steps / 1e3))
    rows.sort(key=lambda r: -r[2])
    return {"kernels_per_step": sum(r[1] for r in rows), "gpu_ms_per_step": sum(r[2] for r in rows),
            "top": [{"kernel": k[:110], "per_step": c, "ms": ms} for k, c, ms in rows[:top]]}


def graph_of(fn):
    """Capture ``fn`` (no arguments; reads and writes static buffers) in a CUDA graph; returns replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def graph_ms(fn, calls: int = 20, replays: int = 20) -> float:
    """GPU milliseconds per call of ``fn``: ``calls`` calls captured in one CUDA graph, replayed (no launch cost)."""
    def many():
        for _ in range(calls):
            fn()

    replay = graph_of(many)
    return gpu_ms(replay, replays) / calls


def gemv_table(fast, log) -> list[dict]:
    from vidllm_edge.models import gemv, quant

    cfg = fast.cfg
    shapes = {"wqkv": (cfg.qkv_dim, cfg.dim), "wo": (cfg.dim, cfg.n_heads * cfg.head_dim),
              "w_gate_up": (2 * cfg.intermediate_size, cfg.dim), "w_down": (cfg.dim, cfg.intermediate_size),
              "lm_head": (cfg.vocab_size, cfg.dim)}
    rows = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        i8 = quant.Int8Linear.from_float(w, None, torch.bfloat16)
        i4 = quant.Int4Linear.from_float(w, None, torch.bfloat16, 128)
        refs = {"dense": gemv.reference(x, w), "int8": gemv.reference(x, i8.weight, mode="int8", scale=i8.scales),
                "int4": gemv.reference(x, i4.weight, mode="int4", scale=i4.scales, zero=i4.zeros)}

        def err(y, kind):
            y, ref = y.float().reshape(-1), refs[kind]
            return float((y - ref).norm() / ref.norm())

        row = {"linear": name, "N": n, "K": k}
        b_dense, b_int8, b_int4 = 2 * n * k, n * k + 4 * n, n * k // 2 + 4 * n * k // 128
        ways = {"cublas_bf16": (lambda: F.linear(x, w), b_dense, "dense"),
                "triton_bf16": (lambda: gemv.gemv(x, w), b_dense, "dense")}
        lin = torch.compile(lambda a, b: F.linear(a, b), dynamic=False)
        ways["inductor_bf16"] = (lambda: lin(x, w), b_dense, "dense")
        i8c = torch.compile(i8, dynamic=False)
        ways["int8_inductor"] = (lambda: i8c(x), b_int8, "int8")
        ways["int8_triton"] = (lambda: gemv.gemv(x, i8.weight, mode="int8", scale=i8.scales), b_int8, "int8")
        if k % 128 == 0:
            i4c = torch.compile(i4, dynamic=False)
            ways["int4_inductor"] = (lambda: i4c(x), b_int4, "int4")
            ways["int4_triton"] = (lambda: gemv.gemv(x, i4.weight, mode="int4", scale=i4.scales, zero=i4.zeros),
                                   b_int4, "int4")
            i4t = quant.Int4Linear.from_float(w, None, torch.bfloat16, 128)
            i4t.set_kernel("tinygemm", torch.bfloat16)
            ways["int4_tinygemm"] = (lambda: i4t(x), b_int4, "int4")
        for way, (fn, nbytes, kind) in ways.items():
            try:
                with torch.inference_mode():
                    y = fn()
                    ms = graph_ms(fn)
                row[way] = {"us": ms * 1e3, "gbs": nbytes / ms / 1e6, "rel_err": err(y, kind)}
            except Exception as exc:  # a kernel that does not exist for a shape is a finding, not a crash
                row[way] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        log(f"  {name} [{n}x{k}]: " + ", ".join(
            f"{w_}: {v['us']:.1f} us {v['gbs']:.0f} GB/s err {v['rel_err']:.1e}" if "us" in v else f"{w_}: {v['error'][:120]}"
            for w_, v in row.items() if isinstance(v, dict)))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    from vidllm_edge.benchmarks.llm_decode import build_hf, hf_config, measure_bandwidth
    from vidllm_edge.models.fast_llm import FastLLM
    from vidllm_edge.models.llm import GenerationConfig
    from vidllm_edge.runtime.fast_decoder import DecodeLoop, configure_inductor

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="1.5b")
    p.add_argument("--layers", type=int, default=None, help="cut the model to this many layers (faster compiles)")
    p.add_argument("--prompt", type=int, default=1500)
    p.add_argument("--parts", default="gemv,eager,c:triton,c:torch,loop",
                   help="gemv, eager, c:VARIANT (triton, torch, int8, int4, int4-tinygemm), loop")
    p.add_argument("--loop-gemv", default="auto")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    out = atomic.ensure_dir(args.out, "Profile output folder")
    report: dict = {"model": args.model, "layers": args.layers, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(), "bandwidth_gbs": measure_bandwidth(torch.device("cuda"), 1.0)}
    configure_inductor()
    cfg = hf_config(args.model)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    hf = build_hf(cfg, torch.device("cuda"), torch.bfloat16)
    fast = FastLLM.from_hf(hf, max_seq=-(-(args.prompt + 200) // 128) * 128)
    report["weight_bytes"] = fast.weight_bytes_per_token()
    report["floor_ms"] = report["weight_bytes"] / report["bandwidth_gbs"] / 1e6
    log(f"model {args.model} layers {fast.cfg.n_layers}: weights {report['weight_bytes'] / 1e9:.2f} GB, "
        f"floor {report['floor_ms']:.3f} ms/step at {report['bandwidth_gbs']:.0f} GB/s")

    def save():
        atomic.write_text(out / "decode_profile.json", json.dumps(report, indent=2))

    if "gemv" in parts:
        report["gemv"] = gemv_table(fast, log)
        save()
    with torch.inference_mode():
        ids = torch.randint(0, fast.cfg.vocab_size, (args.prompt,), device="cuda")
        logits, _ = fast.prefill(fast.embed(ids), 0)
        token = logits.argmax(-1, keepdim=True)
        pos = torch.tensor([args.prompt], device="cuda")
        steps = report["steps"] = {}

        def record(name, ms, prof=None):
            steps[name] = {"ms": ms, **({"profile": prof} if prof else {})}
            extra = f", {prof['kernels_per_step']:.0f} kernels, GPU {prof['gpu_ms_per_step']:.3f} ms" if prof else ""
            log(f"  step {name}: {ms:.3f} ms{extra}")
            save()

        def eager():
            return fast.decode_step(token, pos)

        def compiled_variant(tag, model):
            t0 = time.perf_counter()
            step = torch.compile(model.decode_step, fullgraph=True, dynamic=False)

            def comp():
                return step(token, pos)

            comp()
            torch.cuda.synchronize()
            log(f"  compile {tag}: {time.perf_counter() - t0:.1f} s")
            record(f"{tag}_pipelined", gpu_ms(comp, 20), kernel_profile(comp))
            record(f"{tag}_cuda_graph", gpu_ms(graph_of(comp), 100))
            ref = model.decode_step(token, pos)[0].float()
            steps[f"{tag}_cuda_graph"]["logits_cos_vs_eager"] = float(F.cosine_similarity(
                comp()[0].float(), ref, dim=0))

        if "eager" in parts:
            record("eager_sync_each", gpu_ms(eager, 20, sync_each=True))
            record("eager_pipelined", gpu_ms(eager, 20), kernel_profile(eager))
            record("eager_cuda_graph", gpu_ms(graph_of(eager), 100))
            fast.set_gemv("triton")
            record("eager_triton_cuda_graph", gpu_ms(graph_of(eager), 100), kernel_profile(graph_of(eager)))
            fast.set_gemv("torch")
        for variant in [v for v in ("triton", "torch", "int8", "int4", "int4-tinygemm") if f"c:{v}" in parts]:
            from vidllm_edge.models import quant

            if variant in ("int8", "int4", "int4-tinygemm"):
                model = FastLLM.from_hf(hf, max_seq=fast.max_seq)
                model.prefill(model.embed(ids), 0)
                quant.quantize_fast_llm(model, 8 if variant == "int8" else 4, "rtn")
                if variant == "int4-tinygemm":
                    quant.set_int4_kernel(model, "tinygemm")
                model.set_gemv("triton")
                model.prefill(model.embed(ids), 0)
            else:
                model = fast
                model.set_gemv(variant)
            compiled_variant(f"compiled_{variant}", model)
            if model is not fast:
                del model
            torch.cuda.empty_cache()
            torch._dynamo.reset()
        if "loop" in parts:
            fast.set_gemv(args.loop_gemv)
            loop = DecodeLoop(fast, compile=True)
            gen = GenerationConfig(max_new_tokens=128)
            t0 = time.perf_counter()
            for _ in range(2):
                list(loop.run(logits, args.prompt, 16, gen))
            torch.cuda.synchronize()
            log(f"  DecodeLoop warm-up {time.perf_counter() - t0:.1f} s")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            list(loop.run(logits, args.prompt, 128, gen))
            torch.cuda.synchronize()
            record("decode_loop_reduce_overhead", (time.perf_counter() - t0) / 128 * 1e3)
    save()
    log(f"wrote {out / 'decode_profile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
