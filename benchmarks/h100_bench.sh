#!/usr/bin/env bash
# The lent-H100 run of the benchmark suite (issue 6): the edge preset at S = 32, 8, 16 frames of 336x518 (the
# frame size of VGGT's published timings) into ONE report, with these rows per frame count:
#   torch:fp32           torch eager, the FP32 reference (TF32 off), reference decoder (transformers, FP32)
#   torch:fp16           torch eager under FP16 autocast, reference decoder
#   onnxruntime:fp16     ONNX Runtime CUDA, the FP16 export, fast decoder (bf16, compiled, CUDA graphs)
#   onnxruntime:int8     ONNX Runtime CUDA, the INT8 Q/DQ graphs, fast decoder
#   torch-compiled:fp16  torch.compile (inductor) of the FP16-autocast units, fast decoder
#
# Resumable under a per-call limit: every call of
#   bash benchmarks/h100_bench.sh run
# does the next steps that are not done yet, each under what is left of DEADLINE seconds (default 570; one
# device call may run 600), and hands back what it has under $OUT before it ends:
#   1. the FP32 ONNX of the vision units (opset 23, CPU tracing) and the FP16 folder converted from it;
#   2. INT8 calibration inputs (a synthetic room with other textures, seed 1) and the Q/DQ graphs;
#   3. the rows, 32 frames first (the headline figure), kept across calls with --resume; rows that would end
#      past the deadline are listed as skipped with the reason and run by the next call.
# Repeat the call until the log says "report complete". Files under $WORK live only while the machine is warm;
# RESUME_REPORT=path/report.json (relative to the repository) starts a fresh machine from the rows of an
# earlier one (same device kind and settings, or --resume refuses it). INT8_SECONDS (default 300): the least
# time left in a call for starting the INT8 step (it is not resumable within itself).
# ONNX Runtime GPU comes from .device/ort-gpu-env.sh when carried (shared/tools/ort-gpu-wheel.sh prepares it).
# Result: $OUT/bench_h100_edge/ (report.json, report.md, plots/, logs/), to commit under benchmarks/results/.
#
# Dry run of the same steps on a CPU (minutes):
#   PRESET=tiny IMAGE_HW=70x84 FRAMES=4,2 ROWS=torch:fp32,onnxruntime:fp32,onnxruntime:int8 WORK=/tmp/dry \
#     OUT=/tmp/dryout bash benchmarks/h100_bench.sh run
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${WORK:-/tmp/vidllm-h100}
DEADLINE=${DEADLINE:-570}
PY=${PYTHON:-python3}
ROWS=${ROWS:-torch:fp32,torch:fp16,onnxruntime:fp16,onnxruntime:int8,torch-compiled:fp16}
LOGS=$WORK/logs
mkdir -p "$LOGS"

left() { echo $((DEADLINE - SECONDS)); }
handback() {  # every call hands back the report and logs so far, also when a step was cut by the deadline
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/bench_h100_edge"
    [ -d "$WORK/report" ] && cp -r "$WORK/report/." "$OUT/bench_h100_edge/"
    cp -r "$LOGS" "$OUT/bench_h100_edge/"
  fi
}
trap handback EXIT

if [ "${1:-}" != run ]; then echo "usage: bash benchmarks/h100_bench.sh run" >&2; exit 2; fi
if [ -f .device/ort-gpu-env.sh ] && { [ -d /tmp/ortsite/onnxruntime ] || [ -d /tmp/ortw ]; }; then
  # shellcheck disable=SC1091
  source .device/ort-gpu-env.sh
fi
cd "$WORK"  # Python runs outside the repository: its vidllm_edge/ folder alone would shadow the package
if ! "$PY" -c "import vidllm_edge.benchmarks.suite" 2>/dev/null; then
  # The package without installing it: its subpackages are top-level folders of the repository (pyproject).
  rm -rf /tmp/vidllm-pkg && mkdir -p /tmp/vidllm-pkg && cp -r "$REPO/vidllm_edge" /tmp/vidllm-pkg/
  for d in models export calibration engines runtime benchmarks; do ln -s "$REPO/$d" "/tmp/vidllm-pkg/vidllm_edge/$d"; done
  export PYTHONPATH=/tmp/vidllm-pkg${PYTHONPATH:+:$PYTHONPATH}
