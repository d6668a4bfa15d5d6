#!/usr/bin/env bash
# Run the cache's exactness tests on the lowest transformers release the project supports
# (TRANSFORMERS_RANGE in src/streamingllm/compat.py), installed beside the newest in a separate
# folder. Usage (inside the project's venv): bash scripts/test_lowest_transformers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
lowest=$(python -c "from streamingllm.compat import TRANSFORMERS_RANGE as r; print('%d.%d.0' % r[0])")
installed=$(python -c "import transformers; print(transformers.__version__)")
echo "transformers: newest in range $installed (full suite above), lowest $lowest"
if [ "$installed" = "$lowest" ]; then
    echo "the newest release is the lowest one: the full suite above covered it"
    exit 0
fi
target=".ci-cache/transformers-$lowest"
[ -d "$target" ] || pip install -q --no-deps --target "$target" "transformers==$lowest"
PYTHONPATH="$target" python -c "import transformers; assert transformers.__version__ == '$lowest', transformers.__version__"
PYTHONPATH="$target" python -m pytest -q -n 2 --dist loadgroup tests/core/test_cache.py tests/core/test_generate.py \
    tests/core/test_timeline.py tests/core/test_memory.py
