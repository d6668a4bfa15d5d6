#!/usr/bin/env bash
# The evaluations of the memory of evicted blocks (issue 26) in docs/results.md, one after the other
# on a quiet machine. Usage, in the project's venv:
#   bash benchmarks/memory_evals.sh [step ...]
# Steps: passkey2k, passkey8k, ppl, gemma3 (passkey), gemma3ppl, streameval, passkey32k,
# passkey8k_1024, passkey32k_1024; all of them by default.
# then: python benchmarks/memory_cost.py and python benchmarks/chat_recall.py (see their docstrings)
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/bench/memory
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(passkey2k passkey8k ppl gemma3 gemma3ppl streameval passkey32k passkey8k_1024
                                  passkey32k_1024)
for step in "${steps[@]}"; do
  case $step in
    passkey2k) streamingllm passkey --methods dense window recompute streaming memory --cache-size 256 1024 \
                 --total-tokens 2048 --depths 0.1 0.3 0.5 0.7 0.9 --trials 2 --out $out/passkey_2k ;;
    passkey8k) streamingllm passkey --methods dense window recompute streaming memory --cache-size 256 \
                 --total-tokens 8192 --depths 0.1 0.3 0.5 0.7 0.9 --trials 1 --out $out/passkey_8k ;;
    ppl) streamingllm perplexity --corpus austen --num-tokens 20000 --methods streaming memory --cache-size 1024 \
           --out $out/perplexity
         streamingllm perplexity --corpus austen --num-tokens 20000 --methods memory --cache-size 1024 --lookup-every 4 \
           --out $out/perplexity_every4 ;;
    gemma3) streamingllm passkey --model gemma3-270m --methods streaming memory --cache-size 512 --total-tokens 4096 \
              --depths 0.1 0.5 0.9 --trials 1 --out $out/gemma3_passkey ;;
    gemma3ppl) streamingllm perplexity --model gemma3-270m --corpus austen --num-tokens 8192 --methods streaming memory \
                 --cache-size 1024 --out $out/gemma3_perplexity ;;
    streameval) streamingllm streameval --lines 200 --distances 20 40 --methods dense streaming memory --cache-size 256 \
                  --bucket-tokens 1024 --out $out/streameval
                streamingllm streameval --lines 200 --distances 20 40 --methods dense streaming memory --cache-size 256 \
                  --bucket-tokens 1024 --chat --out $out/streameval_chat ;;
    passkey32k) streamingllm passkey --methods streaming memory --cache-size 256 --total-tokens 32768 \
                  --depths 0.1 0.5 0.9 --trials 1 --max-dense-tokens 0 --out $out/passkey_32k ;;
    passkey8k_1024) streamingllm passkey --methods dense window recompute streaming memory --cache-size 1024 \
                      --total-tokens 8192 --depths 0.1 0.3 0.5 0.7 0.9 --trials 1 --out $out/passkey_8k_1024 ;;
    passkey32k_1024) streamingllm passkey --methods streaming memory --cache-size 1024 --total-tokens 32768 \
                       --depths 0.1 0.5 0.9 --trials 1 --max-dense-tokens 0 --out $out/passkey_32k_1024 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