fi

if [[ "$ROWS" == *onnxruntime* ]] && [ -z "${PRESET:-}" ]; then
  # Preflight: ONNX Runtime's CUDA provider must start (it falls back to the CPU with only a warning otherwise,
  # which open_session turns into an error quoting the reason); minutes of export are useless without it.
  "$PY" - <<'PY' 2>&1 | tee -a "$LOGS/steps.log" || exit 3
import tempfile, pathlib, onnx
from onnx import TensorProto, helper
from vidllm_edge.runtime.ort_backend import open_session
g = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])])
path = pathlib.Path(tempfile.mkdtemp()) / "preflight.onnx"
onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), path)
print("preflight: ONNX Runtime providers of a session:", open_session(path, ["CUDAExecutionProvider"]).get_providers())
PY
fi

COMMON=(--preset "${PRESET:-edge}" --image-hw "${IMAGE_HW:-336x518}" --frames "${FRAMES:-32,8,16}"
        --export "$WORK/export" --opset 23)
step() {  # step NAME MIN_SECONDS ARGS...: one bench process under what is left of the deadline, logged;
  local name=$1 need=$2; shift 2  # not started with less than MIN_SECONDS left (the next call does it)
  local t; t=$(left)
  if [ "$t" -lt "$need" ]; then echo "[$SECONDS s] $name: not started, ${t} s left in this call" | tee -a "$LOGS/steps.log"; exit 0; fi
  echo "[$SECONDS s] $name (up to ${t} s) ..." | tee -a "$LOGS/steps.log"
  timeout --signal=INT --kill-after=15 "$t" "$PY" -m vidllm_edge.runtime.cli bench "$@" >>"$LOGS/$name.log" 2>&1
  local code=$?
  echo "[$SECONDS s] $name: exit $code" | tee -a "$LOGS/steps.log"
  tail -n 25 "$LOGS/$name.log"
  return $code
}

if [ -n "${RESUME_REPORT:-}" ] && [ ! -f "$WORK/report/report.json" ]; then  # rows an earlier machine measured
  case $RESUME_REPORT in /*) src=$RESUME_REPORT ;; *) src=$REPO/$RESUME_REPORT ;; esac
  mkdir -p "$WORK/report" && cp "$src" "$WORK/report/report.json"
fi
n_int8() { ls "$WORK"/export/fp32/onnx/*.int8.onnx 2>/dev/null | wc -l; }
if [ ! -f "$WORK/export/fp16/manifest.json" ]; then
  step export 60 "${COMMON[@]}" --rows torch:fp32,onnxruntime:fp16 --prepare-only || exit 1
fi
if [[ ",$ROWS," == *",onnxruntime:int8,"* ]] && [ "$(n_int8)" -lt 5 ]; then
  step int8 "${INT8_SECONDS:-300}" "${COMMON[@]}" --rows onnxruntime:int8 --prepare-only || exit 1
fi
budget=$(( $(left) - 20 ))  # the rows stop starting before the deadline; the rest is for handing back
step rows 90 "${COMMON[@]}" --rows "$ROWS" --reps "${REPS:-5}" --warmup 2 --answer-tokens 64 --out "$WORK/report" \
  --resume --max-seconds "$budget"
code=$?
if [ $code -le 1 ] && grep -q '"complete": true' "$WORK/report/report.json" 2>/dev/null &&
   ! grep -q "would end past the --max-seconds" "$WORK/report/report.json"; then
  echo "report complete (exit $code: 1 = a row failed its parity gate)" | tee -a "$LOGS/steps.log"
fi
exit 0
