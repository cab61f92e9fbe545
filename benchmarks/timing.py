"""Timing of one benchmark row: synchronised stage clocks with CUDA events, a memory monitor, statistics and
TensorRT Edge-LLM's profile structure.

Timing. Warm-up repetitions (compilation, CUDA graph capture, ONNX Runtime's first-run allocations) are run
and dropped; then ``reps`` repetitions of one whole scene: ``Pipeline.encode`` (the runtime's own stage
sequence, with its stopwatch replaced by one that synchronises the device at every stage edge and records
CUDA events), the question's prefill up to the first token id on the host, and the full answer. Per stage:
p50/p90/p99 of host wall time (``perf_counter`` between synchronisations) and of device time (CUDA events
on the current stream; an ONNX Runtime call blocks the host until its own stream is done, so its device time
brackets the whole call). On the CPU device time does not exist and is reported as null, never copied from
wall time. Peak device memory: the device-wide used memory polled every 5 ms (``cudaMemGetInfo``, as
TensorRT Edge-LLM's memory monitor) and ``torch.cuda.max_memory_allocated``, both reset per configuration
after warm-up; host RSS polled likewise (Linux ``/proc/self/statm``).

The stopwatch of ``Pipeline.encode`` is the pipeline's ``stopwatch`` factory; `clocked_pipeline`
swaps it for the duration of one encode, and the suite fails loudly if a stage it expects was not timed. The
question's time to first token is measured here for every decoder alike (prefill of the question, first id on
the host, both synchronised), not taken from the decoders' own unsynchronised ``ttft_ms``.

Field names shared with TensorRT Edge-LLM's profile JSON (its ``profileFormatter.cpp``: ``addJsonPrefillSummary``,
``addJsonGenerationSummary``, ``addJsonMultimodalSummary``, ``addJsonTimingStages``, ``addJsonMemorySummary``),
each row's ``profile`` block has that file's structure and meaning:

    prefill.{total_runs, reused_tokens, computed_tokens, average_tokens_per_run, average_time_per_run_ms,
             tokens_per_second, average_time_per_token_ms}   scene-prefix prefill + the question's prefill; reused =
                                                              the prefix the question reuses; per-token figures
                                                              count reused + computed, as Edge-LLM does
    generation.{total_runs, generated_tokens, average_tokens_per_run, tokens_per_second,
                average_time_per_token_ms}                    the answer's tokens after the first
    multimodal.{total_runs, total_images, total_image_tokens, average_time_per_token_ms}
                                                              vision stages; images = frames, image tokens = the
                                                              visual tokens handed to the LLM
    stages[].{stage_id, total_runs, total_gpu_time_ms, average_time_per_run_ms,
              gpu_time_stats.{count, min_ms, max_ms, mean_ms, median_ms, p95_ms, p99_ms, stddev_ms}}
    peak_gpu_memory_bytes, peak_gpu_memory_mb

Where Edge-LLM uses GPU time and we have none (the CPU, the decode loop), the block says ``time_source:
"host_wall"``. Our own fields are named for their meaning: ``time_to_first_token_ms`` (frames in, first answer
token id on the host), ``vision_ms_per_frame``, ``decode_tokens_per_s``, ``scene_ms`` (frames in, full answer).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

# Pipeline.encode's stage names, grouped into the stages the report shows (the list).
STAGE_GROUPS = {"encoder_adapter": ("encoder_adapter",), "geometry": ("geometry",),
                "metric_depth_scale": ("metric_depth", "scale"), "lift_pool": ("lift", "pool", "projector"),
                "prefill": ("prefill_prefix",)}
ENCODE_STAGES = ("decode_video", "preprocess") + tuple(s for g in STAGE_GROUPS.values() for s in g)
VISION_STAGES = ("encoder_adapter", "geometry", "metric_depth_scale", "lift_pool")
REPORT_STAGES = tuple(STAGE_GROUPS) + ("question_ttft", "decode")
POLL_S = 0.005


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Named spans: host wall ms between device synchronisations, and CUDA events for device ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host: dict[str, float] = {}
        self._events: dict[str, list] = {}

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        sync(self.device)
        start = time.perf_counter()
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        yield
        if cuda:
            end.record()
            self._events.setdefault(name, []).append((begin, end))
        sync(self.device)
        self.host[name] = self.host.get(name, 0.0) + (time.perf_counter() - start) * 1e3

    def device_ms(self) -> dict[str, float] | None:
        if self.device.type != "cuda":
            return None
        return {n: sum(b.elapsed_time(e) for b, e in spans) for n, spans in self._events.items()}


@contextlib.contextmanager
def clocked_pipeline(pipe, clock: Clock) -> Iterator[None]:
    """Run ``pipe.encode`` with its stage timer (`Pipeline.stopwatch`) replaced by ``clock`` (synchronised stage
    edges + CUDA events)."""

    class Stopwatch:
        def __init__(self, timings: dict[str, float]) -> None:
            self.timings = timings

        @contextlib.contextmanager
        def __call__(self, name: str):
            with clock.span(name):
                yield
            self.timings[name] = clock.host[name]

    before = pipe.stopwatch
    pipe.stopwatch = Stopwatch
    try:
        yield
    finally:
        pipe.stopwatch = before


class MemoryMonitor:
    """Peak device memory in use (device-wide, cudaMemGetInfo) and host RSS, polled on a thread."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.gpu_peak = 0
        self.rss_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._statm = Path("/proc/self/statm")

    def _sample(self) -> None:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self.gpu_peak = max(self.gpu_peak, total - free)
        if self._statm.is_file():
            self.rss_peak = max(self.rss_peak, int(self._statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE"))

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self._sample()

    def __enter__(self) -> "MemoryMonitor":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def result(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        rss = self.rss_peak
        source = "/proc/self/statm, polled"
        if not rss:  # not Linux: the process-lifetime peak is all there is
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            source = "getrusage ru_maxrss (process lifetime)"
        return {"peak_gpu_memory_bytes": self.gpu_peak if cuda else None,
                "peak_gpu_memory_mb": self.gpu_peak / 2**20 if cuda else None,
                "peak_torch_allocated_mb": torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None,
                "peak_host_rss_mb": rss / 2**20, "host_rss_source": source}


def stats(values: list[float] | None) -> dict[str, Any] | None:
    """p50/p90/p99 (linear interpolation), mean, min, max and the values themselves."""
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()), "min": float(a.min()),
            "max": float(a.max()), "std": float(a.std()), "n": int(a.size), "values": [float(v) for v in a]}


def first_token(decoder, question: str) -> int:
    """Prefill the question after the scene prefix and bring the first answer token id to the host; then crop
    back to the prefix (the decoders' own hooks, as calibration/record.py uses them)."""
    with torch.inference_mode():
        ids, _ = decoder._question_ids(question)
        logits, _ = decoder._forward(decoder._embed(ids))
        token = int(logits.argmax())
        decoder._crop(decoder.prefix_len)
    return token


def aggregate(records: list[dict], frames: int, answer_tokens: int) -> dict[str, Any]:
    """Per-stage and end-to-end statistics from the per-repetition records."""
    cuda = records[0]["device"] is not None

    def series(group: tuple[str, ...], where: str) -> list[float] | None:
        if where == "device" and not cuda:
            return None
        return [sum(r[where][n] for n in group) for r in records]

    stages = {}
    for name, group in list(STAGE_GROUPS.items()) + [("question_ttft", ("question_ttft",))]:
        stages[name] = {"host_ms": stats(series(group, "host")), "device_ms": stats(series(group, "device"))}
    stages["decode"] = {"host_ms": stats([r["answer"]["decode_ms"] for r in records]), "device_ms": None}
    encode = ENCODE_STAGES
    scene_host = [sum(r["host"][n] for n in encode) + r["host"]["answer"] for r in records]
    scene_dev = [sum(r["device"][n] for n in encode) + r["device"]["answer"] for r in records] if cuda else None
    vision = series(tuple(n for g in VISION_STAGES for n in STAGE_GROUPS[g]), "host")
    return {
        "stages": stages,
        "preprocess_ms": stats(series(("decode_video", "preprocess"), "host")),
        "answer_ms": {"host_ms": stats(series(("answer",), "host")), "device_ms": stats(series(("answer",), "device"))},
        "scene_ms": {"host_ms": stats(scene_host), "device_ms": stats(scene_dev)},
        "time_to_first_token_ms": stats([sum(r["host"][n] for n in encode) + r["host"]["question_ttft"]
                                         for r in records]),
        "vision_ms_per_frame": stats([v / frames for v in vision]),
        "decode_tokens_per_s": stats([r["answer"]["decode_tokens_per_s"] for r in records]),
        "answer_tokens": answer_tokens,
        "visual_tokens": records[-1]["visual_tokens"],
        "prefix_tokens": records[-1]["prefix_tokens"],
        "reps": len(records),
    }


def edge_llm_profile(records: list[dict], row: dict, memory: dict) -> dict[str, Any]:
    """The row in TensorRT Edge-LLM's profile JSON structure (see the module docstring)."""
    cuda = records[0]["device"] is not None
    runs = len(records)
    where = "device" if cuda else "host"

    def total(names: tuple[str, ...]) -> float:
        return sum(r[where][n] for r in records for n in names)

    q_tokens = row["question_tokens"]
    prefill_ms = total(("prefill_prefix", "question_ttft"))
    computed = runs * row["prefix_tokens"] + runs * q_tokens
    reused = runs * row["prefix_tokens"]  # the question's prefill reuses the scene prefix's K/V
    generated = sum(int(r["answer"]["new_tokens"]) - 1 for r in records)
    decode_ms = sum(r["answer"]["decode_ms"] for r in records)
    vision_names = tuple(n for g in VISION_STAGES for n in STAGE_GROUPS[g])
    image_tokens = runs * row["visual_tokens"]
    stage_blocks = []
    for name, group in list(STAGE_GROUPS.items()) + [("question_ttft", ("question_ttft",)), ("answer", ("answer",))]:
        values = [sum(r[where][n] for n in group) for r in records]
        a = np.asarray(values)
        block = {"stage_id": name, "total_runs": runs,
                 "total_gpu_time_ms": float(a.sum()) if cuda else None,
                 "average_time_per_run_ms": float(a.mean())}
        st = {"count": runs, "min_ms": float(a.min()), "max_ms": float(a.max()), "mean_ms": float(a.mean()),
              "median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)),
              "p99_ms": float(np.percentile(a, 99)), "stddev_ms": float(a.std())}
        block["gpu_time_stats" if cuda else "host_time_stats"] = st
        stage_blocks.append(block)
    profile = {
        "time_source": "gpu_events" if cuda else "host_wall",
        "prefill": {"total_runs": runs, "reused_tokens": reused, "computed_tokens": computed,
                    "average_tokens_per_run": (reused + computed) / runs, "average_time_per_run_ms": prefill_ms / runs,
                    "tokens_per_second": (reused + computed) / (prefill_ms / 1e3) if prefill_ms else 0.0,
                    "average_time_per_token_ms": prefill_ms / (reused + computed) if computed else 0.0},
        "generation": {"total_runs": runs, "generated_tokens": generated, "average_tokens_per_run": generated / runs,
                       "tokens_per_second": generated / (decode_ms / 1e3) if decode_ms else 0.0,
                       "average_time_per_token_ms": decode_ms / generated if generated else 0.0,
                       "time_source": "host_wall"},
        "multimodal": {"total_runs": runs, "total_images": runs * row["frames"], "total_image_tokens": image_tokens,
                       "average_time_per_token_ms": total(vision_names) / image_tokens if image_tokens else 0.0},
        "stages": stage_blocks,
    }
    if memory.get("peak_gpu_memory_bytes"):
        profile["peak_gpu_memory_bytes"] = memory["peak_gpu_memory_bytes"]
        profile["peak_gpu_memory_mb"] = memory["peak_gpu_memory_mb"]
    return profile
