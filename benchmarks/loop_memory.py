"""Host memory of the embedded loop over a long run: does RSS stay flat while scenes are re-encoded?

    python -m vidllm_edge.benchmarks.loop_memory --out benchmarks/results

Runs `InferenceLoop` for 200 iterations (one frame each) on the synthetic room video, looped, with the
tiny preset (random weights) on CPU: a 4-keyframe window, a new scene every 5 iterations (a fake
clock ticking 1 s per iteration, so the schedule does not depend on machine speed) and a standing
question answered against each scene (8 new tokens). Records RSS (/proc/self/statm) every 20
iterations and encode/answer latency; writes loop_memory_cpu.json and loop_memory_cpu.md.

What it does not measure: GPU memory, real model sizes (the tiny model's tensors are small, so this
shows leaks in the loop's own bookkeeping, buffers and scene turnover, not a large model's peak), or
the reader-thread path of cameras and streams (a file source reads on the caller's thread).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

ITERATIONS = 200
EVERY = 20
REENCODE_EVERY = 5
WINDOW = 4
GROWTH_BOUND_MB = 30.0


class _Probe:
    """The loop's clock (1 s per iteration; the loop calls it once per iteration) that also samples RSS every
    EVERY iterations and collects encode times, over the whole run (LoopStats.history keeps only the last 1024)."""

    def __init__(self) -> None:
        self.calls = 0
        self.loop = None
        self.rss: list[dict] = []
        self.encode_ms: list[float] = []
        self._encodes = 0

    def sample(self, iteration: int) -> None:
        from vidllm_edge.runtime.loop import rss_bytes

        self.rss.append({"iteration": iteration, "rss_mb": round(rss_bytes() / 2**20, 2), "scenes": self.loop.scene_id})

    def __call__(self) -> float:
        done = self.calls  # iterations finished before this one
        stats = self.loop.stats
        if stats.encodes > self._encodes:
            self._encodes = stats.encodes
            self.encode_ms.append(stats.last_encode_ms)
        if done == 1 or (done and done % EVERY == 0):
            self.sample(done)
        self.calls += 1
        return float(self.calls)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values)
    return {"n": len(values), "mean": round(float(a.mean()), 2), "p50": round(float(np.percentile(a, 50)), 2),
            "p90": round(float(np.percentile(a, 90)), 2), "p99": round(float(np.percentile(a, 99)), 2)}


def run(iterations: int = ITERATIONS, reencode_every: int = REENCODE_EVERY, window: int = WINDOW) -> dict:
    """Run the loop and return the report dict (RSS in MB, times in ms)."""
    import torch

    from vidllm_edge.models.llm import GenerationConfig
    from vidllm_edge.models.model import build_model
    from vidllm_edge.runtime.loop import InferenceLoop, ListFeed, RollingWindow, rss_bytes
    from vidllm_edge.runtime.pipeline import Pipeline
    from vidllm_edge.runtime.sources import FileSource
    from vidllm_edge.synthetic import write_scene

    rss_start = rss_bytes() / 2**20
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        video, _ = write_scene(Path(tmp) / "video", num_frames=48, width=160, height=120, fps=12)
        pipeline = Pipeline(build_model("tiny", seed=0), generation=GenerationConfig(max_new_tokens=8))
        rss_model = rss_bytes() / 2**20
        probe, answers = _Probe(), []
        loop = InferenceLoop(pipeline, FileSource(video, pace=False, loop=True), RollingWindow(window),
                             reencode_every_s=float(reencode_every),
                             questions=ListFeed(["What is in the room?"], repeat=True), out_dir=Path(tmp) / "out",
                             clock=probe, on_answer=lambda record: answers.append(record["answer_ms"]),
                             log=lambda line: None)
        probe.loop = loop
        start = time.perf_counter()
        result = loop.run(max_iterations=iterations, handle_sigint=False)
        wall_s = time.perf_counter() - start
        if loop.stats.encodes > len(probe.encode_ms):
            probe.encode_ms.append(loop.stats.last_encode_ms)
        last = loop.stats.history[-1]  # the last iteration, before the final artifacts were written
        probe.rss.append({"iteration": last.iteration, "rss_mb": last.rss_mb, "scenes": last.scene_id})
        rss_after_outputs = rss_bytes() / 2**20
    encodes, rss = probe.encode_ms, probe.rss
    at_20 = next(p["rss_mb"] for p in rss if p["iteration"] == EVERY)
    growth = rss[-1]["rss_mb"] - at_20
    return {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "setup": {"iterations": iterations, "window_keyframes": window, "reencode_every_iterations": reencode_every,
                  "model": "tiny (random weights)", "video": "synthetic room 160x120, 48 frames, looped",
                  "max_new_tokens": 8, "questions": "1 standing question per scene"},
        "load_avg_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "exit": result.reason, "scenes": result.scenes, "answers": result.answers, "wall_s": round(wall_s, 2),
        "rss_mb": {"process_start": round(rss_start, 1), "after_model": round(rss_model, 1), "per_iterations": rss,
                   "after_final_outputs": round(rss_after_outputs, 1),
                   "growth_20_to_end": round(growth, 2), "peak": loop.stats.rss_peak_mb,
                   "bound": GROWTH_BOUND_MB, "flat": growth < GROWTH_BOUND_MB},
        # the first encode builds the units and warms the allocator: reported apart from the steady state
        "encode_ms": {"first": round(encodes[0], 2) if encodes else None, "steady": _percentiles(encodes[1:])},
        "answer_ms": {"first": round(answers[0], 2) if answers else None, "steady": _percentiles(answers[1:])},
    }


def render_markdown(r: dict) -> str:
    s, m = r["setup"], r["rss_mb"]
    lines = [f"# Embedded loop: host memory over {s['iterations']} iterations (CPU)", "",
             f"{r['date']}, torch {r['torch']} ({r['threads']} threads, {r['cores']} cores); {s['model']}; "
             f"{s['video']}; window {s['window_keyframes']} keyframes, a scene every "
             f"{s['reencode_every_iterations']} iterations, {s['questions']} ({s['max_new_tokens']} new tokens).", "",
             f"{r['scenes']} scenes, {r['answers']} answers in {r['wall_s']} s (1-min load average "
             f"{r['load_avg_1min']['before']} before, {r['load_avg_1min']['after']} after). "
             f"RSS: {m['process_start']} MB at start, {m['after_model']} MB with the model, peak {m['peak']} MB, "
             f"{m['after_final_outputs']} MB after writing the final artifacts; "
             f"growth from iteration 20 to the end **{m['growth_20_to_end']:+.2f} MB** (bound {m['bound']:g} MB: "
             f"{'flat' if m['flat'] else 'NOT FLAT'}).", "",
             "| iteration | RSS MB | scenes so far |", "|---:|---:|---:|"]
    lines += [f"| {p['iteration']} | {p['rss_mb']:.1f} | {p['scenes']} |" for p in m["per_iterations"]]
    lines += ["", "| ms | first | n | mean | p50 | p90 | p99 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("encode_ms", "answer_ms"):
        st = r[name]["steady"]
        cells = [name[:-3], r[name]["first"], st["n"], st["mean"], st["p50"], st["p90"], st["p99"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Encode = `Pipeline.encode` of the window (preprocess .. LLM prefix prefill); answer = `Scene.ask` "
              "with streaming. Wall times on a shared 2-core machine: compare RSS, not milliseconds, across runs.",
              "Not measured: GPU memory, real model sizes, the reader thread of cameras/streams.", "",
              "Reproduce: `python -m vidllm_edge.benchmarks.loop_memory --out benchmarks/results`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    args = parser.parse_args(argv)
    from vidllm_edge import atomic
    from vidllm_edge.runtime.outputs import write_json

    report = run(args.iterations)
    out = Path(args.out)
    write_json(out / "loop_memory_cpu.json", report)
    atomic.write_text(out / "loop_memory_cpu.md", render_markdown(report))
    print(render_markdown(report))
    return 0 if report["rss_mb"]["flat"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
