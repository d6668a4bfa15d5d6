#!/usr/bin/env bash
# The Gemma 3 270M evaluations of docs/results.md (issue 14), one after the other on a quiet machine
# (about 35 minutes on 2 CPU cores). Usage, in the project's venv: bash benchmarks/gemma3_evals.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "from streamingllm.evals.corpus import austen_text; print(austen_text()[:4000])" > austen_head.txt
streamingllm attention --model gemma3-270m --text-file austen_head.txt --num-tokens 512 --random-weights --out docs/bench/gemma3/attention
streamingllm passkey --model gemma3-270m --total-tokens 2048 --cache-size 512 --trials 2 --out docs/bench/gemma3/passkey
streamingllm perplexity --model gemma3-270m --corpus austen --num-tokens 36864 --cache-size 512 --recompute-every 512 --segment-tokens 4096 --out docs/perplexity/gemma3
