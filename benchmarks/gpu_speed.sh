#!/usr/bin/env bash
# Issue 13's GPU run, prepared for a session with a device: decode at Llama-2-7B's shape (random
# fp16 weights, batch 1) against the memory-bandwidth limit, eager and compiled (CUDA graphs),
# streaming against dense (DynamicCache) and compiled dense (StaticCache, transformers' best);
# then the same arms on the default model's shape; then the compiled step's exactness on CUDA.
#
# Run from the repository root on the GPU machine (python3 with torch, transformers, matplotlib,
# tqdm; our package from src/, no install):
#
#     OUT=/path/to/results bash benchmarks/gpu_speed.sh
#
# Targets it measures (issue 13): at 4096, streaming-compiled/limit <= 1.3, streaming/dense <= 1.00,
# streaming-compiled/dense-compiled <= 1.00. Each row of decode_*.csv carries limit_ms (weights and
# KV read once at the measured copy bandwidth) and vs_limit. At most 6 files in $OUT: env.txt,
# log.txt, decode_7b.{csv,png}, decode_smollm.{csv,png}. About 6-8 minutes on an H200 (the 7B
# model is initialised on the GPU; each compiled arm compiles once per size).
#
# CPU smoke test with tiny settings (every code path except CUDA; the 7B shape is replaced):
#     OUT=/tmp/gpu_speed_smoke DEVICE=cpu DTYPE=float32 BIG=smollm2-135m SIZES="32 64" STEPS=3 WARMUP=1 \
#       bash benchmarks/gpu_speed.sh
set -u -o pipefail

OUT=${OUT:?set OUT to the results folder}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float16}
BIG=${BIG:-llama2-7b-shape}
SIZES=${SIZES:-1024 4096}
STEPS=${STEPS:-48}
WARMUP=${WARMUP:-8}
LIMIT_S=${LIMIT_S:-240}

. "$(dirname "$0")/gpu_common.sh"
{
  describe_machine
  echo "settings: DEVICE=$DEVICE DTYPE=$DTYPE BIG=$BIG SIZES='$SIZES' STEPS=$STEPS WARMUP=$WARMUP"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
decode() {  # decode NAME MODEL: one interleaved decode run, copied to $OUT/decode_NAME.{csv,png}
  local name=$1 model=$2
  echo "=== [$(( $(date +%s) - start )) s] decode $name ($model)" | tee -a "$LOG"
  # shellcheck disable=SC2086
  timeout "$LIMIT_S" "$PY" -m streamingllm.cli bench decode --model "$model" --random-weights --device "$DEVICE" \
    --dtype "$DTYPE" --sizes $SIZES --methods streaming streaming-compiled dense dense-compiled --steps "$STEPS" \
    --warmup "$WARMUP" --no-progress --out "$WORK/$name" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "=== exit status $rc (124 = over its ${LIMIT_S} s limit)" | tee -a "$LOG"; status=1; }
  for ext in csv png; do
    [ -f "$WORK/$name/decode.$ext" ] && cp "$WORK/$name/decode.$ext" "$OUT/decode_$name.$ext"
  done
  return 0
}

decode 7b "$BIG"
decode smollm smollm2-135m
echo "=== [$(( $(date +%s) - start )) s] compiled step on $DEVICE against eager" | tee -a "$LOG"
timeout 120 "$PY" - "$DEVICE" <<'EOF' 2>&1 | tee -a "$LOG"
import sys, torch
from streamingllm import SinkCache, load
from streamingllm.compiled import DecodeStep
from streamingllm.feed import prefill
torch.set_grad_enabled(False)
device = sys.argv[1]
model, _ = load(random_weights=True, device=device, dtype="float32")
ids = torch.randint(0, 1000, (1, 700), generator=torch.Generator().manual_seed(0)).to(device)
out = {}
for name, step in (("eager", DecodeStep(model, "off")), ("compiled", DecodeStep(model, "on", on_compile=print))):
    cache = SinkCache(model, 4, 252, rebase_every=256)
    prefill(model, cache, ids[:, :300])
    out[name] = torch.cat([step(ids[:, t : t + 1], cache) for t in range(300, 700)], 1)
print(f"compiled vs eager, float32, 400 steps through a 4+252 cache (rebases included): "
      f"max |dlogit| = {(out['compiled'] - out['eager']).abs().max().item():.2e} (tolerance 1e-3)")
EOF
rm -rf "$WORK"
echo "=== done in $(( $(date +%s) - start )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
exit $status
