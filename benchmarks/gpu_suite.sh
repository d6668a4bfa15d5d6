#!/usr/bin/env bash
# Issue 24's one GPU command: everything the project has never measured on a GPU, in one run that
# fits the device's 15 minutes (about 7 on an H200, leaving room for one rerun).
#
#   1. exactness on CUDA (benchmarks/gpu_exactness.py): float32/bfloat16/float16 drift against a
#      float64 CPU twin over 6,000 evicting tokens, device_map over the GPU and the CPU, the compiled
#      (CUDA-graph) step against eager, and the memory of evicted blocks against the CPU;
#   2. decode at Llama-2-7B's shape (random fp16 weights, batch 1), one interleaved run at cache
#      1,024 and 4,096: streaming eager and compiled, dense eager and compiled (StaticCache), and
#      re-computation, each row with its memory-bandwidth limit;
#   3. the server's batched decode (decode_rows over stacked session caches), 7B shape, fp16, cache
#      1,024 per session, 1/8/32/64 sessions: tokens/s, p50/p90/p99 and the batch's bandwidth limit.
#
# On the GPU machine (device tool), after `bash scripts/prepare_gpu_wheels.sh` here:
#     run(command="OUT=$OUT bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=540)
# It installs .whl/*.whl into /tmp/site (no index, no deps), uses our package from src/, and writes at
# most 8 files to $OUT: env.txt, log.txt, drift.csv, checks.json, decode_7b.csv, decode_7b.png,
# batch_7b.csv. Each part has its own time limit, so one part failing or overrunning leaves the
# others' results. CPU smoke test with tiny settings (every code path except CUDA):
#     OUT=/tmp/gpu_suite_smoke DEVICE=cpu DTYPE=float32 BIG=smollm2-135m SIZES="32 64" STEPS=3 WARMUP=1 \
#       TOKENS=3500 BATCH="1 2" BATCH_SIZES=32 bash benchmarks/gpu_suite.sh
set -u -o pipefail

OUT=${OUT:?set OUT to the results folder}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float16}
BIG=${BIG:-llama2-7b-shape}
SIZES=${SIZES:-1024 4096}
STEPS=${STEPS:-48}
WARMUP=${WARMUP:-8}
TOKENS=${TOKENS:-6000}
BATCH=${BATCH:-1 8 32 64}
BATCH_SIZES=${BATCH_SIZES:-1024}

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
. "$(dirname "$0")/gpu_common.sh"
{
  describe_machine
  echo "settings: DEVICE=$DEVICE DTYPE=$DTYPE BIG=$BIG SIZES='$SIZES' STEPS=$STEPS TOKENS=$TOKENS BATCH='$BATCH'"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
part() {  # part NAME LIMIT_S COMMAND...: run one part under its time limit, into the log
  local name=$1 limit=$2
  shift 2
  echo "=== [$(( $(date +%s) - start )) s] $name" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "=== $name: exit status $rc (124 = over its $limit s limit)" | tee -a "$LOG"; status=1; }
  return 0
}

part exactness 150 "$PY" benchmarks/gpu_exactness.py --out "$WORK/exact" --tokens "$TOKENS" --device "$DEVICE"
for f in drift.csv checks.json; do [ -f "$WORK/exact/$f" ] && cp "$WORK/exact/$f" "$OUT/$f"; done

# shellcheck disable=SC2086
part "decode $BIG" 200 "$PY" -m streamingllm.cli bench decode --model "$BIG" --random-weights --device "$DEVICE" \
  --dtype "$DTYPE" --sizes $SIZES --methods streaming streaming-compiled dense dense-compiled recompute \
  --steps "$STEPS" --warmup "$WARMUP" --recompute-steps 4 --no-progress --out "$WORK/decode"
for ext in csv png; do [ -f "$WORK/decode/decode.$ext" ] && cp "$WORK/decode/decode.$ext" "$OUT/decode_7b.$ext"; done

# shellcheck disable=SC2086
part "batched decode $BIG" 150 "$PY" -m streamingllm.cli bench decode --model "$BIG" --random-weights \
  --device "$DEVICE" --dtype "$DTYPE" --sizes $BATCH_SIZES --batch $BATCH --steps "$STEPS" --warmup "$WARMUP" \
  --no-progress --out "$WORK/batch"
[ -f "$WORK/batch/batch.csv" ] && cp "$WORK/batch/batch.csv" "$OUT/batch_7b.csv"

echo "=== [$(( $(date +%s) - start )) s] done, status $status" | tee -a "$LOG"
ls -la "$OUT"
exit $status
