# Shared set-up of the prepared GPU scripts (sourced by gpu_bench.sh and gpu_speed.sh): the output
# folder, our package from src/ without an install, a log and a scratch folder, the start time, and
# `describe_machine`, which prints the date, host, GPU, CPU and library versions (for env.txt).
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
WORK=$(mktemp -d)
start=$(date +%s)

describe_machine() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -a)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  grep -m1 "model name" /proc/cpuinfo 2>/dev/null
  echo "cpu cores: $(nproc)"
  "$PY" - <<'PYEOF'
import sys, torch, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "| transformers", transformers.__version__)
print("cuda available:", torch.cuda.is_available(), "| cuda", torch.version.cuda,
      "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PYEOF
}
