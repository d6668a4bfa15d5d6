#!/usr/bin/env bash
# Prepare the wheels benchmarks/gpu_suite.sh installs on the GPU machine (issue 24): that machine
# (Python 3.12, torch 2.11, transformers 5.17, no internet) has transformers below the supported
# range, so a supported one travels in .whl/ (git-ignored), with regex (transformers 5.24 needs a
# 2025.10 or newer one). Everything else it needs is in its image (huggingface-hub 1.33, tokenizers
# 0.23, safetensors 0.8, numpy, matplotlib, tqdm, accelerate). About 15 MB. Usage, here:
#     bash scripts/prepare_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .whl
rm -f .whl/*.whl
lowest=$(PYTHONPATH=src $PY -c "from streamingllm.compat import TRANSFORMERS_RANGE as r; print('%d.%d.0' % r[0])")
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "transformers==$lowest" "regex>=2025.10.22"
ls -la .whl
