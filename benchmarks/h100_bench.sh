#!/usr/bin/env bash
# The lent-H100 run of the benchmark suite (issue 6): the edge preset at S = 8, 16, 32 frames of 336x518 (the
# frame size of VGGT's published timings), torch eager (FP32 reference, FP16 autocast), torch.compile (FP16),
# ONNX Runtime CUDA (FP16, INT8 Q/DQ) and the fast decoder, into ONE report.
#
# One device call per phase, back to back on a warm machine (files under $WORK live only while it is warm);
# every phase is sized to end within a 10-minute call (the estimates are guesses for 16 CPU cores + one H100):
#
#   bash benchmarks/h100_bench.sh prepare       # ~8 min: FP32 ONNX of the vision units (opset 23, CPU tracing;
#                                               # perception took 61 s at 518x518 on that machine), the FP16
#                                               # folder converted from it (no second trace), INT8 calibration
#                                               # (synthetic room, seed 1) and the Q/DQ graphs
#   bash benchmarks/h100_bench.sh torch         # ~8 min: torch eager fp32 + fp16 autocast, reference decoder
#   bash benchmarks/h100_bench.sh ort           # ~8 min: ONNX Runtime CUDA fp16 + int8, fast decoder (bf16, graphs)
#   bash benchmarks/h100_bench.sh compiled      # ~9 min: torch.compile fp16 vision + the fast decoder
#   bash benchmarks/h100_bench.sh report        # seconds: copy the report folder to $OUT/bench_h100_edge
#
# Every bench phase writes into the same report with --resume and stops starting rows past --max-seconds, so
# a phase whose rows were cut (they are listed as skipped, with the reason) is finished by running it again.
# The first phase that finds no installed package installs it (pip install -e . --no-deps); ONNX Runtime GPU
# comes from .device/ort-gpu-env.sh when carried (shared/tools/ort-gpu-wheel.sh prepares it).
# Result: $OUT/bench_h100_edge/ (report.json, report.md, plots/), to commit as benchmarks/results/bench_h100_edge/.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/vidllm-h100}
BUDGET=${BUDGET:-500}  # seconds after which a phase starts no new row (the call limit is 600)
PY=${PYTHON:-python3}

if [ -f .device/ort-gpu-env.sh ] && { [ -d /tmp/ortsite/onnxruntime ] || [ -d /tmp/ortw ]; }; then
  # shellcheck disable=SC1091
  source .device/ort-gpu-env.sh
fi
if ! "$PY" -c "import vidllm_edge.benchmarks.suite" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi

# PRESET / IMAGE_HW / FRAMES override the H100 settings for a dry run of the phases elsewhere, e.g.
#   PRESET=tiny IMAGE_HW=70x84 FRAMES=2,4 WORK=/tmp/dry bash benchmarks/h100_bench.sh prepare   (on a CPU)
COMMON=(--preset "${PRESET:-edge}" --image-hw "${IMAGE_HW:-336x518}" --frames "${FRAMES:-8,16,32}"
        --export "$WORK/export" --opset 23)
BENCH=("${COMMON[@]}" --reps 5 --warmup 2 --answer-tokens 64 --out "$WORK/report" --resume --max-seconds "$BUDGET")
bench() { "$PY" -m vidllm_edge.runtime.cli bench "$@" || { code=$?; [ "$code" -eq 1 ] || exit "$code"; }; }  # 1: a gate failed

case "${1:-}" in
  prepare)     "$PY" -m vidllm_edge.runtime.cli bench "${COMMON[@]}" --backends onnxruntime --precision fp16,int8 --prepare-only ;;
  torch)       bench "${BENCH[@]}" --backends torch --precision fp32,fp16 ;;
  ort)         bench "${BENCH[@]}" --backends onnxruntime --precision fp16,int8 ;;
  compiled)    bench "${BENCH[@]}" --backends torch-compiled --precision fp16 ;;
  report) ;;
  *) echo "usage: bash benchmarks/h100_bench.sh prepare|torch|ort|compiled|report" >&2; exit 2 ;;
esac
if [ -n "${OUT:-}" ] && [ -f "$WORK/report/report.json" ]; then  # every phase hands back the report so far
  mkdir -p "$OUT" && rm -rf "$OUT/bench_h100_edge" && cp -r "$WORK/report" "$OUT/bench_h100_edge"
fi
